"""Response-based losses on logits: cross-entropy, KD and its direct variants.

Every function takes ``(student_logits, teacher_logits, *, temperature, where, axis)``
(or labels where a teacher is not needed), works on any leading shape (``[batch,
classes]``, ``[batch, time, vocab]``), computes in float32 (bfloat16 inputs are
upcast) and returns one value per example: the input shape without ``axis``.
A position with ``where=False`` contributes exactly zero value and gradient.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdjax.losses import registry
from kdjax.losses._logit_helpers import entropy_from_log_probs
from kdjax.losses._logit_helpers import example_shape
from kdjax.losses._logit_helpers import kl_from_log_probs
from kdjax.losses._logit_helpers import log_softmax_pair
from kdjax.losses._logit_helpers import mask_inputs
from kdjax.losses._logit_helpers import mask_value
from kdjax.losses._logit_helpers import norm_axis
from kdjax.losses._logit_helpers import prepare
from kdjax.losses._logit_helpers import rows
from kdjax.losses._logit_helpers import upcast
from kdjax.losses._logit_helpers import where_per_example

Array = jax.Array

HINTON_2015 = ('Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. '
               'NIPS Deep Learning Workshop 2015. arXiv:1503.02531')
SZEGEDY_2016 = ('Szegedy et al. Rethinking the Inception Architecture for Computer Vision. '
                'CVPR 2016. arXiv:1512.00567 (label smoothing)')
MINILLM_2024 = ('Gu, Dong, Wei, Huang. MiniLLM: Knowledge Distillation of Large Language '
                'Models. ICLR 2024. arXiv:2306.08543 (reverse KL)')
DKD_2022 = ('Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation. CVPR 2022. '
            'arXiv:2203.08679')
DIST_2022 = ('Huang, You, Wang, Qian, Xu. Knowledge Distillation from A Stronger Teacher. '
             'NeurIPS 2022. arXiv:2205.10536')
LSKD_2024 = ('Sun, Ren, Li, Wang, Cao. Logit Standardization in Knowledge Distillation. '
             'CVPR 2024. arXiv:2403.01427')
BDKD_2022 = ('Amara, Sepahvand, Meyer, Gross, Clark. BD-KD: Balancing the Divergences for '
             'Online Knowledge Distillation. 2022. arXiv:2212.12965')
PLD_2025 = ('Bassam, Zhu, Bian. PLD: A Choice-Theoretic List-Wise Knowledge Distillation. '
            '2025. arXiv:2506.12542')
TFKD_2020 = ('Yuan, Tay, Li, Wang, Feng. Revisiting Knowledge Distillation via Label '
             'Smoothing Regularization. CVPR 2020. arXiv:1909.11723')
TGEO_2023 = ('Hu, Wu, Li, Ma, Chen, Yan, Wang, Liu. Less or More From Teacher: Exploiting '
             'Trilateral Geometry For Knowledge Distillation. 2023. arXiv:2312.15112; and '
             'Knowledge Distillation with Adapted Weight (KD-AIF). 2025')

# --------------------------------------------------------------------------- helpers


def _labels_where(labels, where, shape, axis):
  """Validity of each example: ``labels >= 0`` and ``where``; safe labels."""
  labels = jnp.asarray(labels)
  ex_shape = example_shape(shape, axis)
  if labels.shape != ex_shape:
    raise ValueError(f'labels of shape {labels.shape} do not match logits {shape} '
                     f'without axis {axis} ({ex_shape})')
  valid = labels >= 0
  if where is not None:
    valid = jnp.logical_and(valid, jnp.broadcast_to(jnp.asarray(where, bool), ex_shape))
  return valid, jnp.where(valid, labels, 0)


def _one_hot(labels, num_classes, axis, dtype):
  return jnp.moveaxis(jax.nn.one_hot(labels, num_classes, dtype=dtype), -1, axis)


# --------------------------------------------------------------------------- ce


def ce(student_logits, labels, *, label_smoothing: float = 0.0, where=None,
       axis: int = -1) -> Array:
  r"""Softmax cross-entropy with integer labels and optional label smoothing.

  .. math::

    \ell = -\sum_c y_c \log \mathrm{softmax}(s)_c,\qquad
    y = (1 - \epsilon)\,\mathrm{onehot}(label) + \epsilon / C

  A label of ``-1`` marks an unlabeled example: its value and gradient are zero.
  Use ``where`` (or the ``(value, where)`` pair returned by the registered term) to
  leave such examples out of a mean.

  Args:
    student_logits: ``[..., classes]`` logits.
    labels: integer labels of the per-example shape; ``-1`` = unlabeled.
    label_smoothing: :math:`\epsilon`, the mass spread uniformly over the classes.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example cross-entropy (input shape without ``axis``), float32.

  References:
    Szegedy et al. Rethinking the Inception Architecture for Computer Vision.
    CVPR 2016. arXiv:1512.00567 (label smoothing).

  >>> import jax.numpy as jnp
  >>> logits = jnp.array([[2.0, 0.0, 0.0], [0.0, 0.0, 0.0]])
  >>> print(ce(logits, jnp.array([0, -1])).round(4))
  [0.2395 0.    ]
  """
  s = upcast(student_logits)
  axis = norm_axis(axis, s.ndim)
  valid, safe_labels = _labels_where(labels, where, s.shape, axis)
  (s,) = mask_inputs(valid, axis, s)
  log_q = jax.nn.log_softmax(s, axis=axis)
  num_classes = s.shape[axis]
  target = _one_hot(safe_labels, num_classes, axis, s.dtype)
  if not (isinstance(label_smoothing, (int, float)) and label_smoothing == 0):
    eps = jnp.asarray(label_smoothing, s.dtype)
    target = (1.0 - eps) * target + eps / num_classes
  return mask_value(valid, -jnp.sum(target * log_q, axis=axis))


# --------------------------------------------------------------------------- kd


def kd(student_logits, teacher_logits, *, temperature=1.0, where=None,
       axis: int = -1) -> Array:
  r"""Hinton's distillation loss: forward KL between tempered softmaxes, times T².

  .. math::

    \ell = T^2\,\mathrm{KL}\big(p^T \,\|\, q^T\big)
         = T^2 \sum_c p^T_c \big(\log p^T_c - \log q^T_c\big),\qquad
    p^T = \mathrm{softmax}(t / T),\ q^T = \mathrm{softmax}(s / T)

  The :math:`T^2` factor keeps gradient magnitudes comparable across temperatures;
  at :math:`T = 1` this is the plain KL divergence.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape (the target; not differentiated in practice).
    temperature: :math:`T > 0`, a float or a traced scalar.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss (input shape without ``axis``), float32.

  References:
    Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. NIPS Deep
    Learning Workshop 2015. arXiv:1503.02531.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(kd(s, t).round(4), kd(s, s).round(4))
  [0.1156] [0.]
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  log_q, log_p, temperature = log_softmax_pair(s, t, temperature, axis)
  return mask_value(where, temperature**2 * kl_from_log_probs(log_p, log_q, axis))


