"""Sparse (top-k) losses against a dense numpy teacher built from their definitions."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import kdjax.losses as L


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """Exact comparisons: no TF32 (or bfloat16 passes) where XLA turns sums into dots."""
  with jax.default_matmul_precision('highest'):
    yield

MODES = ('renormalize', 'uniform', 'zero')
LOSSES = {
    'kd': L.sparse_kd,
    'reverse_kl': L.sparse_reverse_kl,
    'gjsd': lambda *a, **k: L.sparse_generalized_jsd(*a, beta=0.3, **k),
    'gjsd_beta0': lambda *a, **k: L.sparse_generalized_jsd(*a, beta=0.0, **k),
    'gjsd_beta1': lambda *a, **k: L.sparse_generalized_jsd(*a, beta=1.0, **k),
    'tvd': L.sparse_tvd,
}
DENSE = {
    'kd': L.kd,
    'reverse_kl': L.reverse_kl,
    'gjsd': lambda *a, **k: L.generalized_jsd(*a, beta=0.3, **k),
    'gjsd_beta0': lambda *a, **k: L.generalized_jsd(*a, beta=0.0, **k),
    'gjsd_beta1': lambda *a, **k: L.generalized_jsd(*a, beta=1.0, **k),
    'tvd': L.tvd,
}
B, C, K = 4, 9, 4


def np_log_softmax(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def np_lse(x):
  x = np.asarray(x, np.float64)
  m = x.max(-1, keepdims=True)
  return (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))[..., 0]


def np_teacher(t, k, T, mode):
  """Dense teacher probabilities ``[B, C]`` and top-k support, from the module doc."""
  t = np.asarray(t, np.float64)
  n, c = t.shape
  idx = np.argsort(-t, axis=-1)[:, :k]
  p = np.zeros_like(t)
  support = np.zeros(t.shape, bool)
  for i in range(n):
    top = t[i, idx[i]]
    support[i, idx[i]] = True
    if mode == 'renormalize' or k == c:
      p[i, idx[i]] = np.exp(top / T - np_lse(top / T))
      continue
    tail = np.delete(t[i], idx[i])
    flat = np.log(np.exp(tail).sum() / (c - k))        # the flat-tail logit
    z_t = np.exp(top / T).sum() + (c - k) * np.exp(flat / T)
    p[i, idx[i]] = np.exp(top / T) / z_t
    if mode == 'uniform':
      p[i, ~support[i]] = np.exp(flat / T) / z_t
  return p, support, idx


def np_kl(p, q):
  with np.errstate(divide='ignore', invalid='ignore'):
    return np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0).sum(-1)


def np_sparse(name, s, t, k, T, mode):
  p, support, _ = np_teacher(t, k, T, mode)
  q = np.exp(np_log_softmax(np.asarray(s, np.float64) / T))
  if name == 'gjsd_beta0':
    name = 'kd'
  if name == 'gjsd_beta1':
    name = 'reverse_kl'
  if name == 'kd':
    return T**2 * np_kl(p, q)
  if name == 'reverse_kl':
    if mode == 'renormalize':
      q_r = np.where(support, q, 0.0)
      q_r = q_r / q_r.sum(-1, keepdims=True)
      return T**2 * np_kl(q_r, p)
    if mode == 'zero':
      with np.errstate(divide='ignore', invalid='ignore'):
        return T**2 * np.where(support, q * (np.log(q) - np.log(p)), 0.0).sum(-1)
    return T**2 * np_kl(q, p)
  if name == 'gjsd':
    m = 0.3 * p + 0.7 * q
    return T**2 * (0.3 * np_kl(p, m) + 0.7 * np_kl(q, m))
  if name == 'tvd':
    return 0.5 * np.abs(p - q).sum(-1)
  raise ValueError(name)


def make(seed=0, shape=(B, C), k=K, scale=2.0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=shape) * scale
  t = rng.normal(size=shape) * scale
  vals, idx = jax.lax.top_k(jnp.asarray(t, jnp.float32), k)
  lse = jax.nn.logsumexp(jnp.asarray(t, jnp.float32), axis=-1)
  return s, t, vals, idx, lse


@pytest.mark.parametrize('temperature', [1.0, 2.0])
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', list(LOSSES))
def test_full_k_equals_dense(name, mode, temperature):
  s, t, vals, idx, lse = make(1, k=C)
  s = jnp.asarray(s, jnp.float32)
  got = LOSSES[name](s, vals, idx, temperature=temperature, missing_mass=mode,
                     teacher_logsumexp=lse)
  want = DENSE[name](s, jnp.asarray(t, jnp.float32), temperature=temperature)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('temperature', [1.0, 2.5])
@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', list(LOSSES))
def test_top_k_matches_numpy_definition(name, mode, temperature):
  s, t, vals, idx, lse = make(2)
  got = LOSSES[name](jnp.asarray(s, jnp.float32), vals, idx, temperature=temperature,
                     missing_mass=mode, teacher_logsumexp=lse)
  np.testing.assert_allclose(got, np_sparse(name, s, t, K, temperature, mode), rtol=1e-5,
                             atol=1e-5)


@pytest.mark.parametrize('name', ['kd', 'reverse_kl', 'gjsd', 'tvd'])
def test_uniform_is_exact_for_a_flat_tail_at_any_temperature(name):
  rng = np.random.default_rng(3)
  t = rng.normal(size=(B, C)) * 2.0
  t[:, K:] = np.min(t[:, :K], axis=1, keepdims=True) - 1.5  # equal tail logits
  s = rng.normal(size=(B, C))
  # float64: the tail mass 1 - sum(top-k) is a difference of nearly equal numbers,
  # so float32 caches only give it to ~1e-4 relative; the formula itself is exact.
  with jax.enable_x64(True):
    t64 = jnp.asarray(t, jnp.float64)
    vals, idx = jax.lax.top_k(t64, K)
    lse = jax.nn.logsumexp(t64, axis=-1)
    got = LOSSES[name](jnp.asarray(s), vals, idx, temperature=3.0, missing_mass='uniform',
                       teacher_logsumexp=lse)
    want = DENSE[name](jnp.asarray(s), t64, temperature=3.0)
    np.testing.assert_allclose(got, want, rtol=1e-9, atol=1e-12)


def test_uniform_tail_mass_bounds_the_true_tail_for_t_above_one():
  """The flat-tail estimate of the mass outside the top-k is an upper bound for T > 1."""
  s, t, vals, idx, lse = make(4)
  p_est, support, _ = np_teacher(t, K, 3.0, 'uniform')
  p_true = np.exp(np_log_softmax(t / 3.0))
  assert np.all(p_est[~support].reshape(B, -1).sum(-1) >= p_true[~support].reshape(B, -1).sum(-1))


@pytest.mark.parametrize('mode', ['uniform', 'zero'])
def test_missing_logsumexp_is_an_error(mode):
  s, _, vals, idx, _ = make(5)
  with pytest.raises(ValueError, match='teacher_logsumexp'):
    L.sparse_kd(jnp.asarray(s, jnp.float32), vals, idx, missing_mass=mode)
  with pytest.raises(ValueError, match='missing_mass'):
    L.sparse_kd(jnp.asarray(s, jnp.float32), vals, idx, missing_mass='spread')


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', list(LOSSES))
def test_gradient_float64(name, mode):
  s, _, vals, idx, lse = make(6)
  w = np.random.default_rng(7).uniform(0.5, 1.5, size=(B,))
  with jax.enable_x64(True):
    v64, l64 = jnp.asarray(vals, jnp.float64), jnp.asarray(lse, jnp.float64)
    f = lambda s_: jnp.sum(LOSSES[name](s_, v64, idx, temperature=2.0, missing_mass=mode,
                                        teacher_logsumexp=l64) * w)
    check_grads(f, (jnp.asarray(s),), order=1, modes=('rev',), eps=1e-4, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', list(LOSSES))
def test_masked_positions_are_exact_zeros(name, mode):
  s, t, vals, idx, lse = make(8)
  where = np.array([True, False, True, False])
  s[~where] = np.nan
  vals = np.asarray(vals).copy()
  vals[~where] = np.inf
  idx = np.asarray(idx).copy()
  idx[~where] = 0  # duplicated indices in padding
  lse = np.asarray(lse).copy()
  lse[~where] = np.nan
  args = (jnp.asarray(vals), jnp.asarray(idx))
  kw = dict(temperature=2.0, missing_mass=mode, teacher_logsumexp=jnp.asarray(lse),
            where=jnp.asarray(where))
  sj = jnp.asarray(s, jnp.float32)
  value, grad = jax.value_and_grad(lambda s_: jnp.sum(LOSSES[name](s_, *args, **kw)))(sj)
  per = LOSSES[name](sj, *args, **kw)
  np.testing.assert_array_equal(np.asarray(per)[~where], 0.0)
  np.testing.assert_array_equal(np.asarray(grad)[~where], 0.0)
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  s2, t2, _, _, _ = make(8)
  np.testing.assert_allclose(np.asarray(per)[where],
                             np_sparse(name, s2, t2, K, 2.0, mode)[where], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('mode', MODES)
@pytest.mark.parametrize('name', list(LOSSES))
def test_extreme_logits_and_bfloat16(name, mode):
  rng = np.random.default_rng(9)
  s = jnp.asarray(rng.choice([-1e4, 1e4, 0.0], size=(B, C)), jnp.bfloat16)
  t = jnp.asarray(rng.choice([-1e4, 1e4, 0.0], size=(B, C)), jnp.bfloat16)
  vals, idx = jax.lax.top_k(t, K)
  lse = jax.nn.logsumexp(t.astype(jnp.float32), axis=-1)
  f = lambda s_: jnp.sum(LOSSES[name](s_, vals, idx, temperature=2.0, missing_mass=mode,
                                      teacher_logsumexp=lse))
  value, grad = jax.value_and_grad(f)(s)
  assert np.isfinite(float(value)) and np.all(np.isfinite(np.asarray(grad, np.float32)))
  assert grad.dtype == jnp.bfloat16


def test_sequence_shape_with_token_mask():
  s, t, vals, idx, lse = make(10, shape=(2, 3, C))
  where = np.array([[True, True, False], [True, False, True]])
  got = L.sparse_kd(jnp.asarray(s, jnp.float32), vals, idx, temperature=2.0,
                    missing_mass='uniform', teacher_logsumexp=lse, where=jnp.asarray(where))
  assert got.shape == (2, 3)
  want = np_sparse('kd', s.reshape(6, C), t.reshape(6, C), K, 2.0, 'uniform').reshape(2, 3)
  np.testing.assert_allclose(got, np.where(where, want, 0.0), rtol=1e-5, atol=1e-6)


def test_registered_sparse_terms_through_build_objective():
  s, t, vals, idx, lse = make(11)
  objective = L.build_objective({
      'sparse_kd': dict(temperature=2.0, missing_mass='uniform', weight=0.5),
      'sparse_tvd': dict(),
  })
  assert objective.needs == {'student_logits', 'teacher_topk_logits', 'teacher_topk_indices'}
  inputs = dict(student_logits=jnp.asarray(s, jnp.float32), teacher_topk_logits=vals,
                teacher_topk_indices=idx, teacher_logsumexp=lse)
  params, state = objective.init(jax.random.key(0), inputs)
  loss, _, _ = objective.apply(params, state, inputs)
  want = (0.5 * np_sparse('kd', s, t, K, 2.0, 'uniform').mean()
          + np_sparse('tvd', s, t, K, 1.0, 'renormalize').mean())
  np.testing.assert_allclose(loss, want, rtol=1e-5)


def np_bucket(name, s, t, k, T):
  """'bucket': the divergence between the teacher and the student coarsened to their top-k
  classes (the teacher's) plus one bin with the rest, the tail logits of the teacher taken
  flat at T != 1 (the module docstring), times T^2."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  out = []
  for i in range(len(t)):
    top = np.argsort(-t[i])[:k]
    rest = np.setdiff1d(np.arange(t.shape[1]), top)
    tail_total = np.exp(np_lse(t[i:i + 1])[0]) - np.exp(t[i, top]).sum()
    flat = np.log(tail_total / len(rest))
    zt = np.append(t[i, top] / T, np.full(len(rest), flat / T))
    p = np.exp(np_log_softmax(zt[None])[0])
    q = np.exp(np_log_softmax(s[i:i + 1] / T)[0])
    P = np.append(p[:k], p[k:].sum())
    Q = np.append(q[top], q[rest].sum())
    a, b = (P, Q) if name == 'kd' else (Q, P)
    out.append(T**2 * np.sum(a * np.log(a / b)))
  return np.asarray(out)


@pytest.mark.parametrize('temperature', [1.0, 2.0])
@pytest.mark.parametrize('name', ['kd', 'reverse_kl'])
def test_bucket_is_the_divergence_of_the_coarsened_distributions(name, temperature):
  s, t, vals, idx, lse = make(5)
  got = LOSSES[name](jnp.asarray(s, jnp.float32), vals, idx, temperature=temperature,
                     missing_mass='bucket', teacher_logsumexp=lse)
  np.testing.assert_allclose(got, np_bucket(name, s, t, K, temperature), rtol=1e-5, atol=1e-6)
  # a lower bound of the full divergence (data processing), equal to it at k = classes
  full = DENSE[name](jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temperature=1.0)
  if temperature == 1.0:
    assert np.all(np.asarray(got) <= np.asarray(full) + 1e-6)
  s, t, vals, idx, lse = make(1, k=C)
  got = LOSSES[name](jnp.asarray(s, jnp.float32), vals, idx, missing_mass='bucket',
                     teacher_logsumexp=lse)
  np.testing.assert_allclose(got, DENSE[name](jnp.asarray(s, jnp.float32),
                                              jnp.asarray(t, jnp.float32)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize('name', ['kd', 'reverse_kl'])
def test_bucket_gradients(name):
  s, _, vals, idx, lse = make(6)
  with jax.enable_x64(True):
    v64, l64 = jnp.asarray(vals, jnp.float64), jnp.asarray(lse, jnp.float64)
    f = lambda s_: jnp.sum(LOSSES[name](s_, v64, idx, temperature=2.0, missing_mass='bucket',
                                        teacher_logsumexp=l64))
    check_grads(f, (jnp.asarray(s),), order=1, modes=('rev',), eps=1e-4, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('name', ['gjsd', 'tvd'])
def test_bucket_is_refused_where_it_is_not_defined(name):
  s, t, vals, idx, lse = make(7)
  with pytest.raises(ValueError, match='bucket'):
    LOSSES[name](jnp.asarray(s, jnp.float32), vals, idx, missing_mass='bucket',
                 teacher_logsumexp=lse)
