"""``kdjax fed run``: dataset -> partition -> packed clients -> rounds -> metrics.

``run_simulation(config, workdir)`` writes into ``workdir``:

* ``metrics.jsonl``: one line per round (``round``, ``train_loss``,
  ``train_accuracy``, ``num_reported``, ``bytes_up``, ``bytes_down``, and on
  evaluation rounds ``global_accuracy`` and ``personalized_accuracy_mean`` /
  ``_std`` / ``_worst10``);
* ``summary.json``: the last evaluation, rounds per second, the partition stats;
* ``partition.txt`` and ``partition.png``: the stats table and the heatmap;
* ``accuracy.png`` (accuracy against round) and ``clients.png`` (per-client
  personalized accuracy at the end);
* ``tensorboard/``: the same figures as TensorBoard scalars;
* ``checkpoints/``: orbax checkpoints (:mod:`kdjax.workdir`: async, the newest
  ``keep_checkpoints`` kept, item ``state`` with the simulation state's own names)
  every ``checkpoint_every`` rounds, and on SIGTERM (then exit 143); a rerun with
  the same workdir resumes from the latest one and produces the same result as an
  uninterrupted run;
* ``config.json``: the run's config. A workdir holding checkpoints is resumed
  only by the same config up to :data:`RESUMABLE_FIELDS` (``num_rounds``, what
  is evaluated, checkpointed and plotted, ``rounds_per_call``); another config is
  refused.

A round whose training loss is not finite stops the run (exit 3) with one line
naming the round and the last good checkpoint; nothing after it is saved.

Rounds go ``rounds_per_call`` at a time into one call (:meth:`RoundFn.rounds
<kdjax.federated.simulator.RoundFn.rounds>`, a ``lax.scan``), cut so that every
evaluation and checkpoint falls at the end of a call: the files are those of one
round per call. ``summary.json``'s ``rounds_per_sec`` times the calls whose length
had already compiled.

Bytes are those of the pytrees exchanged in this simulation: down = cohort size
× what a client downloads, up = reporting clients × the update pytree.
"""

from __future__ import annotations

import os
import time
from typing import Any

import jax
import ml_collections
import numpy as np

from kdjax import data as kdata
from kdjax import storage
from kdjax import workdir as workdir_lib
from kdjax.engine.config import base_config as engine_base_config
from kdjax.engine.loop import Preemption
from kdjax.engine.metrics import MetricsWriter
from kdjax.engine.metrics import read_jsonl
from kdjax.engine.optim import make_optimizer
from kdjax.errors import Diverged
from kdjax.errors import UserError
from kdjax.federated import packing
from kdjax.federated import partition as partition_lib
from kdjax.federated import simulator as sim
from kdjax.federated.algorithms import make_algorithm
from kdjax.federated.config import validate
from kdjax.federated.local import make_local_trainer
from kdjax.models import from_config
from kdjax.parallel import initialize_from_env


def as_dict(d) -> dict:
  """A config group (``ConfigDict``, mapping or None) as a plain ``dict``."""
  if d is None:
    return {}
  if isinstance(d, ml_collections.ConfigDict):
    return d.to_dict()
  return dict(d)


def _model(model_cfg, *, num_classes: int, input_shape, seed: int):
  """``(apply, params, model_state)`` of a config's model group, made on the host."""
  apply, init, _ = from_config(model_cfg, num_classes=num_classes, input_shape=input_shape,
                               seed=seed)
  params, model_state = init()
  return apply, params, model_state


def client_optimizer(config: ml_collections.ConfigDict):
  """Each client's optax optimizer from ``config.optimizer`` (constant rate, reset every
  round); ``optax.sgd(learning_rate, momentum)`` by default."""
  cfg = engine_base_config().optimizer
  cfg.update(as_dict(config.optimizer))
  cfg.schedule, cfg.warmup_steps = 'constant', 0
  return make_optimizer(cfg, 1)


