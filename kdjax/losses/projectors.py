"""Learned projectors and shape matching for feature losses.

Features are channels-last: ``[B, D]``, ``[B, L, C]``, ``[B, H, W, C]`` or
``[B, T, D]``. The simplest projector is a linear map on the channel axis (a 1x1
convolution for conv features), held as an explicit ``{'kernel', 'bias'}`` params
dict so that it trains with the student as part of the loss params. The larger
projectors of the reference implementations are built here from the same pure
parts: convolutions (:func:`conv2d`), batch normalization in training mode
(:func:`batch_norm`, statistics of the current batch only: a projector lives inside a
loss and is never evaluated), layer normalization, the depthwise-separable block of
OFA's CNN heads (:func:`sepconv_apply`), and a pre-norm transformer block with patch
merging for its ViT heads (:func:`transformer_block_apply`,
:func:`patch_merging_apply`). Every ``*_init`` draws its params as PyTorch would
for that layer in the reference code (the distribution, not the same numbers).

When a student and a teacher feature have different spatial sizes, the larger is
reduced to the smaller with *adaptive average pooling*, per spatial axis: output
cell ``i`` of an axis of length ``n`` pooled to ``m`` averages input cells
``floor(i n / m) .. ceil((i + 1) n / m) - 1`` (the bins of PyTorch's
``AdaptiveAvgPool``; for ``n`` a multiple of ``m`` this is plain average pooling
with stride ``n / m``). A ``[B, D]`` feature against a spatial one reduces the
spatial one by global average pooling.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np


def pool_matrix(in_size: int, out_size: int) -> np.ndarray:
  """The ``[out_size, in_size]`` matrix of adaptive average pooling along one axis.

  >>> pool_matrix(4, 2)
  array([[0.5, 0.5, 0. , 0. ],
         [0. , 0. , 0.5, 0.5]], dtype=float32)
  """
  if out_size > in_size or out_size < 1:
    raise ValueError(f'cannot pool an axis of size {in_size} to {out_size}')
  m = np.zeros((out_size, in_size), np.float32)
  for i in range(out_size):
    start = (i * in_size) // out_size
    end = -((-(i + 1) * in_size) // out_size)  # ceil
    m[i, start:end] = 1.0 / (end - start)
  return m


def adaptive_avg_pool(x: jax.Array, out_spatial: Sequence[int]) -> jax.Array:
  """Pools the spatial axes of channels-last ``x`` ``[B, *S, C]`` to ``out_spatial``.

  >>> adaptive_avg_pool(jnp.ones((2, 8, 6, 3)), (4, 3)).shape
  (2, 4, 3, 3)
  """
  spatial = x.shape[1:-1]
  if len(out_spatial) != len(spatial):
    raise ValueError(f'spatial rank mismatch: {spatial} vs {tuple(out_spatial)}')
  for axis, (n, m) in enumerate(zip(spatial, out_spatial), start=1):
    if n == m:
      continue
    p = jnp.asarray(pool_matrix(n, m), x.dtype)
    x = jnp.moveaxis(jnp.tensordot(x, p, axes=[[axis], [1]]), -1, axis)
  return x


def matched_spatial(student_shape: Sequence[int], teacher_shape: Sequence[int]) -> tuple[int, ...]:
  """The common spatial shape :func:`match_spatial` brings two feature shapes to.

  >>> matched_spatial((2, 8, 6, 16), (2, 4, 12, 32))
  (4, 6)
  """
  s, t = tuple(student_shape), tuple(teacher_shape)
  if s[0] != t[0]:
    raise ValueError(f'batch sizes differ: student {s}, teacher {t}')
  if len(s) < 2 or len(t) < 2:
    raise ValueError(f'features must be [batch, ..., channels]; got {s} and {t}')
  if len(s) == len(t):
    return tuple(min(a, b) for a, b in zip(s[1:-1], t[1:-1]))
  if len(s) == 2 or len(t) == 2:
    return ()
  raise ValueError(f'cannot match feature shapes {s} (student) and {t} (teacher): use '
                   'features of the same rank, or a [batch, dim] one')


def _pool_to(x: jax.Array, spatial: tuple[int, ...]) -> jax.Array:
  if x.ndim - 2 == len(spatial):
    return adaptive_avg_pool(x, spatial)
  return jnp.mean(x, axis=tuple(range(1, x.ndim - 1)))   # global average pooling


def match_spatial(student: jax.Array, teacher: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Brings two channels-last features to the same spatial shape.

  Each spatial axis is pooled to the smaller of the two sizes (adaptive average
  pooling, see the module docstring). A ``[B, D]`` feature against a spatial one
  global-average-pools the spatial one. Channel counts are left alone.

  >>> s, t = match_spatial(jnp.ones((2, 8, 8, 16)), jnp.ones((2, 4, 4, 32)))
  >>> s.shape, t.shape
  ((2, 4, 4, 16), (2, 4, 4, 32))
  """
  spatial = matched_spatial(student.shape, teacher.shape)
  return _pool_to(student, spatial), _pool_to(teacher, spatial)


