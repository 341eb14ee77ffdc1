"""Smoke test of benchmarks/kernel_grad.py: the quick run times both lowerings of each shape."""

import json


def test_quick_run_writes_both_lowerings(tmp_path, run_benchmark):
  out = tmp_path / 'kg.json'
  run_benchmark('kernel_grad.py', '--quick', '--json', str(out))
  figures = json.loads(out.read_text())
  assert figures['dense'] and figures['conv']
  for row in figures['dense']:
    assert row['xla_dot_us'] > 0 and row['outer_sum_us'] > 0
  for row in figures['conv']:
    assert row['cols_major_us'] > 0 and row['channels_first_us'] > 0
