"""Response-based losses on logits: cross-entropy, KD and its direct variants.

Every function takes ``(student_logits, teacher_logits, *, temperature, where, axis)``
(or labels where a teacher is not needed), works on any leading shape (``[batch,
classes]``, ``[batch, time, vocab]``), computes in float32 (bfloat16 inputs are
upcast) and returns one value per example: the input shape without ``axis``.
A position with ``where=False`` contributes exactly zero value and gradient.

Infinite logits (``-inf`` columns of a padded vocabulary) are guarded as DistiLLM
does: an entry where either side's logit is infinite contributes zero, each side's
softmax is over its own finite entries, and value and gradients stay finite. With
``-inf`` at the same entries on both sides this is the loss on the logits with those
columns removed (see :mod:`kdjax.losses._logit_helpers`).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdjax.losses import registry
from kdjax.losses._logit_helpers import ABSENT
from kdjax.losses._logit_helpers import entropy_from_log_probs
from kdjax.losses._logit_helpers import example_shape
from kdjax.losses._logit_helpers import finite_log_softmax
from kdjax.losses._logit_helpers import kl_from_log_probs
from kdjax.losses._logit_helpers import kl_terms
from kdjax.losses._logit_helpers import mask_inputs
from kdjax.losses._logit_helpers import mask_value
from kdjax.losses._logit_helpers import norm_axis
from kdjax.losses._logit_helpers import prepare
from kdjax.losses._logit_helpers import probs
from kdjax.losses._logit_helpers import rows
from kdjax.losses._logit_helpers import sanitize
from kdjax.losses._logit_helpers import tempered_log_probs
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
             'Online Knowledge Distillation. 2022. arXiv:2212.12965 (kdjax\'s closed-form '
             'entropy weight; the teacher-side term is bdkd(side="teacher"))')
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


def _finite_count(inf, axis, keepdims: bool = True):
  """The number of finite entries along ``axis`` (at least 1), float32."""
  n = jnp.sum(~inf, axis=axis, keepdims=keepdims).astype(jnp.float32)
  return jnp.maximum(n, 1.0)


# --------------------------------------------------------------------------- ce


def ce(student_logits, labels, *, label_smoothing: float = 0.0, where=None,
       axis: int = -1) -> Array:
  r"""Softmax cross-entropy with integer labels and optional label smoothing.

  .. math::

    \ell = -\sum_c y_c \log \mathrm{softmax}(s)_c,\qquad
    y = (1 - \epsilon)\,\mathrm{onehot}(label) + \epsilon / C

  A label of ``-1`` marks an unlabeled example: its value and gradient are zero.
  Use ``where`` (or the ``(value, where)`` pair returned by the registered term) to
  leave such examples out of a mean. Classes with an infinite logit (a padded
  vocabulary) are not classes: the softmax and the smoothing run over the finite
  ones (:math:`C` counts those) and an infinite entry contributes zero.

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
  s, inf = sanitize(s)
  log_q = finite_log_softmax(s, inf, axis)
  target = _one_hot(safe_labels, s.shape[axis], axis, s.dtype)
  if not (isinstance(label_smoothing, (int, float)) and label_smoothing == 0):
    eps = jnp.asarray(label_smoothing, s.dtype)
    num_classes = _finite_count(inf, axis)
    target = (1.0 - eps) * target + eps / num_classes
  return mask_value(valid, -jnp.sum(jnp.where(inf, 0.0, target * log_q), axis=axis))


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
    Learning Workshop 2015. arXiv:1503.02531. The batch mean equals mdistiller's
    ``kd_loss`` (megvii-research/mdistiller, ``mdistiller/distillers/KD.py``).

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(kd(s, t).round(4), kd(s, s).round(4))
  [0.1156] [0.]
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  lp = tempered_log_probs(s, t, temperature, axis)
  return mask_value(where, lp.temperature**2 * kl_from_log_probs(lp.log_p, lp.log_q, axis,
                                                                 lp.skip))


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
  lp = tempered_log_probs(s, t, temperature, axis)
  return mask_value(where, lp.temperature**2 * kl_from_log_probs(lp.log_q, lp.log_p, axis,
                                                                 lp.skip))


# --------------------------------------------------------------------------- dkd


