"""Divergences between tempered teacher and student softmaxes beyond forward/reverse KL.

Generalized Jensen-Shannon (GKD), skew KL and skew reverse KL (DistiLLM), total
variation distance. Same conventions as :mod:`kdjax.losses.logits`: per-example
values, float32 compute, ``where`` masks value and gradient exactly.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

from kdjax.losses import registry
from kdjax.losses._logit_helpers import kl_from_log_probs
from kdjax.losses._logit_helpers import log_softmax_pair
from kdjax.losses._logit_helpers import mask_value
from kdjax.losses._logit_helpers import prepare
from kdjax.losses._logit_helpers import rows

Array = jax.Array

GKD_2024 = ('Agarwal, Vieillard, Zhou, Stanczyk, Ramos, Geist, Bachem. On-Policy '
            'Distillation of Language Models: Learning from Self-Generated Mistakes. '
            'ICLR 2024. arXiv:2306.13649')
LIN_1991 = ('Lin. Divergence Measures Based on the Shannon Entropy. IEEE Transactions on '
            'Information Theory 37(1), 1991')
DISTILLM_2024 = ('Ko, Kim, Chen, Yun. DistiLLM: Towards Streamlined Distillation for Large '
                 'Language Models. ICML 2024. arXiv:2402.03898')
SINKD_2024 = ('Cui, Qin, Gao, Zhang, Xu, Wu, Li, Sun, Zhou, Li. Sinkhorn Distance '
              'Minimization for Knowledge Distillation. LREC-COLING 2024. arXiv:2402.17110')
FDIV_2023 = ('Wen, Li, Du, Mou. f-Divergence Minimization for Sequence-Level Knowledge '
             'Distillation. ACL 2023. arXiv:2307.15190')


def _mixture_log_probs(log_p, log_q, weight_p):
  """``log(w p + (1 - w) q)``, stable; ``w`` in ``[0, 1]``."""
  weight_p = jnp.asarray(weight_p, log_p.dtype)
  return jnp.logaddexp(jnp.log(weight_p) + log_p, jnp.log1p(-weight_p) + log_q)


def _gjsd_interior(log_p, log_q, beta, axis):
  log_m = _mixture_log_probs(log_p, log_q, beta)
  return (beta * kl_from_log_probs(log_p, log_m, axis)
          + (1.0 - beta) * kl_from_log_probs(log_q, log_m, axis))


def gjsd_from_log_probs(log_p, log_q, beta, axis: int = -1) -> Array:
  """Generalized JSD between teacher ``log_p`` and student ``log_q`` (no T², no mask).

  ``beta == 0`` is forward KL(p||q) and ``beta == 1`` reverse KL(q||p), exactly.
  """
  if isinstance(beta, numbers.Real):
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
      raise ValueError(f'beta must be in [0, 1], got {beta}')
    if beta == 0.0:
      return kl_from_log_probs(log_p, log_q, axis)
    if beta == 1.0:
      return kl_from_log_probs(log_q, log_p, axis)
    return _gjsd_interior(log_p, log_q, beta, axis)
  # A traced beta (a schedule): compute the three branches, pick without NaNs.
  beta = jnp.asarray(beta, log_p.dtype)
  at_zero, at_one = beta <= 0.0, beta >= 1.0
  safe_beta = jnp.where(at_zero | at_one, 0.5, beta)
  interior = _gjsd_interior(log_p, log_q, safe_beta, axis)
  forward = kl_from_log_probs(log_p, log_q, axis)
  reverse = kl_from_log_probs(log_q, log_p, axis)
  return jnp.where(at_zero, forward, jnp.where(at_one, reverse, interior))


def generalized_jsd(student_logits, teacher_logits, *, beta=0.5, temperature=1.0,
                    where=None, axis: int = -1) -> Array:
  r"""Generalized Jensen-Shannon divergence of GKD, times T².

  With teacher :math:`p = \mathrm{softmax}(t/T)`, student
  :math:`q = \mathrm{softmax}(s/T)` and :math:`m = \beta p + (1-\beta) q`:

  .. math::

    \ell = T^2\big[\beta\,\mathrm{KL}(p\,\|\,m) + (1-\beta)\,\mathrm{KL}(q\,\|\,m)\big],
    \quad 0 < \beta < 1

  As in GKD, the endpoints are defined as the limits of
  :math:`\ell/\beta` and :math:`\ell/(1-\beta)`: :math:`\beta = 0` is the forward KL
  :math:`T^2\,\mathrm{KL}(p\|q)` and :math:`\beta = 1` the reverse KL
  :math:`T^2\,\mathrm{KL}(q\|p)` (the unnormalized formula itself goes to 0 at both
  ends, like :math:`\beta\,\mathrm{KL}(p\|q)` near 0).

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    beta: :math:`\beta \in [0, 1]`, a float or a traced scalar (schedule).
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Agarwal et al. On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes. ICLR 2024. arXiv:2306.13649.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(generalized_jsd(s, t, beta=0.5).round(4), generalized_jsd(s, t, beta=0.0).round(4))
  [0.0324] [0.1156]
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  log_q, log_p, temperature = log_softmax_pair(s, t, temperature, axis)
  return mask_value(where, temperature**2 * gjsd_from_log_probs(log_p, log_q, beta, axis))