def _floating(x) -> jax.Array:
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def linear_init(rng: jax.Array, in_dim: int, out_dim: int, *, use_bias: bool = True,
                dtype=jnp.float32) -> dict:
  """Params of a channel-axis linear projector: LeCun-normal kernel, zero bias.

  >>> p = linear_init(jax.random.key(0), 16, 32)
  >>> p['kernel'].shape, p['bias'].shape
  ((16, 32), (32,))
  """
  kernel = jax.nn.initializers.lecun_normal()(rng, (in_dim, out_dim), dtype)
  params = {'kernel': kernel}
  if use_bias:
    params['bias'] = jnp.zeros((out_dim,), dtype)
  return params


def linear_apply(params: dict, x: jax.Array, *,
                 precision: jax.lax.PrecisionLike = None) -> jax.Array:
  """Applies a channel-axis projector to ``x`` ``[..., in_dim] -> [..., out_dim]`` in float32.

  (float64 inputs and params stay float64.)

  Args:
    params: ``{'kernel': [in_dim, out_dim], 'bias': [out_dim]}`` (bias optional).
    x: ``[..., in_dim]``.
    precision: the matrix product's precision (``'highest'``: full float32, no TF32
      or bfloat16 passes); None: the ambient ``jax.default_matmul_precision``
      (``config.precision`` in a run).

  >>> linear_apply(linear_init(jax.random.key(0), 4, 3), jnp.ones((2, 5, 4))).shape
  (2, 5, 3)
  """
  x = _floating(x)
  kernel = _floating(params['kernel'])
  dtype = jnp.promote_types(x.dtype, kernel.dtype)
  y = jnp.tensordot(x.astype(dtype), kernel.astype(dtype), axes=[[-1], [0]],
                    precision=precision)
  if 'bias' in params:
    y = y + _floating(params['bias']).astype(dtype)
  return y


# =========================================================================== reference layers

def torch_linear_init(rng: jax.Array, in_dim: int, out_dim: int, *, use_bias: bool = True,
                      std: float | None = None) -> dict:
  """A linear layer initialized as PyTorch's ``nn.Linear``, or ``N(0, std^2)`` if ``std``.

  PyTorch's default draws kernel and bias from ``U(-1/sqrt(in_dim), 1/sqrt(in_dim))``;
  ``std`` gives the (truncated at two, i.e. untruncated in practice) normal that timm
  and OFA use for their heads, with a zero bias.

  >>> torch_linear_init(jax.random.key(0), 8, 3, std=0.02)['kernel'].shape
  (8, 3)
  """
  kk, kb = jax.random.split(rng)
  bound = 1.0 / np.sqrt(in_dim)
  if std is None:
    kernel = jax.random.uniform(kk, (in_dim, out_dim), jnp.float32, -bound, bound)
    bias = jax.random.uniform(kb, (out_dim,), jnp.float32, -bound, bound)
  else:
    kernel = std * jax.random.normal(kk, (in_dim, out_dim), jnp.float32)
    bias = jnp.zeros((out_dim,), jnp.float32)
  return {'kernel': kernel, 'bias': bias} if use_bias else {'kernel': kernel}


