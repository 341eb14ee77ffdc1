"""Dense response losses against numpy references written from their formulas."""

from __future__ import annotations

import dataclasses
from typing import Callable

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

# --------------------------------------------------------------------------- numpy


def np_log_softmax(x, axis=-1):
  x = np.asarray(x, np.float64)
  m = x.max(axis=axis, keepdims=True)
  return x - m - np.log(np.exp(x - m).sum(axis=axis, keepdims=True))


def np_softmax(x, axis=-1):
  return np.exp(np_log_softmax(x, axis))


def np_kl(p, q):
  """KL(p || q) over the last axis, 0 log 0 = 0."""
  p, q = np.asarray(p, np.float64), np.asarray(q, np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    terms = np.where(p > 0, p * (np.log(p) - np.log(q)), 0.0)
  return terms.sum(-1)


def np_ce(s, y, eps=0.0):
  c = s.shape[-1]
  target = (1 - eps) * np.eye(c)[np.maximum(y, 0)] + eps / c
  out = -(target * np_log_softmax(s)).sum(-1)
  return np.where(y >= 0, out, 0.0)


def np_kd(s, t, T=1.0):
  return T**2 * np_kl(np_softmax(t / T), np_softmax(s / T))


def np_reverse_kl(s, t, T=1.0):
  return T**2 * np_kl(np_softmax(s / T), np_softmax(t / T))


def np_entropy(p):
  p = np.asarray(p, np.float64)
  with np.errstate(divide='ignore', invalid='ignore'):
    return -np.where(p > 0, p * np.log(p), 0.0).sum(-1)


def np_gjsd(s, t, beta, T=1.0):
  p, q = np_softmax(t / T), np_softmax(s / T)
  if beta == 0:
    return T**2 * np_kl(p, q)
  if beta == 1:
    return T**2 * np_kl(q, p)
  m = beta * p + (1 - beta) * q
  return T**2 * (beta * np_kl(p, m) + (1 - beta) * np_kl(q, m))


def np_skew_kl(s, t, alpha, T=1.0):
  p, q = np_softmax(t / T), np_softmax(s / T)
  return T**2 * np_kl(p, alpha * p + (1 - alpha) * q)


def np_skew_reverse_kl(s, t, alpha, T=1.0):
  p, q = np_softmax(t / T), np_softmax(s / T)
  return T**2 * np_kl(q, (1 - alpha) * p + alpha * q)


def np_tvd(s, t, T=1.0):
  return 0.5 * np.abs(np_softmax(t / T) - np_softmax(s / T)).sum(-1)


def np_dkd(s, t, y, alpha, beta, T):
  out = np.zeros(s.shape[0])
  for i in range(s.shape[0]):
    if y[i] < 0:
      continue
    p, q = np_softmax(t[i] / T), np_softmax(s[i] / T)
    b_p = np.array([p[y[i]], 1 - p[y[i]]])
    b_q = np.array([q[y[i]], 1 - q[y[i]]])
    rest = np.arange(s.shape[1]) != y[i]
    p_hat, q_hat = p[rest] / p[rest].sum(), q[rest] / q[rest].sum()
    out[i] = T**2 * (alpha * np_kl(b_p, b_q) + beta * np_kl(p_hat, q_hat))
  return out


def np_dist_inter(s, t, T=1.0):
  p, q = np_softmax(t / T), np_softmax(s / T)
  return np.array([T**2 * (1 - np.corrcoef(q[i], p[i])[0, 1]) for i in range(len(p))])


def np_lskd(s, t, T, ddof=1, eps=1e-7):
  z = lambda x: (x - x.mean(-1, keepdims=True)) / (eps + x.std(-1, ddof=ddof, keepdims=True))
  return np_kd(z(s), z(t), T)


def np_bdkd(s, t, T=1.0, eps=1e-6):
  p, q = np_softmax(t / T), np_softmax(s / T)
  w = (np_entropy(p) + eps) / (np_entropy(p) + np_entropy(q) + 2 * eps)
  return T**2 * (w * np_kl(p, q) + (1 - w) * np_kl(q, p))


def np_pld(s, t, y, T=1.0):
  out = np.zeros(s.shape[0])
  for i in range(s.shape[0]):
    others = sorted(range(s.shape[1]), key=lambda c: -t[i, c])
    order = others if y is None or y[i] < 0 else [y[i]] + [c for c in others if c != y[i]]
    w = np_softmax(t[i] / T)
    for k, c in enumerate(order):
      tail = [s[i, j] for j in order[k:]]
      out[i] += w[c] * (np.log(np.sum(np.exp(tail))) - s[i, c])
  return out


def np_tf_kd(s, y, a, T, m, form='reference'):
  c = s.shape[-1]
  v = np.full(s.shape, (1 - a) / (c - 1))
  v[np.arange(len(y)), np.maximum(y, 0)] = a
  if form == 'reference':
    out = m / c * np_kl(np_softmax(v / T), np_softmax(s))
  else:
    v_t = v**(1 / T) / (v**(1 / T)).sum(-1, keepdims=True)
    out = m * T**2 * np_kl(v_t, np_softmax(s / T))
  return np.where(y >= 0, out, 0.0)


def np_adaptive(s, t, y, T, weighting, eps=1e-6):
  c = s.shape[-1]
  e = np.eye(c)[np.maximum(y, 0)]
  p1, q1 = np_softmax(t), np_softmax(s)
  if weighting == 'geometry':
    d_s, d_t = np.linalg.norm(q1 - e, axis=-1), np.linalg.norm(p1 - e, axis=-1)
    w = (d_s + eps) / (d_s + d_t + 2 * eps)
  else:
    w = (p1 * e).sum(-1)
  w = np.where(y >= 0, w, 1.0)
  hard = np.where(y >= 0, np_ce(s, y), 0.0)
  return w * np_kd(s, t, T) + (1 - w) * hard


# --------------------------------------------------------------------------- cases


@dataclasses.dataclass(frozen=True)
class Case:
  """``fn(s, t, labels, where) -> per-example``; ``ref(s, t, labels) -> numpy``."""
  name: str
  fn: Callable
  ref: Callable
  uses_teacher: bool = True
  numeric_grad: bool = True  # False where the loss holds a weight under stop_gradient


CASES = [
    Case('ce', lambda s, t, y, w: L.ce(s, y, where=w), lambda s, t, y: np_ce(s, y),
         uses_teacher=False),
    Case('ce_smooth', lambda s, t, y, w: L.ce(s, y, label_smoothing=0.2, where=w),
         lambda s, t, y: np_ce(s, y, 0.2), uses_teacher=False),
    Case('kd_t1', lambda s, t, y, w: L.kd(s, t, where=w), lambda s, t, y: np_kd(s, t)),
    Case('kd_t4', lambda s, t, y, w: L.kd(s, t, temperature=4.0, where=w),
         lambda s, t, y: np_kd(s, t, 4.0)),
    Case('reverse_kl_t1', lambda s, t, y, w: L.reverse_kl(s, t, where=w),
         lambda s, t, y: np_reverse_kl(s, t)),
    Case('reverse_kl_t2', lambda s, t, y, w: L.reverse_kl(s, t, temperature=2.0, where=w),
         lambda s, t, y: np_reverse_kl(s, t, 2.0)),
    Case('gjsd_half', lambda s, t, y, w: L.generalized_jsd(s, t, beta=0.5, where=w),
         lambda s, t, y: np_gjsd(s, t, 0.5)),
    Case('gjsd_0.2_t2', lambda s, t, y, w: L.generalized_jsd(s, t, beta=0.2, temperature=2.0,
                                                             where=w),
         lambda s, t, y: np_gjsd(s, t, 0.2, 2.0)),
    Case('gjsd_beta0', lambda s, t, y, w: L.generalized_jsd(s, t, beta=0.0, where=w),
         lambda s, t, y: np_gjsd(s, t, 0.0)),
    Case('gjsd_beta1', lambda s, t, y, w: L.generalized_jsd(s, t, beta=1.0, where=w),
         lambda s, t, y: np_gjsd(s, t, 1.0)),
    Case('gjsd_traced_beta', lambda s, t, y, w: L.generalized_jsd(s, t, beta=jnp.asarray(0.3),
                                                                  where=w),
         lambda s, t, y: np_gjsd(s, t, 0.3)),
    Case('js', lambda s, t, y, w: L.js_divergence(s, t, temperature=2.0, where=w),
         lambda s, t, y: np_gjsd(s, t, 0.5, 2.0)),
    Case('skew_kl', lambda s, t, y, w: L.skew_kl(s, t, alpha=0.1, temperature=2.0, where=w),
         lambda s, t, y: np_skew_kl(s, t, 0.1, 2.0)),
    Case('skew_reverse_kl', lambda s, t, y, w: L.skew_reverse_kl(s, t, alpha=0.3, where=w),
         lambda s, t, y: np_skew_reverse_kl(s, t, 0.3)),
    Case('tvd', lambda s, t, y, w: L.tvd(s, t, temperature=2.0, where=w),
         lambda s, t, y: np_tvd(s, t, 2.0)),
    Case('dkd', lambda s, t, y, w: L.dkd(s, t, y, alpha=1.0, beta=8.0, temperature=4.0, where=w),
         lambda s, t, y: np_dkd(s, t, y, 1.0, 8.0, 4.0)),
    Case('dkd_t1', lambda s, t, y, w: L.dkd(s, t, y, alpha=0.5, beta=2.0, temperature=1.0,
                                            where=w),
         lambda s, t, y: np_dkd(s, t, y, 0.5, 2.0, 1.0)),
    Case('dist_inter', lambda s, t, y, w: L.dist_inter_class(s, t, temperature=2.0, where=w),
         lambda s, t, y: np_dist_inter(s, t, 2.0)),
    Case('logit_standardized_kd',
         lambda s, t, y, w: L.logit_standardized_kd(s, t, where=w),
         lambda s, t, y: np_lskd(s, t, 2.0)),
    Case('lskd_ddof0_t3',
         lambda s, t, y, w: L.logit_standardized_kd(s, t, temperature=3.0, ddof=0, where=w),
         lambda s, t, y: np_lskd(s, t, 3.0, ddof=0)),
    Case('bdkd', lambda s, t, y, w: L.bdkd(s, t, temperature=2.0, where=w),
         lambda s, t, y: np_bdkd(s, t, 2.0), numeric_grad=False),
    Case('pld', lambda s, t, y, w: L.pld(s, t, y, temperature=2.0, where=w),
         lambda s, t, y: np_pld(s, t, y, 2.0)),
    Case('pld_no_labels', lambda s, t, y, w: L.pld(s, t, where=w),
         lambda s, t, y: np_pld(s, t, None)),
    Case('tf_kd', lambda s, t, y, w: L.tf_kd(s, y, where=w),
         lambda s, t, y: np_tf_kd(s, y, 0.99, 20.0, 100.0), uses_teacher=False),
    Case('tf_kd_tempered',
         lambda s, t, y, w: L.tf_kd(s, y, correct_prob=0.8, temperature=3.0, multiplier=2.0,
                                    form='tempered', where=w),
         lambda s, t, y: np_tf_kd(s, y, 0.8, 3.0, 2.0, 'tempered'), uses_teacher=False),
    Case('adaptive_geometry',
         lambda s, t, y, w: L.adaptive_weight_kd(s, t, y, temperature=3.0, where=w),
         lambda s, t, y: np_adaptive(s, t, y, 3.0, 'geometry'), numeric_grad=False),
    Case('adaptive_confidence',
         lambda s, t, y, w: L.adaptive_weight_kd(s, t, y, temperature=3.0,
                                                 weighting='teacher_confidence', where=w),
         lambda s, t, y: np_adaptive(s, t, y, 3.0, 'teacher_confidence'), numeric_grad=False),
    Case('taid_t0.6', lambda s, t, y, w: L.taid(s, t, interpolation=0.6, temperature=2.0,
                                                where=w),
         lambda s, t, y: 4.0 * np_kl(np_softmax((0.4 * s + 0.6 * t) / 2.0),
                                     np_softmax(s / 2.0)), numeric_grad=False),
]
IDS = [c.name for c in CASES]

B, C = 5, 7


def make_inputs(seed=0, shape=(B, C), scale=2.0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=shape) * scale
  t = rng.normal(size=shape) * scale
  y = rng.integers(0, shape[-1], size=shape[:-1])
  return s, t, y


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_matches_numpy(case):
  s, t, y = make_inputs()
  y[1] = -1  # unlabeled
  got = case.fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y), None)
  assert got.shape == (B,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, case.ref(s, t, y), rtol=1e-5, atol=1e-5)


