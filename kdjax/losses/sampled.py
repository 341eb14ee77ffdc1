r"""Random-Sampling KD: the student's cross-entropy on classes sampled from the teacher.

A sampled teacher cache (:mod:`kdjax.cache.sampled`) keeps, per token, ``N`` classes
:math:`x_1..x_N` drawn i.i.d. from a proposal :math:`q` (the teacher :math:`p`, or the
teacher tempered) and their self-normalized importance weights
:math:`w_n \propto p(x_n)/q(x_n)`, :math:`\sum_n w_n = 1`. Summed per class they are the
paper's sparse target :math:`\hat p_i = c_i (p_i/q_i) / \sum_j c_j (p_j/q_j)` (:math:`c_i`
the count of class :math:`i`), which is :math:`c_i / N` when :math:`q = p`.

Its loss is the student's cross-entropy on that target. Since :math:`E[c_i/N] = p_i`
and the loss is linear in the target, its gradient in the student's logits at
temperature 1, :math:`\mathrm{softmax}(s) - \hat p`, is the forward-KL gradient
:math:`\mathrm{softmax}(s) - p` in expectation (the value is the KL plus the target's
entropy, a constant of the student). With a tempered proposal the self-normalization
makes the estimate consistent but biased at finite :math:`N`.

References:
  Anshumann, Zaidi, Kedia, Ahn, Kwon, Lee, Lee, Lee. Sparse Logit Sampling: Accelerating
  Knowledge Distillation in LLMs. ACL 2025. arXiv:2503.16870.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp

from kdjax.errors import UserError
from kdjax.losses import registry
from kdjax.losses._logit_helpers import finite_log_softmax
from kdjax.losses._logit_helpers import mask_value
from kdjax.losses._logit_helpers import sanitize
from kdjax.losses._logit_helpers import upcast

Array = jax.Array

RSKD_2025 = ('Anshumann, Zaidi, Kedia, Ahn, Kwon, Lee, Lee, Lee. Sparse Logit Sampling: '
             'Accelerating Knowledge Distillation in LLMs. ACL 2025. arXiv:2503.16870')
SAMPLED_NEEDS = ('student_logits', 'teacher_sample_indices', 'teacher_sample_weights')


def sampled_kd(student_logits, sample_indices, sample_weights, *, temperature=1.0,
               where=None) -> Array:
  r"""Random-Sampling KD: cross-entropy of the student on sampled teacher classes, times T².

  .. math::

    \ell = -T^2 \sum_{n=1}^{N} w_n \log \mathrm{softmax}(s / T)_{x_n}
         = -T^2 \sum_i \hat p_i \log \mathrm{softmax}(s / T)_i

  with :math:`x_n` the sampled classes (repeats allowed) and :math:`w_n` their normalized
  importance weights (``1/N`` each when the proposal is the teacher). Its gradient is
  an unbiased estimate of the gradient of :math:`T^2\,\mathrm{KL}(\hat p_{\text{teacher}}
  \,\|\, \mathrm{softmax}(s/T))` with the teacher the weights estimate (see the module
  docstring). Gathers only: no dense teacher is built.

  Args:
    student_logits: ``[..., classes]``.
    sample_indices: ``[..., N]`` int, the sampled classes.
    sample_weights: ``[..., N]`` their weights (summing to one per example).
    temperature: :math:`T > 0`, of the student's softmax.
    where: optional boolean mask of the per-example shape; masked examples give exactly
      zero value and zero gradient.

  Returns:
    Per-example loss, float32 (float64 for float64 logits).

  References:
    Anshumann et al. Sparse Logit Sampling: Accelerating Knowledge Distillation in
    LLMs. ACL 2025. arXiv:2503.16870.

  >>> import jax.numpy as jnp
  >>> s = jnp.log(jnp.array([[0.5, 0.25, 0.25]]))
  >>> print(sampled_kd(s, jnp.array([[0, 0, 1, 1]]), jnp.full((1, 4), 0.25)).round(4))
  [1.0397]
  """
  s = upcast(student_logits)
  idx = jnp.asarray(sample_indices)
  w = jax.lax.stop_gradient(upcast(sample_weights).astype(s.dtype))
  if idx.shape != w.shape or idx.shape[:-1] != s.shape[:-1]:
    raise ValueError(f'sample indices {idx.shape} and weights {w.shape} must share the '
                     f'leading shape of the student logits {s.shape}')
  if where is not None:
    where = jnp.broadcast_to(jnp.asarray(where, bool), s.shape[:-1])
    s = jnp.where(where[..., None], s, 0.0)
    w = jnp.where(where[..., None], w, 0.0)
    idx = jnp.where(where[..., None], idx, 0)
  idx = jnp.clip(idx, 0, s.shape[-1] - 1)
  # Infinite student logits (a padded vocabulary) are not classes: out of the softmax,
  # and a sample on one takes no part.
  s, inf_s = sanitize(s)
  temperature = jnp.asarray(temperature, s.dtype)
  log_q = finite_log_softmax(s / temperature, inf_s, -1)
  w = jnp.where(jnp.take_along_axis(inf_s, idx, axis=-1), 0.0, w)
  ce = -jnp.sum(w * jnp.take_along_axis(log_q, idx, axis=-1), axis=-1)
  return mask_value(where, temperature**2 * ce)


@registry.register('sampled_kd', family='response', reference=RSKD_2025, needs=SAMPLED_NEEDS)
def _sampled_kd_term(*, temperature: Any = 1.0) -> registry.Term:
  """Random-Sampling KD against a sampled teacher cache (see kdjax.losses.sampled)."""
  options = {'temperature': temperature}

  def fn(inputs):
    if 'teacher_sample_indices' not in inputs:
      raise UserError("sampled_kd reads a sampled teacher cache: build one with "
                      "config.cache.mode='sampled' (`kdjax cache build`) and pass "
                      '--config.teacher.cache=DIR')
    opts = registry.resolve(options, inputs.get('step', 0))
    return sampled_kd(inputs['student_logits'], inputs['teacher_sample_indices'],
                      inputs['teacher_sample_weights'], where=inputs.get('where'), **opts)

  return registry.stateless(fn)
