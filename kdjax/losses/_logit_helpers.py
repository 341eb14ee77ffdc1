"""Shared pieces of the logit losses: upcasting, axis handling, the double-where masking
(a masked position contributes exactly zero, value and gradient), stable KL terms and
the guard against infinite logits.

Infinite logits (a padded vocabulary gives ``-inf`` columns) follow DistiLLM's rule
(Ko et al. 2024, jongwooko/distillm ``distillm/losses.py``): an entry where either
side's logit is infinite contributes zero. Each side's softmax is taken over its own
finite entries (exact for ``-inf``: such an entry has no mass), and every term at a
flagged entry is computed on sanitized finite inputs and then masked, so neither the
value nor any gradient (temperature included) sees an ``inf - inf`` or ``0 * inf``.
When both sides are ``-inf`` at the same entries this equals the loss on the logits
with those columns removed.

Package-internal: used by ``logits``, ``divergences``, ``sparse`` and ``progressive``.
"""

from __future__ import annotations

from typing import NamedTuple

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


# --------------------------------------------------------------------------- infinite logits

# A finite stand-in for -inf: exp() of it, and of it minus any log-sum-exp of real logits,
# is exactly 0 in float32 and float64, and it never makes an inf - inf or a 0 * inf (a NaN
# in a value or, through an unselected where branch, in a gradient).
ABSENT = -1e30


def sanitize(x):
  """``(x with its infinite entries replaced by 0, the boolean mask of those entries)``."""
  inf = jnp.isinf(x)
  return jnp.where(inf, jnp.zeros((), x.dtype), x), inf


def finite_log_softmax(z, inf, axis):
  """Log-softmax of sanitized ``z`` over its entries with ``inf`` False.

  The flagged entries have no mass: their log-probability is about :data:`ABSENT`.
  """
  return jax.nn.log_softmax(jnp.where(inf, jnp.asarray(ABSENT, z.dtype), z), axis=axis)


class LogProbs(NamedTuple):
  """Tempered student and teacher log-probabilities with the entries to skip.

  ``log_q`` and ``log_p`` are finite everywhere (about :data:`ABSENT` at a side's own
  infinite entries); every term masks ``skip`` (either logit infinite).
  """
  log_q: Array
  log_p: Array
  skip: Array
  temperature: Array


def tempered_log_probs(s, t, temperature, axis) -> LogProbs:
  """``log_softmax(s / T)``, ``log_softmax(t / T)`` over each side's finite entries.

  The logits are sanitized before the division, so a traced temperature's gradient
  never sees ``inf / T``.
  """
  temperature = jnp.asarray(temperature, s.dtype)
  s, inf_s = sanitize(s)
  t, inf_t = sanitize(t)
  log_q = finite_log_softmax(s / temperature, inf_s, axis)
  log_p = finite_log_softmax(t / temperature, inf_t, axis)
  return LogProbs(log_q, log_p, jnp.logical_or(inf_s, inf_t), temperature)


def probs(log_p, skip=None):
  """``exp(log_p)``, zero at ``skip`` entries."""
  p = jnp.exp(log_p)
  return p if skip is None else jnp.where(skip, jnp.zeros((), p.dtype), p)


def kl_terms(log_p, log_q, skip=None):
  """Elementwise ``p (log p - log q)``, zero at ``skip`` entries.

  The log-probabilities must be finite (:data:`ABSENT` for no mass, which gives an
  exact 0 where ``p`` has none).
  """
  terms = jnp.exp(log_p) * (log_p - log_q)
  return terms if skip is None else jnp.where(skip, 0.0, terms)


def kl_from_log_probs(log_p, log_q, axis, skip=None):
  """``sum p (log p - log q)`` along ``axis`` (see :func:`kl_terms`)."""
  return jnp.sum(kl_terms(log_p, log_q, skip), axis=axis)


def entropy_from_log_probs(log_p, axis, skip=None):
  terms = jnp.exp(log_p) * log_p
  if skip is not None:
    terms = jnp.where(skip, 0.0, terms)
  return -jnp.sum(terms, axis=axis)


def rows(x, where, axis):
  """``[N, classes]`` rows (leading dims flattened) and ``[N, 1]`` float weights."""
  x = jnp.moveaxis(x, axis, -1)
  rows = x.reshape(-1, x.shape[-1])
  if where is None:
    return rows, None
  return rows, where.reshape(-1, 1).astype(rows.dtype)
