"""Grain iterator state inside an orbax CheckpointManager."""

import numpy as np
import orbax.checkpoint as ocp

from kdjax import data as kd


def _iterator():
  records = [{'x': np.full((2,), i, np.float32), 'label': i % 3}
             for i in range(40)]
  return kd.make_train_iterator(records, batch_size=8, seed=5, shard_index=0,
                                shard_count=1)


def test_iterator_and_pytree_round_trip(tmp_path):
  it = _iterator()
  for _ in range(7):
    next(it)
  state = {'w': np.arange(6, dtype=np.float32).reshape(2, 3),
           'step': np.array(7, np.int32)}
  with ocp.CheckpointManager(tmp_path) as mngr:
    mngr.save(7, args=ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=kd.iterator_save_args(it)))
    mngr.wait_until_finished()
  expected = [next(it)['id'] for _ in range(3)]

  fresh = _iterator()
  with ocp.CheckpointManager(tmp_path) as mngr:
    assert mngr.latest_step() == 7
    restored = mngr.restore(7, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(state),
        data=kd.iterator_restore_args(fresh)))
  np.testing.assert_array_equal(restored['state']['w'], state['w'])
  assert int(restored['state']['step']) == 7
  assert restored['data'] is fresh
  got = [next(fresh)['id'] for _ in range(3)]
  for want, have in zip(expected, got):
    np.testing.assert_array_equal(want, have)
  # A fresh, unrestored iterator starts elsewhere.
  assert not np.array_equal(next(_iterator())['id'], expected[0])
