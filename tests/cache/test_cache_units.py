"""Unit tests of the cache pieces: quantization, row joins, store checksums, run checks."""

import copy
import os

import ml_collections
import numpy as np
import pytest

from kdjax.cache import build
from kdjax.cache import fingerprint as fp
from kdjax.cache import read
from kdjax.cache import store
from kdjax.errors import UserError


@pytest.mark.parametrize('dtype,tol', [('float32', 0.0), ('float16', 1e-2), ('bfloat16', 6e-2)])
def test_float_dtypes_round_trip(dtype, tol):
  z = np.random.default_rng(0).normal(0, 3, (50, 5)).astype(np.float32)
  cols = {k: np.asarray(v) for k, v in build.quantize(z, dtype).items()}
  back = np.asarray(read.dequantize(cols))
  np.testing.assert_allclose(back, z, atol=tol * np.abs(z).max())
  if dtype == 'float32':
    assert np.array_equal(back, z)


def test_int8_error_is_at_most_half_a_step():
  z = np.random.default_rng(1).normal(0, 4, (200, 7)).astype(np.float32)
  z[3] = 2.5                                         # a constant row: scale 1, exact
  cols = {k: np.asarray(v) for k, v in build.quantize(z, 'int8').items()}
  assert cols['teacher_topk_logits'].dtype == np.int8
  back = read.dequantize(cols)
  step = (z.max(1) - z.min(1)) / 254
  assert np.all(np.abs(back - z) <= step[:, None] / 2 + 1e-5)
  np.testing.assert_array_equal(back[3], z[3])


def test_topk_rows_match_numpy_and_keep_logsumexp():
  import jax.numpy as jnp
  rng = np.random.default_rng(2)
  logits = rng.normal(size=(6, 9)).astype(np.float32)

  from kdjax.models import ModelOutput

  def apply(params, state, x, train):
    return ModelOutput(jnp.asarray(x), {'h': jnp.asarray(x)[:, None, :] * 2}), state

  ident = lambda x, ids, epochs, seed: x
  infer = build.make_infer(apply, ident, seed=0, k=3, num_classes=9, dtype='float32',
                           features=[build.parse_feature('h:mean')])
  rows = infer((None, None), logits, np.arange(6), np.zeros(6, np.int32))
  want_idx = np.argsort(-logits, axis=1)[:, :3]
  np.testing.assert_array_equal(np.asarray(rows['teacher_topk_indices']), want_idx)
  np.testing.assert_allclose(rows['teacher_topk_logits'], np.take_along_axis(logits, want_idx, 1))
  lse = np.log(np.exp(logits.astype(np.float64)).sum(1))
  np.testing.assert_allclose(rows['teacher_logsumexp'], lse, rtol=1e-6)
  np.testing.assert_allclose(rows['feature.h'], logits * 2, rtol=1e-6)


def _columns(epochs=3, n=8, k=2, classes=4):
  rng = np.random.default_rng(3)
  return {'teacher_topk_logits': rng.normal(size=(epochs, n, k)).astype(np.float32),
          'teacher_topk_indices': rng.integers(0, classes, (epochs, n, k)).astype(np.int16),
          'teacher_logsumexp': rng.normal(size=(epochs, n)).astype(np.float32)}


def test_gather_rows_uses_epoch_mod_E_and_host_rows_agree():
  import jax.numpy as jnp
  cols = _columns()
  idx = np.array([5, 0, 7])
  rows = read.gather_rows(cols, 7, jnp.asarray(idx))   # epoch 7 -> cached epoch 1
  np.testing.assert_array_equal(rows['teacher_topk_logits'], cols['teacher_topk_logits'][1, idx])
  assert rows['teacher_topk_indices'].dtype == jnp.int32
  host = read.host_rows(cols, np.array([7, 7, 7]), idx)
  for key in rows:
    np.testing.assert_array_equal(np.asarray(rows[key]), host[key])


def test_dense_columns_scatter_back_to_class_order():
  z = np.random.default_rng(4).normal(size=(2, 3, 4)).astype(np.float32)
  perm = np.argsort(-z, axis=-1)
  cols = {'teacher_topk_logits': np.take_along_axis(z, perm, -1),
          'teacher_topk_indices': perm.astype(np.int16),
          'teacher_logsumexp': np.zeros((2, 3), np.float32)}
  dense = read.batch_columns(cols, {'teacher_logits'})['teacher_logits']
  np.testing.assert_array_equal(dense, z)