def reverse_kl(student_logits, teacher_logits, *, temperature=1.0, where=None,
               axis: int = -1) -> Array:
  r"""Reverse KL: the student's distribution against the teacher's, times T².

  .. math::

    \ell = T^2\,\mathrm{KL}\big(q^T \,\|\, p^T\big)
         = T^2 \sum_c q^T_c \big(\log q^T_c - \log p^T_c\big)

  Mode-seeking: the student is penalized for mass where the teacher has little,
  not for missing some of the teacher's modes.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Gu, Dong, Wei, Huang. MiniLLM: Knowledge Distillation of Large Language Models.
    ICLR 2024. arXiv:2306.08543.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(reverse_kl(s, t).round(4))
  [0.1601]
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  log_q, log_p, temperature = log_softmax_pair(s, t, temperature, axis)
  return mask_value(where, temperature**2 * kl_from_log_probs(log_q, log_p, axis))


# --------------------------------------------------------------------------- dkd


def _binary_log_probs(z, onehot, axis):
  """``(log P(target), log P(not target))`` of ``softmax(z)``, stably."""
  lse = jax.nn.logsumexp(z, axis=axis)
  z_target = jnp.sum(jnp.where(onehot, z, 0.0), axis=axis)
  lse_rest = jax.nn.logsumexp(z, axis=axis, where=~onehot)
  return z_target - lse, lse_rest - lse, lse_rest


def dkd(student_logits, teacher_logits, labels, *, alpha=1.0, beta=8.0, temperature=4.0,
        where=None, axis: int = -1) -> Array:
  r"""Decoupled KD: target-class and non-target-class KL with separate weights.

  With :math:`b = (p_y, 1 - p_y)` the binary target/non-target split of
  :math:`p = \mathrm{softmax}(t/T)` (likewise :math:`b'` for the student) and
  :math:`\hat p, \hat q` the softmaxes restricted to the non-target classes:

  .. math::

    \ell = T^2\big[\alpha\,\mathrm{KL}(b \,\|\, b')
                  + \beta\,\mathrm{KL}(\hat p \,\|\, \hat q)\big]

  (TCKD and NCKD). Classic KD is :math:`\mathrm{TCKD} + (1 - p_y)\,\mathrm{NCKD}`.
  Examples with label ``-1`` are masked (value and gradient zero).

  Args:
    student_logits: ``[..., classes]`` (at least two classes).
    teacher_logits: same shape.
    labels: integer labels of the per-example shape; ``-1`` = unlabeled.
    alpha: weight of TCKD.
    beta: weight of NCKD.
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Zhao, Cui, Song, Qiu, Liang. Decoupled Knowledge Distillation. CVPR 2022.
    arXiv:2203.08679.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(f'{float(dkd(s, t, jnp.array([0]), alpha=1.0, beta=1.0, temperature=1.0)[0]):.4f}')
  0.1738
  """
  s, t = upcast(student_logits), upcast(teacher_logits)
  axis = norm_axis(axis, s.ndim)
  valid, safe_labels = _labels_where(labels, where, s.shape, axis)
  s, t = mask_inputs(valid, axis, s, t)
  temperature = jnp.asarray(temperature, s.dtype)
  zs, zt = s / temperature, t / temperature
  onehot = _one_hot(safe_labels, s.shape[axis], axis, jnp.int32) > 0
  log_qy, log_qn, lse_s_rest = _binary_log_probs(zs, onehot, axis)
  log_py, log_pn, lse_t_rest = _binary_log_probs(zt, onehot, axis)
  tckd = (jnp.exp(log_py) * (log_py - log_qy) + jnp.exp(log_pn) * (log_pn - log_qn))
  log_p_hat = zt - jnp.expand_dims(lse_t_rest, axis)
  log_q_hat = zs - jnp.expand_dims(lse_s_rest, axis)
  terms = jnp.exp(log_p_hat) * (log_p_hat - log_q_hat)
  nckd = jnp.sum(jnp.where(onehot, 0.0, terms), axis=axis)
  return mask_value(valid, temperature**2 * (alpha * tckd + beta * nckd))


# --------------------------------------------------------------------------- dist


def _centered_cosine(a, b, axis, weights=None, eps=1e-12):
  """Pearson correlation of ``a`` and ``b`` along ``axis`` (optionally weighted)."""
  if weights is None:
    a = a - jnp.mean(a, axis=axis, keepdims=True)
    b = b - jnp.mean(b, axis=axis, keepdims=True)
  else:
    total = jnp.maximum(jnp.sum(weights, axis=axis, keepdims=True), 1.0)
    a = weights * (a - jnp.sum(weights * a, axis=axis, keepdims=True) / total)
    b = weights * (b - jnp.sum(weights * b, axis=axis, keepdims=True) / total)
  num = jnp.sum(a * b, axis=axis)
  # Clamped, not shifted: exact Pearson unless both spreads are ~0 (then rho = 0).
  return num / jnp.sqrt(jnp.maximum(jnp.sum(a * a, axis=axis) * jnp.sum(b * b, axis=axis),
                                    eps * eps))


def dist_inter_class(student_logits, teacher_logits, *, temperature=1.0, where=None,
                     axis: int = -1) -> Array:
  r"""DIST's inter-class relation: one minus the Pearson correlation across classes.

  .. math::

    \ell_i = T^2\big(1 - \rho(q_{i,:},\, p_{i,:})\big)

  with :math:`p, q` the tempered teacher and student softmaxes and :math:`\rho` the
  Pearson correlation over the class axis (numerically :math:`\rho = c /
  \max(\sqrt{v_a v_b}, 10^{-12})`, so a constant row gives :math:`\rho = 0`).

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Huang, You, Wang, Qian, Xu. Knowledge Distillation from A Stronger Teacher.
    NeurIPS 2022. arXiv:2205.10536.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]])
  >>> print(f'{float(dist_inter_class(s, 3.0 * s + 1.0)[0]):.4f}')  # same ranking, corr < 1
  0.0243
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  log_q, log_p, temperature = log_softmax_pair(s, t, temperature, axis)
  rho = _centered_cosine(jnp.exp(log_q), jnp.exp(log_p), axis)
  return mask_value(where, temperature**2 * (1.0 - rho))


