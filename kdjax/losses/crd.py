r"""CRD: contrastive representation distillation, with NCE and a memory bank, or InfoNCE.

Student and teacher embeddings are mapped by learned linear heads to a common width
and L2-normalized, :math:`z^s_i = \mathrm{unit}(W_s s_i + b_s)`,
:math:`z^t_i = \mathrm{unit}(W_t t_i + b_t)`; the student is trained to tell its own
example's teacher embedding from negatives. Both heads are params trained with the
student.

Three variants:

* **NCE with memory banks** (:func:`crd_nce_loss`, the published CRD): one memory
  bank per side holds an embedding of every training example (the term's state),
  updated with momentum; each anchor is scored against its own example's entry in the
  other side's bank and against ``nce_k`` (16384) sampled entries, and the loss is
  NCE with the uniform noise distribution, in both directions, summed. It needs the
  dataset size and each example's index in the training split
  (``inputs['example_ids']``).
* **in-batch** (:func:`crd_loss`): InfoNCE with the other examples of the batch as the
  negatives; both directions summed by default. Needs no dataset size or ids.
* **queue** (:func:`crd_queue_loss`): in-batch InfoNCE plus a fixed-size FIFO queue of
  past teacher embeddings (the term's state) as extra negatives for the
  student-anchored direction; :func:`crd_queue_push` writes the batch's teacher
  embeddings after each step. Queued embeddings are constants (no gradient).

The InfoNCE variants are the usual memory-light replacements; their values are not on
the NCE loss's scale (no fixed factor relates them), so the published weight (0.8 in
RepDistiller) applies to the NCE variant only.

All are **batch-level** (scalar) losses. ``where`` masks examples: a masked example
is neither an anchor nor a negative, is not written to a queue or a memory bank, and
gets exactly zero gradient.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import UserError
from kdjax.losses import _feature_inputs as fi
from kdjax.losses import projectors
from kdjax.losses.registry import Term
from kdjax.losses.registry import register

_NEG = -1e30
_NCE_EPS = 1e-7     # the reference's ``eps`` in the NCE loss


def crd_init(rng: jax.Array, student_shape: Sequence[int], teacher_shape: Sequence[int],
             dim: int = 128) -> dict:
  """Params of the two embedding heads, ``{'student': ..., 'teacher': ...}``.

  Each is a linear layer from the flattened feature to ``dim`` (the reference's
  ``feat_dim``, 128) initialized as PyTorch's ``nn.Linear``.

  >>> p = crd_init(jax.random.key(0), (4, 16), (4, 32), dim=8)
  >>> p['student']['kernel'].shape, p['teacher']['kernel'].shape
  ((16, 8), (32, 8))
  """
  ks, kt = jax.random.split(rng)
  return {'student': projectors.torch_linear_init(ks, int(np.prod(student_shape[1:])), dim),
          'teacher': projectors.torch_linear_init(kt, int(np.prod(teacher_shape[1:])), dim)}


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
  r"""In-batch CRD with InfoNCE (batch-level scalar).

  .. math::

    \mathcal{L}_{s \to t} = -\frac1n \sum_i \log
      \frac{\exp(\langle z^s_i, z^t_i\rangle / \tau)}
           {\sum_j \exp(\langle z^s_i, z^t_j\rangle/\tau)},
    \qquad
    \mathcal{L} = \mathcal{L}_{s \to t} + \mathcal{L}_{t \to s}

  over valid :math:`i, j` (:math:`\mathcal{L} = \mathcal{L}_{s \to t}` when not
  ``symmetric``). The two directions are summed as the reference sums its two NCE
  losses; the published CRD is :func:`crd_nce_loss`.

  Args:
    params: from :func:`crd_init`.
    student: ``[B, ...]`` student embeddings.
    teacher: ``[B, ...]`` teacher embeddings.
    temperature: :math:`\tau`.
    symmetric: add the teacher-anchored direction.
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
    loss = loss + _info_nce(logits.T, cols, m)
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


# =========================================================================== NCE + memory

class MemoryState(NamedTuple):
  """CRD's memory banks and NCE constants.

  ``student`` and ``teacher``: ``[n_data, dim]``, one embedding per training example
  (the reference's ``memory_v1`` and ``memory_v2``); ``z_student``, ``z_teacher``: the
  normalization constants of the student- and teacher-anchored scores, negative until
  the first batch sets them; ``rng``: the key data of the negative sampler.
  """

  student: jax.Array
  teacher: jax.Array
  z_student: jax.Array
  z_teacher: jax.Array
  rng: jax.Array


