"""Feature-based distillation losses: hints, attention maps, hidden states.

Every function here is pure, computes in float32 (bfloat16 inputs are accepted) and
returns a per-example value ``[batch]``; the caller reduces. ``where`` masks examples
(``[batch]``) or positions (``feature.shape[:-1]``, e.g. padding tokens): a masked
example's value is exactly zero and so is its gradient.

Features are channels-last: ``[B, D]``, ``[B, L, C]``, ``[B, H, W, C]``, ``[B, T, D]``.
Losses with a learned part (FitNet's regressor, OFA's head) are ``(init, apply)``
pairs with explicit params; their registered terms build the params from the
feature shapes found in the registry ``inputs`` and train them with the student.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import _feature_inputs as fi
from kdjax.losses import projectors
from kdjax.losses.registry import Term
from kdjax.losses.registry import register
from kdjax.losses.registry import stateless

_FEATURES = ('student_features', 'teacher_features')


def _term_where(where, student, teacher):
  """The ``where`` to hand a loss: per-position if both features have those positions."""
  if where is None:
    return None
  where = jnp.asarray(where)
  if where.ndim > 1 and where.shape[1:] == student.shape[1:-1] == teacher.shape[1:-1]:
    return where
  return fi.example_mask(where, student.shape[0])


def _pair_masks(where, student, teacher):
  """``(example_mask, position_mask or None)`` for a student/teacher feature pair.

  A position mask needs both features to have its spatial shape (no pooling).
  """
  if where is not None and jnp.ndim(where) > 1 and student.shape[:-1] != teacher.shape[:-1]:
    raise ValueError(f'a per-position where {jnp.shape(where)} needs student and teacher '
                     f'features of the same positions; got {student.shape} and {teacher.shape}')
  return fi.split_where(where, teacher)


def _masked_pair(where, student, teacher):
  """float32 features with masked examples and positions zeroed, and the masks."""
  s, t = fi.f32(student), fi.f32(teacher)
  ex, pos = _pair_masks(where, s, t)
  s = fi.zero_masked(fi.zero_masked(s, ex), pos)
  t = fi.zero_masked(fi.zero_masked(t, ex), pos)
  return s, t, ex, pos


# =========================================================================== FitNet

def fitnet_init(rng: jax.Array, student_shape: Sequence[int], teacher_shape: Sequence[int],
                *, use_bias: bool = True) -> dict:
  """Params of FitNet's regressor: a 1x1-conv / linear map from student to teacher channels.

  Args:
    rng: a PRNG key.
    student_shape: shape of the student feature, channels last.
    teacher_shape: shape of the teacher feature, channels last.
    use_bias: whether the regressor has a bias.

  Returns:
    ``{'kernel': [C_s, C_t], 'bias': [C_t]}``.

  >>> fitnet_init(jax.random.key(0), (8, 16, 16, 32), (8, 8, 8, 64))['kernel'].shape
  (32, 64)
  """
  return projectors.linear_init(rng, int(student_shape[-1]), int(teacher_shape[-1]),
                                use_bias=use_bias)


def fitnet(params: dict, student_feature: jax.Array, teacher_feature: jax.Array, *,
           where: jax.Array | None = None) -> jax.Array:
  r"""FitNet hint loss: mean squared error between the regressed student and the teacher.

  With :math:`r` the learned regressor (a linear map on the channel axis, a 1x1
  convolution for conv features) and :math:`P` the adaptive average pooling that
  brings both features to the smaller spatial size on each axis
  (:func:`kdjax.losses.projectors.match_spatial`),

  .. math::

    \ell_i = \frac{1}{|S| C_t} \sum_{p \in S} \sum_{c=1}^{C_t}
      \big(r(P s_i)_{p,c} - (P t_i)_{p,c}\big)^2 ,

  the mean over positions :math:`S` and teacher channels. The paper writes
  :math:`\tfrac12 \lVert u_h - r(v_g) \rVert^2`; the per-element mean used here
  (as in most reimplementations) keeps the scale independent of the feature size.
  Pooling commutes with the 1x1 regressor, so pooling before or after it is the same.

  Args:
    params: from :func:`fitnet_init`.
    student_feature: ``[B, ..., C_s]``.
    teacher_feature: ``[B, ..., C_t]``, same rank (or ``[B, C_t]``, which
      global-average-pools the student).
    where: ``[B]`` example mask, or a ``[B, *S]`` position mask when both
      features have the same positions ``S``.

  Returns:
    ``[B]`` float32.

  References:
    Romero, Ballas, Kahou, Chassang, Gatta, Bengio. FitNets: Hints for Thin Deep
    Nets. ICLR 2015. arXiv:1412.6550.

  >>> s, t = jnp.ones((2, 8, 8, 4)), jnp.ones((2, 4, 4, 6))
  >>> params = fitnet_init(jax.random.key(0), s.shape, t.shape)
  >>> fitnet(params, s, t).shape
  (2,)
  """
  s, t, ex, pos = _masked_pair(where, student_feature, teacher_feature)
  s, t = projectors.match_spatial(s, t)
  err = jnp.mean(jnp.square(projectors.linear_apply(params, s) - t), axis=-1)
  return jnp.where(ex, fi.position_mean(err, pos), 0.0)


@register('fitnet', family='feature', needs=_FEATURES,
          reference='Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015, '
                    'arXiv:1412.6550')
def fitnet_term(student: str = 'stage1', teacher: str = 'stage1', use_bias: bool = True) -> Term:
  """FitNet hint with a learned 1x1-conv regressor (trained with the student).

  Options: ``student``, ``teacher`` name entries of ``inputs['student_features']`` and
  ``inputs['teacher_features']``; ``use_bias``.
  """
  def init(rng, inputs):
    s = fi.feature(inputs, 'student', student, 'fitnet')
    t = fi.feature(inputs, 'teacher', teacher, 'fitnet')
    return fitnet_init(rng, s.shape, t.shape, use_bias=use_bias), {}

  def apply(params, state, inputs):
    s = fi.feature(inputs, 'student', student, 'fitnet')
    t = fi.feature(inputs, 'teacher', teacher, 'fitnet')
    where = inputs.get('where')
    value = fitnet(params, s, t, where=_term_where(where, s, t))
    return fi.per_example_output(value, where), state

  return Term(init, apply)


# =========================================================================== AT

def attention_map(feature: jax.Array, *, p: float = 2.0) -> jax.Array:
  r"""Spatial attention map :math:`\frac{1}{C}\sum_c |f_{\cdot,c}|^p`, ``[B, *S]`` (unnormalized).

  >>> attention_map(jnp.ones((2, 4, 4, 8))).shape
  (2, 4, 4)
  """
  f = fi.f32(feature)
  if f.ndim < 3:
    raise ValueError(f'attention transfer needs spatial or token features [B, ..., C]; '
                     f'got shape {f.shape}')
  return jnp.mean(jnp.abs(f) ** p, axis=-1)


def attention_transfer(student_feature: jax.Array, teacher_feature: jax.Array, *,
                       p: float = 2.0, where: jax.Array | None = None) -> jax.Array:
  r"""Activation-based attention transfer (AT).

  The attention map of a feature is :math:`Q = \frac1C \sum_c |f_c|^p` over the
  spatial positions (tokens for ``[B, T, D]``), flattened and L2-normalized per
  example, :math:`a = Q / \lVert Q \rVert_2`; the loss is

  .. math::

    \ell_i = \lVert a^s_i - a^t_i \rVert_2^2 \in [0, 4].

  Scaling: the reference implementation takes the *mean* of the squared difference
  over the positions and the batch and multiplies it by :math:`\beta/2` with
  :math:`\beta = 1000`; this value summed over positions equals that per-example
  term at ``weight = β / (2 N)`` for ``N`` map positions. (The mean over channels
  instead of the sum does not matter after normalization.) If the two maps have
  different spatial sizes, the larger map is adaptive-average-pooled to the smaller
  before normalization. Masked positions are removed from both maps.

  Args:
    student_feature: ``[B, *S_s, C_s]``.
    teacher_feature: ``[B, *S_t, C_t]`` (channel counts may differ).
    p: the exponent of the map.
    where: ``[B]`` example mask, or a ``[B, *S]`` position mask when both
      features have the same positions ``S``.

  Returns:
    ``[B]`` float32.

  References:
    Zagoruyko, Komodakis. Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer. ICLR 2017.
    arXiv:1612.03928.

  >>> s = jnp.ones((2, 8, 8, 4)); t = jnp.ones((2, 4, 4, 16))
  >>> attention_transfer(s, t).round(4).tolist()
  [0.0, 0.0]
  """
  s, t, ex, _ = _masked_pair(where, student_feature, teacher_feature)
  # The normalized map does not depend on the scale of f: rescale for overflow safety.
  per_example = lambda x: tuple(range(1, x.ndim))
  s, t = fi.rescale(s, per_example(s))[0], fi.rescale(t, per_example(t))[0]
  qs, qt = projectors.match_spatial(attention_map(s, p=p)[..., None],
                                    attention_map(t, p=p)[..., None])
  qs, qt = qs.reshape(qs.shape[0], -1), qt.reshape(qt.shape[0], -1)
  diff = fi.l2_normalize(qs) - fi.l2_normalize(qt)
  return jnp.where(ex, fi.sq_norm(diff), 0.0)


@register('attention_transfer', family='feature', needs=_FEATURES,
          reference='Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017, '
                    'arXiv:1612.03928')
def attention_transfer_term(student: str | Sequence[str] = 'stage1',
                            teacher: str | Sequence[str] = 'stage1', p: float = 2.0) -> Term:
  """Attention transfer on named feature pairs (lists pair up one to one; values sum)."""
  pairs = fi.paired_names('attention_transfer', student, teacher)

  def fn(inputs):
    where = inputs.get('where')
    total = 0.0
    for s_name, t_name in pairs:
      s = fi.feature(inputs, 'student', s_name, 'attention_transfer')
      t = fi.feature(inputs, 'teacher', t_name, 'attention_transfer')
      total = total + attention_transfer(s, t, p=p, where=_term_where(where, s, t))
    return fi.per_example_output(total, where)

  return stateless(fn)


# =========================================================================== hidden states

def _same_dims(loss, s, t):
  if s.shape != t.shape:
    raise ValueError(f'{loss}: student {s.shape} and teacher {t.shape} features differ in shape; '
                     'use fitnet for a learned projection between different widths')


def hidden_mse(student_hidden: jax.Array, teacher_hidden: jax.Array, *,
               where: jax.Array | None = None) -> jax.Array:
  r"""Mean squared error between hidden states, averaged over positions.

  .. math::

    \ell_i = \frac{1}{|S_i|} \sum_{p \in S_i} \frac1D \lVert s_{i,p} - t_{i,p} \rVert_2^2

  over the valid positions :math:`S_i` (all, or those of a ``[B, T]`` token mask).

  Args:
    student_hidden: ``[B, ..., D]``.
    teacher_hidden: same shape.
    where: ``[B]`` example mask or ``[B, ...]`` position (token) mask.

  Returns:
    ``[B]`` float32.

  References:
    Sun, Cheng, Gan, Liu. Patient Knowledge Distillation for BERT Model Compression.
    EMNLP 2019. arXiv:1908.09355 (hidden-state matching; also TinyBERT,
    arXiv:1909.10351).

  >>> hidden_mse(jnp.ones((2, 3, 4)), jnp.zeros((2, 3, 4))).tolist()
  [1.0, 1.0]
  """
  s, t, ex, pos = _masked_pair(where, student_hidden, teacher_hidden)
  _same_dims('hidden_mse', s, t)
  err = jnp.mean(jnp.square(s - t), axis=-1)
  return jnp.where(ex, fi.position_mean(err, pos), 0.0)


def hidden_cosine(student_hidden: jax.Array, teacher_hidden: jax.Array, *,
                  where: jax.Array | None = None) -> jax.Array:
  r"""Cosine distance between hidden states, averaged over positions.

  .. math::

    \ell_i = \frac{1}{|S_i|} \sum_{p \in S_i}
      \Big(1 - \frac{\langle s_{i,p}, t_{i,p} \rangle}
                    {\lVert s_{i,p} \rVert \lVert t_{i,p} \rVert}\Big)

  A zero vector has cosine 0 with anything (distance 1), with finite gradients.

  Args:
    student_hidden: ``[B, ..., D]``.
    teacher_hidden: same shape.
    where: ``[B]`` example mask or ``[B, ...]`` position (token) mask.

  Returns:
    ``[B]`` float32 in ``[0, 2]``.

  References:
    Sanh, Debut, Chaumond, Wolf. DistilBERT, a distilled version of BERT: smaller,
    faster, cheaper and lighter. NeurIPS EMC² workshop 2019. arXiv:1910.01108.

  >>> hidden_cosine(jnp.ones((1, 2, 3)), -jnp.ones((1, 2, 3))).tolist()
  [2.0]
  """
  s, t, ex, pos = _masked_pair(where, student_hidden, teacher_hidden)
  _same_dims('hidden_cosine', s, t)
  cos = jnp.sum(fi.l2_normalize(s) * fi.l2_normalize(t), axis=-1)
  return jnp.where(ex, fi.position_mean(1.0 - cos, pos), 0.0)


def _hidden_term(loss_fn, name, student, teacher):
  def fn(inputs):
    s = fi.feature(inputs, 'student', student, name)
    t = fi.feature(inputs, 'teacher', teacher, name)
    where = inputs.get('where')
    return fi.per_example_output(loss_fn(s, t, where=_term_where(where, s, t)), where)
  return stateless(fn)


@register('hidden_mse', family='feature', needs=_FEATURES,
          reference='Sun et al., Patient Knowledge Distillation for BERT Model Compression, '
                    'EMNLP 2019, arXiv:1908.09355')
def hidden_mse_term(student: str = 'hidden', teacher: str = 'hidden') -> Term:
  """Hidden-state MSE per token, averaged over valid tokens."""
  return _hidden_term(hidden_mse, 'hidden_mse', student, teacher)


@register('hidden_cosine', family='feature', needs=_FEATURES,
          reference='Sanh et al., DistilBERT, NeurIPS EMC2 workshop 2019, arXiv:1910.01108')
def hidden_cosine_term(student: str = 'hidden', teacher: str = 'hidden') -> Term:
  """Hidden-state cosine distance per token, averaged over valid tokens."""
  return _hidden_term(hidden_cosine, 'hidden_cosine', student, teacher)


# =========================================================================== ND

def batch_class_means(embeddings: jax.Array, labels: jax.Array, *,
                      where: jax.Array | None = None) -> jax.Array:
  r"""For each example, the mean embedding of the valid batch examples with its label.

  ``[B, D]``; row :math:`i` is :math:`\frac{1}{|\{j: y_j = y_i\}|}\sum_{j: y_j = y_i} e_j`
  over valid, labeled :math:`j` (zero for an unlabeled or masked example).

  >>> batch_class_means(jnp.array([[1., 0.], [3., 0.], [0., 5.]]), jnp.array([0, 0, 1])).tolist()
  [[2.0, 0.0], [2.0, 0.0], [0.0, 5.0]]
  """
  e = fi.flatten_examples(embeddings)
  labels = jnp.asarray(labels)
  valid = jnp.logical_and(fi.example_mask(where, e.shape[0]), labels >= 0)
  e = fi.zero_masked(e, valid)
  same = jnp.logical_and(labels[:, None] == labels[None, :], valid[None, :])
  same = jnp.logical_and(same, valid[:, None]).astype(jnp.float32)
  return (same @ e) / jnp.maximum(jnp.sum(same, axis=1, keepdims=True), 1.0)


def nd_loss(student_embedding: jax.Array, teacher_embedding: jax.Array,
            class_mean: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
  r"""ND loss: student feature norm and direction regularized by the teacher's class mean.

  With :math:`c_i` the teacher's class-mean embedding for example :math:`i`'s label
  and :math:`e_i = c_i / \lVert c_i \rVert`,

  .. math::

    \ell_i = 1 - \frac{\langle s_i, e_i \rangle}{\max(\lVert s_i \rVert, \lVert t_i \rVert)} .

  The projection :math:`\langle s_i, e_i\rangle` grows with the student norm (up to the
  teacher's norm, where the denominator takes over) and with the alignment of its
  direction to the class mean: one term encourages large norms and aligned
  directions (the form in the authors' released code).

  Args:
    student_embedding: ``[B, D]`` penultimate student features (projected to the
      teacher's width if it differs; the registered term does that with a learned
      linear map).
    teacher_embedding: ``[B, D]``.
    class_mean: ``[B, D]``: each example's class mean, e.g. ``means[labels]`` from
      precomputed teacher class means, or :func:`batch_class_means`.
    where: ``[B]`` example mask.

  Returns:
    ``[B]`` float32.

  References:
    Wang, Cheng, Duan, Wang, Feng, Kong. Improving Knowledge Distillation via
    Regularizing Feature Norm and Direction. ECCV 2024. arXiv:2305.17007.

  >>> s = jnp.array([[2.0, 0.0]]); t = jnp.array([[1.0, 1.0]]); c = jnp.array([[1.0, 0.0]])
  >>> nd_loss(s, t, c).tolist()
  [0.0]
  """
  s, t = fi.flatten_examples(student_embedding), fi.flatten_examples(teacher_embedding)
  c = fi.flatten_examples(class_mean)
  ex = fi.example_mask(where, s.shape[0])
  s, t, c = (fi.zero_masked(x, ex) for x in (s, t, c))
  # Joint rescaling of (s, t) leaves the ratio unchanged and keeps norms in range.
  _, m = fi.rescale(jnp.concatenate([s, t], axis=-1), axis=-1)
  s, t = s / m, t / m
  den = jnp.maximum(fi.safe_norm(s), fi.safe_norm(t))
  den = jnp.where(den > 0.5, den, 1.0)  # nonzero rows have den >= 1 after rescaling
  proj = jnp.sum(s * fi.l2_normalize(c), axis=-1)
  return jnp.where(ex, 1.0 - proj / den, 0.0)


@register('nd_loss', family='feature', needs=_FEATURES + ('labels',),
          reference='Wang et al., Improving Knowledge Distillation via Regularizing Feature '
                    'Norm and Direction, ECCV 2024, arXiv:2305.17007')
def nd_loss_term(student: str = 'penultimate', teacher: str = 'penultimate',
                 class_means=None) -> Term:
  """ND loss on penultimate features against teacher class means.

  Options: ``class_means``: a ``[num_classes, D]`` array of the teacher's class-mean
  embeddings over the training set (as in the paper; e.g. computed once from the
  teacher cache). When absent, the class means of the current batch's teacher
  embeddings are used (an approximation that needs a few examples per class in a
  batch). Unlabeled examples (label -1) are skipped. A student narrower or wider
  than the teacher is mapped to the teacher's width by a learned linear projector
  (params trained with the student).
  """
  means = None if class_means is None else jnp.asarray(class_means, jnp.float32)

  def dims(inputs):
    s = fi.feature(inputs, 'student', student, 'nd_loss')
    t = fi.feature(inputs, 'teacher', teacher, 'nd_loss')
    return s, t

  def init(rng, inputs):
    s, t = dims(inputs)
    ds, dt = int(np.prod(s.shape[1:])), int(np.prod(t.shape[1:]))
    if means is not None and means.shape[-1] != dt:
      raise ValueError(f'nd_loss: class_means have width {means.shape[-1]} but the teacher '
                       f'feature {teacher!r} has {dt}')
    return ({} if ds == dt else projectors.linear_init(rng, ds, dt)), {}

  def apply(params, state, inputs):
    s, t = dims(inputs)
    s, t = fi.flatten_examples(s), fi.flatten_examples(t)
    if params:
      s = projectors.linear_apply(params, s)
    labels = jnp.asarray(inputs['labels'])
    where = inputs.get('where')
    ex = fi.example_mask(where, s.shape[0])
    labeled = jnp.logical_and(ex, labels >= 0)
    if means is None:
      c = batch_class_means(t, labels, where=ex)
    else:
      c = means[jnp.clip(labels, 0, means.shape[0] - 1)]
    value = nd_loss(s, t, c, where=labeled)
    return fi.term_output(value, where, labeled), state

  return Term(init, apply)
