"""Smoke test of benchmarks/shuffle.py: the quick run times both shuffles and checks them."""

import json


def test_quick_run_times_both_shuffles(tmp_path, run_benchmark):
  out = tmp_path / 'shuffle.json'
  run_benchmark('shuffle.py', '--quick', '--json', str(out))
  (row,) = json.loads(out.read_text())['rows']
  assert row['n'] == 1000 and row['epochs'] == 5
  for key in ('jax_permutation_ms', 'packed_permutation_ms', 'numpy_host_ms'):
    assert row[key] > 0, key
  assert row['speedup'] == row['jax_permutation_ms'] / row['packed_permutation_ms']
