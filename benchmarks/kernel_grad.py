"""Kernel-gradient lowerings on XLA:CPU, per shape: what ``dense_impl`` and the patches VJP pick.

For each shape, the gradient of ``sum(f(x, w) * ct)`` with respect to the kernel ``w``,
``jax.vmap``-ed over ``C`` clients (each its own ``x`` and ``w``, as a federated cohort
chunk) and, with ``--clients 1``, unvmapped:

* dense: ``lax.dot_general`` (XLA's ``dot`` contracting the ``rows`` axis) against
  ``kdjax.models.layers.small_rows_dot_general`` (a sum of ``rows`` outer products
  when ``rows <= SMALL_ROWS``, 16; above it the function takes the dot, and the
  benchmark forces the outer sum for 32 and 64 rows to show where the threshold sits);
* conv (1-D, kernel 5, stride 2, the MNIST-1D CNN's layers): autodiff of im2col then
  ``dot`` (the kernel gradient as a dot over the patches' major axis) against
  ``kdjax.models.layers.patches_conv_general_dilated`` (its custom VJP builds the
  patches channels first).

Each figure is the median of ``--repeats`` timings of ``--loops`` gradients inside one
jitted ``fori_loop``, in microseconds per gradient; run it under ``taskset -c 0`` for
one core.

    taskset -c 0 python benchmarks/kernel_grad.py --json /tmp/kernel_grad.json
    python benchmarks/kernel_grad.py --quick
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

DENSE = [(rows, i, o) for rows in (4, 10, 16) for i, o in ((100, 100), (40, 100), (100, 10))]
# Above SMALL_ROWS the outer sum is forced (``layers._small_rows_linear``) to show why
# the threshold is where it is; ``small_rows_dot_general`` itself takes the dot there.
DENSE_ABOVE = [(32, 100, 100), (64, 100, 100)]
CONV = [(10, 40, 1), (10, 20, 32), (10, 10, 32)]   # (batch, length, channels in); 32 out


def _time(fn, args, loops: int, repeats: int) -> float:
  import jax
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    t0 = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append((time.perf_counter() - t0) / loops * 1e6)
  return statistics.median(times)


def _looped(grad_fn, loops: int):
  """``loops`` kernel gradients in one jitted call (inputs perturbed each time)."""
  import jax
  import jax.numpy as jnp

  def run(x, w, ct):
    def body(i, acc):
      return acc + grad_fn(x * (1 + i * 1e-6), w, ct)
    return jax.lax.fori_loop(0, loops, body, jnp.zeros_like(w))
  return jax.jit(run)


def bench(args) -> dict:
  import jax
  import jax.numpy as jnp
  from kdjax.models import layers
  rng = jax.random.key(0)
  vm = (lambda f: jax.vmap(f)) if args.clients > 1 else (lambda f: f)
  lead = (args.clients,) if args.clients > 1 else ()
  out = {'clients': args.clients, 'small_rows': layers.SMALL_ROWS, 'dense': [], 'conv': []}
  dims = (((1,), (0,)), ((), ()))
  forced = lambda x, w, dims: layers._small_rows_linear(x, w, None)  # noqa: E731
  shapes = DENSE[:3] + DENSE_ABOVE[:1] if args.quick else DENSE + DENSE_ABOVE
  for rows, i, o in shapes:
    x, w, ct = (jax.random.normal(k, lead + s) for k, s in
                zip(jax.random.split(rng, 3), ((rows, i), (i, o), (rows, o))))
    row = {'rows': rows, 'in': i, 'out': o}
    outer = layers.small_rows_dot_general if rows <= layers.SMALL_ROWS else forced
    row['outer_sum_forced'] = rows > layers.SMALL_ROWS
    for name, f in (('xla_dot', jax.lax.dot_general), ('outer_sum', outer)):
      g = vm(jax.grad(lambda x, w, ct, f=f: jnp.sum(f(x, w, dims) * ct), argnums=1))
      row[name + '_us'] = _time(_looped(g, args.loops), (x, w, ct), args.loops, args.repeats)
    row['speedup'] = row['xla_dot_us'] / row['outer_sum_us']
    out['dense'].append(row)
  geometry = ((5,), (2,), (1,), ((2, 2),))
  for n, length, cin in CONV[:1] if args.quick else CONV:
    x = jax.random.normal(rng, lead + (n, length, cin))
    w = jax.random.normal(rng, lead + (5, cin, 32))
    ct = jax.random.normal(rng, lead + (n, length // 2, 32))

    def autodiff_cols(x, w, ct):
      cols = layers._im2col(x, geometry)
      return jnp.sum(jax.lax.dot_general(cols, w.reshape(-1, 32),
                                         (((2,), (0,)), ((), ()))) * ct)

    def patches(x, w, ct):
      return jnp.sum(layers.patches_conv_general_dilated(x, w, (2,), [(2, 2)]) * ct)

    row = {'batch': n, 'length': length, 'channels_in': cin}
    for name, f in (('cols_major_us', autodiff_cols), ('channels_first_us', patches)):
      g = vm(jax.grad(f, argnums=1))
      row[name] = _time(_looped(g, args.loops), (x, w, ct), args.loops, args.repeats)
    row['speedup'] = row['cols_major_us'] / row['channels_first_us']
    out['conv'].append(row)
  return out


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--json', help='write every figure to this JSON file')
  p.add_argument('--quick', action='store_true', help='a seconds-long smoke run')
  p.add_argument('--clients', type=int, default=25, help='vmapped clients (1: unvmapped)')
  p.add_argument('--loops', type=int, default=50)
  p.add_argument('--repeats', type=int, default=5)
  args = p.parse_args(argv)
  if args.quick:
    args.loops, args.repeats = 2, 1
  out = {'machine': machine_info(), 'command': ' '.join(sys.argv), **bench(args)}
  print(f"kernel gradients, {args.clients} vmapped clients, us per gradient (median):")
  for r in out['dense']:
    forced = ' (forced)' if r['outer_sum_forced'] else ''
    print(f"  dense rows {r['rows']:3d} {r['in']:3d}x{r['out']:<3d}  xla dot {r['xla_dot_us']:8.1f}"
          f"  outer sum{forced} {r['outer_sum_us']:8.1f}  x{r['speedup']:.2f}")
  for r in out['conv']:
    print(f"  conv batch {r['batch']} length {r['length']} in {r['channels_in']:2d}"
          f"  cols-major dot {r['cols_major_us']:8.1f}  channels-first {r['channels_first_us']:8.1f}"
          f"  x{r['speedup']:.2f}")
  write_json(args.json, out)
  return out


if __name__ == '__main__':
  main()
