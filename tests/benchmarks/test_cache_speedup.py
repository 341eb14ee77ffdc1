"""Smoke test of benchmarks/cache_speedup.py: the quick run completes and writes its JSON.

No timing assertions: the figures depend on the machine and its load.
"""

import json
import os
import subprocess
import sys

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'cache_speedup.py')

POSITIVE_KEYS = (
    'student_examples_per_sec', 'teacher_examples_per_sec', 'live_examples_per_sec',
    'cache_examples_per_sec', 'ratio', 'ideal_ratio', 'ratio_over_ideal',
    'cache_bytes_per_example', 'teacher_params', 'student_params',
)


def test_quick_run_writes_every_figure(tmp_path):
  out_json = tmp_path / 'cache_speedup.json'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  proc = subprocess.run(
      [sys.executable, SCRIPT, '--quick', '--synthetic', '--json', str(out_json)],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'ratio (c)/(d)' in proc.stdout
  figures = json.loads(out_json.read_text())
  for key in POSITIVE_KEYS:
    assert key in figures, key
    assert isinstance(figures[key], (int, float)) and figures[key] > 0, (key, figures[key])
  for key in ('machine', 'versions', 'date', 'command'):
    assert figures[key], key
  # The derived figures are consistent with the per-runner timings they come from.
  t = {k: v['seconds_per_step'] for k, v in figures['timings'].items()}
  assert abs(figures['ratio'] - t['live'] / t['cache']) < 1e-9 * figures['ratio']
  ideal = (t['student'] + t['teacher']) / t['student']
  assert abs(figures['ideal_ratio'] - ideal) < 1e-9 * ideal
  for name, timing in figures['timings'].items():
    assert len(timing['seconds_per_step_samples']) == 3, name
    assert min(timing['seconds_per_step_samples']) > 0, name
  # float32, k = 10 of 10 classes: 10 logits (4 B) + 10 int16 indices + 1 log-sum-exp.
  assert figures['cache_bytes_per_example'] == 10 * 4 + 10 * 2 + 4
