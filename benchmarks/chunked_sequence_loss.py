"""Plain vs chunked token-level KD over a large vocabulary: memory and time, side by side.

Measures value-and-gradient (w.r.t. the student logits) of ``kdjax.losses.kd`` and
``kdjax.losses.chunked_kd`` on ``[batch, time, vocab]`` logits:

* compiled scratch memory (``jit(...).lower(...).compile().memory_analysis()``,
  ``temp_size_in_bytes``: the intermediates XLA allocates besides inputs and outputs);
* peak resident memory of a fresh process that runs only that variant (``ru_maxrss``);
* wall time per call (median of ``--repeats`` after one warm-up call).

Usage::

  python benchmarks/chunked_sequence_loss.py [--json FILE] [--vocab 32000] \
      [--batch 8] [--time 512] [--chunk-size 64] [--dtypes bfloat16,float32]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bench_common import write_json  # noqa: E402  (benchmarks/bench_common.py)

import kdjax.losses as L  # noqa: E402


def make_fn(variant: str, chunk_size: int, temperature: float = 2.0):
  if variant == 'plain':
    loss = lambda s, t: L.kd(s, t, temperature=temperature)
  else:
    loss = lambda s, t: L.chunked_kd(s, t, temperature=temperature, chunk_size=chunk_size)
  return jax.jit(jax.value_and_grad(lambda s, t: jnp.mean(loss(s, t))))


def inputs(args, dtype):
  k1, k2 = jax.random.split(jax.random.key(0))
  shape = (args.batch, args.time, args.vocab)
  s = (2.0 * jax.random.normal(k1, shape, jnp.float32)).astype(dtype)
  t = (2.0 * jax.random.normal(k2, shape, jnp.float32)).astype(dtype)
  return s, t


def measure(args, variant: str, dtype_name: str) -> dict:
  dtype = jnp.dtype(dtype_name)
  fn = make_fn(variant, args.chunk_size)
  spec = jax.ShapeDtypeStruct((args.batch, args.time, args.vocab), dtype)
  compiled = fn.lower(spec, spec).compile()
  analysis = compiled.memory_analysis()
  s, t = inputs(args, dtype)
  value, grad = compiled(s, t)
  jax.block_until_ready(grad)
  times = []
  for _ in range(args.repeats):
    start = time.perf_counter()
    value, grad = compiled(s, t)
    jax.block_until_ready(grad)
    times.append(time.perf_counter() - start)
  return dict(variant=variant, dtype=dtype_name, value=float(value),
              temp_bytes=int(analysis.temp_size_in_bytes) if analysis else None,
              time_s=statistics.median(times), times_s=times)


def child_rss(args, variant: str, dtype_name: str) -> dict:
  """Runs one variant in a fresh process; returns its measurements and peak RSS."""
  cmd = [sys.executable, os.path.abspath(__file__), '--child', variant, '--dtypes', dtype_name,
         '--vocab', str(args.vocab), '--batch', str(args.batch), '--time', str(args.time),
         '--chunk-size', str(args.chunk_size), '--repeats', str(args.repeats)]
  out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
  return json.loads(out.strip().splitlines()[-1])


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', help='write the results to this file')
  parser.add_argument('--vocab', type=int, default=32000)
  parser.add_argument('--batch', type=int, default=8)
  parser.add_argument('--time', type=int, default=512)
  parser.add_argument('--chunk-size', type=int, default=64,
                      help='tokens of each row per chunk (a chunk: batch x chunk-size tokens)')
  parser.add_argument('--repeats', type=int, default=3)
  parser.add_argument('--dtypes', default='bfloat16,float32')
  parser.add_argument('--child', choices=['plain', 'chunked'], help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.child:
    result = measure(args, args.child, args.dtypes)
    result['peak_rss_bytes'] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    print(json.dumps(result))
    return

  rows = []
  for dtype_name in args.dtypes.split(','):
    pair = {v: child_rss(args, v, dtype_name) for v in ('plain', 'chunked')}
    rows.append(pair)
    p, c = pair['plain'], pair['chunked']
    print(f'\n[{dtype_name} logits {args.batch}x{args.time}x{args.vocab}, value+grad, '
          f'chunk {args.chunk_size} tokens]')
    print(f'{"":24s}{"plain":>12s}{"chunked":>12s}{"plain/chunked":>15s}')
    for key, label, scale in (('temp_bytes', 'XLA temp (MiB)', 2**20),
                              ('peak_rss_bytes', 'peak RSS (MiB)', 2**20),
                              ('time_s', 'time / call (s)', 1)):
      print(f'{label:24s}{p[key] / scale:12.3f}{c[key] / scale:12.3f}'
            f'{p[key] / c[key]:15.2f}')
    print(f'{"loss value":24s}{p["value"]:12.6f}{c["value"]:12.6f}')

  report = dict(
      benchmark='chunked_sequence_loss', date=time.strftime('%Y-%m-%d'),
      machine=f'{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs',
      backend=jax.default_backend(), jax=jax.__version__,
      command=' '.join([os.path.basename(sys.executable), 'benchmarks/chunked_sequence_loss.py']
                       + (argv if argv is not None else sys.argv[1:])),
      shape=[args.batch, args.time, args.vocab], chunk_size=args.chunk_size, rows=rows)
  write_json(args.json, report)


if __name__ == '__main__':
  main()
