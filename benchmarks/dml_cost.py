"""What training K students together costs: the DML step of 4 students against the plain
step of 1, on this CPU.

Both sides are kdjax's own runs, built from one config (the MNIST-1D student baseline's
MLP, Adam at a constant rate, label loss CE; the DML side adds ``config.scheme``: 4
students of that MLP, mutual KL at T = 1) with the data handed in memory (the real
MNIST-1D train split, 4000 signals, device-fed): the 1-student side by
:func:`kdjax.engine.setup` (what ``kdjax train`` runs), the DML side by
:func:`kdjax.schemes.setup_dml` (what ``kdjax train --config configs/mnist1d/dml.py``
runs: the 4 students stacked and vmapped in one step). Each is timed as the loop calls
it: jitted calls of a ``lax.scan`` of ``--steps-per-call`` steps (``TrainCalls``), the
state donated from call to call. ``--loop`` also times the DML step with the same 4
students listed instead of stacked (a Python loop over them inside the one jitted
step, the path students of different architectures take).

Timing: everything is compiled and warmed up; the number of calls of one repeat is set
from a timed probe so that a repeat lasts at least ``--min-seconds``; the sides'
repeats are interleaved (a burst of load from other processes hits both) and the
median of ``--repeats`` is kept. CPU seconds per step (``time.process_time``) are
recorded next to the wall times. ``ratio`` = DML step time / 1-student step time, the
medians (the project's goal: ``ratio <= 2``; 4 would be 4 plain steps); ``ratio_best``
takes the fastest repeat of each side and ``ratio_cpu_seconds`` their CPU seconds (both
less moved by other processes on a shared machine). XLA's cost analysis of each
compiled one-step call gives ``flops_ratio`` (the DML step's FLOPs over the plain
step's) and the FLOP/s each side reaches: where the plain step already runs at the
machine's matmul throughput, ``ratio`` cannot go below ``flops_ratio``.

    python benchmarks/dml_cost.py --json /tmp/dml_cost.json
    python benchmarks/dml_cost.py --loop --json /tmp/dml_cost.json   # + the looped cohort
    python benchmarks/dml_cost.py --quick                             # smoke run, seconds
    python benchmarks/dml_cost.py --cohort-devices 2 --json F   # students over 2 CPU devices
"""

from __future__ import annotations

import argparse
import datetime
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench_common import machine_info  # noqa: E402  (benchmarks/bench_common.py)
from bench_common import write_json  # noqa: E402


def load_data(kind: str, num_examples: int) -> dict:
  """``{'x', 'label', 'id'}``: the MNIST-1D train split, or random signals of its shape."""
  import numpy as np
  if kind == 'real':
    from kdjax import data as kdata
    arrays = kdata.load_arrays('mnist1d', 'train')
    return {k: arrays[k][:num_examples] for k in ('x', 'label', 'id')}
  rng = np.random.default_rng(0)
  return {'x': rng.standard_normal((num_examples, 40, 1), dtype=np.float32),
          'label': rng.integers(0, 10, num_examples).astype(np.int32),
          'id': np.arange(num_examples, dtype=np.int32)}


def make_config(args, *, students: int | None):
  """The student baseline's recipe at a constant rate; with ``students``, DML's scheme."""
  from kdjax.engine.config import base_config
  from kdjax.schemes import dml_scheme
  c = base_config()
  c.num_steps = 10 ** 9                       # never reached: the benchmark times calls
  c.batch_size = args.batch_size
  c.steps_per_call = c.log_every = args.steps_per_call
  c.eval_every = c.checkpoint_every = 10 ** 9
  c.progress = False
  c.mesh = [('data', 1)]
  c.model.name = 'mlp'
  c.optimizer.name = 'adam'
  c.optimizer.schedule = 'constant'
  c.data.feed = 'device'
  c.loss.terms = {'ce': {'weight': 1.0}}
  if students:
    c.scheme = dml_scheme(num_students=students, temperature=1.0, weight=1.0)
    if args.cohort_devices > 1:   # the stacked students' axis over a 'cohort' mesh axis
      c.mesh = [('data', 1), ('cohort', args.cohort_devices)]
      c.partition_rules = [('.*student.*', ('cohort',))]
  return c


