"""MiniLM: deep self-attention distillation (attention distributions and value relations).

Per-example values ``[batch]`` in float32; ``where`` is ``[B]`` (examples) or
``[B, T]`` (tokens: padded queries are skipped and padded keys removed from the
value relation).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import _feature_inputs as fi
from kdjax.losses.registry import Term
from kdjax.losses.registry import register
from kdjax.losses.registry import stateless

_TINY = float(np.finfo(np.float32).tiny)


def _masks(where, batch: int, queries: int):
  ex = fi.example_mask(where, batch)
  if where is None or jnp.ndim(where) == 1:
    return ex, jnp.broadcast_to(ex[:, None], (batch, queries))
  where = jnp.asarray(where).astype(bool)
  if where.shape != (batch, queries):
    raise ValueError(f'where has shape {where.shape}; expected ({batch},) or ({batch}, {queries})')
  return ex, where


def _kl_rows(p, log_p, log_q):
  """``sum_k p (log p - log q)`` over the last axis; terms with ``p == 0`` are zero."""
  pos = p > 0
  return jnp.sum(jnp.where(pos, p * (jnp.where(pos, log_p, 0.0) - log_q), 0.0), axis=-1)


def _mean_over_heads_queries(kl, query_mask):
  """``kl [B, H, Q]`` -> ``[B]``: mean over heads and valid queries."""
  w = query_mask[:, None, :].astype(jnp.float32)
  total = jnp.sum(jnp.where(query_mask[:, None, :], kl, 0.0), axis=(1, 2))
  count = jnp.sum(jnp.broadcast_to(w, kl.shape), axis=(1, 2))
  return total / jnp.maximum(count, 1.0)


def attention_kl(student_attention: jax.Array, teacher_attention: jax.Array, *,
                 where: jax.Array | None = None) -> jax.Array:
  r"""KL from teacher to student self-attention distributions, per head and query.

  .. math::

    \ell_i = \frac{1}{A_h |Q_i|} \sum_{a=1}^{A_h} \sum_{q \in Q_i}
      \mathrm{KL}\big(A^t_{i,a,q,\cdot} \,\big\|\, A^s_{i,a,q,\cdot}\big)

  Args:
    student_attention: ``[B, H, Q, K]`` attention probabilities (rows sum to 1).
    teacher_attention: same shape.
    where: ``[B]`` or ``[B, Q]`` mask.

  Returns:
    ``[B]`` float32. Student probabilities are floored at the smallest normal
    float32 inside the log, so a zero student probability gives a large finite value.

  References:
    Wang, Wei, Dong, Bao, Yang, Zhou. MiniLM: Deep Self-Attention Distillation for
    Task-Agnostic Compression of Pre-Trained Transformers. NeurIPS 2020.
    arXiv:2002.10957.

  >>> a = jax.nn.softmax(jnp.arange(8.0).reshape(1, 1, 2, 4))
  >>> attention_kl(a, a).tolist()
  [0.0]
  """
  s, t = fi.f32(student_attention), fi.f32(teacher_attention)
  if s.shape != t.shape:
    raise ValueError(f'attention shapes differ: student {s.shape}, teacher {t.shape}; MiniLM '
                     'needs the same heads and sequence length')
  b, _, q, _ = s.shape
  ex, qmask = _masks(where, b, q)
  s = jnp.where(qmask[:, None, :, None], s, 1.0)   # masked rows: harmless constants
  t = jnp.where(qmask[:, None, :, None], t, 1.0)
  log_s = jnp.log(jnp.maximum(s, _TINY))
  log_t = jnp.log(jnp.maximum(t, _TINY))
  kl = _kl_rows(t, log_t, log_s)
  return jnp.where(ex, _mean_over_heads_queries(kl, qmask), 0.0)


def value_relation(values: jax.Array, num_heads: int, *,
                   key_mask: jax.Array | None = None) -> jax.Array:
  r"""Log of MiniLM's value relation :math:`\mathrm{softmax}(V_a V_a^\top / \sqrt{d_k})`.

  Args:
    values: ``[B, T, D]`` (heads concatenated on the last axis).
    num_heads: ``D`` is split into this many heads of width ``d_k = D / num_heads``.
    key_mask: optional ``[B, T]``; masked keys get probability zero.

  Returns:
    ``[B, num_heads, T, T]`` log-probabilities.

  >>> value_relation(jnp.ones((2, 5, 8)), 4).shape
  (2, 4, 5, 5)
  """
  v = fi.f32(values)
  b, t, d = v.shape
  if d % num_heads:
    raise ValueError(f'value width {d} is not divisible by {num_heads} heads')
  v = v.reshape(b, t, num_heads, d // num_heads).transpose(0, 2, 1, 3)
  scores = jnp.einsum('bhqd,bhkd->bhqk', v, v) / np.sqrt(d // num_heads)
  if key_mask is not None:
    scores = jnp.where(key_mask[:, None, None, :], scores, -1e30)
  return jax.nn.log_softmax(scores, axis=-1)


def value_relation_kl(student_values: jax.Array, teacher_values: jax.Array, num_heads: int, *,
                      where: jax.Array | None = None) -> jax.Array:
  r"""KL between teacher and student value relations, mean over heads and valid queries.

  .. math::

    \ell_i = \frac{1}{A_h |Q_i|} \sum_{a} \sum_{q \in Q_i}
      \mathrm{KL}\big(VR^t_{i,a,q,\cdot} \,\big\|\, VR^s_{i,a,q,\cdot}\big),\quad
    VR = \mathrm{softmax}\big(V_a V_a^\top / \sqrt{d_k}\big)

  Student and teacher may have different widths (each is split into ``num_heads``).

  >>> v = jnp.arange(24.0).reshape(1, 3, 8) / 10
  >>> value_relation_kl(v, v, 2).tolist()
  [0.0]
  """
  s, t = fi.f32(student_values), fi.f32(teacher_values)
  if s.shape[:2] != t.shape[:2]:
    raise ValueError(f'value shapes differ in batch/length: student {s.shape}, teacher {t.shape}')
  b, q = s.shape[:2]
  ex, qmask = _masks(where, b, q)
  s = fi.zero_masked(s, qmask)
  t = fi.zero_masked(t, qmask)
  log_s = value_relation(s, num_heads, key_mask=qmask)
  log_t = value_relation(t, num_heads, key_mask=qmask)
  keys = qmask[:, None, None, :]
  p_t = jnp.where(keys, jnp.exp(log_t), 0.0)
  kl = _kl_rows(p_t, jnp.where(keys, log_t, 0.0), jnp.where(keys, log_s, 0.0))
  return jnp.where(ex, _mean_over_heads_queries(kl, qmask), 0.0)


def minilm_attention(student_attention: jax.Array, teacher_attention: jax.Array,
                     student_values: jax.Array | None = None,
                     teacher_values: jax.Array | None = None, *,
                     num_heads: int | None = None, value_weight: float = 1.0,
                     where: jax.Array | None = None) -> jax.Array:
  r"""MiniLM loss: attention-distribution KL plus value-relation KL (last layer).

  .. math::

    \ell_i = \mathcal{L}_{AT,i} + w_{VR} \, \mathcal{L}_{VR,i}

  (see :func:`attention_kl` and :func:`value_relation_kl`). Without values only
  the attention term is computed.

  Args:
    student_attention: ``[B, H, T, T]`` probabilities of the student's last layer.
    teacher_attention: same shape, the teacher's last layer.
    student_values: optional ``[B, T, D_s]`` values of that layer.
    teacher_values: optional ``[B, T, D_t]``.
    num_heads: heads for the value relation (default: ``H`` of the attentions).
    value_weight: :math:`w_{VR}`.
    where: ``[B]`` or ``[B, T]`` mask.

  Returns:
    ``[B]`` float32.

  References:
    Wang, Wei, Dong, Bao, Yang, Zhou. MiniLM: Deep Self-Attention Distillation for
    Task-Agnostic Compression of Pre-Trained Transformers. NeurIPS 2020.
    arXiv:2002.10957.

  >>> a = jax.nn.softmax(jnp.zeros((2, 2, 3, 3)))
  >>> minilm_attention(a, a, jnp.ones((2, 3, 4)), jnp.ones((2, 3, 6))).tolist()
  [0.0, 0.0]
  """
  value = attention_kl(student_attention, teacher_attention, where=where)
  if student_values is not None and teacher_values is not None:
    heads = num_heads or student_attention.shape[1]
    value = value + value_weight * value_relation_kl(student_values, teacher_values, heads,
                                                     where=where)
  return value


@register('minilm_attention', family='feature',
          needs=('student_attentions', 'teacher_attentions', 'student_features',
                 'teacher_features'),
          reference='Wang et al., MiniLM: Deep Self-Attention Distillation, NeurIPS 2020, '
                    'arXiv:2002.10957')
def minilm_attention_term(student_layer: int = -1, teacher_layer: int = -1,
                          student_values: str | None = None, teacher_values: str | None = None,
                          num_heads: int | None = None, value_weight: float = 1.0) -> Term:
  """MiniLM on ``inputs['*_attentions'][layer]`` and optional named value features."""
  if (student_values is None) != (teacher_values is None):
    raise ValueError('minilm_attention: give both student_values and teacher_values, or neither')

  def fn(inputs):
    a_s = fi.attention(inputs, 'student', student_layer, 'minilm_attention')
    a_t = fi.attention(inputs, 'teacher', teacher_layer, 'minilm_attention')
    v_s = v_t = None
    if student_values is not None:
      v_s = fi.feature(inputs, 'student', student_values, 'minilm_attention')
      v_t = fi.feature(inputs, 'teacher', teacher_values, 'minilm_attention')
    where = inputs.get('where')
    value = minilm_attention(a_s, a_t, v_s, v_t, num_heads=num_heads,
                             value_weight=value_weight, where=where)
    return fi.per_example_output(value, where)

  return stateless(fn)


MINILM_V2_2021 = ('Wang, Bao, Huang, Dong, Wei. MiniLMv2: Multi-Head Self-Attention Relation '
                  'Distillation for Compressing Pretrained Transformers. Findings of ACL 2021. '
                  'arXiv:2012.15828')


@register('minilm_relations', family='feature',
          needs=('student_features', 'teacher_features'), reference=MINILM_V2_2021)
def minilm_relations_term(student_layer: int = -1, teacher_layer: int = -1,
                          relation_heads: int = 1, relations=('query', 'key', 'value'),
                          num_student_layers: int | None = None,
                          num_teacher_layers: int | None = None) -> Term:
  r"""MiniLMv2's self-attention relations between one student and one teacher layer.

  For each relation :math:`r` in ``relations`` (queries, keys, values), both sides'
  projections of that layer (the features ``query{i}``, ``key{i}``, ``value{i}`` a
  transformer returns with ``model.outputs=['qkv']``) are split into ``relation_heads``
  heads whatever their own head count and width, and the loss is the sum over
  :math:`r` of :func:`value_relation_kl`:

  .. math::

    \ell_i = \sum_r \frac{1}{A_r |Q_i|} \sum_{a, q}
      \mathrm{KL}\big(R^t_{r,a,q,\cdot} \,\big\|\, R^s_{r,a,q,\cdot}\big), \quad
    R_{r,a} = \mathrm{softmax}\big(A_{r,a} A_{r,a}^\top / \sqrt{d_r}\big)

  so teacher and student may differ in width and head count (MiniLMv2's point). The
  paper pairs the student's last layer with one upper-middle teacher layer.

  Args:
    student_layer: 1-based layer index of the student (negative: from the end, which
      needs ``num_student_layers``; -1 with it is the last layer).
    teacher_layer: likewise for the teacher.
    relation_heads: :math:`A_r`; must divide both sides' widths.
    relations: any of ``'query'``, ``'key'``, ``'value'``.
    num_student_layers: the student's layer count, to resolve a negative index.
    num_teacher_layers: the teacher's, likewise.
  """
  bad = sorted(set(relations) - {'query', 'key', 'value'})
  if bad or not relations:
    raise ValueError(f'minilm_relations: relations must be some of query, key, value; got '
                     f'{list(relations)}')

  def layer(index, count, side):
    if index > 0:
      return index
    if count is None:
      raise ValueError(f'minilm_relations: {side}_layer={index} counts from the end; give '
                       f'num_{side}_layers, or a positive (1-based) layer')
    return count + 1 + index

  s_layer = layer(student_layer, num_student_layers, 'student')
  t_layer = layer(teacher_layer, num_teacher_layers, 'teacher')

  def fn(inputs):
    where = inputs.get('where')
    total = 0.0
    for r in relations:
      s = fi.feature(inputs, 'student', f'{r}{s_layer}', 'minilm_relations')
      t = fi.feature(inputs, 'teacher', f'{r}{t_layer}', 'minilm_relations')
      total = total + value_relation_kl(s, t, relation_heads, where=where)
    return fi.per_example_output(total, where)

  return stateless(fn)