def js_divergence(student_logits, teacher_logits, *, temperature=1.0, where=None,
                  axis: int = -1) -> Array:
  r"""Jensen-Shannon divergence, times T²: :func:`generalized_jsd` at :math:`\beta = 1/2`.

  .. math::

    \ell = \tfrac{T^2}{2}\big[\mathrm{KL}(p\,\|\,m) + \mathrm{KL}(q\,\|\,m)\big],
    \quad m = \tfrac12 (p + q)

  Bounded by :math:`T^2 \log 2`, symmetric in teacher and student.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Lin. Divergence Measures Based on the Shannon Entropy. IEEE Transactions on
    Information Theory 37(1), 1991.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[9.0, 0.0]]); t = jnp.array([[0.0, 9.0]])
  >>> print(f'{float(js_divergence(s, t)[0]):.3f}')  # close to log 2 = 0.693
  0.692
  """
  return generalized_jsd(student_logits, teacher_logits, beta=0.5, temperature=temperature,
                         where=where, axis=axis)


def skew_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0, where=None,
            axis: int = -1) -> Array:
  r"""Skew KL divergence of DistiLLM, times T².

  .. math::

    \ell = T^2\,\mathrm{KL}\big(p \,\|\, \alpha p + (1-\alpha) q\big)

  :math:`\alpha = 0` is the forward KL; mixing a little of the teacher into the
  student keeps the divergence and its gradient bounded where :math:`q \to 0`.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    alpha: skew :math:`\alpha \in [0, 1)`.
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Ko, Kim, Chen, Yun. DistiLLM: Towards Streamlined Distillation for Large Language
    Models. ICML 2024. arXiv:2402.03898.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(f'{float(skew_kl(s, t, alpha=0.0)[0]):.4f} {float(skew_kl(s, t, alpha=0.1)[0]):.4f}')
  0.1156 0.0974
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  log_q, log_p, temperature = log_softmax_pair(s, t, temperature, axis)
  log_m = _mixture_log_probs(log_p, log_q, alpha)
  return mask_value(where, temperature**2 * kl_from_log_probs(log_p, log_m, axis))


def skew_reverse_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0,
                    where=None, axis: int = -1) -> Array:
  r"""Skew reverse KL divergence of DistiLLM, times T².

  .. math::

    \ell = T^2\,\mathrm{KL}\big(q \,\|\, (1-\alpha) p + \alpha q\big)

  :math:`\alpha = 0` is the reverse KL.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    alpha: skew :math:`\alpha \in [0, 1)`.
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Ko, Kim, Chen, Yun. DistiLLM: Towards Streamlined Distillation for Large Language
    Models. ICML 2024. arXiv:2402.03898.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(skew_reverse_kl(s, t, alpha=0.0).round(4))
  [0.1601]
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  log_q, log_p, temperature = log_softmax_pair(s, t, temperature, axis)
  alpha = jnp.asarray(alpha, log_q.dtype)
  log_m = _mixture_log_probs(log_p, log_q, 1.0 - alpha)
  return mask_value(where, temperature**2 * kl_from_log_probs(log_q, log_m, axis))


