"""Smoke test of benchmarks/lm_memory.py: a tiny run writes its figures, and at a
vocabulary where the logits dominate the step, the chunked KD step compiles to fewer
scratch bytes than the plain one.

Vocabulary 4096, 2 x 64 tokens, 1-layer models of width 8 and 16: the plain ``kd``
term's float32 intermediates over ``[2, 64, 4096]`` (2 MiB each) are the step's
largest buffers, and ``chunked_kd`` holds one chunk of 32 tokens' worth of them
(1/4 of the batch). No timing or RSS assertions: those depend on the machine.
"""

import json

import pytest

KEYS = ('temp_bytes', 'argument_bytes', 'output_bytes', 'alias_bytes', 'compiled_bytes',
        'measured_bytes', 'first_step_loss', 'compile_seconds', 'measure', 'terms', 'device')


def test_tiny_run_writes_rows_and_ratios(tmp_path, run_benchmark):
  out_json = tmp_path / 'lm_memory.json'
  proc = run_benchmark('lm_memory.py', '--tiny', '--parallel', '--json', str(out_json),
                       timeout=300)
  assert 'ratio_naive_over_chunked' in proc.stdout
  res = json.loads(out_json.read_text())
  for key in ('date', 'command', 'machine', 'versions', 'settings', 'rows',
              'ratio_naive_over_chunked', 'first_step_loss_rel_diff'):
    assert key in res, key
  s = res['settings']
  assert (s['vocab'], s['seq_len'], s['batch_size'], s['chunk_size']) == (4096, 64, 2, 32)
  assert s['device'] == 'cpu' and s['dtype'] == 'float32'
  naive, chunked = res['rows']
  assert (naive['variant'], chunked['variant']) == ('kd', 'chunked_kd')
  for row in (naive, chunked):
    for key in KEYS:
      assert row.get(key) is not None, (row['variant'], key)
    assert row['compiled_bytes'] == (row['temp_bytes'] + row['argument_bytes']
                                     + row['output_bytes'] - row['alias_bytes'])
  # The shipped configs' terms: kd + ce, and the same with kd computed in chunks.
  assert naive['terms'] == {'kd': {'weight': 0.5, 'temperature': 1.0}, 'ce': {'weight': 0.5}}
  assert chunked['terms'] == {'chunked_kd': {'weight': 0.5, 'temperature': 1.0,
                                             'chunk_size': 32}, 'ce': {'weight': 0.5}}
  # One computation done two ways: the same first-step loss (float32 rounding).
  assert naive['first_step_loss'] == pytest.approx(chunked['first_step_loss'], rel=1e-5)
  assert res['first_step_loss_rel_diff'] < 1e-5
  # Where it must: the logits' intermediates are the bulk of the plain step's scratch.
  logits = 2 * 64 * 4096 * 4
  assert chunked['temp_bytes'] < naive['temp_bytes'] - logits
  assert chunked['argument_bytes'] == naive['argument_bytes']
  ratios = res['ratio_naive_over_chunked']
  assert set(ratios) == {'temp_bytes', 'compiled_bytes', 'measured_bytes'}
  assert ratios['temp_bytes'] == pytest.approx(naive['temp_bytes'] / chunked['temp_bytes'])
  assert ratios['temp_bytes'] > 1 and ratios['compiled_bytes'] > 1
