"""OFA-KD: one-for-all distillation between heterogeneous architectures.

Intermediate student features are mapped by learned heads into the logit space and
distilled there with the teacher's logits, using the OFA loss with adaptive target
enhancement. Per-example values ``[batch]`` in float32.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kdjax.losses import _feature_inputs as fi
from kdjax.losses import projectors
from kdjax.losses.registry import Term
from kdjax.losses.registry import register


def ofa_loss(student_logits: jax.Array, teacher_logits: jax.Array, labels: jax.Array, *,
             eps: float = 1.0, temperature: float = 1.0,
             where: jax.Array | None = None) -> jax.Array:
  r"""The OFA distillation loss with the target-enhancement exponent :math:`\epsilon`.

  With :math:`p^s, p^t` the softmaxes of student and teacher logits at temperature
  :math:`T` and :math:`m` the one-hot label,

  .. math::

    \ell_i = -\sum_c \big[(p^t_{i,c} + m_{i,c})^{\epsilon} - m_{i,c}\big] \log p^s_{i,c}
           = -\big[(1 + p^t_{i,\hat c})^{\epsilon} - 1\big] \log p^s_{i,\hat c}
             - \sum_{c \ne \hat c} (p^t_{i,c})^{\epsilon} \log p^s_{i,c} .

  For :math:`\epsilon = 1` this is the cross-entropy with the teacher's soft labels;
  :math:`\epsilon > 1` enhances the target class in proportion to the teacher's
  confidence (the paper's adaptive target information enhancement, whose target
  term is :math:`-(1 + p^t_{\hat c})^{\epsilon}\log p^s_{\hat c}` up to the one-hot
  cross-entropy; this is the full form used in the authors' release). The paper
  uses no temperature (:math:`T = 1`). An unlabeled example (label ``-1``) gets no
  enhancement: :math:`-\sum_c (p^t_c)^{\epsilon}\log p^s_c`.

  Args:
    student_logits: ``[B, C]`` (a head's or the student's own logits).
    teacher_logits: ``[B, C]``.
    labels: ``[B]`` int.
    eps: the enhancement exponent :math:`\epsilon` (the paper tunes it in about
      ``[1, 1.6]``).
    temperature: :math:`T`.
    where: ``[B]`` example mask.

  Returns:
    ``[B]`` float32.

  References:
    Hao, Guo, Han, Tang, Hu, Wang, Xu. One-for-All: Bridge the Gap Between
    Heterogeneous Architectures in Knowledge Distillation. NeurIPS 2023.
    arXiv:2310.19444.

  >>> z = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  >>> round(float(ofa_loss(z, z, jnp.array([0]))[0]), 4)  # soft-label CE = entropy
  1.0397
  """
  zs, zt = fi.f32(student_logits), fi.f32(teacher_logits)
  ex = fi.example_mask(where, zs.shape[0])
  zs, zt = fi.zero_masked(zs, ex), fi.zero_masked(zt, ex)
  log_ps = jax.nn.log_softmax(zs / temperature, axis=-1)
  pt = jax.nn.softmax(zt / temperature, axis=-1)
  target = jax.nn.one_hot(jnp.asarray(labels), zs.shape[-1], dtype=jnp.float32)  # -1 -> zeros
  weight = (pt + target) ** eps - target
  return jnp.where(ex, -jnp.sum(weight * log_ps, axis=-1), 0.0)


def ofa_head_init(rng: jax.Array, feature_shape: Sequence[int], num_classes: int) -> dict:
  """Params of an OFA head: global average pooling, then a linear map to the classes.

  The paper's heads are stage-specific stacks (depthwise-separable convolutions or
  transformer blocks, then pooling and a linear layer); kdjax uses the smallest head
  of that family, pooling plus a linear layer, so the loss stays architecture-free.

  >>> ofa_head_init(jax.random.key(0), (2, 8, 8, 16), 10)['kernel'].shape
  (16, 10)
  """
  return projectors.linear_init(rng, int(feature_shape[-1]), num_classes)


def ofa_head_apply(params: dict, feature: jax.Array) -> jax.Array:
  """``[B, ..., C_f] -> [B, classes]`` logits: mean over positions, then linear.

  >>> p = ofa_head_init(jax.random.key(0), (2, 4, 3), 5)
  >>> ofa_head_apply(p, jnp.ones((2, 4, 3))).shape
  (2, 5)
  """
  f = fi.f32(feature)
  if f.ndim > 2:
    f = jnp.mean(f, axis=tuple(range(1, f.ndim - 1)))
  return projectors.linear_apply(params, f)


@register('ofa', family='feature', needs=('student_features', 'teacher_logits', 'labels'),
          reference='Hao et al., One-for-All: Bridge the Gap Between Heterogeneous '
                    'Architectures in Knowledge Distillation, NeurIPS 2023, arXiv:2310.19444')
def ofa_term(student: str | Sequence[str] = 'stage1', eps: float = 1.0,
             temperature: float = 1.0, include_logits: bool = False) -> Term:
  """OFA: learned heads map named student features to logits, distilled with ``ofa_loss``.

  Options: ``student`` (a name or a list; values sum over stages), ``eps``,
  ``temperature``, ``include_logits`` (also apply the OFA loss to the student's own
  logits, the paper's last-stage term). Head params train with the student.
  """
  names = fi.names(student)

  def init(rng, inputs):
    num_classes = int(jnp.shape(inputs['teacher_logits'])[-1])
    params = {}
    for i, name in enumerate(names):
      f = fi.feature(inputs, 'student', name, 'ofa')
      params[name] = ofa_head_init(jax.random.fold_in(rng, i), f.shape, num_classes)
    return params, {}

  def apply(params, state, inputs):
    where = inputs.get('where')
    labels = inputs['labels']
    zt = inputs['teacher_logits']
    ex = fi.example_mask(where, zt.shape[0])
    total = 0.0
    for name in names:
      zs = ofa_head_apply(params[name], fi.feature(inputs, 'student', name, 'ofa'))
      total = total + ofa_loss(zs, zt, labels, eps=eps, temperature=temperature, where=ex)
    if include_logits:
      total = total + ofa_loss(inputs['student_logits'], zt, labels, eps=eps,
                               temperature=temperature, where=ex)
    return fi.per_example_output(total, where), state

  return Term(init, apply)