NUMERIC = [c for c in CASES if c.numeric_grad]


@pytest.mark.parametrize('case', NUMERIC, ids=[c.name for c in NUMERIC])
def test_gradient_float64(case):
  s, t, y = make_inputs(1)
  weights = np.random.default_rng(2).uniform(0.5, 1.5, size=(B,))
  with jax.enable_x64(True):
    f = lambda s_: jnp.sum(case.fn(s_, jnp.asarray(t), jnp.asarray(y), None) * weights)
    check_grads(f, (jnp.asarray(s),), order=1, modes=('rev',), eps=1e-4, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_masked_positions_are_exact_zeros(case):
  s, t, y = make_inputs(3)
  where = np.array([True, False, True, False, True])
  s[~where] = np.nan  # garbage in padded rows must not leak
  t[~where] = np.inf
  s, t, y = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y)
  value = case.fn(s, t, y, jnp.asarray(where))
  np.testing.assert_array_equal(np.asarray(value)[~where], 0.0)
  assert np.all(np.isfinite(value))
  grad = jax.grad(lambda s_: jnp.sum(case.fn(s_, t, y, jnp.asarray(where))))(s)
  np.testing.assert_array_equal(np.asarray(grad)[~where], 0.0)
  assert np.all(np.isfinite(grad))
  if case.uses_teacher:
    grad_t = jax.grad(lambda t_: jnp.sum(case.fn(s, t_, y, jnp.asarray(where))))(t)
    np.testing.assert_array_equal(np.asarray(grad_t)[~where], 0.0)
    assert np.all(np.isfinite(grad_t))
  # Unmasked rows are unaffected by the mask.
  s2, t2, y2 = make_inputs(3)
  full = case.fn(jnp.asarray(s2, jnp.float32), jnp.asarray(t2, jnp.float32), jnp.asarray(y2),
                 None)
  np.testing.assert_allclose(np.asarray(value)[where], np.asarray(full)[where], rtol=1e-6)


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_extreme_logits_are_finite(case):
  rng = np.random.default_rng(4)
  s = jnp.asarray(rng.choice([-1e4, 1e4, 0.0], size=(B, C)), jnp.float32)
  t = jnp.asarray(rng.choice([-1e4, 1e4, 0.0], size=(B, C)), jnp.float32)
  y = jnp.asarray(rng.integers(0, C, size=(B,)))
  value, grad = jax.value_and_grad(lambda s_: jnp.sum(case.fn(s_, t, y, None)))(s)
  assert np.isfinite(value) and np.all(np.isfinite(grad))


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_bfloat16_inputs(case):
  s, t, y = make_inputs(5)
  s16, t16 = jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16)
  got = case.fn(s16, t16, jnp.asarray(y), None)
  assert got.dtype == jnp.float32
  want = case.ref(np.asarray(s16, np.float64), np.asarray(t16, np.float64), y)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  grad = jax.grad(lambda s_: jnp.sum(case.fn(s_, t16, jnp.asarray(y), None)))(s16)
  assert grad.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(grad, np.float32)))


