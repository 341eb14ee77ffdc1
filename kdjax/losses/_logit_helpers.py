"""Shared pieces of the logit losses: upcasting, axis handling, the double-where masking
(a masked position contributes exactly zero, value and gradient) and stable KL terms.
Package-internal: used by ``logits``, ``divergences``, ``sparse`` and ``progressive``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

Array = jax.Array


def upcast(x) -> Array:
  """Upcasts to at least float32 (float64 stays float64)."""
  x = jnp.asarray(x)
  return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def norm_axis(axis: int, ndim: int) -> int:
  if not -ndim <= axis < ndim:
    raise ValueError(f'axis {axis} is out of range for logits of rank {ndim}')
  return axis % ndim


def example_shape(shape, axis: int):
  return tuple(d for i, d in enumerate(shape) if i != axis)


def where_per_example(where, shape, axis: int):
  """``where`` broadcast to the per-example shape (``shape`` without ``axis``)."""
  if where is None:
    return None
  return jnp.broadcast_to(jnp.asarray(where, bool), example_shape(shape, axis))


def mask_inputs(where, axis: int, *arrays):
  """Replaces masked rows by zeros (first half of the double-where trick).

  ``where`` has the per-example shape; each array has the class axis at ``axis``.
  """
  if where is None:
    return arrays
  w = jnp.expand_dims(where, axis)
  return tuple(jnp.where(w, a, jnp.zeros((), a.dtype)) for a in arrays)


def mask_value(where, value: Array) -> Array:
  """Zeroes masked values (second half of the double-where trick)."""
  if where is None:
    return value
  return jnp.where(where, value, jnp.zeros((), value.dtype))


def prepare(student_logits, teacher_logits, where, axis):
  """Upcasts, normalizes ``axis``, broadcasts ``where`` and masks the inputs."""
  s, t = upcast(student_logits), upcast(teacher_logits)
  if s.shape != t.shape:
    raise ValueError(f'student logits {s.shape} and teacher logits {t.shape} differ in shape')
  axis = norm_axis(axis, s.ndim)
  where = where_per_example(where, s.shape, axis)
  s, t = mask_inputs(where, axis, s, t)
  return s, t, where, axis


def kl_from_log_probs(log_p, log_q, axis):
  """``sum p (log p - log q)``; terms with ``p == 0`` are exactly zero."""
  p = jnp.exp(log_p)
  return jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=axis)


def entropy_from_log_probs(log_p, axis):
  p = jnp.exp(log_p)
  return -jnp.sum(jnp.where(p > 0, p * log_p, 0.0), axis=axis)


def log_softmax_pair(s, t, temperature, axis):
  temperature = jnp.asarray(temperature, s.dtype)
  return (jax.nn.log_softmax(s / temperature, axis=axis),
          jax.nn.log_softmax(t / temperature, axis=axis), temperature)


def rows(x, where, axis):
  """``[N, classes]`` rows (leading dims flattened) and ``[N, 1]`` float weights."""
  x = jnp.moveaxis(x, axis, -1)
  rows = x.reshape(-1, x.shape[-1])
  if where is None:
    return rows, None
  return rows, where.reshape(-1, 1).astype(rows.dtype)
