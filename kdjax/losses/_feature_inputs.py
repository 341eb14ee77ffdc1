"""Private helpers shared by the feature and relation losses.

Masks, numerically safe norms, and the lookup of named features in a registry
``inputs`` mapping. Nothing here is public API.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp

def f32(x) -> jax.Array:
  return jnp.asarray(x, jnp.float32)


def floating(x) -> jax.Array:
  """``x`` as float32, or float64 if it already is (the parity tests run in float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def expand_to(mask: jax.Array, x: jax.Array) -> jax.Array:
  """Reshapes a ``[B, ...]`` mask so it broadcasts against ``x``."""
  return mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))


def example_mask(where, batch: int) -> jax.Array:
  """``[batch]`` bool: ``where`` of shape ``[B]``, or any-valid over its trailing axes."""
  if where is None:
    return jnp.ones((batch,), bool)
  where = jnp.asarray(where).astype(bool)
  if where.shape[0] != batch:
    raise ValueError(f'where has shape {where.shape}; expected a leading batch of {batch}')
  if where.ndim > 1:
    where = jnp.any(where, axis=tuple(range(1, where.ndim)))
  return where


def split_where(where, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
  """``(example_mask [B], position_mask [B, *S] or None)`` for channels-last ``x``.

  ``where`` is ``None``, ``[B]`` (examples), or ``x.shape[:-1]`` (positions: tokens
  or spatial cells); in the latter case an example is valid if any position is.
  """
  batch = x.shape[0]
  if where is None:
    return jnp.ones((batch,), bool), None
  where = jnp.asarray(where).astype(bool)
  if where.ndim == 1:
    return example_mask(where, batch), None
  if where.shape == x.shape[:-1]:
    return example_mask(where, batch), where
  raise ValueError(f'where has shape {where.shape}; expected ({batch},) or {x.shape[:-1]}')


def zero_masked(x: jax.Array, mask: jax.Array | None) -> jax.Array:
  """Replaces masked entries by zeros (the inner half of the double-where)."""
  if mask is None:
    return x
  return jnp.where(expand_to(mask, x), x, jnp.zeros((), x.dtype))


def position_mean(values: jax.Array, position_mask: jax.Array | None) -> jax.Array:
  """Mean of ``[B, *S]`` values over the positions, ``[B]``; masked positions skipped."""
  axes = tuple(range(1, values.ndim))
  if not axes:
    return values
  if position_mask is None:
    return jnp.mean(values, axis=axes)
  w = position_mask.astype(values.dtype)
  total = jnp.sum(jnp.where(position_mask, values, 0.0), axis=axes)
  return total / jnp.maximum(jnp.sum(w, axis=axes), 1.0)


def sq_norm(x: jax.Array, axis=-1, keepdims: bool = False) -> jax.Array:
  return jnp.sum(jnp.square(x), axis=axis, keepdims=keepdims)


def rescale(x: jax.Array, axis=None) -> tuple[jax.Array, jax.Array]:
  """``(x / m, m)`` with ``m = max |x|`` over ``axis`` (kept), under ``stop_gradient``.

  For a function invariant to the scale of ``x`` (a normalization, a cosine, a
  row-normalized Gram matrix, CKA) evaluating it on ``x / m`` gives the same value
  and the same gradient, and keeps squares of huge or tiny inputs in range. A zero
  slice keeps ``m = 1``.
  """
  m = jax.lax.stop_gradient(jnp.max(jnp.abs(x), axis=axis, keepdims=True))
  m = jnp.where(m > 0, m, jnp.ones((), x.dtype))
  return x / m, m


def safe_norm(x: jax.Array, axis=-1, keepdims: bool = False) -> jax.Array:
  """L2 norm, overflow-safe, with a zero (finite) gradient at the zero vector."""
  xs, m = rescale(x, axis)
  sq = sq_norm(xs, axis, keepdims=True)
  ok = sq > 0.5   # a nonzero slice has sq >= 1 after rescaling
  n = jnp.where(ok, m * jnp.sqrt(jnp.where(ok, sq, 1.0)), 0.0)
  return n if keepdims else jnp.squeeze(n, axis)


def l2_normalize(x: jax.Array, axis=-1) -> jax.Array:
  """``x / ||x||`` along ``axis``; a zero slice stays zero with a finite gradient.

  Overflow-safe: ``x`` is first rescaled by its max magnitude (see :func:`rescale`);
  afterwards a nonzero slice has squared norm at least 1, so the floor that protects
  the zero slice never changes a nonzero result.
  """
  xs, _ = rescale(x, axis)
  sq = sq_norm(xs, axis, keepdims=True)
  return xs * jax.lax.rsqrt(jnp.where(sq > 0.5, sq, 1.0))


def safe_sqrt(x: jax.Array, eps: float = 0.0) -> jax.Array:
  """``sqrt(x)`` for ``x >= 0``, with a zero (not infinite) gradient at ``x == 0``."""
  positive = x > eps
  return jnp.where(positive, jnp.sqrt(jnp.where(positive, x, 1.0)), 0.0)


def flatten_examples(x: jax.Array) -> jax.Array:
  """``[B, ...] -> [B, prod(...)]`` in float32 (float64 stays float64)."""
  x = floating(x)
  return x.reshape(x.shape[0], -1)


def per_example_output(value: jax.Array, where) -> jax.Array:
  """Shapes a per-example ``[B]`` term value like the objective's ``where``.

  The objective reduces a term value by a masked mean over ``where``. For a
  ``[B]`` (or absent) ``where`` the value is returned as is; for a per-position
  ``where`` (``[B, T]`` on language models) each example's value is repeated on its
  valid positions, so the objective weights examples by their valid-position count
  (for position-averaged losses this gives the mean over all valid positions).
  """
  if where is None:
    return value
  where = jnp.asarray(where).astype(bool)
  if where.ndim == 1:
    return jnp.where(where, value, 0.0)
  return jnp.where(where, expand_to(value, where), 0.0)


def names(spec: str | Sequence[str]) -> tuple[str, ...]:
  if isinstance(spec, str):
    return (spec,)
  return tuple(spec)


def paired_names(loss: str, student, teacher) -> tuple[tuple[str, str], ...]:
  s, t = names(student), names(teacher)
  if len(s) != len(t):
    raise ValueError(f'{loss}: student names {s} and teacher names {t} must pair up one to '
                     'one; give lists of equal length')
  return tuple(zip(s, t))


def feature(inputs: Mapping[str, Any], side: str, name: str, loss: str) -> jax.Array:
  """``inputs[f'{side}_features'][name]`` with an error that lists what exists."""
  key = f'{side}_features'
  feats = inputs.get(key)
  if not feats:
    raise ValueError(f'{loss}: inputs carry no {key}; the model must return named features '
                     f'(or the teacher cache must store them)')
  if name not in feats:
    raise ValueError(f'{loss}: {side} feature {name!r} not found; available: '
                     f'{", ".join(sorted(feats))}. Set {side}=<one of these> in the loss term')
  return feats[name]


def attention(inputs: Mapping[str, Any], side: str, layer: int, loss: str) -> jax.Array:
  key = f'{side}_attentions'
  atts = inputs.get(key)
  if not atts:
    raise ValueError(f'{loss}: inputs carry no {key}; use an attention model (ViT, BERT, LM)')
  try:
    return atts[layer]
  except IndexError:
    raise ValueError(f'{loss}: {side} has {len(atts)} attention layers; layer {layer} '
                     'does not exist') from None


def term_output(value: jax.Array, where, example_where: jax.Array) -> tuple[jax.Array, jax.Array]:
  """``(value, term_where)`` for a term that also masks examples itself (unlabeled ones).

  ``example_where`` is ``[B]``; the pair is shaped like the objective's ``where`` (see
  :func:`per_example_output`) so that :func:`kdjax.losses.registry.reduce_value`
  counts only the examples the term covers.
  """
  value = per_example_output(jnp.where(example_where, value, 0.0), where)
  if where is None or jnp.ndim(where) == 1:
    return value, example_where
  where = jnp.asarray(where).astype(bool)
  return value, jnp.logical_and(where, expand_to(example_where, where))
