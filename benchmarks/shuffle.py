"""Epoch shuffles on device: ``packed_permutation`` against ``jax.random.permutation``.

What one fused distillation call computes before its steps: the shuffles of the epochs
it spans (``kdjax.engine.feed.epoch_permutations``, 5 epochs for MNIST-1D's 4,000
training examples at batch 256 and 50 steps per call). Timed side by side in one run,
each jitted: ``jax.random.permutation`` (key-value sorts of 32-bit keys), kdjax's
``packed_permutation`` (one-operand sorts of random bits packed above the position),
and numpy's ``Generator.permutation`` on the host for scale. Milliseconds per call of
``--epochs`` shuffles (median of ``--repeats`` timings of ``--loops`` calls).

    taskset -c 0 python benchmarks/shuffle.py --json /tmp/shuffle.json
    python benchmarks/shuffle.py --quick
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench_common import machine_info  # noqa: E402  (benchmarks/bench_common.py)
from bench_common import write_json  # noqa: E402


def _time_ms(fn, loops: int, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn())
  samples = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    for _ in range(loops):
      out = fn()
    jax.block_until_ready(out)
    samples.append((time.perf_counter() - t0) / loops * 1e3)
  return statistics.median(samples)


def bench(args) -> list[dict]:
  import jax
  import jax.numpy as jnp
  import numpy as np
  from kdjax.engine.feed import packed_permutation

  rows = []
  for n in args.sizes:
    def shuffles(perm):
      return jax.jit(lambda e: jax.vmap(
          lambda k: perm(jax.random.fold_in(jax.random.key(0), k), n))(e + jnp.arange(args.epochs)))
    jax_fn, packed_fn = shuffles(jax.random.permutation), shuffles(packed_permutation)
    epoch = jnp.int32(3)
    row = {'n': n, 'epochs': args.epochs,
           'jax_permutation_ms': _time_ms(lambda: jax_fn(epoch), args.loops, args.repeats),
           'packed_permutation_ms': _time_ms(lambda: packed_fn(epoch), args.loops, args.repeats),
           'numpy_host_ms': _time_ms(
               lambda: np.stack([np.random.default_rng([0, 3 + i]).permutation(n)
                                 for i in range(args.epochs)]), args.loops, args.repeats)}
    row['speedup'] = row['jax_permutation_ms'] / row['packed_permutation_ms']
    packed = np.asarray(packed_fn(epoch))
    if not all(np.array_equal(np.sort(p), np.arange(n)) for p in packed):
      raise AssertionError(f'n={n}: packed_permutation did not return permutations')
    rows.append(row)
    print(f"n={n:>9,} x{args.epochs}: jax.random.permutation {row['jax_permutation_ms']:8.2f} ms, "
          f"packed_permutation {row['packed_permutation_ms']:7.2f} ms "
          f"({row['speedup']:.2f}x), numpy on the host {row['numpy_host_ms']:7.2f} ms", flush=True)
  return rows


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--json', help='write the figures to this JSON file')
  p.add_argument('--quick', action='store_true', help='a seconds-long smoke run')
  p.add_argument('--sizes', default='4000,40000,1000000', help='comma list of n')
  p.add_argument('--epochs', type=int, default=5, help='shuffles per call')
  p.add_argument('--loops', type=int, default=20)
  p.add_argument('--repeats', type=int, default=5)
  args = p.parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  args.sizes = [int(s) for s in args.sizes.split(',') if s]
  if args.quick:
    args.sizes, args.loops, args.repeats = [1000], 2, 2
  out = {'machine': machine_info(), 'command': ' '.join(sys.argv), 'rows': bench(args)}
  write_json(args.json, out)
  return out


if __name__ == '__main__':
  main()
