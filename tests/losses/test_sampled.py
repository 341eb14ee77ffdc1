"""sampled_kd (Random-Sampling KD) against a numpy transcription of the paper's estimator.

Anshumann, Zaidi, Kedia, et al. Sparse Logit Sampling: Accelerating Knowledge
Distillation in LLMs. ACL 2025, arXiv:2503.16870: ``N`` tokens drawn i.i.d. from a
proposal ``q ∝ p^(1/tau)``; the sparse target of a sampled class ``i`` with count ``c_i``
is ``c_i (p_i / q_i) / sum_j c_j (p_j / q_j)`` (``c_i / N`` at ``tau = 1``), and the
student learns by cross-entropy on it. (No code of the authors was public; the formula
is transcribed from the paper.)
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.errors import UserError
from kdjax.losses import get as get_loss
from kdjax.losses import sampled_kd


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _paper_target(p, draws, tau):
  """The paper's sparse target per row (float64): counts times p/q, normalized."""
  q = _softmax(np.log(p) / tau)
  target = np.zeros_like(p)
  for row, x in enumerate(draws):
    for i in x:
      target[row, i] += p[row, i] / q[row, i]
  return target / target.sum(-1, keepdims=True)


@pytest.mark.parametrize('tau,temperature', [(1.0, 1.0), (0.7, 1.0), (1.0, 2.0), (1.5, 0.5)])
def test_value_and_gradient_match_the_papers_formula_in_float64(tau, temperature):
  rng = np.random.default_rng(0)
  rows, vocab, n = 6, 11, 9
  with jax.enable_x64(True):
    p = _softmax(rng.normal(0, 1.5, (rows, vocab)))
    q = _softmax(np.log(p) / tau)
    draws = np.stack([rng.choice(vocab, n, p=q[r]) for r in range(rows)])
    ratio = np.take_along_axis(p / q, draws, -1)               # p/q of each draw
    weights = ratio / ratio.sum(-1, keepdims=True)
    s = rng.normal(0, 2, (rows, vocab))
    where = np.array([True, True, False, True, True, False])

    target = _paper_target(p, draws, tau)
    log_q_s = np.log(_softmax(s / temperature))
    want = np.where(where, -temperature**2 * np.sum(target * log_q_s, -1), 0.0)
    want_grad = where[:, None] * temperature * (_softmax(s / temperature) - target)

    loss = lambda s: sampled_kd(s, draws, weights, temperature=temperature, where=where)
    got = loss(jnp.asarray(s))
    grad = jax.grad(lambda s: jnp.sum(loss(s)))(jnp.asarray(s))
    assert got.dtype == jnp.float64
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-12)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-6, atol=1e-12)
    # Masked rows: exactly zero value and gradient, even for non-finite logits there.
    s_bad = jnp.asarray(s).at[2].set(jnp.nan)
    grad_bad = jax.grad(lambda s: jnp.sum(loss(s)))(s_bad)
    assert np.all(np.asarray(grad_bad)[~where] == 0.0) and np.all(np.isfinite(grad_bad))
    assert np.all(np.asarray(loss(s_bad))[~where] == 0.0)


def test_gradient_is_unbiased_for_the_full_forward_kl():
  """Mean of the estimator's gradient over M draw sets = the dense KL gradient.

  Monte-Carlo tolerance: with ``q = p`` the gradient is ``softmax(s) - c/N``, whose
  component ``i`` has variance ``p_i (1 - p_i) / N``; the mean of ``M`` independent sets
  is within 5 standard errors ``5 sqrt(p_i (1 - p_i) / (N M))`` of its expectation
  (seeded, so the check is deterministic). The top-k estimator (renormalized top 3) is
  biased: it falls outside the same band, so the test can fail.
  """
  rng = np.random.default_rng(1)
  vocab, n, m = 12, 8, 20000
  p = _softmax(rng.normal(0, 1.0, vocab))
  s = rng.normal(0, 1.0, vocab).astype(np.float32)
  draws = rng.choice(vocab, (m, n), p=p)
  weights = np.full((m, n), 1.0 / n, np.float32)
  with jax.default_matmul_precision('highest'):
    grads = jax.grad(lambda s: jnp.sum(sampled_kd(s, draws, weights)))(
        jnp.broadcast_to(jnp.asarray(s), (m, vocab)))
  dense = _softmax(s.astype(np.float64)) - p                     # d KL(p || softmax(s)) / ds
  band = 5 * np.sqrt(p * (1 - p) / (n * m))
  mean = np.asarray(grads, np.float64).mean(0)
  assert np.all(np.abs(mean - dense) <= band + 1e-6), (mean - dense, band)
  top = np.argsort(-p)[:3]
  biased = _softmax(s.astype(np.float64)).copy()
  biased[top] -= p[top] / p[top].sum()
  assert np.any(np.abs(biased - dense) > band + 1e-6)


def test_registered_term_reads_the_cache_keys_and_refuses_without_them():
  rng = np.random.default_rng(2)
  s = jnp.asarray(rng.normal(size=(2, 3, 7)), jnp.float32)
  idx = jnp.asarray(rng.integers(0, 7, (2, 3, 4)))
  w = jnp.full((2, 3, 4), 0.25)
  where = jnp.array([[True, True, False], [True, False, True]])
  spec = get_loss('sampled_kd')
  assert spec.needs == ('student_logits', 'teacher_sample_indices', 'teacher_sample_weights')
  term = spec.factory(temperature=2.0)
  inputs = {'student_logits': s, 'teacher_sample_indices': idx, 'teacher_sample_weights': w,
            'where': where, 'step': 0}
  value, _ = term.apply({}, {}, inputs)
  np.testing.assert_allclose(value, sampled_kd(s, idx, w, temperature=2.0, where=where))
  with pytest.raises(UserError, match='sampled teacher cache'):
    term.apply({}, {}, {'student_logits': s, 'teacher_logits': s, 'where': where})
