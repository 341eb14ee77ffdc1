"""CIFAR ResNets with basic blocks, as in the CRD / mdistiller model zoo.

Architecture (He et al. 2016, section 4.2, with the zoo's widths): a 3x3 stem
conv (no bias) + BN + ReLU, then three stages of ``n = (depth - 2) / 6`` basic
blocks; the first block of stages 2 and 3 has stride 2. A basic block is
``relu(bn(conv3x3(relu(bn(conv3x3(x))))) + shortcut(x))`` where the shortcut is
the identity, or a 1x1 conv (stride of the block, no bias) + BN whenever the
stride or the channel count changes. Global average pooling and a linear head
follow. Widths ``(stem, stage1, stage2, stage3)``:

* ``resnet{8,14,20,32,44,56,110}``: ``(16, 16, 32, 64)``;
* ``resnet8x4``, ``resnet32x4``: ``(32, 64, 128, 256)``.

With 100 classes this gives 1,233,540 parameters for resnet8x4 and 7,433,860
for resnet32x4 (BN scale and bias included, running statistics not), the
figures the CRD paper's tables round to 1.23M and 7.43M.
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


class BasicBlock(nnx.Module):
  """Post-activation basic block: two 3x3 convs with BN, plus a shortcut."""

  def __init__(
      self,
      in_features: int,
      out_features: int,
      stride: int,
      *,
      conv_impl: str,
      dtype: Any,
      param_dtype: Any,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    ckw = dict(ndim=2, conv_impl=conv_impl, **kw)
    self.conv1 = layers.conv(in_features, out_features, 3, strides=stride, **ckw)
    self.bn1 = layers.batch_norm(out_features, **kw)
    self.conv2 = layers.conv(out_features, out_features, 3, **ckw)
    self.bn2 = layers.batch_norm(out_features, **kw)
    if stride != 1 or in_features != out_features:
      self.shortcut_conv = layers.conv(
          in_features, out_features, 1, strides=stride, **ckw
      )
      self.shortcut_bn = layers.batch_norm(out_features, **kw)
    else:
      self.shortcut_conv = None
      self.shortcut_bn = None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jax.nn.relu(self.bn1(self.conv1(x)))
    y = self.bn2(self.conv2(y))
    if self.shortcut_conv is not None:
      x = self.shortcut_bn(self.shortcut_conv(x))
    return jax.nn.relu(y + x)


class ResNetCifar(nnx.Module):
  """The CIFAR ResNet (basic blocks, 3 stages).

  Features: ``'stage1'..'stage3'`` are the stage outputs (after the last
  block's ReLU; ``[B, 32, 32, w1]``, ``[B, 16, 16, w2]``, ``[B, 8, 8, w3]`` on
  CIFAR); ``'penultimate'`` is the globally pooled ``[B, w3]``.

  Args:
    input_shape: ``(H, W, C)``.
    num_classes: output size.
    depth: ``6n + 2``.
    widths: ``(stem, stage1, stage2, stage3)`` channels.
    conv_impl: ``'xla'`` or ``'patches'`` (see :mod:`kdjax.models.layers`).
    dtype: computation dtype.
    param_dtype: parameter dtype.
    rngs: ``nnx.Rngs``.

  References:
    He et al., "Deep Residual Learning for Image Recognition", CVPR 2016;
    Tian et al., "Contrastive Representation Distillation", ICLR 2020.

  >>> from kdjax.models import create, functional
  >>> m = create('resnet8', num_classes=10, input_shape=(8, 8, 3), widths=(4, 4, 8, 8))
  >>> apply, params, state = functional(m)
  >>> out, _ = jax.jit(apply)(params, state, jnp.zeros((2, 8, 8, 3)))
  >>> [out.features[f'stage{i}'].shape for i in (1, 2, 3)]
  [(2, 8, 8, 4), (2, 4, 4, 8), (2, 2, 2, 8)]
  """

  def __init__(
      self,
      input_shape: Sequence[int],
      num_classes: int,
      *,
      depth: int,
      widths: Sequence[int] = (16, 16, 32, 64),
      conv_impl: str = 'xla',
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if (depth - 2) % 6 or depth < 8:
      raise ValueError(f'depth must be 6n + 2 with n >= 1, got {depth}.')
    if len(widths) != 4:
      raise ValueError(f'widths must be (stem, stage1, stage2, stage3), got {widths}.')
    n = (depth - 2) // 6
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.stem_conv = layers.conv(
        input_shape[-1], widths[0], 3, ndim=2, conv_impl=conv_impl, **kw
    )
    self.stem_bn = layers.batch_norm(widths[0], **kw)
    stages = []
    c_in = widths[0]
    for s, c_out in enumerate(widths[1:]):
      blocks = []
      for b in range(n):
        stride = 2 if (s > 0 and b == 0) else 1
        blocks.append(BasicBlock(c_in, c_out, stride, conv_impl=conv_impl, **kw))
        c_in = c_out
      stages.append(nnx.List(blocks))
    self.stages = nnx.List(stages)
    self.head = nnx.Linear(c_in, num_classes, **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> ModelOutput:
    h = jax.nn.relu(self.stem_bn(self.stem_conv(x.astype(self.dtype))))
    features = {}
    for i, stage in enumerate(self.stages):
      for block in stage:
        h = block(h)
      features[f'stage{i + 1}'] = h
    pen = layers.global_avg_pool(h)
    features['penultimate'] = pen
    return ModelOutput(self.head(pen), features)


_SMALL = (16, 16, 32, 64)
_X4 = (32, 64, 128, 256)
_CONFIGS = {
    'resnet8': (8, _SMALL),
    'resnet14': (14, _SMALL),
    'resnet20': (20, _SMALL),
    'resnet32': (32, _SMALL),
    'resnet44': (44, _SMALL),
    'resnet56': (56, _SMALL),
    'resnet110': (110, _SMALL),
    'resnet8x4': (8, _X4),
    'resnet32x4': (32, _X4),
}


def _builder(depth: int, widths: tuple[int, ...]):
  def build(*, num_classes, input_shape, rngs, dtype, **kwargs) -> ResNetCifar:
    kwargs = {'depth': depth, 'widths': widths, **kwargs}
    return ResNetCifar(input_shape, num_classes, rngs=rngs, dtype=dtype, **kwargs)

  return build


for _name, (_depth, _widths) in _CONFIGS.items():
  register(_name, _builder(_depth, _widths))
