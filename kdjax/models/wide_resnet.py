"""Wide ResNets (WRN-depth-width) for CIFAR, as in the CRD / mdistiller model zoo.

Architecture (Zagoruyko & Komodakis 2016): a 3x3 stem conv to 16 channels (no
BN after it), three stages of ``n = (depth - 4) / 6`` pre-activation blocks of
widths ``16k, 32k, 64k`` (stride 2 at the start of stages 2 and 3), then
BN + ReLU, global average pooling and a linear head. A block computes
``a = relu(bn1(x))``, ``y = conv3x3(dropout(relu(bn2(conv3x3(a, stride)))))``
and returns ``y + x`` when the channel count is unchanged, else
``y + conv1x1(a, stride)`` (the shortcut conv sees the pre-activated input and
has no BN). Convolutions have no bias.

With 100 classes: wrn_40_2 has 2,255,156 parameters (the zoo's 2.26M),
wrn_16_2 703,284, wrn_40_1 569,780, wrn_16_1 180,916.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import layers
from kdjax.models.base import ModelOutput
from kdjax.models.registry import register


class WideBlock(nnx.Module):
  """Pre-activation wide basic block (BN-ReLU-conv, BN-ReLU-dropout-conv)."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      stride: int,
      *,
      dropout: float,
      conv_impl: str,
      dtype: Any,
      param_dtype: Any,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ckw = dict(ndim=2, conv_impl=conv_impl, **kw)
    self.bn1 = layers.batch_norm(in_features, **kw)
    self.conv1 = layers.conv(in_features, out_features, 3, strides=stride, **ckw)
    self.bn2 = layers.batch_norm(out_features, **kw)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.conv2 = layers.conv(out_features, out_features, 3, **ckw)
    if in_features != out_features:
      self.shortcut_conv = layers.conv(
          in_features, out_features, 1, strides=stride, **ckw
      )
    else:
      if stride != 1:
        raise ValueError('A stride-2 block must change the channel count.')
      self.shortcut_conv = None

  def __call__(self, x: jax.Array) -> jax.Array:
    a = jax.nn.relu(self.bn1(x))
    y = jax.nn.relu(self.bn2(self.conv1(a)))
    if self.dropout is not None:
      y = self.dropout(y)
    y = self.conv2(y)
    shortcut = x if self.shortcut_conv is None else self.shortcut_conv(a)
    return y + shortcut


class WideResNet(nnx.Module):
  """WRN-depth-width.

  Features: ``'stage1'..'stage3'`` are the stage outputs (the residual stream
  before the next BN: ``[B, 32, 32, 16k]``, ``[B, 16, 16, 32k]``,
  ``[B, 8, 8, 64k]`` on CIFAR); ``'penultimate'`` is the pooled
  ``relu(bn(stage3))``, ``[B, 64k]``.

  Args:
    input_shape: ``(H, W, C)``.
    num_classes: output size.
    depth: ``6n + 4``.
    width: the widening factor ``k``.
    dropout: dropout rate inside each block.
    conv_impl: ``'xla'`` or ``'patches'`` (see :mod:`kdjax.models.layers`).
    dtype: computation dtype.
    param_dtype: parameter dtype.
    rngs: ``nnx.Rngs``.

  References:
    Zagoruyko & Komodakis, "Wide Residual Networks", BMVC 2016.

  >>> from kdjax.models import create, functional
  >>> apply, params, state = functional(create('wrn_16_2', num_classes=10, input_shape=(32, 32, 3)))
  >>> out, _ = jax.eval_shape(apply, params, state, jnp.zeros((2, 32, 32, 3)))
  >>> out.features['stage3'].shape, out.features['penultimate'].shape
  ((2, 8, 8, 128), (2, 128))
  """

  def __init__(
      self,
      input_shape: Sequence[int],
      num_classes: int,
      *,
      depth: int,
      width: int,
      dropout: float = 0.0,
      conv_impl: str = 'xla',
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if (depth - 4) % 6 or depth < 10:
      raise ValueError(f'depth must be 6n + 4 with n >= 1, got {depth}.')
    n = (depth - 4) // 6
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stem_conv = layers.conv(
        input_shape[-1], 16, 3, ndim=2, conv_impl=conv_impl, **kw
    )
    stages = []
    c_in = 16
    for s, c_out in enumerate((16 * width, 32 * width, 64 * width)):
      blocks = []
      for b in range(n):
        stride = 2 if (s > 0 and b == 0) else 1
        blocks.append(
            WideBlock(
                c_in, c_out, stride, dropout=dropout, conv_impl=conv_impl, **kw
            )
        )
        c_in = c_out
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.final_bn = layers.batch_norm(c_in, **kw)
    self.head = nnx.Linear(
        c_in, num_classes, bias_init=nnx.initializers.zeros_init(), **kw
    )
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> ModelOutput:
    h = self.stem_conv(x.astype(self.dtype))
    features = {}
    for i, stage in enumerate(self.stages):
      for block in stage:
        h = block(h)
      features[f'stage{i + 1}'] = h
    pen = layers.global_avg_pool(jax.nn.relu(self.final_bn(h)))
    features['penultimate'] = pen
    return ModelOutput(self.head(pen), features)


def _builder(depth: int, width: int):
  def build(*, num_classes, input_shape, rngs, dtype, **kwargs) -> WideResNet:
    kwargs = {'depth': depth, 'width': width, **kwargs}
    return WideResNet(input_shape, num_classes, rngs=rngs, dtype=dtype, **kwargs)

  return build


for _depth, _width in ((16, 1), (16, 2), (40, 1), (40, 2)):
  register(f'wrn_{_depth}_{_width}', _builder(_depth, _width))
