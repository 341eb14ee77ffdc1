"""The loop of a training run: calls of several steps, evaluation, checkpoints, logs.

``train_loop`` reads top to bottom. Each iteration asks the feed for the inputs of the
next call (:mod:`kdjax.engine.feed`), runs the jitted call (:class:`TrainCalls`: a
``lax.scan`` of the one train step over the feed's batches), then, with the call's
per-step metrics on the host: stops at a non-finite loss, logs, evaluates (and hands
the evaluation to the feed's policy, if any, before the checkpoint), checkpoints, and
stops on preemption. A call ends where an evaluation or a
checkpoint falls (and after ``steps_per_call`` steps); logging reads the per-step
metrics, so it needs no cut, and a resumed run logs exactly what an uninterrupted
one would.
"""

from __future__ import annotations

import dataclasses
import signal
import time
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import storage
from kdjax import workdir as workdir_lib
from kdjax.engine.feed import Feed
from kdjax.engine.metrics import Accumulator
from kdjax.engine.metrics import MetricsWriter
from kdjax.engine.metrics import logged
from kdjax.errors import Diverged


@dataclasses.dataclass(frozen=True)
class Schedule:
  """When things happen, in steps (all positive)."""

  num_steps: int
  steps_per_call: int
  log_every: int
  eval_every: int
  checkpoint_every: int

  def next_stop(self, step: int) -> int:
    """Where the call starting at ``step`` ends: an evaluation, a checkpoint, the call
    size or the end, whichever comes first."""
    every = (self.eval_every, self.checkpoint_every, self.steps_per_call)
    return min(min((step // e + 1) * e for e in every), self.num_steps)

  def chunk(self, step: int) -> tuple[int, int] | None:
    """``(step, length)`` of the call starting at ``step`` (None past the end)."""
    return None if step >= self.num_steps else (step, self.next_stop(step) - step)


class TrainCalls:
  """``calls(state, inputs, n) -> (state, metrics)``: ``n`` train steps in one jitted call.

  A ``lax.scan`` of ``step`` over the feed's ready batches (``feed.ready(inputs, n)``:
  each made from the state before its step, which an on-policy feed samples the
  student of); the state is donated and keeps ``state_shardings``; every metric (the
  step's and the feed's policy's) comes back stacked ``[n]``, replicated. Each ``n``
  compiles once.

  The call is traced, lowered and run with ``mesh`` in context (``jax.set_mesh``), so
  the models' activation constraints (the decoder's residual stream split over the
  batch axes, :mod:`kdjax.models.transformer`) apply in a real run as in ``kdjax plan``.
  """

  def __init__(self, step: Callable, feed: Feed, *, state_shardings, mesh):
    self.step, self.feed, self.state_shardings = step, feed, state_shardings
    self.mesh = mesh
    self.repl = NamedSharding(mesh, P())
    self._jitted: dict[int, Callable] = {}

  def jitted(self, n: int) -> Callable:
    if n not in self._jitted:
      step, feed = self.step, self.feed

      def call(state, inputs):
        ready = feed.ready(inputs, n)

        def body(st, i):
          batch, st, extra = ready(i, st)   # without a policy: st as it came, no extra
          st, metrics = step(st, batch)
          return st, {**metrics, **extra}

        return jax.lax.scan(body, state, jnp.arange(n))

      self._jitted[n] = InMesh(jax.jit(
          call, in_shardings=(self.state_shardings, feed.shardings()),
          out_shardings=(self.state_shardings, self.repl), donate_argnums=0), self.mesh)
    return self._jitted[n]

  def __call__(self, state, inputs, n: int):
    return self.jitted(n)(state, inputs)


class InMesh:
  """A jitted function called and lowered with ``mesh`` in context (``jax.set_mesh``):
  what it traces sees the mesh (``jax.sharding.get_abstract_mesh()``), so the sharding
  constraints written against it apply.

  >>> f = InMesh(jax.jit(lambda x: x + 1), jax.make_mesh((1,), ('data',)))
  >>> int(f(1)), 'add' in f.lower(1).as_text()
  (2, True)
  """

  def __init__(self, fn: Callable, mesh: jax.sharding.Mesh):
    self.fn, self.mesh = fn, mesh

  def __call__(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.fn(*args, **kwargs)

  def lower(self, *args, **kwargs):
    with jax.set_mesh(self.mesh):
      return self.fn.lower(*args, **kwargs)


@dataclasses.dataclass
class LoopResult:
  """Where a loop ended: the state, its step, the last logged train and eval figures,
  examples per second over calls that did not compile, and how many steps ran."""

  state: Any
  step: int
  train: dict
  eval: dict
  examples_per_sec: float | None
  steps_run: int
  skipped: int


class Preemption:
  """SIGTERM becomes a flag the loop reads between calls (checkpoint, then exit 143)."""

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
    del signum, frame
    self.requested = True

  def __exit__(self, *exc):
    if self._old is not None:
      signal.signal(signal.SIGTERM, self._old)


@jax.jit
def all_finite(tree) -> jax.Array:
  """True when every floating leaf of ``tree`` is finite."""
  leaves = [jnp.all(jnp.isfinite(a)) for a in jax.tree.leaves(tree)
            if jnp.issubdtype(a.dtype, jnp.inexact)]
  return jnp.all(jnp.stack(leaves)) if leaves else jnp.asarray(True)


def train_loop(state, *, start: int, schedule: Schedule, calls: TrainCalls, feed: Feed,
               evaluate: Callable[[Any], dict], manager, writer: MetricsWriter,
               batch_size: int, log_window: dict | None = None, progress=None,
               log: Callable[[str], None] = print) -> LoopResult:
  """Trains from ``start`` to ``schedule.num_steps`` (see the module docstring).

  Raises:
    Diverged: a step's loss or gradient norm was not finite (``nonfinite='stop'``), or
      the state was not finite at a checkpoint; nothing after the last good checkpoint
      is saved.
    SystemExit: 143 after a preemption (SIGTERM, or orbax's multi-host signal), once the
      checkpoint of the current step is saved.
  """
  step, last_train, last_eval = start, {}, {}
  window = Accumulator(log_window)
  compiled, timed_examples, timed_seconds, skipped = set(), 0, 0.0, 0
  with Preemption() as preempt:
    while step < schedule.num_steps:
      first, n = schedule.chunk(step)
      t0 = time.perf_counter()
      state, metrics = calls(state, feed.inputs(first, n), n)
      metrics = jax.device_get(metrics)                    # waits for the call
      if n in compiled:                                    # calls that compiled are not timed
        timed_examples += n * batch_size
        timed_seconds += time.perf_counter() - t0
      compiled.add(n)
      for i in range(n):
        one = {k: (s[i], c[i]) for k, (s, c) in metrics.items()}
        flag, _ = one.pop('nonfinite', (0.0, 0.0))
        skipped += int(one.get('skipped', (0, 0))[0])
        window.add(one)
        step = first + i + 1
        if flag:
          last_train = _log_train(writer, step, window, timed_examples, timed_seconds)
          raise _diverged(manager, step, one)
        if step % schedule.log_every == 0 or step == schedule.num_steps:
          last_train = _log_train(writer, step, window, timed_examples, timed_seconds)
          window.reset()
      if progress is not None:
        progress.update(step - progress.n)
        progress.set_postfix(loss=f"{last_train.get('loss', float('nan')):.4f}")
      if step % schedule.eval_every == 0 or step == schedule.num_steps:
        with jax.set_mesh(calls.mesh):   # the model's activation constraints, as in training
          last_eval = evaluate(state)
        writer.write(step, last_eval, split='eval')
        state = feed.evaluated(state, last_eval)   # a policy's answer (DistiLLM), else state
      preempted = preempt.requested or (jax.process_count() > 1
                                        and bool(manager.reached_preemption(step)))
      if step % schedule.checkpoint_every == 0 or step == schedule.num_steps or preempted:
        if not bool(all_finite((state.params, state.opt_state))):
          raise _diverged(manager, step, {}, what='the train state')
        workdir_lib.save(manager, step, state,
                         dict(feed.position(step), log_window=window.totals))
      if preempted:
        manager.wait_until_finished()
        log(f'preempted: saved step {step}; run the same command again to resume')
        raise SystemExit(143)
  eps = timed_examples / timed_seconds if timed_seconds else None
  return LoopResult(state, step, last_train, last_eval, eps, step - start, skipped)


def _log_train(writer, step, window, timed_examples, timed_seconds) -> dict:
  values = window.means()
  if timed_seconds:
    values['examples_per_sec'] = timed_examples / timed_seconds
  writer.write(step, values, split='train')
  return values


def _diverged(manager, step: int, metrics: dict, *, what: str = 'the loss') -> Diverged:
  manager.wait_until_finished()
  good = manager.latest_step()
  ckpt = None if good is None else storage.join(str(manager.directory), str(good))
  details = ', '.join(f'{name} {float(s) / float(c):.4g}' for name, (s, c) in metrics.items()
                      if name in ('loss', 'grad_norm') and c)
  details = f' ({details.replace("grad_norm", "gradient norm")})' if details else ''
  where = (f'the last good checkpoint is {ckpt}: rerun the same command to resume from it'
           if ckpt else 'no checkpoint was saved before it')
  return Diverged(f'{what} is not finite at step {step}{details}; {where}. Lower '
                  'optimizer.learning_rate, or set --config.nonfinite=skip to skip such steps',
                  step=step, checkpoint=ckpt)


class Fitted(NamedTuple):
  """What :func:`fit` returns: the loop's result, the train and eval figures of its last
  step (read back from the metrics of a finished run that had nothing left to train) and
  the wall seconds of the loop."""

  result: LoopResult
  train: dict
  eval: dict
  seconds: float

  def summary(self, *, resumed_from: int | None, feed: str | None) -> dict[str, Any]:
    """The fields every run's ``summary.json`` starts with: its last step, the eval and
    train figures of that step, throughput, skipped steps, wall seconds, the step it
    resumed from, its feed and the number of devices."""
    result, train, evaluation = self.result, self.train, self.eval
    return {
        'step': result.step,
        'eval_accuracy': evaluation.get('accuracy'),
        'eval_loss': evaluation.get('loss'),
        'train_loss': train.get('loss'),
        'train_accuracy': train.get('accuracy'),
        'examples_per_sec': result.examples_per_sec or train.get('examples_per_sec'),
        'skipped_steps': result.skipped,
        'wall_seconds': self.seconds,
        'resumed_from': resumed_from,
        'feed': feed,
        'num_devices': jax.device_count(),
    }


def fit(config, workdir: str, *, state, start: int | None, position: dict, manager,
        schedule: Schedule, calls: TrainCalls, feed: Feed, evaluate: Callable[[Any], dict],
        log: Callable[[str], None] = print) -> Fitted:
  """:func:`train_loop` as a run command runs it: the metrics writer and the progress bar
  of ``workdir``, ``summary.json`` written on a divergence (then re-raised), the
  checkpoint manager closed whatever happens, and a finished run that is run again
  evaluated as it stands.

  Args:
    config: the run's config (``num_steps``, ``batch_size``, ``progress``).
    workdir: the run's folder.
    state: the state to train from: fresh, or restored at step ``start``.
    start: the checkpoint step resumed from (None: a fresh run).
    position: the feed position restored with it (``{}`` when fresh).
    manager: the workdir's checkpoint manager (closed here).
    schedule, calls, feed, evaluate: the run's (:class:`kdjax.engine.Setup`).
    log: where one-line notes go.
  """
  from tqdm.auto import tqdm
  writer = MetricsWriter(workdir, resume_step=start)
  progress = tqdm(total=int(config.num_steps), initial=start or 0, unit='step',
                  disable=(not config.progress) or jax.process_index() != 0,
                  dynamic_ncols=True, mininterval=1.0)
  t_run = time.time()
  try:
    result = train_loop(state, start=start or 0, schedule=schedule, calls=calls, feed=feed,
                        evaluate=evaluate, manager=manager, writer=writer,
                        batch_size=int(config.batch_size), log_window=position.get('log_window'),
                        progress=progress, log=log)
  except Diverged as e:
    if jax.process_index() == 0:
      workdir_lib.write_json(storage.join(workdir, workdir_lib.SUMMARY), {
          'step': e.step, 'diverged': True, 'last_checkpoint': e.checkpoint, 'error': str(e)})
    raise
  finally:
    progress.close()
    manager.wait_until_finished()
    manager.close()
    writer.close()
  train, evaluation = result.train, result.eval
  if not result.steps_run:
    # Nothing left to train (a rerun of a finished run): report the run as it stands.
    # Every process evaluates (a collective); the train figures are the ones logged at
    # this step, where this process can read them.
    with jax.set_mesh(calls.mesh):
      evaluation = evaluate(result.state)
    train = logged(writer.path, 'train', result.step)
  return Fitted(result, train, evaluation, time.time() - t_run)


def fit_workdir(run, config, workdir: str, *, identity, defaults=None,
                fresh: Callable[[], Any] | None = None, log: Callable[[str], None] = print
                ) -> tuple[Fitted, int | None]:
  """:func:`fit` of a run's :class:`kdjax.engine.Setup` in its workdir (checked creatable
  already): the newest checkpoint resumed, state and feed position, or a fresh state;
  ``config.json`` checked or written (:func:`kdjax.workdir.prepare`). Returns
  ``(fitted, the step resumed from or None)``.

  Args:
    run: the run's ``Setup`` (``init``, ``abstract_state``, ``schedule``, ``calls``,
      ``feed``, ``evaluate``).
    config: its config.
    workdir: its folder.
    identity: the config fields a resumed run must keep (``prepare``'s).
    defaults: the config defaults ``prepare`` fills an older ``config.json`` from.
    fresh: ``fresh() -> state``, called before anything is written, when a run without
      a checkpoint starts from something else than ``run.init()`` (a warm start);
      otherwise ``run.init()`` is called after ``config.json`` is written (an ``init``
      may write files of its own into the workdir).
    log: where the resume note goes.
  """
  start = workdir_lib.latest_step(workdir)
  state = fresh() if start is None and fresh is not None else None
  workdir_lib.prepare(workdir, config, has_results=start is not None, identity=identity,
                      defaults=defaults)
  manager = workdir_lib.checkpoint_manager(workdir, keep=int(config.keep_checkpoints))
  position: dict = {}
  if start is not None:
    state, position = workdir_lib.restore(manager, start, run.abstract_state)
    run.feed.restore(position)
    log(f'resuming from step {start} ({workdir_lib.checkpoint_dir(workdir)}/{start})')
  elif state is None:
    state = run.init()
  fitted = fit(config, workdir, state=state, start=start, position=position, manager=manager,
               schedule=run.schedule, calls=run.calls, feed=run.feed, evaluate=run.evaluate,
               log=log)
  return fitted, start


def write_summary(workdir: str, summary: dict) -> None:
  """``summary.json`` in ``workdir``, written by process 0."""
  if jax.process_index() == 0:
    workdir_lib.write_json(storage.join(workdir, workdir_lib.SUMMARY), summary)
