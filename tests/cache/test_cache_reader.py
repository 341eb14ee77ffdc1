"""The per-batch chunk reader: the same rows as the whole columns; reader choice; fingerprints."""

import os

import ml_dtypes
import numpy as np
import pytest

from kdjax.cache import build
from kdjax.cache import read
from kdjax.cache import store
from kdjax.errors import UserError


def _write_cache(d, *, n=11, chunk=4, epochs=3, k=3, classes=5, dtype='float32', feature=False):
  """A cache written chunk by chunk with ``store.write_chunk``, and its manifest."""
  rng = np.random.default_rng(0)
  z = rng.normal(0, 3, (epochs, n, k)).astype(np.float32)
  idx = np.stack([np.stack([rng.permutation(classes)[:k] for _ in range(n)])
                  for _ in range(epochs)])
  cols = {'teacher_logsumexp': rng.normal(size=(epochs, n)).astype(np.float32),
          'teacher_topk_indices': idx.astype(np.int16)}
  for key, value in build.quantize(z, dtype).items():
    cols[key] = np.asarray(value)
  if feature:
    cols['feature.h'] = rng.normal(size=(epochs, n, 2, 3)).astype(np.float32)
  chunks = {}
  for e in range(epochs):
    for i, (s, t) in enumerate(store.chunk_ranges(n, chunk)):
      name = store.chunk_name(e, i)
      store.write_chunk(d, name, {key: v[e, s:t] for key, v in cols.items()})
      digest, nbytes = store.chunk_checksum(d, name)
      chunks[name] = {'epoch': e, 'start': s, 'stop': t, 'sha256': digest, 'bytes': nbytes}
  manifest = {'epochs': epochs, 'chunk_size': chunk, 'dataset': {'num_examples': n},
              'arrays': {key: {'dtype': str(v.dtype), 'shape': list(v.shape[2:])}
                         for key, v in cols.items()},
              'chunks': chunks}
  return manifest, cols


@pytest.mark.parametrize('dtype', ['float32', 'bfloat16', 'float16', 'int8'])
@pytest.mark.parametrize('max_open,threads', [(1, 1), (1, 4), (256, 4)])
def test_chunk_reader_rows_equal_host_rows_of_the_whole_columns(tmp_path, dtype, max_open,
                                                               threads):
  d = str(tmp_path)
  manifest, _ = _write_cache(d, dtype=dtype, feature=True)
  needs = {'teacher_topk_logits', 'teacher_features'}
  columns = read.batch_columns(read.load_columns(d, manifest), needs)
  reader = read.ChunkReader(d, manifest, needs, max_open_files=max_open, threads=threads)
  rng = np.random.default_rng(1)
  for size in (3, 30, 30, 30):                            # 30 rows x 4 arrays: threaded reads
    ids = rng.integers(0, 11, size)
    ids[0] = -1                                           # padding reads row 0
    epochs = rng.integers(0, 9, size)                      # beyond E = 3: epoch mod E
    want = read.host_rows(columns, epochs, ids)
    got = reader.rows(epochs, ids)
    assert sorted(got) == sorted(want)
    for key in want:
      if key == 'teacher_features':
        np.testing.assert_array_equal(got[key]['h'], want[key]['h'])
        continue
      assert got[key].dtype == want[key].dtype, key
      np.testing.assert_array_equal(got[key], want[key])
  if max_open == 1:
    assert reader.files_opened > 8                        # the LRU really evicted and reopened
  reader.close()


def test_chunk_reader_values_come_from_the_right_entry(tmp_path):
  # Independent of host_rows: entry (e, i) read back by hand from the stored columns.
  d = str(tmp_path)
  manifest, cols = _write_cache(d, n=10, chunk=3, epochs=2)
  reader = read.ChunkReader(d, manifest, {'teacher_topk_logits'})
  rows = reader.raw_rows(np.array([0, 1, 2, 3]), np.array([9, 9, 4, 0]))
  want = np.stack([cols['teacher_topk_logits'][0, 9], cols['teacher_topk_logits'][1, 9],
                   cols['teacher_topk_logits'][0, 4], cols['teacher_topk_logits'][1, 0]])
  np.testing.assert_array_equal(rows['teacher_topk_logits'], want)
  assert 'feature.h' not in rows                          # features only when a loss needs them