@pytest.mark.parametrize('case', CASES, ids=IDS)
def test_sequence_inputs_with_token_mask(case):
  s, t, y = make_inputs(6, shape=(2, 3, C))
  where = np.array([[True, True, False], [True, False, False]])
  got = case.fn(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y),
                jnp.asarray(where))
  assert got.shape == (2, 3)
  want = np.where(where, case.ref(s.reshape(6, C), t.reshape(6, C), y.reshape(6)).reshape(2, 3),
                  0.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def _grad(fn, s, *args, **kw):
  return np.asarray(jax.grad(lambda s_: jnp.sum(fn(s_, *args, **kw) * GW))(s), np.float64)


GW = np.random.default_rng(12).uniform(0.5, 1.5, size=(B,))


def test_bdkd_gradient_holds_entropy_weights_constant():
  s, t, _ = make_inputs(13)
  s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  p, q = np_softmax(np.asarray(t) / 2.0), np_softmax(np.asarray(s) / 2.0)
  w = ((np_entropy(p) + 1e-6) / (np_entropy(p) + np_entropy(q) + 2e-6))[:, None]
  want = (w * _grad(L.kd, s, t, temperature=2.0)
          + (1 - w) * _grad(L.reverse_kl, s, t, temperature=2.0))
  np.testing.assert_allclose(_grad(L.bdkd, s, t, temperature=2.0), want, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize('weighting', ['geometry', 'teacher_confidence'])
def test_adaptive_weight_gradient_holds_weights_constant(weighting):
  s, t, y = make_inputs(14)
  y[0] = -1
  sj, tj, yj = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y)
  e = np.eye(C)[np.maximum(y, 0)]
  p1, q1 = np_softmax(t), np_softmax(s)
  if weighting == 'geometry':
    d_s, d_t = np.linalg.norm(q1 - e, axis=-1), np.linalg.norm(p1 - e, axis=-1)
    w = (d_s + 1e-6) / (d_s + d_t + 2e-6)
  else:
    w = (p1 * e).sum(-1)
  w = np.where(y >= 0, w, 1.0)[:, None]
  want = w * _grad(L.kd, sj, tj, temperature=3.0) + (1 - w) * _grad(
      lambda a, b: L.ce(a, b), sj, yj)
  got = _grad(L.adaptive_weight_kd, sj, tj, yj, temperature=3.0, weighting=weighting)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_taid_gradient_treats_the_interpolated_target_as_constant():
  s, t, _ = make_inputs(15)
  target = np_softmax((0.4 * s + 0.6 * t) / 2.0)
  want = GW[:, None] * 2.0 * (np_softmax(s / 2.0) - target)  # T^2 * (q - p) / T
  got = _grad(L.taid, jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32),
              interpolation=0.6, temperature=2.0)
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6)


