"""Smoke test of benchmarks/shuffle.py: the quick run times both shuffles and checks them."""

import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))


def test_quick_run_times_both_shuffles(tmp_path):
  out = tmp_path / 'shuffle.json'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', 'shuffle.py'),
                         '--quick', '--json', str(out)], capture_output=True, text=True,
                        env=env, cwd=ROOT, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  (row,) = json.loads(out.read_text())['rows']
  assert row['n'] == 1000 and row['epochs'] == 5
  for key in ('jax_permutation_ms', 'packed_permutation_ms', 'numpy_host_ms'):
    assert row[key] > 0, key
  assert row['speedup'] == row['jax_permutation_ms'] / row['packed_permutation_ms']