def dist_intra_class(student_logits, teacher_logits, *, temperature=1.0, where=None,
                     axis: int = -1) -> Array:
  r"""DIST's intra-class relation (batch-level): correlation across examples per class.

  .. math::

    \ell = \frac{T^2}{C} \sum_{c=1}^{C} \big(1 - \rho(q_{:,c},\, p_{:,c})\big)

  where :math:`\rho` is the Pearson correlation over all unmasked examples (every
  leading axis flattened, e.g. batch and time). Returns a scalar.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape; masked examples are
      left out of the correlations.
    axis: the class axis.

  Returns:
    A float32 scalar.

  References:
    Huang, You, Wang, Qian, Xu. Knowledge Distillation from A Stronger Teacher.
    NeurIPS 2022. arXiv:2205.10536.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
  >>> print(dist_intra_class(s, s).round(4))
  0.0
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  log_q, log_p, temperature = log_softmax_pair(s, t, temperature, axis)
  q, w = rows(jnp.exp(log_q), where, axis)
  p, _ = rows(jnp.exp(log_p), where, axis)
  rho = _centered_cosine(q, p, 0, w)
  return temperature**2 * jnp.mean(1.0 - rho)


def dist(student_logits, teacher_logits, *, beta=1.0, gamma=1.0, temperature=1.0,
         where=None, axis: int = -1) -> Array:
  r"""DIST (batch-level): inter-class plus intra-class correlation losses.

  .. math::

    \ell = \beta\,\overline{\ell^{\mathrm{inter}}} + \gamma\,\ell^{\mathrm{intra}}

  with :math:`\overline{\ell^{\mathrm{inter}}}` the mean of
  :func:`dist_inter_class` over unmasked examples and :math:`\ell^{\mathrm{intra}}`
  :func:`dist_intra_class`. Returns a scalar.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    beta: weight of the inter-class term.
    gamma: weight of the intra-class term.
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    A float32 scalar.

  References:
    Huang, You, Wang, Qian, Xu. Knowledge Distillation from A Stronger Teacher.
    NeurIPS 2022. arXiv:2205.10536.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0], [0.0, 1.0], [2.0, 0.0]])
  >>> print(dist(s, s).round(4))
  0.0
  """
  inter = dist_inter_class(student_logits, teacher_logits, temperature=temperature,
                           where=where, axis=axis)
  if where is None:
    inter_mean = jnp.mean(inter)
  else:
    w = jnp.broadcast_to(jnp.asarray(where, bool), inter.shape)
    inter_mean = jnp.sum(inter) / jnp.maximum(jnp.sum(w), 1)
  intra = dist_intra_class(student_logits, teacher_logits, temperature=temperature,
                           where=where, axis=axis)
  return beta * inter_mean + gamma * intra


# --------------------------------------------------------------------------- lskd


def standardize_logits(z, axis: int = -1, eps: float = 1e-7) -> Array:
  r"""Z-score along ``axis``: :math:`(z - \bar z) / \sqrt{\mathrm{Var}(z) + \epsilon}`."""
  mean = jnp.mean(z, axis=axis, keepdims=True)
  var = jnp.mean(jnp.square(z - mean), axis=axis, keepdims=True)
  return (z - mean) / jnp.sqrt(var + eps)


def logit_standardized_kd(student_logits, teacher_logits, *, temperature=2.0, where=None,
                          axis: int = -1) -> Array:
  r"""KD on z-scored logits: invariant to a shift and a positive scale of each row.

  .. math::

    \ell = T^2\,\mathrm{KL}\Big(\mathrm{softmax}\big(\mathcal Z(t)/T\big) \,\Big\|\,
                                 \mathrm{softmax}\big(\mathcal Z(s)/T\big)\Big),\qquad
    \mathcal Z(z) = \frac{z - \bar z}{\sqrt{\mathrm{Var}(z) + 10^{-7}}}

  The student need not match the teacher's logit range, only its relations.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: base temperature :math:`T > 0` applied after standardization.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Sun, Ren, Li, Wang, Cao. Logit Standardization in Knowledge Distillation.
    CVPR 2024. arXiv:2403.01427.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]])
  >>> print(logit_standardized_kd(s, 5.0 * s + 2.0).round(4))  # same after z-scoring
  [0.]
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  zs, zt = standardize_logits(s, axis), standardize_logits(t, axis)
  log_q, log_p, temperature = log_softmax_pair(zs, zt, temperature, axis)
  return mask_value(where, temperature**2 * kl_from_log_probs(log_p, log_q, axis))


