"""Teacher-cache reader memory: rows read per batch from the chunk files vs the cache loaded whole.

One run writes (or reuses) a synthetic cache of ``--gb`` gigabytes in kdjax's cache
format (top-``k`` float32 logits, int16 indices, float32 log-sum-exp per entry: what
``kdjax cache build --k K`` stores for a ``K``-or-more-class teacher), then measures, each
in a fresh subprocess so that its peak resident memory is its own:

  ``memory``:      ``load_columns`` (the cache whole in memory, as the stream feed
                   does below ``config.teacher.cache_memory_max_bytes``) + random batches
                   through ``host_rows``;
  ``chunks``:      ``ChunkReader`` (rows read per batch from the chunk files, the stream
                   feed's reader above the threshold), page cache warm (the files were
                   just written or read);
  ``chunks_cold``: the same after ``posix_fadvise(DONTNEED)`` on every chunk file (the
                   page cache dropped for them: reads go to the disk);
  ``chunks_cold_1thread``: ``chunks_cold`` with the reads in one thread
                   (``ChunkReader(threads=1)``; the default spreads them over 4).

Printed per mode: peak RSS (``VmHWM``), RSS after imports, setup seconds (opening /
loading), rows/s over ``--batches`` random batches of ``--batch-size`` rows (uniform ids
and epochs), and the ratios. With ``--teacher-workdir`` it also measures what the stream
feed consumes: ``examples_per_sec`` of an MNIST-1D ``kdjax distill`` run with
``--config.data.feed=stream`` (live teacher), so the reader's rows/s can be set against
the step's needs.

    python benchmarks/cache_reader.py --cache-dir /tmp/big_cache --gb 3 --json /tmp/cr.json \\
        --teacher-workdir workdirs/teacher
    python benchmarks/cache_reader.py --quick     # seconds, figures meaningless
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench_common import write_json  # noqa: E402  (benchmarks/bench_common.py)


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--json', help='write every figure to this JSON file')
  p.add_argument('--quick', action='store_true', help='a seconds-long smoke run (tiny cache)')
  p.add_argument('--cache-dir', default='', help='synthetic cache folder (made if missing)')
  p.add_argument('--gb', type=float, default=3.0, help='synthetic cache size on disk')
  p.add_argument('--k', type=int, default=256, help='top-k logits per entry')
  p.add_argument('--epochs', type=int, default=1, help='augmentation epochs in the cache')
  p.add_argument('--chunk-size', type=int, default=16384, help='entries per chunk')
  p.add_argument('--batch-size', type=int, default=128)
  p.add_argument('--batches', type=int, default=2000, help='random batches read per mode')
  p.add_argument('--modes', default='memory,chunks,chunks_cold,chunks_cold_1thread')
  p.add_argument('--teacher-workdir', default='',
                 help='an MNIST-1D teacher workdir: also time a stream-fed distill run')
  p.add_argument('--step-steps', type=int, default=300, help='steps of that distill run')
  p.add_argument('--child', help=argparse.SUPPRESS)
  p.add_argument('--threads', type=int, default=4, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    args.gb = min(args.gb, 0.01)
    args.chunk_size = min(args.chunk_size, 1024)
    args.batches = min(args.batches, 20)
    args.step_steps = min(args.step_steps, 20)
  return args


def _row_bytes(k: int) -> int:
  return k * 4 + k * 2 + 4


def make_cache(cache_dir: str, *, gb: float, k: int, epochs: int, chunk_size: int) -> dict:
  """Writes a synthetic cache (manifest with checksums included); returns the manifest."""
  import numpy as np
  from kdjax.cache import store
  path = os.path.join(cache_dir, store.MANIFEST)
  if os.path.exists(path):
    manifest = store.read_json(path)
    if manifest.get('synthetic') == {'gb': gb, 'k': k, 'epochs': epochs, 'chunk_size': chunk_size}:
      return manifest
    raise SystemExit(f'{cache_dir} holds another cache; pick another --cache-dir')
  n = max(chunk_size, int(gb * 1e9 / (_row_bytes(k) * epochs)))
  rng = np.random.default_rng(0)
  chunks = {}
  t0 = time.time()
  for e in range(epochs):
    for i, (s, t) in enumerate(store.chunk_ranges(n, chunk_size)):
      m = t - s
      logits = -np.sort(-rng.standard_normal((m, k), np.float32), axis=1)
      rows = {'teacher_topk_logits': logits,
              'teacher_topk_indices': rng.integers(0, 32000, (m, k)).astype(np.int16),
              'teacher_logsumexp': logits[:, 0] + 1.0}
      name = store.chunk_name(e, i)
      store.write_chunk(cache_dir, name, rows)
      digest, nbytes = store.chunk_checksum(cache_dir, name)
      chunks[name] = {'epoch': e, 'start': s, 'stop': t, 'sha256': digest, 'bytes': nbytes}
  manifest = {
      'format': store.FORMAT, 'version': store.VERSION, 'synthetic':
          {'gb': gb, 'k': k, 'epochs': epochs, 'chunk_size': chunk_size},
      'epochs': epochs, 'k': k, 'num_classes': 32000, 'dtype': 'float32',
      'chunk_size': chunk_size, 'features': [],
      'dataset': {'name': 'synthetic', 'split': 'train', 'num_examples': n, 'sha256': ''},
      'arrays': {'teacher_topk_logits': {'dtype': 'float32', 'shape': [k]},
                 'teacher_topk_indices': {'dtype': 'int16', 'shape': [k]},
                 'teacher_logsumexp': {'dtype': 'float32', 'shape': []}},
      'bytes_per_entry': _row_bytes(k), 'chunks': chunks,
      'content_checksum': store.content_checksum(chunks), 'complete': True}
  store.write_json(path, manifest)
  print(f'wrote {sum(c["bytes"] for c in chunks.values()) / 1e9:.2f} GB synthetic cache '
        f'({n} entries x {epochs} epochs, {len(chunks)} chunks) in {time.time() - t0:.0f} s',
        flush=True)
  return manifest


def _status_kib(field: str) -> int:
  with open('/proc/self/status') as f:
    for line in f:
      if line.startswith(field + ':'):
        return int(line.split()[1])
  return -1


def child(args) -> dict:
  """One mode in this (fresh) process: setup, then random batches; prints JSON."""
  import numpy as np
  from kdjax.cache import read
  base_rss = _status_kib('VmRSS')
  manifest = read.open_cache(args.cache_dir)
  needs = {'teacher_topk_logits'}
  t0 = time.perf_counter()
  if args.child == 'memory':
    columns = read.batch_columns(read.load_columns(args.cache_dir, manifest), needs)
    lookup = lambda e, i: read.host_rows(columns, e, i)
  else:
    reader = read.ChunkReader(args.cache_dir, manifest, needs, threads=args.threads)
    lookup = reader.rows
  setup = time.perf_counter() - t0
  rng = np.random.default_rng(1)
  n, epochs = manifest['dataset']['num_examples'], manifest['epochs']
  batches = [(rng.integers(0, epochs * 1000, args.batch_size), rng.integers(0, n, args.batch_size))
             for _ in range(args.batches)]
  check = 0.0
  t0 = time.perf_counter()
  for e, i in batches:
    rows = lookup(e, i)
    check += float(rows['teacher_topk_logits'][0, 0])
  seconds = time.perf_counter() - t0
  return {'mode': args.child, 'setup_seconds': setup,
          'rows_per_sec': args.batches * args.batch_size / seconds,
          'peak_rss_mib': _status_kib('VmHWM') / 1024, 'base_rss_mib': base_rss / 1024,
          'end_rss_mib': _status_kib('VmRSS') / 1024, 'checksum': check}


def drop_page_cache(cache_dir: str) -> None:
  for root, _, files in os.walk(os.path.join(cache_dir, 'chunks')):
    for name in files:
      fd = os.open(os.path.join(root, name), os.O_RDONLY)
      try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
      finally:
        os.close(fd)


def run_mode(mode: str, args) -> dict:
  if mode.startswith('chunks_cold'):
    drop_page_cache(args.cache_dir)
  cmd = [sys.executable, os.path.abspath(__file__), '--child',
         'memory' if mode == 'memory' else 'chunks', '--cache-dir', args.cache_dir,
         '--batch-size', str(args.batch_size), '--batches', str(args.batches),
         '--threads', '1' if mode.endswith('1thread') else '4']
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  if out.returncode:
    raise SystemExit(f'{mode} failed:\n{out.stderr[-3000:]}')
  res = json.loads(out.stdout.strip().splitlines()[-1])
  res['mode'] = mode
  return res


def step_rate(args) -> dict:
  """examples/s of a stream-fed MNIST-1D distill run (live teacher): what the feed consumes."""
  with tempfile.TemporaryDirectory(prefix='kdjax_cache_reader_step_') as workdir:
    return _step_rate(args, workdir)


def _step_rate(args, workdir: str) -> dict:
  steps = args.step_steps
  cmd = [sys.executable, '-m', 'kdjax', 'distill', '--config',
         os.path.join(ROOT, 'configs', 'mnist1d', 'kd.py'), '--workdir', workdir,
         f'--config.teacher.workdir={args.teacher_workdir}', '--config.data.feed=stream',
         f'--config.num_steps={steps}', f'--config.eval_every={steps}',
         f'--config.checkpoint_every={steps}', f'--config.log_every={max(1, steps // 6)}',
         '--config.progress=false']
  out = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                       env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  if out.returncode:
    raise SystemExit(f'the distill run failed:\n{out.stderr[-3000:]}')
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  return {'examples_per_sec': summary['examples_per_sec'], 'steps': steps, 'batch_size': 128}


def main(argv=None) -> dict:
  args = parse_args(argv)
  args.argv = sys.argv[1:] if argv is None else list(argv)
  if args.child:
    print(json.dumps(child(args)))
    return {}
  if not args.cache_dir:
    with tempfile.TemporaryDirectory(prefix='kdjax_cache_reader_') as tmp:
      args.cache_dir = tmp
      return _measure(args)
  return _measure(args)


def _measure(args) -> dict:
  manifest = make_cache(args.cache_dir, gb=args.gb, k=args.k, epochs=args.epochs,
                        chunk_size=args.chunk_size)
  total = sum(c['bytes'] for c in manifest['chunks'].values())
  results = {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': {'platform': platform.platform(), 'cpu_count': os.cpu_count()},
      'argv': args.argv, 'quick': args.quick,
      'cache': {'dir': args.cache_dir, 'bytes': total, 'entries':
                manifest['dataset']['num_examples'] * manifest['epochs'],
                'bytes_per_entry': manifest['bytes_per_entry'], 'chunks': len(manifest['chunks']),
                'chunk_size': manifest['chunk_size']},
      'batch_size': args.batch_size, 'batches': args.batches, 'modes': {}}
  print(f"cache: {total / 1e9:.2f} GB, {results['cache']['entries']} entries of "
        f"{manifest['bytes_per_entry']} B", flush=True)
  for mode in args.modes.split(','):
    res = run_mode(mode, args)
    results['modes'][mode] = res
    print(f"{mode:20s} peak RSS {res['peak_rss_mib']:8.0f} MiB (after imports "
          f"{res['base_rss_mib']:.0f}), setup {res['setup_seconds']:6.2f} s, "
          f"{res['rows_per_sec']:10.0f} rows/s", flush=True)
  modes = results['modes']
  if 'memory' in modes and 'chunks' in modes:
    results['peak_rss_ratio_memory_over_chunks'] = (modes['memory']['peak_rss_mib'] /
                                                    modes['chunks']['peak_rss_mib'])
    results['rows_per_sec_ratio_chunks_over_memory'] = (modes['chunks']['rows_per_sec'] /
                                                        modes['memory']['rows_per_sec'])
    print(f"peak RSS memory / chunks: {results['peak_rss_ratio_memory_over_chunks']:.1f}x; "
          f"rows/s chunks / memory: {results['rows_per_sec_ratio_chunks_over_memory']:.3f}")
  if args.teacher_workdir:
    step = step_rate(args)
    results['stream_step'] = step
    for mode in ('chunks', 'chunks_cold', 'chunks_cold_1thread'):
      if mode in modes:
        results[f'{mode}_rows_per_sec_over_step_needs'] = (modes[mode]['rows_per_sec'] /
                                                           step['examples_per_sec'])
    print(f"stream-fed MNIST-1D distill step: {step['examples_per_sec']:.0f} examples/s; "
          + ', '.join(f"{m} reader / step = {results[f'{m}_rows_per_sec_over_step_needs']:.1f}x"
                      for m in ('chunks', 'chunks_cold', 'chunks_cold_1thread') if m in modes))
  write_json(args.json, results)
  return results


if __name__ == '__main__':
  main()
