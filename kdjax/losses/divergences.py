"""Divergences between tempered teacher and student softmaxes beyond forward/reverse KL.

Generalized Jensen-Shannon (GKD), skew KL and skew reverse KL (DistiLLM), total
variation distance, and the batch-wise Sinkhorn distance (SinKD). Same conventions
as :mod:`kdjax.losses.logits`: per-example values, float32 compute, ``where`` masks
value and gradient exactly, and an entry where either logit is infinite contributes
zero (DistiLLM's guard; finite values and gradients for ``-inf`` padded columns).
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

from kdjax.losses import registry
from kdjax.losses._logit_helpers import kl_from_log_probs
from kdjax.losses._logit_helpers import mask_value
from kdjax.losses._logit_helpers import prepare
from kdjax.losses._logit_helpers import probs
from kdjax.losses._logit_helpers import rows
from kdjax.losses._logit_helpers import tempered_log_probs

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


def _gjsd_interior(log_p, log_q, beta, axis, skip):
  log_m = _mixture_log_probs(log_p, log_q, beta)
  return (beta * kl_from_log_probs(log_p, log_m, axis, skip)
          + (1.0 - beta) * kl_from_log_probs(log_q, log_m, axis, skip))


def gjsd_from_log_probs(log_p, log_q, beta, axis: int = -1, skip=None) -> Array:
  """Generalized JSD between teacher ``log_p`` and student ``log_q`` (no T², no mask).

  ``beta == 0`` is forward KL(p||q) and ``beta == 1`` reverse KL(q||p), exactly.
  Entries in ``skip`` contribute zero.
  """
  if isinstance(beta, numbers.Real):
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
      raise ValueError(f'beta must be in [0, 1], got {beta}')
    if beta == 0.0:
      return kl_from_log_probs(log_p, log_q, axis, skip)
    if beta == 1.0:
      return kl_from_log_probs(log_q, log_p, axis, skip)
    return _gjsd_interior(log_p, log_q, beta, axis, skip)
  # A traced beta (a schedule): compute the three branches, pick without NaNs.
  beta = jnp.asarray(beta, log_p.dtype)
  at_zero, at_one = beta <= 0.0, beta >= 1.0
  safe_beta = jnp.where(at_zero | at_one, 0.5, beta)
  interior = _gjsd_interior(log_p, log_q, safe_beta, axis, skip)
  forward = kl_from_log_probs(log_p, log_q, axis, skip)
  reverse = kl_from_log_probs(log_q, log_p, axis, skip)
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

  At :math:`T = 1` the per-token values are TRL's ``GKDTrainer.generalized_jsd_loss``
  (``reduction='none'``, summed over the vocabulary; TRL does not multiply by
  :math:`T^2`). DistiLLM's ``js_distance(lam)`` is ``beta = 1 - lam``.

  References:
    Agarwal et al. On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes. ICLR 2024. arXiv:2306.13649. Reference code:
    huggingface/trl, ``trl/experimental/gkd/gkd_trainer.py``
    (``GKDTrainer.generalized_jsd_loss``).

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(generalized_jsd(s, t, beta=0.5).round(4), generalized_jsd(s, t, beta=0.0).round(4))
  [0.0324] [0.1156]
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  lp = tempered_log_probs(s, t, temperature, axis)
  return mask_value(where, lp.temperature**2 * gjsd_from_log_probs(lp.log_p, lp.log_q, beta,
                                                                   axis, lp.skip))


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
  DistiLLM's ``skewed_forward_kl(lam=alpha)`` has the same gradient at :math:`T = 1`;
  its value is the cross-entropy :math:`-\sum p \log m`, this plus the teacher's
  entropy :math:`H(p)` (a constant for the student).

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
    Models. ICML 2024. arXiv:2402.03898. Reference code: jongwooko/distillm,
    ``distillm/losses.py``.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(f'{float(skew_kl(s, t, alpha=0.0)[0]):.4f} {float(skew_kl(s, t, alpha=0.1)[0]):.4f}')
  0.1156 0.0974
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  lp = tempered_log_probs(s, t, temperature, axis)
  log_m = _mixture_log_probs(lp.log_p, lp.log_q, alpha)
  return mask_value(where, lp.temperature**2 * kl_from_log_probs(lp.log_p, log_m, axis,
                                                                 lp.skip))


def skew_reverse_kl(student_logits, teacher_logits, *, alpha=0.1, temperature=1.0,
                    where=None, axis: int = -1) -> Array:
  r"""Skew reverse KL divergence of DistiLLM, times T².

  .. math::

    \ell = T^2\,\mathrm{KL}\big(q \,\|\, (1-\alpha) p + \alpha q\big)

  :math:`\alpha = 0` is the reverse KL. At :math:`T = 1` this is DistiLLM's
  ``skewed_reverse_kl(lam=alpha)``, value and gradient.

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
    Models. ICML 2024. arXiv:2402.03898. Reference code: jongwooko/distillm,
    ``distillm/losses.py``.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(skew_reverse_kl(s, t, alpha=0.0).round(4))
  [0.1601]
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  lp = tempered_log_probs(s, t, temperature, axis)
  alpha = jnp.asarray(alpha, lp.log_q.dtype)
  log_m = _mixture_log_probs(lp.log_p, lp.log_q, 1.0 - alpha)
  return mask_value(where, lp.temperature**2 * kl_from_log_probs(lp.log_q, log_m, axis,
                                                                 lp.skip))


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

  At :math:`T = 1` this is DistiLLM's ``tv_distance`` per token.

  References:
    Wen, Li, Du, Mou. f-Divergence Minimization for Sequence-Level Knowledge
    Distillation. ACL 2023. arXiv:2307.15190. Reference code: jongwooko/distillm,
    ``distillm/losses.py`` (``tv_distance``).

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[0.0, 0.0]]); t = jnp.array([[0.0, 30.0]])
  >>> print(tvd(s, t).round(4))
  [0.5]
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  lp = tempered_log_probs(s, t, temperature, axis)
  diff = jnp.abs(probs(lp.log_p, lp.skip) - probs(lp.log_q, lp.skip))
  return mask_value(where, 0.5 * jnp.sum(diff, axis=axis))