def _binary_log_probs(z, onehot, axis):
  """``(log P(target), log P(not target), lse of the rest)`` of ``softmax(z)``, stably."""
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
  Examples with label ``-1`` are masked (value and gradient zero). The batch mean
  equals mdistiller's ``dkd_loss`` with the same ``alpha, beta, temperature``
  (defaults: its CIFAR ones, 1, 8 and 4). mdistiller also ramps the DKD weight
  linearly over the first 20 epochs (``min(epoch / 20, 1)``): give the term a
  ``weight`` schedule for that (``configs/cifar10/resnet8x4_dkd.py``).

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
    arXiv:2203.08679. Reference code: megvii-research/mdistiller,
    ``mdistiller/distillers/DKD.py``.

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
  (s, inf_s), (t, inf_t) = sanitize(s), sanitize(t)
  skip = jnp.logical_or(inf_s, inf_t)
  absent = jnp.asarray(ABSENT, s.dtype)  # an infinite logit: no mass (finite, no NaN)
  zs = jnp.where(inf_s, absent, s / temperature)
  zt = jnp.where(inf_t, absent, t / temperature)
  onehot = _one_hot(safe_labels, s.shape[axis], axis, jnp.int32) > 0
  log_qy, log_qn, lse_s_rest = _binary_log_probs(zs, onehot, axis)
  log_py, log_pn, lse_t_rest = _binary_log_probs(zt, onehot, axis)
  skip_y = jnp.any(jnp.logical_and(onehot, skip), axis=axis)
  tckd = kl_terms(log_py, log_qy, skip_y) + kl_terms(log_pn, log_qn)
  log_p_hat = zt - jnp.expand_dims(lse_t_rest, axis)
  log_q_hat = zs - jnp.expand_dims(lse_s_rest, axis)
  nckd = kl_from_log_probs(log_p_hat, log_q_hat, axis, jnp.logical_or(onehot, skip))
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
  lp = tempered_log_probs(s, t, temperature, axis)
  keep = (~lp.skip).astype(s.dtype)  # infinite entries are left out of the correlation
  rho = _centered_cosine(probs(lp.log_q, lp.skip), probs(lp.log_p, lp.skip), axis, keep)
  return mask_value(where, lp.temperature**2 * (1.0 - rho))


