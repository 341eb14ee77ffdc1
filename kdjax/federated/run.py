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
* ``checkpoints/``: orbax checkpoints of the simulation state every
  ``checkpoint_every`` rounds; a rerun with the same workdir resumes from the
  latest one and produces the same result as an uninterrupted run;
* ``config.json``: the run's config. A workdir holding checkpoints is resumed
  only by the same config up to :data:`RESUMABLE_FIELDS` (``num_rounds``, what
  is evaluated, checkpointed and plotted, ``rounds_per_call``); another config is
  refused.

Rounds go ``rounds_per_call`` at a time into one call (:meth:`RoundFn.rounds
<kdjax.federated.simulator.RoundFn.rounds>`, a ``lax.scan``), cut so that every
evaluation and checkpoint falls at the end of a call: the files are those of one
round per call. ``summary.json``'s ``rounds_per_sec`` times the calls whose length
had already compiled.

Bytes are those of the pytrees exchanged in this simulation: down = cohort size
× what a client downloads, up = reporting clients × the update pytree.
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax.errors import CHECKPOINT_READ_ERRORS
from kdjax.errors import UserError
from kdjax.errors import check_number
from kdjax.errors import quiet_orphaned_reads
from kdjax.errors import unreadable_checkpoint
from kdjax.federated import packing
from kdjax.federated import partition as partition_lib
from kdjax.federated import simulator as sim
from kdjax.federated.algorithms import make_algorithm
from kdjax.federated.local import make_local_trainer


def as_dict(d) -> dict:
  """A config group (``ConfigDict``, mapping or None) as a plain ``dict``."""
  if d is None:
    return {}
  if isinstance(d, ml_collections.ConfigDict):
    return d.to_dict()
  return dict(d)


def json_ready(obj):
  """``obj`` with every NaN float replaced by ``None`` (JSON ``null``).

  ``json`` would write ``NaN``, which strict JSON readers refuse; a run without
  local test splits has no personalized accuracy. (A sweep's IID α stays
  ``Infinity``, as Python's ``json`` writes and reads it.)

  >>> json_ready({'a': float('nan'), 'b': [1.5, float('inf')], 'c': 'x'})
  {'a': None, 'b': [1.5, inf], 'c': 'x'}
  """
  if isinstance(obj, dict):
    return {k: json_ready(v) for k, v in obj.items()}
  if isinstance(obj, (list, tuple)):
    return [json_ready(v) for v in obj]
  if isinstance(obj, (float, np.floating)) and np.isnan(obj):
    return None
  return obj


def _check_int(key: str, value, low: int) -> None:
  if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < low:
    raise UserError(f'config.{key} must be an integer >= {low}, got {value!r}.')


def _check_number(key: str, value, ok, what: str) -> None:
  check_number(value, ok, f'config.{key} must be {what}, got {value!r}.')


def check_config(config: ml_collections.ConfigDict) -> None:
  """Refuses settings no simulation can run with, each with a one-line :class:`UserError`.

  What only a later stage can judge (the cohort against the client count, the
  partition against the data, the model and algorithm options) is checked there.
  """
  _check_int('num_clients', config.get('num_clients'), 1)
  _check_int('num_rounds', config.get('num_rounds'), 0)
  _check_int('eval_every', config.get('eval_every') or 0, 0)
  _check_int('checkpoint_every', config.get('checkpoint_every') or 0, 0)
  _check_int('rounds_per_call', config.get('rounds_per_call', 1), 1)
  local = as_dict(config.get('local'))
  _check_int('local.batch_size', local.get('batch_size'), 1)
  _check_int('local.epochs', local.get('epochs', 1), 1)
  _check_number('local.lr', local.get('lr', 0.05), lambda v: 0 < v < float('inf'),
                'a positive number')
  _check_number('local.momentum', local.get('momentum', 0.0), lambda v: 0 <= v < 1,
                'in [0, 1)')


def _functional_model(name: str, options, *, num_classes: int, input_shape, seed: int):
  """``functional(create(name, ...))``; an unknown model or option is a :class:`UserError`."""
  from kdjax.models import create
  from kdjax.models import functional
  try:
    model = create(name, num_classes=num_classes, input_shape=input_shape, seed=seed,
                   **as_dict(options))
  except KeyError as e:
    raise UserError(str(e.args[0]) if e.args else str(e)) from None
  except TypeError as e:
    raise UserError(f'model {name!r}: {e}.') from None
  return functional(model)


