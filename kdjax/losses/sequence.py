"""Token-level losses over ``[batch, time, vocab]`` without the float32 blow-up.

Every logit loss in :mod:`kdjax.losses` already accepts ``[batch, time, vocab]``
logits with a token mask ``where=[batch, time]``. With a large vocabulary the
float32 intermediates (two log-softmaxes, probabilities, their gradients) of the
whole ``[batch, time, vocab]`` block dominate memory. :func:`chunked` computes the
same per-token values in chunks of each row's tokens with :func:`jax.lax.map`, and
rematerializes each chunk in the backward pass (:func:`jax.checkpoint`), so only
one chunk's float32 intermediates are alive at a time. Values and gradients equal
the plain loss's. The batch axis is never cut: a batch split over devices (data or
FSDP parallelism) stays split, each device looping over its own rows' chunks.

Measured on XLA:CPU (``benchmarks/chunked_sequence_loss.py``, figures in
``benchmarks/RESULTS.md``): at ``[8, 512, 32000]`` with 512-token chunks the compiled
scratch memory drops 8x for float32 inputs; for bfloat16 inputs only 2.3x, because
XLA:CPU itself converts the whole bfloat16 inputs and the stacked gradient to
float32 around the loop (its bfloat16 normalization). The jaxpr stays bfloat16;
accelerators were not measured. (Those figures were taken when a chunk was
``chunk_size`` consecutive tokens of the flattened batch, one row of 512 there; a
chunk is now ``chunk_size`` tokens of every row, so the same chunk is ``chunk_size=64``
over 8 rows.)

Sequence-level KD (Kim & Rush, 2016: train on the teacher's generated sequences)
needs no loss of its own: it is the ``ce`` term on teacher-generated targets.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kdjax.losses import registry
from kdjax.losses.logits import kd

Array = jax.Array

KIM_RUSH_2016 = ('Kim, Rush. Sequence-Level Knowledge Distillation. EMNLP 2016. '
                 'arXiv:1606.07947')


def chunked(loss_fn: Callable[..., Array], chunk_size: int, *,
            remat: bool = True) -> Callable[..., Array]:
  r"""Wraps a per-example loss to run over chunks of ``chunk_size`` tokens of each row.

  The wrapped function has the signature ``fn(*arrays, where=None, **options)``:
  every positional array shares the leading (per-example) shape of the first one,
  ``[rows, tokens..., ]`` (logits ``[..., vocab]``, top-k ``[..., k]``, labels
  ``[...]``); the class axis must be the last one. The first axis is the batch of rows
  and stays whole: each row's tokens (the axes after it, flattened) are padded to a
  multiple of ``chunk_size`` (padding masked) and cut into chunks, and ``loss_fn`` runs
  on ``[rows, chunk_size, ...]`` slices under :func:`jax.lax.map`, one chunk of every
  row at a time. A batch sharded over devices (data or FSDP parallelism) thus stays
  sharded: each device computes its own rows' chunks. A one-axis per-example shape
  ``[tokens]`` is one row. Only per-example losses can be chunked (not batch-level ones
  such as :func:`~kdjax.losses.dist`). With :math:`\mathcal C_m` the token positions of
  chunk :math:`m`:

  .. math::

    \mathrm{chunked}(\ell)(x)_{b,n} = \ell\big(x_{:,\mathcal C_m}\big)_{b,n}
    \quad\text{for } n \in \mathcal C_m

  i.e. the same per-token values, computed ``rows x chunk_size`` tokens at a time.
  Gradients flow to the arrays and to traced options (a scheduled temperature).

  Args:
    loss_fn: ``loss_fn(*arrays, where=..., **options) -> [rows, chunk]``.
    chunk_size: tokens of each row per chunk.
    remat: recompute each chunk in the backward pass instead of storing its
      intermediates (the point of chunking; turn off only to compare).

  Returns:
    The chunked loss, returning the per-example shape.

  References:
    Chen, Xu, Zhang, Guestrin. Training Deep Nets with Sublinear Memory Cost.
    2016. arXiv:1604.06174 (rematerialization).

  >>> import jax.numpy as jnp
  >>> from kdjax.losses import kd
  >>> s = jnp.zeros((2, 5, 7)); t = jnp.ones((2, 5, 7)).at[..., 0].set(3.0)
  >>> plain, chunk = kd(s, t), chunked(kd, 2)(s, t)
  >>> print(chunk.shape, bool(jnp.allclose(plain, chunk)))
  (2, 5) True
  """
  if chunk_size < 1:
    raise ValueError(f'chunk_size must be positive, got {chunk_size}')

  def wrapped(*arrays, where=None, **options):
    if not arrays:
      raise ValueError('chunked loss needs at least one array')
    lead = arrays[0].shape[:-1]
    rows = lead[0] if len(lead) > 1 else 1
    n = math.prod(lead[1:]) if len(lead) > 1 else math.prod(lead)
    num_chunks = max(1, -(-n // chunk_size))
    pad = num_chunks * chunk_size - n

    def to_rows(a):
      """``[*lead, *rest]`` -> ``[rows, num_chunks * chunk_size, *rest]`` (zero padding)."""
      a = jnp.asarray(a)
      if a.shape[:len(lead)] != lead:
        raise ValueError(f'array of shape {a.shape} does not start with the per-example '
                         f'shape {lead}')
      rest = a.shape[len(lead):]
      a = a.reshape((rows, n) + rest)
      return jnp.pad(a, [(0, 0), (0, pad)] + [(0, 0)] * len(rest)) if pad else a

    w = jnp.ones(lead, bool) if where is None else jnp.broadcast_to(
        jnp.asarray(where, bool), lead)
    padded = tuple(to_rows(a) for a in arrays) + (to_rows(w),)

    # Each chunk is sliced out of the whole arrays inside the loop (not stacked before
    # it: moving the chunk axis to the front copies the arrays, and so does their
    # gradient); the slices' gradients add into one array of the inputs' shape.
    def body(i):
      *chunk_arrays, chunk_where = (
          jax.lax.dynamic_slice_in_dim(a, i * chunk_size, chunk_size, axis=1) for a in padded)
      return loss_fn(*chunk_arrays, where=chunk_where, **options)

    if remat:
      body = jax.checkpoint(body)
    out = jax.lax.map(body, jnp.arange(num_chunks))       # [num_chunks, rows, chunk_size]
    out = jnp.moveaxis(out, 0, 1).reshape(rows, num_chunks * chunk_size)
    return out[:, :n].reshape(lead)

  return functools.wraps(loss_fn)(wrapped) if hasattr(loss_fn, '__name__') else wrapped


def chunked_kd(student_logits, teacher_logits, *, temperature=1.0, chunk_size: int = 1024,
               where=None) -> Array:
  r""":func:`~kdjax.losses.kd` over ``[..., vocab]`` computed ``chunk_size`` tokens of each
  row at a time (:func:`chunked`).

  .. math::

    \ell_{b,t} = T^2\,\mathrm{KL}\big(\mathrm{softmax}(z_{b,t}/T) \,\|\,
                                   \mathrm{softmax}(s_{b,t}/T)\big)

  Same values and gradients as ``kd``; peak memory of the float32 intermediates is
  one chunk's instead of the whole batch's (see ``benchmarks/chunked_sequence_loss.py``).

  Args:
    student_logits: ``[..., vocab]`` (bfloat16 is fine: upcast per chunk).
    teacher_logits: same shape.
    temperature: :math:`T > 0`.
    chunk_size: tokens of each row per chunk (a chunk holds ``rows x chunk_size`` tokens;
      a ``[tokens, vocab]`` input is one row).
    where: optional token mask of the per-example shape, e.g. ``[batch, time]``.

  Returns:
    Per-token loss, float32.

  References:
    Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. 2015.
    arXiv:1503.02531.

  >>> import jax.numpy as jnp
  >>> s = jnp.zeros((1, 3, 4), jnp.bfloat16); t = jnp.zeros((1, 3, 4)).at[..., 0].set(2.0)
  >>> out = chunked_kd(s, t, chunk_size=2, where=jnp.array([[True, True, False]]))
  >>> print(out.shape, [f'{float(v):.3f}' for v in out[0]])
  (1, 3) ['0.468', '0.468', '0.000']
  """
  fn = chunked(kd, chunk_size)
  return fn(student_logits, teacher_logits, where=where, temperature=temperature)


@registry.register('chunked_kd', family='sequence', reference=KIM_RUSH_2016)
def _chunked_kd_term(*, temperature: Any = 1.0, chunk_size: int = 1024) -> registry.Term:
  """Token-level KD over [batch, time, vocab], computed in chunks of tokens."""
  def fn(inputs):
    opts = registry.resolve(dict(temperature=temperature), inputs.get('step', 0))
    return chunked_kd(inputs['student_logits'], inputs['teacher_logits'],
                      chunk_size=chunk_size, where=inputs.get('where'), **opts)
  return registry.stateless(fn)
