import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
CONFIGS = os.path.join(ROOT, 'configs')
SMALL = 'mnist1d/small'   # the MNIST-1D builder config with a small transfer split


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One TFDS data dir for the engine tests (prepared once per worker; file-locked)."""
  path = os.environ.get('KDJAX_TEST_DATA_DIR') or str(tmp_path_factory.getbasetemp().parent / 'kdjax_data')
  os.makedirs(path, exist_ok=True)
  return path


def kdjax_cli(args, *, env=None, timeout=600, check=True):
  """Runs ``python -m kdjax ARGS`` in a subprocess; returns the CompletedProcess."""
  full_env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  out = subprocess.run([sys.executable, '-m', 'kdjax', *args], capture_output=True, text=True,
                       env=full_env, timeout=timeout, cwd=ROOT)
  if check and out.returncode != 0:
    raise AssertionError(f'kdjax {" ".join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}')
  return out


@pytest.fixture(scope='session')
def cli():
  """``cli(args, env=None, check=True)``: the kdjax command in a subprocess."""
  return kdjax_cli


@pytest.fixture(scope='session')
def paths():
  return {'root': ROOT, 'configs': CONFIGS, 'small': SMALL}


@pytest.fixture(scope='session')
def teacher_dir(tmp_path_factory, data_dir):
  """A tiny trained MNIST-1D teacher workdir."""
  wd = str(tmp_path_factory.mktemp('teacher'))
  kdjax_cli(['train', '--config', f'{CONFIGS}/mnist1d/teacher.py:tiny', '--workdir', wd,
             f'--config.data.name={SMALL}', f'--config.data.data_dir={data_dir}',
             '--config.num_steps=100', '--config.progress=false'])
  return wd
