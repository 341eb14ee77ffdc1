r"""Sparse (top-k) forms of the logit losses, for teachers read from the cache.

The cache stores, per example (or token), the teacher's ``k`` largest raw logits
``teacher_topk_logits [..., k]``, their class indices ``teacher_topk_indices [..., k]``
and the log-sum-exp of *all* its logits at temperature 1, ``teacher_logsumexp [...]``.
The student's logits stay dense ``[..., classes]``; the class axis is the last one.

``missing_mass`` says what the teacher distribution is outside its top-k:

* ``'renormalize'``: the teacher restricted to its top-k classes and renormalized,
  :math:`\tilde p_k = \mathrm{softmax}(z_{1..k}/T)_k`, zero elsewhere. Needs no
  log-sum-exp.
* ``'uniform'``: the top-k probabilities as they are,
  :math:`p_k = \exp(z_k/T - \log Z_T)`, and the rest of the mass
  :math:`r = 1 - \sum_k p_k` spread evenly over the other :math:`C - k` classes.
  Needs ``teacher_logsumexp``.
* ``'zero'``: the top-k probabilities as they are and zero elsewhere. The teacher
  then sums to :math:`1 - r`, so it is **not a distribution**: the "divergences"
  are truncated sums and may be negative. Needs ``teacher_logsumexp``.
* ``'bucket'``: the tail as one class. Both distributions are coarsened to the ``k``
  top classes plus one bin holding the rest (the teacher's :math:`r`, the student's
  :math:`1 - \sum_k q_k`), and the divergence is taken between the coarsened ones: it
  asks the student for the teacher's top-k probabilities and total tail mass and says
  nothing about how the tail is shared, where ``'uniform'`` asks for a flat tail the
  teacher does not have. A lower bound of the full divergence (data processing),
  exact at ``k = C``. Forward and reverse KL; needs ``teacher_logsumexp``.

**Temperature.** At :math:`T = 1`, :math:`\log Z_1` is the cached log-sum-exp and
everything is exact. For :math:`T \ne 1` the partition function
:math:`Z_T = \sum_{j \le k} e^{z_j/T} + \sum_{j > k} e^{z_j/T}` needs the tail logits,
which the cache does not keep: only their total :math:`R_1 = \sum_{j>k} e^{z_j} =
e^{\log Z_1} - \sum_{j \le k} e^{z_j}`. kdjax takes the tail logits to be equal,
:math:`\bar z = \log(R_1/(C-k))` (the flattest tail with that total; it lies below
the smallest top-k logit), so :math:`\sum_{j>k} e^{z_j/T} \approx (C-k)\,e^{\bar z/T}`.
This is exact at :math:`T = 1` and for a flat tail; since :math:`x \mapsto x^{1/T}`
is concave for :math:`T > 1`, it is then an *upper* bound of the true tail mass
(and a lower bound for :math:`T < 1`). In ``'uniform'`` mode each tail class gets
:math:`e^{\bar z/T}/Z_T`, consistent with the same assumption.

With ``k`` equal to the number of classes all three modes equal the dense losses.
The teacher inputs are data: they are not differentiated (``stop_gradient``).

**Infinite logits.** A class whose student logit is infinite (a padded vocabulary)
is not a class: it is left out of the student's softmax, of the tail and of every
sum; a top-k entry whose cached logit is ``-inf`` (``k`` beyond the teacher's real
classes) takes no part either. With the teacher's padded columns ``-inf`` too (so
its log-sum-exp ignores them), every mode then equals the loss on the logits with
those columns removed, and values and gradients stay finite.
"""

from __future__ import annotations

import numbers
from typing import Any

import jax
import jax.numpy as jnp

from kdjax.losses import registry
from kdjax.losses.divergences import gjsd_from_log_probs
from kdjax.losses.logits import HINTON_2015
from kdjax.losses.logits import MINILLM_2024
from kdjax.losses._logit_helpers import ABSENT
from kdjax.losses._logit_helpers import finite_log_softmax
from kdjax.losses._logit_helpers import kl_from_log_probs
from kdjax.losses._logit_helpers import mask_value
from kdjax.losses._logit_helpers import sanitize
from kdjax.losses._logit_helpers import upcast
from kdjax.losses.divergences import FDIV_2023
from kdjax.losses.divergences import GKD_2024

Array = jax.Array