SINKHORN_COSTS = ('l1', 'sqeuclidean')
SINKHORN_MARGINALS = ('ones', 'uniform')


def _pairwise_cost(q, p, keep, cost: str):
  """``[N, N]`` cost between student rows ``q`` and teacher rows ``p``; classes with
  ``keep[i, j, c]`` False add nothing."""
  diff = jnp.where(keep, q[:, None, :] - p[None, :, :], 0.0)
  if cost == 'sqeuclidean':
    return jnp.sum(jnp.square(diff), axis=-1)
  if cost == 'l1':
    return jnp.sum(jnp.abs(diff), axis=-1)
  raise ValueError(f'cost must be one of {SINKHORN_COSTS}, got {cost!r}')


def sinkhorn_kd(student_logits, teacher_logits, *, temperature=2.0, epsilon=0.1,
                num_iters: int = 20, cost: str = 'l1', marginal: str = 'ones', where=None,
                axis: int = -1) -> Array:
  r"""SinKD: batch-wise Sinkhorn distance between student and teacher predictions.

  The :math:`N` unmasked examples of the batch (all leading axes flattened) give the
  student's tempered softmax vectors :math:`q_i` and the teacher's :math:`p_j`. With
  the cost :math:`C_{ij} = \|q_i - p_j\|_1` (``cost='l1'``, the authors' choice) or
  :math:`\|q_i - p_j\|_2^2` (``'sqeuclidean'``), the transport plan is found by
  ``num_iters`` Sinkhorn iterations from the kernel :math:`e^{-C/\epsilon}`, each one
  scaling the rows (students) to their marginal, then the columns (teachers):

  .. math::

    P \leftarrow \mathrm{diag}(a / P\mathbf 1)\,P,\quad
    P \leftarrow P\,\mathrm{diag}(b / P^\top\mathbf 1),\qquad
    \ell = \langle P, C\rangle

  With ``marginal='ones'`` (the default) every example carries mass 1 (:math:`a = b =
  \mathbf 1`, the plan sums to :math:`N`): the authors' ``sinkhorn_loss`` exactly, at
  their defaults (``T = 2``, :math:`\epsilon = 0.1`, 20 iterations, L1). Their
  ``Sinkhorn.forward`` then multiplies by 0.001 and their GLUE scripts by
  ``--beta 0.8``: weight the term 0.0008 to reproduce it. ``marginal='uniform'``
  gives each example mass :math:`1/N` (a probability plan; the value is
  :math:`1/N` of the default). The iterations run in the log domain (same plan,
  no underflow), unrolled, and gradients flow through them. Returns a scalar; the
  value is not exactly zero for identical inputs (entropic blur).

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: :math:`T > 0` of both softmaxes.
    epsilon: entropic regularization :math:`\epsilon > 0`.
    num_iters: Sinkhorn iterations (each scales the rows, then the columns).
    cost: ``'l1'`` or ``'sqeuclidean'``.
    marginal: ``'ones'`` (mass 1 per example) or ``'uniform'`` (mass 1/N).
    where: optional boolean mask of the per-example shape; masked examples carry
      no mass.
    axis: the class axis.

  Returns:
    A float32 scalar.

  References:
    Cui et al. Sinkhorn Distance Minimization for Knowledge Distillation.
    LREC-COLING 2024. arXiv:2402.17110. Reference code: 2018cx/SinKD, ``loss.py``
    (``Sinkhorn.sinkhorn_loss``).

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[8.0, 0.0], [0.0, 8.0]])
  >>> print(round(float(sinkhorn_kd(s, s[::-1], epsilon=0.01)), 4))  # same set, permuted
  0.0
  """
  if cost not in SINKHORN_COSTS:
    raise ValueError(f'cost must be one of {SINKHORN_COSTS}, got {cost!r}')
  if marginal not in SINKHORN_MARGINALS:
    raise ValueError(f'marginal must be one of {SINKHORN_MARGINALS}, got {marginal!r}')
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  inf_s, inf_t = jnp.isinf(s), jnp.isinf(t)
  lp = tempered_log_probs(s, t, temperature, axis)
  q, w = rows(probs(lp.log_q, inf_s), where, axis)
  p, _ = rows(probs(lp.log_p, inf_t), where, axis)
  fin_s, _ = rows(~inf_s, None, axis)
  fin_t, _ = rows(~inf_t, None, axis)
  c = _pairwise_cost(q, p, fin_s[:, None, :] & fin_t[None, :, :], cost)
  n = c.shape[0]
  valid = jnp.ones((n,), bool) if w is None else w[:, 0] > 0
  count = jnp.sum(valid)
  very_negative = jnp.asarray(-1e30, c.dtype)
  if marginal == 'ones':
    log_mass = jnp.where(valid, 0.0, very_negative)
  else:
    log_mass = jnp.where(valid, -jnp.log(jnp.maximum(count, 1).astype(c.dtype)),
                         very_negative)
  eps = jnp.asarray(epsilon, c.dtype)

  def iteration(carry, _):
    f, g = carry
    f = eps * (log_mass - jax.nn.logsumexp((g[None, :] - c) / eps, axis=1))   # rows
    g = eps * (log_mass - jax.nn.logsumexp((f[:, None] - c) / eps, axis=0))   # columns
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
def _sinkhorn_kd_term(*, temperature: Any = 2.0, epsilon: Any = 0.1, num_iters: int = 20,
                      cost: str = 'l1', marginal: str = 'ones') -> registry.Term:
  """SinKD: batch-wise Sinkhorn distance between student and teacher predictions."""
  if cost not in SINKHORN_COSTS:
    raise ValueError(f'cost must be one of {SINKHORN_COSTS}, got {cost!r}')
  if marginal not in SINKHORN_MARGINALS:
    raise ValueError(f'marginal must be one of {SINKHORN_MARGINALS}, got {marginal!r}')

  def fn(inputs):
    opts = registry.resolve(dict(temperature=temperature, epsilon=epsilon),
                            inputs.get('step', 0))
    return sinkhorn_kd(inputs['student_logits'], inputs['teacher_logits'],
                       num_iters=num_iters, cost=cost, marginal=marginal,
                       where=inputs.get('where'), **opts)
  return registry.stateless(fn)
