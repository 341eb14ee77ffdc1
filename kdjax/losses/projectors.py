"""Learned projectors and shape matching for feature losses.

Features are channels-last: ``[B, D]``, ``[B, L, C]``, ``[B, H, W, C]`` or
``[B, T, D]``. A projector is a linear map on the channel axis (a 1x1 convolution
for conv features), held as an explicit ``{'kernel', 'bias'}`` params dict so that
it trains with the student as part of the loss params.

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


def linear_apply(params: dict, x: jax.Array) -> jax.Array:
  """Applies a channel-axis projector to ``x`` ``[..., in_dim] -> [..., out_dim]`` in float32.

  >>> linear_apply(linear_init(jax.random.key(0), 4, 3), jnp.ones((2, 5, 4))).shape
  (2, 5, 3)
  """
  x = jnp.asarray(x, jnp.float32)
  y = jnp.tensordot(x, jnp.asarray(params['kernel'], jnp.float32), axes=[[-1], [0]])
  if 'bias' in params:
    y = y + jnp.asarray(params['bias'], jnp.float32)
  return y
