"""Fixtures for the teacher-cache tests: a tiny MNIST-1D teacher and a cache built from it."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
CONFIGS = os.path.join(ROOT, 'configs')
SMALL = 'mnist1d/small'
AUGMENT = "{'kind': 'signal', 'shift': 2, 'noise': 0.05}"


def run_cli(args, *, env=None, timeout=600, check=True):
  """``python -m kdjax ARGS`` in a subprocess (CPU); returns the CompletedProcess."""
  full_env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  out = subprocess.run([sys.executable, '-m', 'kdjax', *args], capture_output=True, text=True,
                       env=full_env, timeout=timeout, cwd=ROOT)
  if check and out.returncode != 0:
    raise AssertionError(f'kdjax {" ".join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}')
  return out


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  path = os.environ.get('KDJAX_TEST_DATA_DIR') or str(tmp_path_factory.getbasetemp().parent / 'kdjax_data')
  os.makedirs(path, exist_ok=True)
  return path


@pytest.fixture(scope='session')
def distill_args(data_dir):
  """Common overrides of the tiny distill config: small data, signal augmentation."""
  return ['--config', f'{CONFIGS}/mnist1d/kd.py:tiny', f'--config.data.name={SMALL}',
          f'--config.data.data_dir={data_dir}', f'--config.data.augment={AUGMENT}',
          '--config.progress=false']


def _train_teacher(path, data_dir, steps):
  run_cli(['train', '--config', f'{CONFIGS}/mnist1d/teacher.py:tiny', '--workdir', path,
           f'--config.data.name={SMALL}', f'--config.data.data_dir={data_dir}',
           f'--config.num_steps={steps}', '--config.progress=false'])
  return path


@pytest.fixture(scope='session')
def teacher_dir(tmp_path_factory, data_dir):
  return _train_teacher(str(tmp_path_factory.mktemp('teacher')), data_dir, 100)


@pytest.fixture(scope='session')
def other_teacher_dir(tmp_path_factory, data_dir):
  return _train_teacher(str(tmp_path_factory.mktemp('other_teacher')), data_dir, 50)


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory, teacher_dir, distill_args):
  """float32, k = all classes, 4 augmentation epochs (the tiny run's 100 steps use 4)."""
  path = str(tmp_path_factory.mktemp('cache') / 'c')
  run_cli(['cache', 'build', *distill_args, f'--config.teacher.workdir={teacher_dir}',
           '--workdir', path, '--epochs', '4', '--chunk-size', '1024'])
  return path


@pytest.fixture(scope='session')
def cli():
  """``cli(args, env=None, check=True)``: the kdjax command in a subprocess."""
  return run_cli


@pytest.fixture(scope='session')
def root():
  return ROOT
