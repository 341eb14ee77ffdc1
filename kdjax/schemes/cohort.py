"""A cohort: K students trained side by side, as one pytree and one set of functions.

Students of one architecture are *stacked*: every parameter, state and optimizer leaf
gets a leading axis of size K, and a per-student function runs once under
``jax.vmap``. Students of different architectures are *listed*: a tuple of K trees,
and a per-student function runs in a Python loop (inside the caller's ``jit``, so still
one program). :meth:`Cohort.map` hides the difference; per-student values of one shape
(logits, losses, metrics) are brought to a leading ``[K]`` axis by :meth:`Cohort.stack`
in both cases.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from kdjax.models import from_config


class Student(NamedTuple):
  """One architecture: its pure ``apply`` and ``init(seed) -> (params, model_state)``
  (both from :func:`kdjax.models.from_config`)."""

  apply: Callable[..., Any]
  init: Callable[..., tuple[Any, Any]]


class Cohort(NamedTuple):
  """K students, stacked (one :class:`Student`, K copies) or listed (K students).

  Attributes:
    students: one student (stacked) or K (listed).
    size: K.

  >>> apply = lambda p, s, x, **kw: (x * p, s)
  >>> c = Cohort((Student(apply, None),), 3)
  >>> out, = c.map(lambda m, p: (m.apply(p, None, 2.0)[0],), jnp.arange(3.0))
  >>> c.stack(out).tolist()
  [0.0, 2.0, 4.0]
  """

  students: tuple[Student, ...]
  size: int

  @property
  def stacked(self) -> bool:
    return len(self.students) == 1

  def map(self, fn: Callable[..., tuple], *trees) -> tuple:
    """``fn(student, *student_k_trees) -> tuple`` for every student.

    ``trees`` are cohort trees (stacked: leading ``[K]`` axis; listed: K-tuples).
    Returns a tuple with one cohort tree per output of ``fn``.
    """
    if self.stacked:
      return jax.vmap(lambda *t: tuple(fn(self.students[0], *t)))(*trees)
    outs = [tuple(fn(s, *(t[k] for t in trees))) for k, s in enumerate(self.students)]
    return tuple(tuple(o[i] for o in outs) for i in range(len(outs[0])))

  def loop(self, fn: Callable[..., tuple], *trees) -> tuple:
    """:meth:`map` as a Python loop even when stacked (the outputs stacked again): for
    functions whose values ``vmap`` would change, such as the models' initializers,
    whose default ``rbg`` random bits differ under ``vmap`` from one seed at a time."""
    outs = [tuple(fn(self.student(k), *(self.take(t, k) for t in trees)))
            for k in range(self.size)]
    per_output = [tuple(o[i] for o in outs) for i in range(len(outs[0]))]
    return tuple(_stack(t) if self.stacked else t for t in per_output)

  def stack(self, tree):
    """A cohort tree of one shape per student as arrays with a leading ``[K]`` axis."""
    if self.stacked:
      return tree
    return _stack(tree)

  def split(self, tree):
    """Arrays with a leading ``[K]`` axis as a cohort tree (the inverse of :meth:`stack`)."""
    if self.stacked:
      return tree
    return tuple(jax.tree.map(lambda a, k=k: a[k], tree) for k in range(self.size))

  def take(self, tree, k: int):
    """Student ``k``'s tree of a cohort tree."""
    if self.stacked:
      return jax.tree.map(lambda a: a[k], tree)
    return tree[k]

  def student(self, k: int) -> Student:
    """Student ``k``'s architecture."""
    return self.students[0 if self.stacked else k]


def _stack(trees: tuple):
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def model_spec(cfg: Any) -> dict:
  """A model config group (``name``, ``kwargs``, ``dtype``) as a plain dict, so that two
  configs of one architecture compare equal.

  >>> model_spec({'name': 'mlp'}) == model_spec({'name': 'mlp', 'kwargs': {}, 'dtype': None})
  True
  """
  plain = cfg.to_dict() if hasattr(cfg, 'to_dict') else dict(cfg)
  kwargs = plain.get('kwargs') or {}
  kwargs = kwargs.to_dict() if hasattr(kwargs, 'to_dict') else dict(kwargs)
  return {'name': plain.get('name'), 'kwargs': _lists(kwargs),
          'dtype': plain.get('dtype') or 'float32'}


def _lists(value):
  if isinstance(value, Mapping):
    return {k: _lists(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [_lists(v) for v in value]
  return value


def make_cohort(models: Sequence[Any], *, num_classes: int, input_shape: Sequence[int],
                stack: bool | None = None) -> Cohort:
  """The cohort of ``models`` (one model config group per student).

  Args:
    models: K model configs (``config.model``-like: ``name``, ``kwargs``, ``dtype``).
    num_classes: every student's outputs.
    input_shape: one example's shape.
    stack: stack the students (one architecture, vmapped) or list them (a loop);
      default: stacked when every config describes the same architecture.

  Raises:
    ValueError: ``stack=True`` with different architectures.
    UserError: a model config :func:`kdjax.models.from_config` refuses.
  """
  specs = [model_spec(m) for m in models]
  same = all(s == specs[0] for s in specs)
  if stack is None:
    stack = same
  if stack and not same:
    raise ValueError('students of different architectures cannot be stacked')

  def build(spec) -> Student:
    apply, init, _ = from_config(spec, num_classes=num_classes, input_shape=input_shape)
    return Student(apply, init)

  if stack:
    return Cohort((build(specs[0]),), len(specs))
  built: dict[str, Student] = {}
  students = []
  for spec in specs:   # one apply per distinct architecture: repeated ones share it
    key = repr(spec)
    if key not in built:
      built[key] = build(spec)
    students.append(built[key])
  return Cohort(tuple(students), len(specs))


def cohort_summary(fitted, size: int, *, resumed_from: int | None, feed: str | None) -> dict:
  """The summary figures of a cohort's run (:meth:`kdjax.engine.loop.Fitted.summary`'s),
  with each member's and the ensemble's evaluation (``student_accuracies``,
  ``student_losses``, ``ensemble_accuracy``, ``ensemble_loss``) and the skipped steps
  counted per member step (``skipped_student_steps``)."""
  summary = fitted.summary(resumed_from=resumed_from, feed=feed)
  summary['skipped_student_steps'] = summary.pop('skipped_steps')
  evaluation = fitted.eval
  summary.update(
      student_accuracies=[evaluation.get(f'student_{k}/accuracy') for k in range(size)],
      student_losses=[evaluation.get(f'student_{k}/loss') for k in range(size)],
      ensemble_accuracy=evaluation.get('ensemble/accuracy'),
      ensemble_loss=evaluation.get('ensemble/loss'))
  return summary