def crd_memory_init(rng: jax.Array, n_data: int, dim: int = 128) -> MemoryState:
  """Memory banks of ``n_data`` rows drawn from ``U(-b, b)``, ``b = 1/sqrt(dim/3)``.

  (The reference's initialization: rows of about unit norm.) ``Z`` starts unset (-1).

  >>> m = crd_memory_init(jax.random.key(0), 10, 4)
  >>> m.student.shape, float(m.z_student)
  ((10, 4), -1.0)
  """
  if n_data < 1:
    raise UserError(f'crd: n_data (the number of training examples) must be positive; '
                    f'got {n_data}')
  ks, kt, kr = jax.random.split(rng, 3)
  bound = 1.0 / np.sqrt(dim / 3.0)
  bank = lambda k: jax.random.uniform(k, (n_data, dim), jnp.float32, -bound, bound)
  unset = -jnp.ones((), jnp.float32)
  if jnp.issubdtype(kr.dtype, jax.dtypes.prng_key):
    kr = jax.random.key_data(kr)       # plain uint32 in the state (checkpoints, shardings)
  return MemoryState(bank(ks), bank(kt), unset, unset, kr)


NEGATIVES = ('uniform', 'other_class')


def crd_sample_negatives(rng: jax.Array, batch: int, n_data: int, k: int, *,
                         labels: jax.Array | None = None,
                         dataset_labels: np.ndarray | None = None) -> jax.Array:
  """``[batch, k]`` int32 indices of negatives into the memory banks.

  Without ``dataset_labels``: uniform over ``0 .. n_data - 1`` with replacement (the
  reference ``ContrastMemory``'s own sampler, an alias table over uniform
  probabilities; an example can draw itself). With ``dataset_labels`` (``[n_data]``, the
  label of every training example) and the batch's ``labels``: ``k`` distinct examples
  of other classes than the anchor's, uniformly (RepDistiller's ``CIFAR100InstanceSample``
  in its default ``'exact'`` mode); with replacement for a class with fewer than ``k``
  such examples, as there.

  >>> idx = crd_sample_negatives(jax.random.key(0), 2, 6, 3, labels=jnp.array([0, 1]),
  ...                            dataset_labels=np.array([0, 0, 0, 1, 1, 1]))
  >>> idx[0].min() >= 3, idx[1].max() <= 2
  (Array(True, dtype=bool), Array(True, dtype=bool))
  """
  if dataset_labels is None:
    return jax.random.randint(rng, (batch, k), 0, n_data, jnp.int32)
  dataset_labels = np.asarray(dataset_labels)
  if dataset_labels.shape != (n_data,):
    raise UserError(f'crd: dataset_labels must have one label per training example '
                    f'({n_data}); got shape {dataset_labels.shape}')
  labels = jnp.asarray(labels)
  ds = jnp.asarray(dataset_labels)
  k_perm, k_repl = jax.random.split(rng)
  # Without replacement: the k smallest of uniform keys, the anchor's class pushed last.
  keys = jax.random.uniform(k_perm, (batch, n_data))
  keys = jnp.where(ds[None, :] == labels[:, None], 2.0, keys)
  idx = jax.lax.top_k(-keys, k)[1].astype(jnp.int32)
  _, counts = np.unique(dataset_labels, return_counts=True)
  if k > n_data - counts.max():
    # With replacement for the classes that have fewer than k others: a uniform draw
    # among the n_data - n_c other examples, through the examples sorted by class.
    order = jnp.asarray(np.argsort(dataset_labels, kind='stable').astype(np.int32))
    n_c = jnp.sum(ds[None, :] == labels[:, None], axis=1)
    start = jnp.searchsorted(jnp.sort(ds), labels)
    r = jax.random.randint(k_repl, (batch, k), 0, jnp.maximum(n_data - n_c, 1)[:, None])
    r = jnp.where(r >= start[:, None], r + n_c[:, None], r)
    repl = order[jnp.clip(r, 0, n_data - 1)]
    idx = jnp.where((k > n_data - n_c)[:, None], repl, idx)
  return idx


def _nce(scores, k: int, n_data: int, valid, n):
  """The reference's NCE loss of ``[B, 1 + k]`` scores (positive first), over valid rows."""
  noise = k / float(n_data)
  pos, neg = scores[:, 0], scores[:, 1:]
  log_d1 = jnp.log(pos / (pos + noise + _NCE_EPS))
  log_d0 = jnp.sum(jnp.log(noise / (neg + noise + _NCE_EPS)), axis=1)
  return -jnp.sum(jnp.where(valid, log_d1 + log_d0, 0.0)) / n


def _update_bank(bank, ids, z, momentum, valid):
  rows = momentum * bank[ids] + (1.0 - momentum) * jax.lax.stop_gradient(z)
  rows = rows * jax.lax.rsqrt(jnp.sum(jnp.square(rows), axis=1, keepdims=True))
  slot = jnp.where(valid, ids, bank.shape[0])     # out of range: not written
  return bank.at[slot].set(rows.astype(bank.dtype), mode='drop')


