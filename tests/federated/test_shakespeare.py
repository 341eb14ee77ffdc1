"""Natural (role) partition and `kdjax fed run` on the tiny Shakespeare config."""

import json
import os

import numpy as np
import pytest

from kdjax import cli
from kdjax.errors import UserError
from kdjax.federated import packing
from kdjax.federated import partition

CONFIG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'fed',
                      'shakespeare_fedavg.py')


def _covers_once(p, n_expected):
  allidx = np.concatenate(list(p.train) + list(p.test))
  assert len(allidx) == len(set(allidx.tolist())) == n_expected


def test_natural_positional_split_and_min_size():
  ids = np.array([4, 4, 1, 4, 1, 9, 4, 4, 1, 1, 1, 4, 4, 4, 4, 4])
  #    id 1: rows 2, 4, 8, 9, 10 (5 -> 4 train, 1 test); id 9: row 5 (dropped, min_size 2)
  #    id 4: rows 0 1 3 6 7 11 12 13 14 15 (10 -> 8 train, last 2 test)
  p = partition.natural(ids, min_size=2, test_fraction=0.2, names={1: 'a/X', 4: 'a/Y'})
  assert [t.tolist() for t in p.train] == [[2, 4, 8, 9], [0, 1, 3, 6, 7, 11, 12, 13]]
  assert [t.tolist() for t in p.test] == [[10], [14, 15]]
  assert p.client_names == ('a/X', 'a/Y') and p.method == 'natural'
  _covers_once(p, 15)


def test_natural_with_the_datasets_test_split():
  ids = np.array([0, 0, 0, 1, 1, 2, 0, 1, 2])
  test = np.array([0, 0, 0, 0, 0, 0, 1, 1, 1], bool)
  p = partition.natural(ids, test_mask=test, min_size=2)
  assert [t.tolist() for t in p.train] == [[0, 1, 2], [3, 4], [5]]
  assert [t.tolist() for t in p.test] == [[6], [7], [8]]
  # A client with only test examples is dropped (nothing to train on).
  p = partition.natural(ids, test_mask=np.array([0, 0, 0, 0, 0, 1, 1, 1, 1], bool), min_size=1)
  assert [t.tolist() for t in p.train] == [[0, 1, 2], [3, 4]]


def test_natural_max_clients_and_max_size_are_seeded_subsets():
  rng = np.random.default_rng(0)
  ids = rng.integers(0, 30, 600)
  full = partition.natural(ids, min_size=5)
  a = partition.natural(ids, min_size=5, max_clients=7, max_size=10, seed=3)
  b = partition.natural(ids, min_size=5, max_clients=7, max_size=10, seed=3)
  c = partition.natural(ids, min_size=5, max_clients=7, max_size=10, seed=4)
  assert a.num_clients == 7 and all(len(t) <= 10 for t in a.train)
  for x, y in zip(a.train, b.train):
    np.testing.assert_array_equal(x, y)
  assert any(not np.array_equal(x, y) for x, y in zip(a.train, c.train))
  full_train = {int(ids[t[0]]): set(t.tolist()) for t in full.train}
  full_test = {int(ids[t[0]]): t.tolist() for t in full.test}
  for tr, te in zip(a.train, a.test):
    cid = int(ids[tr[0]])
    assert set(tr.tolist()) <= full_train[cid] and np.all(ids[tr] == cid)
    assert len(tr) == min(10, len(full_train[cid]))
    assert te.tolist() == full_test[cid]     # the test split is never capped


def test_natural_errors():
  with pytest.raises(UserError, match='no client'):
    partition.natural(np.array([0, 1, 2]), min_size=2)
  with pytest.raises(UserError, match='1-D integer'):
    partition.natural(np.zeros((2, 2), int))
  with pytest.raises(UserError, match='needs per-example client ids'):
    partition.make_partition(np.zeros(4, int), 2, 'natural')
  with pytest.raises(UserError, match='at most 2'):
    partition.make_partition(np.zeros(6, int), 3, 'natural',
                             client_ids=np.array([0, 0, 0, 1, 1, 1]), min_size=2)


def test_make_partition_natural_and_stats_table():
  labels = np.array([1, 2, 3, 1, 2, 3, 4, 5])
  ids = np.array([0, 0, 0, 0, 1, 1, 1, 1])
  p = partition.make_partition(labels, 2, 'natural', client_ids=ids, min_size=2,
                               names=['p/A', 'p/B'], alpha=0.5, test_fraction=0.25)
  assert p.num_clients == 2 and p.num_classes == 6
  table = partition.format_stats(p, labels)
  assert '(p/A)' in table and '(p/B)' in table
  counts = partition.class_counts(p, labels, split='all')
  np.testing.assert_array_equal(counts, [[0, 2, 1, 1, 0, 0], [0, 0, 1, 1, 1, 1]])


def test_packing_keeps_integer_inputs():
  x = np.arange(12, dtype=np.int32).reshape(6, 2)
  d = packing.pack(x, np.arange(6), [np.array([0, 1]), np.array([5])])
  assert d.x.dtype == np.int32
  np.testing.assert_array_equal(d.x[1, 0], [10, 11])


def test_fed_run_tiny_shakespeare_end_to_end(tmp_path, monkeypatch, capsys):
  monkeypatch.setenv('KDJAX_DATA_DIR', str(tmp_path / 'tfds'))
  workdir = str(tmp_path / 'run')
  assert cli.main(['fed', 'run', '--config', CONFIG + ':tiny', '--workdir', workdir,
                   '--no-progress']) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed['round'] == 4
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(l) for l in f]
  assert [r['round'] for r in rows] == [1, 2, 3, 4]
  assert all(r['num_reported'] == 4 for r in rows)
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  assert summary['partition']['method'] == 'natural'
  assert summary['partition']['num_clients'] == 8
  assert summary['partition']['size_mean'] <= 30 + summary['partition']['num_test_examples']
  assert 0.0 <= summary['global_accuracy'] <= 1.0
  with open(os.path.join(workdir, 'partition.txt')) as f:
    table = f.read()
  assert 'hamlet/' in table or 'midsummer_nights_dream/' in table
  # num_clients beyond the roles that meet min_size: one line, exit code 2.
  assert cli.main(['fed', 'run', '--config', CONFIG + ':tiny', '--workdir',
                   str(tmp_path / 'bad'), '--no-progress', '--config.num_clients=5000']) == 2
  assert 'at most' in capsys.readouterr().err
