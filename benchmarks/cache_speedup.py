"""Teacher-inference cache speedup: distill from the cache vs with the live teacher.

One run times four jitted, fused (``lax.scan``) calls built from kdjax's own engine
pieces (``make_train_step`` + ``make_fused_steps``, donated state, the same batch size
and batch gathering) on the MNIST-1D train split (40 x 1 signals):

  (a) ``student``:  the student step alone (``ce`` only, no teacher);
  (b) ``teacher``:  the teacher forward alone, over the same gathered batches;
  (c) ``live``:     distillation with the live teacher (``kd`` + ``ce``, the teacher
                    forward inside the step);
  (d) ``cache``:    distillation from the cache (``sparse_kd`` + ``ce`` fed by cache
                    rows that the fused step gathers from ``data['teacher_cache']``;
                    no teacher forward).

The cache columns are computed in memory with the cache builder's own ``make_infer``
(top-k logits, indices and log-sum-exp, as ``kdjax cache build`` stores them) and put
through ``kdjax.cache.read.batch_columns``, exactly what ``--config.teacher.cache``
puts on device.

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
  """A compiled fused call and its arguments; ``calls(n)`` runs it ``n`` times."""

  def __init__(self, fn: Callable, state, args: tuple, steps: int):
    self.fn, self.state, self.args, self.steps = fn, state, args, steps

  def calls(self, n: int) -> None:
    import jax
    out = None
    for _ in range(n):
      self.state, out = self.fn(self.state, *self.args)
    jax.block_until_ready((self.state, out))


def build_runners(args, arrays) -> tuple[dict[str, Runner], dict]:
  import jax
  import jax.numpy as jnp
  import ml_collections
  import numpy as np
  from jax.sharding import NamedSharding, PartitionSpec as P

  from kdjax import data as kdata
  from kdjax import models
  from kdjax.cache.build import make_infer
  from kdjax.cache.read import batch_columns, sample_rows
  from kdjax.distill.optim import make_optimizer
  from kdjax.distill.state import TrainState
  from kdjax.distill.step import TeacherFns, epoch_permutations, make_fused_steps, make_train_step
  from kdjax.losses import build_objective
  from kdjax.parallel import make_mesh, shardings_from_rules

  num_classes, input_shape = 10, tuple(arrays['x'].shape[1:])
  t_apply, t_params, t_state = models.functional(models.create(
      'cnn1d', num_classes=num_classes, input_shape=input_shape, seed=1,
      channels=_ints(args.teacher_channels), kernel_size=5, strides=(1,) + (2,) * (
          len(_ints(args.teacher_channels)) - 1)))
  s_apply, s_params, s_state = models.functional(models.create(
      'mlp', num_classes=num_classes, input_shape=input_shape, seed=2,
      hidden=_ints(args.student_hidden)))
  count = lambda tree: int(sum(np.size(a) for a in jax.tree.leaves(tree)))
  info = {'teacher': f'cnn1d channels={_ints(args.teacher_channels)} kernel 5',
          'student': f'mlp hidden={_ints(args.student_hidden)}',
          'teacher_params': count(t_params), 'student_params': count(s_params)}

  mesh = make_mesh([('data', -1)])
  repl = NamedSharding(mesh, P())
  batch_sh = NamedSharding(mesh, P('data'))
  augment = kdata.make_augment(None)
  seed, b, n_steps = 0, args.batch_size, args.steps_per_call
  num_examples = len(arrays['label'])
  tx = make_optimizer(ml_collections.ConfigDict(
      {'name': 'adamw', 'learning_rate': 2e-3, 'weight_decay': 1e-4, 'warmup_steps': 0,
       'schedule': 'cosine', 'grad_clip_norm': 0.0, 'momentum': 0.9, 'nesterov': False}), 100_000)
  teacher_vars = jax.device_put((t_params, t_state), repl)
  teacher_sh = jax.tree.map(lambda a: a.sharding, teacher_vars)

  # The cache: one augmentation epoch of teacher rows, made by the builder's infer.
  infer = jax.jit(make_infer(t_apply, augment, seed=seed, k=args.k, num_classes=num_classes,
                             dtype=args.cache_dtype))
  chunks = []
  for start in range(0, num_examples, 1000):
    sl = slice(start, start + 1000)
    chunks.append(jax.device_get(infer(teacher_vars, arrays['x'][sl], arrays['id'][sl],
                                       np.zeros(len(arrays['id'][sl]), np.int32))))
  stored = {key: np.concatenate([c[key] for c in chunks])[None] for key in chunks[0]}
  info['cache_bytes_per_example'] = int(sum(v[0].nbytes for v in stored.values()) / num_examples)
  sparse_terms = {'sparse_kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1}}

  def state_for(objective, teacher_out: bool, cache_cols=None):
    sample_x = np.zeros((2, *input_shape), np.float32)
    zeros = lambda tree: jax.tree.map(lambda a: np.zeros(a.shape, a.dtype), tree)
    s_out = zeros(jax.eval_shape(lambda p, s, x: s_apply(p, s, x)[0], s_params, s_state, sample_x))
    sample = {'student_logits': s_out.logits, 'student_features': s_out.features,
              'labels': np.zeros((2,), np.int32), 'where': np.ones((2,), bool), 'step': 0}
    if teacher_out:
      t_out = zeros(jax.eval_shape(lambda p, s, x: t_apply(p, s, x)[0], t_params, t_state, sample_x))
      sample.update(teacher_logits=t_out.logits, teacher_features=t_out.features)
    if cache_cols is not None:
      sample.update(sample_rows(cache_cols))
    init_rng = jax.random.key(seed)
    loss_params, loss_state = objective.init(jax.random.fold_in(init_rng, 1), sample)
    # Host copies: each runner donates its own state, so no buffer may be shared.
    host = lambda tree: jax.tree.map(lambda a: np.array(jax.device_get(a)), tree)
    trainable = host({'student': s_params, 'loss': loss_params})
    state = TrainState(step=jnp.zeros((), jnp.int32), params=trainable, model_state=host(s_state),
                       loss_state=loss_state, opt_state=tx.init(trainable),
                       rng=jax.random.key_data(jax.random.fold_in(init_rng, 2)))
    state_sh = shardings_from_rules(state, [('.*', None)], mesh)
    return jax.device_put(state, state_sh), state_sh

  def put(tree):
    return jax.tree.map(lambda a: jax.make_array_from_process_local_data(repl, np.asarray(a)), tree)

  def distill_runner(terms, *, live: bool, cache_cols=None) -> Runner:
    objective = build_objective(terms)
    state, state_sh = state_for(objective, live, cache_cols)
    train = dict(arrays) if cache_cols is None else dict(arrays, teacher_cache=cache_cols)
    step_fn = make_train_step(student_apply=s_apply, objective=objective, tx=tx, augment=augment,
                              augment_seed=seed,
                              teacher=TeacherFns(t_apply, num_classes) if live else None)
    fused = make_fused_steps(step_fn, num_examples=num_examples, batch_size=b, shuffle_seed=seed,
                             num_steps=n_steps, batch_sharding=batch_sh)
    data_sh = jax.tree.map(lambda _: repl, train)
    t_sh = teacher_sh if live else None
    fn = jax.jit(fused, in_shardings=(state_sh, data_sh, t_sh), out_shardings=(state_sh, repl),
                 donate_argnums=0)
    return Runner(fn, state, (put(train), teacher_vars if live else None), n_steps)

  def teacher_runner() -> Runner:
    # The teacher forward of step (c) alone: the same batch gathering, forward only.
    steps_per_epoch = num_examples // b

    def run(step, data, variables):
      first_epoch = step // steps_per_epoch
      perms = epoch_permutations(seed, first_epoch, n_steps // steps_per_epoch + 2, num_examples)

      def body(carry, _):
        step, acc = carry
        epoch, pos = step // steps_per_epoch, step % steps_per_epoch
        idx = jax.lax.dynamic_slice(perms[epoch - first_epoch], (pos * b,), (b,))
        x = augment(jnp.take(data['x'], idx, axis=0), jnp.take(data['id'], idx, axis=0),
                    jnp.full((b,), epoch, jnp.int32), seed=seed)
        x = jax.lax.with_sharding_constraint(x, batch_sh)
        out, _ = t_apply(*variables, x, train=False)
        return (step + 1, acc + jnp.sum(out.logits)), None

      (step, acc), _ = jax.lax.scan(body, (step, jnp.zeros((), jnp.float32)), None, length=n_steps)
      return step, acc

    fn = jax.jit(run, donate_argnums=0)
    return Runner(fn, jnp.zeros((), jnp.int32), (put(arrays), teacher_vars), n_steps)

  cache_cols = batch_columns(stored, build_objective(sparse_terms).needs)
  runners = {
      'student': distill_runner({'ce': {'weight': 1.0}}, live=False),
      'teacher': teacher_runner(),
      'live': distill_runner({'kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1}},
                             live=True),
      'cache': distill_runner(sparse_terms, live=False, cache_cols=cache_cols),
  }
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
