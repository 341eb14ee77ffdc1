"""``make_teacher_steps``: the teacher's outputs computed apart feed the fused steps exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import models
from kdjax.data import make_augment
from kdjax.distill import (TeacherFns, TrainState, make_fused_steps, make_teacher_steps,
                           make_train_step)
from kdjax.distill.step import POSITIONS, epoch_permutations
from kdjax.losses import build_objective

N, BATCH, CLASSES = 96, 16, 10


HINT = {'kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1},
        'hint': {'loss': 'fitnet', 'student': 'stage2', 'teacher': 'stage3', 'weight': 0.5}}


@pytest.fixture(scope='module')
def setup():
  return _build(HINT)


def _build(terms):
  rng = np.random.default_rng(0)
  data = {'x': rng.normal(size=(N, 40, 1)).astype(np.float32),
          'label': rng.integers(0, CLASSES, N).astype(np.int32), 'id': np.arange(N, dtype=np.int32)}
  teacher = models.functional(models.create('cnn1d', num_classes=CLASSES, input_shape=(40, 1),
                                            seed=1))
  student = models.functional(models.create('mlp', num_classes=CLASSES, input_shape=(40, 1),
                                            seed=2))
  objective = build_objective(terms)
  t_apply, t_params, t_state = teacher
  s_apply, s_params, s_state = student
  t_out, _ = t_apply(t_params, t_state, data['x'][:2])
  s_out, _ = s_apply(s_params, s_state, data['x'][:2])
  lp, ls = objective.init(jax.random.key(3), {
      'student_features': s_out.features, 'teacher_features': t_out.features,
      'student_logits': s_out.logits, 'teacher_logits': t_out.logits})
  tx = optax.adam(1e-3)
  params = {'student': s_params, 'loss': lp}
  state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=s_state,
                     loss_state=ls, opt_state=tx.init(params),
                     rng=jax.random.key_data(jax.random.key(0)))
  step = make_train_step(
      student_apply=s_apply, objective=objective, tx=tx,
      augment=make_augment({'kind': 'signal', 'shift': 3, 'scale': 0.1, 'noise': 0.05}),
      augment_seed=0, teacher=TeacherFns(t_apply, CLASSES))
  return dict(data=data, state=state, step=step, tvars=(t_params, t_state), t_apply=t_apply)


def _run(setup, apart, calls=(5, 4), data=None):
  """Fused calls of ``calls`` steps; ``apart``: the teacher's outputs from make_teacher_steps."""
  state = setup['state']
  data = setup['data'] if data is None else data
  history = []
  for num_steps in calls:
    kw = dict(num_examples=N, batch_size=BATCH, shuffle_seed=0, num_steps=num_steps)
    fused = jax.jit(make_fused_steps(setup['step'], **kw))
    if apart:
      outputs = jax.jit(make_teacher_steps(setup['step'], **kw))(
          int(state.step), data, setup['tvars'])
      state, metrics = fused(state, data, None, outputs)
    else:
      state, metrics = fused(state, data, setup['tvars'])
    history.append(jax.device_get(metrics))
  return jax.device_get(state), history


def _assert_same(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_teacher_apart_equals_teacher_inside(setup):
  # 6 steps per epoch: the two calls (5 + 4 steps) cross an epoch boundary, and the
  # second call starts mid-epoch.
  inside_state, inside_hist = _run(setup, apart=False)
  apart_state, apart_hist = _run(setup, apart=True)
  assert int(apart_state.step) == 9
  _assert_same(inside_state.params, apart_state.params)
  _assert_same(inside_state.opt_state, apart_state.opt_state)
  _assert_same(inside_hist, apart_hist)
  moved = max(float(np.max(np.abs(a - b))) for a, b in
              zip(jax.tree.leaves(inside_state.params), jax.tree.leaves(setup['state'].params)))
  assert moved > 1e-4


def test_teacher_apart_gives_each_step_its_own_batch(setup):
  # An independent reference: step by step, each batch's teacher outputs computed
  # from that batch and handed in with it.
  step, data = setup['step'], setup['data']
  perm = np.asarray(epoch_permutations(0, 0, 1, N)[0])
  state = setup['state']
  for s in range(3):
    idx = perm[s * BATCH:(s + 1) * BATCH]
    batch = {k: jnp.asarray(v[idx]) for k, v in data.items()}
    batch['epoch'] = jnp.zeros((BATCH,), jnp.int32)
    batch['mask'] = jnp.ones((BATCH,), bool)
    batch.update(step.teacher_outputs(batch, setup['tvars']))
    assert set(batch) >= {'teacher_logits', 'teacher_features'}
    state, _ = jax.jit(step)(state, batch, setup['tvars'])
  apart_state, _ = _run(setup, apart=True, calls=(3,))
  # Separately jitted steps round differently from the fused scan, and Adam turns a
  # rounding-level gradient difference into up to ~1e-5 where the gradient is ~0; a
  # teacher from the wrong batch moves the parameters by ~1e-3 (lr) instead.
  _assert_same(jax.device_get(state.params), apart_state.params, atol=2e-5)


def test_no_teacher_outputs_without_a_live_teacher():
  # Dense teacher logits in the data (as from the cache): nothing for the teacher to do.
  setup = _build({'kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1}})
  logits = setup['t_apply'](*setup['tvars'], setup['data']['x'])[0].logits
  data = {**setup['data'], 'teacher_logits': np.asarray(logits)}
  outputs = make_teacher_steps(setup['step'], num_examples=N, batch_size=BATCH,
                               shuffle_seed=0, num_steps=3)(0, data, setup['tvars'])
  # Only the batches' positions, as the epoch shuffle gives them.
  assert set(outputs) == {POSITIONS}
  perm = np.asarray(epoch_permutations(0, 0, 1, N)[0])
  np.testing.assert_array_equal(np.asarray(outputs[POSITIONS]), perm[:3 * BATCH].reshape(3, BATCH))
  assert setup['step'].teacher_outputs({'teacher_logits': logits}) == {}
  no_teacher = make_train_step(student_apply=None, objective=None, tx=optax.sgd(0.1),
                               augment=make_augment(None), augment_seed=0)
  assert not no_teacher.live_teacher
  assert no_teacher.teacher_outputs({'x': jnp.zeros((2, 40, 1))}) == {}


def test_student_call_reuses_the_teachers_positions(setup):
  # Handed the teacher's batch positions, the student's call does not shuffle again
  # (no sort in its program); the teacher's call and the plain fused call do.
  kw = dict(num_examples=N, batch_size=BATCH, shuffle_seed=0, num_steps=4)
  teach = jax.jit(make_teacher_steps(setup['step'], **kw))
  outputs = teach(0, setup['data'], setup['tvars'])
  fused = jax.jit(make_fused_steps(setup['step'], **kw))
  hlo = lambda *a: fused.lower(*a).compile().as_text()
  assert ' sort(' not in hlo(setup['state'], setup['data'], None, outputs)
  assert ' sort(' in hlo(setup['state'], setup['data'], setup['tvars'])
  assert ' sort(' in teach.lower(0, setup['data'], setup['tvars']).compile().as_text()
