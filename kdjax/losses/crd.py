r"""CRD: contrastive representation distillation, with in-batch or queued negatives.

Student and teacher embeddings are mapped by learned linear heads to a common width
and L2-normalized, :math:`z^s_i = \mathrm{unit}(W_s s_i + b_s)`,
:math:`z^t_i = \mathrm{unit}(W_t t_i + b_t)`; the student is trained to pick its own
example's teacher embedding among negatives with an InfoNCE objective at temperature
:math:`\tau`. Both heads are params trained with the student.

Two variants:

* **in-batch** (:func:`crd_loss`): the negatives are the other examples of the batch;
  symmetric by default (student-anchored and teacher-anchored directions averaged).
* **queue** (:func:`crd_queue_loss`): a fixed-size FIFO queue of past teacher
  embeddings (the term's state, no per-dataset memory bank) adds negatives for the
  student-anchored direction; :func:`crd_queue_push` writes the batch's teacher
  embeddings after each step. Queued embeddings are constants (no gradient).

The original CRD uses a memory bank over the whole dataset and NCE with sampled
negatives; in-batch and queued InfoNCE are the usual memory-light replacements (the
same objective family, with the negatives taken from the batch or a queue).

Both are **batch-level** (scalar) losses. ``where`` masks examples: a masked example
is neither an anchor nor a negative, is not pushed to the queue, and gets exactly
zero gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import _feature_inputs as fi
from kdjax.losses import projectors
from kdjax.losses.registry import Term
from kdjax.losses.registry import register

_NEG = -1e30


def crd_init(rng: jax.Array, student_shape: Sequence[int], teacher_shape: Sequence[int],
             dim: int = 128) -> dict:
  """Params of the two embedding heads, ``{'student': ..., 'teacher': ...}``.

  >>> p = crd_init(jax.random.key(0), (4, 16), (4, 32), dim=8)
  >>> p['student']['kernel'].shape, p['teacher']['kernel'].shape
  ((16, 8), (32, 8))
  """
  ks, kt = jax.random.split(rng)
  return {'student': projectors.linear_init(ks, int(np.prod(student_shape[1:])), dim),
          'teacher': projectors.linear_init(kt, int(np.prod(teacher_shape[1:])), dim)}


def crd_embed(params: dict, student: jax.Array, teacher: jax.Array):
  """``(z_s, z_t)``: the L2-normalized ``[B, dim]`` embeddings."""
  zs = fi.l2_normalize(projectors.linear_apply(params['student'], fi.flatten_examples(student)))
  zt = fi.l2_normalize(projectors.linear_apply(params['teacher'], fi.flatten_examples(teacher)))
  return zs, zt


def _info_nce(logits, valid_cols, anchors):
  """Mean over valid anchors of ``-log softmax(logits)[i, i]`` over valid columns."""
  logits = jnp.where(valid_cols, logits, _NEG)
  log_p = jax.nn.log_softmax(logits, axis=-1)
  diag = jnp.diagonal(log_p)
  n = jnp.sum(anchors.astype(jnp.float32))
  return -jnp.sum(jnp.where(anchors, diag, 0.0)) / jnp.maximum(n, 1.0)


def crd_loss(params: dict, student: jax.Array, teacher: jax.Array, *, temperature: float = 0.07,
        symmetric: bool = True, where: jax.Array | None = None) -> jax.Array:
  r"""In-batch CRD (batch-level scalar).

  .. math::

    \mathcal{L}_{s \to t} = -\frac1n \sum_i \log
      \frac{\exp(\langle z^s_i, z^t_i\rangle / \tau)}
           {\sum_j \exp(\langle z^s_i, z^t_j\rangle/\tau)},
    \qquad
    \mathcal{L} = \tfrac12 \big(\mathcal{L}_{s \to t} + \mathcal{L}_{t \to s}\big)

  over valid :math:`i, j` (:math:`\mathcal{L} = \mathcal{L}_{s \to t}` when not
  ``symmetric``).

  Args:
    params: from :func:`crd_init`.
    student: ``[B, ...]`` student embeddings.
    teacher: ``[B, ...]`` teacher embeddings.
    temperature: :math:`\tau`.
    symmetric: average both anchor directions.
    where: ``[B]`` example mask.

  Returns:
    A float32 scalar.

  References:
    Tian, Krishnan, Isola. Contrastive Representation Distillation. ICLR 2020.
    arXiv:1910.10699.

  >>> s = jnp.eye(4); p = crd_init(jax.random.key(0), s.shape, s.shape, dim=4)
  >>> bool(crd_loss(p, s, s) > 0)
  True
  """
  m = fi.example_mask(where, student.shape[0])
  s = fi.zero_masked(fi.flatten_examples(student), m)
  t = fi.zero_masked(fi.flatten_examples(teacher), m)
  zs, zt = crd_embed(params, s, t)
  logits = zs @ zt.T / temperature
  cols = m[None, :]
  loss = _info_nce(logits, cols, m)
  if symmetric:
    loss = 0.5 * (loss + _info_nce(logits.T, cols, m))
  return loss


class QueueState(NamedTuple):
  """A FIFO queue of teacher embeddings: ``queue [K, dim]``, ``valid [K]``, ``ptr``."""

  queue: jax.Array
  valid: jax.Array
  ptr: jax.Array


def crd_queue_init(size: int, dim: int = 128) -> QueueState:
  """An empty queue of ``size`` slots.

  >>> crd_queue_init(16, 8).queue.shape
  (16, 8)
  """
  if size < 1:
    raise ValueError(f'queue size must be positive; got {size}')
  return QueueState(jnp.zeros((size, dim), jnp.float32), jnp.zeros((size,), bool),
                    jnp.zeros((), jnp.int32))


def crd_queue_push(state: QueueState, embeddings: jax.Array,
                   where: jax.Array | None = None) -> QueueState:
  """Enqueues the valid rows of ``embeddings`` ``[B, dim]`` in order, oldest overwritten.

  If more than ``K`` rows are valid, only the last ``K`` are kept. Values are stored
  under ``stop_gradient``.

  >>> q = crd_queue_push(crd_queue_init(3, 1), jnp.arange(4.0)[:, None])
  >>> q.queue[:, 0].tolist(), int(q.ptr)
  ([3.0, 1.0, 2.0], 1)
  """
  k = state.queue.shape[0]
  e = jax.lax.stop_gradient(fi.f32(embeddings))
  m = fi.example_mask(where, e.shape[0])
  rank = jnp.cumsum(m.astype(jnp.int32)) - 1
  n = jnp.sum(m.astype(jnp.int32))
  keep = jnp.logical_and(m, rank >= n - k)
  slot = jnp.where(keep, (state.ptr + rank) % k, k)            # k: out of range -> dropped
  queue = state.queue.at[slot].set(e, mode='drop')
  valid = state.valid.at[slot].set(True, mode='drop')
  return QueueState(queue, valid, ((state.ptr + n) % k).astype(jnp.int32))


def crd_queue_loss(params: dict, state: QueueState, student: jax.Array, teacher: jax.Array, *,
                   temperature: float = 0.07,
                   where: jax.Array | None = None) -> tuple[jax.Array, QueueState]:
  r"""CRD with a queue of past teacher embeddings as extra negatives (batch-level).

  .. math::

    \mathcal{L} = -\frac1n \sum_i \log
      \frac{\exp(\langle z^s_i, z^t_i\rangle / \tau)}
      {\sum_j \exp(\langle z^s_i, z^t_j\rangle/\tau) + \sum_{q \in Q}
       \exp(\langle z^s_i, q\rangle/\tau)}

  over valid :math:`i, j` and the filled queue slots :math:`Q` (read before this
  batch is pushed). Returns the loss and the queue with this batch's teacher
  embeddings pushed.

  Args:
    params: from :func:`crd_init` (``dim`` must match the queue).
    state: from :func:`crd_queue_init`.
    student: ``[B, ...]``.
    teacher: ``[B, ...]``.
    temperature: :math:`\tau`.
    where: ``[B]`` example mask.

  Returns:
    ``(loss, new_state)``.

  References:
    Tian, Krishnan, Isola. Contrastive Representation Distillation. ICLR 2020.
    arXiv:1910.10699. He, Fan, Wu, Xie, Girshick. Momentum Contrast for Unsupervised
    Visual Representation Learning. CVPR 2020. arXiv:1911.05722 (the queue).

  >>> s = jnp.eye(4); p = crd_init(jax.random.key(0), s.shape, s.shape, dim=4)
  >>> loss, q = crd_queue_loss(p, crd_queue_init(8, 4), s, s)
  >>> int(q.valid.sum())
  4
  """
  m = fi.example_mask(where, student.shape[0])
  s = fi.zero_masked(fi.flatten_examples(student), m)
  t = fi.zero_masked(fi.flatten_examples(teacher), m)
  zs, zt = crd_embed(params, s, t)
  queue = jax.lax.stop_gradient(state.queue)
  logits = jnp.concatenate([zs @ zt.T, zs @ queue.T], axis=1) / temperature
  cols = jnp.concatenate([m, state.valid])[None, :]
  loss = _info_nce(logits, cols, m)
  return loss, crd_queue_push(state, zt, m)


@register('crd', family='relation', needs=('student_features', 'teacher_features'),
          batch_level=True,
          reference='Tian et al., Contrastive Representation Distillation, ICLR 2020, '
                    'arXiv:1910.10699')
def crd_term(student: str = 'penultimate', teacher: str = 'penultimate', dim: int = 128,
             temperature: float = 0.07, queue_size: int = 0, symmetric: bool = True) -> Term:
  """CRD with learned embedding heads: in-batch negatives, or a FIFO queue if ``queue_size``.

  The queue (``queue_size`` > 0) lives in the term's state and is updated in ``apply``.
  """
  def pick(inputs):
    return (fi.feature(inputs, 'student', student, 'crd'),
            fi.feature(inputs, 'teacher', teacher, 'crd'))

  def init(rng, inputs):
    s, t = pick(inputs)
    state = crd_queue_init(queue_size, dim)._asdict() if queue_size else {}
    return crd_init(rng, s.shape, t.shape, dim), state

  def apply(params, state, inputs):
    s, t = pick(inputs)
    where = inputs.get('where')
    ex = None if where is None else fi.example_mask(where, s.shape[0])
    if not queue_size:
      return crd_loss(params, s, t, temperature=temperature, symmetric=symmetric, where=ex), state
    loss, new = crd_queue_loss(params, QueueState(**state), s, t, temperature=temperature,
                               where=ex)
    return loss, new._asdict()

  return Term(init, apply)
