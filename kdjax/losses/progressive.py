"""Stateful response losses: adaptive interpolation (TAID) and learned temperature (CTKD).

Both follow the optax shape through :class:`kdjax.losses.registry.Term`: explicit
``params`` (trained with the student) and ``state`` (carried, not differentiated),
no hidden globals. The pure per-step losses are exported too.
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from kdjax.losses import registry
from kdjax.losses._logit_helpers import entropy_from_log_probs
from kdjax.losses._logit_helpers import kl_from_log_probs
from kdjax.losses._logit_helpers import mask_value
from kdjax.losses._logit_helpers import prepare
from kdjax.losses._logit_helpers import sanitize
from kdjax.losses._logit_helpers import tempered_log_probs
from kdjax.losses._logit_helpers import upcast
from kdjax.losses.logits import kd

Array = jax.Array

TAID_2025 = ('Shing, Misaki, Bao, Yokoi, Akiba. TAID: Temporally Adaptive Interpolated '
             'Distillation for Efficient Knowledge Transfer in Language Models. ICLR 2025. '
             'arXiv:2501.16937')
CTKD_2023 = ('Li, Li, Yang, Chen, Shi, Song, Lu, Yang. Curriculum Temperature for Knowledge '
             'Distillation. AAAI 2023. arXiv:2211.16231')

# --------------------------------------------------------------------------- taid


def taid(student_logits, teacher_logits, *, interpolation, temperature=1.0, where=None,
         axis: int = -1) -> Array:
  r"""TAID's loss at a given interpolation coefficient :math:`t`.

  The target is a time-dependent mix of the (frozen) student and the teacher in
  logit space:

  .. math::

    p_t = \mathrm{softmax}\Big(\frac{(1-t)\,\mathrm{sg}(s) + t\,z}{T}\Big),\qquad
    \ell = T^2\,\mathrm{KL}\big(p_t \,\|\, \mathrm{softmax}(s/T)\big)

  with :math:`s` the student logits, :math:`z` the teacher's and :math:`\mathrm{sg}`
  ``stop_gradient``. :math:`t = 1` is plain :func:`~kdjax.losses.kd`; the adaptive
  schedule of :math:`t` is :func:`taid_update` (or the registered ``taid`` term).

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    interpolation: :math:`t \in [0, 1]`, a float or traced scalar.
    temperature: :math:`T > 0`.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Shing, Misaki, Bao, Yokoi, Akiba. TAID: Temporally Adaptive Interpolated
    Distillation for Efficient Knowledge Transfer in Language Models. ICLR 2025.
    arXiv:2501.16937.

  >>> import jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> print(taid(s, t, interpolation=0.0).round(4), taid(s, t, interpolation=1.0).round(4))
  [0.] [0.1156]
  """
  kl, _, where = _taid_parts(student_logits, teacher_logits, interpolation, temperature,
                            where, axis)
  return mask_value(where, kl)


def _taid_parts(student_logits, teacher_logits, interpolation, temperature, where, axis):
  """``(T² KL(p_t || q), T² H(p_t), where)`` per example; their sum is the reference's
  cross-entropy. An entry where either logit is infinite takes no part."""
  s, t, where, axis = prepare(student_logits, teacher_logits, where, axis)
  (s0, inf_s), (t0, inf_t) = sanitize(s), sanitize(t)
  skip = jnp.logical_or(inf_s, inf_t)
  mix = jnp.asarray(interpolation, s.dtype)
  target = (1.0 - mix) * jax.lax.stop_gradient(s0) + mix * t0
  target = jnp.where(skip, -jnp.inf, target)   # a mixture with an infinite side has no mass
  lp = tempered_log_probs(s, target, temperature, axis)
  t2 = lp.temperature**2
  kl = t2 * kl_from_log_probs(lp.log_p, lp.log_q, axis, lp.skip)
  entropy = t2 * entropy_from_log_probs(lp.log_p, axis, lp.skip)
  return kl, entropy, where


class TAIDState(NamedTuple):
  """TAID's carried quantities: ``t``, the momentum of the relative loss change and
  the previous step's loss (``-1`` before the first step)."""

  interpolation: Array
  momentum: Array
  prev_loss: Array