def setup(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """Loads data, partitions, packs, builds the model, trainer, algorithm and round.

  Returns:
    A dict with ``apply``, ``params``, ``model_state``, ``algorithm``,
    ``round_fn``, ``evaluate``, ``personal_evaluate``, ``train`` / ``test``
    (packed, on device), ``test_x`` / ``test_label`` (the global test split),
    ``partition`` and ``labels``.
  """
  from kdjax.data import load_arrays

  check_config(config)
  train = load_arrays(config.dataset, 'train')
  test = load_arrays(config.dataset, 'test')
  num_classes = int(max(train['label'].max(), test['label'].max())) + 1
  proxy_x = None
  proxy_size = int(config.get('proxy_size', 0) or 0)
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
    from kdjax.data import load_source
    n_train = len(train['label'])
    train = {k: np.concatenate([train[k], test[k]]) for k in train if k in test}
    part_opts.update(client_ids=train.get('client'),
                     test_mask=np.arange(len(train['label'])) >= n_train)
    meta = load_source(config.dataset, 'train').dataset_info.metadata or {}
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
  local = as_dict(config.local)
  tr, te = packing.pack_partition(train['x'], train['label'], part,
                                  batch_size=local['batch_size'], skew=skew)
  data_parts = {
      'train': jax.tree.map(jnp.asarray, tr), 'test': jax.tree.map(jnp.asarray, te),
      'test_x': jnp.asarray(test['x']), 'test_label': jnp.asarray(test['label']),
      'partition': part, 'labels': train['label'],
  }
  if config.get('client_models'):   # heterogeneous architectures (kdjax.federated.groups)
    return {**_setup_groups(config, num_classes=num_classes, input_shape=train['x'].shape[1:],
                            proxy_x=proxy_x), **data_parts}
  apply, params, model_state = _functional_model(
      config.model, config.get('model_options'), num_classes=num_classes,
      input_shape=train['x'].shape[1:], seed=config.seed)
  trainer = make_local_trainer(apply, batch_size=local['batch_size'],
                               epochs=local.get('epochs', 1), lr=local.get('lr', 0.05),
                               momentum=local.get('momentum', 0.0))
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
  mesh = _client_mesh(config)
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

  ``config.mesh`` is a one-axis mesh such as ``[('clients', -1)]`` (all devices):
  each vmapped chunk of the cohort is sharded over that axis.
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
  for spec in specs:
    unknown = set(spec) - {'model', 'model_options', 'fraction'}
    if unknown or 'model' not in spec:
      raise UserError('each client_models entry needs a model (and optionally model_options '
                      f'and fraction); got keys {sorted(spec)}.')
  ids = groups.assign_clients(config.num_clients, [float(s.get('fraction', 1.0)) for s in specs],
                              seed=config.seed)
  local = as_dict(config.local)
  alg_options = as_dict(config.get('algorithm_options'))
  if config.algorithm == 'feddf':
    alg_options.setdefault('seed', config.seed)
  applies, params, states, algorithms = [], [], [], []
  for spec in specs:
    apply, p, ms = _functional_model(spec['model'], spec.get('model_options'),
                                     num_classes=num_classes, input_shape=input_shape,
                                     seed=config.seed)
    trainer = make_local_trainer(apply, batch_size=local['batch_size'],
                                 epochs=local.get('epochs', 1), lr=local.get('lr', 0.05),
                                 momentum=local.get('momentum', 0.0))
    algorithms.append(make_algorithm(config.algorithm, trainer, proxy_x=proxy_x,
                                     num_classes=num_classes, **alg_options))
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
  pc, pn = parts['personal_evaluate'](state, parts['test'])
  out = {'global_accuracy': float(c) / max(float(n), 1.0)}
  out.update(sim.personalized_summary(np.asarray(pc), np.asarray(pn)))
  return out


# --------------------------------------------------------------------------- checkpoints

def _to_saveable(state) -> dict[str, np.ndarray]:
  leaves = jax.tree.leaves(state)
  out = {}
  for i, a in enumerate(leaves):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a = jax.random.key_data(a)
    out[f'leaf_{i:05d}'] = np.asarray(a)
  return out


def _from_saved(template, saved: dict[str, np.ndarray]):
  leaves, treedef = jax.tree.flatten(template)
  if len(saved) != len(leaves):
    raise UserError('the checkpoint in the workdir does not match this config '
                    '(different algorithm or model); use a fresh --workdir.')
  new = []
  for i, t in enumerate(leaves):
    a = jnp.asarray(saved[f'leaf_{i:05d}'])
    if jnp.issubdtype(t.dtype, jax.dtypes.prng_key):
      a = jax.random.wrap_key_data(a, impl=jax.random.key_impl(t))
    if a.shape != t.shape:
      raise UserError('the checkpoint in the workdir does not match this config '
                      f'(leaf shape {a.shape} vs {t.shape}); use a fresh --workdir.')
    new.append(a.astype(t.dtype) if not jnp.issubdtype(t.dtype, jax.dtypes.prng_key) else a)
  return jax.tree.unflatten(treedef, new)


def _manager(workdir: str):
  import orbax.checkpoint as ocp
  return ocp.CheckpointManager(
      os.path.abspath(os.path.join(workdir, 'checkpoints')),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=True))