# --------------------------------------------------------------------------- bdkd


def bdkd(student_logits, teacher_logits, *, temperature=1.0, where=None, axis: int = -1,
         eps: float = 1e-6) -> Array:
  r"""BD-KD: per-example balance of forward and reverse KL by the two entropies.

  .. math::

    \ell_i = T^2\big[w_i\,\mathrm{KL}(p_i\|q_i) + (1 - w_i)\,\mathrm{KL}(q_i\|p_i)\big],
    \qquad w_i = \frac{H(p_i) + \epsilon}{H(p_i) + H(q_i) + 2\epsilon}

  with :math:`p, q` the tempered teacher and student softmaxes and :math:`w_i` held
  constant (``stop_gradient``). BD-KD weights the two divergences sample-wise by
  the entropy gap between teacher and student; the paper's abstract gives the idea,
  not one closed form, and this is the form kdjax uses: an overconfident student
  (:math:`H(q) < H(p)`) gets more of the mass-covering forward KL, which softens
  it; an underconfident one (:math:`H(q) > H(p)`) more of the mode-seeking reverse
  KL, which sharpens it. At equal entropies it is the mean of the two KLs.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.
    eps: :math:`\epsilon`, keeps the weight defined when both entropies are 0.

  Returns:
    Per-example loss, float32.

  References:
    Amara, Sepahvand, Meyer, Gross, Clark. BD-KD: Balancing the Divergences for
    Online Knowledge Distillation. 2022. arXiv:2212.12965.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(f'{float(bdkd(s, t)[0]):.4f}')
  0.1447
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  log_q, log_p, temperature = log_softmax_pair(s, t, temperature, axis)
  h_p = entropy_from_log_probs(log_p, axis)
  h_q = entropy_from_log_probs(log_q, axis)
  w = jax.lax.stop_gradient((h_p + eps) / (h_p + h_q + 2 * eps))
  value = w * kl_from_log_probs(log_p, log_q, axis) + (1 - w) * kl_from_log_probs(
      log_q, log_p, axis)
  return mask_value(where, temperature**2 * value)


# --------------------------------------------------------------------------- pld


def pld(student_logits, teacher_logits, labels=None, *, temperature=1.0, where=None,
        axis: int = -1) -> Array:
  r"""Plackett-Luce distillation: list-wise likelihood of the teacher-optimal ranking.

  The ranking :math:`\pi` puts the true label first, then the other classes in
  decreasing teacher logit (without labels, or for a label of ``-1``, the teacher's
  own ranking). Each position is weighted by the teacher's (tempered) softmax mass
  of the class placed there:

  .. math::

    \ell = \sum_{k=1}^{C} p^T_{\pi_k}\Big(\log\sum_{j \ge k} e^{s_{\pi_j}} - s_{\pi_k}\Big)

  With a one-hot teacher this is cross-entropy; it is convex in the student logits
  and invariant to adding a constant to them. The temperature applies to the
  teacher weights only.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    labels: optional integer labels of the per-example shape (``-1`` = none).
    temperature: :math:`T > 0` for the teacher weights :math:`p^T`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Bassam, Zhu, Bian. PLD: A Choice-Theoretic List-Wise Knowledge Distillation.
    2025. arXiv:2506.12542.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[0.0, 0.0, 0.0]]); t = jnp.array([[50.0, 0.0, 0.0]])
  >>> print(pld(s, t).round(4))  # one-hot teacher: cross-entropy log 3
  [1.0986]
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  s, t = jnp.moveaxis(s, axis, -1), jnp.moveaxis(t, axis, -1)
  if labels is not None:
    labels = jnp.asarray(labels)
    if where is not None:
      labels = jnp.where(where, labels, -1)
    labeled = (labels >= 0)[..., None]
    is_label = jax.nn.one_hot(jnp.where(labels >= 0, labels, 0), s.shape[-1]) > 0
    rank_key = jnp.where(labeled & is_label, jnp.inf, t)
  else:
    rank_key = t
  order = jnp.argsort(-jax.lax.stop_gradient(rank_key), axis=-1, stable=True)
  s_sorted = jnp.take_along_axis(s, order, axis=-1)
  temperature = jnp.asarray(temperature, s.dtype)
  weights = jnp.take_along_axis(jax.nn.softmax(t / temperature, axis=-1), order, axis=-1)
  tail_lse = jax.lax.cumlogsumexp(s_sorted, axis=s_sorted.ndim - 1, reverse=True)
  value = jnp.sum(weights * (tail_lse - s_sorted), axis=-1)
  return mask_value(where, value)