def taid_init(t_start: float = 0.4) -> TAIDState:
  """The state before the first step: ``t = t_start``, zero momentum."""
  return TAIDState(jnp.asarray(t_start, jnp.float32), jnp.zeros((), jnp.float32),
                   -jnp.ones((), jnp.float32))


def taid_update(state: TAIDState, loss, step, *, total_steps: int, t_start: float = 0.4,
                t_end: float = 1.0, alpha: float = 5e-4, beta: float = 0.99,
                eps: float = 1e-15) -> TAIDState:
  r"""One adaptive update of TAID's interpolation coefficient, after step ``step``.

  With :math:`J_n` the batch loss of step :math:`n` (the first call only records
  :math:`J_0`: :math:`t` and the momentum stay as they are):

  .. math::

    \delta_n &= (J_{n-1} - J_n) / (J_{n-1} + \epsilon)\\
    m_n &= \beta\,m_{n-1} + (1-\beta)\,\delta_n\\
    t_{n+1} &= \min\Big(t_{\mathrm{end}},\ \max\big(t^{\mathrm{lin}}_n,\
               t_n + \alpha\,\sigma(m_n)\,(1 - t_n)\big)\Big)

  where :math:`t^{\mathrm{lin}}_n = t_{\mathrm{start}} + (t_{\mathrm{end}} -
  t_{\mathrm{start}})\min(n / N, 1)` is the linear floor over ``total_steps``
  :math:`N`: :math:`t` moves faster while the loss is falling fast, and never lags
  the linear schedule. This is the authors' ``TAID.update_t`` (SakanaAI/TAID,
  ``src/distil_losses/taid.py``; ``step`` is its ``global_step``, the number of
  steps done before this one), fed by the registered term with the same loss value
  (the cross-entropy, see there).

  Args:
    state: the current :class:`TAIDState`.
    loss: the scalar loss :math:`J_n` of this step (not differentiated).
    step: the step index :math:`n` (int scalar).
    total_steps: :math:`N`.
    t_start: :math:`t` at step 0.
    t_end: the final :math:`t`.
    alpha: the adaptive step size :math:`\alpha`.
    beta: the momentum :math:`\beta`.
    eps: :math:`\epsilon`.

  Returns:
    The next :class:`TAIDState`.

  References:
    Shing, Misaki, Bao, Yokoi, Akiba. TAID: Temporally Adaptive Interpolated
    Distillation for Efficient Knowledge Transfer in Language Models. ICLR 2025.
    arXiv:2501.16937 (the adaptive update of t).

  >>> s = taid_update(taid_init(0.4), 2.0, 0, total_steps=10)  # records the loss only
  >>> print(round(float(s.interpolation), 4), float(s.prev_loss))
  0.4 2.0
  >>> s = taid_update(s, 1.0, 1, total_steps=10)
  >>> print(round(float(s.interpolation), 4))  # the linear floor: 0.4 + 0.6 / 10
  0.46
  """
  loss = jax.lax.stop_gradient(jnp.asarray(loss, jnp.float32))
  has_prev = state.prev_loss >= 0
  delta = (state.prev_loss - loss) / (state.prev_loss + eps)
  momentum = beta * state.momentum + (1.0 - beta) * delta
  t = state.interpolation
  adaptive = t + alpha * jax.nn.sigmoid(momentum) * (1.0 - t)
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / float(total_steps), 0.0, 1.0)
  linear = t_start + (t_end - t_start) * progress
  t_next = jnp.minimum(jnp.maximum(linear, adaptive), t_end)
  t_next = jnp.where(has_prev, t_next, t)
  momentum = jnp.where(has_prev, momentum, state.momentum)
  return TAIDState(t_next.astype(jnp.float32), momentum.astype(jnp.float32), loss)


