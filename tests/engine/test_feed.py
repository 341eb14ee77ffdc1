"""Feeds: the device source's batches, the teacher inside the call or one call ahead
(``TeacherAhead``), and cached entries, all giving the student the same batches."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import models
from kdjax.data import make_augment
from kdjax.engine import DeviceSource
from kdjax.engine import Feed
from kdjax.engine import StreamSource
from kdjax.engine import TeacherAhead
from kdjax.engine import TrainCalls
from kdjax.engine import init_train_state
from kdjax.engine import make_train_step
from kdjax.engine.feed import epoch_permutations
from kdjax.losses import build_objective
from kdjax.parallel import make_mesh
from kdjax.teacher import Teacher
from kdjax.teacher import outputs as teacher_outputs

N, BATCH, CLASSES = 96, 16, 10
HINT = {'kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1},
        'hint': {'loss': 'fitnet', 'student': 'stage2', 'teacher': 'stage3', 'weight': 0.5}}
AUGMENT = make_augment({'kind': 'signal', 'shift': 3, 'scale': 0.1, 'noise': 0.05})


@pytest.fixture(scope='module')
def parts():
  rng = np.random.default_rng(0)
  data = {'x': rng.normal(size=(N, 40, 1)).astype(np.float32),
          'label': rng.integers(0, CLASSES, N).astype(np.int32), 'id': np.arange(N, dtype=np.int32)}
  t_apply, t_params, t_state = models.functional(models.create(
      'cnn1d', num_classes=CLASSES, input_shape=(40, 1), seed=1, channels=(8, 8, 8)))
  s_apply, s_params, s_state = models.functional(models.create(
      'mlp', num_classes=CLASSES, input_shape=(40, 1), seed=2, hidden=(16, 16)))
  objective = build_objective(HINT)
  t_out, _ = t_apply(t_params, t_state, data['x'][:2])
  s_out, _ = s_apply(s_params, s_state, data['x'][:2])
  lp, ls = objective.init(jax.random.key(3), {
      'student_features': s_out.features, 'teacher_features': t_out.features,
      'student_logits': s_out.logits, 'teacher_logits': t_out.logits})
  tx = optax.adam(1e-3)
  state = init_train_state(s_params, s_state, tx, rng=jax.random.key(0), loss_params=lp,
                           loss_state=ls)
  mesh = make_mesh([('data', -1)])
  teacher = Teacher(t_apply, (t_params, t_state), CLASSES, None, 0, '')
  return dict(data=data, state=state, step=make_train_step(s_apply, objective, tx), mesh=mesh,
              teacher=teacher, needs=objective.needs)


def _feed(parts, *, ahead_of=None):
  source = DeviceSource(parts['data'], batch_size=BATCH, seed=0, mesh=parts['mesh'])
  if ahead_of is None:
    return Feed(source, augment=AUGMENT, seed=0, teacher=parts['teacher'], needs=parts['needs'])
  ahead = TeacherAhead(parts['data'], parts['teacher'], teacher_mesh=parts['mesh'],
                       student_mesh=parts['mesh'], batch_size=BATCH, seed=0, augment=AUGMENT,
                       needs=parts['needs'], next_chunk=ahead_of)
  return Feed(source, augment=AUGMENT, seed=0, needs=parts['needs'], ahead=ahead)


def _run(parts, feed, calls=(5, 4)):
  train = TrainCalls(parts['step'], feed, state_shardings=None, mesh=parts['mesh'])
  state, step, history = jax.tree.map(jnp.copy, parts['state']), 0, []   # the call donates it
  for n in calls:
    state, metrics = train(state, feed.inputs(step, n), n)
    step += n
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def _chunks(calls):
  starts = np.cumsum((0,) + tuple(calls))
  table = {int(s): (int(s), int(n)) for s, n in zip(starts[:-1], calls)}
  return table.get


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_teacher_ahead_equals_teacher_inside(parts):
  # 6 steps per epoch: the two calls (5 + 4 steps) cross an epoch boundary, and the
  # second call starts mid-epoch.
  inside_state, inside_hist = _run(parts, _feed(parts))
  ahead_state, ahead_hist = _run(parts, _feed(parts, ahead_of=_chunks((5, 4))))
  assert int(ahead_state.step) == 9
  _assert_same(inside_state.params, ahead_state.params)
  _assert_same(inside_state.opt_state, ahead_state.opt_state)
  _assert_same(inside_hist, ahead_hist)
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(inside_state.params), jax.tree.leaves(parts['state'].params)))
  assert moved > 1e-4


def test_each_step_takes_its_own_batch_and_teacher(parts):
  # An independent reference: step by step, the batch at the positions of the epoch's
  # shuffle, augmented, with the teacher's outputs computed from that batch.
  data, teacher = parts['data'], parts['teacher']
  perm = np.asarray(epoch_permutations(0, 0, 1, N)[0])
  state = parts['state']
  step = jax.jit(parts['step'])
  for s in range(3):
    idx = perm[s * BATCH:(s + 1) * BATCH]
    batch = {k: jnp.asarray(v[idx]) for k, v in data.items()}
    batch['x'] = AUGMENT(batch['x'], batch['id'], jnp.zeros((BATCH,), jnp.int32), seed=0)
    batch['mask'] = jnp.ones((BATCH,), bool)
    batch.update(teacher_outputs(teacher.apply, teacher.variables, batch['x'], parts['needs']))
    assert set(batch) >= {'teacher_logits', 'teacher_features'}
    state, _ = step(state, batch)
  for feed in (_feed(parts), _feed(parts, ahead_of=_chunks((3,)))):
    fed_state, _ = _run(parts, feed, calls=(3,))
    # Separately jitted steps round differently from the scan, and Adam turns a
    # rounding-level gradient difference into up to ~1e-5 where the gradient is ~0; a
    # teacher from the wrong batch moves the parameters by ~1e-3 (lr) instead.
    _assert_same(jax.device_get(state.params), fed_state.params, atol=2e-5)


def test_student_call_reuses_the_teachers_positions(parts):
  # Handed the teacher's batch positions, the student's call does not shuffle again
  # (no sort in its program); the call with the teacher inside does.
  def hlo(feed):
    calls = TrainCalls(parts['step'], feed, state_shardings=None, mesh=parts['mesh'])
    return calls.jitted(4).lower(parts['state'], feed.inputs(0, 4)).compile().as_text()
  assert ' sort(' not in hlo(_feed(parts, ahead_of=_chunks((4,))))
  assert ' sort(' in hlo(_feed(parts))


def test_device_source_batches_follow_the_epoch_shuffles(parts):
  # Steps 4..9 of 6-step epochs: the end of epoch 0 and all of epoch 1.
  source = DeviceSource(parts['data'], batch_size=BATCH, seed=0, mesh=parts['mesh'])
  inputs = source.inputs(4, 6)
  got = jax.jit(lambda i: jax.vmap(source.batches(i, 6))(jnp.arange(6)))(inputs)
  perms = np.asarray(epoch_permutations(0, 0, 2, N))
  for i, step in enumerate(range(4, 10)):
    epoch, pos = divmod(step, 6)
    idx = perms[epoch][pos * BATCH:(pos + 1) * BATCH]
    np.testing.assert_array_equal(np.asarray(got['id'][i]), idx)
    np.testing.assert_array_equal(np.asarray(got['epoch'][i]), np.full(BATCH, epoch))
    np.testing.assert_array_equal(np.asarray(got['x'][i]), parts['data']['x'][idx])
  with pytest.raises(ValueError, match='larger than the 96 training examples'):
    DeviceSource(parts['data'], batch_size=97, seed=0, mesh=parts['mesh'])


def test_cached_columns_join_each_batch_at_epoch_mod_E(parts):
  # Two cached epochs of made-up teacher logits; step 7 (epoch 1) reads cached epoch 1,
  # step 13 (epoch 2) cached epoch 0, and the batch's epoch (the augmentation's key)
  # is the cached one.
  cached = np.random.default_rng(1).normal(size=(2, N, CLASSES)).astype(np.float32)
  join = lambda cols, epoch, idx: {'teacher_logits': jnp.take(cols['t'][epoch % 2], idx, 0)}
  source = DeviceSource(parts['data'], batch_size=BATCH, seed=0, mesh=parts['mesh'],
                        columns={'t': cached}, join=join)
  feed = Feed(source, augment=AUGMENT, seed=0, needs=parts['needs'])
  for step in (7, 13):
    batch = jax.jit(lambda i: feed.batches(i, 1)(0))(feed.inputs(step, 1))
    epoch = step // 6
    np.testing.assert_array_equal(np.asarray(batch['teacher_logits']),
                                  cached[epoch % 2][np.asarray(batch['position'])])
    assert set(np.asarray(batch['epoch']).tolist()) == {epoch % 2}
    assert 'teacher_features' not in batch        # no live teacher ran


def test_stream_source_stacks_n_batches_and_joins_rows(parts):
  batches = iter([{'x': np.full((4, 2), i, np.float32), 'label': np.arange(4) + i,
                   'id': np.arange(4) + 10 * i, 'epoch': np.full(4, i, np.int32),
                   'mask': np.ones(4, bool)} for i in range(5)])
  rows = lambda epochs, ids: {'teacher_logits': np.stack([ids, epochs], 1).astype(np.float32)}

  class It:
    def __next__(self):
      return next(batches)

    def get_state(self):
      return {'at': 'x'}

  source = StreamSource(It(), mesh=parts['mesh'], rows=rows, num_cached=3)
  inputs = source.inputs(0, 4)
  assert inputs['x'].shape == (4, 4, 2)
  third = jax.jit(lambda i: source.batches(i, 4)(2))(inputs)
  np.testing.assert_array_equal(np.asarray(third['id']), np.arange(4) + 20)
  # The rows of epoch 2's ids, then the epoch taken mod the cache's 3 epochs (2 here).
  np.testing.assert_array_equal(np.asarray(third['teacher_logits'])[:, 0], np.arange(4) + 20)
  assert source.position(4) == {'feed': 'stream', 'step': 4, 'iterator': {'at': 'x'}}
  last = source.inputs(4, 1)
  assert int(last['epoch'][0, 0]) == 4 % 3