def test_gjsd_endpoints_are_limits_of_the_normalized_interior():
  s, t, _ = make_inputs(16)
  s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  with jax.enable_x64(True):
    s64, t64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
    small = 1e-5
    np.testing.assert_allclose(L.generalized_jsd(s64, t64, beta=small) / small,
                               L.kd(s64, t64), rtol=1e-3)
    np.testing.assert_allclose(L.generalized_jsd(s64, t64, beta=1 - small) / small,
                               L.reverse_kl(s64, t64), rtol=1e-3)


def test_dkd_decomposes_classic_kd():
  """KD = TCKD + (1 - p_y) NCKD (the identity the DKD paper starts from)."""
  s, t, y = make_inputs(17)
  s, t, y = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), jnp.asarray(y)
  tckd = L.dkd(s, t, y, alpha=1.0, beta=0.0, temperature=2.0)
  nckd = L.dkd(s, t, y, alpha=0.0, beta=1.0, temperature=2.0)
  p_y = np_softmax(np.asarray(t) / 2.0)[np.arange(B), np.asarray(y)]
  np.testing.assert_allclose(tckd + (1 - p_y) * nckd, L.kd(s, t, temperature=2.0), rtol=1e-5)


def test_pld_with_one_hot_teacher_is_cross_entropy():
  s, _, y = make_inputs(18)
  t = 100.0 * np.eye(C)[y]
  np.testing.assert_allclose(L.pld(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), y),
                             np_ce(s, y), rtol=1e-5)


