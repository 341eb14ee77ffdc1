"""Fixtures for the teacher-cache tests: distill arguments and a cache built from the
session's tiny teacher (``tests/conftest.py``)."""

import pytest

AUGMENT = "{'kind': 'signal', 'shift': 2, 'noise': 0.05}"


@pytest.fixture(scope='session')
def distill_args(data_dir, paths):
  """Common overrides of the tiny distill config: small data, signal augmentation."""
  return ['--config', f"{paths['configs']}/mnist1d/kd.py:tiny",
          f"--config.data.name={paths['small']}", f'--config.data.data_dir={data_dir}',
          f'--config.data.augment={AUGMENT}', '--config.progress=false']


@pytest.fixture(scope='session')
def cache_dir(tmp_path_factory, teacher_dir, distill_args, cli):
  """float32, k = all classes, 4 augmentation epochs (the tiny run's 100 steps use 4)."""
  path = str(tmp_path_factory.mktemp('cache') / 'c')
  cli(['cache', 'build', *distill_args, f'--config.teacher.workdir={teacher_dir}',
       '--workdir', path, '--epochs', '4', '--chunk-size', '1024'])
  return path
