"""Stateful response terms: TAID's adaptive interpolation and CTKD's learned temperature."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as L

B, C = 5, 6


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """Exact comparisons: no TF32 (or bfloat16 passes) where XLA turns sums into dots."""
  with jax.default_matmul_precision('highest'):
    yield


def make(seed=0):
  rng = np.random.default_rng(seed)
  return (jnp.asarray(rng.normal(size=(B, C)) * 2.0, jnp.float32),
          jnp.asarray(rng.normal(size=(B, C)) * 2.0, jnp.float32))


# --------------------------------------------------------------------------- taid


def py_taid(losses, *, total_steps, t_start, t_end, alpha, beta):
  """TAID's update written out with Python floats, from the docstring formula (the
  first call only records the loss)."""
  t, m, prev, ts = t_start, 0.0, None, []
  for n, loss in enumerate(losses):
    if prev is not None:
      delta = (prev - loss) / (prev + 1e-15)
      m = beta * m + (1 - beta) * delta
      adaptive = t + alpha / (1 + math.exp(-m)) * (1 - t)
      linear = t_start + (t_end - t_start) * min(n / total_steps, 1.0)
      t = min(max(linear, adaptive), t_end)
    prev = loss
    ts.append(t)
  return ts


def np_cross_entropy(s, t, mix, temperature):
  """Mean over rows of T^2 (-sum p_t log q): the loss value TAID's update sees."""
  s, t = np.asarray(s, np.float64), np.asarray(t, np.float64)
  log_softmax = lambda x: x - x.max(-1, keepdims=True) - np.log(
      np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True))
  p = np.exp(log_softmax(((1 - mix) * s + mix * t) / temperature))
  return float(np.mean(-(p * log_softmax(s / temperature)).sum(-1)) * temperature**2)


def test_taid_update_matches_python_reference():
  losses = [3.0, 2.0, 1.5, 1.4, 1.45, 0.9, 0.5, 0.45, 0.44, 0.43, 0.42, 0.41]
  kw = dict(total_steps=10, t_start=0.2, t_end=0.9, alpha=0.2, beta=0.5)
  state = L.taid_init(0.2)
  got = []
  for n, loss in enumerate(losses):
    state = L.taid_update(state, loss, n, **kw)
    got.append(float(state.interpolation))
  np.testing.assert_allclose(got, py_taid(losses, **kw), rtol=1e-6)
  assert got[0] == pytest.approx(0.2)  # the first step only records its loss
  # With a large alpha the adaptive branch wins over the linear floor at some step.
  linear = [0.2 + 0.7 * min(n / 10, 1.0) for n in range(len(losses))]
  assert any(g > l + 1e-6 for g, l in zip(got, linear))
  assert got[-1] == pytest.approx(0.9)


def test_taid_at_one_is_kd_and_at_zero_is_zero():
  s, t = make(1)
  np.testing.assert_allclose(L.taid(s, t, interpolation=1.0, temperature=2.0),
                             L.kd(s, t, temperature=2.0), rtol=1e-6)
  np.testing.assert_allclose(L.taid(s, t, interpolation=0.0), 0.0, atol=1e-6)


def test_taid_term_carries_state_through_build_objective():
  s, t = make(2)
  objective = L.build_objective({'taid': dict(total_steps=4, t_start=0.4, alpha=0.1,
                                              temperature=2.0)})
  inputs = dict(student_logits=s, teacher_logits=t, step=jnp.asarray(0))
  params, state = objective.init(jax.random.key(0), inputs)
  assert params == {'taid': {}}
  assert float(state['taid'].interpolation) == pytest.approx(0.4)
  apply = jax.jit(objective.apply)
  ts, losses = [], []
  for step in range(6):
    t_now = float(state['taid'].interpolation)
    loss, state, _ = apply(params, state, {**inputs, 'step': jnp.asarray(step)})
    np.testing.assert_allclose(
        loss, jnp.mean(L.taid(s, t, interpolation=t_now, temperature=2.0)), rtol=1e-5)
    ts.append(float(state['taid'].interpolation))
    # The update sees the cross-entropy (KL + the target's entropy), as the authors' code.
    losses.append(np_cross_entropy(s, t, t_now, 2.0))
    np.testing.assert_allclose(float(state['taid'].prev_loss), losses[-1], rtol=1e-5)
  np.testing.assert_allclose(ts, py_taid(losses, total_steps=4, t_start=0.4, t_end=1.0,
                                         alpha=0.1, beta=0.99), rtol=1e-5)
  assert all(b >= a for a, b in zip(ts, ts[1:])) and ts[-1] == pytest.approx(1.0)