def test_logit_standardized_kd_ignores_scale_and_shift():
  s, t, _ = make_inputs(19)
  s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  np.testing.assert_allclose(L.logit_standardized_kd(3.0 * s - 2.0, 0.5 * t + 7.0),
                             L.logit_standardized_kd(s, t), rtol=1e-4, atol=1e-6)


def test_tf_kd_tempered_at_temperature_one_matches_virtual_teacher():
  s, _, y = make_inputs(20)
  a = 0.7
  v = np.full((B, C), (1 - a) / (C - 1))
  v[np.arange(B), y] = a
  got = L.tf_kd(jnp.asarray(s, jnp.float32), y, correct_prob=a, temperature=1.0,
                multiplier=1.0, form='tempered')
  np.testing.assert_allclose(got, np_kl(v, np_softmax(s)), rtol=1e-5)
  # A virtual teacher sure of the label (a = 1) is the cross-entropy.
  got = L.tf_kd(jnp.asarray(s, jnp.float32), y, correct_prob=1.0, temperature=1.0,
                multiplier=1.0, form='tempered')
  np.testing.assert_allclose(got, np_ce(s, y), rtol=1e-5)


def test_tf_kd_and_lskd_options_are_checked():
  s, _, y = make_inputs(22)
  with pytest.raises(ValueError, match='form'):
    L.tf_kd(jnp.asarray(s), y, form='paper')
  with pytest.raises(ValueError, match='form'):
    L.build_objective({'tf_kd': dict(form='paper')})
  with pytest.raises(ValueError, match='ddof'):
    L.build_objective({'logit_standardized_kd': dict(ddof=2)})
  with pytest.raises(ValueError, match='side'):
    L.bdkd(jnp.asarray(s), jnp.asarray(s), side='both')


