"""The loss registry: config names -> loss terms, and the weighted objective.

A config names its terms::

    loss.terms = {
        'kd': dict(weight=0.9, temperature=4.0),
        'ce': dict(weight=0.1),
        'hint': dict(loss='fitnet', weight=1.0, student='stage2', teacher='stage3'),
    }

Each key is a term name; ``loss`` (default: the key) picks the registered loss;
``weight`` (default 1.0) and any numeric option may be a schedule (see
:mod:`kdjax.losses.schedules`). The remaining options go to the loss's factory.

A registered loss is a *factory* ``factory(**options) -> Term``. A :class:`Term` is
an optax-style pair of pure functions with explicit state:

* ``init(rng, inputs) -> (params, state)``: ``params`` are trained with the
  student (a FitNet projector); ``state`` is carried but not differentiated
  (TAID's interpolation coefficient, a CRD queue). Stateless terms return ``({}, {})``.
* ``apply(params, state, inputs) -> (value, new_state)``: ``value`` is per-example
  (shape of ``inputs['where']``), or a scalar for batch-level losses, or a pair
  ``(per_example_value, where)`` when the term masks examples itself (``ce`` on
  unlabeled examples).

``inputs`` is a mapping of arrays only (losses see no models, data or loop):

=======================  =====================================================
``student_logits``       ``[batch, ..., classes]``
``teacher_logits``       ``[batch, ..., classes]`` (live or dense cache); with a teacher of
                         another tokenizer (``uld``) ``[batch, teacher_tokens, teacher_vocab]``
``teacher_where``        ``[batch, teacher_tokens]`` bool: the teacher's valid positions
                         (``uld``; :class:`kdjax.engine.feed.Retokenizer`)
``teacher_topk_logits``  ``[batch, ..., k]`` with ``teacher_topk_indices`` and
                         ``teacher_logsumexp`` (sparse cache)
``labels``               ``[batch, ...]`` int; ``-1`` marks an unlabeled example
``where``                ``[batch, ...]`` bool; False for padding
``student_features``     ``{name: array}``
``teacher_features``     ``{name: array}``
``student_attentions``   tuple of ``[batch, heads, q, k]`` (attention models)
``teacher_attentions``   likewise
``step``                 int scalar, the optimizer step (for schedules)
=======================  =====================================================
"""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Mapping
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kdjax.losses import schedules

Inputs = Mapping[str, Any]


class Term(NamedTuple):
  """A loss term: ``init(rng, inputs) -> (params, state)`` and
  ``apply(params, state, inputs) -> (value, new_state)``."""

  init: Callable[[jax.Array, Inputs], tuple[Any, Any]]
  apply: Callable[[Any, Any, Inputs], tuple[Any, Any]]


@dataclasses.dataclass(frozen=True)
class LossSpec:
  name: str
  factory: Callable[..., Term]
  family: str
  reference: str
  needs: tuple[str, ...]
  batch_level: bool

  @property
  def summary(self) -> str:
    doc = inspect.getdoc(self.factory) or ''
    return doc.splitlines()[0] if doc else ''


REGISTRY: dict[str, LossSpec] = {}

FAMILIES = (
    'response',       # soft/hard labels, temperature, divergences on logits
    'feature',        # hints, attention maps, hidden states
    'relation',       # pairwise / batch structure
    'sequence',       # token-level and sequence-level for language models
    'progressive',    # curriculum, adaptive interpolation, learned temperature
    'teacher_free',   # self-distillation without a teacher network
    'supervised',     # ground truth only
)


def register(name: str, *, family: str, reference: str,
             needs: tuple[str, ...] = ('student_logits', 'teacher_logits'),
             batch_level: bool = False):
  """Registers ``factory(**options) -> Term`` under ``name``."""
  if family not in FAMILIES:
    raise ValueError(f'unknown family {family!r}; one of {FAMILIES}')

  def decorator(factory):
    if name in REGISTRY:
      # The same definition executed twice (pytest's --doctest-modules with
      # --import-mode=importlib imports a module file a second time) is not a clash.
      if _definition(REGISTRY[name].factory) != _definition(factory):
        raise ValueError(f'loss {name!r} is registered twice')
      return factory
    REGISTRY[name] = LossSpec(name, factory, family, reference, tuple(needs), batch_level)
    return factory

  return decorator


def _definition(factory) -> tuple[str, str]:
  return (getattr(factory, '__module__', ''), getattr(factory, '__qualname__', repr(factory)))


def get(name: str) -> LossSpec:
  _load_catalog()
  if name not in REGISTRY:
    raise KeyError(f'unknown loss {name!r}; known losses: {", ".join(sorted(REGISTRY))}')
  return REGISTRY[name]