def crd_nce_loss(params: dict, state: MemoryState, student: jax.Array, teacher: jax.Array,
                 example_ids: jax.Array, contrast_ids: jax.Array, *,
                 temperature: float = 0.07, momentum: float = 0.5,
                 where: jax.Array | None = None) -> tuple[jax.Array, MemoryState]:
  r"""The published CRD: NCE against memory banks (batch-level).

  With :math:`M^s, M^t` the memory banks, :math:`y_i` example :math:`i`'s index in the
  training split and :math:`c_{i,1..K}` its sampled negatives (``contrast_ids``), the
  student-anchored scores are

  .. math::

    h^s_{i,0} = rac{\exp(\langle M^t_{y_i}, z^s_i
angle / 	au)}{Z^s}, \qquad
    h^s_{i,k} = rac{\exp(\langle M^t_{c_{i,k}}, z^s_i
angle / 	au)}{Z^s},

  (the teacher-anchored :math:`h^t` likewise with :math:`M^s` and :math:`z^t`). The
  constant :math:`Z` is set once, on the first batch, to the mean unnormalized score
  times :math:`N` (``n_data``), and kept. With the noise probability
  :math:`P_n = 1/N` and :math:`\epsilon = 10^{-7}`,

  .. math::

    \ell(h) = -rac1n \sum_i \Big[\log rac{h_{i,0}}{h_{i,0} + K P_n + \epsilon}
      + \sum_{k=1}^{K} \log rac{K P_n}{h_{i,k} + K P_n + \epsilon}\Big],
    \qquad \mathcal{L} = \ell(h^s) + \ell(h^t) ,

  over the :math:`n` valid examples: the reference's value, so its weight (0.8)
  carries over. Then each side's bank rows :math:`y_i` move to
  :math:`\mathrm{unit}(m M_{y_i} + (1 - m) z_i)` (momentum :math:`m`). The banks are
  constants for the gradient; :math:`Z` is too.

  Args:
    params: from :func:`crd_init`.
    state: from :func:`crd_memory_init`.
    student: ``[B, ...]`` student features.
    teacher: ``[B, ...]`` teacher features.
    example_ids: ``[B]`` int, each example's index in the training split (the bank row).
    contrast_ids: ``[B, K]`` int, the negatives (:func:`crd_sample_negatives`).
    temperature: :math:`	au` (``nce_t``).
    momentum: :math:`m` (``nce_m``).
    where: ``[B]`` example mask.

  Returns:
    ``(loss, new_state)``; ``new_state.rng`` is passed through.

  References:
    Tian, Krishnan, Isola. Contrastive Representation Distillation. ICLR 2020.
    arXiv:1910.10699. Reference code: HobbitLong/RepDistiller ``crd/memory.py``
    (``ContrastMemory``) and ``crd/criterion.py`` (``CRDLoss``, ``ContrastLoss``).

  >>> s = jnp.eye(4); p = crd_init(jax.random.key(0), s.shape, s.shape, dim=4)
  >>> m = crd_memory_init(jax.random.key(1), 10, 4)
  >>> loss, m2 = crd_nce_loss(p, m, s, s, jnp.arange(4), jnp.full((4, 5), 9))
  >>> bool(loss > 0), bool(m2.z_student > 0)
  (True, True)
  """
  ex = fi.example_mask(where, student.shape[0])
  s = fi.zero_masked(fi.flatten_examples(student), ex)
  t = fi.zero_masked(fi.flatten_examples(teacher), ex)
  zs, zt = crd_embed(params, s, t)
  n_data = state.student.shape[0]
  ids = jnp.where(ex, jnp.asarray(example_ids, jnp.int32), 0)
  idx = jnp.concatenate([ids[:, None], jnp.asarray(contrast_ids, jnp.int32)], axis=1)
  k = idx.shape[1] - 1
  bank_s = jax.lax.stop_gradient(state.student).astype(zs.dtype)
  bank_t = jax.lax.stop_gradient(state.teacher).astype(zs.dtype)
  out_s = jnp.exp(jnp.einsum('bkd,bd->bk', bank_t[idx], zs) / temperature)
  out_t = jnp.exp(jnp.einsum('bkd,bd->bk', bank_s[idx], zt) / temperature)
  n = jnp.maximum(jnp.sum(ex.astype(zs.dtype)), 1.0)

  def normalizer(z, out):
    first = jax.lax.stop_gradient(jnp.sum(jnp.where(ex[:, None], out, 0.0)) / (n * (k + 1)))
    return jnp.where(z < 0, first * n_data, z.astype(out.dtype))

  z_s, z_t = normalizer(state.z_student, out_s), normalizer(state.z_teacher, out_t)
  loss = _nce(out_s / z_s, k, n_data, ex, n) + _nce(out_t / z_t, k, n_data, ex, n)
  new = MemoryState(_update_bank(state.student, ids, zs, momentum, ex),
                    _update_bank(state.teacher, ids, zt, momentum, ex),
                    z_s.astype(state.z_student.dtype), z_t.astype(state.z_teacher.dtype),
                    state.rng)
  return loss, new