def tvd(student_logits, teacher_logits, *, temperature=1.0, where=None,
        axis: int = -1) -> Array:
  r"""Total variation distance between tempered softmaxes (no T² factor).

  .. math::

    \ell = \tfrac12 \sum_c \big|p^T_c - q^T_c\big| \in [0, 1]

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Wen, Li, Du, Mou. f-Divergence Minimization for Sequence-Level Knowledge
    Distillation. ACL 2023. arXiv:2307.15190.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[0.0, 0.0]]); t = jnp.array([[0.0, 30.0]])
  >>> print(tvd(s, t).round(4))
  [0.5]
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  log_q, log_p, _ = log_softmax_pair(s, t, temperature, axis)
  return mask_value(where, 0.5 * jnp.sum(jnp.abs(jnp.exp(log_p) - jnp.exp(log_q)), axis=axis))


def _pairwise_cost(p, q, cost: str):
  if cost == 'sqeuclidean':
    return jnp.sum(jnp.square(p[:, None, :] - q[None, :, :]), axis=-1)
  if cost == 'l1':
    return jnp.sum(jnp.abs(p[:, None, :] - q[None, :, :]), axis=-1)
  raise ValueError(f"cost must be 'sqeuclidean' or 'l1', got {cost!r}")


def sinkhorn_kd(student_logits, teacher_logits, *, temperature=1.0, epsilon=0.1,
                num_iters: int = 20, cost: str = 'sqeuclidean', where=None,
                axis: int = -1) -> Array:
  r"""Batch-wise Sinkhorn distance between teacher and student predictions (batch-level).

  The :math:`N` unmasked examples of the batch (all leading axes flattened) give two
  empirical measures with uniform weights, one over the teacher's tempered softmax
  vectors :math:`p_i` and one over the student's :math:`q_j`. With the cost
  :math:`C_{ij} = \|p_i - q_j\|_2^2` (or :math:`\|p_i - q_j\|_1`) and the
  entropy-regularized transport plan :math:`P^\star` found by ``num_iters``
  log-domain Sinkhorn iterations,

  .. math::

    P^\star = \arg\min_{P \in U(\frac1N\mathbf 1, \frac1N\mathbf 1)}
      \langle P, C\rangle - \epsilon H(P),\qquad \ell = \langle P^\star, C\rangle

  Comparing every teacher prediction with every student prediction lets the loss
  see the geometry of the batch, not only matched pairs. Gradients flow through
  the unrolled iterations. Returns a scalar; the value is not exactly zero for
  identical inputs (entropic blur, small for small :math:`\epsilon`).

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: :math:`T > 0` of both softmaxes.
    epsilon: entropic regularization :math:`\epsilon > 0`.
    num_iters: Sinkhorn iterations (each updates both potentials).
    cost: ``'sqeuclidean'`` or ``'l1'``.
    where: optional boolean mask of the per-example shape; masked examples carry
      no mass.
    axis: the class axis.

  Returns:
    A float32 scalar.

  References:
    Cui et al. Sinkhorn Distance Minimization for Knowledge Distillation.
    LREC-COLING 2024. arXiv:2402.17110.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[4.0, 0.0], [0.0, 4.0]])
  >>> print(round(float(sinkhorn_kd(s, s[::-1], epsilon=0.01)), 4))  # same set, permuted
  0.0
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  log_q, log_p, _ = log_softmax_pair(s, t, temperature, axis)
  q, w = rows(jnp.exp(log_q), where, axis)
  p, _ = rows(jnp.exp(log_p), where, axis)
  c = _pairwise_cost(p, q, cost)
  n = c.shape[0]
  if w is None:
    valid = jnp.ones((n,), bool)
  else:
    valid = w[:, 0] > 0
  count = jnp.sum(valid)
  very_negative = jnp.asarray(-1e30, c.dtype)
  log_mass = jnp.where(valid, -jnp.log(jnp.maximum(count, 1).astype(c.dtype)), very_negative)
  eps = jnp.asarray(epsilon, c.dtype)

  def iteration(carry, _):
    f, g = carry
    f = eps * (log_mass - jax.nn.logsumexp((g[None, :] - c) / eps, axis=1))
    g = eps * (log_mass - jax.nn.logsumexp((f[:, None] - c) / eps, axis=0))
    return (f, g), None

  f0 = jnp.zeros((n,), c.dtype)
  g0 = jnp.where(valid, 0.0, very_negative)  # masked columns carry no mass from the start
  (f, g), _ = jax.lax.scan(iteration, (f0, g0), None, length=num_iters)
  plan = jnp.exp((f[:, None] + g[None, :] - c) / eps)
  return jnp.where(count > 0, jnp.sum(plan * c), 0.0)


