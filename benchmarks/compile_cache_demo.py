"""``kdjax demo`` into a new workdir with the persistent compilation cache cold, then warm.

Two child processes run ``kdjax demo`` (``kdjax.cli.main``) one after the other, each into
a new workdir, both with ``KDJAX_COMPILATION_CACHE`` set to one folder that starts empty:
the first fills it, the second reads it. Each child sums JAX's own compile-phase events
(``jax.monitoring``: tracing, lowering, XLA compile, cache hits and misses). Printed: the
wall time of each run (the ``kdjax demo`` call, in-process; the child's start-up and
imports excluded) and cold / warm.

    python benchmarks/compile_cache_demo.py --json /tmp/ccd.json                # full demo
    python benchmarks/compile_cache_demo.py --variant tiny --json /tmp/ccd_tiny.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile

_CHILD = r'''
import collections, json, sys, time
import jax.monitoring as mon
seconds, count = collections.Counter(), collections.Counter()
def on_duration(event, duration, **kw):
  seconds[event] += duration
  count[event] += 1
def on_event(event, **kw):
  count[event] += 1
mon.register_event_duration_secs_listener(on_duration)
mon.register_event_listener(on_event)
from kdjax import cli
t0 = time.perf_counter()
code = cli.main(sys.argv[2:])
wall = time.perf_counter() - t0
with open(sys.argv[1], 'w') as f:
  json.dump({'code': code, 'wall_seconds': wall, 'event_seconds': dict(seconds),
             'event_count': dict(count)}, f)
'''

EVENTS = {
    'trace_s': '/jax/core/compile/jaxpr_trace_duration',
    'lower_s': '/jax/core/compile/jaxpr_to_mlir_module_duration',
    'compile_s': '/jax/core/compile/backend_compile_duration',
    'cache_read_s': '/jax/compilation_cache/cache_retrieval_time_sec',
}


def run_demo(folder: str, name: str, cache: str, extra: list[str]) -> dict:
  out = os.path.join(folder, f'{name}.json')
  args = ['demo', '--workdir', os.path.join(folder, name), *extra]
  env = dict(os.environ, KDJAX_COMPILATION_CACHE=cache)
  subprocess.run([sys.executable, '-c', _CHILD, out, *args], env=env, check=True,
                 stdout=subprocess.DEVNULL)
  with open(out) as f:
    r = json.load(f)
  if r['code'] not in (0, None):
    raise SystemExit(f'kdjax demo ({name}) exited {r["code"]}')
  row = {'wall_seconds': r['wall_seconds']}
  row.update({k: r['event_seconds'].get(e, 0.0) for k, e in EVENTS.items()})
  row['compile_requests'] = r['event_count'].get(EVENTS['compile_s'], 0)
  row['cache_hits'] = r['event_count'].get('/jax/compilation_cache/cache_hits', 0)
  row['cache_misses'] = r['event_count'].get('/jax/compilation_cache/cache_misses', 0)
  return row


def main(argv=None) -> dict:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--variant', default='', help="the demo's config variant (e.g. tiny)")
  p.add_argument('--seeds', type=int, default=None)
  p.add_argument('--json', help='write the figures to this JSON file')
  args = p.parse_args(argv)
  extra = (['--variant', args.variant] if args.variant else []) + (
      ['--seeds', str(args.seeds)] if args.seeds else [])
  with tempfile.TemporaryDirectory(prefix='kdjax_ccd_') as folder:
    cache = os.path.join(folder, 'compilation_cache')
    rows = {name: run_demo(folder, name, cache, extra) for name in ('cold', 'warm')}
  result = {'variant': args.variant or 'default', **rows,
            'cold_over_warm': rows['cold']['wall_seconds'] / rows['warm']['wall_seconds']}
  for name in ('cold', 'warm'):
    r = rows[name]
    print(f"{name}: {r['wall_seconds']:.1f} s; trace {r['trace_s']:.1f} s, lower "
          f"{r['lower_s']:.1f} s, XLA compile {r['compile_s']:.1f} s (cache reads "
          f"{r['cache_read_s']:.1f} s); {r['compile_requests']} compile requests, "
          f"{r['cache_hits']} cache hits, {r['cache_misses']} misses")
  print(f"cold / warm = {result['cold_over_warm']:.2f}")
  if args.json:
    with open(args.json, 'w') as f:
      json.dump(result, f, indent=2)
  return result


if __name__ == '__main__':
  main()