def test_chunk_reader_dense_logits_scatter_to_class_order(tmp_path):
  d = str(tmp_path)
  manifest, cols = _write_cache(d, k=5, classes=5, dtype='bfloat16')
  reader = read.ChunkReader(d, manifest, {'teacher_logits'})
  rows = reader.rows(np.array([2]), np.array([6]))
  values = cols['teacher_topk_logits'][2, 6].astype(np.float32)
  dense = np.zeros(5, np.float32)
  dense[cols['teacher_topk_indices'][2, 6]] = values
  np.testing.assert_array_equal(rows['teacher_logits'][0], dense)
  assert cols['teacher_topk_logits'].dtype == ml_dtypes.bfloat16


def test_truncated_chunk_file_is_a_clear_error(tmp_path):
  d = str(tmp_path)
  manifest, _ = _write_cache(d)
  path = os.path.join(d, 'chunks', store.chunk_name(1, 2), 'teacher_logsumexp.npy')
  with open(path, 'r+b') as f:
    f.truncate(os.path.getsize(path) - 4)                 # chunk 2 holds rows 8..10
  reader = read.ChunkReader(d, manifest, set())
  reader.rows(np.array([1]), np.array([9]))               # rows before the cut still read
  with pytest.raises(OSError, match='e0001-c00002'):
    reader.rows(np.array([1]), np.array([10]))
  with pytest.raises(IndexError):
    reader.rows(np.array([0]), np.array([11]))


def test_choose_reader_threshold_and_override():
  manifest = {'chunks': {'a': {'bytes': 600}, 'b': {'bytes': 400}}}
  assert read.cache_bytes(manifest) == 1000
  assert read.choose_reader(manifest, max_bytes=1000) == 'memory'
  assert read.choose_reader(manifest, max_bytes=999) == 'chunks'
  assert read.choose_reader(manifest, reader='memory', max_bytes=1) == 'memory'
  assert read.choose_reader(manifest, reader='chunks', max_bytes=10**9) == 'chunks'
  with pytest.raises(UserError, match='cache_reader'):
    read.choose_reader(manifest, reader='mmap')


def test_seed_is_not_checked_without_augmentation():
  import ml_collections
  manifest = {'teacher': {'fingerprint': 'a'}, 'num_classes': 10, 'k': 10, 'seed': 0,
              'features': [], 'dataset': {'name': 'd', 'split': 'train'},
              'augment': {'kind': 'none'}}
  config = ml_collections.ConfigDict({'seed': 3, 'data': {'name': 'd', 'train_split': 'train',
                                                          'augment': {'kind': 'none'}},
                                      'teacher': {'workdir': ''}})
  read.check_run(manifest, config, num_classes=10, needs=set(), cache_dir='/c')
  manifest['augment'] = {'kind': 'signal', 'shift': 2, 'scale': 0.0, 'noise': 0.05, 'mode': 'roll'}
  config.data.augment = {'kind': 'signal', 'shift': 2, 'noise': 0.05}
  with pytest.raises(UserError, match='seed'):
    read.check_run(manifest, config, num_classes=10, needs=set(), cache_dir='/c')


def test_quantize_int8_keeps_leading_axes():
  # [b, T, k] rows (a sequence model): per-row scale over the last axis only.
  z = np.random.default_rng(5).normal(0, 2, (3, 4, 6)).astype(np.float32)
  cols = {key: np.asarray(v) for key, v in build.quantize(z, 'int8').items()}
  assert cols['teacher_topk_scale'].shape == (3, 4)
  step = (z.max(-1) - z.min(-1)) / 254
  assert np.all(np.abs(read.dequantize(cols) - z) <= step[..., None] / 2 + 1e-5)