# --------------------------------------------------------------------------- tf_kd


def tf_kd(student_logits, labels, *, correct_prob=0.9, temperature=1.0, where=None,
          axis: int = -1) -> Array:
  r"""Teacher-free KD: distill from a hand-made virtual teacher, times T².

  The virtual teacher puts :math:`a` on the label and spreads the rest uniformly,
  :math:`v_c = a` if :math:`c = y` else :math:`(1 - a)/(C - 1)`; it is tempered as a
  distribution, :math:`v^T \propto v^{1/T}` (i.e. ``softmax(log v / T)``), and

  .. math::

    \ell = T^2\,\mathrm{KL}\big(v^T \,\|\, \mathrm{softmax}(s/T)\big)

  (The authors' code tempers ``softmax(v / T)`` instead; kdjax tempers the
  distribution so that :math:`T = 1` gives :math:`v` itself.) Add the ``ce`` term
  for the paper's full objective :math:`(1-\alpha)\,\mathrm{CE} + \alpha\,\ell`.
  Examples with label ``-1`` are masked.

  Args:
    student_logits: ``[..., classes]``.
    labels: integer labels of the per-example shape; ``-1`` = unlabeled.
    correct_prob: :math:`a`, the virtual teacher's probability of the label
      (:math:`a \ge 1/C`).
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Yuan, Tay, Li, Wang, Feng. Revisiting Knowledge Distillation via Label
    Smoothing Regularization. CVPR 2020. arXiv:1909.11723.

  >>> import jax.numpy as jnp
  >>> s = jnp.log(jnp.array([[0.9, 0.05, 0.05]]))
  >>> print(tf_kd(s, jnp.array([0]), correct_prob=0.9).round(4))
  [0.]
  """
  s = upcast(student_logits)
  axis = norm_axis(axis, s.ndim)
  valid, safe_labels = _labels_where(labels, where, s.shape, axis)
  (s,) = mask_inputs(valid, axis, s)
  num_classes = s.shape[axis]
  a = jnp.asarray(correct_prob, s.dtype)
  onehot = _one_hot(safe_labels, num_classes, axis, s.dtype) > 0
  log_v = jnp.where(onehot, jnp.log(a), jnp.log1p(-a) - jnp.log(num_classes - 1.0))
  log_q, log_v_t, temperature = log_softmax_pair(s, log_v, temperature, axis)
  return mask_value(valid, temperature**2 * kl_from_log_probs(log_v_t, log_q, axis))


