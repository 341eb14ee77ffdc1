"""OFA-KD: one-for-all distillation between heterogeneous architectures.

Intermediate student features are mapped by learned heads (projectors) into the logit
space and distilled there with the teacher's logits, using the OFA loss with adaptive
target enhancement; the student's own logits get the same loss. Per-example values
``[batch]`` in float32.

The projectors are the reference's (Hao840/OFAKD ``distillers/ofa.py``): for a CNN
feature ``[B, H, W, C]`` a stack of depthwise-separable downsampling blocks (a 1x1
convolution for the last stage), global pooling and a linear layer; for a ViT feature
``[B, T, D]`` patch merging down to a 7x7 grid, transformer blocks, the class token
(or the token mean) and a linear layer; or, for any feature, pooling and a linear
layer alone (``'linear'``).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

import math

import numpy as np

from kdjax.errors import UserError
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
    arXiv:2310.19444. Reference code: Hao840/OFAKD ``distillers/ofa.py``
    (``ofa_loss``; its batch mean is the mean of these values).

  >>> z = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  >>> round(float(ofa_loss(z, z, jnp.array([0]))[0]), 4)  # soft-label CE = entropy
  1.0397
  """
  zs, zt = fi.floating(student_logits), fi.floating(teacher_logits)
  ex = fi.example_mask(where, zs.shape[0])
  zs, zt = fi.zero_masked(zs, ex), fi.zero_masked(zt, ex)
  log_ps = jax.nn.log_softmax(zs / temperature, axis=-1)
  pt = jax.nn.softmax(zt / temperature, axis=-1)
  target = jax.nn.one_hot(jnp.asarray(labels), zs.shape[-1], dtype=zs.dtype)  # -1 -> zeros
  weight = (pt + target) ** eps - target
  return jnp.where(ex, -jnp.sum(weight * log_ps, axis=-1), 0.0)


PROJECTORS = ('auto', 'cnn', 'vit', 'linear')


