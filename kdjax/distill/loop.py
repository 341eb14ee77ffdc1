"""``train_and_evaluate(config, workdir)``: the loop behind ``kdjax train`` and ``kdjax distill``.

Periodic eval, async orbax checkpoints with exact resume (the data position is part
of the checkpoint), a progress bar, ``metrics.jsonl``, TensorBoard events, a
learning-curve PNG and ``summary.json``.

Two ways to feed data, one step function:

* ``device``: the whole training split lives on the devices; ``steps_per_call`` steps
  run in one jitted call under ``lax.scan`` and each batch is gathered on device. The
  batches are a pure function of (seed, step), so the data position is the step.
* ``stream``: a grain pipeline over ``tfds.data_source`` (datasets too large to keep on
  device); one jitted step per batch; the iterator state is checkpointed.
"""

from __future__ import annotations

import math
import os
import signal
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import data as kdata
from kdjax.distill import checkpoint as ckpt
from kdjax.distill import metrics as kmetrics
from kdjax.distill.optim import make_optimizer
from kdjax.distill.state import TrainState
from kdjax.distill.step import (make_eval_step, make_fused_steps, make_teacher_steps,
                                 make_train_step)
from kdjax.distill.teacher import build_model, load_teacher
from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.parallel import initialize_from_env, make_mesh, shardings_from_rules


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def _validate(config: ml_collections.ConfigDict) -> None:
  for field in ('num_steps', 'batch_size', 'log_every', 'eval_every', 'checkpoint_every',
                'steps_per_call', 'keep_checkpoints'):
    if int(config[field]) <= 0:
      raise UserError(f'config.{field} must be positive (got {config[field]})')
  if config.data.feed not in ('auto', 'device', 'stream'):
    raise UserError(f"config.data.feed must be 'auto', 'device' or 'stream' (got {config.data.feed!r})")


def _boundaries(config) -> list[int]:
  """Steps where a fused call must stop: logs, evals, checkpoints, call size, the end."""
  return [int(config.log_every), int(config.eval_every), int(config.checkpoint_every),
          int(config.steps_per_call)]


