"""Smoke test of benchmarks/fed_throughput.py: the quick run completes and writes its JSON.

No timing assertions: the figures depend on the machine and its load. What is
asserted is that every contender ran the same FedAvg round (the global models
agree after round 1) and that every figure is there.
"""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
SCRIPT = os.path.join(ROOT, 'benchmarks', 'fed_throughput.py')


def _run(tmp_path, *extra, timeout=300):
  out_json = tmp_path / 'fed.json'
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
  proc = subprocess.run([sys.executable, SCRIPT, '--quick', '--json', str(out_json), *extra],
                        capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return json.loads(out_json.read_text()), proc.stdout


def test_quick_run_writes_every_figure(tmp_path):
  figures, stdout = _run(tmp_path, '--no-flower', '--many-clients', '30', '--many-chunk', '10',
                         '--cpu-devices', '2')
  for sfx in ('', '_cnn'):
    for key in (f'kdjax{sfx}_rounds_per_sec', f'sequential{sfx}_rounds_per_sec',
                f'scan_loop{sfx}_rounds_per_sec', f'ratio_vs_sequential{sfx}',
                f'ratio_vs_scan_loop{sfx}'):
      assert isinstance(figures[key], float) and figures[key] > 0, key
    assert figures[f'ratio_vs_flower{sfx}'] is None    # skipped, and said so
  assert list(figures['many_clients']) == ['mlp']      # --quick: the MLP only
  for model in ('mlp', 'cnn1d'):
    res = figures[model]
    # Same model, data, orders and keys: one round gives the same global model everywhere.
    assert set(res['round1_max_abs_diff_vs_kdjax']) >= {'kdjax', 'sequential', 'scan_loop'}
    assert max(res['round1_max_abs_diff_vs_kdjax'].values()) < 1e-5
    assert res['round1_max_abs_diff_vs_kdjax']['kdjax'] == 0.0
    # --cpu-devices 2: the client axis sharded over 2 CPU devices, checked like the others.
    assert res['devices'] == 2 and 'kdjax_sharded' in res['round1_max_abs_diff_vs_kdjax']
    # kdjax is credited with its fastest layout, and only with one of its own.
    layouts = {k: v for k, v in res['rounds_per_sec'].items() if k.startswith('kdjax')}
    assert {'kdjax', 'kdjax_sharded'} <= set(layouts)
    # Rounds K per call (one lax.scan): the same first round, timed as its own layout.
    assert 'kdjax_sharded_calls' in layouts
    assert res['round1_max_abs_diff_vs_kdjax']['kdjax_sharded_calls'] < 1e-5
    sfx = '' if model == 'mlp' else '_cnn'
    assert figures[f'kdjax{sfx}_one_round_per_call_rounds_per_sec'] == max(
        v for k, v in layouts.items() if not k.endswith('_calls'))
    assert res['kdjax_variant'] == max(layouts, key=layouts.get)
    assert figures[f"kdjax{'' if model == 'mlp' else '_cnn'}_rounds_per_sec"] == max(
        layouts.values())
    for name, samples in res['samples'].items():
      assert len(samples) == 2 and min(samples) > 0, name
  many = figures['many_clients']['mlp']
  assert many['clients'] == many['cohort'] == 30
  assert many['rounds_per_sec'] > 0
  assert many['peak_rss_bytes'] >= many['peak_rss_bytes_after_setup'] > many['client_data_bytes'] > 0
  for name, chunk in (('chunked', 10), ('one_vmap', 30)):
    assert many[name]['clients_per_chunk'] == chunk
    assert many[name]['rounds_per_sec'] > 0 and many[name]['peak_rss_bytes'] > 0, name
    assert many[name]['xla_memory_analysis']['temp_size_in_bytes'] > 0, name
  for key in ('machine', 'versions', 'date', 'command', 'settings'):
    assert figures[key], key
  assert figures['settings']['clients'] == 10
  assert figures['settings']['rounds_per_call'] == figures['settings']['rounds_per_repeat'] == 2
  assert 'rounds/s' in stdout


def _flower_available() -> bool:
  if importlib.util.find_spec('flwr') is not None:
    return True
  path = os.environ.get('KDJAX_FLOWER_PATH')
  return bool(path) and os.path.isdir(os.path.join(path, 'flwr'))


@pytest.mark.slow
@pytest.mark.skipif(not _flower_available(), reason='flwr[simulation] is not installed')
def test_quick_flower_contender_trains_the_same_round(tmp_path):
  figures, _ = _run(tmp_path, '--models', 'mlp', '--many-clients', '0', timeout=900)
  fl = figures['mlp']['flower']
  assert fl['failures'] == 0 and fl['rounds'] == 3
  assert fl['round1_max_abs_diff_vs_kdjax'] < 1e-5
  assert figures['flower_rounds_per_sec'] > 0 and figures['ratio_vs_flower'] > 0
  assert figures['versions']['flwr']