MODES = ('renormalize', 'uniform', 'zero', 'bucket')
# The modes every sparse loss takes ('bucket' only the forward and reverse KL).
BUCKET_LOSSES = ('sparse_kd', 'sparse_reverse_kl')
SPARSE_NEEDS = ('student_logits', 'teacher_topk_logits', 'teacher_topk_indices')


class _Teacher:
  """The tempered sparse teacher: top-k log-probs, tail log-prob, support, the entries
  that take no part (an infinite logit on either side) and the tail classes."""

  def __init__(self, log_p_topk, log_tail, tail_count, indices, num_classes, mode, skip_topk,
               inf_s):
    self.log_p_topk = log_p_topk  # [..., k]
    self.log_tail = log_tail      # [...] log-prob of each tail class ('uniform', 'bucket')
    self.tail_count = tail_count  # [...] tail classes per row (float), 0 when k = C
    self.indices = indices        # [..., k] int
    self.num_classes = num_classes
    self.mode = mode
    self.skip_topk = skip_topk    # [..., k] bool: teacher or student logit infinite
    self.inf_s = inf_s            # [..., C] bool: the student's infinite logits

  def support(self) -> Array:
    """``[..., C]`` bool: True on the top-k classes."""
    shape = self.indices.shape[:-1] + (self.num_classes,)
    return _scatter(jnp.zeros(shape, bool), self.indices, jnp.ones(self.indices.shape, bool))

  def skip(self) -> Array:
    """``[..., C]`` bool: the classes that take no part (an infinite logit)."""
    return jnp.logical_or(self.inf_s, _scatter(jnp.zeros(self.inf_s.shape, bool),
                                               self.indices, self.skip_topk))

  def dense_log_probs(self, fill) -> Array:
    """``[..., C]`` log-probs; the tail gets ``log_tail`` ('uniform') or ``fill``."""
    shape = self.indices.shape[:-1] + (self.num_classes,)
    if self.log_tail is not None and self.mode == 'uniform':
      base = jnp.broadcast_to(self.log_tail[..., None], shape)
    else:
      base = jnp.full(shape, fill, self.log_p_topk.dtype)
    return _scatter(base, self.indices, self.log_p_topk)


def _scatter(base, indices, values):
  """``base`` with ``values`` written at ``indices`` along the last axis."""
  num_classes, k = base.shape[-1], indices.shape[-1]
  rows = 1
  for d in indices.shape[:-1]:
    rows *= d
  flat = base.reshape(rows, num_classes)
  row_ids = jnp.arange(rows)[:, None]
  flat = flat.at[row_ids, indices.reshape(rows, k)].set(values.reshape(rows, k))
  return flat.reshape(base.shape)