def catalog() -> list[LossSpec]:
  """All registered losses, sorted by family then name."""
  _load_catalog()
  return sorted(REGISTRY.values(), key=lambda s: (FAMILIES.index(s.family), s.name))


def _load_catalog() -> None:
  import kdjax.losses  # noqa: F401  (importing the package registers every loss)


# --------------------------------------------------------------------------- helpers

def resolve(options: Mapping[str, Any], step) -> dict[str, Any]:
  """Evaluates schedule-valued options at ``step``; other values pass through."""
  return {k: schedules.make_schedule(v)(step) if schedules.is_schedule_spec(v) else v
          for k, v in options.items()}


def stateless(fn: Callable[..., Any]) -> Term:
  """A term from ``fn(inputs) -> value`` with no params and no state."""
  return Term(init=lambda rng, inputs: ({}, {}),
              apply=lambda params, state, inputs: (fn(inputs), state))


def logit_term(loss_fn: Callable[..., jax.Array], **options) -> Term:
  """A stateless term for a logit loss ``loss_fn(student, teacher, *, where, **options)``.

  Options may be schedules; they are evaluated at ``inputs['step']``.
  """
  def fn(inputs):
    opts = resolve(options, inputs.get('step', 0))
    return loss_fn(inputs['student_logits'], inputs['teacher_logits'],
                   where=_example_where(inputs), **opts)
  return stateless(fn)


def _example_where(inputs: Inputs):
  return inputs.get('where')


# --------------------------------------------------------------------------- objective

class Objective(NamedTuple):
  """The weighted sum of named terms.

  ``init(rng, inputs) -> (params, state)`` with one entry per term;
  ``apply(params, state, inputs) -> (loss, new_state, metrics)`` where ``loss`` is
  the scalar objective and ``metrics`` maps ``'loss/<term>'`` to ``(sum, count)``.
  """

  init: Callable[[jax.Array, Inputs], tuple[dict, dict]]
  apply: Callable[[dict, dict, Inputs], tuple[jax.Array, dict, dict]]
  names: tuple[str, ...]
  needs: frozenset[str]


def build_objective(terms: Mapping[str, Mapping[str, Any]]) -> Objective:
  """Builds the objective from a ``{term_name: options}`` mapping (see module doc)."""
  if not terms:
    raise ValueError('loss.terms is empty: name at least one loss term, e.g. ce')
  built: dict[str, tuple[Term, schedules.Schedule]] = {}
  needs: set[str] = set()
  for term_name, options in terms.items():
    options = dict(options or {})
    spec = get(options.pop('loss', term_name))
    weight = schedules.make_schedule(options.pop('weight', 1.0))
    try:
      term = spec.factory(**options)
    except TypeError as e:
      raise ValueError(f'loss term {term_name!r} ({spec.name}): {e}') from None
    built[term_name] = (term, weight)
    needs.update(spec.needs)
  names = tuple(built)

  def init(rng, inputs):
    params, state = {}, {}
    for i, (name, (term, _)) in enumerate(built.items()):
      params[name], state[name] = term.init(jax.random.fold_in(rng, i), inputs)
    return params, state

  def apply(params, state, inputs):
    step = inputs.get('step', 0)
    total = jnp.zeros((), jnp.float32)
    new_state, metrics = {}, {}
    for name, (term, weight) in built.items():
      value, new_state[name] = term.apply(params[name], state[name], inputs)
      mean, (s, c) = reduce_value(value, inputs.get('where'))
      total = total + weight(step) * mean
      metrics[f'loss/{name}'] = (s, c)
    return total, new_state, metrics

  return Objective(init, apply, names, frozenset(needs))


def reduce_value(value, where=None):
  """Masked mean of a per-example value; returns ``(mean, (sum, count))``.

  A scalar (batch-level loss) counts as one observation.
  """
  if isinstance(value, tuple):
    value, term_where = value
    where = term_where if where is None else jnp.logical_and(
        jnp.broadcast_to(where, term_where.shape), term_where)
  value = jnp.asarray(value, jnp.float32)
  if value.ndim == 0:
    return value, (value, jnp.ones((), jnp.float32))
  if where is None:
    w = jnp.ones(value.shape, jnp.float32)
  else:
    w = jnp.broadcast_to(jnp.asarray(where), value.shape).astype(jnp.float32)
  s = jnp.sum(jnp.where(w > 0, value, 0.0))
  c = jnp.sum(w)
  return s / jnp.maximum(c, 1.0), (s, c)