def conv_init(rng: jax.Array, kernel_size: Sequence[int], in_channels: int, out_channels: int,
              *, groups: int = 1, use_bias: bool = True, init: str = 'torch',
              transpose: bool = False) -> dict:
  """Params of a 2-D convolution: ``kernel [kh, kw, in/groups, out]`` (HWIO), ``bias``.

  ``init='torch'``: PyTorch's default (``U(-b, b)`` with ``b = 1/sqrt(fan_in)`` for kernel
  and bias; PyTorch computes the fan-in of a transposed convolution from its output
  channels); ``init='kaiming_out'``: ``N(0, 2 / fan_out)`` with ``fan_out = out * kh * kw``
  (``kaiming_normal_(mode='fan_out', nonlinearity='relu')``) and a zero bias.

  >>> conv_init(jax.random.key(0), (3, 3), 8, 8, groups=8)['kernel'].shape
  (3, 3, 1, 8)
  """
  kh, kw = (int(k) for k in kernel_size)
  shape = (kh, kw, in_channels // groups, out_channels)
  kk, kb = jax.random.split(rng)
  if init == 'torch':
    fan_in = (out_channels if transpose else in_channels // groups) * kh * kw
    bound = 1.0 / np.sqrt(fan_in)
    kernel = jax.random.uniform(kk, shape, jnp.float32, -bound, bound)
    bias = jax.random.uniform(kb, (out_channels,), jnp.float32, -bound, bound)
  elif init == 'kaiming_out':
    kernel = np.sqrt(2.0 / (out_channels * kh * kw)) * jax.random.normal(kk, shape, jnp.float32)
    bias = jnp.zeros((out_channels,), jnp.float32)
  else:
    raise ValueError(f'unknown init {init!r}')
  return {'kernel': kernel, 'bias': bias} if use_bias else {'kernel': kernel}


def conv2d(params: dict, x: jax.Array, *, stride: int = 1, padding: int = 0,
           groups: int = 1) -> jax.Array:
  """``[B, H, W, C_in] -> [B, H', W', C_out]``: a cross-correlation as ``nn.Conv2d``.

  Symmetric zero ``padding`` on both spatial axes; ``groups`` as PyTorch's (``groups ==
  C_in`` is a depthwise convolution).

  >>> p = conv_init(jax.random.key(0), (3, 3), 4, 6)
  >>> conv2d(p, jnp.ones((2, 8, 8, 4)), stride=2, padding=1).shape
  (2, 4, 4, 6)
  """
  x = _floating(x)
  kernel = _floating(params['kernel']).astype(x.dtype)
  y = jax.lax.conv_general_dilated(
      x, kernel, window_strides=(stride, stride), padding=[(padding, padding)] * 2,
      dimension_numbers=('NHWC', 'HWIO', 'NHWC'), feature_group_count=groups)
  if 'bias' in params:
    y = y + _floating(params['bias']).astype(y.dtype)
  return y


def conv_transpose2d(params: dict, x: jax.Array, *, stride: int = 2,
                     padding: int = 1) -> jax.Array:
  """``[B, H, W, C_in] -> [B, H_out, W_out, C_out]`` as ``nn.ConvTranspose2d``.

  ``H_out = (H - 1) stride - 2 padding + kh``. ``params['kernel']`` is ``[kh, kw, C_in,
  C_out]``: PyTorch's ``weight [C_in, C_out, kh, kw]`` with its axes moved, not flipped
  (the transposed convolution is the correlation of the ``stride``-dilated input,
  padded by ``k - 1 - padding``, with the spatially flipped kernel).

  >>> p = conv_init(jax.random.key(0), (4, 4), 4, 6, transpose=True)
  >>> conv_transpose2d(p, jnp.ones((2, 4, 4, 4))).shape
  (2, 8, 8, 6)
  """
  x = _floating(x)
  kernel = _floating(params['kernel']).astype(x.dtype)
  kh, kw = kernel.shape[:2]
  y = jax.lax.conv_general_dilated(
      x, kernel[::-1, ::-1], window_strides=(1, 1),
      padding=[(kh - 1 - padding,) * 2, (kw - 1 - padding,) * 2],
      lhs_dilation=(stride, stride), dimension_numbers=('NHWC', 'HWIO', 'NHWC'))
  if 'bias' in params:
    y = y + _floating(params['bias']).astype(y.dtype)
  return y


def norm_init(channels: int) -> dict:
  """Params of a batch or layer normalization: ``{'scale': ones, 'bias': zeros}``.

  >>> norm_init(3)['scale'].tolist()
  [1.0, 1.0, 1.0]
  """
  return {'scale': jnp.ones((channels,), jnp.float32), 'bias': jnp.zeros((channels,), jnp.float32)}


def _affine(params, y):
  return y * _floating(params['scale']).astype(y.dtype) + _floating(params['bias']).astype(y.dtype)


def batch_norm(params: dict, x: jax.Array, *, where: jax.Array | None = None,
               eps: float = 1e-5) -> jax.Array:
  r"""Batch normalization in training mode over every axis but the last (channels).

  :math:`y = \gamma (x - \mu) / \sqrt{\sigma^2 + \epsilon} + eta` with the mean and the
  biased variance of the current batch (PyTorch's ``BatchNorm`` in ``train()`` mode; no
  running statistics: a loss's projector is only ever used in training). ``where``
  (``[B]``, or ``[B, *S]`` for the positions of ``x [B, *S, C]``) leaves masked entries
  out of the statistics, so a padded example changes nothing for the others.

  >>> y = batch_norm(norm_init(1), jnp.array([[1.0], [3.0]]))
  >>> [round(v, 3) for v in y[:, 0].tolist()]
  [-1.0, 1.0]
  """
  x = _floating(x)
  axes = tuple(range(x.ndim - 1))
  if where is None:
    mean = jnp.mean(x, axis=axes)
    var = jnp.mean(jnp.square(x - mean), axis=axes)
  else:
    m = jnp.asarray(where).astype(bool)
    m = jnp.broadcast_to(m.reshape(m.shape + (1,) * (x.ndim - m.ndim)), x.shape[:-1] + (1,))
    n = jnp.maximum(jnp.sum(m.astype(x.dtype)), 1.0)
    mean = jnp.sum(jnp.where(m, x, 0.0), axis=axes) / n
    var = jnp.sum(jnp.where(m, jnp.square(x - mean), 0.0), axis=axes) / n
  return _affine(params, (x - mean) * jax.lax.rsqrt(var + eps))


def layer_norm(params: dict, x: jax.Array, *, eps: float = 1e-5) -> jax.Array:
  """Layer normalization over the last axis (``nn.LayerNorm``, biased variance).

  >>> layer_norm(norm_init(2), jnp.array([[1.0, 3.0]])).round(4).tolist()
  [[-1.0, 1.0]]
  """
  x = _floating(x)
  mean = jnp.mean(x, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(x - mean), axis=-1, keepdims=True)
  return _affine(params, (x - mean) * jax.lax.rsqrt(var + eps))


def sepconv_init(rng: jax.Array, in_channels: int, out_channels: int) -> dict:
  """Params of a depthwise-separable downsampling block (see :func:`sepconv_apply`).

  >>> p = sepconv_init(jax.random.key(0), 4, 8)
  >>> p['pw2']['kernel'].shape
  (1, 1, 4, 8)
  """
  k = jax.random.split(rng, 4)
  c = in_channels
  conv = lambda key, ks, i, o, g=1: conv_init(key, ks, i, o, groups=g, use_bias=False,
                                              init='kaiming_out')
  return {'dw1': conv(k[0], (3, 3), c, c, c), 'pw1': conv(k[1], (1, 1), c, c),
          'bn1': norm_init(c),
          'dw2': conv(k[2], (3, 3), c, c, c), 'pw2': conv(k[3], (1, 1), c, out_channels),
          'bn2': norm_init(out_channels)}


def sepconv_apply(params: dict, x: jax.Array, *, where: jax.Array | None = None) -> jax.Array:
  """``[B, H, W, C] -> [B, ceil(H/2), ceil(W/2), C_out]``: OFA's CNN-head block.

  Depthwise 3x3 stride 2 -> pointwise 1x1 -> batch norm -> ReLU -> depthwise 3x3 ->
  pointwise 1x1 to ``C_out`` -> batch norm -> ReLU (convolutions without bias, padding
  1); ``where`` ``[B]`` masks examples out of the batch statistics.

  >>> sepconv_apply(sepconv_init(jax.random.key(0), 4, 8), jnp.ones((2, 8, 8, 4))).shape
  (2, 4, 4, 8)
  """
  c = params['dw1']['kernel'].shape[-1]
  h = conv2d(params['dw1'], x, stride=2, padding=1, groups=c)
  h = conv2d(params['pw1'], h)
  h = jax.nn.relu(batch_norm(params['bn1'], h, where=where))
  h = conv2d(params['dw2'], h, padding=1, groups=c)
  h = conv2d(params['pw2'], h)
  return jax.nn.relu(batch_norm(params['bn2'], h, where=where))


def transformer_block_init(rng: jax.Array, dim: int, *, mlp_ratio: float = 4.0,
                           qkv_bias: bool = False) -> dict:
  """Params of a pre-norm transformer block (see :func:`transformer_block_apply`).

  >>> transformer_block_init(jax.random.key(0), 8)['qkv']['kernel'].shape
  (8, 24)
  """
  k = jax.random.split(rng, 4)
  hidden = int(dim * mlp_ratio)
  lin = lambda key, i, o, bias=True: torch_linear_init(key, i, o, use_bias=bias, std=0.02)
  return {'norm1': norm_init(dim), 'qkv': lin(k[0], dim, 3 * dim, qkv_bias),
          'proj': lin(k[1], dim, dim), 'norm2': norm_init(dim),
          'fc1': lin(k[2], dim, hidden), 'fc2': lin(k[3], hidden, dim)}


def transformer_block_apply(params: dict, x: jax.Array, *, num_heads: int) -> jax.Array:
  r"""``[B, T, D] -> [B, T, D]``: the ViT block of timm (OFA's ViT heads).

  :math:`h = x + \mathrm{Proj}(\mathrm{MHA}(\mathrm{LN}_1(x)))`,
  :math:`y = h + \mathrm{FC}_2(\mathrm{GELU}(\mathrm{FC}_1(\mathrm{LN}_2(h))))`: softmax
  attention with ``num_heads`` heads of width :math:`d = D / 	ext{heads}`, logits
  scaled by :math:`d^{-1/2}`; the fused ``qkv`` projection lays its output out as
  ``[3, heads, d]``; exact (erf) GELU; layer norms with :math:`\epsilon = 10^{-5}`.

  >>> p = transformer_block_init(jax.random.key(0), 8)
  >>> transformer_block_apply(p, jnp.ones((2, 5, 8)), num_heads=4).shape
  (2, 5, 8)
  """
  x = _floating(x)
  b, t, d = x.shape
  hd = d // num_heads
  qkv = linear_apply(params['qkv'], layer_norm(params['norm1'], x))
  qkv = qkv.reshape(b, t, 3, num_heads, hd)
  q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]             # [B, T, heads, d]
  logits = jnp.einsum('bqhd,bkhd->bhqk', q * hd ** -0.5, k)
  att = jnp.einsum('bhqk,bkhd->bqhd', jax.nn.softmax(logits, axis=-1), v).reshape(b, t, d)
  h = x + linear_apply(params['proj'], att)
  m = jax.nn.gelu(linear_apply(params['fc1'], layer_norm(params['norm2'], h)), approximate=False)
  return h + linear_apply(params['fc2'], m)


def patch_merging_init(rng: jax.Array, dim: int, out_dim: int) -> dict:
  """Params of a patch merging layer (see :func:`patch_merging_apply`).

  >>> patch_merging_init(jax.random.key(0), 4, 6)['reduction']['kernel'].shape
  (16, 6)
  """
  return {'norm': norm_init(4 * dim),
          'reduction': torch_linear_init(rng, 4 * dim, out_dim, use_bias=False, std=0.02)}


def patch_merging_apply(params: dict, x: jax.Array, grid: tuple[int, int], *,
                        gelu: bool = False) -> jax.Array:
  """``[B, H*W, C] -> [B, H*W/4, C_out]``: Swin's 2x2 patch merging.

  The four patches ``(2i, 2j), (2i+1, 2j), (2i, 2j+1), (2i+1, 2j+1)`` of each 2x2
  window are concatenated in that order (``4C`` channels), layer-normalized and
  mapped linearly (no bias) to ``C_out``, then an exact GELU if ``gelu``.

  >>> p = patch_merging_init(jax.random.key(0), 4, 6)
  >>> patch_merging_apply(p, jnp.ones((2, 16, 4)), (4, 4)).shape
  (2, 4, 6)
  """
  x = _floating(x)
  h, w = grid
  b, n, c = x.shape
  if n != h * w or h % 2 or w % 2:
    raise ValueError(f'patch merging needs an even grid of {h}x{w} = {n} patches; got {x.shape}')
  x = x.reshape(b, h, w, c)
  x = jnp.concatenate([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]],
                      axis=-1).reshape(b, -1, 4 * c)
  y = linear_apply(params['reduction'], layer_norm(params['norm'], x))
  return jax.nn.gelu(y, approximate=False) if gelu else y