def save_checkpoint(manager, state: sim.SimState) -> None:
  import orbax.checkpoint as ocp
  step = int(state.round)
  manager.save(step, args=ocp.args.StandardSave(_to_saveable(state)), force=True)
  manager.wait_until_finished()


def restore_checkpoint(manager, template: sim.SimState) -> sim.SimState | None:
  import orbax.checkpoint as ocp
  step = manager.latest_step()
  if step is None:
    return None
  quiet_orphaned_reads()  # before: a failed restore's other reads may report at once
  try:
    saved = manager.restore(step, args=ocp.args.StandardRestore(_to_saveable(template)))
  except CHECKPOINT_READ_ERRORS as e:
    raise unreadable_checkpoint(os.path.join(str(manager.directory), str(step)), e) from None
  return _from_saved(template, saved)


# --------------------------------------------------------------------------- workdir config

# What a workdir's results do not depend on: a run resumed from its checkpoints may
# change how long it goes on and what it reports, nothing else.
RESUMABLE_FIELDS = ('num_rounds', 'eval_every', 'checkpoint_every', 'plots',
                    'rounds_per_call')


def _flat(tree, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f'{prefix}.{k}' if prefix else str(k)))
  return out


def check_workdir_config(workdir: str, config: ml_collections.ConfigDict, *,
                         has_results: bool, ignore=RESUMABLE_FIELDS) -> None:
  """Writes ``WORKDIR/config.json``, or refuses a workdir holding another config's results.

  Args:
    workdir: the run directory.
    config: this run's config.
    has_results: the workdir holds results this run would continue or reuse
      (checkpoints; a sweep's finished cell).
    ignore: top-level fields allowed to differ.

  Raises:
    UserError: ``has_results`` and the stored config differs in another field
      (or there is none: a workdir from before configs were stored).

  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> check_workdir_config(d, ml_collections.ConfigDict({'seed': 0, 'num_rounds': 5}),
  ...                      has_results=False)
  >>> check_workdir_config(d, ml_collections.ConfigDict({'seed': 0, 'num_rounds': 9}),
  ...                      has_results=True)
  >>> check_workdir_config(d, ml_collections.ConfigDict({'seed': 1, 'num_rounds': 9}),
  ...                      has_results=True)
  Traceback (most recent call last):
  kdjax.errors.UserError: ... holds results of another config (it differs in seed: 0 here, 1 now); ...
  """
  from kdjax.distill.checkpoint import config_to_dict
  path = os.path.join(workdir, 'config.json')
  new = config_to_dict(config)
  if has_results:
    if not os.path.exists(path):
      raise UserError(f'{workdir} holds results but no config.json (an older kdjax wrote '
                      'it?); use a new --workdir, or delete that one to start over.')
    with open(path) as f:
      old = json.load(f)
    a, b = _flat(old), _flat(new)
    diff = [k for k in sorted(set(a) | set(b))
            if k.split('.')[0] not in ignore and a.get(k) != b.get(k)]
    if diff:
      shown = '; '.join(f'{k}: {a.get(k)!r} here, {b.get(k)!r} now' for k in diff[:3])
      more = f' and {len(diff) - 3} more' if len(diff) > 3 else ''
      raise UserError(f'{workdir} holds results of another config (it differs in {shown}'
                      f'{more}); use a new --workdir, or delete that one to start over.')
  os.makedirs(workdir, exist_ok=True)
  tmp = path + '.tmp'
  with open(tmp, 'w') as f:
    json.dump(new, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


# --------------------------------------------------------------------------- the run

def run_simulation(config: ml_collections.ConfigDict, workdir: str, *,
                   progress: bool = True) -> dict[str, Any]:
  """Runs ``config.num_rounds`` rounds and writes the workdir files (module doc).

  Args:
    config: a federated config (see ``configs/fed/mnist1d_fedavg.py``).
    workdir: output directory (created; resumed from if it holds checkpoints).
    progress: show a progress bar.

  Returns:
    The summary dict (also written to ``summary.json``).
  """
  os.makedirs(workdir, exist_ok=True)
  parts = setup(config)
  ckpt_dir = os.path.join(workdir, 'checkpoints')
  has_checkpoints = os.path.isdir(ckpt_dir) and bool(os.listdir(ckpt_dir))
  check_workdir_config(workdir, config, has_results=has_checkpoints)
  part, labels = parts['partition'], parts['labels']
  with open(os.path.join(workdir, 'partition.txt'), 'w') as f:
    f.write(partition_lib.format_stats(part, labels) + '\n')
  if config.get('plots', True):
    partition_lib.plot_heatmap(part, labels, os.path.join(workdir, 'partition.png'))
  algorithm = parts['algorithm']
  if 'init_state' in parts:
    state = parts['init_state']()
  else:
    state = sim.init_state(algorithm, parts['params'], parts['model_state'], config.num_clients)
  ckpt_every = int(config.get('checkpoint_every', 0) or 0)
  # Checkpoints are restored even when this run writes none (checkpoint_every=0).
  manager = _manager(workdir) if ckpt_every or has_checkpoints else None
  metrics_path = os.path.join(workdir, 'metrics.jsonl')
  if manager is not None:
    restored = restore_checkpoint(manager, state)
    if restored is not None:
      state = restored
  client_mesh = parts.get('mesh')
  state = sim.replicate(state, client_mesh)
  train_data = sim.replicate(parts['train'], client_mesh)
  start = int(state.round)
  if start == 0 and os.path.exists(metrics_path):
    os.remove(metrics_path)
  elif start and os.path.exists(metrics_path):   # drop rounds after the checkpoint
    with open(metrics_path) as f:
      kept = [l for l in f if json.loads(l)['round'] <= start]
    with open(metrics_path, 'w') as f:
      f.writelines(kept)

  if 'groups' in parts:   # per architecture group
    from kdjax.federated import groups
    group_up, group_down = groups.group_bytes(parts['algorithms'], state, parts['train'],
                                              parts['groups'])
    bytes_update = bytes_down = 0
  else:
    group_up = group_down = None
    update_shape = jax.eval_shape(
        algorithm.client_update, state.server, jax.tree.map(lambda a: a[0], state.clients),
        jax.tree.map(lambda a: a[0], parts['train']), jax.random.key(0)).update
    bytes_update = sim.tree_bytes(update_shape)
    bytes_down = sim.tree_bytes(algorithm.download(state.server))
  eval_every = max(int(config.get('eval_every', 1) or 1), 1)

  num_rounds = int(config.num_rounds)
  segments = sim.round_segments(start, num_rounds, int(config.get('rounds_per_call', 1)),
                                eval_every, ckpt_every if manager is not None else 0)
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=num_rounds - start, desc=f'fed {config.algorithm}', unit='round',
               leave=False)
  history, last_eval = [], {}
  # rounds_per_sec times the calls whose length already compiled (each new length compiles).
  compiled, elapsed, timed_rounds = set(), 0.0, 0
  with open(metrics_path, 'a') as out:
    for first, count in segments:
      t_call = time.perf_counter()
      # `count` rounds in one call (config.rounds_per_call)
      state, infos = sim.run_rounds(parts['round_fn'], state, train_data, count)
      for r, info in enumerate(infos, first):
        row = _round_row(config, parts, info, r, bytes_update, bytes_down,
                         group_up, group_down)
        if r + 1 == first + count and ((r + 1) % eval_every == 0 or r + 1 == num_rounds):
          last_eval = evaluate_state(parts, state)
          row.update(last_eval)
          if bar is not None:
            bar.set_postfix(acc=f'{last_eval["global_accuracy"]:.3f}')
        history.append(row)
        out.write(json.dumps(json_ready(row)) + '\n')
      out.flush()
      if bar is not None:
        bar.update(count)
      end = first + count
      if manager is not None and ckpt_every and end % ckpt_every == 0:
        save_checkpoint(manager, state)
      if count in compiled:
        jax.block_until_ready(state)
        elapsed += time.perf_counter() - t_call
        timed_rounds += count
      compiled.add(count)
  if bar is not None:
    bar.close()
  jax.block_until_ready(state)
  if not last_eval:
    last_eval = evaluate_state(parts, state)
  if 'groups' in parts:
    pc, pn = parts['grouped_evaluate'](state, parts['test'], parts['test_x'],
                                       parts['test_label'])[1]
  else:
    pc, pn = parts['personal_evaluate'](state, parts['test'])
  summary = {
      'round': int(state.round),
      'algorithm': config.algorithm,
      'num_clients': int(config.num_clients),
      'clients_per_round': int(config.clients_per_round),
      'partition': partition_lib.partition_stats(part, labels),
      'rounds_per_sec': timed_rounds / elapsed if elapsed > 0 else None,
      'client_mesh': parts.get('client_mesh'),   # {axis: devices} when the cohort is sharded
      **last_eval,
  }
  with open(os.path.join(workdir, 'summary.json'), 'w') as f:
    json.dump(json_ready(summary), f, indent=2, default=float)
  if config.get('plots', True):
    _plot(workdir, metrics_path, np.asarray(pc), np.asarray(pn))
  return summary