def test_bdkd_teacher_side_is_the_student_side_with_roles_exchanged():
  """Online BD-KD: the teacher-side term trains the teacher, the student held constant."""
  s, t, _ = make_inputs(23)
  s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  teacher_side = L.bdkd(s, t, side='teacher', temperature=2.0)
  np.testing.assert_allclose(teacher_side, L.bdkd(s, t, temperature=2.0), rtol=1e-6)
  np.testing.assert_allclose(teacher_side, L.bdkd(t, s, temperature=2.0), rtol=1e-5)
  got = np.asarray(jax.grad(lambda t_: jnp.sum(L.bdkd(s, t_, side='teacher', temperature=2.0)
                                               * GW))(t))
  np.testing.assert_allclose(got, _grad(L.bdkd, t, s, temperature=2.0), rtol=1e-4, atol=1e-6)
  # Each side differentiates only its own logits.
  assert not np.any(jax.grad(lambda s_: jnp.sum(L.bdkd(s_, t, side='teacher')))(s))
  assert not np.any(jax.grad(lambda t_: jnp.sum(L.bdkd(s, t_, side='student')))(t))


def test_class_axis_other_than_last():
  s, t, _ = make_inputs(7, shape=(3, C, 4))
  got = L.kd(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), temperature=2.0, axis=1)
  want = np_kd(np.moveaxis(s, 1, -1), np.moveaxis(t, 1, -1), 2.0)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_kd_at_temperature_one_is_plain_kl_and_zero_at_identity():
  s, t, _ = make_inputs(8)
  s, t = jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32)
  np.testing.assert_allclose(L.kd(s, s, temperature=3.0), 0.0, atol=1e-6)
  # T^2 scaling: kd(s, t, T) == T^2 * kd(s / T, t / T, 1).
  np.testing.assert_allclose(L.kd(s, t, temperature=3.0), 9.0 * L.kd(s / 3.0, t / 3.0),
                             rtol=1e-5)


def test_traced_temperature_under_jit():
  s, t, _ = make_inputs(9)
  f = jax.jit(lambda s_, t_, temp: L.kd(s_, t_, temperature=temp))
  np.testing.assert_allclose(f(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32), 2.5),
                             np_kd(s, t, 2.5), rtol=1e-5)


# --------------------------------------------------------------------------- registry


