"""Universal Logit Distillation (ULD): a logit loss across tokenizers.

Every other logit loss in :mod:`kdjax.losses` compares the student's and the teacher's
probability of *the same token*: it needs one vocabulary, and one position of the
teacher per position of the student. A teacher trained with another tokenizer has
neither: its vocabulary has another size and other ids, and the same text is cut into
another number of tokens. ULD (Boizard et al. 2024) drops both requirements:

* **No vocabulary mapping.** Each distribution is sorted in descending order and the
  shorter one is padded with zeros, so the i-th largest student probability is compared
  with the i-th largest teacher probability. With a uniform transport cost between any
  two tokens, the Wasserstein-1 distance between the two distributions has this closed
  form (the L1 distance of the sorted vectors), so nothing about the tokens themselves,
  their strings or ids, is read: any pair of vocabularies works.
* **Index alignment.** The teacher runs on the same text tokenized with its own
  tokenizer (:class:`kdjax.engine.feed.Retokenizer` does it host side). The student's
  valid positions (``where``) and the teacher's (``teacher_where``), each in order, are
  paired by rank: the r-th valid student position with the r-th valid teacher position,
  for ``r`` below the shorter count; the rest of the longer side is dropped.

Limits: index alignment pairs tokens by their rank, not by the text they cover. Where
the two tokenizers cut the text alike the pairs cover the same characters; every extra
split on one side shifts every later pair by one token, so on long rows the pairs drift
apart (a character-level teacher against a BPE student drifts by several characters per
word). Sorting discards which token is likely: the student learns the teacher's
*confidence profile* (how peaked, how heavy-tailed), never its choice of token, which
the cross-entropy on the data (the ``ce`` term) must teach. The paper pairs the two,
``L = CE + λ·ULD``.

Reduction: the registered term returns the per-position distance with the aligned
positions as its mask, so the objective averages over all aligned tokens of the batch
(as every token loss of kdjax does). The authors average each example's aligned tokens,
then the examples; the two agree when every row has the same number of aligned tokens.

References:
  Boizard, El Haddad, Hudelot, Colombo. Towards Cross-Tokenizer Distillation: the
  Universal Logit Distillation Loss for LLMs. 2024. arXiv:2402.12030. Authors' code:
  github.com/Nicolas-BZRD/llm-recipes, ``models/distillation_model.py``
  (``DistillationLoss.forward``: softmax per side with its own temperature, answer
  tokens aligned from their first one, descending sort, zero padding of the smaller
  vocabulary, ``abs(student[:size] - teacher[:size]).sum(-1).mean(-1)`` with ``size``
  the shorter answer); their weight ``distil_factor`` is 1.5 with cross-entropy weight 1
  (``configs/distillation.py`` and the README's example run).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdjax.losses import registry
from kdjax.losses._logit_helpers import finite_log_softmax
from kdjax.losses._logit_helpers import mask_inputs
from kdjax.losses._logit_helpers import sanitize
from kdjax.losses._logit_helpers import upcast

Array = jax.Array

BOIZARD_2024 = ('Boizard, El Haddad, Hudelot, Colombo. Towards Cross-Tokenizer '
                'Distillation: the Universal Logit Distillation Loss for LLMs. 2024. '
                'arXiv:2402.12030')


def sorted_probs(logits, temperature=1.0) -> Array:
  """``softmax(logits / T)`` along the last axis, sorted in descending order.

  Infinite logits (a padded vocabulary's ``-inf`` columns) have no mass: they sort last
  as zeros, with zero gradient.

  >>> print(sorted_probs(jnp.log(jnp.array([0.2, 0.5, 0.3]))).round(3))
  [0.5 0.3 0.2]
  """
  z, inf = sanitize(upcast(logits))
  log_p = finite_log_softmax(z / jnp.asarray(temperature, z.dtype), inf, -1)
  p = jnp.where(inf, jnp.zeros((), log_p.dtype), jnp.exp(log_p))
  return -jnp.sort(-p, axis=-1)


def uld_alignment(where, teacher_where) -> tuple[Array, Array]:
  """ULD's index alignment of the student's positions to the teacher's.

  The valid positions of each side (``where [..., Ts]``, ``teacher_where [..., Tt]``),
  in order, are paired by rank, up to the shorter count.

  Args:
    where: the student's valid positions ``[..., Ts]`` (bool).
    teacher_where: the teacher's ``[..., Tt]``.

  Returns:
    ``(index, aligned)``, both ``[..., Ts]``: the teacher position paired with each
    student position, and whether it has one (a valid student position whose rank is
    below the teacher's valid count). ``index`` is 0 where ``aligned`` is False.

  >>> index, aligned = uld_alignment(jnp.array([False, True, True, True]),
  ...                                jnp.array([True, False, True]))
  >>> index.tolist(), aligned.tolist()
  ([0, 0, 2, 0], [False, True, True, False])
  """
  where = jnp.asarray(where, bool)
  teacher_where = jnp.asarray(teacher_where, bool)
  rank = jnp.cumsum(where, axis=-1) - 1                        # rank of each valid position
  count = jnp.sum(teacher_where, axis=-1, keepdims=True)
  # The teacher's valid positions first, in order (a stable sort on "not valid").
  order = jnp.argsort(jnp.logical_not(teacher_where), axis=-1, stable=True)
  aligned = jnp.logical_and(where, rank < count)
  safe = jnp.clip(rank, 0, teacher_where.shape[-1] - 1)
  index = jnp.take_along_axis(order, safe, axis=-1)
  return jnp.where(aligned, index, 0), aligned


def uld_loss(student_logits, teacher_logits, *, where=None, teacher_where=None,
             student_temperature: Any = 1.0, teacher_temperature: Any = 1.0) -> Array:
  r"""Universal Logit Distillation: L1 distance of the sorted distributions.

  For a student position :math:`i` paired with teacher position :math:`j`, with
  :math:`\tilde p^{s}_i, \tilde p^{t}_j` the tempered softmaxes sorted in descending
  order and zero-padded to the larger vocabulary :math:`V = \max(V_s, V_t)`:

  .. math::

    \mathrm{ULD}_i = \sum_{k=1}^{V} \big| \tilde p^{s}_{i,k} - \tilde p^{t}_{j,k} \big|

  (the Wasserstein-1 distance under a uniform cost). Without ``teacher_where`` the
  teacher's positions are the student's (same leading shape, any vocabularies); with
  it, positions are paired by :func:`uld_alignment` (the time axis is the last one
  before the vocabulary).

  Args:
    student_logits: ``[..., Ts, Vs]`` (or ``[..., Vs]`` without ``teacher_where``).
    teacher_logits: ``[..., Tt, Vt]`` (or ``[..., Vt]``).
    where: the student's valid positions ``[..., Ts]``; default all.
    teacher_where: the teacher's valid positions ``[..., Tt]``; None: position-wise.
    student_temperature: the student's softmax temperature (the authors' default 1).
    teacher_temperature: the teacher's.

  Returns:
    The distance at each student position ``[..., Ts]``; zero where it is masked or
    has no teacher position.

  References:
    Boizard et al. 2024, arXiv:2402.12030; github.com/Nicolas-BZRD/llm-recipes,
    ``models/distillation_model.py``.

  >>> s = jnp.log(jnp.array([[0.7, 0.2, 0.1]]))
  >>> t = jnp.log(jnp.array([[0.1, 0.5, 0.4, 0.0]]))   # another vocabulary, 4 tokens
  >>> round(float(uld_loss(s, t)[0]), 4)               # |.7-.5| + |.2-.4| + |.1-.1|
  0.4
  """
  student_logits, teacher_logits = upcast(student_logits), upcast(teacher_logits)
  lead = student_logits.shape[:-1]
  where = jnp.ones(lead, bool) if where is None else jnp.broadcast_to(jnp.asarray(where, bool),
                                                                      lead)
  if teacher_where is None:
    if teacher_logits.shape[:-1] != lead:
      raise ValueError(f'student logits {student_logits.shape} and teacher logits '
                       f'{teacher_logits.shape} differ in positions; pass teacher_where to '
                       'align them by index')
    valid, teacher_valid = where, where
  else:
    teacher_valid = jnp.asarray(teacher_where, bool)
    index, valid = uld_alignment(where, teacher_valid)
  # The double-where: masked rows are zeros before the softmax (no NaN reaches a gradient).
  s = sorted_probs(mask_inputs(where, -1, student_logits)[0], student_temperature)
  t = sorted_probs(mask_inputs(teacher_valid, -1, teacher_logits)[0], teacher_temperature)
  if teacher_where is not None:
    t = jnp.take_along_axis(t, index[..., None], axis=-2)
  width = max(s.shape[-1], t.shape[-1])
  pad = lambda a: jnp.pad(a, [(0, 0)] * (a.ndim - 1) + [(0, width - a.shape[-1])])
  distance = jnp.sum(jnp.abs(pad(s) - pad(t)), axis=-1)
  return jnp.where(valid, distance, jnp.zeros((), distance.dtype))


@registry.register('uld', family='sequence', reference=BOIZARD_2024)
def _uld_term(*, student_temperature: Any = 1.0, teacher_temperature: Any = 1.0
              ) -> registry.Term:
  """Universal Logit Distillation: sorted-probability L1, across tokenizers (ULD)."""
  def fn(inputs):
    opts = registry.resolve(dict(student_temperature=student_temperature,
                                 teacher_temperature=teacher_temperature),
                            inputs.get('step', 0))
    where, teacher_where = inputs.get('where'), inputs.get('teacher_where')
    value = uld_loss(inputs['student_logits'], inputs['teacher_logits'], where=where,
                     teacher_where=teacher_where, **opts)
    if teacher_where is None:
      return value
    lead = value.shape
    w = jnp.ones(lead, bool) if where is None else jnp.broadcast_to(jnp.asarray(where, bool),
                                                                    lead)
    return value, uld_alignment(w, teacher_where)[1]   # averaged over aligned tokens only
  return registry.stateless(fn)
