"""kdjax's TFDS builders: contents, sizes, determinism, no TensorFlow."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

from kdjax import data as kd
from kdjax.data.builders import mnist1d as mnist1d_builder
from kdjax.data import preprocessing
from kdjax.data.builders import uci_digits as digits_builder

MNIST1D = 'mnist1d/small'
REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


_CACHE = {}


def _read_all(source, key):
  """One feature of every record of ``source`` (read once per source)."""
  if id(source) not in _CACHE:
    records = source.__getitems__(list(range(len(source))))
    stacked = {k: np.stack([np.asarray(r[k]) for r in records])
               for k in records[0]}
    _CACHE[id(source)] = (source, stacked)  # keeps `source` (and its id) alive
  return _CACHE[id(source)][1][key]


def test_mnist1d_split_sizes_and_spec(built):
  spec = kd.dataset_spec(MNIST1D, data_dir=built)
  assert spec.splits == {'train': 4000, 'test': 1000, 'transfer': 4000}
  assert spec.input_shape == (40, 1)
  assert spec.num_classes == 10


def test_mnist1d_train_test_equal_standard_dataset(built):
  from mnist1d.data import get_dataset_args, make_dataset
  ref = make_dataset(get_dataset_args())
  for split, xk, yk in (('train', 'x', 'y'), ('test', 'x_test', 'y_test')):
    src = kd.load_source(MNIST1D, split, data_dir=built)
    rec = src[0]
    assert rec['signal'].dtype == np.float32 and rec['signal'].shape == (40,)
    np.testing.assert_array_equal(_read_all(src, 'signal'),
                                  ref[xk].astype(np.float32))
    np.testing.assert_array_equal(_read_all(src, 'label'), ref[yk])
    assert _read_all(src, 'labeled').all()


def test_mnist1d_transfer_is_unlabeled_new_draw(built):
  from mnist1d.data import get_dataset_args, make_dataset
  args = get_dataset_args()
  args.num_samples, args.seed, args.train_split = 1000, 10_000, 1.0
  chunk0 = make_dataset(args)['x'].astype(np.float32)
  src = kd.load_source(MNIST1D, 'transfer', data_dir=built)
  signals = _read_all(src, 'signal')
  np.testing.assert_array_equal(signals[:1000], chunk0)
  assert not _read_all(src, 'labeled').any()
  # Chunks use different seeds: no chunk repeats another.
  assert not np.allclose(signals[:1000], signals[1000:2000])
  arrays = kd.load_arrays(MNIST1D, 'transfer', data_dir=built)
  assert (arrays['label'] == -1).all()
  np.testing.assert_array_equal(arrays['id'], np.arange(4000))
  # Not a copy of the labeled data.
  train = kd.load_arrays(MNIST1D, 'train', data_dir=built)
  assert not np.isin(signals[:, 0], train['x'][:, 0, 0]).any()


def test_mnist1d_load_arrays_standard_example(built):
  arrays = kd.load_arrays(MNIST1D, 'test', data_dir=built)
  assert arrays['x'].shape == (1000, 40, 1) and arrays['x'].dtype == np.float32
  assert arrays['label'].dtype == np.int32 and arrays['id'].dtype == np.int32
  assert set(np.unique(arrays['label'])) == set(range(10))
  src = kd.load_source(MNIST1D, 'test', data_dir=built)
  np.testing.assert_array_equal(arrays['x'][17, :, 0], src[17]['signal'])


def test_digits_contents_match_sklearn(built):
  from sklearn.datasets import load_digits
  digits = load_digits()
  spec = kd.dataset_spec('uci_digits', data_dir=built)
  assert spec.splits == {'train': 1437, 'test': 360}
  assert spec.input_shape == (8, 8, 1) and spec.num_classes == 10
  seen = []
  for split in ('train', 'test'):
    src = kd.load_source('uci_digits', split, data_dir=built)
    images = _read_all(src, 'image')
    labels = _read_all(src, 'label')
    assert images.dtype == np.uint8 and images.shape[1:] == (8, 8, 1)
    assert images.max() == 16
    # Every record is a distinct sklearn row with the same label.
    flat = digits.images.reshape(len(digits.images), -1)
    for img, lab in zip(images[::37], labels[::37]):
      rows = np.flatnonzero((flat == img.reshape(-1)).all(axis=1))
      assert len(rows) >= 1 and (digits.target[rows] == lab).any()
    seen.append(labels)
  train_counts = np.bincount(seen[0], minlength=10)
  test_counts = np.bincount(seen[1], minlength=10)
  np.testing.assert_array_equal(train_counts + test_counts,
                                np.bincount(digits.target))
  # Stratified: every class holds 20% +- one example of its rows in test.
  assert np.all(np.abs(test_counts - 0.2 * np.bincount(digits.target)) <= 1)


def test_digits_split_rows_is_a_seeded_partition():
  labels = np.repeat(np.arange(3), [10, 7, 5])
  rows = digits_builder.split_rows(labels, num_test=6, seed=1)
  assert len(rows['test']) == 6
  np.testing.assert_array_equal(
      np.sort(np.concatenate([rows['train'], rows['test']])), np.arange(22))
  # Quotas 60/22*... = [2.73, 1.91, 1.36] -> floors [2, 1, 1] + largest
  # remainders to classes 1 then 0: [3, 2, 1].
  np.testing.assert_array_equal(np.bincount(labels[rows['test']]), [3, 2, 1])
  again = digits_builder.split_rows(labels, num_test=6, seed=1)
  np.testing.assert_array_equal(rows['test'], again['test'])
  other = digits_builder.split_rows(labels, num_test=6, seed=2)
  assert not np.array_equal(rows['test'], other['test'])


def test_digits_normalization_constants_match_train_split(built):
  src = kd.load_source('uci_digits', 'train', data_dir=built)
  scaled = _read_all(src, 'image') / 16.0
  assert abs(scaled.mean() - preprocessing.DIGITS_MEAN[0]) < 1e-3
  assert abs(scaled.std() - preprocessing.DIGITS_STD[0]) < 1e-3
  arrays = kd.load_arrays('uci_digits', 'train', data_dir=built)
  assert abs(arrays['x'].mean()) < 1e-3 and abs(arrays['x'].std() - 1) < 1e-3


def test_two_builds_are_identical(built, tmp_path):
  # A second, independent build of both data sets gives byte-identical records.
  from kdjax.data.builders import Mnist1d
  first = kd.load_arrays('uci_digits', 'test', data_dir=built)
  second = kd.load_arrays('uci_digits', 'test', data_dir=tmp_path)
  for key in first:
    np.testing.assert_array_equal(first[key], second[key])
  # mnist1d: a fresh build of the transfer generator reproduces the stored split.
  src = kd.load_source(MNIST1D, 'transfer', data_dir=built)
  xs, ys = mnist1d_builder.transfer_chunk(3)
  np.testing.assert_array_equal(_read_all(src, 'signal')[3000:4000], xs)
  np.testing.assert_array_equal(_read_all(src, 'label')[3000:4000], ys)
  assert Mnist1d.VERSION and Mnist1d.RELEASE_NOTES


def test_transfer_size_must_be_whole_chunks(tmp_path):
  from kdjax.data.builders import Mnist1d
  config = mnist1d_builder.Mnist1dConfig(name='odd', transfer_size=1500)
  builder = Mnist1d(config=config, data_dir=str(tmp_path),
                    file_format='array_record')
  with pytest.raises(ValueError, match='multiple of 1000'):
    builder.download_and_prepare()


def test_unknown_dataset_and_split_raise_data_error(built):
  with pytest.raises(kd.DataError, match='mnist1d, uci_digits') as err:
    kd.load_source('no_such_dataset_kdjax', 'train', data_dir=built)
  assert '\n' not in str(err.value) and 'internet' in str(err.value)
  assert isinstance(err.value, ValueError)
  with pytest.raises(kd.DataError, match='no split'):
    kd.load_source('uci_digits', 'validation', data_dir=built)


def test_no_tensorflow_and_concurrent_preparation(tmp_path):
  # Two fresh processes prepare uci_digits into the same empty directory at the
  # same time; both must succeed, read the same data and never import TF.
  code = textwrap.dedent(f"""
      import json, sys
      sys.path.insert(0, {REPO!r})
      from kdjax import data as kd
      src = kd.load_source('uci_digits', 'test', data_dir={str(tmp_path)!r})
      arrays = kd.load_arrays('uci_digits', 'test', data_dir={str(tmp_path)!r})
      print(json.dumps({{'n': len(src), 'sum': float(arrays['x'].sum()),
                        'tf': 'tensorflow' in sys.modules}}))
  """)
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  procs = [subprocess.Popen([sys.executable, '-c', code], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True) for _ in range(2)]
  results = []
  for p in procs:
    out, err = p.communicate(timeout=120)
    assert p.returncode == 0, err[-2000:]
    results.append(json.loads(out.strip().splitlines()[-1]))
  assert results[0] == results[1]
  assert results[0]['n'] == 360 and results[0]['tf'] is False
