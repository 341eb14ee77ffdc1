"""Schedules for loss weights and temperatures: functions of the training step.

A config value may be a plain number or a mapping that names a schedule::

    weight = 0.9
    temperature = dict(schedule='linear', init=1.0, end=4.0, steps=1000)
    weight = dict(schedule='cosine', init=1.0, end=0.0, steps=2000)
    weight = dict(schedule='warmup', value=1.0, steps=500)         # 0 -> value
    weight = dict(schedule='piecewise', boundaries=[100, 200], values=[1.0, 0.5, 0.1])

Every schedule is a pure function ``step -> float32 scalar`` usable under ``jit``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Callable

import jax.numpy as jnp
import optax

Schedule = Callable[[Any], Any]


def is_schedule_spec(value: Any) -> bool:
  return isinstance(value, Mapping) and 'schedule' in value


def make_schedule(spec: Any) -> Schedule:
  """Returns ``step -> value`` for a number, a callable or a schedule mapping.

  >>> make_schedule(2.0)(10)
  Array(2., dtype=float32)
  >>> float(make_schedule(dict(schedule='linear', init=0.0, end=1.0, steps=10))(5))
  0.5
  """
  if callable(spec):
    return spec
  if isinstance(spec, (int, float)):
    value = float(spec)
    return lambda step: jnp.asarray(value, jnp.float32)
  if not is_schedule_spec(spec):
    raise ValueError(f'not a number or a schedule mapping: {spec!r}')
  spec = dict(spec)
  kind = spec.pop('schedule')
  try:
    if kind == 'constant':
      fn = optax.constant_schedule(float(spec['value']))
    elif kind == 'linear':
      fn = optax.linear_schedule(float(spec['init']), float(spec['end']), int(spec['steps']),
                                 int(spec.get('begin', 0)))
    elif kind == 'cosine':
      init, end = float(spec['init']), float(spec['end'])
      cos = optax.cosine_decay_schedule(1.0, int(spec['steps']), alpha=0.0)
      fn = lambda step: end + (init - end) * cos(step)
    elif kind == 'warmup':
      fn = optax.linear_schedule(0.0, float(spec['value']), int(spec['steps']))
    elif kind == 'piecewise':
      bounds, values = list(spec['boundaries']), [float(v) for v in spec['values']]
      if len(values) != len(bounds) + 1:
        raise ValueError('piecewise needs one more value than boundaries')
      def fn(step):
        idx = jnp.searchsorted(jnp.asarray(bounds), step, side='right')
        return jnp.asarray(values, jnp.float32)[idx]
    else:
      raise ValueError(f'unknown schedule {kind!r}; use constant, linear, cosine, warmup or piecewise')
  except KeyError as e:
    raise ValueError(f'schedule {kind!r} needs the field {e.args[0]!r}') from None
  return lambda step: jnp.asarray(fn(step), jnp.float32)


def epoch_ramp(steps_per_epoch: int, warmup_epochs: int) -> dict:
  """A weight ``min(epoch / warmup_epochs, 1)`` over 1-based epochs, constant within an
  epoch, as a ``piecewise`` step schedule spec (mdistiller's DKD warm-up).

  >>> ramp = epoch_ramp(10, 4)
  >>> ramp['boundaries'], ramp['values']
  ([10, 20, 30], [0.25, 0.5, 0.75, 1.0])
  """
  return {'schedule': 'piecewise',
          'boundaries': [e * steps_per_epoch for e in range(1, warmup_epochs)],
          'values': [e / warmup_epochs for e in range(1, warmup_epochs + 1)]}