def dist_intra_class(student_logits, teacher_logits, *, temperature=1.0, where=None,
                     axis: int = -1) -> Array:
  r"""DIST's intra-class relation (batch-level): correlation across examples per class.

  .. math::

    \ell = \frac{T^2}{C} \sum_{c=1}^{C} \big(1 - \rho(q_{:,c},\, p_{:,c})\big)

  where :math:`\rho` is the Pearson correlation over all unmasked examples (every
  leading axis flattened, e.g. batch and time). Returns a scalar. Entries with an
  infinite logit are left out; a class with none left (a padded column) is not
  counted in :math:`C`.

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
  lp = tempered_log_probs(s, t, temperature, axis)
  q, w = rows(probs(lp.log_q, lp.skip), where, axis)
  p, _ = rows(probs(lp.log_p, lp.skip), where, axis)
  keep, _ = rows((~lp.skip).astype(s.dtype), None, axis)
  w = keep if w is None else w * keep
  rho = _centered_cosine(q, p, 0, w)
  present = jnp.any(w > 0, axis=0)  # classes with an entry (a padded column has none)
  total = jnp.sum(jnp.where(present, 1.0 - rho, 0.0))
  return lp.temperature**2 * total / jnp.maximum(jnp.sum(present), 1)


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


def standardize_logits(z, axis: int = -1, eps: float = 1e-7, ddof: int = 1) -> Array:
  r"""Z-score along ``axis``: :math:`(z - \bar z) / (\epsilon + \sigma)`.

  :math:`\sigma = \sqrt{\sum_c (z_c - \bar z)^2 / (C - \mathrm{ddof})}`: ``ddof=1``
  is the unbiased standard deviation of the authors' code (``torch.std``), ``ddof=0``
  the population one. Infinite entries are left out of :math:`C`, the mean and the
  deviation, and stay as they are. A constant row maps to zeros (the gradient
  through :math:`\sigma` is zero there instead of ``torch.std``'s NaN).

  >>> import jax.numpy as jnp
  >>> print(standardize_logits(jnp.array([1.0, 3.0])).round(4))  # sigma = sqrt(2)
  [-0.7071  0.7071]
  >>> print(standardize_logits(jnp.array([1.0, 3.0]), ddof=0).round(4))  # sigma = 1
  [-1.  1.]
  """
  if ddof not in (0, 1):
    raise ValueError(f'ddof must be 0 (population) or 1 (unbiased), got {ddof!r}')
  z = upcast(z)
  x, inf = sanitize(z)
  n = jnp.sum(~inf, axis=axis, keepdims=True).astype(x.dtype)
  mean = jnp.sum(x, axis=axis, keepdims=True) / jnp.maximum(n, 1.0)
  dev = jnp.where(inf, 0.0, x - mean)
  var = jnp.sum(jnp.square(dev), axis=axis, keepdims=True) / jnp.maximum(n - ddof, 1.0)
  positive = var > 0
  std = jnp.where(positive, jnp.sqrt(jnp.where(positive, var, 1.0)), 0.0)
  return jnp.where(inf, z, dev / (eps + std))


def logit_standardized_kd(student_logits, teacher_logits, *, temperature=2.0, ddof: int = 1,
                          eps: float = 1e-7, where=None, axis: int = -1) -> Array:
  r"""KD on z-scored logits: invariant to a shift and a positive scale of each row.

  .. math::

    \ell = T^2\,\mathrm{KL}\Big(\mathrm{softmax}\big(\mathcal Z(t)/T\big) \,\Big\|\,
                                 \mathrm{softmax}\big(\mathcal Z(s)/T\big)\Big),\qquad
    \mathcal Z(z) = \frac{z - \bar z}{\epsilon + \sigma(z)}

  with :math:`\sigma` the standard deviation over the classes
  (:func:`standardize_logits`). The student need not match the teacher's logit
  range, only its relations. The defaults are the authors' code (unbiased
  :math:`\sigma`, :math:`\epsilon = 10^{-7}` outside the root, base temperature 2):
  the batch mean equals its ``kd_loss`` with ``logit_stand=True``; their published
  recipe weights it 9 against cross-entropy 0.1 (``--kd-weight 9``, mdistiller's
  ``CE_WEIGHT``). ``ddof=0`` uses the population :math:`\sigma` (kdjax's earlier
  form, up to where :math:`\epsilon` sits): z-scores larger by
  :math:`\sqrt{C/(C-1)}`, which matters most for few classes.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: base temperature :math:`T > 0` applied after standardization.
    ddof: 1 (unbiased :math:`\sigma`, the authors' code) or 0 (population).
    eps: :math:`\epsilon`, added to :math:`\sigma`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Sun, Ren, Li, Wang, Cao. Logit Standardization in Knowledge Distillation.
    CVPR 2024. arXiv:2403.01427. Reference code: sunshangquan/logit-standardization-KD,
    ``mdistiller/distillers/KD.py`` (``normalize``, ``kd_loss``).

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]])
  >>> print(logit_standardized_kd(s, 5.0 * s + 2.0).round(4))  # same after z-scoring
  [0.]
  """
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  zs = standardize_logits(s, axis, eps, ddof)
  zt = standardize_logits(t, axis, eps, ddof)
  lp = tempered_log_probs(zs, zt, temperature, axis)
  return mask_value(where, lp.temperature**2 * kl_from_log_probs(lp.log_p, lp.log_q, axis,
                                                                 lp.skip))


# --------------------------------------------------------------------------- bdkd


def bdkd(student_logits, teacher_logits, *, temperature=1.0, side: str = 'student',
         where=None, axis: int = -1, eps: float = 1e-6) -> Array:
  r"""After BD-KD: forward and reverse KL balanced per example by the two entropies.

  .. math::

    \ell_i = T^2\big[w_i\,\mathrm{KL}(p_i\|q_i) + (1 - w_i)\,\mathrm{KL}(q_i\|p_i)\big],
    \qquad w_i = \frac{H(p_i) + \epsilon}{H(p_i) + H(q_i) + 2\epsilon}

  with :math:`p, q` the tempered teacher and student softmaxes and :math:`w_i` held
  constant (``stop_gradient``). BD-KD (online KD: teacher and student train together)
  weights forward and reverse KL sample-wise, in the student's loss and in the
  teacher's. Its abstract gives the idea; the weight above is kdjax's closed form,
  not the paper's (whose method section kdjax did not reproduce): an overconfident
  learner (lower entropy than its target) gets more of the mass-covering KL, which
  softens it; an underconfident one more of the mode-seeking KL, which sharpens it.
  At equal entropies it is the mean of the two KLs.

  ``side`` says who learns. ``'student'`` (the default, and the only side a frozen
  teacher needs): the teacher is the target, held constant. ``'teacher'``: the
  teacher-side term of online KD, the same rule with the roles exchanged (the
  student is the target, held constant; the teacher's forward KL is
  :math:`\mathrm{KL}(q\|p)`, weighted by :math:`(H(q) + \epsilon)/(H(p) + H(q) +
  2\epsilon) = 1 - w_i`). Exchanging the roles gives the same value, so the two
  sides differ only in which logits receive the gradient; an online trainer adds
  ``bdkd(s, t, side='student') + bdkd(s, t, side='teacher')``.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature: :math:`T > 0`.
    side: ``'student'`` or ``'teacher'``, the side whose logits are differentiated.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.
    eps: :math:`\epsilon`, keeps the weight defined when both entropies are 0.

  Returns:
    Per-example loss, float32.

  References:
    After Amara, Sepahvand, Meyer, Gross, Clark. BD-KD: Balancing the Divergences for
    Online Knowledge Distillation. 2022. arXiv:2212.12965.

  >>> import jax, jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(f'{float(bdkd(s, t)[0]):.4f} {float(bdkd(s, t, side="teacher")[0]):.4f}')
  0.1447 0.1447
  >>> g = jax.grad(lambda t_: bdkd(s, t_, side='teacher').sum())(t)  # the teacher learns
  >>> bool(jnp.all(jax.grad(lambda t_: bdkd(s, t_).sum())(t) == 0) and jnp.any(g != 0))
  True
  """
  if side not in ('student', 'teacher'):
    raise ValueError(f"side must be 'student' or 'teacher', got {side!r}")
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  if side == 'student':
    t = jax.lax.stop_gradient(t)
  else:
    s = jax.lax.stop_gradient(s)
  lp = tempered_log_probs(s, t, temperature, axis)
  h_p = entropy_from_log_probs(lp.log_p, axis, lp.skip)
  h_q = entropy_from_log_probs(lp.log_q, axis, lp.skip)
  w = jax.lax.stop_gradient((h_p + eps) / (h_p + h_q + 2 * eps))
  value = (w * kl_from_log_probs(lp.log_p, lp.log_q, axis, lp.skip)
           + (1 - w) * kl_from_log_probs(lp.log_q, lp.log_p, axis, lp.skip))
  return mask_value(where, lp.temperature**2 * value)


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
  (s, inf_s), (t, inf_t) = sanitize(s), sanitize(t)
  skip = jnp.logical_or(inf_s, inf_t)
  if labels is not None:
    labels = jnp.asarray(labels)
    if where is not None:
      labels = jnp.where(where, labels, -1)
    labeled = (labels >= 0)[..., None]
    is_label = jax.nn.one_hot(jnp.where(labels >= 0, labels, 0), s.shape[-1]) > 0
    rank_key = jnp.where(labeled & is_label, jnp.inf, t)
  else:
    rank_key = t
  # Entries with an infinite logit go last and take no part: no weight, no tail mass.
  rank_key = jnp.where(skip, -jnp.inf, rank_key)
  order = jnp.argsort(-jax.lax.stop_gradient(rank_key), axis=-1, stable=True)
  skip_sorted = jnp.take_along_axis(skip, order, axis=-1)
  absent = jnp.asarray(ABSENT, s.dtype)
  s_sorted = jnp.where(skip_sorted, absent, jnp.take_along_axis(s, order, axis=-1))
  temperature = jnp.asarray(temperature, s.dtype)
  p = probs(finite_log_softmax(t / temperature, inf_t, -1), skip)
  weights = jnp.take_along_axis(p, order, axis=-1)
  tail_lse = jax.lax.cumlogsumexp(s_sorted, axis=s_sorted.ndim - 1, reverse=True)
  value = jnp.sum(jnp.where(skip_sorted, 0.0, weights * (tail_lse - s_sorted)), axis=-1)
  return mask_value(where, value)


# --------------------------------------------------------------------------- tf_kd


TF_KD_FORMS = ('reference', 'tempered')


def tf_kd(student_logits, labels, *, correct_prob=0.99, temperature=20.0, multiplier=100.0,
          form: str = 'reference', where=None, axis: int = -1) -> Array:
  r"""Teacher-free KD (Tf-KD\ :sub:`reg`): distill from a hand-made virtual teacher.

  The virtual teacher puts :math:`a` on the label and spreads the rest uniformly,
  :math:`v_c = a` if :math:`c = y` else :math:`(1 - a)/(C - 1)`. With the default
  ``form='reference'`` (the authors' code, ``loss_kd_regularization``):

  .. math::

    \ell = \frac{m}{C}\,\mathrm{KL}\big(\mathrm{softmax}(v/T) \,\|\,
                                      \mathrm{softmax}(s)\big)

  the softmax of the probabilities :math:`v` divided by :math:`T`, against the
  untempered student; :math:`1/C` is ``nn.KLDivLoss``'s element-wise mean and
  :math:`m` the code's ``multiplier``. The batch mean equals the reference's
  ``loss_soft_regu`` with its published defaults (``correct_prob`` 0.99,
  ``reg_temperature`` 20, ``multiplier`` 100: the ResNet18 CIFAR-100 ``params.json``);
  the full objective :math:`(1-\alpha)\,\mathrm{CE} + \alpha\,\ell` is two terms,
  ``{'ce': dict(weight=1 - alpha), 'tf_kd': dict(weight=alpha)}`` (``reg_alpha`` 0.1
  there). ``form='tempered'`` is kdjax's earlier reading of the paper, a tempered
  virtual teacher :math:`v^T \propto v^{1/T}` against a tempered student:

  .. math::

    \ell = m\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(\log v / T) \,\|\,
                                   \mathrm{softmax}(s/T)\big)

  (use ``multiplier=1.0``; at :math:`T = 1` the target is :math:`v` itself).
  Examples with label ``-1`` are masked. Classes with an infinite logit are not
  classes: :math:`C` counts the finite ones and the virtual teacher lives on them.

  Args:
    student_logits: ``[..., classes]``.
    labels: integer labels of the per-example shape; ``-1`` = unlabeled.
    correct_prob: :math:`a`, the virtual teacher's probability of the label
      (:math:`a \ge 1/C`).
    temperature: :math:`T > 0`.
    multiplier: :math:`m`, the reference code's ``params.multiplier``.
    form: ``'reference'`` or ``'tempered'`` (see above).
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Yuan, Tay, Li, Wang, Feng. Revisiting Knowledge Distillation via Label
    Smoothing Regularization. CVPR 2020. arXiv:1909.11723. Reference code:
    yuanli2333/Teacher-free-Knowledge-Distillation, ``my_loss_function.py``
    (``loss_kd_regularization``).

  >>> import jax.numpy as jnp
  >>> s = jnp.log(jnp.array([[0.9, 0.05, 0.05]]))
  >>> print(tf_kd(s, jnp.array([0]), correct_prob=0.9, temperature=1.0, multiplier=1.0,
  ...             form='tempered').round(4))  # the student is the virtual teacher
  [0.]
  >>> print(f'{float(tf_kd(jnp.zeros((1, 10)), jnp.array([0]))[0]):.5f}')  # the defaults
  0.00113
  """
  if form not in TF_KD_FORMS:
    raise ValueError(f'form must be one of {TF_KD_FORMS}, got {form!r}')
  s = upcast(student_logits)
  axis = norm_axis(axis, s.ndim)
  valid, safe_labels = _labels_where(labels, where, s.shape, axis)
  (s,) = mask_inputs(valid, axis, s)
  s, inf = sanitize(s)
  num_classes = _finite_count(inf, axis).astype(s.dtype)
  a = jnp.asarray(correct_prob, s.dtype)
  temperature = jnp.asarray(temperature, s.dtype)
  onehot = _one_hot(safe_labels, s.shape[axis], axis, s.dtype) > 0
  if form == 'reference':
    v = jnp.where(onehot, a, (1.0 - a) / jnp.maximum(num_classes - 1.0, 1.0))
    log_target = finite_log_softmax(v / temperature, inf, axis)
    log_q = finite_log_softmax(s, inf, axis)
    scale = multiplier / jnp.squeeze(num_classes, axis)
  else:
    log_v = jnp.where(onehot, jnp.log(a),
                      jnp.log1p(-a) - jnp.log(jnp.maximum(num_classes - 1.0, 1.0)))
    log_v, no_mass = sanitize(log_v)  # a = 1: the other classes have no mass
    log_target = finite_log_softmax(log_v / temperature, jnp.logical_or(inf, no_mass), axis)
    log_q = finite_log_softmax(s / temperature, inf, axis)
    scale = multiplier * temperature**2
  return mask_value(valid, scale * kl_from_log_probs(log_target, log_q, axis, inf))


# --------------------------------------------------------------------------- adaptive


def adaptive_weight_kd(student_logits, teacher_logits, labels, *, temperature=4.0,
                       weighting: str = 'geometry', where=None, axis: int = -1,
                       eps: float = 1e-6) -> Array:
  r"""KD and CE fused per example by a closed-form weight in the spirit of TGeo-KD.

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

  Unlabeled examples (label ``-1``) get :math:`w_i = 1` (pure KD). This is *not*
  the method of the papers cited, only built after them: they learn the sample-wise
  fusion ratio (TGeo-KD: a small network on the trilateral geometry of S, T and G,
  trained by bilevel optimisation; KD-AIF: influence-function weights). kdjax keeps
  the same inputs (the S-T-G distances) in a closed form, with no extra network or
  outer loop, so the loss stays a pure function of arrays.

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
    After Hu et al. Less or More From Teacher: Exploiting Trilateral Geometry For
    Knowledge Distillation. 2023. arXiv:2312.15112; and Knowledge Distillation with
    Adapted Weight (KD-AIF). 2025.

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
  lp1 = tempered_log_probs(s, t, 1.0, axis)
  p1, q1 = probs(lp1.log_p, lp1.skip), probs(lp1.log_q, lp1.skip)
  if weighting == 'geometry':
    d_s = jnp.sqrt(jnp.sum(jnp.square(q1 - onehot), axis=axis))
    d_t = jnp.sqrt(jnp.sum(jnp.square(p1 - onehot), axis=axis))
    w = (d_s + eps) / (d_s + d_t + 2 * eps)
  else:
    w = jnp.sum(p1 * onehot, axis=axis)
  w = jax.lax.stop_gradient(jnp.where(labeled, w, 1.0))
  lp = tempered_log_probs(s, t, temperature, axis)
  soft = lp.temperature**2 * kl_from_log_probs(lp.log_p, lp.log_q, axis, lp.skip)
  hard = -jnp.sum(jnp.where(lp1.skip, 0.0, onehot * lp1.log_q), axis=axis)
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
def _lskd_term(*, temperature: Any = 2.0, ddof: int = 1) -> registry.Term:
  """KD between z-score standardized teacher and student logits, times T²."""
  if ddof not in (0, 1):
    raise ValueError(f'ddof must be 0 (population) or 1 (unbiased), got {ddof!r}')
  return registry.logit_term(logit_standardized_kd, temperature=temperature, ddof=ddof)