def _prepare_sparse(student_logits, topk_logits, topk_indices, temperature, missing_mass,
                    teacher_logsumexp, where):
  if missing_mass not in MODES:
    raise ValueError(f'missing_mass must be one of {MODES}, got {missing_mass!r}')
  s = upcast(student_logits)
  z = jax.lax.stop_gradient(upcast(topk_logits))
  idx = jnp.asarray(topk_indices)
  num_classes, k = s.shape[-1], z.shape[-1]
  if z.shape != idx.shape or z.shape[:-1] != s.shape[:-1] or k > num_classes:
    raise ValueError(f'top-k logits {z.shape} and indices {idx.shape} must share the leading '
                     f'shape of the student logits {s.shape} with k <= classes')
  if where is not None:
    where = jnp.broadcast_to(jnp.asarray(where, bool), s.shape[:-1])
    s = jnp.where(where[..., None], s, 0.0)
    z = jnp.where(where[..., None], z, 0.0)
    idx = jnp.where(where[..., None], idx, jnp.arange(k, dtype=idx.dtype))
  # Infinite logits (padded vocabularies) take no part: the student's are left out of
  # its softmax and of the tail, a top-k entry infinite on either side of everything.
  s, inf_s = sanitize(s)
  z, inf_z = sanitize(z)
  skip_topk = jnp.logical_or(inf_z, jnp.take_along_axis(inf_s, idx, axis=-1))
  absent = jnp.asarray(ABSENT, s.dtype)   # an infinite cached logit: no mass
  temperature = jnp.asarray(temperature, s.dtype)
  zt = jnp.where(inf_z, absent, z / temperature)
  log_tail = None
  tail_count = (jnp.sum(~inf_s, axis=-1) - jnp.sum(
      ~jnp.take_along_axis(inf_s, idx, axis=-1), axis=-1)).astype(s.dtype)
  lse_top_t = jax.nn.logsumexp(zt, axis=-1)
  if missing_mass == 'renormalize' or num_classes == k:
    log_z_t = lse_top_t
  else:
    if teacher_logsumexp is None:
      raise ValueError(f"missing_mass={missing_mass!r} needs teacher_logsumexp (the cache "
                       "stores it); pass it or use missing_mass='renormalize'")
    lse1 = jax.lax.stop_gradient(jnp.broadcast_to(upcast(teacher_logsumexp), s.shape[:-1]))
    top1 = jax.nn.logsumexp(jnp.where(inf_z, absent, z), axis=-1)
    if where is not None:
      lse1 = jnp.where(where, lse1, top1 + 1.0)
    has_tail = tail_count > 0
    # log of the tail's total unnormalized mass at T = 1: lse1 + log(1 - e^(top1 - lse1)).
    gap = jnp.where(has_tail, jnp.minimum(top1 - lse1, 0.0), -1.0)
    log_r1 = lse1 + jnp.log(-jnp.expm1(gap))
    log_count = jnp.log(jnp.maximum(tail_count, 1.0))
    flat_tail_logit = log_r1 - log_count
    log_z_t = jnp.where(has_tail, jnp.logaddexp(lse_top_t,
                                                log_count + flat_tail_logit / temperature),
                        lse_top_t)
    if missing_mass in ('uniform', 'bucket'):
      tiny = jnp.log(jnp.finfo(s.dtype).tiny)
      log_tail = jnp.maximum(flat_tail_logit / temperature - log_z_t, tiny)
  log_p_topk = zt - log_z_t[..., None]
  if num_classes == k:
    tail_count = jnp.zeros_like(tail_count)
  teacher = _Teacher(log_p_topk, log_tail, tail_count, idx, num_classes,
                     'renormalize' if num_classes == k else missing_mass, skip_topk, inf_s)
  log_q = finite_log_softmax(s / temperature, inf_s, -1)
  return log_q, teacher, where, temperature


def _no_bucket(missing_mass) -> None:
  if missing_mass == 'bucket':
    raise ValueError(f"missing_mass='bucket' is for {' and '.join(BUCKET_LOSSES)}; use "
                     "'uniform' or 'renormalize'")


def _gather(x, idx):
  return jnp.take_along_axis(x, idx, axis=-1)


def _bins(log_q, teacher: _Teacher) -> tuple[Array, Array, Array]:
  """'bucket': the teacher's and the student's log tail mass ``[...]`` (the student's
  over its finite classes outside the top k), and whether a row has a tail."""
  log_p_tail = teacher.log_tail + jnp.log(jnp.maximum(teacher.tail_count, 1.0))
  out = jnp.logical_or(teacher.support(), teacher.inf_s)
  has_tail = teacher.tail_count > 0
  log_q_tail = jax.nn.logsumexp(jnp.where(out, ABSENT, log_q), axis=-1)
  return (jnp.where(has_tail, log_p_tail, 0.0), jnp.where(has_tail, log_q_tail, 0.0),
          has_tail)


def _forward_kl(log_q, teacher: _Teacher) -> Array:
  log_q_topk = _gather(log_q, teacher.indices)
  value = kl_from_log_probs(teacher.log_p_topk, log_q_topk, -1, teacher.skip_topk)
  if teacher.mode == 'bucket':
    log_p_tail, log_q_tail, has_tail = _bins(log_q, teacher)
    value = value + jnp.where(has_tail, jnp.exp(log_p_tail) * (log_p_tail - log_q_tail), 0.0)
  if teacher.mode == 'uniform':
    u_log = teacher.log_tail
    u = jnp.exp(u_log)
    # Gathers only: the finite classes' sum minus the top-k's.
    finite_top = ~_gather(teacher.inf_s, teacher.indices)
    tail_log_q = (jnp.sum(jnp.where(teacher.inf_s, 0.0, log_q), axis=-1)
                  - jnp.sum(jnp.where(finite_top, log_q_topk, 0.0), axis=-1))
    value = value + teacher.tail_count * u * u_log - u * tail_log_q
  return value


