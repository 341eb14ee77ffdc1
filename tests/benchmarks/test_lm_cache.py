"""Smoke test of benchmarks/lm_cache.py on the tiny configs.

At k = the whole vocabulary with float32 values the cached teacher is the live one, and
every tail treatment is exact there: the cached student must then match the live-teacher
student (a ratio of 1), which checks the whole path (build, keys, decode, loss) and not
only that the script runs. No timing assertions.
"""

import json

import pytest


def test_full_k_cache_matches_the_live_teacher(tmp_path, run_benchmark, data_dir):
  out = tmp_path / 'lm_cache.json'
  proc = run_benchmark('lm_cache.py', '--variant', 'tiny', '--ks', '300', '--codecs', 'f32+i32',
                       '--missing-mass', 'bucket', '--steps', '10', '--data-dir', data_dir,
                       '--workdir', str(tmp_path / 'wd'), '--json', str(out), timeout=600)
  res = json.loads(out.read_text())
  assert [(r['k'], r['format'], r['missing_mass']) for r in res['rows']] == [
      (300, 'f32+i32', 'bucket')]
  for r in res['rows']:
    assert r['bytes_per_token'] == 300 * 8 + 4 and r['topk_mass_mean'] == pytest.approx(1, abs=1e-5)
    assert r['perplexity_ratio_vs_live'] == pytest.approx(1.0, abs=2e-3), r
  assert res['best_bytes_per_token_within_1pct'] == 300 * 8 + 4
  assert 'ratio vs live' in proc.stdout
