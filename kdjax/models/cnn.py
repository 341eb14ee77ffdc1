"""Plain convolutional classifiers over 1-D signals or 2-D images (channels last)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import layers
from kdjax.models.base import ModelOutput
from kdjax.models.registry import register

POOLS = ('flatten', 'mean')


class CNN(nnx.Module):
  """[Conv -> norm -> ReLU] per stage -> flatten (or mean-pool) -> dropout -> Linear.

  The number of spatial axes is ``len(input_shape) - 1``: ``(40, 1)`` gives a
  1-D CNN, ``(8, 8, 1)`` a 2-D one. Each conv pads ``kernel_size // 2`` on both
  sides (unless ``padding`` is given), so with an odd kernel a stride-``s`` stage
  maps length ``n`` to ``ceil(n / s)`` (40 -> 20 -> 10 -> 5 for the MNIST-1D
  default). In general a stage maps ``n`` to ``(n + 2 p - k) // s + 1``.

  Features: ``'stage{i}'`` is the ``i``-th conv block's output
  ``[B, *spatial_i, channels[i-1]]``; ``'penultimate'`` is the flattened (or
  pooled) last stage, the input of the head.

  Args:
    input_shape: one example's shape, channels last.
    num_classes: output size.
    channels: output channels of each conv stage.
    kernel_size: conv window (an int, or one per spatial axis).
    strides: an int for every stage, or one entry per stage.
    kernel_sizes: ``None`` (every stage uses ``kernel_size``) or one window per
      stage (each an int or one per spatial axis); it replaces ``kernel_size``.
      The MNIST-1D paper's CNN has ``(5, 3, 3)``.
    padding: ``None`` (each conv pads ``k // 2`` on both sides of each axis) or
      an int: every conv pads that many on both sides of each axis (the MNIST-1D
      paper's CNN pads 1, PyTorch's ``padding=1``).
    norm: ``None``, ``'batch'`` or ``'layer'`` after each conv.
    pool: ``'flatten'`` (keeps positions: the MNIST-1D paper's CNN) or
      ``'mean'`` (global average pooling).
    dropout: dropout rate before the head.
    conv_impl: ``'xla'`` or ``'patches'`` (see :mod:`kdjax.models.layers`).
    dtype: computation dtype.
    param_dtype: parameter dtype.
    rngs: ``nnx.Rngs``.

  References:
    Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024
    (arXiv:2011.14439).

  >>> from kdjax.models import create, functional
  >>> apply, params, state = functional(create('cnn1d', num_classes=10, input_shape=(40, 1)))
  >>> out, _ = jax.jit(apply)(params, state, jnp.zeros((2, 40, 1)))
  >>> out.features['stage3'].shape, out.features['penultimate'].shape
  ((2, 5, 32), (2, 160))
  """

  def __init__(
      self,
      input_shape: Sequence[int],
      num_classes: int,
      *,
      channels: Sequence[int],
      kernel_size: int | Sequence[int],
      strides: int | Sequence[int],
      kernel_sizes: Sequence[int | Sequence[int]] | None = None,
      padding: int | None = None,
      norm: str | None = None,
      pool: str = 'flatten',
      dropout: float = 0.0,
      conv_impl: str = 'xla',
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if pool not in POOLS:
      raise ValueError(f'pool must be one of {POOLS}, got {pool!r}.')
    input_shape = tuple(input_shape)
    ndim = len(input_shape) - 1
    if ndim < 1:
      raise ValueError(
          f'CNN needs input_shape (*spatial, channels), got {input_shape}.'
      )
    n = len(channels)
    strides = (strides,) * n if isinstance(strides, int) else tuple(strides)
    if len(strides) != n:
      raise ValueError(f'strides {strides} must have one entry per stage ({n}).')
    if kernel_sizes is None:
      kernel_sizes = (kernel_size,) * n
    if len(kernel_sizes) != n:
      raise ValueError(
          f'kernel_sizes {tuple(kernel_sizes)} must have one entry per stage ({n}).')
    if padding is not None and padding < 0:
      raise ValueError(f'padding must be None or an int >= 0, got {padding!r}.')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    convs, norms = [], []
    spatial, c_in = list(input_shape[:-1]), input_shape[-1]
    for c_out, s, k_size in zip(channels, strides, kernel_sizes):
      window = layers.ntuple(k_size, ndim)
      pads = [(k // 2 if padding is None else padding,) * 2 for k in window]
      convs.append(
          layers.conv(
              c_in,
              c_out,
              window,
              ndim=ndim,
              strides=s,
              padding=pads,
              use_bias=norm != 'batch',
              conv_impl=conv_impl,
              kernel_init=nnx.initializers.lecun_normal(),
              **kw,
          )
      )
      norms.append(layers.norm(norm, c_out, **kw))
      spatial = [(m + p + q - k) // s + 1
                 for m, k, (p, q) in zip(spatial, window, pads)]
      c_in = c_out
    self.convs = nnx.List(convs)
    self.norms = nnx.List(norms)
    self.pool = pool
    d = c_in * (layers.flat_size(spatial) if pool == 'flatten' else 1)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.head = nnx.Linear(d, num_classes, **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> ModelOutput:
    h = x.astype(self.dtype)
    features = {}
    for i, (cv, nrm) in enumerate(zip(self.convs, self.norms)):
      h = cv(h)
      if nrm is not None:
        h = nrm(h)
      h = jax.nn.relu(h)
      features[f'stage{i + 1}'] = h
    if self.pool == 'flatten':
      pen = jnp.reshape(h, (h.shape[0], -1))
    else:
      pen = layers.global_avg_pool(h)
    features['penultimate'] = pen
    if self.dropout is not None:
      pen = self.dropout(pen)
    return ModelOutput(self.head(pen), features)


@register('cnn1d')
def _cnn1d(*, num_classes, input_shape, rngs, dtype, **kwargs) -> CNN:
  """MNIST-1D CNN: 3 stride-2 convs of 32 channels, kernel 5, flatten, linear."""
  kwargs = {'channels': (32, 32, 32), 'kernel_size': 5, 'strides': 2, **kwargs}
  return CNN(input_shape, num_classes, rngs=rngs, dtype=dtype, **kwargs)


@register('cnn2d')
def _cnn2d(*, num_classes, input_shape, rngs, dtype, **kwargs) -> CNN:
  """Small image CNN: convs of 32 and 64 channels, 3x3, stride 2, flatten, linear."""
  kwargs = {'channels': (32, 64), 'kernel_size': 3, 'strides': 2, **kwargs}
  return CNN(input_shape, num_classes, rngs=rngs, dtype=dtype, **kwargs)
