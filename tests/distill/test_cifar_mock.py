"""The CIFAR-10 configs through `tfds.data_source('cifar10')`, on TFDS mock data.

The same code path reads the real catalog data set on a machine with internet.
Exercises the grain (stream) feed, its checkpointed iterator state, and resume.
"""

import json
import os

import pytest
import tensorflow_datasets as tfds

from kdjax.config import load_config
from kdjax.distill.train import train_and_evaluate

pytestmark = pytest.mark.slow


@pytest.fixture
def mock_cifar(monkeypatch):
  # tfds 4.9.10's mock sets `__getitems__` on a MagicMock, where it is not a bound
  # method; read mocked records one by one instead.
  from tensorflow_datasets.core.data_sources import base
  monkeypatch.setattr(base.BaseDataSource, '__getitems__', lambda self, keys: [self[k] for k in keys])
  with tfds.testing.mock_data(num_examples=48):
    yield


def _config(paths, name, tmp_path, **overrides):
  ov = [('data.data_dir', str(tmp_path / 'data')), ('data.feed', 'stream'), ('progress', 'false')]
  ov += [(k, str(v)) for k, v in overrides.items()]
  return load_config(f"{paths['configs']}/cifar10/{name}:tiny", ov)


def test_cifar_teacher_then_student(mock_cifar, paths, tmp_path):
  teacher = str(tmp_path / 'teacher')
  s = train_and_evaluate(_config(paths, 'resnet32x4.py', tmp_path), teacher)
  assert s['feed'] == 'stream' and s['step'] == 4
  kd = _config(paths, 'resnet8x4_kd.py', tmp_path)
  kd.teacher.workdir = teacher
  s = train_and_evaluate(kd, str(tmp_path / 'student'))
  assert s['step'] == 4 and s['teacher_step'] == 4 and 0 <= s['eval_accuracy'] <= 1


def test_stream_resume_is_exact(mock_cifar, paths, tmp_path):
  ref = train_and_evaluate(_config(paths, 'resnet32x4.py', tmp_path, num_steps=6), str(tmp_path / 'ref'))
  wd = str(tmp_path / 'split')
  first = train_and_evaluate(_config(paths, 'resnet32x4.py', tmp_path, num_steps=2), wd)
  assert first['step'] == 2
  second = train_and_evaluate(_config(paths, 'resnet32x4.py', tmp_path, num_steps=6), wd)
  assert second['resumed_from'] == 2
  assert second['train_loss'] == ref['train_loss']
  assert second['eval_accuracy'] == ref['eval_accuracy']
  saved = json.load(open(os.path.join(wd, 'checkpoints', '6', 'data', 'metadata')))
  assert saved['feed'] == 'stream' and saved['iterator'] is not None
