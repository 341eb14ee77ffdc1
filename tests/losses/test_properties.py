"""Property tests: non-negativity, zero at identical inputs, shift invariance per row."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import assume
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import kdjax.losses as L

SETTINGS = settings(max_examples=25, deadline=None, derandomize=True)


@st.composite
def logit_pairs(draw, b=3, c=5):
  # One shape per test keeps it to one compilation per loss (jitted below).
  elems = st.floats(-15.0, 15.0, allow_nan=False, width=32)
  s = draw(hnp.arrays(np.float32, (b, c), elements=elems))
  t = draw(hnp.arrays(np.float32, (b, c), elements=elems))
  y = draw(hnp.arrays(np.int32, (b,), elements=st.integers(0, c - 1)))
  shift_s = draw(hnp.arrays(np.float32, (b, 1), elements=st.floats(-30.0, 30.0, width=32)))
  shift_t = draw(hnp.arrays(np.float32, (b, 1), elements=st.floats(-30.0, 30.0, width=32)))
  return s, t, y, shift_s, shift_t


def _sparse(fn, mode, **kw):
  """A sparse loss fed the full teacher (k = classes) as top-k."""
  def f(s, t, y):
    del y
    vals, idx = jax.lax.top_k(t, t.shape[-1])
    return fn(s, vals, idx, missing_mass=mode,
              teacher_logsumexp=jax.nn.logsumexp(t, axis=-1), **kw)
  return f


# name -> fn(s, t, y): per-example or scalar; all are divergences >= 0 and 0 at s == t.
DIVERGENCES = {
    'kd': lambda s, t, y: L.kd(s, t, temperature=2.0),
    'reverse_kl': lambda s, t, y: L.reverse_kl(s, t, temperature=2.0),
    'generalized_jsd': lambda s, t, y: L.generalized_jsd(s, t, beta=0.3),
    'js_divergence': lambda s, t, y: L.js_divergence(s, t),
    'skew_kl': lambda s, t, y: L.skew_kl(s, t, alpha=0.2),
    'skew_reverse_kl': lambda s, t, y: L.skew_reverse_kl(s, t, alpha=0.2),
    'tvd': lambda s, t, y: L.tvd(s, t),
    'dkd': lambda s, t, y: L.dkd(s, t, y, beta=2.0, temperature=2.0),
    'logit_standardized_kd': lambda s, t, y: L.logit_standardized_kd(s, t),
    'bdkd': lambda s, t, y: L.bdkd(s, t, temperature=2.0),
    'taid': lambda s, t, y: L.taid(s, t, interpolation=0.7),
    'sparse_kd': _sparse(L.sparse_kd, 'uniform', temperature=2.0),
    'sparse_reverse_kl': _sparse(L.sparse_reverse_kl, 'zero'),
    'sparse_generalized_jsd': _sparse(L.sparse_generalized_jsd, 'renormalize', beta=0.6),
    'sparse_tvd': _sparse(L.sparse_tvd, 'uniform'),
}
# Non-negative losses that are not zero at identical inputs.
NON_NEGATIVE = {
    **DIVERGENCES,
    'ce': lambda s, t, y: L.ce(s, y, label_smoothing=0.1),
    'pld': lambda s, t, y: L.pld(s, t, y),
    'tf_kd': lambda s, t, y: L.tf_kd(s, y, correct_prob=0.7, temperature=2.0),
    'adaptive_weight_kd': lambda s, t, y: L.adaptive_weight_kd(s, t, y),
    'dist': lambda s, t, y: L.dist(s, t),
    'sinkhorn_kd': lambda s, t, y: L.sinkhorn_kd(s, t, num_iters=10),
}
DIVERGENCES = {k: jax.jit(v) for k, v in DIVERGENCES.items()}
NON_NEGATIVE = {k: jax.jit(v) for k, v in NON_NEGATIVE.items()}
# Losses that depend on the logits only through softmax (or z-scores, or ranks plus
# softmax): adding a per-row constant to student and/or teacher changes nothing.
# (DIST is tested on rows with some spread below: the Pearson correlation of nearly
# constant rows is ill-conditioned, so float32 rounding of the shift shows.)
SHIFT_INVARIANT = {k: v for k, v in NON_NEGATIVE.items() if k != 'dist'}
SPREAD = np.linspace(0.0, 3.0, 5, dtype=np.float32)


@pytest.mark.parametrize('name', sorted(NON_NEGATIVE))
@SETTINGS
@given(data=logit_pairs())
def test_non_negative(name, data):
  s, t, y, _, _ = data
  value = np.asarray(NON_NEGATIVE[name](jnp.asarray(s), jnp.asarray(t), jnp.asarray(y)))
  assert np.all(np.isfinite(value))
  assert np.all(value >= -1e-5), value


@pytest.mark.parametrize('name', sorted(DIVERGENCES))
@SETTINGS
@given(data=logit_pairs())
def test_zero_at_identical_distributions(name, data):
  s, _, y, shift, _ = data
  s = jnp.asarray(s)
  # Identical distributions, even with different logits: shift the teacher's row.
  value = DIVERGENCES[name](s, s + jnp.asarray(shift), jnp.asarray(y))
  np.testing.assert_allclose(value, 0.0, atol=2e-5)


@pytest.mark.parametrize('name', sorted(SHIFT_INVARIANT))
@SETTINGS
@given(data=logit_pairs())
def test_invariant_to_a_constant_per_row(name, data):
  s, t, y, shift_s, shift_t = data
  fn = SHIFT_INVARIANT[name]
  base = fn(jnp.asarray(s), jnp.asarray(t), jnp.asarray(y))
  if name == 'logit_standardized_kd':
    # z-scoring divides by the row's std (+ eps 1e-7, outside the root, as the reference):
    # a row flat to within float32's rounding of the shift is ill-conditioned, so keep rows
    # whose spread is well above that rounding (30 * 2^-24 ~ 2e-6).
    assume(np.all(np.ptp(s, axis=-1) > 1e-2) and np.all(np.ptp(t, axis=-1) > 1e-2))
  if name == 'pld':
    # Plackett-Luce reads the teacher's ranking: near-ties (closer than the shift's
    # float32 rounding) may swap when shifted, so keep rows whose ties are exact or clear.
    gaps = np.diff(np.sort(t, axis=-1), axis=-1)
    assume(np.all((gaps == 0) | (gaps > 1e-2)))
  moved = fn(jnp.asarray(s + shift_s), jnp.asarray(t + shift_t), jnp.asarray(y))
  # float32: a shift of 30 costs ~30 * 2^-24 relative in every logit.
  np.testing.assert_allclose(moved, base, rtol=1e-3, atol=1e-4)


@SETTINGS
@given(data=logit_pairs())
def test_dist_inter_class_is_zero_for_identical_non_constant_rows(data):
  s, _, _, shift, _ = data
  s = s + np.linspace(0.0, 1.0, s.shape[1], dtype=np.float32)  # never constant
  value = L.dist_inter_class(jnp.asarray(s), jnp.asarray(s + shift))
  np.testing.assert_allclose(value, 0.0, atol=1e-4)


@SETTINGS
@given(data=logit_pairs())
def test_dist_is_shift_invariant_for_rows_with_spread(data):
  s, t, y, shift_s, shift_t = data
  rows = np.arange(1, 4, dtype=np.float32)[:, None]  # spread across classes and examples
  s, t = s + SPREAD * rows, t + SPREAD[::-1] * (2.0 - 0.5 * rows)
  fn = NON_NEGATIVE['dist']
  np.testing.assert_allclose(fn(jnp.asarray(s + shift_s), jnp.asarray(t + shift_t), y),
                             fn(jnp.asarray(s), jnp.asarray(t), y), rtol=1e-3, atol=1e-4)


@SETTINGS
@given(data=logit_pairs(), scale=st.floats(0.1, 10.0))
def test_logit_standardized_kd_is_scale_invariant(data, scale):
  s, t, _, shift_s, _ = data
  s = s + SPREAD  # the 1e-7 variance floor is negligible for rows with some spread
  base = L.logit_standardized_kd(jnp.asarray(s), jnp.asarray(t))
  moved = L.logit_standardized_kd(jnp.asarray(s * np.float32(scale) + shift_s), jnp.asarray(t))
  np.testing.assert_allclose(moved, base, rtol=1e-3, atol=1e-3)


@SETTINGS
@given(data=logit_pairs(), beta=st.floats(0.0, 1.0))
def test_generalized_jsd_bounded_between_zero_and_the_max_kl(data, beta):
  """0 <= JSD_beta <= max over the endpoints' scale: JSD_beta <= beta KL(p||q) style bound."""
  s, t, _, _, _ = data
  s, t = jnp.asarray(s), jnp.asarray(t)
  value = np.asarray(L.generalized_jsd(s, t, beta=beta))
  # Convexity of KL in its second argument: KL(p||m) <= (1-beta) KL(p||q) and
  # KL(q||m) <= beta KL(q||p), so JSD_beta <= beta(1-beta) [KL(p||q) + KL(q||p)].
  if 0.0 < beta < 1.0:
    bound = beta * (1 - beta) * np.asarray(L.kd(s, t) + L.reverse_kl(s, t))
    assert np.all(value <= bound + 1e-4)
  assert np.all(value >= -1e-5)
