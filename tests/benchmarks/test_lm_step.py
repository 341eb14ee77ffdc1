"""Smoke test of benchmarks/lm_step.py: a tiny run completes, writes its JSON, and both
sides compute the same loss on the first batch.

No timing assertions: the figures depend on the machine and its load. The run asks for
the torch.compile variant with a 1-second budget, so what is checked there is the
graceful skip (compiling takes minutes on a CPU), not the compiled step.
"""

import importlib.util
import json
import os
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))


def _lm_step():
  spec = importlib.util.spec_from_file_location(
      '_kdjax_bench_lm_step', os.path.join(ROOT, 'benchmarks', 'lm_step.py'))
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module      # its dataclasses look their module up
  spec.loader.exec_module(module)
  return module


def test_tiny_run_writes_every_figure(tmp_path, run_benchmark):
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  out_json = tmp_path / 'lm_step.json'
  proc = run_benchmark('lm_step.py', '--tiny', '--repeats', '2', '--min-seconds', '0.05',
                       '--compile-timeout', '1', '--json', str(out_json), timeout=300)
  assert 'ratio_vs_torch' in proc.stdout
  res = json.loads(out_json.read_text())
  for key in ('ratio_vs_torch', 'ratio_vs_torch_eager', 'ratio_vs_torch_median',
              'kdjax_tokens_per_sec', 'torch_eager_tokens_per_sec', 'kdjax_compile_seconds'):
    assert isinstance(res[key], float) and res[key] > 0, (key, res[key])
  for key in ('machine', 'versions', 'date', 'command', 'settings'):
    assert res[key], key
  s = res['settings']
  assert (s['vocab'], s['seq_len'], s['batch_size'], s['steps_per_call']) == (300, 32, 4, 2)
  assert s['tokens_per_step'] == 4 * 32 and s['dtype'] == 'float32' and s['device'] == 'cpu'
  assert s['loss_terms'] == {'kd': {'weight': 0.5, 'temperature': 1.0}, 'ce': {'weight': 0.5}}
  assert s['optimizer']['name'] == 'adamw'
  # torch.compile could not finish in 1 s: skipped, said so, and not counted.
  assert res['torch_compile']['status'].startswith('skipped: timed out')
  assert res['torch_compile_tokens_per_sec'] is None
  assert res['best_torch_variant'] == 'torch_eager'
  assert res['ratio_vs_torch'] == pytest.approx(
      res['kdjax_tokens_per_sec'] / res['torch_eager_tokens_per_sec'], rel=1e-12)
  # Each runner's figure is its best repeat; the medians are recorded beside them.
  for name, samples in res['tokens_per_sec_samples'].items():
    assert len(samples) == 2 and min(samples) > 0, name
    assert res['tokens_per_sec_best'][name] == max(samples)
    assert min(samples) <= res['tokens_per_sec_median'][name] <= max(samples)
  assert res['kdjax_tokens_per_sec'] == res['tokens_per_sec_best']['kdjax']
  assert len(res['load_average_per_repeat']) == 2
  # The fairness check: the same weights and batch give the same loss on both sides.
  check = res['loss_check']
  assert check['passed'] is True and check['tol'] == 1e-4
  assert check['rel_diff']['kdjax_vs_torch_eager'] < 1e-4
  first = check['first_step_loss']
  assert first['kdjax'] == pytest.approx(first['torch_eager'], rel=1e-4)
  for name, losses in check['first_call_losses'].items():
    assert len(losses) == 2, name
  # The transformers models have kdjax's parameters.
  p = res['params']
  assert p['teacher_kdjax'] == p['teacher_torch'] == 28192
  assert p['student_kdjax'] == p['student_torch'] == 7152
  assert res['flops_per_token']['step'] == 105856.0
  peak = res['matmul_peak']
  assert peak['flops'] == max(peak['jax_flops'], peak['torch_flops']) > 0
  assert res['mfu']['kdjax'] == pytest.approx(
      res['kdjax_tokens_per_sec'] * 105856.0 / peak['flops'], rel=1e-12)


def test_flops_follow_the_parameter_count():
  """Forward FLOPs per token = 2 x the matmul weights + causal attention (MaxText).

  The configs' tiny teacher (hidden 32, 2 layers, 4 heads / 2 kv heads, MLP 64,
  vocabulary 300, tied head): 28,192 parameters, of which 160 are norm scales; every
  other one is a matmul weight (the tied embedding once, as the head), so the dense
  part is 2 x 28,032; attention adds 2 x 32 tokens x 4 heads x 8 dims per layer.
  """
  lm_step = _lm_step()
  teacher = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                 intermediate_size=64)
  norms = 2 * 2 * 32 + 32
  assert lm_step.model_flops_per_token(teacher, 300, 32) == 2 * (28192 - norms) + 2 * (
      2 * 32 * 4 * 8)
  # Multi-head attention (no kv heads given), default MLP width 4 x hidden.
  mha = dict(hidden_size=8, num_layers=1, num_heads=2)
  assert lm_step.model_flops_per_token(mha, 10, 4) == (
      2 * 8 * 24 + 2 * 8 * 8 + 2 * 3 * 8 * 32 + 2 * 4 * 8 + 2 * 8 * 10)