def _reverse_kl(log_q, teacher: _Teacher) -> Array:
  skip = teacher.skip()
  log_p = teacher.dense_log_probs(0.0)
  if teacher.mode == 'bucket':
    log_q_topk = _gather(log_q, teacher.indices)
    value = kl_from_log_probs(log_q_topk, teacher.log_p_topk, -1, teacher.skip_topk)
    log_p_tail, log_q_tail, has_tail = _bins(log_q, teacher)
    return value + jnp.where(has_tail, jnp.exp(log_q_tail) * (log_q_tail - log_p_tail), 0.0)
  if teacher.mode == 'uniform':
    return kl_from_log_probs(log_q, log_p, -1, skip)
  support = jnp.logical_and(teacher.support(), ~skip)
  if teacher.mode == 'renormalize':
    lse_support = jax.nn.logsumexp(jnp.where(support, log_q, ABSENT), axis=-1, keepdims=True)
    # Off the support log_q - lse can overflow exp(); zero it there (double where).
    log_q = jnp.where(support, log_q - lse_support, 0.0)
  return kl_from_log_probs(log_q, log_p, -1, ~support)


def sparse_kd(student_logits, teacher_topk_logits, teacher_topk_indices, *, temperature=1.0,
              missing_mass: str = 'renormalize', teacher_logsumexp=None, where=None) -> Array:
  r"""Forward KL (:func:`~kdjax.losses.kd`) against a top-k teacher, times T².

  .. math::

    \ell = T^2 \Big[\sum_{j \in \mathrm{top}k} p_j (\log p_j - \log q_j)
            + \sum_{j \notin \mathrm{top}k} u\,(\log u - \log q_j)\Big]

  with :math:`u` the per-class tail probability in ``'uniform'`` mode (the second
  sum is absent for ``'renormalize'`` and ``'zero'``). Computed with gathers only:
  no dense teacher is built. See the module docstring for ``missing_mass`` and
  the temperature.

  Args:
    student_logits: ``[..., classes]``.
    teacher_topk_logits: ``[..., k]`` raw teacher logits (largest first or not).
    teacher_topk_indices: ``[..., k]`` their classes (distinct per row).
    temperature: :math:`T > 0`.
    missing_mass: ``'renormalize'``, ``'uniform'``, ``'zero'`` or ``'bucket'``.
    teacher_logsumexp: ``[...]`` log-sum-exp of all teacher logits at T = 1; needed
      by ``'uniform'``, ``'zero'`` and ``'bucket'`` when ``k < classes``.
    where: optional boolean mask of the per-example shape.

  Returns:
    Per-example loss, float32.

  References:
    Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. 2015.
    arXiv:1503.02531.

  >>> import jax, jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> vals, idx = jax.lax.top_k(t, 3)
  >>> print(sparse_kd(s, vals, idx).round(4))  # k = classes: the dense kd
  [0.1156]
  """
  log_q, teacher, where, temperature = _prepare_sparse(
      student_logits, teacher_topk_logits, teacher_topk_indices, temperature, missing_mass,
      teacher_logsumexp, where)
  return mask_value(where, temperature**2 * _forward_kl(log_q, teacher))


def sparse_reverse_kl(student_logits, teacher_topk_logits, teacher_topk_indices, *,
                      temperature=1.0, missing_mass: str = 'renormalize',
                      teacher_logsumexp=None, where=None) -> Array:
  r"""Reverse KL (:func:`~kdjax.losses.reverse_kl`) against a top-k teacher, times T².

  .. math::

    \ell = T^2 \sum_{j \in S} \hat q_j \big(\log \hat q_j - \log p_j\big)

  Reverse KL is infinite wherever the student has mass and the teacher none, so the
  support :math:`S` and the student :math:`\hat q` depend on the mode:

  * ``'renormalize'``: both distributions are restricted to the teacher's top-k
    classes and renormalized, :math:`T^2\,\mathrm{KL}(\tilde q \| \tilde p)`.
  * ``'uniform'``: the full sum against the teacher with the uniform tail
    (the tail log-probability is floored at ``log(finfo.tiny)``).
  * ``'zero'``: the sum over the top-k classes only,
    :math:`T^2 \sum_{j \in \mathrm{top}k} q_j(\log q_j - \log p_j)`.

  Args:
    student_logits: ``[..., classes]``.
    teacher_topk_logits: ``[..., k]``.
    teacher_topk_indices: ``[..., k]``.
    temperature: :math:`T > 0`.
    missing_mass: ``'renormalize'``, ``'uniform'`` or ``'zero'``.
    teacher_logsumexp: ``[...]``, see :func:`sparse_kd`.
    where: optional boolean mask of the per-example shape.

  Returns:
    Per-example loss, float32.

  References:
    Gu, Dong, Wei, Huang. MiniLLM: Knowledge Distillation of Large Language Models.
    ICLR 2024. arXiv:2306.08543.

  >>> import jax, jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> vals, idx = jax.lax.top_k(t, 3)
  >>> print(sparse_reverse_kl(s, vals, idx).round(4))
  [0.1601]
  """
  log_q, teacher, where, temperature = _prepare_sparse(
      student_logits, teacher_topk_logits, teacher_topk_indices, temperature, missing_mass,
      teacher_logsumexp, where)
  return mask_value(where, temperature**2 * _reverse_kl(log_q, teacher))