def test_taid_options_are_checked():
  with pytest.raises(ValueError, match='total_steps'):
    L.build_objective({'taid': dict(t_start=0.4)})
  with pytest.raises(ValueError, match='t_start'):
    L.build_objective({'taid': dict(total_steps=10, t_start=1.5)})


# --------------------------------------------------------------------------- ctkd


def test_gradient_reversal_is_identity_forward_and_negated_backward():
  x = jnp.asarray([1.0, -2.0])
  np.testing.assert_array_equal(L.gradient_reversal(x, 0.7), x)
  g = jax.grad(lambda x_: jnp.sum(jnp.square(L.gradient_reversal(x_, 0.7))))(x)
  np.testing.assert_allclose(g, -0.7 * 2.0 * x, rtol=1e-6)


def test_ctkd_reversal_schedule_matches_cosine_formula():
  for n in [0, 3, 5, 10, 20]:
    want = 0.1 + 0.5 * 0.8 * (1 + math.cos((1 + min(n / 10, 1)) * math.pi))
    got = float(L.ctkd_reversal(n, curriculum_steps=10, lambda_min=0.1, lambda_max=0.9))
    assert got == pytest.approx(want, abs=1e-6)


def test_ctkd_temperature_param_round_trip():
  theta = L.ctkd_temperature_param(4.0, t_min=1.0, t_max=21.0)
  assert float(L.ctkd_temperature(theta, t_min=1.0, t_max=21.0)) == pytest.approx(4.0)
  with pytest.raises(ValueError):
    L.ctkd_temperature_param(30.0)


def test_ctkd_gradients_student_descends_temperature_ascends():
  s, t = make(3)
  theta = jnp.asarray(L.ctkd_temperature_param(3.0))
  lam = 0.6
  loss = lambda s_, th: jnp.sum(L.ctkd(s_, t, temperature_param=th, reversal=lam))
  g_s, g_theta = jax.grad(loss, argnums=(0, 1))(s, theta)
  plain = lambda s_, th: jnp.sum(L.kd(s_, t, temperature=L.ctkd_temperature(th)))
  p_s, p_theta = jax.grad(plain, argnums=(0, 1))(s, theta)
  np.testing.assert_allclose(g_s, p_s, rtol=1e-6)
  np.testing.assert_allclose(g_theta, -lam * p_theta, rtol=1e-5)
  # And d kd / d theta by finite differences in float64 (the un-reversed gradient).
  with jax.enable_x64(True):
    s64, t64 = jnp.asarray(s, jnp.float64), jnp.asarray(t, jnp.float64)
    f = lambda th: float(jnp.sum(L.kd(s64, t64, temperature=L.ctkd_temperature(th))))
    fd = (f(float(theta) + 1e-6) - f(float(theta) - 1e-6)) / 2e-6
  np.testing.assert_allclose(p_theta, fd, rtol=1e-3)


def test_ctkd_term_has_a_trainable_temperature():
  s, t = make(4)
  objective = L.build_objective({'ctkd': dict(curriculum_steps=10, t_init=4.0)})
  where = jnp.asarray([True, True, False, True, True])
  inputs = dict(student_logits=s, teacher_logits=t, where=where, step=jnp.asarray(5))
  params, state = objective.init(jax.random.key(0), inputs)
  assert set(params['ctkd']) == {'temperature'}
  loss, new_state, _ = objective.apply(params, state, inputs)
  w = np.asarray(where)
  np.testing.assert_allclose(loss, np.mean(np.asarray(L.kd(s, t, temperature=4.0))[w]),
                             rtol=1e-5)
  assert float(new_state['ctkd']['temperature']) == pytest.approx(4.0, rel=1e-5)
  assert float(new_state['ctkd']['reversal']) == pytest.approx(0.5, abs=1e-6)
  grads = jax.grad(lambda p: objective.apply(p, state, inputs)[0])(params)
  plain = jax.grad(lambda th: jnp.sum(jnp.where(
      where, L.kd(s, t, temperature=L.ctkd_temperature(th)), 0.0)) / 4.0)(
          params['ctkd']['temperature'])
  np.testing.assert_allclose(grads['ctkd']['temperature'], -0.5 * plain, rtol=1e-5)