# =========================================================================== the term

OBJECTIVES = ('infonce', 'nce')


@register('crd', family='relation', needs=('student_features', 'teacher_features'),
          batch_level=True,
          reference='Tian et al., Contrastive Representation Distillation, ICLR 2020, '
                    'arXiv:1910.10699')
def crd_term(student: str = 'penultimate', teacher: str = 'penultimate', dim: int = 128,
             temperature: float = 0.07, objective: str = 'infonce', queue_size: int = 0,
             symmetric: bool = True, n_data: int | None = None, nce_k: int = 16384,
             momentum: float = 0.5, dataset_labels=None) -> Term:
  """CRD with learned embedding heads: in-batch InfoNCE (default) or the published NCE.

  Options: ``student``, ``teacher`` (feature names), ``dim`` (``feat_dim``),
  ``temperature`` (``nce_t``), ``objective``:

  * ``'infonce'`` (default): in-batch negatives (:func:`crd_loss`), both directions
    summed unless ``symmetric=False``, or with a FIFO queue of ``queue_size`` past
    teacher embeddings (:func:`crd_queue_loss`) in the term's state. Not on the
    scale of the published loss (use ``'nce'`` for published weights).
  * ``'nce'``: the published CRD (:func:`crd_nce_loss`) with memory banks of
    ``n_data`` rows (required: the training split's size) in the term's state,
    ``nce_k`` negatives (16384), ``momentum`` (``nce_m``, 0.5); negatives uniform, or,
    with ``dataset_labels`` (the ``[n_data]`` labels of the training split), of other
    classes without replacement (RepDistiller's CIFAR-100 loader). It reads each
    example's index in the training split from ``inputs['example_ids']`` (``[B]``
    int). Defaults and value are the reference's: weight 0.8 carries over.
  """
  if objective not in OBJECTIVES:
    raise UserError(f'crd: objective must be one of {OBJECTIVES}; got {objective!r}')
  if objective == 'nce':
    if n_data is None:
      raise UserError("crd: objective='nce' needs n_data, the number of training examples "
                      '(the memory banks have one row per example)')
    if queue_size:
      raise UserError("crd: queue_size is for objective='infonce'; the NCE objective uses "
                      'memory banks')
    labels_np = None if dataset_labels is None else np.asarray(dataset_labels)
    if labels_np is not None and labels_np.shape != (n_data,):
      raise UserError(f'crd: dataset_labels must have one label per training example '
                      f'({n_data}); got shape {labels_np.shape}')

  def pick(inputs):
    return (fi.feature(inputs, 'student', student, 'crd'),
            fi.feature(inputs, 'teacher', teacher, 'crd'))

  def init(rng, inputs):
    s, t = pick(inputs)
    k_params, k_state = jax.random.split(rng)
    params = crd_init(k_params, s.shape, t.shape, dim)
    if objective == 'nce':
      return params, crd_memory_init(k_state, n_data, dim)._asdict()
    return params, (crd_queue_init(queue_size, dim)._asdict() if queue_size else {})

  def apply(params, state, inputs):
    s, t = pick(inputs)
    where = inputs.get('where')
    ex = None if where is None else fi.example_mask(where, s.shape[0])
    if objective == 'nce':
      if inputs.get('example_ids') is None:
        raise UserError("crd: objective='nce' needs inputs['example_ids'], each example's "
                        'index in the training split; the train step must pass the '
                        "batch's 'id' as example_ids")
      memory = MemoryState(**state)
      key, sub = jax.random.split(jax.random.wrap_key_data(memory.rng))
      labels = inputs.get('labels') if labels_np is not None else None
      if labels_np is not None and labels is None:
        raise UserError('crd: dataset_labels needs the batch labels in inputs')
      contrast = crd_sample_negatives(sub, s.shape[0], n_data, nce_k, labels=labels,
                                      dataset_labels=labels_np)
      loss, new = crd_nce_loss(params, memory, s, t, inputs['example_ids'], contrast,
                               temperature=temperature, momentum=momentum, where=ex)
      return loss, new._replace(rng=jax.random.key_data(key))._asdict()
    if not queue_size:
      return crd_loss(params, s, t, temperature=temperature, symmetric=symmetric, where=ex), state
    loss, new = crd_queue_loss(params, QueueState(**state), s, t, temperature=temperature,
                               where=ex)
    return loss, new._asdict()

  return Term(init, apply)