def _round_row(config, parts, info, r: int, bytes_update: int, bytes_down: int,
               group_up, group_down) -> dict[str, Any]:
  """One ``metrics.jsonl`` row (before evaluation) from round ``r``'s ``info``."""
  loss_s, loss_n = info['loss']
  acc_s, acc_n = info['accuracy']
  rep = int(info['num_reported'])
  row = {'round': r + 1, 'train_loss': float(loss_s) / max(float(loss_n), 1.0),
         'train_accuracy': float(acc_s) / max(float(acc_n), 1.0), 'num_reported': rep,
         'bytes_up': rep * bytes_update,
         'bytes_down': int(config.clients_per_round) * bytes_down}
  if 'groups' in parts:
    greps = np.asarray(info['group_reported']).tolist()
    row['bytes_up'] = int(sum(n * b for n, b in zip(greps, group_up)))
    row['bytes_down'] = int(sum(k * b for k, b in zip(parts['cohort_sizes'], group_down)))
  return row

def _plot(workdir: str, metrics_path: str, pc, pn) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  with open(metrics_path) as f:
    rows = [json.loads(l) for l in f]
  ev = [r for r in rows if 'global_accuracy' in r]
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.plot([r['round'] for r in ev], [r['global_accuracy'] for r in ev], label='global')
  ax.plot([r['round'] for r in ev], [r['personalized_accuracy_mean'] for r in ev],
          label='personalized mean')
  ax.set_xlabel('round')
  ax.set_ylabel('accuracy')
  ax.legend()
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'accuracy.png'), dpi=100)
  plt.close(fig)
  has = pn > 0
  fig, ax = plt.subplots(figsize=(5, 3.5))
  ax.hist(pc[has] / pn[has], bins=20, range=(0, 1))
  ax.set_xlabel('client accuracy on its local test split')
  ax.set_ylabel('clients')
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, 'clients.png'), dpi=100)
  plt.close(fig)