def step_flops(run, state) -> float | None:
  """XLA's cost analysis of the compiled call of one step (None if it has no figure)."""
  cost = run.calls.jitted(1).lower(state, run.feed.inputs(0, 1)).compile().cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  return float(cost['flops']) if cost and 'flops' in cost else None


class Runner:
  """One side: a built run, its state, and ``calls(n)`` of ``steps_per_call`` steps."""

  def __init__(self, name: str, run, steps_per_call: int):
    self.name, self.run, self.k = name, run, steps_per_call
    self.state = run.init()
    self.flops = step_flops(run, self.state)
    self.step = 0
    t0 = time.perf_counter()
    self.calls(2)                             # compile, then one warm call
    self.compile_seconds = time.perf_counter() - t0

  def calls(self, n: int) -> None:
    import jax
    run, state = self.run, self.state
    for _ in range(n):
      state, metrics = run.calls(state, run.feed.inputs(self.step, self.k), self.k)
      self.step += self.k
    jax.block_until_ready((state, metrics))
    self.state = state

  def timed(self, n: int) -> tuple[float, float]:
    """Wall and CPU seconds per step over ``n`` calls."""
    t0, c0 = time.perf_counter(), time.process_time()
    self.calls(n)
    steps = n * self.k
    return (time.perf_counter() - t0) / steps, (time.process_time() - c0) / steps


def build(args, arrays, log) -> list[Runner]:
  from kdjax.data import DatasetSpec
  from kdjax.engine import Data
  from kdjax.engine import setup
  from kdjax.schemes import setup_dml
  spec = DatasetSpec('mnist1d', (40, 1), 10, {'train': len(arrays['label'])})
  evals = {k: v[:args.batch_size] for k, v in arrays.items()}
  data = Data(spec, arrays, evals)
  quiet = lambda msg: None
  runners = [Runner('1 student', setup(make_config(args, students=None), data=data, log=quiet),
                    args.steps_per_call)]
  dml = setup_dml(make_config(args, students=args.students), data=data, log=quiet)
  assert dml.cohort.stacked
  runners.append(Runner(f'{args.students} students (DML, vmapped)', dml.run,
                        args.steps_per_call))
  if args.loop:
    looped = setup_dml(make_config(args, students=args.students), data=data, stack=False,
                       log=quiet)
    runners.append(Runner(f'{args.students} students (DML, looped)', looped.run,
                          args.steps_per_call))
  for r in runners:
    log(f'{r.name}: compiled and warmed up in {r.compile_seconds:.1f} s')
  return runners


def bench(args, log) -> dict:
  arrays = load_data(args.data, args.num_examples)
  runners = build(args, arrays, log)
  # Calls per repeat: enough for the slowest side to last --min-seconds.
  probe = max(r.timed(1)[0] for r in runners) * args.steps_per_call
  n_calls = max(1, int(args.min_seconds / probe + 0.999))
  samples = {r.name: [] for r in runners}
  cpu = {r.name: [] for r in runners}
  for i in range(args.repeats):
    for r in runners:                         # interleaved
      wall, cpu_s = r.timed(n_calls)
      samples[r.name].append(wall)
      cpu[r.name].append(cpu_s)
    log(f'repeat {i + 1}/{args.repeats}: ' + ', '.join(
        f'{r.name} {1e6 * samples[r.name][-1]:.0f} us/step' for r in runners))
  median = {name: statistics.median(s) for name, s in samples.items()}
  single, dml = runners[0].name, runners[1].name
  best = {name: min(s) for name, s in samples.items()}
  cpu_median = {name: statistics.median(s) for name, s in cpu.items()}
  out = {
      'ratio': median[dml] / median[single],
      'ratio_best': best[dml] / best[single],
      'ratio_cpu_seconds': cpu_median[dml] / cpu_median[single],
      'single_step_seconds': median[single],
      'dml_step_seconds': median[dml],
      'num_students': args.students,
      'per_student_ratio': median[dml] / median[single] / args.students,
      'calls_per_repeat': n_calls,
      'samples_seconds_per_step': samples,
      'best_seconds_per_step': best,
      'cpu_seconds_per_step': cpu_median,
      'compile_seconds': {r.name: r.compile_seconds for r in runners},
      'xla_flops_per_step': {r.name: r.flops for r in runners},
  }
  flops = out['xla_flops_per_step']
  if flops[single] and flops[dml]:
    # On a machine where the plain step is compute-bound the ratio cannot go below this.
    out['flops_ratio'] = flops[dml] / flops[single]
    out['flops_per_sec'] = {name: flops[name] / median[name] for name in median}
  if args.loop:
    looped = runners[2].name
    out['looped_step_seconds'] = median[looped]
    out['ratio_looped'] = median[looped] / median[single]
    out['ratio_looped_best'] = best[looped] / best[single]
    out['looped_over_vmapped'] = median[looped] / median[dml]
  return out


