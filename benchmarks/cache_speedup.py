"""Teacher-inference cache speedup: distill from the cache vs with the live teacher.

One run times four jitted calls of ``--steps-per-call`` steps, each built by kdjax's own
setup (``kdjax.engine.setup``, what ``kdjax distill`` calls: the device feed, the one
train step, donated state, the same batch size and batch gathering) on the MNIST-1D
train split (40 x 1 signals):

  (a) ``student``:  the student step alone (``ce`` only, no teacher);
  (b) ``teacher``:  the teacher forward alone, over the same gathered batches (the
                    engine's ``TeacherAhead`` call: the feed's batches, the teacher's
                    forward, nothing else);
  (c) ``live``:     distillation with the live teacher (``kd`` + ``ce``, the teacher
                    forward inside the call);
  (d) ``cache``:    distillation from the cache (``sparse_kd`` + ``ce`` fed by cache
                    rows that the device feed gathers with each batch; no teacher
                    forward).

The cache rows are computed in memory with the cache builder's own ``make_infer``
(top-k logits, indices and log-sum-exp, as ``kdjax cache build`` stores them) and given
to the setup through ``kdjax.cache.read``'s ``batch_columns`` and ``gather_rows``,
exactly what ``--config.teacher.cache`` puts on device and joins.

Printed: examples/s of each, ``ratio`` = time(c) / time(d) (achieved speedup),
``ideal_ratio`` = (time(a) + time(b)) / time(a) (what removing the teacher forward
could give at best) and ``ratio / ideal_ratio``. Each figure is the median of
``--repeats`` timed repeats after a warm-up call.

    python benchmarks/cache_speedup.py --json /tmp/cache_speedup.json
    python benchmarks/cache_speedup.py --quick            # seconds, figures meaningless
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time
from typing import Any, Callable

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench_common import machine_info  # noqa: E402  (benchmarks/bench_common.py)
from bench_common import write_json  # noqa: E402


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--json', help='write every figure to this JSON file')
  p.add_argument('--quick', action='store_true', help='a seconds-long smoke run (tiny settings)')
  p.add_argument('--batch-size', type=int, default=128, help='as configs/mnist1d/kd.py')
  p.add_argument('--steps-per-call', type=int, default=50, help='steps fused per jitted call')
  p.add_argument('--teacher-channels', default='256,256,256',
                 help='cnn1d teacher conv channels (comma list)')
  p.add_argument('--student-hidden', default='100,100', help='mlp student hidden sizes')
  p.add_argument('--k', type=int, default=10, help='cached top-k (10 = all MNIST-1D classes)')
  p.add_argument('--cache-dtype', default='float32',
                 choices=('float32', 'bfloat16', 'float16', 'int8'))
  p.add_argument('--nonfinite', default='stop', choices=('stop', 'skip', 'ignore'),
                 help="config.nonfinite of every run ('ignore': no per-step gradient norm)")
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--min-seconds', type=float, default=2.0, help='least duration of one repeat')
  p.add_argument('--synthetic', action='store_true',
                 help='random signals of the MNIST-1D shape instead of the real split')
  args = p.parse_args(argv)
  if args.quick:
    args.steps_per_call = min(args.steps_per_call, 5)
    args.min_seconds = min(args.min_seconds, 0.05)
    args.teacher_channels = '32,32'
    args.batch_size = min(args.batch_size, 64)
  return args


def _ints(text: str) -> tuple[int, ...]:
  return tuple(int(s) for s in text.split(',') if s)


def load_data(synthetic: bool):
  import numpy as np
  if not synthetic:
    from kdjax import data as kdata
    return kdata.load_arrays('mnist1d', 'train'), 'mnist1d:train'
  rng = np.random.default_rng(0)
  n = 4000
  return ({'x': rng.normal(size=(n, 40, 1)).astype(np.float32),
           'label': rng.integers(0, 10, n).astype(np.int32),
           'id': np.arange(n, dtype=np.int32)}, 'synthetic (4000 x 40 x 1)')


class Runner:
  """``calls(n)`` runs ``n`` calls of ``steps`` steps each: ``fn(state, step, steps)``."""

  def __init__(self, fn: Callable, state, steps: int):
    self.fn, self.state, self.steps, self.step = fn, state, steps, 0

  def calls(self, n: int) -> None:
    import jax
    out = None
    for _ in range(n):
      self.state, out = self.fn(self.state, self.step, self.steps)
      self.step += self.steps
    jax.block_until_ready((self.state, out))


class MemoryCache:
  """Teacher-cache rows made in memory, offered to the engine as ``--config.teacher.cache``
  offers a ``kdjax.cache.read.RunCache``: the same columns and the same join."""

  def __init__(self, stored: dict):
    from kdjax.cache import read
    self.read, self.stored = read, stored
    self.epochs = int(next(iter(stored.values())).shape[0])
    self.nbytes = int(sum(v.nbytes for v in stored.values()))

  def check(self, config, *, num_classes, needs):
    del config, num_classes, needs

  def check_arrays(self, arrays):
    del arrays

  def columns(self, needs):
    return self.read.batch_columns(self.stored, needs)

  def join(self, columns, epoch, positions):
    return self.read.gather_rows(columns, epoch, positions)

  def sample(self, needs):
    import numpy as np
    return self.read.host_rows(self.columns(needs), np.zeros(2, np.int64), np.arange(2))


def build_runners(args, arrays) -> tuple[dict[str, Runner], dict]:
  import jax
  import numpy as np

  from kdjax import models
  from kdjax.cache.build import make_infer
  from kdjax.data import DatasetSpec
  from kdjax.data import make_augment
  from kdjax.engine import Data
  from kdjax.engine import TeacherAhead
  from kdjax.engine import setup
  from kdjax.engine.config import base_config
  from kdjax.teacher import Teacher

  num_classes, input_shape = 10, tuple(arrays['x'].shape[1:])
  channels = _ints(args.teacher_channels)
  teacher_kwargs = dict(channels=channels, kernel_size=5, strides=(1,) + (2,) * (len(channels) - 1))
  t_apply, t_params, t_state = models.functional(models.create(
      'cnn1d', num_classes=num_classes, input_shape=input_shape, seed=1, **teacher_kwargs))
  teacher = Teacher(t_apply, (t_params, t_state), num_classes, None, 0, '')
  count = lambda tree: int(sum(np.size(a) for a in jax.tree.leaves(tree)))
  num_examples = len(arrays['label'])
  data = Data(DatasetSpec('mnist1d', input_shape, num_classes, {'train': num_examples}),
              arrays, {k: v[:args.batch_size] for k, v in arrays.items()})

  def config(terms):
    c = base_config()
    c.seed, c.batch_size, c.num_steps = 0, args.batch_size, 100_000
    c.steps_per_call = c.log_every = args.steps_per_call
    c.eval_every = c.checkpoint_every = 100_000
    c.model.name, c.model.kwargs = 'mlp', {'hidden': _ints(args.student_hidden)}
    c.optimizer.update({'name': 'adamw', 'learning_rate': 2e-3, 'weight_decay': 1e-4})
    c.loss.terms = terms
    c.data.feed = 'device'
    c.nonfinite = args.nonfinite
    return c

  # The cache: one augmentation epoch of teacher rows, made by the builder's infer.
  infer = jax.jit(make_infer(t_apply, make_augment(None), seed=0, k=args.k,
                             num_classes=num_classes, dtype=args.cache_dtype))
  chunks = []
  for start in range(0, num_examples, 1000):
    sl = slice(start, start + 1000)
    chunks.append(jax.device_get(infer((t_params, t_state), arrays['x'][sl], arrays['id'][sl],
                                       np.zeros(len(arrays['id'][sl]), np.int32))))
  stored = {key: np.concatenate([c[key] for c in chunks])[None] for key in chunks[0]}
  sparse_terms = {'sparse_kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1}}

  def distill_runner(terms, *, live=False, cache=None) -> Runner:
    run = setup(config(terms), teacher=teacher if live else None, cache=cache, data=data,
                log=lambda msg: None)
    call = lambda state, step, n: run.calls(state, run.feed.inputs(step, n), n)
    return Runner(call, run.init(), args.steps_per_call)

  def teacher_runner() -> Runner:
    # The teacher forward of step (c) alone: the same batches, forward only.
    run = setup(config({'kd': {'weight': 1.0}}), teacher=teacher, data=data,
                log=lambda msg: None)
    ahead = TeacherAhead(arrays, run.teacher, teacher_mesh=run.mesh, student_mesh=run.mesh,
                         batch_size=args.batch_size, seed=0, augment=make_augment(None),
                         needs=run.objective.needs, next_chunk=lambda step: None)
    return Runner(lambda state, step, n: (state, ahead.entries(step, n)), None,
                  args.steps_per_call)

  runners = {
      'student': distill_runner({'ce': {'weight': 1.0}}),
      'teacher': teacher_runner(),
      'live': distill_runner({'kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1}},
                             live=True),
      'cache': distill_runner(sparse_terms, cache=MemoryCache(stored)),
  }
  info = {'teacher': f'cnn1d channels={channels} kernel 5',
          'student': f'mlp hidden={_ints(args.student_hidden)}',
          'teacher_params': count(t_params),
          'student_params': count(runners['student'].state.params['student']),
          'cache_bytes_per_example': int(sum(v[0].nbytes for v in stored.values())
                                         / num_examples)}
  return runners, info


def time_runner(runner: Runner, *, repeats: int, min_seconds: float, batch_size: int) -> dict:
  """Warm-up (compile) call, then ``repeats`` timed repeats of at least ``min_seconds``."""
  t0 = time.perf_counter()
  runner.calls(1)
  compile_s = time.perf_counter() - t0
  t0 = time.perf_counter()
  runner.calls(1)
  one = max(time.perf_counter() - t0, 1e-6)
  n = max(1, int(round(min_seconds / one)))
  seconds_per_step = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    runner.calls(n)
    seconds_per_step.append((time.perf_counter() - t0) / (n * runner.steps))
  med = statistics.median(seconds_per_step)
  return {'seconds_per_step': med, 'examples_per_sec': batch_size / med,
          'seconds_per_step_samples': seconds_per_step, 'calls_per_repeat': n,
          'first_call_seconds': compile_s}


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  import jax
  import importlib.metadata as md

  started = datetime.datetime.now(datetime.timezone.utc)
  arrays, data_name = load_data(args.synthetic)
  runners, info = build_runners(args, arrays)
  names = {'student': '(a) student step alone (ce)', 'teacher': '(b) teacher forward alone',
           'live': '(c) distill, live teacher (kd+ce)', 'cache': '(d) distill, from cache (sparse_kd+ce)'}
  timings = {}
  for key, runner in runners.items():
    timings[key] = time_runner(runner, repeats=args.repeats, min_seconds=args.min_seconds,
                               batch_size=args.batch_size)
    print(f'{names[key]:<42} {timings[key]["examples_per_sec"]:>12,.0f} examples/s '
          f'({1e3 * timings[key]["seconds_per_step"]:.3f} ms/step)', flush=True)
  t = {k: v['seconds_per_step'] for k, v in timings.items()}
  ratio = t['live'] / t['cache']
  ideal = (t['student'] + t['teacher']) / t['student']
  print(f'ratio (c)/(d) = {ratio:.2f}, ideal_ratio (a+b)/a = {ideal:.2f}, '
        f'ratio/ideal = {ratio / ideal:.2f}', flush=True)
  out: dict[str, Any] = {
      'date': started.isoformat(timespec='seconds'),
      'command': ' '.join(['benchmarks/cache_speedup.py', *(sys.argv[1:] if argv is None else argv)]),
      'machine': machine_info(), 'load_average': os.getloadavg(),
      'versions': {p: md.version(p) for p in ('jax', 'jaxlib', 'flax', 'optax')},
      'jax_devices': [str(d) for d in jax.devices()],
      'data': data_name, 'batch_size': args.batch_size, 'steps_per_call': args.steps_per_call,
      'k': args.k, 'cache_dtype': args.cache_dtype, 'repeats': args.repeats, **info,
      'student_examples_per_sec': timings['student']['examples_per_sec'],
      'teacher_examples_per_sec': timings['teacher']['examples_per_sec'],
      'live_examples_per_sec': timings['live']['examples_per_sec'],
      'cache_examples_per_sec': timings['cache']['examples_per_sec'],
      'ratio': ratio, 'ideal_ratio': ideal, 'ratio_over_ideal': ratio / ideal,
      'timings': timings,
      'wall_seconds': (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
  }
  write_json(args.json, out)
  if args.json:
    print(f'wrote {args.json}')
  return out


if __name__ == '__main__':
  main()
