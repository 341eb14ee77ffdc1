"""Smoke test of benchmarks/kernel_grad.py: the quick run times both lowerings of each shape."""

import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))


def test_quick_run_writes_both_lowerings(tmp_path):
  out = tmp_path / 'kg.json'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'kernel_grad.py'),
                         '--quick', '--json', str(out)], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  figures = json.loads(out.read_text())
  assert figures['dense'] and figures['conv']
  for row in figures['dense']:
    assert row['xla_dot_us'] > 0 and row['outer_sum_us'] > 0
  for row in figures['conv']:
    assert row['cols_major_us'] > 0 and row['channels_first_us'] > 0
