"""Preprocessing to standard examples and the TFDS catalog code path (mocked)."""

import os

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax import data as kd
from kdjax.data import preprocessing


def test_default_data_dir(monkeypatch):
  monkeypatch.setenv('KDJAX_DATA_DIR', '/some/where')
  assert kd.default_data_dir() == '/some/where'
  monkeypatch.delenv('KDJAX_DATA_DIR')
  assert kd.default_data_dir() == os.path.join(
      os.path.expanduser('~'), '.cache', 'kdjax', 'tensorflow_datasets')


def test_preprocess_cifar_hand_computed():
  image = np.zeros((32, 32, 3), np.uint8)
  image[0, 0] = (255, 0, 51)
  out = kd.preprocess('cifar10', {'image': image, 'label': np.int64(7)}, 12)
  mean = np.array([0.4914, 0.4822, 0.4465])
  std = np.array([0.2470, 0.2435, 0.2616])
  np.testing.assert_allclose(out['x'][0, 0], (np.array([1.0, 0.0, 0.2]) - mean)
                             / std, rtol=1e-6)
  np.testing.assert_allclose(out['x'][1, 1], -mean / std, rtol=1e-6)
  assert out['x'].dtype == np.float32 and out['x'].shape == (32, 32, 3)
  assert out['label'] == 7 and out['label'].dtype == np.int32
  assert out['id'] == 12 and out['id'].dtype == np.int32


def test_preprocess_mnist1d_keeps_signal_and_hides_unlabeled():
  signal = np.linspace(-1, 1, 40, dtype=np.float32)[None].repeat(3, 0)
  raw = {'signal': signal, 'label': np.array([4, 5, 6]),
         'labeled': np.array([True, False, True])}
  out = kd.preprocess('mnist1d/small', raw, np.arange(3))
  np.testing.assert_array_equal(out['x'][..., 0], signal)
  assert out['x'].shape == (3, 40, 1)
  assert out['label'].tolist() == [4, -1, 6]


def test_preprocess_without_label_and_unknown_name():
  out = kd.preprocess(None, {'x': np.ones((2, 3))}, np.array([0, 1]))
  assert out['label'].tolist() == [-1, -1] and out['x'].dtype == np.float32
  with pytest.raises(kd.DataError, match='No preprocessing recipe'):
    kd.preprocess('some_text_dataset', {'text': np.array(b'a')}, 0)
  # A catalog image data set without constants: [0, 1] scaling only.
  out = kd.preprocess('svhn_cropped', {'image': np.full((2, 2, 3), 255,
                                                        np.uint8)}, 0)
  np.testing.assert_array_equal(out['x'], np.ones((2, 2, 3), np.float32))
  assert preprocessing.base_name('mnist1d/small:1.0.0') == 'mnist1d'


def test_cifar10_catalog_path_mocked(tmp_path, monkeypatch):
  # tfds 4.9.10's mock sets `__getitems__` on a MagicMock, where it is not a
  # bound method; read mocked records one by one instead.
  from tensorflow_datasets.core.data_sources import base
  monkeypatch.setattr(base.BaseDataSource, '__getitems__',
                      lambda self, keys: [self[k] for k in keys])
  with tfds.testing.mock_data(num_examples=10):
    src = kd.load_source('cifar10', 'train', data_dir=tmp_path)
    assert len(src) == 10
    assert src[0]['image'].shape == (32, 32, 3)
    arrays = kd.load_arrays('cifar10', 'train', data_dir=tmp_path)
    assert arrays['x'].shape == (10, 32, 32, 3)
    assert arrays['x'].dtype == np.float32
    np.testing.assert_allclose(
        arrays['x'][3],
        (src[3]['image'] / 255.0 - preprocessing.CIFAR10_MEAN)
        / preprocessing.CIFAR10_STD, rtol=1e-5, atol=1e-6)
    it = kd.make_train_iterator('cifar10', batch_size=4, seed=0,
                                data_dir=tmp_path, shard_index=0,
                                shard_count=1)
    batch = next(it)
    assert batch['x'].shape == (4, 32, 32, 3)
    assert batch['label'].dtype == np.int32
    assert ((batch['label'] >= 0) & (batch['label'] < 10)).all()
