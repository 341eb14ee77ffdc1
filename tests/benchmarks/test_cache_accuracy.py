"""Smoke tests of benchmarks/cache_accuracy.py and cache_reader.py (quick runs, JSON written).

No timing or accuracy-level assertions (the figures depend on the machine); what is
checked holds on any machine: the k = all float32 cache reproduces the live teacher's
student exactly, bytes per example follow from the stored arrays, and both cache readers
return the same rows.
"""

import json
import os


def test_cache_accuracy_quick_run(tmp_path, run_benchmark):
  out_json = tmp_path / 'acc.json'
  args = ['--quick', '--workdir', str(tmp_path / 'runs'), '--json', str(out_json)]
  if os.environ.get('KDJAX_TEST_DATA_DIR'):
    args += ['--data-dir', os.environ['KDJAX_TEST_DATA_DIR']]
  proc = run_benchmark('cache_accuracy.py', *args)
  assert '| k | dtype |' in proc.stdout
  res = json.loads(out_json.read_text())['tasks']['mnist1d']
  assert res['num_classes'] == 10 and res['seeds'] == 1
  rows = {(r['k_label'], r['dtype']): r for r in res['cached']}
  assert sorted(rows) == [('1', 'float32'), ('1', 'int8'), ('all', 'float32'), ('all', 'int8')]
  # float32 logits, int16 indices, float32 log-sum-exp (+ float32 scale and offset for int8)
  assert rows['1', 'float32']['bytes_per_example'] == 4 + 2 + 4
  assert rows['all', 'int8']['bytes_per_example'] == 10 + 20 + 4 + 4 + 4
  assert rows['all', 'float32']['loss'] == 'kd' and rows['1', 'int8']['loss'] == 'sparse_kd'
  # The k = all float32 cache holds the live teacher's logits bit for bit: same student.
  assert rows['all', 'float32']['accuracy'] == res['live']['accuracy']
  assert abs(rows['all', 'float32']['topk_mass_mean'] - 1.0) < 1e-5
  assert 0.0 < rows['1', 'float32']['topk_mass_mean'] < 1.0


def test_cache_reader_quick_run(tmp_path, run_benchmark):
  out_json = tmp_path / 'reader.json'
  proc = run_benchmark('cache_reader.py', '--quick', '--cache-dir', str(tmp_path / 'cache'),
                       '--json', str(out_json), timeout=120)
  assert 'peak RSS memory / chunks' in proc.stdout
  res = json.loads(out_json.read_text())
  modes = res['modes']
  assert sorted(modes) == ['chunks', 'chunks_cold', 'chunks_cold_1thread', 'memory']
  # The same random batches read through both readers: the same values.
  assert len({m['checksum'] for m in modes.values()}) == 1
  for m in modes.values():
    assert m['rows_per_sec'] > 0 and m['peak_rss_mib'] >= m['base_rss_mib'] > 0
  assert res['cache']['bytes'] > 0 and res['cache']['bytes_per_entry'] == 256 * 6 + 4