# --------------------------------------------------------------------------- adaptive


def adaptive_weight_kd(student_logits, teacher_logits, labels, *, temperature=4.0,
                       weighting: str = 'geometry', where=None, axis: int = -1,
                       eps: float = 1e-6) -> Array:
  r"""Per-example fusion of teacher (KD) and ground truth (CE) with an adaptive weight.

  .. math::

    \ell_i = w_i\,T^2\,\mathrm{KL}(p^T_i\|q^T_i) + (1 - w_i)\,\mathrm{CE}(s_i, y_i)

  with :math:`w_i` held constant (``stop_gradient``) and computed from the
  intra-sample geometry of student prediction :math:`q_i`, teacher prediction
  :math:`p_i` (both at :math:`T = 1`) and the one-hot label :math:`e_{y_i}`:

  * ``'geometry'`` (default): :math:`w_i = \frac{\|q_i - e_{y_i}\| + \epsilon}
    {\|q_i - e_{y_i}\| + \|p_i - e_{y_i}\| + 2\epsilon}`: lean on the teacher
    where it is closer to the truth than the student, on the label where the
    teacher is wrong.
  * ``'teacher_confidence'``: :math:`w_i = p_{i,y_i}`, the teacher's probability of
    the true label.

  Unlabeled examples (label ``-1``) get :math:`w_i = 1` (pure KD). This is a
  closed-form weighting in the spirit of the two papers cited, which learn the
  sample-wise fusion ratio (TGeo-KD: a small network on the trilateral geometry
  of S, T and G, trained by bilevel optimization; KD-AIF: influence-function
  weights); kdjax keeps the same inputs (the S-T-G distances) but no extra
  network or outer loop, so the loss stays a pure function of arrays.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    labels: integer labels of the per-example shape; ``-1`` = unlabeled.
    temperature: :math:`T > 0` of the KD part.
    weighting: ``'geometry'`` or ``'teacher_confidence'``.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.
    eps: :math:`\epsilon` of the ``'geometry'`` ratio.

  Returns:
    Per-example loss, float32.

  References:
    Hu et al. Less or More From Teacher: Exploiting Trilateral Geometry For Knowledge
    Distillation. 2023. arXiv:2312.15112. Knowledge Distillation with Adapted Weight
    (KD-AIF). 2025.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[0.0, 0.0]]); t = jnp.array([[9.0, 0.0]])
  >>> print(f'{float(adaptive_weight_kd(s, t, jnp.array([0]), temperature=1.0)[0]):.3f}')
  0.692
  """
  if weighting not in ('geometry', 'teacher_confidence'):
    raise ValueError(f"weighting must be 'geometry' or 'teacher_confidence', got {weighting!r}")
  s, t = upcast(student_logits), upcast(teacher_logits)
  axis = norm_axis(axis, s.ndim)
  where = where_per_example(where, s.shape, axis)
  s, t = mask_inputs(where, axis, s, t)
  labels = jnp.asarray(labels)
  labeled = labels >= 0
  safe_labels = jnp.where(labeled, labels, 0)
  onehot = _one_hot(safe_labels, s.shape[axis], axis, s.dtype)
  p1, q1 = jax.nn.softmax(t, axis=axis), jax.nn.softmax(s, axis=axis)
  if weighting == 'geometry':
    d_s = jnp.sqrt(jnp.sum(jnp.square(q1 - onehot), axis=axis))
    d_t = jnp.sqrt(jnp.sum(jnp.square(p1 - onehot), axis=axis))
    w = (d_s + eps) / (d_s + d_t + 2 * eps)
  else:
    w = jnp.sum(p1 * onehot, axis=axis)
  w = jax.lax.stop_gradient(jnp.where(labeled, w, 1.0))
  log_q, log_p, temperature = log_softmax_pair(s, t, temperature, axis)
  soft = temperature**2 * kl_from_log_probs(log_p, log_q, axis)
  hard = -jnp.sum(onehot * jax.nn.log_softmax(s, axis=axis), axis=axis)
  hard = jnp.where(labeled, hard, 0.0)
  return mask_value(where, w * soft + (1.0 - w) * hard)