@registry.register('bdkd', family='response', reference='After ' + BDKD_2022)
def _bdkd_term(*, temperature: Any = 1.0) -> registry.Term:
  """After BD-KD: forward and reverse KL balanced per example by kdjax's entropy weight."""
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
def _tf_kd_term(*, correct_prob: Any = 0.99, temperature: Any = 20.0, multiplier: Any = 100.0,
                form: str = 'reference') -> registry.Term:
  """Teacher-free KD from a virtual teacher built from the label (unlabeled left out)."""
  if form not in TF_KD_FORMS:
    raise ValueError(f'form must be one of {TF_KD_FORMS}, got {form!r}')
  return labeled_term(tf_kd, correct_prob=correct_prob, temperature=temperature,
                      multiplier=multiplier, form=form)


@registry.register('adaptive_weight_kd', family='response',
                   reference='After ' + TGEO_2023 + ' (a closed-form weight in the spirit of '
                   'TGeo-KD, which learns it with a network and bilevel optimisation)',
                   needs=('student_logits', 'teacher_logits', 'labels'))
def _adaptive_weight_kd_term(*, temperature: Any = 4.0,
                             weighting: str = 'geometry') -> registry.Term:
  """KD and CE fused per example by a closed-form weight in the spirit of TGeo-KD."""
  if weighting not in ('geometry', 'teacher_confidence'):
    raise ValueError(f"weighting must be 'geometry' or 'teacher_confidence', got {weighting!r}")

  def fn(inputs):
    opts = registry.resolve(dict(temperature=temperature), inputs.get('step', 0))
    return adaptive_weight_kd(inputs['student_logits'], inputs['teacher_logits'],
                              inputs['labels'], weighting=weighting,
                              where=inputs.get('where'), **opts)
  return registry.stateless(fn)