def ofa_head_init(rng: jax.Array, feature_shape: Sequence[int], num_classes: int) -> dict:
  """Params of the ``'linear'`` OFA head: global average pooling, then a linear map.

  The smallest head of the family, for any feature rank (e.g. ``[B, D]`` features of
  an MLP); :func:`ofa_projector_init` builds the reference's larger heads.

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
  f = fi.floating(feature)
  if f.ndim > 2:
    f = jnp.mean(f, axis=tuple(range(1, f.ndim - 1)))
  return projectors.linear_apply(params, f)


def _is_square(n: int) -> bool:
  return n > 0 and math.isqrt(n) ** 2 == n


def _kind(projector: str, feature_shape, num_tokens: int = 1) -> str:
  if projector not in PROJECTORS:
    raise UserError(f'ofa: projector must be one of {PROJECTORS}; got {projector!r}')
  rank = len(feature_shape)
  if projector == 'auto':
    if rank == 4:
      return 'cnn'
    if rank == 3 and _is_square(int(feature_shape[1]) - num_tokens):
      return 'vit'
    return 'linear'

  if (projector, rank) in (('cnn', 4), ('vit', 3)) or projector == 'linear':
    return projector
  want = '[batch, height, width, channels]' if projector == 'cnn' else '[batch, tokens, dim]'
  raise UserError(f"ofa: projector='{projector}' needs {want} features; got shape "
                  f"{tuple(feature_shape)}; use projector='linear' or 'auto'")


def ofa_projector_init(rng: jax.Array, feature_shape: Sequence[int], num_classes: int, *,
                       projector: str = 'auto', depth: int = 0, head_dim: int | None = None,
                       num_tokens: int = 1, final_grid: int = 7) -> dict:
  r"""Params of an OFA projector from a student feature to ``num_classes`` logits.

  ``projector='cnn'`` (``[B, H, W, C]`` features): ``depth`` depthwise-separable blocks
  (:func:`kdjax.losses.projectors.sepconv_apply`; each halves the spatial size; channels
  ``C -> 2C -> 4C -> ... -> head_dim``, the last block to ``head_dim``), or for
  ``depth = 0`` a 1x1 convolution (with bias) to ``head_dim``; then global average
  pooling and a linear layer. The reference uses ``depth = 4 - stage`` for stages 1-4
  and ``head_dim`` = the larger of the student's and the teacher's final feature widths.

  ``projector='vit'`` (``[B, T, D]`` features, ``num_tokens`` class tokens first): the
  patch tokens (a square grid of side :math:`g`) go through
  :math:`\max(\lfloor \log_2 (g / 7) 
floor, 0)` patch-merging layers (the first to
  width ``head_dim``, with GELU; the last without unless it is the first), the class
  tokens pass unchanged; then ``max(depth, 1)`` transformer blocks of width
  ``head_dim`` (4 heads), then the class token (or, without class tokens, the mean
  token) and a linear layer. The reference uses ``max(4 - stage, 1)`` blocks and
  ``head_dim`` = the student's final width.

  ``projector='linear'``: :func:`ofa_head_init`. ``'auto'``: ``'cnn'`` for rank-4
  features, ``'vit'`` for ``[B, T, D]`` features whose ``T - num_tokens`` patch tokens
  form a square grid, else ``'linear'``.

  Params are drawn as the reference initializes them (convolutions
  ``kaiming_normal_(fan_out)``, linear layers ``N(0, 0.02^2)`` with zero bias, norms
  ones and zeros).

  Args:
    rng: a PRNG key.
    feature_shape: the student feature's shape.
    num_classes: the number of logits.
    projector: ``'auto'``, ``'cnn'``, ``'vit'`` or ``'linear'``.
    depth: the number of downsampling or transformer blocks (see above).
    head_dim: the projector's width (default: the feature's).
    num_tokens: class tokens at the front of a ViT feature (0: none).
    final_grid: the patch grid side patch merging stops at.

  Returns:
    A params dict; its keys say the kind (``'sepconv'`` or ``'conv'``, ``'blocks'``, or
    ``'kernel'`` for the linear head).

  References:
    Hao et al. 2023, arXiv:2310.19444. Reference code: Hao840/OFAKD
    ``distillers/ofa.py`` and ``distillers/utils.py`` (``SepConv``, ``PatchMerging``,
    ``init_weights``); the transformer block is timm 0.6's ``Block``.

  >>> p = ofa_projector_init(jax.random.key(0), (2, 8, 8, 16), 10, depth=2, head_dim=64)
  >>> [b['pw2']['kernel'].shape[-1] for b in p['sepconv']], p['fc']['kernel'].shape
  ([32, 64], (64, 10))
  """
  kind = _kind(projector, feature_shape, num_tokens)
  if kind == 'linear':
    return ofa_head_init(rng, feature_shape, num_classes)
  width = int(feature_shape[-1])
  head_dim = width if head_dim is None else int(head_dim)
  k_body, k_fc = jax.random.split(rng)
  fc = projectors.torch_linear_init(k_fc, head_dim, num_classes, std=0.02)
  if kind == 'cnn':
    if depth == 0:
      return {'conv': projectors.conv_init(k_body, (1, 1), width, head_dim, init='kaiming_out'),
              'fc': fc}
    blocks, c = [], width
    for i, key in enumerate(jax.random.split(k_body, depth)):
      out = head_dim if i == depth - 1 else 2 * c
      blocks.append(projectors.sepconv_init(key, c, out))
      c *= 2
    return {'sepconv': blocks, 'fc': fc}
  if num_tokens not in (0, 1):
    raise UserError(f'ofa: a ViT projector reads one class token or the token mean; '
                    f'num_tokens={num_tokens}')
  grid = _grid(feature_shape, num_tokens)
  merges = max(int(math.log2(grid / final_grid)), 0) if grid else 0
  if merges and num_tokens and width != head_dim:
    raise UserError(f'ofa: the class tokens (width {width}) cannot join the merged patches '
                    f'(width {head_dim}); set head_dim={width}')
  k_merge, k_blocks = jax.random.split(k_body)
  merge = [projectors.patch_merging_init(key, width if i == 0 else head_dim, head_dim)
           for i, key in enumerate(jax.random.split(k_merge, merges))] if merges else []
  blocks = [projectors.transformer_block_init(key, head_dim)
            for key in jax.random.split(k_blocks, max(depth, 1))]
  return {'merge': merge, 'blocks': blocks, 'fc': fc}


def _grid(feature_shape, num_tokens: int) -> int:
  patches = int(feature_shape[1]) - num_tokens
  side = math.isqrt(max(patches, 0))
  if side * side != patches:
    raise UserError(f'ofa: a ViT projector needs a square grid of patch tokens; the feature '
                    f'{tuple(feature_shape)} has {patches} after {num_tokens} class token(s)')
  return side


def ofa_projector_apply(params: dict, feature: jax.Array, *, num_tokens: int = 1,
                        num_heads: int = 4, where: jax.Array | None = None) -> jax.Array:
  """``[B, ...] -> [B, classes]``: an OFA projector (params from :func:`ofa_projector_init`).

  ``where`` ``[B]`` leaves masked examples out of the batch-norm statistics of the CNN
  projector.

  >>> p = ofa_projector_init(jax.random.key(0), (2, 17, 8), 5, depth=1)
  >>> ofa_projector_apply(p, jnp.ones((2, 17, 8))).shape
  (2, 5)
  """
  if 'kernel' in params:
    return ofa_head_apply(params, feature)
  h = fi.floating(feature)
  if 'conv' in params or 'sepconv' in params:
    if 'conv' in params:
      h = projectors.conv2d(params['conv'], h)
    for block in params.get('sepconv', []):
      h = projectors.sepconv_apply(block, h, where=where)
    return projectors.linear_apply(params['fc'], jnp.mean(h, axis=(1, 2)))
  tokens, patches = h[:, :num_tokens], h[:, num_tokens:]
  side = _grid(h.shape, num_tokens)
  last = len(params['merge']) - 1
  for i, merge in enumerate(params['merge']):
    patches = projectors.patch_merging_apply(merge, patches, (side, side),
                                             gelu=i == 0 or i != last)
    side //= 2
  h = jnp.concatenate([tokens, patches], axis=1) if num_tokens else patches
  for block in params['blocks']:
    h = projectors.transformer_block_apply(block, h, num_heads=num_heads)
  pooled = h[:, 0] if num_tokens else jnp.mean(h, axis=1)
  return projectors.linear_apply(params['fc'], pooled)


def default_stages(feature_names) -> tuple[str, ...]:
  """The student features OFA distills by default: the model's stages 1-4.

  With at most four ``stage<i>`` features, all of them; with more (the blocks of a
  ViT), the reference's choice for a 12-block ViT, blocks 2, 4, 10 and 12, scaled to
  the depth: ``stage<ceil(L k / 12)>`` for ``k`` in 2, 4, 10, 12.

  >>> default_stages(['penultimate', 'stage2', 'stage1', 'stage3'])
  ('stage1', 'stage2', 'stage3')
  >>> default_stages([f'stage{i}' for i in range(1, 13)])
  ('stage2', 'stage4', 'stage10', 'stage12')
  """
  stages = sorted((n for n in feature_names if n.startswith('stage') and n[5:].isdigit()),
                  key=lambda n: int(n[5:]))
  if len(stages) <= 4:
    return tuple(stages)
  depth = len(stages)
  picks = sorted({-(-depth * k // 12) for k in (2, 4, 10, 12)})
  return tuple(stages[i - 1] for i in picks)


def _eps_list(eps, count: int) -> tuple[float, ...]:
  if isinstance(eps, (int, float)):
    return (float(eps),) * count
  eps = tuple(float(e) for e in eps)
  if len(eps) == 1:
    return eps * count
  if len(eps) != count:
    raise UserError(f'ofa: eps needs one value, or one per distilled feature and one for the '
                    f'logits ({count}); got {len(eps)}')
  return eps


@register('ofa', family='feature', needs=('student_features', 'teacher_logits', 'labels'),
          reference='Hao et al., One-for-All: Bridge the Gap Between Heterogeneous '
                    'Architectures in Knowledge Distillation, NeurIPS 2023, arXiv:2310.19444')
def ofa_term(student: str | Sequence[str] | None = None, eps: float | Sequence[float] = 1.0,
             temperature: float = 1.0, include_logits: bool = True, logits_weight: float = 1.0,
             projector: str = 'auto', depth: int | Sequence[int] | None = None,
             head_dim: int | None = None, num_tokens: int = 1) -> Term:
  r"""OFA: learned projectors map student features to logits, distilled with ``ofa_loss``.

  The value is :math:`\sum_k \ell(r_k(f_k)) + w \, \ell(z^s)`: the OFA loss of each
  projected feature plus, with ``include_logits`` (default, as the reference), ``w =
  logits_weight`` times that of the student's own logits. With the defaults this is
  the reference's ``ofa_loss_weight * loss_ofa + kd_loss_weight * loss_kd`` at both
  weights 1, so the term weight is the reference's ``ofa_loss_weight`` (for another
  ``kd_loss_weight``, set ``logits_weight`` to the ratio).

  Options: ``student`` (a name or a list, shallow to deep; default: the model's stages
  1-4, see :func:`default_stages`); ``eps`` (one value, or one per feature and one for
  the logits, as the reference's ``--ofa-eps``); ``temperature``; ``include_logits``;
  ``logits_weight``; ``projector`` (``'auto'``: the reference's projector by feature
  rank, ``'cnn'``, ``'vit'``, ``'linear'``: pooling and a linear layer); ``depth``
  (blocks per projector; default for the k-th of n features ``n - k`` for CNNs, i.e.
  ``4 - stage``, and ``max(n - k, 1)`` for ViTs); ``head_dim`` (CNN projectors: default
  the larger of the student's and, if the inputs carry it, the teacher's
  ``penultimate`` width, else the student's; ViT projectors: the student's
  ``penultimate`` width); ``num_tokens`` (class tokens of ViT features; kdjax's ViT
  has one). Projector params train with the student.
  """
  fixed = None if student is None else fi.names(student)

  def names(inputs):
    if fixed is not None:
      return fixed
    found = default_stages(inputs.get('student_features') or {})
    if not found:
      raise UserError('ofa: the student features have no stage1, stage2, ... entries; name '
                      'the features with student=')
    return found

  def depths(n):
    if depth is None:
      return tuple(n - k for k in range(1, n + 1))
    if isinstance(depth, int):
      return (depth,) * n
    if len(depth) != n:
      raise UserError(f'ofa: depth needs one value or one per feature ({n}); got {len(depth)}')
    return tuple(int(d) for d in depth)

  def width(inputs, side):
    feats = inputs.get(f'{side}_features') or {}
    pen = feats.get('penultimate')
    return None if pen is None else int(np.prod(jnp.shape(pen)[1:]))

  def init(rng, inputs):
    num_classes = int(jnp.shape(inputs['teacher_logits'])[-1])
    chosen = names(inputs)
    params = {}
    for i, (name, d) in enumerate(zip(chosen, depths(len(chosen)))):
      f = fi.feature(inputs, 'student', name, 'ofa')
      kind = _kind(projector, f.shape, num_tokens)
      dim = head_dim
      if dim is None and kind == 'cnn':
        widths = [w for w in (width(inputs, 'student'), width(inputs, 'teacher')) if w]
        dim = max(widths) if widths else None
      elif dim is None and kind == 'vit':
        dim = width(inputs, 'student')
      params[name] = ofa_projector_init(
          jax.random.fold_in(rng, i), f.shape, num_classes, projector=kind,
          depth=d if kind == 'cnn' else max(d, 1), head_dim=dim, num_tokens=num_tokens)
    return params, {}

  def apply(params, state, inputs):
    where = inputs.get('where')
    labels = inputs['labels']
    zt = inputs['teacher_logits']
    ex = fi.example_mask(where, zt.shape[0])
    chosen = names(inputs)
    eps_all = _eps_list(eps, len(chosen) + 1)
    total = 0.0
    for name, e in zip(chosen, eps_all):
      f = fi.zero_masked(fi.floating(fi.feature(inputs, 'student', name, 'ofa')), ex)
      zs = ofa_projector_apply(params[name], f, num_tokens=num_tokens, where=ex)
      total = total + ofa_loss(zs, zt, labels, eps=e, temperature=temperature, where=ex)
    if include_logits:
      total = total + logits_weight * ofa_loss(inputs['student_logits'], zt, labels,
                                               eps=eps_all[-1], temperature=temperature,
                                               where=ex)
    return fi.per_example_output(total, where), state

  return Term(init, apply)