def make_trainer(config: ml_collections.ConfigDict, apply):
  """The local trainer of a config: ``batch_size``, ``local_epochs``, ``optimizer``."""
  opt = config.optimizer
  return make_local_trainer(apply, batch_size=int(config.batch_size),
                            epochs=int(config.local_epochs), lr=float(opt.learning_rate),
                            momentum=float(opt.momentum), tx=client_optimizer(config))


def setup(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Loads data, partitions, packs, builds the model, trainer, algorithm and round.

  Writes nothing: a bad config or data set is refused (:class:`UserError`) first.

  Returns:
    A dict with ``apply``, ``params``, ``model_state``, ``algorithm``,
    ``round_fn``, ``evaluate``, ``personal_evaluate``, ``train`` / ``test``
    (packed, on device), ``test_x`` / ``test_label`` (the global test split),
    ``partition``, ``labels`` and ``seed``.
  """
  validate(config)
  initialize_from_env()   # a multi-process run (KDJAX_COORDINATOR, ...): before any device
  data_dir = config.data.data_dir or None
  train = kdata.load_arrays(config.data.name, 'train', data_dir=data_dir)
  test = kdata.load_arrays(config.data.name, 'test', data_dir=data_dir)
  num_classes = int(max(train['label'].max(), test['label'].max())) + 1
  proxy_x = None
  proxy_size = int(config.proxy_size)
  if proxy_size:
    # Unlabeled proxy data (FedDF): a seeded subset of the training split, held out
    # of the partition for every algorithm, so runs with and without it compare.
    if proxy_size >= len(train['label']):
      raise UserError(f'proxy_size ({proxy_size}) must be smaller than the '
                      f'{len(train["label"])} training examples.')
    perm = np.random.default_rng([config.seed, 7]).permutation(len(train['label']))
    proxy_x = train['x'][np.sort(perm[:proxy_size])]
    keep = np.sort(perm[proxy_size:])
    train = {k: v[keep] for k, v in train.items()}
  part_opts = as_dict(config.partition)
  method = part_opts.pop('method', 'dirichlet')
  part_opts.setdefault('seed', config.seed)
  if method == 'natural':
    # Natural clients (Shakespeare roles): partition train + test together; each
    # client's local test split is its own windows of the data set's test split.
    n_train = len(train['label'])
    train = {k: np.concatenate([train[k], test[k]]) for k in train if k in test}
    part_opts.update(client_ids=train.get('client'),
                     test_mask=np.arange(len(train['label'])) >= n_train)
    meta = kdata.load_source(config.data.name, 'train',
                             data_dir=data_dir).dataset_info.metadata or {}
    part_opts.setdefault('names', meta.get('role_names'))
  part = partition_lib.make_partition(train['label'], config.num_clients, method,
                                      num_classes=num_classes, **part_opts)
  skew = None
  if config.get('feature_skew'):
    fs = as_dict(config.feature_skew)
    try:
      skew = partition_lib.feature_skew(config.num_clients, seed=config.seed, **fs)
    except TypeError as e:
      raise UserError(f'config.feature_skew: {e}.') from None
  tr, te = packing.pack_partition(train['x'], train['label'], part,
                                  batch_size=int(config.batch_size), skew=skew)
  data_parts = {
      'train': jax.tree.map(jax.numpy.asarray, tr), 'test': jax.tree.map(jax.numpy.asarray, te),
      'test_x': jax.numpy.asarray(test['x']), 'test_label': jax.numpy.asarray(test['label']),
      'partition': part, 'labels': train['label'], 'seed': int(config.seed),
  }
  mesh = _client_mesh(config)
  if mesh:   # every array a call reads on the client mesh, whose devices may span processes
    data_parts.update(sim.replicate({k: data_parts[k] for k in
                                     ('train', 'test', 'test_x', 'test_label')}, mesh['mesh']))
  if config.get('client_models'):   # heterogeneous architectures (kdjax.federated.groups)
    return {**_setup_groups(config, num_classes=num_classes, input_shape=train['x'].shape[1:],
                            proxy_x=proxy_x), **data_parts}
  apply, params, model_state = _model(config.model, num_classes=num_classes,
                                      input_shape=train['x'].shape[1:], seed=config.seed)
  trainer = make_trainer(config, apply)
  alg_options = as_dict(config.get('algorithm_options'))
  seeded_option = config.algorithm == 'feddf' and 'seed' not in alg_options

  def build_algorithm(proxy, seed):
    # The algorithm for a proxy set and seed, which may be traced: a sweep vmaps
    # the seeds of proxy-set algorithms through this (kdjax.federated.sweep).
    opts = dict(alg_options, seed=seed) if seeded_option else alg_options
    return make_algorithm(config.algorithm, trainer, proxy_x=proxy, num_classes=num_classes,
                          **opts)

  algorithm = build_algorithm(proxy_x, config.seed)
  chunk = config.get('clients_per_chunk') or None
  round_fn = sim.make_round(algorithm, num_clients=config.num_clients,
                            clients_per_round=config.clients_per_round,
                            sampling=config.get('sampling', 'uniform'),
                            dropout=config.get('dropout', 0.0), clients_per_chunk=chunk,
                            seed=config.seed, **mesh)
  return {
      'client_mesh': dict(mesh['mesh'].shape) if mesh else None,
      'mesh': mesh['mesh'] if mesh else None,
      'proxy_x': proxy_x, 'build_algorithm': build_algorithm,
      'apply': apply, 'params': params, 'model_state': model_state, 'algorithm': algorithm,
      'round_fn': round_fn, 'evaluate': sim.make_evaluate(apply),
      'clients_global_evaluate': sim.make_clients_global_evaluate(algorithm, apply),
      'personal_evaluate': sim.make_personal_evaluate(algorithm, apply,
                                                      clients_per_chunk=chunk),
      **data_parts,
  }


def _client_mesh(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``make_round``'s ``mesh`` / ``client_axis`` from ``config.mesh`` (none when empty).

  ``config.mesh`` is a one-axis mesh such as ``[('clients', -1)]`` (all devices, of
  every process in a multi-process run): each vmapped chunk of the cohort is sharded
  over that axis. Every process holds the whole packed data and state, replicated;
  each device trains its own clients of the chunk.
  """
  axes = [tuple(a) for a in (config.get('mesh') or ())]
  if not axes:
    return {}
  if len(axes) != 1 or len(axes[0]) != 2:
    raise UserError(f"config.mesh must be one axis such as [('clients', -1)], got {axes}.")
  from kdjax.parallel import make_mesh
  try:
    mesh = make_mesh(axes)
  except ValueError as e:
    raise UserError(f'config.mesh: {e}.') from None
  return {'mesh': mesh, 'client_axis': str(axes[0][0])}


def _setup_groups(config: ml_collections.ConfigDict, *, num_classes: int, input_shape,
                  proxy_x) -> dict[str, Any]:
  """The model/algorithm/round parts of :func:`setup` for ``config.client_models``."""
  from kdjax.federated import groups

  specs = [as_dict(m) for m in config.client_models]
  ids = groups.assign_clients(config.num_clients, [float(s.get('fraction', 1.0)) for s in specs],
                              seed=config.seed)
  alg_options = as_dict(config.get('algorithm_options'))
  if config.algorithm == 'feddf':
    alg_options.setdefault('seed', config.seed)
  applies, params, states, algorithms = [], [], [], []
  for spec in specs:
    apply, p, ms = _model(spec, num_classes=num_classes, input_shape=input_shape,
                          seed=config.seed)
    algorithms.append(make_algorithm(config.algorithm, make_trainer(config, apply),
                                     proxy_x=proxy_x, num_classes=num_classes, **alg_options))
    applies.append(apply)
    params.append(p)
    states.append(ms)
  groups.check_heterogeneous(algorithms)
  chunk = config.get('clients_per_chunk') or None
  mesh = _client_mesh(config)
  round_fn = groups.make_grouped_round(
      algorithms, ids, num_clients=config.num_clients,
      clients_per_round=config.clients_per_round, sampling=config.get('sampling', 'uniform'),
      dropout=config.get('dropout', 0.0), clients_per_chunk=chunk, seed=config.seed, **mesh)
  return {
      'client_mesh': dict(mesh['mesh'].shape) if mesh else None,
      'mesh': mesh['mesh'] if mesh else None,
      'groups': ids, 'algorithm': algorithms[0], 'algorithms': algorithms, 'apply': applies[0],
      'params': params[0], 'model_state': states[0], 'round_fn': round_fn,
      'init_state': lambda: groups.init_grouped_state(algorithms, params, states, ids),
      'cohort_sizes': groups.group_cohort_sizes(config.clients_per_round,
                                                [len(g) for g in ids]),
      'grouped_evaluate': groups.make_grouped_evaluate(
          algorithms, applies, ids, num_clients=config.num_clients, clients_per_chunk=chunk),
  }


def personal_evaluate(parts: dict[str, Any], state: sim.SimState):
  """``(correct [N], count [N])`` of every client's personal model on its local test split.

  Algorithms with a ``finetune`` hook (fedavg_ft) first adapt the current server
  state on each client's training split (``parts['train']``), keyed by the run's seed.
  """
  return parts['personal_evaluate'](state, parts['test'], parts['train'],
                                    int(parts.get('seed', 0)))


def evaluate_state(parts: dict[str, Any], state: sim.SimState) -> dict[str, float]:
  """Global test accuracy and personalized accuracy summary of ``state``."""
  if 'groups' in parts:
    return parts['grouped_evaluate'](state, parts['test'], parts['test_x'],
                                     parts['test_label'])[0]
  if parts['algorithm'].has_global_model:
    c, n = parts['evaluate'](state.server.params, state.server.model_state, parts['test_x'],
                             parts['test_label'])
  else:   # no server model: the mean over the client models
    cs, ns = parts['clients_global_evaluate'](state, parts['test_x'], parts['test_label'])
    c, n = float(np.mean(np.asarray(cs) / np.maximum(np.asarray(ns), 1.0))), 1.0
  pc, pn = personal_evaluate(parts, state)
  out = {'global_accuracy': float(c) / max(float(n), 1.0)}
  out.update(sim.personalized_summary(np.asarray(pc), np.asarray(pn)))
  return out


# What a workdir's results do not depend on: a run resumed from its checkpoints may
# change how long it goes on and what it reports, nothing else.
RESUMABLE_FIELDS = ('num_rounds', 'eval_every', 'checkpoint_every', 'keep_checkpoints',
                    'plots', 'progress', 'rounds_per_call')


# --------------------------------------------------------------------------- the run

def run_simulation(config: ml_collections.ConfigDict, workdir: str, *,
                   progress: bool = True) -> dict[str, Any]:
  """Runs ``config.num_rounds`` rounds and writes the workdir files (module doc).

  Args:
    config: a federated config (see ``configs/fed/mnist1d_fedavg.py``).
    workdir: output directory (created; resumed from if it holds checkpoints).
    progress: show a progress bar (and ``config.progress``).

  Returns:
    The summary dict (also written to ``summary.json``).

  Raises:
    UserError: a bad config, data set or workdir (nothing written).
    Diverged: a round's training loss was not finite.
  """
  workdir_lib.check_creatable(workdir)
  parts = setup(config)
  has_checkpoints = workdir_lib.has_checkpoints(workdir)
  workdir = workdir_lib.prepare(workdir, config, has_results=has_checkpoints,
                                ignore=RESUMABLE_FIELDS)
  if jax.process_index() == 0:   # one writer in a multi-process run
    _write_partition(workdir, config, parts)
  # Checkpoints are restored even when this run writes none (checkpoint_every=0).
  manager = workdir_lib.checkpoint_manager(workdir, keep=int(config.keep_checkpoints))
  state = _initial_state(config, parts, manager, restore=has_checkpoints)
  writer = MetricsWriter(workdir, resume_step=int(state.round) or None, step_key='round')
  try:
    state, last_eval, rounds_per_sec = _run_rounds(config, parts, state, manager, writer,
                                                   progress=(progress and config.progress
                                                             and jax.process_index() == 0))
  finally:
    manager.wait_until_finished()
    manager.close()
    writer.close()
  if 'groups' in parts:
    pc, pn = parts['grouped_evaluate'](state, parts['test'], parts['test_x'],
                                       parts['test_label'])[1]
  else:
    pc, pn = personal_evaluate(parts, state)
  summary = {
      'round': int(state.round),
      'algorithm': config.algorithm,
      'num_clients': int(config.num_clients),
      'clients_per_round': int(config.clients_per_round),
      'partition': partition_lib.partition_stats(parts['partition'], parts['labels']),
      'rounds_per_sec': rounds_per_sec,
      'client_mesh': parts.get('client_mesh'),   # {axis: devices} when the cohort is sharded
      **last_eval,
  }
  if jax.process_index() == 0:   # one writer in a multi-process run
    workdir_lib.write_json(storage.join(workdir, workdir_lib.SUMMARY), summary)
  if config.plots and jax.process_index() == 0:
    _plot(workdir, writer.path, np.asarray(pc), np.asarray(pn))
  return summary


def _write_partition(workdir: str, config, parts) -> None:
  part, labels = parts['partition'], parts['labels']
  storage.write_text(storage.join(workdir, 'partition.txt'),
                     partition_lib.format_stats(part, labels) + '\n')
  if config.plots:
    partition_lib.plot_heatmap(part, labels, storage.join(workdir, 'partition.png'))


def _initial_state(config, parts, manager, *, restore: bool) -> sim.SimState:
  """The state before round 0, or the latest checkpoint's; placed on the client mesh."""
  if 'init_state' in parts:
    state = parts['init_state']()
  else:
    state = sim.init_state(parts['algorithm'], parts['params'], parts['model_state'],
                           config.num_clients)
  if restore:
    state, _ = workdir_lib.restore(manager, manager.latest_step(), state)
  return sim.replicate(state, parts.get('mesh'))


def _run_rounds(config, parts, state, manager, writer, *, progress: bool):
  """The round loop: calls of ``rounds_per_call`` rounds, cut where an evaluation or a
  checkpoint falls; a row per round; a stop on a non-finite loss or on preemption.

  Returns ``(state, last evaluation, rounds per second of the calls that did not
  compile)``.
  """
  start, num_rounds = int(state.round), int(config.num_rounds)
  ckpt_every = int(config.checkpoint_every)
  eval_every = int(config.eval_every) or max(num_rounds, 1)
  row_of = _row_maker(config, parts, state)
  train_data = sim.replicate(parts['train'], parts.get('mesh'))
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=num_rounds - start, desc=f'fed {config.algorithm}', unit='round',
               leave=False)
  last_eval = {}
  compiled, elapsed, timed_rounds = set(), 0.0, 0
  try:
    with Preemption() as preempt:
      for first, count in sim.round_segments(start, num_rounds, int(config.rounds_per_call),
                                             eval_every, ckpt_every):
        t_call = time.perf_counter()
        state, infos = sim.run_rounds(parts['round_fn'], state, train_data, count)
        for r, info in enumerate(infos, first + 1):
          row = row_of(info)
          if not np.isfinite(row['train_loss']):
            writer.write(r, row)
            raise _diverged(manager, r, row['train_loss'])
          if r == first + count and (r % eval_every == 0 or r == num_rounds):
            last_eval = evaluate_state(parts, state)
            row.update(last_eval)
          writer.write(r, row)
        end = first + count
        if bar is not None:
          bar.update(count)
          if last_eval:
            bar.set_postfix(acc=f'{last_eval["global_accuracy"]:.3f}')
        if (ckpt_every and end % ckpt_every == 0) or preempt.requested:
          workdir_lib.save(manager, end, state, {'round': end})
        if preempt.requested:
          manager.wait_until_finished()
          print(f'preempted: saved round {end}; run the same command again to resume', flush=True)
          raise SystemExit(143)
        if count in compiled:   # each new call length compiles: those calls are not timed
          jax.block_until_ready(state)
          elapsed += time.perf_counter() - t_call
          timed_rounds += count
        compiled.add(count)
  finally:
    if bar is not None:
      bar.close()
  jax.block_until_ready(state)
  if not last_eval:
    last_eval = evaluate_state(parts, state)
  return state, last_eval, timed_rounds / elapsed if elapsed > 0 else None