def test_store_checksums_detect_a_flipped_byte_and_a_missing_chunk(tmp_path):
  d = str(tmp_path)
  chunks = {}
  for i in range(3):
    name = store.chunk_name(0, i)
    store.write_chunk(d, name, {'a': np.arange(5, dtype=np.float32) + i})
    digest, nbytes = store.chunk_checksum(d, name)
    chunks[name] = {'sha256': digest, 'bytes': nbytes}
  manifest = {'chunks': chunks, 'content_checksum': store.content_checksum(chunks)}
  assert store.verify(d, manifest) == []
  f = os.path.join(d, 'chunks', 'e0000-c00001', 'a.npy')
  raw = bytearray(open(f, 'rb').read()); raw[-1] ^= 1; open(f, 'wb').write(bytes(raw))
  os.rename(os.path.join(d, 'chunks', 'e0000-c00002'), os.path.join(d, 'chunks', 'x'))
  problems = store.verify(d, manifest)
  assert len(problems) == 2
  assert 'e0000-c00001 is corrupt' in problems[0] and 'e0000-c00002 is missing' in problems[1]


def test_stale_temporaries_are_removed_only_for_own_chunks(tmp_path):
  d = str(tmp_path)
  os.makedirs(os.path.join(d, 'chunks', '.tmp-e0000-c00001-123'))
  os.makedirs(os.path.join(d, 'chunks', '.tmp-e0000-c00002-456'))
  store.remove_stale_temporaries(d, {'e0000-c00001'})
  assert os.listdir(os.path.join(d, 'chunks')) == ['.tmp-e0000-c00002-456']


def _run_config(**changes):
  c = ml_collections.ConfigDict({
      'seed': 0,
      'data': {'name': 'mnist1d/small', 'train_split': 'train',
               'augment': {'kind': 'signal', 'shift': 2, 'noise': 0.05}},
      'teacher': {'workdir': '', 'cache': '/c'}})
  for key, value in changes.items():
    node = c
    *path, last = key.split('.')
    for p in path:
      node = node[p]
    node[last] = value
  return c


MANIFEST = {
    'teacher': {'fingerprint': 'a' * 64}, 'num_classes': 10, 'k': 3, 'seed': 0, 'features': [],
    'dataset': {'name': 'mnist1d/small', 'split': 'train'},
    'augment': {'kind': 'signal', 'shift': 2, 'scale': 0.0, 'noise': 0.05, 'mode': 'roll'},
}


@pytest.mark.parametrize('changes,needs,fingerprint,message', [
    ({}, {'teacher_topk_logits'}, 'b' * 64, 'another teacher'),
    ({'seed': 1}, {'teacher_topk_logits'}, None, 'seed'),
    ({'data.augment': {'kind': 'signal', 'shift': 3, 'noise': 0.05}}, set(), None, 'augmentation'),
    ({'data.augment': {'kind': 'none'}}, set(), None, 'augmentation'),
    ({'data.train_split': 'train+transfer'}, set(), None, 'covers'),
    ({'data.name': 'uci_digits'}, set(), None, 'covers'),
    ({}, {'teacher_logits'}, None, 'top 3 of 10'),
    ({}, {'teacher_features'}, None, 'no teacher features'),
])
def test_stale_manifest_is_refused_in_one_line(changes, needs, fingerprint, message):
  with pytest.raises(UserError, match=message) as e:
    read.check_run(MANIFEST, _run_config(**changes), num_classes=10, needs=needs, cache_dir='/c',
                   teacher_fingerprint=fingerprint)
  assert '\n' not in str(e.value)


def test_matching_manifest_is_accepted():
  read.check_run(MANIFEST, _run_config(), num_classes=10, needs={'teacher_topk_logits'},
                 cache_dir='/c', teacher_fingerprint='a' * 64)
  full = dict(copy.deepcopy(MANIFEST), k=10)
  read.check_run(full, _run_config(), num_classes=10, needs={'teacher_logits'}, cache_dir='/c')


def test_dataset_hash_mismatch_is_refused():
  arrays = {'x': np.zeros((4, 3), np.float32), 'label': np.arange(4, dtype=np.int32),
            'id': np.arange(4, dtype=np.int32)}
  manifest = {'dataset': fp.dataset_fingerprint('d', 'train', arrays)}
  read.check_dataset(manifest, arrays, '/c')
  arrays['x'][2, 1] = 1.0
  with pytest.raises(UserError, match='other data'):
    read.check_dataset(manifest, arrays, '/c')