# --------------------------------------------------------------------------- registry


def labeled_term(loss_fn, **options) -> registry.Term:
  """A stateless term for ``loss_fn(student, labels, *, where, **options)``.

  Its value is the pair ``(per_example, valid)`` so unlabeled examples
  (``labels == -1``) do not count in the mean.
  """
  def fn(inputs):
    opts = registry.resolve(options, inputs.get('step', 0))
    labels = inputs['labels']
    where = inputs.get('where')
    value = loss_fn(inputs['student_logits'], labels, where=where, **opts)
    return value, _labels_valid(labels, where)
  return registry.stateless(fn)


def teacher_labeled_term(loss_fn, **options) -> registry.Term:
  """A stateless term for ``loss_fn(student, teacher, labels, *, where, **options)``."""
  def fn(inputs):
    opts = registry.resolve(options, inputs.get('step', 0))
    labels = inputs['labels']
    where = inputs.get('where')
    value = loss_fn(inputs['student_logits'], inputs['teacher_logits'], labels,
                    where=where, **opts)
    return value, _labels_valid(labels, where)
  return registry.stateless(fn)


def _labels_valid(labels, where):
  valid = jnp.asarray(labels) >= 0
  if where is not None:
    valid = jnp.logical_and(valid, jnp.broadcast_to(jnp.asarray(where, bool), valid.shape))
  return valid