@registry.register('taid', family='progressive', reference=TAID_2025)
def _taid_term(*, total_steps: int, t_start: float = 0.4, t_end: float = 1.0,
               alpha: float = 5e-4, beta: float = 0.99,
               temperature: Any = 1.0) -> registry.Term:
  r"""TAID: KL to an adaptive interpolation between the student and the teacher.

  The per-example value is :func:`taid` (a KL); :math:`t` is updated after each step
  by :func:`taid_update` from the batch mean of the cross-entropy
  :math:`-T^2\sum p_t \log q` (the KL plus the target's entropy), the loss value
  the authors' code feeds its update.
  """
  if not 0.0 <= t_start < 1.0 or not 0.0 < t_end <= 1.0 or t_start > t_end:
    raise ValueError(f'taid needs 0 <= t_start <= t_end <= 1, got {t_start}, {t_end}')

  def init(rng, inputs):
    del rng, inputs
    return {}, taid_init(t_start)

  def apply(params, state, inputs):
    del params
    step = inputs.get('step', 0)
    opts = registry.resolve(dict(temperature=temperature), step)
    where = inputs.get('where')
    kl, entropy, example_where = _taid_parts(
        inputs['student_logits'], inputs['teacher_logits'], state.interpolation,
        opts['temperature'], where, -1)
    value = mask_value(example_where, kl)
    cross_entropy, _ = registry.reduce_value(mask_value(example_where, kl + entropy), where)
    new_state = taid_update(state, cross_entropy, step, total_steps=total_steps,
                            t_start=t_start, t_end=t_end, alpha=alpha, beta=beta)
    return value, new_state

  return registry.Term(init, apply)


# --------------------------------------------------------------------------- ctkd


@jax.custom_vjp
def gradient_reversal(x, scale):
  """Identity forward; multiplies the incoming gradient by ``-scale`` backward.

  >>> import jax
  >>> print(jax.grad(lambda x: 3.0 * gradient_reversal(x, 0.5))(1.0))
  -1.5
  """
  del scale
  return x


def _gradient_reversal_fwd(x, scale):
  return x, scale


def _gradient_reversal_bwd(scale, g):
  return (-scale * g, jnp.zeros_like(scale))


gradient_reversal.defvjp(_gradient_reversal_fwd, _gradient_reversal_bwd)


def ctkd_temperature(param, *, t_min: float = 1.0, t_max: float = 21.0) -> Array:
  r"""The learnable temperature, kept in range: :math:`T = T_{\min} + (T_{\max} -
  T_{\min})\,\sigma(\theta)`."""
  return t_min + (t_max - t_min) * jax.nn.sigmoid(upcast(param))


def ctkd_temperature_param(t_init: float, *, t_min: float = 1.0, t_max: float = 21.0) -> float:
  """The raw parameter :math:`\\theta` with ``ctkd_temperature(theta) == t_init``."""
  if not t_min < t_init < t_max:
    raise ValueError(f'ctkd needs t_min < t_init < t_max, got {t_min}, {t_init}, {t_max}')
  frac = (t_init - t_min) / (t_max - t_min)
  return math.log(frac / (1.0 - frac))


def ctkd_reversal(step, *, curriculum_steps: int, lambda_min: float = 0.0,
                  lambda_max: float = 1.0) -> Array:
  r"""CTKD's curriculum of the reversal strength (cosine ramp, then constant).

  .. math::

    \lambda_n = \lambda_{\min} + \tfrac12(\lambda_{\max} - \lambda_{\min})
                \big(1 + \cos((1 + \min(n/N, 1))\,\pi)\big)

  >>> print(float(ctkd_reversal(0, curriculum_steps=10)),
  ...       float(ctkd_reversal(10, curriculum_steps=10)))
  0.0 1.0
  """
  progress = jnp.clip(jnp.asarray(step, jnp.float32) / float(curriculum_steps), 0.0, 1.0)
  return lambda_min + 0.5 * (lambda_max - lambda_min) * (1.0 + jnp.cos((1.0 + progress) * jnp.pi))