def test_hard_and_soft_mixing_through_build_objective():
  """The classic 0.9 KD(T=4) + 0.1 CE objective against numpy."""
  s, t, y = make_inputs(10, shape=(6, C))
  y[2] = -1  # unlabeled: counts for KD, not for CE
  where = np.array([True, True, True, True, False, True])  # padding: counts for neither
  objective = L.build_objective({'kd': dict(weight=0.9, temperature=4.0),
                                 'ce': dict(weight=0.1)})
  assert objective.names == ('kd', 'ce')
  assert objective.needs == {'student_logits', 'teacher_logits', 'labels'}
  inputs = dict(student_logits=jnp.asarray(s, jnp.float32),
                teacher_logits=jnp.asarray(t, jnp.float32), labels=jnp.asarray(y),
                where=jnp.asarray(where), step=jnp.asarray(0))
  params, state = objective.init(jax.random.key(0), inputs)
  loss, _, metrics = jax.jit(objective.apply)(params, state, inputs)

  kd_rows = np_kd(s, t, 4.0)[where]
  ce_rows = np_ce(s, y)[where & (y >= 0)]
  want = 0.9 * kd_rows.mean() + 0.1 * ce_rows.mean()
  np.testing.assert_allclose(loss, want, rtol=1e-5)
  np.testing.assert_allclose(metrics['loss/kd'][0], kd_rows.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics['loss/kd'][1], 5)
  np.testing.assert_allclose(metrics['loss/ce'][0], ce_rows.sum(), rtol=1e-5)
  np.testing.assert_allclose(metrics['loss/ce'][1], 4)

  # And its gradient against the gradient of the numpy formula:
  # d/ds [0.9 * mean T^2 KL(p^T||q^T) + 0.1 * mean CE] per row.
  grad = jax.grad(lambda s_: objective.apply(params, state, {**inputs,
                                                             'student_logits': s_})[0])(
                                                                 inputs['student_logits'])
  p4, q4, q1 = np_softmax(t / 4.0), np_softmax(s / 4.0), np_softmax(s)
  onehot = np.eye(C)[np.maximum(y, 0)]
  want_grad = (0.9 * where[:, None] * 4.0 * (q4 - p4) / where.sum()
               + 0.1 * (where & (y >= 0))[:, None] * (q1 - onehot) / (where & (y >= 0)).sum())
  np.testing.assert_allclose(grad, want_grad, rtol=1e-4, atol=1e-6)


def test_schedule_valued_temperature_and_weight():
  s, t, y = make_inputs(11)
  objective = L.build_objective({
      'kd': dict(weight=dict(schedule='linear', init=0.0, end=1.0, steps=10),
                 temperature=dict(schedule='linear', init=1.0, end=3.0, steps=10))})
  inputs = dict(student_logits=jnp.asarray(s, jnp.float32),
                teacher_logits=jnp.asarray(t, jnp.float32), step=jnp.asarray(5))
  params, state = objective.init(jax.random.key(0), inputs)
  loss, _, _ = objective.apply(params, state, inputs)
  np.testing.assert_allclose(loss, 0.5 * np_kd(s, t, 2.0).mean(), rtol=1e-5)


def test_unknown_option_is_a_config_error():
  with pytest.raises(ValueError, match='kd'):
    L.build_objective({'kd': dict(temprature=4.0)})


RESPONSE_NAMES = ['ce', 'kd', 'reverse_kl', 'generalized_jsd', 'js_divergence', 'skew_kl',
                  'skew_reverse_kl', 'tvd', 'dkd', 'dist', 'logit_standardized_kd', 'bdkd',
                  'taid', 'ctkd', 'sinkhorn_kd', 'pld', 'tf_kd', 'adaptive_weight_kd',
                  'sparse_kd', 'sparse_reverse_kl', 'sparse_generalized_jsd', 'sparse_tvd',
                  'chunked_kd']


@pytest.mark.parametrize('name', RESPONSE_NAMES)
def test_registered_with_family_and_reference(name):
  spec = L.get(name)
  assert spec.family in L.registry.FAMILIES
  assert spec.reference and spec.summary
  assert spec.batch_level == (name in ('dist', 'sinkhorn_kd'))
  # Every registered term builds with its defaults (required options given) and runs.
  required = {'taid': dict(total_steps=10), 'ctkd': dict(curriculum_steps=10)}
  objective = L.build_objective({name: required.get(name, {})})
  s, t, y = make_inputs(21)
  vals, idx = jax.lax.top_k(jnp.asarray(t, jnp.float32), 3)
  inputs = dict(student_logits=jnp.asarray(s, jnp.float32),
                teacher_logits=jnp.asarray(t, jnp.float32), labels=jnp.asarray(y),
                teacher_topk_logits=vals, teacher_topk_indices=idx,
                teacher_logsumexp=jax.nn.logsumexp(jnp.asarray(t, jnp.float32), axis=-1),
                where=jnp.ones((B,), bool), step=jnp.asarray(3))
  assert set(spec.needs) <= set(inputs)
  params, state = objective.init(jax.random.key(0), inputs)
  loss, _, _ = jax.jit(objective.apply)(params, state, inputs)
  assert np.isfinite(float(loss))
