"""Batch-level response losses (DIST, Sinkhorn) against numpy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import kdjax.losses as L

B, C = 6, 5


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """Exact comparisons: no TF32 (or bfloat16 passes) where XLA turns sums into dots."""
  with jax.default_matmul_precision('highest'):
    yield


def np_softmax(x):
  x = np.asarray(x, np.float64)
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def np_dist(s, t, T, beta=1.0, gamma=1.0):
  p, q = np_softmax(t / T), np_softmax(s / T)
  inter = np.mean([1 - np.corrcoef(q[i], p[i])[0, 1] for i in range(len(p))])
  intra = np.mean([1 - np.corrcoef(q[:, c], p[:, c])[0, 1] for c in range(p.shape[1])])
  return T**2 * (beta * inter + gamma * intra), T**2 * intra


def np_sinkhorn(s, t, T, eps, iters, cost='l1', marginal='ones'):
  """Sinkhorn's matrix scaling from the kernel, rows (students) then columns (teachers),
  written from the formula in the direct domain."""
  q, p = np_softmax(s / T), np_softmax(t / T)
  diff = q[:, None, :] - p[None, :, :]
  c = (diff**2).sum(-1) if cost == 'sqeuclidean' else np.abs(diff).sum(-1)
  mass = 1.0 if marginal == 'ones' else 1.0 / len(q)
  plan = np.exp(-c / eps)
  for _ in range(iters):
    plan = plan * (mass / plan.sum(1, keepdims=True))
    plan = plan * (mass / plan.sum(0, keepdims=True))
  return (plan * c).sum(), plan


def make(seed=0, shape=(B, C)):
  rng = np.random.default_rng(seed)
  return rng.normal(size=shape) * 2.0, rng.normal(size=shape) * 2.0


BATCH_LOSSES = {
    'dist': (lambda s, t, w: L.dist(s, t, beta=0.7, gamma=1.3, temperature=2.0, where=w),
             lambda s, t: np_dist(s, t, 2.0, 0.7, 1.3)[0]),
    'dist_intra': (lambda s, t, w: L.dist_intra_class(s, t, temperature=2.0, where=w),
                   lambda s, t: np_dist(s, t, 2.0)[1]),
    'sinkhorn': (lambda s, t, w: L.sinkhorn_kd(s, t, where=w),
                 lambda s, t: np_sinkhorn(s, t, 2.0, 0.1, 20)[0]),
    'sinkhorn_sq_uniform': (lambda s, t, w: L.sinkhorn_kd(
        s, t, temperature=1.0, epsilon=0.05, num_iters=30, cost='sqeuclidean',
        marginal='uniform', where=w),
                            lambda s, t: np_sinkhorn(s, t, 1.0, 0.05, 30, 'sqeuclidean',
                                                     'uniform')[0]),
}
NAMES = list(BATCH_LOSSES)


@pytest.mark.parametrize('name', NAMES)
def test_matches_numpy(name):
  s, t = make(1)
  fn, ref = BATCH_LOSSES[name]
  got = fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), None)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref(s, t), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_masked_rows_are_left_out_exactly(name):
  s, t = make(2)
  where = np.array([True, False, True, True, False, True])
  fn, ref = BATCH_LOSSES[name]
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[~where], t_bad[~where] = np.nan, -np.inf
  sj, tj = jnp.asarray(s_bad, jnp.float32), jnp.asarray(t_bad, jnp.float32)
  value, grad = jax.value_and_grad(lambda s_: fn(s_, tj, jnp.asarray(where)))(sj)
  np.testing.assert_allclose(value, ref(s[where], t[where]), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(np.asarray(grad)[~where], 0.0)
  assert np.all(np.isfinite(grad))


@pytest.mark.parametrize('name', NAMES)
def test_gradient_float64(name):
  s, t = make(3)
  fn, _ = BATCH_LOSSES[name]
  with jax.enable_x64(True):
    f = lambda s_: fn(s_, jnp.asarray(t), None)
    check_grads(f, (jnp.asarray(s),), order=1, modes=('rev',), eps=1e-4, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize('name', NAMES)
def test_extreme_logits_and_bfloat16(name):
  rng = np.random.default_rng(4)
  fn, ref = BATCH_LOSSES[name]
  s = jnp.asarray(rng.choice([-1e4, 1e4, 0.0], size=(B, C)), jnp.bfloat16)
  t = jnp.asarray(rng.choice([-1e4, 1e4, 0.0], size=(B, C)), jnp.bfloat16)
  value, grad = jax.value_and_grad(lambda s_: fn(s_, t, None))(s)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad, np.float32)))
  s16, t16 = (jnp.asarray(x, jnp.bfloat16) for x in make(5))
  np.testing.assert_allclose(fn(s16, t16, None),
                             ref(np.asarray(s16, np.float64), np.asarray(t16, np.float64)),
                             rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', NAMES)
def test_sequence_inputs_flatten_the_tokens(name):
  s, t = make(6, shape=(2, 4, C))
  where = np.array([[True, True, False, True], [True, False, True, True]])
  fn, ref = BATCH_LOSSES[name]
  got = fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(where))
  np.testing.assert_allclose(got, ref(s[where], t[where]), rtol=1e-5, atol=1e-6)


def test_sinkhorn_single_example_is_the_cost():
  s, t = make(7, shape=(1, C))
  s32, t32 = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  p, q = np_softmax(t / 2.0), np_softmax(s / 2.0)
  np.testing.assert_allclose(L.sinkhorn_kd(s32, t32), np.abs(p - q).sum(), rtol=1e-5)
  p, q = np_softmax(t), np_softmax(s)
  np.testing.assert_allclose(L.sinkhorn_kd(s32, t32, temperature=1.0, cost='sqeuclidean'),
                             ((p - q)**2).sum(), rtol=1e-5)


def test_sinkhorn_plan_marginals_and_mass():
  s, t = make(8)
  _, plan = np_sinkhorn(s, t, 2.0, 0.1, 200)
  np.testing.assert_allclose(plan.sum(0), 1.0, rtol=1e-6)
  np.testing.assert_allclose(plan.sum(1), 1.0, rtol=1e-6)
  s32, t32 = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  np.testing.assert_allclose(L.sinkhorn_kd(s32, t32, marginal='uniform'),
                             L.sinkhorn_kd(s32, t32) / B, rtol=1e-5)
  with pytest.raises(ValueError, match='marginal'):
    L.sinkhorn_kd(s32, t32, marginal='probability')
  with pytest.raises(ValueError, match='cost'):
    L.build_objective({'sinkhorn_kd': dict(cost='l2')})


def test_sinkhorn_of_a_permuted_batch_is_small():
  s, _ = make(9)
  perm = np.random.default_rng(10).permutation(B)
  value = L.sinkhorn_kd(jnp.asarray(s, jnp.float32), jnp.asarray(s[perm], jnp.float32),
                        epsilon=0.002, num_iters=200)
  pairwise = L.tvd(jnp.asarray(s, jnp.float32), jnp.asarray(s[perm], jnp.float32))
  assert float(value) < 1e-3 < float(jnp.mean(pairwise))


def test_dist_of_identical_predictions_is_zero():
  s, _ = make(11)
  s = jnp.asarray(s, jnp.float32)
  np.testing.assert_allclose(L.dist(s, s, temperature=3.0), 0.0, atol=1e-5)


@pytest.mark.parametrize('name', ['dist', 'sinkhorn_kd'])
def test_registered_batch_level_through_build_objective(name):
  assert L.get(name).batch_level
  s, t = make(12)
  where = np.array([True, True, False, True, True, True])
  objective = L.build_objective({name: dict(weight=2.0, temperature=2.0)})
  inputs = dict(student_logits=jnp.asarray(s, jnp.float32),
                teacher_logits=jnp.asarray(t, jnp.float32), where=jnp.asarray(where))
  params, state = objective.init(jax.random.key(0), inputs)
  loss, _, metrics = objective.apply(params, state, inputs)
  want = (np_dist(s[where], t[where], 2.0)[0] if name == 'dist'
          else np_sinkhorn(s[where], t[where], 2.0, 0.1, 20)[0])  # sinkhorn's defaults
  np.testing.assert_allclose(loss, 2.0 * want, rtol=1e-5)
  np.testing.assert_allclose(metrics[f'loss/{name}'][1], 1.0)