@registry.register('ce', family='supervised', reference=SZEGEDY_2016,
                   needs=('student_logits', 'labels'))
def _ce_term(*, label_smoothing: Any = 0.0) -> registry.Term:
  """Cross-entropy with the ground-truth labels (unlabeled examples left out)."""
  return labeled_term(ce, label_smoothing=label_smoothing)


@registry.register('kd', family='response', reference=HINTON_2015)
def _kd_term(*, temperature: Any = 1.0) -> registry.Term:
  """Forward KL between tempered teacher and student softmaxes, times T²."""
  return registry.logit_term(kd, temperature=temperature)


@registry.register('reverse_kl', family='response', reference=MINILLM_2024)
def _reverse_kl_term(*, temperature: Any = 1.0) -> registry.Term:
  """Reverse KL (student against teacher) at a temperature, times T²."""
  return registry.logit_term(reverse_kl, temperature=temperature)


@registry.register('dkd', family='response', reference=DKD_2022,
                   needs=('student_logits', 'teacher_logits', 'labels'))
def _dkd_term(*, alpha: Any = 1.0, beta: Any = 8.0, temperature: Any = 4.0) -> registry.Term:
  """Decoupled KD: alpha * TCKD + beta * NCKD, times T² (unlabeled examples left out)."""
  return teacher_labeled_term(dkd, alpha=alpha, beta=beta, temperature=temperature)


@registry.register('dist', family='response', reference=DIST_2022, batch_level=True)
def _dist_term(*, beta: Any = 1.0, gamma: Any = 1.0, temperature: Any = 1.0) -> registry.Term:
  """DIST: inter-class and intra-class Pearson correlation losses (batch-level)."""
  return registry.logit_term(dist, beta=beta, gamma=gamma, temperature=temperature)


@registry.register('logit_standardized_kd', family='response', reference=LSKD_2024)
def _lskd_term(*, temperature: Any = 2.0) -> registry.Term:
  """KD between z-score standardized teacher and student logits, times T²."""
  return registry.logit_term(logit_standardized_kd, temperature=temperature)


@registry.register('bdkd', family='response', reference=BDKD_2022)
def _bdkd_term(*, temperature: Any = 1.0) -> registry.Term:
  """BD-KD: forward and reverse KL balanced per example by the entropies."""
  return registry.logit_term(bdkd, temperature=temperature)


@registry.register('pld', family='response', reference=PLD_2025,
                   needs=('student_logits', 'teacher_logits', 'labels'))
def _pld_term(*, temperature: Any = 1.0) -> registry.Term:
  """Plackett-Luce distillation over the teacher-optimal ranking of classes."""
  def fn(inputs):
    opts = registry.resolve(dict(temperature=temperature), inputs.get('step', 0))
    return pld(inputs['student_logits'], inputs['teacher_logits'], inputs.get('labels'),
               where=inputs.get('where'), **opts)
  return registry.stateless(fn)


@registry.register('tf_kd', family='teacher_free', reference=TFKD_2020,
                   needs=('student_logits', 'labels'))
def _tf_kd_term(*, correct_prob: Any = 0.9, temperature: Any = 1.0) -> registry.Term:
  """Teacher-free KD from a virtual teacher built from the label (unlabeled left out)."""
  return labeled_term(tf_kd, correct_prob=correct_prob, temperature=temperature)


@registry.register('adaptive_weight_kd', family='response', reference=TGEO_2023,
                   needs=('student_logits', 'teacher_logits', 'labels'))
def _adaptive_weight_kd_term(*, temperature: Any = 4.0,
                             weighting: str = 'geometry') -> registry.Term:
  """Per-example adaptive fusion of KD and cross-entropy from the S-T-G geometry."""
  def fn(inputs):
    opts = registry.resolve(dict(temperature=temperature), inputs.get('step', 0))
    return adaptive_weight_kd(inputs['student_logits'], inputs['teacher_logits'],
                              inputs['labels'], weighting=weighting,
                              where=inputs.get('where'), **opts)
  return registry.stateless(fn)