# --------------------------------------------------------------------------- registry


@registry.register('generalized_jsd', family='response', reference=GKD_2024)
def _generalized_jsd_term(*, beta: Any = 0.5, temperature: Any = 1.0) -> registry.Term:
  """Generalized Jensen-Shannon divergence (GKD); beta=0 forward KL, beta=1 reverse KL."""
  return registry.logit_term(generalized_jsd, beta=beta, temperature=temperature)


@registry.register('js_divergence', family='response', reference=LIN_1991)
def _js_divergence_term(*, temperature: Any = 1.0) -> registry.Term:
  """Jensen-Shannon divergence between teacher and student, times T²."""
  return registry.logit_term(js_divergence, temperature=temperature)


@registry.register('skew_kl', family='response', reference=DISTILLM_2024)
def _skew_kl_term(*, alpha: Any = 0.1, temperature: Any = 1.0) -> registry.Term:
  """Skew KL: KL(p || alpha p + (1 - alpha) q) (DistiLLM)."""
  return registry.logit_term(skew_kl, alpha=alpha, temperature=temperature)


@registry.register('skew_reverse_kl', family='response', reference=DISTILLM_2024)
def _skew_reverse_kl_term(*, alpha: Any = 0.1, temperature: Any = 1.0) -> registry.Term:
  """Skew reverse KL: KL(q || (1 - alpha) p + alpha q) (DistiLLM)."""
  return registry.logit_term(skew_reverse_kl, alpha=alpha, temperature=temperature)


@registry.register('tvd', family='response', reference=FDIV_2023)
def _tvd_term(*, temperature: Any = 1.0) -> registry.Term:
  """Total variation distance between tempered teacher and student softmaxes."""
  return registry.logit_term(tvd, temperature=temperature)


@registry.register('sinkhorn_kd', family='response', reference=SINKD_2024, batch_level=True)
def _sinkhorn_kd_term(*, temperature: Any = 1.0, epsilon: Any = 0.1, num_iters: int = 20,
                      cost: str = 'sqeuclidean') -> registry.Term:
  """Batch-wise Sinkhorn distance between teacher and student predictions (batch-level)."""
  def fn(inputs):
    opts = registry.resolve(dict(temperature=temperature, epsilon=epsilon),
                            inputs.get('step', 0))
    return sinkhorn_kd(inputs['student_logits'], inputs['teacher_logits'],
                       num_iters=num_iters, cost=cost, where=inputs.get('where'), **opts)
  return registry.stateless(fn)
