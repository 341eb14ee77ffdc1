"""Smoke test of benchmarks/lm_decode.py: the quick run writes every figure and both
sides decode the same greedy tokens; the parity measure; bad flags.

No timing assertions: the figures depend on the machine and its load.
"""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'lm_decode.py')


def _lm_decode():
  spec = importlib.util.spec_from_file_location('_kdjax_bench_lm_decode', SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.slow
def test_quick_run_writes_every_figure_and_parity_passes(tmp_path, run_benchmark):
  pytest.importorskip('torch')
  pytest.importorskip('transformers')
  out_json = tmp_path / 'lm_decode.json'
  # One torch thread: on a loaded CI machine a multi-threaded torch only adds waiting.
  proc = run_benchmark('lm_decode.py', '--quick', '--torch-threads', '1', '--json', str(out_json),
                       timeout=300)
  assert 'ratio_vs_torch' in proc.stdout
  res = json.loads(out_json.read_text())
  s = res['settings']
  assert (s['vocab'], s['prompt_len'], s['new_tokens'], s['batches'], s['repeats']) == (
      300, 16, 8, [1, 2], 1)
  assert s['sizes']['hidden_size'] == 32 and s['sampling'] == 'greedy'
  assert s['prompt_lengths'][0] == 16 and min(s['prompt_lengths']) >= 8
  for key in ('machine', 'versions', 'date', 'command', 'params'):
    assert res[key], key
  assert res['params']['kdjax'] == res['params']['torch'] == 28192
  threads = s['torch_threads']
  for b in ('1', '2'):
    r = res['per_batch'][b]
    names = {'kdjax', *(f'torch_t{t}' for t in threads)}
    for figures in (r['new_tokens_per_sec_best'], r['new_tokens_per_sec_median'],
                    r['prefill']['prompt_tokens_per_sec_best']):
      assert set(figures) == names and min(figures.values()) > 0, figures
    best_torch = r['new_tokens_per_sec_best'][r['best_torch_variant']]
    assert best_torch == max(v for k, v in r['new_tokens_per_sec_best'].items()
                             if k.startswith('torch'))
    assert r['ratio_vs_torch'] == pytest.approx(
        r['new_tokens_per_sec_best']['kdjax'] / best_torch, rel=1e-12)
    assert res['ratio_vs_torch'][b] == r['ratio_vs_torch'] > 0
    assert r['prefill']['ratio_vs_torch'] > 0
    assert r['kdjax_first_call_seconds'] > 0 and r['prefill']['kdjax_first_call_seconds'] > 0
    assert r['kdjax_first_call_compiles'] >= 1
    # Compiled once per shape: nothing compiles again during the timed calls.
    assert r['kdjax_compiles_during_timing'] == 0
    # Greedy parity: every row agrees on all 8 tokens, and the tokens are not one token
    # repeated (the weights make the continuation depend on the prompt).
    p = r['parity']
    assert (p['rows'], p['tokens'], p['first']) == (int(b), 8, 8)
    assert p['rows_agree_first'] == p['rows_agree_all'] == p['token_agreement'] == 1.0
    assert p['distinct_token_fraction'] > 0.2
  assert res['parity'] == {'first_tokens': 8, 'rows': 3, 'rows_agree_first': 1.0, 'min': 0.9,
                           'passed': True}
  assert res['torch_compile']['status'].startswith('off')
  assert len(res['load_average_per_repeat']) == 1


def test_parity_counts_the_agreeing_prefix():
  lm_decode = _lm_decode()
  a = np.array([[1, 2, 3, 4], [1, 2, 3, 4], [5, 6, 7, 8]])
  b = np.array([[1, 2, 3, 4], [1, 2, 9, 4], [0, 6, 7, 8]])
  p = lm_decode.parity(a, b, first=2)
  assert p['rows_agree_first'] == pytest.approx(2 / 3)
  assert p['rows_agree_all'] == pytest.approx(1 / 3)
  assert p['mean_agreeing_prefix'] == pytest.approx((4 + 2 + 0) / 3)
  assert p['token_agreement'] == pytest.approx(10 / 12)
  assert p['distinct_token_fraction'] == pytest.approx(8 / 12)


@pytest.mark.parametrize('flags', [['--batches', '0,8'], ['--new-tokens', '0'],
                                   ['--checkpoint', '/nonexistent/folder']])
def test_bad_flags_exit_2_and_write_nothing(tmp_path, flags):
  out_json = tmp_path / 'out.json'
  proc = subprocess.run([sys.executable, SCRIPT, '--quick', *flags, '--json', str(out_json)],
                        capture_output=True, text=True, cwd=ROOT, timeout=60)
  assert proc.returncode == 2, proc.stderr
  assert 'error:' in proc.stderr and 'Traceback' not in proc.stderr
  assert not out_json.exists()