def _diverged(manager, round_: int, loss: float) -> Diverged:
  manager.wait_until_finished()
  good = manager.latest_step()
  ckpt = None if good is None else os.path.join(str(manager.directory), str(good))
  where = (f'the last good checkpoint is {ckpt}: rerun the same command to resume from it'
           if ckpt else 'no checkpoint was saved before it')
  return Diverged(f'the training loss is not finite at round {round_} (loss {loss:.4g}); '
                  f'{where}. Lower optimizer.learning_rate', step=round_, checkpoint=ckpt)


def _row_maker(config, parts, state):
  """``row(info) -> dict``: a round's ``metrics.jsonl`` row before evaluation (training
  loss and accuracy, reports, and the bytes the pytrees exchanged take)."""
  algorithm = parts['algorithm']
  if 'groups' in parts:   # per architecture group
    from kdjax.federated import groups
    group_up, group_down = groups.group_bytes(parts['algorithms'], state, parts['train'],
                                              parts['groups'])
  else:
    update_shape = jax.eval_shape(
        algorithm.client_update, state.server, jax.tree.map(lambda a: a[0], state.clients),
        jax.tree.map(lambda a: a[0], parts['train']), jax.random.key(0)).update
    bytes_update = sim.tree_bytes(update_shape)
    bytes_down = sim.tree_bytes(algorithm.download(state.server))

  def row(info) -> dict[str, Any]:
    loss_s, loss_n = info['loss']
    acc_s, acc_n = info['accuracy']
    rep = int(info['num_reported'])
    out = {'train_loss': float(loss_s) / max(float(loss_n), 1.0),
           'train_accuracy': float(acc_s) / max(float(acc_n), 1.0), 'num_reported': rep}
    if 'groups' in parts:
      greps = np.asarray(info['group_reported']).tolist()
      out['bytes_up'] = int(sum(n * b for n, b in zip(greps, group_up)))
      out['bytes_down'] = int(sum(k * b for k, b in zip(parts['cohort_sizes'], group_down)))
    else:
      out['bytes_up'] = rep * bytes_update
      out['bytes_down'] = int(config.clients_per_round) * bytes_down
    return out

  return row


def _plot(workdir: str, metrics_path: str, pc, pn) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  rows = read_jsonl(metrics_path)
  ev = [r for r in rows if r.get('global_accuracy') is not None]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([r['round'] for r in ev], [r['global_accuracy'] for r in ev], label='global')
  ax.plot([r['round'] for r in ev], [r.get('personalized_accuracy_mean') for r in ev],
          label='personalized mean')
  ax.set_xlabel('round')
  ax.set_ylabel('accuracy')
  ax.legend()
  fig.tight_layout()
  storage.savefig(fig, storage.join(workdir, 'accuracy.png'), dpi=100)
  plt.close(fig)
  has = pn > 0
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.hist(pc[has] / pn[has], bins=20, range=(0, 1))
  ax.set_xlabel('client accuracy on its local test split')
  ax.set_ylabel('clients')
  fig.tight_layout()
  storage.savefig(fig, storage.join(workdir, 'clients.png'), dpi=100)
  plt.close(fig)
