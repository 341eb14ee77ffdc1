"""A small Vision Transformer that also returns its attention maps."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import layers
from kdjax.models.base import ModelOutput
from kdjax.models.registry import register


class SelfAttention(nnx.Module):
  """Multi-head self-attention returning ``(output, probabilities)``.

  The probabilities ``softmax(q k^T / sqrt(d_head))`` are computed in float32
  and returned as ``[B, heads, T, T]`` (before attention dropout).
  """

  def __init__(
      self,
      dim: int,
      heads: int,
      *,
      dropout: float,
      dtype: Any,
      param_dtype: Any,
      rngs: nnx.Rngs,
  ):
    if dim % heads:
      raise ValueError(f'dim ({dim}) must be divisible by heads ({heads}).')
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.heads = heads
    self.qkv = nnx.Linear(dim, 3 * dim, **kw)
    self.proj = nnx.Linear(dim, dim, **kw)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    scores = jnp.einsum('bqhd,bkhd->bhqk', q, k, preferred_element_type=jnp.float32)
    probs = jax.nn.softmax(scores * (d // self.heads) ** -0.5, axis=-1)
    p = probs.astype(x.dtype)
    if self.dropout is not None:
      p = self.dropout(p)
    y = jnp.einsum('bhqk,bkhd->bqhd', p, v).reshape(b, t, d)
    return self.proj(y), probs


class EncoderBlock(nnx.Module):
  """Pre-LN transformer block: ``x + attn(ln(x))``, then ``x + mlp(ln(x))``."""

  def __init__(
      self,
      dim: int,
      heads: int,
      mlp_dim: int,
      *,
      dropout: float,
      dtype: Any,
      param_dtype: Any,
      rngs: nnx.Rngs,
  ):
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.ln1 = nnx.LayerNorm(dim, epsilon=1e-6, **kw)
    self.attn = SelfAttention(dim, heads, dropout=dropout, **kw)
    self.ln2 = nnx.LayerNorm(dim, epsilon=1e-6, **kw)
    self.fc1 = nnx.Linear(dim, mlp_dim, **kw)
    self.fc2 = nnx.Linear(mlp_dim, dim, **kw)
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None

  def _drop(self, x: jax.Array) -> jax.Array:
    return x if self.dropout is None else self.dropout(x)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    y, probs = self.attn(self.ln1(x))
    x = x + self._drop(y)
    y = self.fc2(self._drop(jax.nn.gelu(self.fc1(self.ln2(x)))))
    return x + self._drop(y), probs


class ViT(nnx.Module):
  """Vision Transformer with a class token (1-D or 2-D inputs, channels last).

  Non-overlapping patches of ``patch_size`` (per spatial axis) are embedded by
  a strided conv, a class token is prepended, learned position embeddings are
  added, ``depth`` pre-LN blocks follow, and the head reads the final
  LayerNorm of the class token.

  Features: ``'stage{i}'`` is block ``i``'s output tokens ``[B, 1 + P, dim]``
  (class token first); ``'penultimate'`` is the normalised class token
  ``[B, dim]``. ``ModelOutput.attentions`` holds one ``[B, heads, 1 + P, 1 + P]``
  float32 probability array per block.

  Args:
    input_shape: ``(L, C)`` or ``(H, W, C)``; spatial sizes must be multiples
      of ``patch_size``.
    num_classes: output size.
    patch_size: patch length / side (an int, or one per spatial axis).
    dim: token width.
    depth: number of blocks.
    heads: attention heads.
    mlp_ratio: hidden width of the MLP as a multiple of ``dim``.
    dropout: dropout rate (embeddings, attention probabilities, residual
      branches).
    dtype: computation dtype.
    param_dtype: parameter dtype.
    rngs: ``nnx.Rngs``.

  References:
    Dosovitskiy et al., "An Image is Worth 16x16 Words", ICLR 2021;
    Touvron et al., "Training data-efficient image transformers & distillation
    through attention", ICML 2021 (the "tiny" sizes: dim 192, 12 blocks, 3 heads).

  >>> from kdjax.models import create, functional
  >>> m = create('vit_tiny', num_classes=10, input_shape=(8, 8, 3), dim=16, depth=2, heads=2)
  >>> apply, params, state = functional(m)
  >>> out, _ = jax.jit(apply)(params, state, jnp.zeros((2, 8, 8, 3)))
  >>> out.features['stage2'].shape, len(out.attentions), out.attentions[0].shape
  ((2, 5, 16), 2, (2, 2, 5, 5))
  """

  def __init__(
      self,
      input_shape: Sequence[int],
      num_classes: int,
      *,
      patch_size: int | Sequence[int] = 4,
      dim: int = 192,
      depth: int = 12,
      heads: int = 3,
      mlp_ratio: float = 4.0,
      dropout: float = 0.0,
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    input_shape = tuple(input_shape)
    ndim = len(input_shape) - 1
    patch = layers.ntuple(patch_size, ndim)
    if ndim < 1 or any(n % p for n, p in zip(input_shape[:-1], patch)):
      raise ValueError(
          f'input_shape {input_shape} must be (*spatial, C) with spatial sizes '
          f'divisible by patch_size {patch}.'
      )
    num_patches = layers.flat_size(n // p for n, p in zip(input_shape[:-1], patch))
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.embed = layers.conv(
        input_shape[-1],
        dim,
        patch,
        ndim=ndim,
        strides=patch,
        padding='VALID',
        use_bias=True,
        kernel_init=nnx.initializers.lecun_normal(),
        **kw,
    )
    init = nnx.initializers.normal(0.02)
    self.cls = nnx.Param(init(rngs.params(), (1, 1, dim), param_dtype))
    self.pos = nnx.Param(init(rngs.params(), (1, 1 + num_patches, dim), param_dtype))
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.blocks = nnx.List(
        [
            EncoderBlock(dim, heads, int(dim * mlp_ratio), dropout=dropout, **kw)
            for _ in range(depth)
        ]
    )
    self.norm = nnx.LayerNorm(dim, epsilon=1e-6, **kw)
    self.head = nnx.Linear(dim, num_classes, **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> ModelOutput:
    h = self.embed(x.astype(self.dtype))
    b, d = h.shape[0], h.shape[-1]
    h = h.reshape(b, -1, d)
    cls = jnp.broadcast_to(self.cls[...].astype(h.dtype), (b, 1, d))
    h = jnp.concatenate([cls, h], axis=1) + self.pos[...].astype(h.dtype)
    if self.dropout is not None:
      h = self.dropout(h)
    features, attentions = {}, []
    for i, block in enumerate(self.blocks):
      h, probs = block(h)
      features[f'stage{i + 1}'] = h
      attentions.append(probs)
    pen = self.norm(h[:, 0])
    features['penultimate'] = pen
    return ModelOutput(self.head(pen), features, tuple(attentions))


@register('vit_tiny')
def _vit_tiny(*, num_classes, input_shape, rngs, dtype, **kwargs) -> ViT:
  """ViT with DeiT-Ti sizes by default (dim 192, depth 12, 3 heads), patch 4."""
  return ViT(input_shape, num_classes, rngs=rngs, dtype=dtype, **kwargs)
