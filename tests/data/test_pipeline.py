"""The grain pipelines: epochs, seeds, sharding, padding, resumable state."""

import numpy as np
import pytest

from kdjax import data as kd

MNIST1D = 'mnist1d/small'


def _records(n):
  return [{'x': np.full((3,), i, np.float32), 'label': i % 5} for i in range(n)]


def _take(it, k):
  return [next(it) for _ in range(k)]


def _train(source, **kw):
  kw = dict(dict(batch_size=4, seed=0, shard_index=0, shard_count=1), **kw)
  return kd.make_train_iterator(source, **kw)


def test_epochs_with_drop_remainder():
  batches = _take(_train(_records(10)), 6)  # 2 batches (8 examples) per epoch
  for b in batches:
    assert b['x'].shape == (4, 3) and b['x'].dtype == np.float32
    assert b['id'].dtype == np.int32 and b['epoch'].dtype == np.int32
    assert b['mask'].all()
    np.testing.assert_array_equal(b['x'][:, 0], b['id'])  # record i has x = i
    np.testing.assert_array_equal(b['label'], b['id'] % 5)
  assert [b['epoch'].tolist() for b in batches] == [[e] * 4 for e in
                                                    (0, 0, 1, 1, 2, 2)]
  epochs = [np.concatenate([b['id'] for b in batches[2 * e:2 * e + 2]])
            for e in range(3)]
  for ids in epochs:
    assert len(set(ids.tolist())) == 8 and set(ids) <= set(range(10))
  assert not np.array_equal(epochs[0], epochs[1])  # reshuffled every epoch


def test_epochs_without_drop_remainder_straddle():
  batches = _take(_train(_records(10), drop_remainder=False), 5)
  ids = np.concatenate([b['id'] for b in batches])
  epochs = np.concatenate([b['epoch'] for b in batches])
  np.testing.assert_array_equal(epochs, [0] * 10 + [1] * 10)
  assert sorted(ids[:10]) == list(range(10))
  assert sorted(ids[10:]) == list(range(10))
  assert batches[2]['epoch'].tolist() == [0, 0, 1, 1]


def test_seed_determines_the_stream():
  a = _take(_train(_records(50), seed=3), 4)
  b = _take(_train(_records(50), seed=3), 4)
  c = _take(_train(_records(50), seed=4), 4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['id'], y['id'])
  assert not all(np.array_equal(x['id'], y['id']) for x, y in zip(a, c))


def test_state_restores_the_exact_continuation(built):
  kw = dict(batch_size=32, seed=7, data_dir=built)
  it = _train('uci_digits', **kw)
  _take(it, 5)
  state = it.get_state()
  expected = _take(it, 3)
  fresh = _train('uci_digits', **kw)
  fresh.set_state(state)
  for want, got in zip(expected, _take(fresh, 3)):
    for key in want:
      np.testing.assert_array_equal(want[key], got[key])
  # And the continuation is not simply the first batches again.
  first = _take(_train('uci_digits', **kw), 1)[0]
  assert not np.array_equal(first['id'], expected[0]['id'])


def test_process_shards_split_every_global_batch(built):
  kw = dict(batch_size=64, seed=1, data_dir=built, split='test')
  whole = _take(_train(MNIST1D, **kw), 20)  # crosses an epoch boundary
  parts = [_take(_train(MNIST1D, shard_index=p, shard_count=2, **kw), 20)
           for p in range(2)]
  for g, b0, b1 in zip(whole, *parts):
    assert b0['x'].shape == (32, 40, 1)
    assert not set(b0['id'].tolist()) & set(b1['id'].tolist())
    for key in g:
      np.testing.assert_array_equal(np.concatenate([b0[key], b1[key]]), g[key])


def test_batches_hold_preprocessed_records(built):
  arrays = kd.load_arrays('uci_digits', 'train', data_dir=built)
  for b in _take(_train('uci_digits', batch_size=16, seed=2, data_dir=built), 3):
    np.testing.assert_array_equal(b['x'], arrays['x'][b['id']])
    np.testing.assert_array_equal(b['label'], arrays['label'][b['id']])


def test_unlabeled_transfer_split_gives_minus_one(built):
  b = next(_train(MNIST1D, split='transfer', batch_size=16, data_dir=built))
  assert (b['label'] == -1).all()
  assert b['x'].shape == (16, 40, 1)


@pytest.mark.parametrize('shard_count', [1, 2])
def test_eval_iterator_pads_and_masks(shard_count):
  per = 4 // shard_count
  shards = [list(kd.make_eval_iterator(_records(10), batch_size=4,
                                       shard_index=p, shard_count=shard_count))
            for p in range(shard_count)]
  assert all(len(s) == 3 for s in shards)
  ids, mask = [], []
  for k in range(3):
    for s in shards:
      b = s[k]
      assert b['x'].shape == (per, 3) and b['mask'].shape == (per,)
      assert (b['epoch'] == 0).all()
      np.testing.assert_array_equal(b['label'] == -1, ~b['mask'])
      assert (b['x'][~b['mask']] == 0).all()
      ids.append(b['id'])
      mask.append(b['mask'])
  ids, mask = np.concatenate(ids), np.concatenate(mask)
  np.testing.assert_array_equal(ids[mask], np.arange(10))  # in record order
  assert mask.sum() == 10 and (ids[~mask] == -1).all()


def test_eval_iterator_state():
  it = kd.make_eval_iterator(_records(30), batch_size=4, shard_index=0,
                             shard_count=1)
  _take(it, 2)
  state = it.get_state()
  rest = [b['id'].tolist() for b in it]
  fresh = kd.make_eval_iterator(_records(30), batch_size=4, shard_index=0,
                                shard_count=1)
  fresh.set_state(state)
  assert [b['id'].tolist() for b in fresh] == rest
  assert rest[0] == [8, 9, 10, 11] and len(rest) == 6


def test_user_errors():
  with pytest.raises(kd.DataError, match='multiple of the number of processes'):
    _train(_records(10), batch_size=5, shard_count=2)
  with pytest.raises(kd.DataError, match='fewer than one global batch'):
    _train(_records(3))
  with pytest.raises(kd.DataError, match='shard_index'):
    _train(_records(10), shard_index=2, shard_count=2)
  assert kd.steps_per_epoch(10, 4) == 2
  assert kd.steps_per_epoch(10, 4, drop_remainder=False) == 3
