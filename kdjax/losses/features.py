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

from kdjax.errors import UserError
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
  s, t = fi.floating(student), fi.floating(teacher)
  ex, pos = _pair_masks(where, s, t)
  s = fi.zero_masked(fi.zero_masked(s, ex), pos)
  t = fi.zero_masked(fi.zero_masked(t, ex), pos)
  return s, t, ex, pos


# =========================================================================== FitNet

REGRESSORS = ('auto', 'conv', 'linear')


def _conv_reg_layout(student_shape, teacher_shape) -> tuple[str, tuple[int, int]]:
  """``(kind, kernel_size)`` of the convolutional regressor for two ``[B, H, W, C]`` shapes.

  The rule of the reference ``ConvReg``, decided on the heights: a student twice the
  teacher's size -> 3x3 stride-2 convolution (padding 1); half -> 4x4 stride-2 transposed
  convolution (padding 1); otherwise not smaller -> a valid convolution with kernel
  ``(1 + H_s - H_t, 1 + W_s - W_t)`` (1x1 for equal sizes).
  """
  (_, hs, ws, _), (_, ht, wt, _) = student_shape, teacher_shape
  if hs == 2 * ht:
    kind, kernel = 'stride2', (3, 3)
  elif 2 * hs == ht:
    kind, kernel = 'transpose', (4, 4)
  elif hs >= ht and ws >= wt:
    kind, kernel = 'valid', (1 + hs - ht, 1 + ws - wt)
  else:
    raise UserError(f'fitnet: the conv regressor cannot map a student feature of spatial size '
                    f'{(hs, ws)} to a teacher feature of {(ht, wt)} (it handles a student of '
                    'twice, half, or at least the teacher\'s size); set regressor=\'linear\'')
  out = {'stride2': ((hs + 1) // 2, (ws + 1) // 2), 'transpose': (2 * hs, 2 * ws),
         'valid': (ht, wt)}[kind]
  if out != (ht, wt):
    raise UserError(f'fitnet: the conv regressor maps the student\'s spatial size {(hs, ws)} to '
                    f'{out}, not the teacher\'s {(ht, wt)}; set regressor=\'linear\'')
  return kind, kernel


def _regressor(regressor: str, student_shape, teacher_shape) -> str:
  if regressor not in REGRESSORS:
    raise UserError(f'fitnet: unknown regressor {regressor!r}; use one of {REGRESSORS}')
  if regressor == 'auto':
    return 'conv' if len(student_shape) == len(teacher_shape) == 4 else 'linear'
  if regressor == 'conv' and not len(student_shape) == len(teacher_shape) == 4:
    raise UserError(f'fitnet: the conv regressor needs [batch, height, width, channels] '
                    f'features; got {tuple(student_shape)} and {tuple(teacher_shape)}; set '
                    "regressor='linear'")
  return regressor


def fitnet_init(rng: jax.Array, student_shape: Sequence[int], teacher_shape: Sequence[int],
                *, regressor: str = 'auto', use_bias: bool = True) -> dict:
  """Params of FitNet's regressor from the student's to the teacher's feature.

  Args:
    rng: a PRNG key.
    student_shape: shape of the student feature, channels last.
    teacher_shape: shape of the teacher feature, channels last.
    regressor: ``'conv'``: the reference's convolutional regressor (a convolution
      chosen by the spatial sizes, then batch normalization, then ReLU; see
      :func:`fitnet`), for ``[B, H, W, C]`` features; ``'linear'``: a 1x1-conv /
      linear map on the channel axis (features of any rank, spatial sizes matched by
      pooling); ``'auto'``: ``'conv'`` for two ``[B, H, W, C]`` features, else
      ``'linear'``.
    use_bias: whether the convolution or linear map has a bias.

  Returns:
    ``'conv'``: ``{'conv': {'kernel': [kh, kw, C_s, C_t], 'bias'}, 'bn': {'scale',
    'bias'}}`` (PyTorch's default initialization); ``'linear'``: ``{'kernel': [C_s, C_t],
    'bias': [C_t]}``.

  >>> fitnet_init(jax.random.key(0), (8, 16, 16, 32), (8, 8, 8, 64))['conv']['kernel'].shape
  (3, 3, 32, 64)
  >>> fitnet_init(jax.random.key(0), (8, 32), (8, 8, 8, 64))['kernel'].shape
  (32, 64)
  """
  kind = _regressor(regressor, student_shape, teacher_shape)
  cs, ct = int(student_shape[-1]), int(teacher_shape[-1])
  if kind == 'linear':
    return projectors.linear_init(rng, cs, ct, use_bias=use_bias)
  layout, kernel = _conv_reg_layout(student_shape, teacher_shape)
  return {'conv': projectors.conv_init(rng, kernel, cs, ct, use_bias=use_bias,
                                       transpose=layout == 'transpose'),
          'bn': projectors.norm_init(ct)}


def fitnet_regress(params: dict, student_feature: jax.Array, teacher_shape: Sequence[int], *,
                   relu: bool = True, where: jax.Array | None = None) -> jax.Array:
  """The conv regressor's output ``[B, H_t, W_t, C_t]`` (params from ``fitnet_init``).

  ``where`` (``[B]`` or ``[B, H, W]``) masks entries out of the batch statistics.

  >>> p = fitnet_init(jax.random.key(0), (2, 8, 8, 4), (2, 4, 4, 6))
  >>> fitnet_regress(p, jnp.ones((2, 8, 8, 4)), (2, 4, 4, 6)).shape
  (2, 4, 4, 6)
  """
  s = fi.floating(student_feature)
  layout, _ = _conv_reg_layout(s.shape, teacher_shape)
  if layout == 'stride2':
    h = projectors.conv2d(params['conv'], s, stride=2, padding=1)
  elif layout == 'transpose':
    h = projectors.conv_transpose2d(params['conv'], s, stride=2, padding=1)
  else:
    h = projectors.conv2d(params['conv'], s)
  h = projectors.batch_norm(params['bn'], h, where=where)
  return jax.nn.relu(h) if relu else h


def fitnet(params: dict, student_feature: jax.Array, teacher_feature: jax.Array, *,
           relu: bool = True, where: jax.Array | None = None) -> jax.Array:
  r"""FitNet hint loss: mean squared error between the regressed student and the teacher.

  With :math:`r` the learned regressor,

  .. math::

    \ell_i = \frac{1}{|S| C_t} \sum_{p \in S} \sum_{c=1}^{C_t}
      \big(r(s)_{i,p,c} - t_{i,p,c}\big)^2 ,

  the mean over the teacher's positions :math:`S` and channels, so that the mean of
  :math:`\ell_i` over the batch is the reference's ``F.mse_loss(r(s), t)`` and its
  published weights carry over (100 in both reference repositories).

  The regressor is chosen by the params (:func:`fitnet_init`):

  * **conv** (the reference ``ConvReg``): a convolution from the student's to the
    teacher's spatial size (3x3 stride 2 for a student twice the teacher's size, a 4x4
    stride-2 transposed convolution for half, else a valid convolution of kernel
    :math:`(1 + H_s - H_t, 1 + W_s - W_t)`, i.e. 1x1 for equal sizes), then batch
    normalization in training mode (the statistics of the current, unmasked batch),
    then ReLU (``relu=False`` drops it, the reference's ``use_relu=False``). Because of
    the batch normalization an example's value depends on the rest of the batch.
  * **linear**: a linear map on the channel axis (a 1x1 convolution); features of
    different spatial sizes are first brought to the smaller size on each axis by
    adaptive average pooling (:func:`kdjax.losses.projectors.match_spatial`), which
    commutes with the map.

  The paper writes :math:`\tfrac12 \lVert u_h - r(v_g) \rVert^2`; the per-element
  mean is the reference code's.

  Two-stage training (the paper's: first the student up to the guided layer with the
  hint alone, then the whole student with KD) is a schedule of term weights, e.g.
  ``hint: dict(loss='fitnet', weight=dict(schedule='piecewise', boundaries=[N],
  values=[1.0, 0.0]))`` and ``kd: dict(weight=dict(schedule='piecewise',
  boundaries=[N], values=[0.0, 1.0]))``: in stage one the hint's gradient reaches only
  the layers up to the guided one and the regressor. (Layers above it still see
  weight decay and optimizer momentum if the optimizer has them; freezing them is the
  optimizer's business. The reference repositories train in one stage.)

  Args:
    params: from :func:`fitnet_init`.
    student_feature: ``[B, ..., C_s]``.
    teacher_feature: ``[B, ..., C_t]``; ``[B, H_t, W_t, C_t]`` for the conv regressor;
      for the linear one, the same rank (or ``[B, C_t]``, which global-average-pools
      the student).
    relu: the conv regressor's final ReLU.
    where: ``[B]`` example mask, or a ``[B, *S]`` position mask when both features
      have the same positions ``S``.

  Returns:
    ``[B]`` float32.

  References:
    Romero, Ballas, Kahou, Chassang, Gatta, Bengio. FitNets: Hints for Thin Deep
    Nets. ICLR 2015. arXiv:1412.6550. Reference code: megvii-research/mdistiller
    ``mdistiller/distillers/FitNet.py`` and ``_common.py`` (``ConvReg``);
    HobbitLong/RepDistiller ``distiller_zoo/FitNet.py``.

  >>> s, t = jnp.ones((2, 4, 4, 8)), jnp.ones((2, 4, 4, 6))
  >>> params = fitnet_init(jax.random.key(0), s.shape, t.shape)  # 1x1 conv + BN + ReLU
  >>> fitnet(params, s, t).round(4).tolist()  # a constant input is 0 after batch norm
  [1.0, 1.0]
  """
  s, t, ex, pos = _masked_pair(where, student_feature, teacher_feature)
  if 'conv' in params:
    if s.ndim != 4 or t.ndim != 4:
      raise UserError(f'fitnet: the conv regressor needs [batch, height, width, channels] '
                      f'features; got {s.shape} and {t.shape}')
    mask = ex if pos is None else jnp.logical_and(pos, fi.expand_to(ex, pos))
    r = fitnet_regress(params, s, t.shape, relu=relu, where=mask)
  else:
    s, t = projectors.match_spatial(s, t)
    r = projectors.linear_apply(params, s)
  err = jnp.mean(jnp.square(r - t), axis=-1)
  return jnp.where(ex, fi.position_mean(err, pos), 0.0)


@register('fitnet', family='feature', needs=_FEATURES,
          reference='Romero et al., FitNets: Hints for Thin Deep Nets, ICLR 2015, '
                    'arXiv:1412.6550')
def fitnet_term(student: str = 'stage1', teacher: str = 'stage1', regressor: str = 'auto',
                use_bias: bool = True, relu: bool = True) -> Term:
  """FitNet hint with a learned regressor (trained with the student); see :func:`fitnet`.

  Options: ``student``, ``teacher`` name entries of ``inputs['student_features']`` and
  ``inputs['teacher_features']``; ``regressor`` (``'auto'``: conv + batch norm + ReLU
  as the reference for ``[B, H, W, C]`` features, else linear; ``'conv'``;
  ``'linear'``); ``use_bias``; ``relu``. The value's batch mean is the reference's
  ``F.mse_loss``: its weight (``FEAT_WEIGHT`` 100 in mdistiller, ``-b 100`` in
  RepDistiller) carries over.
  """
  def init(rng, inputs):
    s = fi.feature(inputs, 'student', student, 'fitnet')
    t = fi.feature(inputs, 'teacher', teacher, 'fitnet')
    return fitnet_init(rng, s.shape, t.shape, regressor=regressor, use_bias=use_bias), {}

  def apply(params, state, inputs):
    s = fi.feature(inputs, 'student', student, 'fitnet')
    t = fi.feature(inputs, 'teacher', teacher, 'fitnet')
    where = inputs.get('where')
    value = fitnet(params, s, t, relu=relu, where=_term_where(where, s, t))
    return fi.per_example_output(value, where), state

  return Term(init, apply)


# =========================================================================== AT

def attention_map(feature: jax.Array, *, p: float = 2.0) -> jax.Array:
  r"""Spatial attention map :math:`\frac{1}{C}\sum_c |f_{\cdot,c}|^p`, ``[B, *S]`` (unnormalized).

  >>> attention_map(jnp.ones((2, 4, 4, 8))).shape
  (2, 4, 4)
  """
  f = fi.floating(feature)
  if f.ndim < 3:
    raise ValueError(f'attention transfer needs spatial or token features [B, ..., C]; '
                     f'got shape {f.shape}')
  return jnp.mean(jnp.abs(f) ** p, axis=-1)


AT_POOL = ('feature', 'map')
AT_REDUCTIONS = ('mean', 'sum')


def attention_transfer(student_feature: jax.Array, teacher_feature: jax.Array, *,
                       p: float = 2.0, pool: str = 'feature', reduction: str = 'mean',
                       where: jax.Array | None = None) -> jax.Array:
  r"""Activation-based attention transfer (AT).

  The attention map of a feature is :math:`Q = \frac1C \sum_c |f_c|^p` over the
  spatial positions (tokens for ``[B, T, D]``), flattened and L2-normalized per
  example, :math:`a = Q / \lVert Q \rVert_2`; with :math:`N` the number of map
  positions, the loss is

  .. math::

    \ell_i = \frac1N \lVert a^s_i - a^t_i \rVert_2^2
    \quad (\texttt{reduction='mean'}),
    \qquad
    \ell_i = \lVert a^s_i - a^t_i \rVert_2^2 \in [0, 4]
    \quad (\texttt{'sum'}).

  The default is the reference code's: its ``(at(f_s) - at(f_t)).pow(2).mean()`` is
  the mean of the ``'mean'`` value over the batch, so its weight (1000 in both
  reference repositories, the paper's :math:`\beta/2` with :math:`\beta = 1000`)
  carries over; ``'sum'`` is :math:`N` times larger. (The reference takes
  :math:`f^p`, equal to :math:`|f|^p` for the default even :math:`p`; the mean over
  channels instead of the sum does not matter after normalization.)

  If the two features have different spatial sizes, ``pool='feature'`` (the
  reference's) first adaptive-average-pools the larger *feature* to the smaller size
  on each axis (for square maps the reference's ``adaptive_avg_pool2d(f, (H, H))``);
  ``pool='map'`` pools the attention map instead. Masked positions are removed from
  both maps (:math:`N` counts the valid ones).

  Args:
    student_feature: ``[B, *S_s, C_s]``.
    teacher_feature: ``[B, *S_t, C_t]`` (channel counts may differ).
    p: the exponent of the map.
    pool: ``'feature'`` or ``'map'``: what is pooled when the sizes differ.
    reduction: ``'mean'`` or ``'sum'`` over the map positions.
    where: ``[B]`` example mask, or a ``[B, *S]`` position mask when both
      features have the same positions ``S``.

  Returns:
    ``[B]`` float32.

  References:
    Zagoruyko, Komodakis. Paying More Attention to Attention: Improving the
    Performance of Convolutional Neural Networks via Attention Transfer. ICLR 2017.
    arXiv:1612.03928. Reference code: megvii-research/mdistiller
    ``mdistiller/distillers/AT.py``; HobbitLong/RepDistiller ``distiller_zoo/AT.py``.

  >>> s = jnp.ones((2, 8, 8, 4)); t = jnp.ones((2, 4, 4, 16))
  >>> attention_transfer(s, t).round(4).tolist()
  [0.0, 0.0]
  """
  if pool not in AT_POOL:
    raise UserError(f'attention_transfer: pool must be one of {AT_POOL}; got {pool!r}')
  if reduction not in AT_REDUCTIONS:
    raise UserError(f'attention_transfer: reduction must be one of {AT_REDUCTIONS}; '
                    f'got {reduction!r}')
  s, t, ex, pos = _masked_pair(where, student_feature, teacher_feature)
  if s.ndim < 3 or t.ndim < 3:
    raise ValueError(f'attention transfer needs spatial or token features [B, ..., C]; '
                     f'got shapes {s.shape} and {t.shape}')
  # The normalized map does not depend on the scale of f: rescale for overflow safety.
  per_example = lambda x: tuple(range(1, x.ndim))
  s, t = fi.rescale(s, per_example(s))[0], fi.rescale(t, per_example(t))[0]
  if pool == 'feature':
    s, t = projectors.match_spatial(s, t)
    qs, qt = attention_map(s, p=p), attention_map(t, p=p)
  else:
    qs, qt = projectors.match_spatial(attention_map(s, p=p)[..., None],
                                      attention_map(t, p=p)[..., None])
    qs, qt = qs[..., 0], qt[..., 0]
  qs, qt = qs.reshape(qs.shape[0], -1), qt.reshape(qt.shape[0], -1)
  sq = fi.sq_norm(fi.l2_normalize(qs) - fi.l2_normalize(qt))
  if reduction == 'mean':
    n = qs.shape[1] if pos is None else jnp.sum(pos.reshape(pos.shape[0], -1), axis=1)
    sq = sq / jnp.maximum(n, 1)
  return jnp.where(ex, sq, 0.0)


def _stage_names(inputs, side: str, loss: str) -> tuple[str, ...]:
  feats = inputs.get(f'{side}_features') or {}
  stages = sorted((n for n in feats if n.startswith('stage') and n[5:].isdigit()),
                  key=lambda n: int(n[5:]))
  if not stages:
    raise UserError(f'{loss}: the {side} features have no stage1, stage2, ... entries; '
                    f'available: {", ".join(sorted(feats)) or "none"}. Name the features '
                    f'with {side}=')
  return tuple(stages)


@register('attention_transfer', family='feature', needs=_FEATURES,
          reference='Zagoruyko & Komodakis, Paying More Attention to Attention, ICLR 2017, '
                    'arXiv:1612.03928')
def attention_transfer_term(student: str | Sequence[str] | None = None,
                            teacher: str | Sequence[str] | None = None, p: float = 2.0,
                            pool: str = 'feature', reduction: str = 'mean') -> Term:
  """Attention transfer on feature pairs; the values sum over the pairs.

  Options: ``student``, ``teacher``: names or lists that pair up one to one; by
  default (``None``) every ``stage<i>`` feature the student and the teacher both
  have, paired by stage (the reference's sum over all stage outputs); ``p``,
  ``pool``, ``reduction`` as :func:`attention_transfer` (defaults: the reference's,
  whose weight 1000 carries over).
  """
  for name, value, allowed in (('pool', pool, AT_POOL), ('reduction', reduction, AT_REDUCTIONS)):
    if value not in allowed:
      raise UserError(f'attention_transfer: {name} must be one of {allowed}; got {value!r}')
  if (student is None) != (teacher is None):
    raise UserError('attention_transfer: give both student and teacher feature names, or '
                    'neither (every common stage)')

  fixed = None if student is None else fi.paired_names('attention_transfer', student, teacher)

  def pairs(inputs):
    if fixed is not None:
      return fixed
    s = _stage_names(inputs, 'student', 'attention_transfer')
    t = set(_stage_names(inputs, 'teacher', 'attention_transfer'))
    common = tuple((n, n) for n in s if n in t)
    if not common:
      raise UserError('attention_transfer: the student and the teacher have no stage in '
                      'common; name the pairs with student=[...] and teacher=[...]')
    return common

  def fn(inputs):
    where = inputs.get('where')
    total = 0.0
    for s_name, t_name in pairs(inputs):
      s = fi.feature(inputs, 'student', s_name, 'attention_transfer')
      t = fi.feature(inputs, 'teacher', t_name, 'attention_transfer')
      total = total + attention_transfer(s, t, p=p, pool=pool, reduction=reduction,
                                         where=_term_where(where, s, t))
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
