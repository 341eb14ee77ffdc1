"""Smoke test of benchmarks/step_throughput.py: the quick run completes and writes its JSON.

No timing assertions: the figures depend on the machine and its load.
"""

import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'step_throughput.py')

POSITIVE_KEYS = (
    'ratio_vs_torch', 'ratio_vs_torch_resnet',
    'kdjax_examples_per_sec', 'torch_examples_per_sec',
    'kdjax_resnet_examples_per_sec', 'torch_resnet_examples_per_sec',
    'matmul_peak_flops',
    'kdjax_flops_fraction_of_peak', 'kdjax_resnet_flops_fraction_of_peak',
    'torch_flops_fraction_of_peak', 'torch_resnet_flops_fraction_of_peak',
)


def test_quick_run_writes_every_figure(tmp_path):
  pytest.importorskip('torch')
  pytest.importorskip('torchdistill')
  out_json = tmp_path / 'bench.json'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  proc = subprocess.run(
      [sys.executable, SCRIPT, '--quick', '--mnist1d-data', 'synthetic', '--json', str(out_json)],
      capture_output=True, text=True, env=env, cwd=ROOT, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  figures = json.loads(out_json.read_text())
  for key in POSITIVE_KEYS:
    assert key in figures, key
    assert isinstance(figures[key], float) and figures[key] > 0, (key, figures[key])
  for key in ('machine', 'versions', 'date', 'command'):
    assert figures[key], key
  assert figures['versions']['jax'] and figures['versions']['torch']
  for pair in ('mnist1d', 'resnet'):
    res = figures[pair]
    # The torch mirrors have kdjax's parameter counts and compute the same loss.
    assert res['params']['teacher_kdjax'] == res['params']['teacher_torch'] > 0
    assert res['params']['student_kdjax'] == res['params']['student_torch'] > 0
    assert res['equivalence']['loss_rel_diff'] < 1e-3
    # XLA's FLOP count of the step agrees with the analytic one within 25%.
    assert 0.75 < res['xla_flops_per_step'] / res['analytic_flops_per_step'] < 1.25
    # Each reported rate is the median of the per-repeat samples of its runner.
    for name, samples in res['examples_per_sec_samples'].items():
      assert len(samples) == 3 and min(samples) > 0, name
  # Pair 1's parts: the teacher's forward and the cached-logits student step, each timed
  # alone, and the serial bound 1 / (1/teacher + 1/student) computed from those medians.
  parts = figures['mnist1d']['parts']
  med = figures['mnist1d']['examples_per_sec_median']
  assert parts['kdjax_student_step'] == med['kdjax[cached teacher]']
  expected = 1 / (1 / parts['kdjax_teacher_forward'] + 1 / parts['kdjax_student_step'])
  assert parts['kdjax_serial_bound'] == pytest.approx(expected, rel=1e-12)
  assert parts['kdjax_serial_bound'] < min(parts['kdjax_teacher_forward'],
                                           parts['kdjax_student_step'])