def sparse_generalized_jsd(student_logits, teacher_topk_logits, teacher_topk_indices, *,
                           beta=0.5, temperature=1.0, missing_mass: str = 'renormalize',
                           teacher_logsumexp=None, where=None) -> Array:
  r"""Generalized JSD (:func:`~kdjax.losses.generalized_jsd`) against a top-k teacher.

  .. math::

    \ell = T^2\big[\beta\,\mathrm{KL}(p\,\|\,m) + (1-\beta)\,\mathrm{KL}(q\,\|\,m)\big],
    \quad m = \beta p + (1-\beta) q

  For :math:`0 < \beta < 1` the formula is applied to the dense teacher the mode
  defines (zero outside the top-k for ``'renormalize'`` and ``'zero'``, the uniform
  tail for ``'uniform'``): it stays finite because the mixture :math:`m` keeps
  :math:`(1-\beta) q` in the tail. :math:`\beta = 0` is :func:`sparse_kd` and
  :math:`\beta = 1` is :func:`sparse_reverse_kl`, with their conventions. Builds one
  dense ``[..., classes]`` teacher array (the student's logits are dense anyway).

  Args:
    student_logits: ``[..., classes]``.
    teacher_topk_logits: ``[..., k]``.
    teacher_topk_indices: ``[..., k]``.
    beta: :math:`\beta \in [0, 1]`, float or traced scalar.
    temperature: :math:`T > 0`.
    missing_mass: ``'renormalize'``, ``'uniform'`` or ``'zero'``.
    teacher_logsumexp: ``[...]``, see :func:`sparse_kd`.
    where: optional boolean mask of the per-example shape.

  Returns:
    Per-example loss, float32.

  References:
    Agarwal et al. On-Policy Distillation of Language Models: Learning from
    Self-Generated Mistakes. ICLR 2024. arXiv:2306.13649.

  >>> import jax, jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> vals, idx = jax.lax.top_k(t, 3)
  >>> print(sparse_generalized_jsd(s, vals, idx, beta=0.0).round(4))
  [0.1156]
  """
  _no_bucket(missing_mass)
  log_q, teacher, where, temperature = _prepare_sparse(
      student_logits, teacher_topk_logits, teacher_topk_indices, temperature, missing_mass,
      teacher_logsumexp, where)
  log_p = teacher.dense_log_probs(ABSENT)
  skip = teacher.skip()
  if isinstance(beta, numbers.Real):
    beta = float(beta)
    if not 0.0 <= beta <= 1.0:
      raise ValueError(f'beta must be in [0, 1], got {beta}')
    if beta == 0.0:
      value = _forward_kl(log_q, teacher)
    elif beta == 1.0:
      value = _reverse_kl(log_q, teacher)
    else:
      value = gjsd_from_log_probs(log_p, log_q, beta, -1, skip)
  else:
    beta = jnp.asarray(beta, log_q.dtype)
    at_zero, at_one = beta <= 0.0, beta >= 1.0
    interior = gjsd_from_log_probs(log_p, log_q, jnp.where(at_zero | at_one, 0.5, beta), -1,
                                   skip)
    value = jnp.where(at_zero, _forward_kl(log_q, teacher),
                      jnp.where(at_one, _reverse_kl(log_q, teacher), interior))
  return mask_value(where, temperature**2 * value)


