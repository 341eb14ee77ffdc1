"""Building blocks shared by the model zoo (private to :mod:`kdjax.models`).

Convolutions are ``nnx.Conv`` (channels last, kernels ``[*window, in, out]``)
with a choice of lowering:

* ``conv_impl='xla'``: ``jax.lax.conv_general_dilated`` (the default);
* ``conv_impl='patches'``: im2col by strided slices of the padded input,
  concatenated along channels, then one matrix product with the kernel reshaped
  to ``[prod(window) * in, out]``; its kernel gradient is a product with patches
  built channels-first (a custom VJP, the layout XLA:CPU's matmul is fast in).
  Same parameters, same outputs (up to float rounding). On a 2-core AMD EPYC
  (jax 0.10.2) it was within 5% of 'xla' for a resnet8x4 training step and ~20%
  slower for the MNIST-1D CNN, so 'xla' stays the default; under ``vmap`` over
  per-client kernels (federated clients) it is the fast one: XLA turns a vmapped
  convolution into a grouped convolution, the patches into a batched matmul.

Linear layers (``layers.linear``, the MLP's hidden layers) take ``dense_impl``:
``'auto'`` (default) computes the kernel gradient of a Linear applied to at most
:data:`SMALL_ROWS` rows as a sum of outer products (see
:func:`small_rows_dot_general`); ``'xla'`` is the plain ``nnx.Linear``.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

CONV_IMPLS = ('xla', 'patches')
DENSE_IMPLS = ('auto', 'xla')
# Up to this many input rows, a Linear's kernel gradient is a sum of outer products
# (dense_impl='auto'); see small_rows_dot_general.
SMALL_ROWS = 16
NORMS = (None, 'batch', 'layer')

# He-normal with fan-out, as the CIFAR ResNet/WRN zoos initialise convolutions.
he_fan_out = nnx.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def ntuple(v: int | Sequence[int] | None, n: int) -> tuple[int, ...]:
  """`v` repeated `n` times if an int (1 if None), else `tuple(v)`."""
  if v is None:
    return (1,) * n
  if isinstance(v, int):
    return (v,) * n
  return tuple(v)


def patches_conv_general_dilated(
    lhs: jax.Array,
    rhs: jax.Array,
    window_strides: Sequence[int],
    padding: str | Sequence[tuple[int, int]],
    lhs_dilation: Sequence[int] | None = None,
    rhs_dilation: Sequence[int] | None = None,
    dimension_numbers: Any = None,
    feature_group_count: int = 1,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
  """A drop-in for ``lax.conv_general_dilated`` (as ``nnx.Conv`` calls it) via im2col.

  Channels-last input ``[N, *spatial, C]``, kernel ``[*window, C / groups, O]``; any
  strides and kernel dilation, explicit or 'SAME'/'VALID' padding. im2col covers one
  feature group without input dilation (every conv of the zoo); grouped and
  input-dilated convolutions go to ``lax.conv_general_dilated`` itself.
  """
  nsp = lhs.ndim - 2
  if feature_group_count != 1 or any(d != 1 for d in ntuple(lhs_dilation, nsp)):
    spatial = 'DHW'[-nsp:]
    return jax.lax.conv_general_dilated(
        lhs, rhs, window_strides, padding, lhs_dilation=lhs_dilation,
        rhs_dilation=rhs_dilation,
        dimension_numbers=dimension_numbers or (f'N{spatial}C', f'{spatial}IO', f'N{spatial}C'),
        feature_group_count=feature_group_count, precision=precision,
        preferred_element_type=preferred_element_type, out_sharding=out_sharding)
  del dimension_numbers, out_sharding  # nnx.Conv always passes channels-last specs
  window = rhs.shape[:nsp]
  strides = ntuple(tuple(window_strides), nsp)
  rhs_dil = ntuple(rhs_dilation, nsp)
  if isinstance(padding, str):
    pads = jax.lax.padtype_to_pads(
        lhs.shape[1:-1],
        [(k - 1) * d + 1 for k, d in zip(window, rhs_dil)],
        strides,
        padding,
    )
  else:
    pads = list(padding)
  geometry = (tuple(window), tuple(strides), tuple(rhs_dil),
              tuple(tuple(int(v) for v in p) for p in pads))
  return _patches_conv(lhs, rhs, geometry, precision, preferred_element_type)


def _im2col(lhs, geometry, *, channels_first: bool = False):
  """Patches of ``lhs [N, *spatial, C]``: ``[N, *out, window*C]`` (offset-major
  channels), or with ``channels_first`` the same entries as ``[window*C, N * prod(out)]``."""
  window, strides, rhs_dil, pads = geometry
  if any(p != (0, 0) for p in pads):
    lhs = jnp.pad(lhs, [(0, 0), *pads, (0, 0)])
  if channels_first:
    lhs = jnp.moveaxis(lhs, -1, 0)   # [C, N, *spatial]
  spatial = lhs.shape[2:] if channels_first else lhs.shape[1:-1]
  out_sizes = [(n - ((k - 1) * d + 1)) // s + 1
               for n, k, d, s in zip(spatial, window, rhs_dil, strides)]
  slices = []
  for offset in _offsets(window):
    first = tuple(o * d for o, d in zip(offset, rhs_dil))
    last = tuple(st + (m - 1) * s + 1 for st, m, s in zip(first, out_sizes, strides))
    lead = (0, 0) if channels_first else (0,)
    limit_lead = lhs.shape[:2] if channels_first else lhs.shape[:1]
    tail = () if channels_first else (0,)
    limit_tail = () if channels_first else lhs.shape[-1:]
    slices.append(jax.lax.slice(lhs, (*lead, *first, *tail), (*limit_lead, *last, *limit_tail),
                                (*(1,) * len(lead), *strides, *(1,) * len(tail))))
  axis = 0 if channels_first else -1
  cols = slices[0] if len(slices) == 1 else jnp.concatenate(slices, axis=axis)
  return cols.reshape(cols.shape[0], -1) if channels_first else cols


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _patches_conv(lhs, rhs, geometry, precision, preferred_element_type):
  cols = _im2col(lhs, geometry)
  kmat = rhs.reshape(-1, rhs.shape[-1])  # [*window, C, O] -> [window*C, O]
  return jax.lax.dot_general(cols, kmat, (((cols.ndim - 1,), (0,)), ((), ())),
                             precision=precision,
                             preferred_element_type=preferred_element_type)


def _patches_conv_fwd(lhs, rhs, geometry, precision, preferred_element_type):
  return _patches_conv(lhs, rhs, geometry, precision, preferred_element_type), (lhs, rhs)


def _patches_conv_bwd(geometry, precision, preferred_element_type, res, g):
  # The kernel gradient contracts the patch rows. As cols^T @ g with cols^T built
  # directly (im2col of the channels-first input) the dot is in the layout XLA:CPU's
  # matmul wants; transposing cols instead folds into a dot over cols' major axis,
  # 1.3-1.4x (32-channel layers) to 4.5-5x (first layer) slower for the MNIST-1D CNN under vmap
  # of 25 clients (benchmarks/kernel_grad.py, one core).
  del preferred_element_type
  lhs, rhs = res
  kmat = rhs.reshape(-1, rhs.shape[-1])
  g2 = g.reshape(-1, g.shape[-1])
  cols_t = _im2col(lhs, geometry, channels_first=True)
  dk = jax.lax.dot_general(cols_t, g2.astype(cols_t.dtype), (((1,), (0,)), ((), ())),
                           precision=precision, preferred_element_type=jnp.float32)
  dcols = jax.lax.dot_general(g, kmat.astype(g.dtype), (((g.ndim - 1,), (1,)), ((), ())),
                              precision=precision)
  _, col_vjp = jax.vjp(lambda l: _im2col(l, geometry), lhs)
  (dlhs,) = col_vjp(dcols.astype(lhs.dtype))
  return dlhs, dk.reshape(rhs.shape).astype(rhs.dtype)


_patches_conv.defvjp(_patches_conv_fwd, _patches_conv_bwd)


def small_rows_dot_general(
    lhs: jax.Array,
    rhs: jax.Array,
    dimension_numbers: Any,
    precision: Any = None,
    preferred_element_type: Any = None,
    out_sharding: Any = None,
) -> jax.Array:
  """``lax.dot_general`` for ``nnx.Linear`` whose kernel gradient suits few rows.

  For ``x [..., in] @ kernel [in, out]`` with at most :data:`SMALL_ROWS` rows
  (the product of ``x``'s leading axes, as seen inside ``vmap``: one federated
  client's minibatch), the kernel gradient ``x^T g`` is computed as a sum of
  ``rows`` outer products, one elementwise loop, instead of a ``dot`` whose
  contraction is only ``rows`` deep: XLA:CPU (jax 0.10.2, 2-core AMD EPYC) runs
  that dot 3x (10 rows) to 5-9x (4 rows) slower than the loop
  (``benchmarks/kernel_grad.py``), and 25 vmapped
  clients turn it into a batched dot no faster per client. The forward value and
  the input gradient are the plain dots. Other shapes and options take
  ``lax.dot_general`` unchanged. A ``custom_vjp``: reverse mode only (no
  ``jax.jvp`` through it); ``dense_impl='xla'`` turns it off.

  >>> x, w = jnp.arange(6.0).reshape(3, 2), jnp.ones((2, 4))
  >>> dims = (((1,), (0,)), ((), ()))
  >>> g = jax.grad(lambda w: small_rows_dot_general(x, w, dims).sum())(w)
  >>> bool(jnp.allclose(g, x.T @ jnp.ones((3, 4))))
  True
  """
  (lc, rc), (lb, rb) = dimension_numbers
  rows = math.prod(lhs.shape[:-1])
  if (lb or rb or tuple(lc) != (lhs.ndim - 1,) or tuple(rc) != (0,) or rhs.ndim != 2
      or rows > SMALL_ROWS or preferred_element_type is not None or out_sharding is not None):
    return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                               preferred_element_type=preferred_element_type,
                               out_sharding=out_sharding)
  return _small_rows_linear(lhs, rhs, precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _small_rows_linear(x, w, precision):
  return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)


def _small_rows_linear_fwd(x, w, precision):
  return _small_rows_linear(x, w, precision), (x, w)


def _small_rows_linear_bwd(precision, res, g):
  x, w = res
  dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())), precision=precision)
  x2 = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  g2 = g.reshape(-1, g.shape[-1]).astype(jnp.float32)
  # Asks XLA to materialize them first: fused into the loop, their producers
  # (activations, the loss gradient) are recomputed for every kernel entry. XLA:CPU
  # (jax 0.10.2) drops barriers before fusion, so there a hidden layer's cheap relu is
  # still recomputed, and the MLP's head, whose gradient is the loss's whole
  # elementwise chain, keeps the plain dot (kdjax/models/mlp.py).
  x2, g2 = jax.lax.optimization_barrier((x2, g2))
  dw = x2[0, :, None] * g2[0, None, :]
  for r in range(1, x2.shape[0]):
    dw = dw + x2[r, :, None] * g2[r, None, :]
  return dx.astype(x.dtype), dw.astype(w.dtype)


_small_rows_linear.defvjp(_small_rows_linear_fwd, _small_rows_linear_bwd)


def linear(in_features: int, out_features: int, *, dense_impl: str = 'auto',
           **kwargs) -> nnx.Linear:
  """``nnx.Linear``; ``dense_impl='auto'`` uses :func:`small_rows_dot_general`."""
  if dense_impl not in DENSE_IMPLS:
    raise ValueError(f'dense_impl must be one of {DENSE_IMPLS}, got {dense_impl!r}.')
  dot = small_rows_dot_general if dense_impl == 'auto' else jax.lax.dot_general
  return nnx.Linear(in_features, out_features, dot_general=dot, **kwargs)


def _offsets(window: Sequence[int]) -> list[tuple[int, ...]]:
  offsets = [()]
  for k in window:
    offsets = [o + (i,) for o in offsets for i in range(k)]
  return offsets


def conv(
    in_features: int,
    out_features: int,
    kernel_size: int | Sequence[int],
    *,
    ndim: int,
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[tuple[int, int]] | None = None,
    use_bias: bool = False,
    conv_impl: str = 'xla',
    kernel_init: Any = he_fan_out,
    dtype: Any = None,
    param_dtype: Any = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Conv:
  """An ``nnx.Conv`` over ``ndim`` spatial axes.

  ``padding=None`` pads ``k // 2`` on both sides of each axis (PyTorch's
  ``padding=k//2``; equal to 'SAME' at stride 1).
  """
  if conv_impl not in CONV_IMPLS:
    raise ValueError(f'conv_impl must be one of {CONV_IMPLS}, got {conv_impl!r}.')
  window = ntuple(kernel_size, ndim)
  if padding is None:
    padding = [(k // 2, k // 2) for k in window]
  fn = (
      jax.lax.conv_general_dilated
      if conv_impl == 'xla'
      else patches_conv_general_dilated
  )
  return nnx.Conv(
      in_features,
      out_features,
      window,
      strides=ntuple(strides, ndim),
      padding=padding,
      use_bias=use_bias,
      kernel_init=kernel_init,
      dtype=dtype,
      param_dtype=param_dtype,
      conv_general_dilated=fn,
      rngs=rngs,
  )


def batch_norm(
    num_features: int, *, dtype: Any, param_dtype: Any, rngs: nnx.Rngs
) -> nnx.BatchNorm:
  """BatchNorm with PyTorch's defaults (momentum 0.1 -> flax momentum 0.9, eps 1e-5)."""
  return nnx.BatchNorm(
      num_features,
      momentum=0.9,
      epsilon=1e-5,
      dtype=dtype,
      param_dtype=param_dtype,
      rngs=rngs,
  )


def norm(
    kind: str | None,
    num_features: int,
    *,
    dtype: Any,
    param_dtype: Any,
    rngs: nnx.Rngs,
) -> nnx.Module | None:
  """``None``, ``'batch'`` (over batch and spatial axes) or ``'layer'`` (over channels)."""
  if kind not in NORMS:
    raise ValueError(f'norm must be one of {NORMS}, got {kind!r}.')
  if kind == 'batch':
    return batch_norm(num_features, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
  if kind == 'layer':
    return nnx.LayerNorm(
        num_features, epsilon=1e-5, dtype=dtype, param_dtype=param_dtype, rngs=rngs
    )
  return None


def global_avg_pool(x: jax.Array) -> jax.Array:
  """Mean over the spatial axes of ``[B, *spatial, C]``, accumulated in float32."""
  axes = tuple(range(1, x.ndim - 1))
  return jnp.mean(x, axis=axes, dtype=jnp.float32).astype(x.dtype)


def flat_size(shape: Sequence[int]) -> int:
  return int(math.prod(shape))