def _next_stop(step: int, config) -> int:
  nxt = min((step // every + 1) * every for every in _boundaries(config))
  return min(nxt, int(config.num_steps))


def _put_global(tree, sharding):
  """Host numpy -> global arrays. Every process passes the same (replicated) data."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)), tree)


def _split_devices(config):
  """``(student devices, teacher mesh or None)`` from ``config.teacher.devices``."""
  k = int(config.teacher.get('devices', 0))
  if k == 0:
    return None, None
  devices = jax.devices()
  if k < 0 or k >= len(devices):
    raise UserError(f'config.teacher.devices={k}: must be in 0..{len(devices) - 1} (there are '
                    f'{len(devices)} devices and the student needs at least one)')
  if jax.process_count() > 1:
    raise UserError('config.teacher.devices > 0 runs in one process only; set it to 0 for '
                    'multi-process runs')
  return devices[:-k], make_mesh([('data', -1)], devices=devices[-k:])


class TeacherAhead:
  """A live teacher on its own devices, one fused call ahead of the student.

  ``outputs(first, n)`` returns the teacher's outputs for steps ``first .. first+n-1``
  (computed ahead when the previous call asked for them) and dispatches the teacher's
  call for the next chunk, ``first + n .. next_stop(first + n) - 1``, which then runs
  on the teacher's devices while the student's call runs on its own.
  ``next_stop(step)`` is where the chunk starting at ``step`` ends (None: no more).
  """

  def __init__(self, step_fn, fused_kw: dict, train_arrays, teacher_vars, teacher_mesh,
               next_stop: Callable[[int], int | None]):
    self.step_fn, self.fused_kw, self.next_stop = step_fn, fused_kw, next_stop
    self.teacher_vars = teacher_vars
    self.data = _put_global(train_arrays, NamedSharding(teacher_mesh, P()))
    self.batch_sh = NamedSharding(teacher_mesh, P(teacher_mesh.axis_names[0]))
    self.calls: dict[int, Any] = {}
    self.pending: dict[tuple[int, int], Any] = {}

  def _call(self, first: int, n: int):
    if n not in self.calls:
      self.calls[n] = jax.jit(make_teacher_steps(self.step_fn, num_steps=n,
                                                 batch_sharding=self.batch_sh, **self.fused_kw))
    return self.calls[n](np.int32(first), self.data, self.teacher_vars)

  def outputs(self, first: int, n: int):
    out = self.pending.pop((first, n), None)
    self.pending.clear()
    if out is None:
      out = self._call(first, n)
    stop = self.next_stop(first + n)
    if stop is not None:
      self.pending[(first + n, stop - first - n)] = self._call(first + n, stop - first - n)
    return out


class _Preemption:
  """Turns SIGTERM into a flag the loop checks between calls (checkpoint, then exit)."""

  def __init__(self):
    self.requested = False
    self._old = None

  def __enter__(self):
    try:
      self._old = signal.signal(signal.SIGTERM, self._handle)
    except ValueError:  # not the main thread
      self._old = None
    return self

  def _handle(self, signum, frame):
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       require_teacher: bool = False) -> dict[str, Any]:
  """Trains (and distills, when the loss needs a teacher) and returns the summary."""
  _validate(config)
  initialize_from_env()
  workdir = os.path.abspath(workdir)
  student_devices, teacher_mesh = _split_devices(config)
  try:
    mesh = make_mesh([tuple(axis) for axis in config.mesh], devices=student_devices)
  except ValueError as e:
    raise UserError(f'config.mesh: {e}') from None
  data_axis = mesh.axis_names[0]
  if config.batch_size % mesh.shape[data_axis]:
    raise UserError(f'batch_size {config.batch_size} does not divide over the {mesh.shape[data_axis]} '
                    f'devices of mesh axis {data_axis!r}; pick a multiple')
  if teacher_mesh is not None and config.batch_size % teacher_mesh.size:
    raise UserError(f'batch_size {config.batch_size} does not divide over the teacher\'s '
                    f'{teacher_mesh.size} devices (config.teacher.devices); pick a multiple')

  data_dir = config.data.data_dir or None
  spec = kdata.dataset_spec(config.data.name, data_dir=data_dir)
  objective = _build_objective(config)
  needs_teacher = bool(objective.needs & {'teacher_logits', 'teacher_features', 'teacher_attentions'})
  # ---- teacher cache (issue 5): the cache replaces the live teacher (never run then)
  cache = cache_cols = cache_reader = None
  if config.teacher.cache:
    from kdjax.cache.read import open_for_run
    cache = open_for_run(config, num_classes=spec.num_classes, needs=objective.needs, mesh=mesh)
    needs_teacher = False
  elif objective.needs & {'teacher_topk_logits', 'teacher_topk_indices'}:
    raise UserError('sparse (top-k) losses read the teacher cache: build one with `kdjax cache '
                    'build` and pass --config.teacher.cache=DIR')
  # ---- end teacher cache
  if require_teacher and not needs_teacher and cache is None:
    raise UserError('`kdjax distill` needs a loss that uses the teacher (e.g. kd); '
                    'use `kdjax train` for training from labels')

  ckpt.check_or_write_config(workdir, config)

  teacher = None
  if (needs_teacher or config.teacher.workdir) and cache is None:  # cache: issue 5
    teacher = load_teacher(config.teacher.workdir, teacher_mesh or mesh,
                           config.teacher.partition_rules)
    if teacher.fns.num_classes != spec.num_classes:
      raise UserError(f'the teacher predicts {teacher.fns.num_classes} classes but {config.data.name} '
                      f'has {spec.num_classes}; use a teacher trained on the same label space')

  apply, params, model_state = build_model(config.model, num_classes=spec.num_classes,
                                           input_shape=spec.input_shape, seed=config.seed)
  augment = kdata.make_augment(config.data.augment.to_dict()
                               if hasattr(config.data.augment, 'to_dict') else config.data.augment)
  tx = make_optimizer(config.optimizer, int(config.num_steps))

  # ---- data
  train_arrays = eval_arrays = None
  feed = config.data.feed
  if feed == 'auto':
    n = _split_size(spec, config.data.train_split)
    nbytes = None if n is None else n * 4 * math.prod(spec.input_shape)
    if cache is not None and nbytes is not None:  # teacher cache (issue 5): on device too
      nbytes += cache.nbytes
    feed = 'device' if nbytes is not None and nbytes <= config.data.device_max_bytes else 'stream'
  if teacher_mesh is not None and (feed != 'device' or teacher is None or not needs_teacher):
    raise UserError('config.teacher.devices > 0 needs a live teacher (no teacher cache) and '
                    "the device feed (config.data.feed='device'); set it to 0")
  if feed == 'device':
    train_arrays = kdata.load_arrays(config.data.name, config.data.train_split, data_dir=data_dir)
    num_train = len(train_arrays['label'])
  else:
    num_train = _split_size(spec, config.data.train_split)
  if cache is not None:  # teacher cache (issue 5): same data, then rows in memory or per batch
    cache_cols, cache_reader = _open_cache_rows(cache, config, feed, objective.needs,
                                                train_arrays, data_dir)

  # ---- state
  init_rng = jax.random.key(config.seed)
  sample_x = np.zeros((2, *spec.input_shape), np.float32)
  sample = _sample_inputs(apply, params, model_state, sample_x, teacher)
  if cache is not None:  # teacher cache (issue 5)
    from kdjax.cache.read import sample_rows
    sample.update(sample_rows(cache_cols) if cache_reader is None
                  else cache_reader.rows(np.zeros(2, np.int64), np.arange(2)))
  loss_params, loss_state = objective.init(jax.random.fold_in(init_rng, 1), sample)
  trainable = {'student': params, 'loss': loss_params}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, model_state=model_state,
                     loss_state=loss_state, opt_state=tx.init(trainable),
                     rng=jax.random.key_data(jax.random.fold_in(init_rng, 2)))
  state_sh = shardings_from_rules(state, config.partition_rules, mesh)
  state = jax.device_put(state, state_sh)
  repl = NamedSharding(mesh, P())
  batch_sh = NamedSharding(mesh, P(data_axis))

  # ---- checkpoints
  manager = ckpt.make_manager(workdir, keep=int(config.keep_checkpoints))
  start = ckpt.latest_step(workdir)
  data_position: dict = {}
  if start is not None:
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), state, state_sh)
    state, data_position = ckpt.restore(manager, start, abstract)
    _log(f'resuming from step {start} ({ckpt.checkpoint_dir(workdir)}/{start})')
  step = int(jax.device_get(state.step))

  # ---- steps
  step_fn = make_train_step(student_apply=apply, objective=objective, tx=tx, augment=augment,
                            augment_seed=int(config.seed), teacher=teacher.fns if teacher else None)
  teacher_vars = teacher.variables if teacher else None
  teacher_sh = jax.tree.map(lambda a: a.sharding, teacher_vars) if teacher else None
  eval_fn = _make_evaluator(config, apply, spec, mesh, data_dir)

  if feed == 'device':
    if cache is not None:  # teacher cache (issue 5): columns [E, N, ...] on device with the data
      train_arrays = dict(train_arrays, teacher_cache=cache_cols)
    data_sh = jax.tree.map(lambda _: repl, train_arrays)
    device_data = _put_global(train_arrays, repl)
    fused_cache: dict[int, Any] = {}

    fused_kw = dict(num_examples=num_train, batch_size=int(config.batch_size),
                    shuffle_seed=int(config.seed))

    def fused(n):
      if n not in fused_cache:
        fn = make_fused_steps(step_fn, num_steps=n, batch_sharding=batch_sh, **fused_kw)
        shardings = (state_sh, data_sh, teacher_sh)
        if teacher_mesh is not None:   # the teacher's outputs come in, sharded like batches
          shardings = (state_sh, data_sh, None, NamedSharding(mesh, P(None, data_axis)))
        fused_cache[n] = jax.jit(fn, in_shardings=shardings, out_shardings=(state_sh, repl),
                                 donate_argnums=0)
      return fused_cache[n]

    if teacher_mesh is None:
      def run_chunk(state, n):
        return fused(n)(state, device_data, teacher_vars)
    else:
      teach = TeacherAhead(
          step_fn, fused_kw, train_arrays, teacher_vars, teacher_mesh,
          lambda s: _next_stop(s, config) if s < int(config.num_steps) else None)

      def run_chunk(state, n):
        first = int(jax.device_get(state.step))
        outputs = teach.outputs(first, n)   # also starts the next call's teacher forward
        outputs = jax.device_put(outputs, NamedSharding(mesh, P(None, data_axis)))
        return fused(n)(state, device_data, None, outputs)

    def data_state():
      return {'feed': 'device', 'step': int(jax.device_get(state.step))}
  else:
    iterator = kdata.make_train_iterator(
        config.data.name, split=config.data.train_split, batch_size=int(config.batch_size),
        seed=int(config.seed), data_dir=data_dir, shard_index=jax.process_index(),
        shard_count=jax.process_count())
    if data_position.get('iterator') is not None:
      iterator.set_state(data_position['iterator'])
    local_sh = batch_sh
    single = jax.jit(step_fn, in_shardings=(state_sh, None, teacher_sh),
                     out_shardings=(state_sh, repl), donate_argnums=0)

    def run_chunk(state, n):
      acc = None
      for _ in range(n):
        batch = next(iterator)
        if cache is not None:  # teacher cache (issue 5): join rows of cached epoch e mod E
          from kdjax.cache.read import host_rows
          rows = (host_rows(cache_cols, batch['epoch'], batch['id']) if cache_reader is None
                  else cache_reader.rows(batch['epoch'], batch['id']))
          batch = dict(batch, epoch=np.asarray(batch['epoch']) % cache.epochs, **rows)
        batch = {k: jax.tree.map(lambda a: jax.make_array_from_process_local_data(
                     local_sh, np.asarray(a)), v)
                 for k, v in batch.items() if k in ('x', 'label', 'id', 'epoch', 'mask')
                 or k.startswith('teacher_')}
        state, m = single(state, batch, teacher_vars)
        acc = m if acc is None else jax.tree.map(jnp.add, acc, m)
      return state, acc

    def data_state():
      return {'feed': 'stream', 'step': int(jax.device_get(state.step)),
              'iterator': iterator.get_state()}

  # ---- loop
  writer = kmetrics.MetricsWriter(workdir, resume_step=start)
  window = kmetrics.Accumulator()
  # A preemption between log steps saved the open log window with its checkpoint: carry
  # it on, so the resumed run logs what an uninterrupted one would have.
  window.totals = {k: list(v) for k, v in data_position.get('log_window', {}).items()}
  last_train: dict[str, float] = {}
  last_eval: dict[str, float] = {}
  num_steps = int(config.num_steps)
  timed_examples, timed_seconds = 0, 0.0
  progress = _progress(config, start=step, total=num_steps)
  seen_lengths: set[int] = set()
  t_run = time.time()
  try:
    with _Preemption() as preempt:
      while step < num_steps:
        stop = _next_stop(step, config)
        t0 = time.time()
        state, m = run_chunk(state, stop - step)
        jax.block_until_ready(state.step)
        dt = time.time() - t0
        if stop - step in seen_lengths:   # calls that compiled are not timed
          timed_examples += (stop - step) * int(config.batch_size)
          timed_seconds += dt
        seen_lengths.add(stop - step)
        window.add(m)
        step = stop
        progress.update(stop - progress.n)
        at_ckpt = step % config.checkpoint_every == 0 or step == num_steps
        if step % config.log_every == 0 or at_ckpt:
          last_train = window.means()
          if timed_seconds:
            last_train['examples_per_sec'] = timed_examples / timed_seconds
          writer.write(step, 'train', last_train)
          progress.set_postfix(loss=f"{last_train.get('loss', float('nan')):.4f}")
          window.reset()
        if step % config.eval_every == 0 or step == num_steps:
          last_eval = eval_fn(state)
          writer.write(step, 'eval', last_eval)
          progress.set_postfix(loss=f"{last_train.get('loss', float('nan')):.4f}",
                               acc=f"{last_eval.get('accuracy', float('nan')):.4f}")
        if at_ckpt or preempt.requested or _reached_preemption(manager, step):
          ckpt.save(manager, step, state, dict(data_state(), log_window=window.totals),
                    force=True)
        if preempt.requested:
          manager.wait_until_finished()
          _log(f'preempted: saved step {step}; run the same command again to resume')
          raise SystemExit(143)
  finally:
    progress.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()

  if not seen_lengths:
    # Nothing left to train (a rerun of a finished run): report the run as it stands,
    # not nulls over its summary. Every process evaluates (a collective); the train
    # figures are the ones logged at this step, where this process can read them.
    last_eval = eval_fn(state)
    last_train = _logged(writer.path, 'train', step)
  summary = {
      'step': step,
      'eval_accuracy': last_eval.get('accuracy'),
      'eval_loss': last_eval.get('loss'),
      'train_loss': last_train.get('loss'),
      'train_accuracy': last_train.get('accuracy'),
      'examples_per_sec': ((timed_examples / timed_seconds) if timed_seconds
                           else last_train.get('examples_per_sec')),
      'wall_seconds': time.time() - t_run,
      'resumed_from': start,
      'feed': feed,
      'num_devices': jax.device_count(),
      'teacher_devices': int(config.teacher.get('devices', 0)),
      'teacher_step': teacher.step if teacher else None,
      'teacher_fingerprint': teacher.fingerprint if teacher else None,
  }
  if jax.process_index() == 0:
    import json
    with open(os.path.join(workdir, 'summary.json'), 'w') as f:
      json.dump(summary, f, indent=2)
    kmetrics.plot_learning_curves(workdir)
  return summary


def _logged(path: str, split: str, step: int) -> dict[str, float]:
  """The values ``metrics.jsonl`` at ``path`` holds for ``split`` at ``step``; ``{}`` if none
  (or no file: only process 0 writes it)."""
  if not os.path.exists(path):
    return {}
  rows = [r for r in kmetrics.read_jsonl(path) if r.get('split') == split and r.get('step') == step]
  return {k: v for k, v in rows[-1].items() if k not in ('step', 'split')} if rows else {}


def _open_cache_rows(cache, config, feed: str, needs, train_arrays, data_dir):
  """Teacher cache (issue 5): checks the data, then ``(columns, None)`` or ``(None, reader)``.

  The device feed keeps the columns ``[E, N, ...]`` on device with the data. The stream
  feed loads them in host memory when the cache takes at most
  ``config.teacher.cache_memory_max_bytes`` and reads rows per batch from the chunk files
  (``kdjax.cache.read.ChunkReader``) above that; ``config.teacher.cache_reader``
  (``auto`` | ``memory`` | ``chunks``) overrides the choice.
  """
  from kdjax.cache import read as cache_read
  reader = str(config.teacher.get('cache_reader', 'auto'))
  max_bytes = int(config.teacher.get('cache_memory_max_bytes', 1 << 30))
  mode = cache_read.choose_reader(cache.manifest, reader=reader, max_bytes=max_bytes)
  if feed == 'device':
    if reader == 'chunks':
      raise UserError("config.teacher.cache_reader='chunks' needs the stream feed (the device "
                      "feed keeps the cache on device); add --config.data.feed=stream")
    cache_read.check_dataset(cache.manifest, train_arrays, cache.cache_dir)
    mode = 'memory'
  else:
    cache_read.check_stream_dataset(cache.manifest, config.data.name, config.data.train_split,
                                    data_dir=data_dir, cache_dir=cache.cache_dir)
  _log(f'teacher cache {cache.cache_dir}: {cache.nbytes / 2**20:.1f} MiB, '
       f"{'loaded whole' if mode == 'memory' else 'rows read per batch from its chunk files'}")
  if mode == 'memory':
    return cache.columns(needs), None
  return None, cache.chunk_reader(needs)


def _split_size(spec, split: str) -> int | None:
  """Examples in a split expression such as ``'train+transfer'`` (None if sliced)."""
  total = 0
  for part in split.split('+'):
    part = part.strip()
    if part not in spec.splits:
      if '[' in part:
        return None
      raise UserError(f'{spec.name} has no split {part!r}; its splits: {", ".join(sorted(spec.splits))}')
    total += spec.splits[part]
  return total


def _reached_preemption(manager, step: int) -> bool:
  if jax.process_count() == 1:
    return False  # single process: SIGTERM is caught by _Preemption
  return bool(manager.reached_preemption(step))


def _progress(config, *, start: int, total: int):
  from tqdm.auto import tqdm
  disable = (not config.progress) or jax.process_index() != 0
  return tqdm(total=total, initial=start, disable=disable, unit='step', dynamic_ncols=True,
              mininterval=1.0)


def _build_objective(config):
  terms = config.loss.terms.to_dict() if hasattr(config.loss.terms, 'to_dict') else dict(config.loss.terms)
  try:
    return build_objective(terms)
  except (KeyError, ValueError) as e:
    raise UserError(f'config.loss.terms: {e.args[0] if e.args else e}') from None


def _sample_inputs(apply, params, model_state, x, teacher) -> dict:
  out, _ = apply(params, model_state, x, train=False)
  sample = {'student_logits': out.logits, 'student_features': out.features,
            'student_attentions': out.attentions, 'labels': np.zeros((x.shape[0],), np.int32),
            'where': np.ones((x.shape[0],), bool), 'step': 0}
  if teacher is not None:
    tparams, tstate = jax.device_get(teacher.variables)
    tout, _ = teacher.fns.apply(tparams, tstate, x, train=False)
    sample.update(teacher_logits=tout.logits, teacher_features=tout.features,
                  teacher_attentions=tout.attentions)
  return sample


def _make_evaluator(config, apply, spec, mesh, data_dir):
  """``evaluate(state) -> {'accuracy', 'loss'}`` over the whole eval split (padded batches)."""
  eval_step = make_eval_step(apply)
  repl = NamedSharding(mesh, P())
  batch_size = int(config.data.eval_batch_size)
  n_dev = mesh.shape[mesh.axis_names[0]]
  batch_size = max(n_dev, (batch_size // n_dev) * n_dev)
  arrays = kdata.load_arrays(config.data.name, config.data.eval_split, data_dir=data_dir)
  n = len(arrays['label'])
  num_batches = math.ceil(n / batch_size)
  pad = num_batches * batch_size - n
  mask = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)])
  stacked = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]).reshape(
      num_batches, batch_size, *v.shape[1:]) for k, v in arrays.items() if k in ('x', 'label')}
  stacked['mask'] = mask.reshape(num_batches, batch_size)
  device_data = _put_global(stacked, repl)
  batch_sh = NamedSharding(mesh, P(mesh.axis_names[0]))

  @jax.jit
  def evaluate_all(params, model_state, data):
    def one(batch):
      batch = jax.lax.with_sharding_constraint(batch, batch_sh)
      return eval_step(params, model_state, batch)
    metrics = jax.lax.map(one, data)
    return jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)

  def evaluate(state):
    m = evaluate_all(state.params['student'], state.model_state, device_data)
    acc = kmetrics.Accumulator()
    acc.add(m)
    return acc.means()

  return evaluate