def sparse_tvd(student_logits, teacher_topk_logits, teacher_topk_indices, *, temperature=1.0,
               missing_mass: str = 'renormalize', teacher_logsumexp=None,
               where=None) -> Array:
  r"""Total variation distance (:func:`~kdjax.losses.tvd`) against a top-k teacher.

  .. math::

    \ell = \tfrac12\Big[\sum_{j \in \mathrm{top}k} |p_j - q_j|
           + \sum_{j \notin \mathrm{top}k} |u - q_j|\Big]

  with :math:`u = 0` for ``'renormalize'`` and ``'zero'`` (where :math:`p_j` are
  the renormalized, respectively raw, top-k probabilities). No T² factor.

  Args:
    student_logits: ``[..., classes]``.
    teacher_topk_logits: ``[..., k]``.
    teacher_topk_indices: ``[..., k]``.
    temperature: :math:`T > 0`.
    missing_mass: ``'renormalize'``, ``'uniform'`` or ``'zero'``.
    teacher_logsumexp: ``[...]``, see :func:`sparse_kd`.
    where: optional boolean mask of the per-example shape.

  Returns:
    Per-example loss, float32.

  References:
    Wen, Li, Du, Mou. f-Divergence Minimization for Sequence-Level Knowledge
    Distillation. ACL 2023. arXiv:2307.15190.

  >>> import jax, jax.numpy as jnp
  >>> s = jnp.array([[0.0, 0.0, 0.0]]); t = jnp.array([[30.0, 0.0, -1.0]])
  >>> vals, idx = jax.lax.top_k(t, 1)
  >>> print(sparse_tvd(s, vals, idx).round(4))
  [0.6667]
  """
  _no_bucket(missing_mass)
  log_q, teacher, where, _ = _prepare_sparse(
      student_logits, teacher_topk_logits, teacher_topk_indices, temperature, missing_mass,
      teacher_logsumexp, where)
  p = jnp.exp(teacher.dense_log_probs(ABSENT))
  diff = jnp.where(teacher.skip(), 0.0, jnp.abs(p - jnp.exp(log_q)))
  return mask_value(where, 0.5 * jnp.sum(diff, axis=-1))


# --------------------------------------------------------------------------- registry


def sparse_term(loss_fn, **options) -> registry.Term:
  """A stateless term for a sparse loss fed by the cache's top-k inputs."""
  def fn(inputs):
    opts = registry.resolve(options, inputs.get('step', 0))
    return loss_fn(inputs['student_logits'], inputs['teacher_topk_logits'],
                   inputs['teacher_topk_indices'],
                   teacher_logsumexp=inputs.get('teacher_logsumexp'),
                   where=inputs.get('where'), **opts)
  return registry.stateless(fn)


@registry.register('sparse_kd', family='response', reference=HINTON_2015, needs=SPARSE_NEEDS)
def _sparse_kd_term(*, temperature: Any = 1.0,
                    missing_mass: str = 'renormalize') -> registry.Term:
  """Forward KL against a cached top-k teacher (see kdjax.losses.sparse)."""
  return sparse_term(sparse_kd, temperature=temperature, missing_mass=missing_mass)


@registry.register('sparse_reverse_kl', family='response', reference=MINILLM_2024,
                   needs=SPARSE_NEEDS)
def _sparse_reverse_kl_term(*, temperature: Any = 1.0,
                            missing_mass: str = 'renormalize') -> registry.Term:
  """Reverse KL against a cached top-k teacher (see kdjax.losses.sparse)."""
  return sparse_term(sparse_reverse_kl, temperature=temperature, missing_mass=missing_mass)


@registry.register('sparse_generalized_jsd', family='response', reference=GKD_2024,
                   needs=SPARSE_NEEDS)
def _sparse_generalized_jsd_term(*, beta: Any = 0.5, temperature: Any = 1.0,
                                 missing_mass: str = 'renormalize') -> registry.Term:
  """Generalized JSD against a cached top-k teacher (see kdjax.losses.sparse)."""
  return sparse_term(sparse_generalized_jsd, beta=beta, temperature=temperature,
                     missing_mass=missing_mass)


@registry.register('sparse_tvd', family='response', reference=FDIV_2023, needs=SPARSE_NEEDS)
def _sparse_tvd_term(*, temperature: Any = 1.0,
                     missing_mass: str = 'renormalize') -> registry.Term:
  """Total variation distance against a cached top-k teacher (see kdjax.losses.sparse)."""
  return sparse_term(sparse_tvd, temperature=temperature, missing_mass=missing_mass)