def versions() -> dict:
  import importlib.metadata as md
  return {pkg: md.version(pkg) for pkg in ('jax', 'jaxlib', 'flax', 'optax', 'numpy')}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--json', help='write every figure to this JSON file')
  p.add_argument('--quick', action='store_true', help='a seconds-long smoke run')
  p.add_argument('--students', type=int, default=4, help='DML cohort size K')
  p.add_argument('--batch-size', type=int, default=128, help="the student baseline's")
  p.add_argument('--steps-per-call', type=int, default=50, help="the engine's default")
  p.add_argument('--data', choices=('real', 'synthetic'), default='real',
                 help='the MNIST-1D train split, or random signals of its shape')
  p.add_argument('--num-examples', type=int, default=4000)
  p.add_argument('--repeats', type=int, default=7)
  p.add_argument('--min-seconds', type=float, default=1.0, help='per repeat and side')
  p.add_argument('--loop', action='store_true', help='also time the looped (listed) cohort')
  p.add_argument('--cohort-devices', type=int, default=1,
                 help='shard the stacked students over this many CPU devices (a cohort mesh '
                      'axis; JAX_NUM_CPU_DEVICES is set to it); the 1-student side keeps one')
  args = p.parse_args(argv)
  if args.quick:
    args.repeats, args.min_seconds, args.steps_per_call = 2, 0.05, 10
    args.data, args.num_examples = 'synthetic', 512
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if args.cohort_devices > 1:
    os.environ['JAX_NUM_CPU_DEVICES'] = str(args.cohort_devices)
  import jax
  t_start = time.perf_counter()

  def log(msg):
    print(f'[{time.perf_counter() - t_start:6.1f}s] {msg}', flush=True)

  started = datetime.datetime.now(datetime.timezone.utc)
  out = {'date': started.isoformat(timespec='seconds'),
         'command': ' '.join(['benchmarks/dml_cost.py', *(sys.argv[1:] if argv is None else argv)]),
         'machine': machine_info(), 'versions': versions(),
         'jax_devices': [str(d) for d in jax.devices()],
         'options': vars(args), 'load_average_start': os.getloadavg()}
  log(f'DML step ({args.students} MLP students, vmapped) vs 1-student step on '
      f'{out["machine"]["cpu_model"]}, batch {args.batch_size}, {args.steps_per_call} steps '
      f'per call, load average {out["load_average_start"][0]:.1f}')
  out.update(bench(args, log))
  out['load_average_end'] = os.getloadavg()
  log(f'1 student {1e6 * out["single_step_seconds"]:.0f} us/step, {args.students} students '
      f'{1e6 * out["dml_step_seconds"]:.0f} us/step: ratio {out["ratio"]:.2f} '
      f'({out["per_student_ratio"]:.2f} per student); best of each {out["ratio_best"]:.2f}, '
      f'CPU seconds {out["ratio_cpu_seconds"]:.2f}'
      + (f'; looped {1e6 * out["looped_step_seconds"]:.0f} us/step, ratio '
         f'{out["ratio_looped"]:.2f}' if 'ratio_looped' in out else ''))
  if 'flops_ratio' in out:
    log(f'XLA FLOPs per step: {out["flops_ratio"]:.2f}x; GFLOP/s: ' + ', '.join(
        f'{name} {v / 1e9:.1f}' for name, v in out['flops_per_sec'].items()))
  write_json(args.json, out)
  if args.json:
    log(f'wrote {args.json}')
  return out


if __name__ == '__main__':
  main()
