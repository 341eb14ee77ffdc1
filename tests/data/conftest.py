"""Shared fixtures: kdjax's builders prepared once per test session.

Under pytest-xdist every worker asks for the same data directory (the session's
shared temporary root); ``load_source``'s file lock makes one worker build while
the other waits, which also exercises the concurrent-preparation path.
"""

import os

import pytest

MNIST1D = 'mnist1d/small'


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  root = tmp_path_factory.getbasetemp()
  if os.environ.get('PYTEST_XDIST_WORKER'):
    root = root.parent  # shared by all workers of this session
  path = root / 'kdjax_tfds'
  path.mkdir(exist_ok=True)
  return str(path)


@pytest.fixture(scope='session')
def built(data_dir):
  """Prepares mnist1d/small and uci_digits; returns the data directory."""
  from kdjax.data import load_source
  for name in (MNIST1D, 'uci_digits'):
    load_source(name, 'train', data_dir=data_dir)
  return data_dir