def ctkd(student_logits, teacher_logits, *, temperature_param, reversal, t_min: float = 1.0,
         t_max: float = 21.0, where=None, axis: int = -1) -> Array:
  r"""Curriculum temperature KD: :func:`~kdjax.losses.kd` at an adversarial temperature.

  .. math::

    \ell = T^2\,\mathrm{KL}\big(\mathrm{softmax}(t/T) \,\|\, \mathrm{softmax}(s/T)\big),
    \qquad T = \mathrm{GRL}_\lambda\big(T_{\min} + (T_{\max} - T_{\min})\,\sigma(\theta)\big)

  The gradient reversal layer :math:`\mathrm{GRL}_\lambda` is the identity forward
  and multiplies the gradient by :math:`-\lambda` backward, so one descent step on
  :math:`\ell` moves the student to *decrease* the loss and the temperature
  parameter :math:`\theta` to *increase* it (the temperature makes the task harder
  as :math:`\lambda` grows along :func:`ctkd_reversal`).

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: same shape.
    temperature_param: :math:`\theta`, the trainable scalar.
    reversal: :math:`\lambda \ge 0`.
    t_min: lower bound of the temperature.
    t_max: upper bound of the temperature.
    where: optional boolean mask of the per-example shape.
    axis: the class axis.

  Returns:
    Per-example loss, float32.

  References:
    Li, Li, Yang, Chen, Shi, Song, Lu, Yang. Curriculum Temperature for Knowledge
    Distillation. AAAI 2023. arXiv:2211.16231.

  >>> import jax, jax.numpy as jnp
  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> theta = ctkd_temperature_param(4.0)
  >>> g = jax.grad(lambda th: ctkd(s, t, temperature_param=th, reversal=1.0).sum())(theta)
  >>> bool(g * jax.grad(lambda th: kd(s, t, temperature=ctkd_temperature(th)).sum())(theta) < 0)
  True
  """
  temperature = ctkd_temperature(temperature_param, t_min=t_min, t_max=t_max)
  temperature = gradient_reversal(temperature, jnp.asarray(reversal, temperature.dtype))
  return kd(student_logits, teacher_logits, temperature=temperature, where=where, axis=axis)


@registry.register('ctkd', family='progressive', reference=CTKD_2023)
def _ctkd_term(*, curriculum_steps: int, t_init: float = 4.0, t_min: float = 1.0,
               t_max: float = 21.0, lambda_min: float = 0.0,
               lambda_max: float = 1.0) -> registry.Term:
  """CTKD: KD at a learnable temperature trained adversarially with a curriculum."""
  theta0 = ctkd_temperature_param(t_init, t_min=t_min, t_max=t_max)

  def init(rng, inputs):
    del rng, inputs
    params = {'temperature': jnp.asarray(theta0, jnp.float32)}
    state = {'temperature': jnp.asarray(t_init, jnp.float32),
             'reversal': jnp.asarray(lambda_min, jnp.float32)}
    return params, state

  def apply(params, state, inputs):
    del state
    reversal = ctkd_reversal(inputs.get('step', 0), curriculum_steps=curriculum_steps,
                             lambda_min=lambda_min, lambda_max=lambda_max)
    value = ctkd(inputs['student_logits'], inputs['teacher_logits'],
                 temperature_param=params['temperature'], reversal=reversal, t_min=t_min,
                 t_max=t_max, where=inputs.get('where'))
    temperature = ctkd_temperature(params['temperature'], t_min=t_min, t_max=t_max)
    new_state = {'temperature': jax.lax.stop_gradient(temperature), 'reversal': reversal}
    return value, new_state

  return registry.Term(init, apply)
