r"""Multi-teacher distillation: one student from several frozen teachers, whose
predictions are mapped into the student's label space and combined per example.

Teacher :math:`m` (a finished ``kdjax train`` workdir, any architecture, trained on
any split of a data set with the student's inputs) gives tempered probabilities
:math:`p_m^T = \mathrm{softmax}(t_m / T)` over its own :math:`C_m` classes. Its
``label_map`` :math:`\pi_m` sends each teacher class to a student class, or to
:math:`-1` (dropped); the probabilities are summed into the student's classes and
renormalised over the kept ones (:func:`map_probabilities`):

.. math::

  \tilde p_{m,c} = \frac{\sum_{j:\,\pi_m(j) = c} p_{m,j}}
                        {\sum_{j:\,\pi_m(j) \ne -1} p_{m,j}}

(no map: the identity, and the teacher must have the student's classes). The
combined target is :math:`\bar p = \sum_m w_m(x)\,\tilde p_m^T`
(:func:`combine_teachers`), with weights by ``config.scheme.combine``:

* ``'average'``: :math:`w_m = 1/M`, the mean of the tempered probabilities.
* ``'confidence'`` (:func:`confidence_weights`, on the teachers' mapped probabilities
  at :math:`T = 1`, under ``stop_gradient``): ``confidence='ca_mkd'`` (default)
  transcribes CA-MKD's weights from each teacher's cross-entropy with the label,
  :math:`w_m = \frac{1}{M-1}\big(1 - \mathrm{softmax}_m(\mathrm{CE}_m)\big)`
  (uniform on unlabeled examples; :math:`M = 1`: 1); ``confidence='max_prob'`` takes
  each teacher's largest probability, normalised, :math:`w_m = \max_c \tilde p_{m,c} /
  \sum_j \max_c \tilde p_{j,c}`, which needs no label.
* ``'gate'``: :math:`w(x) = \mathrm{softmax}(\mathrm{gate}(x))`, the small network of
  :func:`kdjax.schemes.online.gate_apply` on the student's (flattened) input, trained
  jointly with the student by the distillation loss below (the choice the brief
  names: the gate then favours the teachers the student agrees with; it starts
  uniform, i.e. at ``'average'``).

The student minimizes its label loss (``config.loss.terms``, which must not read a
teacher) plus ``config.scheme.weight`` times
:math:`T^2\,\mathrm{KL}(\bar p \,\|\, \mathrm{softmax}(s / T))` (:func:`kd_from_probs`).
The teachers run inside the jitted step, forward only, under ``stop_gradient``, on
the same augmented batch as the student (one composite teacher in the engine's
:class:`~kdjax.engine.feed.Feed`); they are not checkpointed.

References:
  Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. 2015.
  arXiv:1503.02531 (the tempered KD loss; the mean of an ensemble's predictions).
  Zhang, Chen, Wang. Confidence-Aware Multi-Teacher Knowledge Distillation. ICASSP
  2022. arXiv:2201.00007 (CA-MKD: per-example teacher weights from their
  cross-entropy with the labels, :math:`w = (1 - \mathrm{softmax}(\mathrm{CE})) /
  (M - 1)`).
"""

from __future__ import annotations

import copy
import hashlib
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import data as kdata
from kdjax import teacher as teacher_lib
from kdjax import workdir as workdir_lib
from kdjax.config import check_int
from kdjax.config import check_number
from kdjax.config import from_dict
from kdjax.config import with_defaults
from kdjax.engine import metrics as metrics_lib
from kdjax.engine.config import validate
from kdjax.engine.evaluate import make_evaluator
from kdjax.engine.loop import write_summary
from kdjax.engine.setup import Data
from kdjax.engine.setup import Setup
from kdjax.engine.setup import setup
from kdjax.engine.state import TrainState
from kdjax.engine.step import NONFINITE
from kdjax.engine.step import accuracy
from kdjax.engine.step import guard_nonfinite
from kdjax.errors import UserError
from kdjax.models import ModelOutput
from kdjax.models import from_config
from kdjax.models.base import model_kwargs
from kdjax.models.base import objective_inputs
from kdjax.models.base import sample_inputs
from kdjax.losses import reduce_value
from kdjax.schemes.online import IDENTITY
from kdjax.schemes.online import check_label_objective
from kdjax.schemes.online import fit_run
from kdjax.schemes.online import gate_apply
from kdjax.schemes.online import init_gate
from kdjax.schemes.online import log_line
from kdjax.schemes.online import with_step

NAME = 'multi_teacher'
COMBINE = ('average', 'confidence', 'gate')
CONFIDENCE = ('ca_mkd', 'max_prob')
# config.scheme's fields and their defaults (teachers: [{'workdir': DIR, 'label_map':
# None | [student class or -1 per teacher class]}, ...]).
DEFAULTS = {'name': NAME, 'teachers': [], 'combine': 'average', 'confidence': 'ca_mkd',
            'temperature': 4.0, 'weight': 0.9, 'gate_hidden': 0}
TEACHER_FIELDS = ('workdir', 'label_map')


def multi_teacher_scheme(teachers: Sequence[Any] = (), **options) -> ml_collections.ConfigDict:
  """``config.scheme`` for multi-teacher KD: :data:`DEFAULTS` with ``options`` over them;
  ``teachers`` as workdirs or ``{'workdir', 'label_map'}`` mappings.

  >>> s = multi_teacher_scheme(['/t1', {'workdir': '/t2', 'label_map': [1, 0]}])
  >>> [t['label_map'] for t in s.teachers]
  [None, [1, 0]]
  """
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown multi-teacher options {sorted(unknown)}; use '
                     f'{", ".join(DEFAULTS)}')
  entries = [dict(t) if hasattr(t, 'get') else {'workdir': t} for t in teachers]
  entries = [{'workdir': e.get('workdir'), 'label_map': e.get('label_map')} for e in entries]
  return ml_collections.ConfigDict({**DEFAULTS, **options, 'teachers': entries})


def multi_teacher_options(config: ml_collections.ConfigDict) -> dict:
  """``config.scheme`` checked, with :data:`DEFAULTS` for the fields it leaves out;
  ``teachers`` as a list of ``{'workdir': str, 'label_map': list[int] | None}``.

  Raises:
    UserError: an unknown field; no teacher, or a teacher entry without a workdir or
      with unknown keys; an unknown combination rule or confidence measure; a
      temperature that is not positive; a negative weight or gate width; a teacher
      named in ``config.teacher`` as well.

  >>> multi_teacher_options(ml_collections.ConfigDict({'scheme': {'name': NAME}}))
  Traceback (most recent call last):
  kdjax.errors.UserError: config.scheme.teachers is empty; list the teacher workdirs, e.g. --config.scheme.teachers="[{'workdir': 'workdirs/teacher'}, {'workdir': 'workdirs/teacher_mlp'}]"
  """
  options = with_defaults(config.scheme, DEFAULTS, dotted='scheme', what='a multi_teacher option')
  teachers = options['teachers']
  if not isinstance(teachers, (list, tuple)) or not teachers:
    raise UserError('config.scheme.teachers is empty; list the teacher workdirs, e.g. '
                    '--config.scheme.teachers="[{\'workdir\': \'workdirs/teacher\'}, '
                    '{\'workdir\': \'workdirs/teacher_mlp\'}]"')
  entries = []
  for i, t in enumerate(teachers):
    t = t.to_dict() if hasattr(t, 'to_dict') else t
    if isinstance(t, str):
      t = {'workdir': t}
    if not isinstance(t, dict) or not isinstance(t.get('workdir'), str) or not t['workdir'] \
        or set(t) - set(TEACHER_FIELDS):
      raise UserError(f'config.scheme.teachers[{i}] must be a mapping with a workdir and an '
                      f"optional label_map, such as {{'workdir': 'workdirs/teacher', "
                      f"'label_map': None}}; got {t!r}")
    label_map = t.get('label_map')
    if label_map is not None and (not isinstance(label_map, (list, tuple)) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in label_map)):
      raise UserError(f'config.scheme.teachers[{i}].label_map must be None or a list of '
                      f'integers (a student class, or -1 to drop, per teacher class); '
                      f'got {label_map!r}')
    entries.append({'workdir': t['workdir'],
                    'label_map': None if label_map is None else [int(v) for v in label_map]})
  if options['combine'] not in COMBINE:
    raise UserError(f'config.scheme.combine {options["combine"]!r} is not a combination rule; '
                    f'use one of: {", ".join(COMBINE)}')
  if options['confidence'] not in CONFIDENCE:
    raise UserError(f'config.scheme.confidence {options["confidence"]!r} is not a confidence '
                    f'measure; use one of: {", ".join(CONFIDENCE)}')
  checked = ml_collections.ConfigDict({'scheme': {k: options[k] for k in (
      'temperature', 'weight', 'gate_hidden')}})
  check_number(checked, 'scheme.temperature', lambda v: v > 0, 'positive')
  check_number(checked, 'scheme.weight', lambda v: v >= 0, '>= 0')
  check_int(checked, 'scheme.gate_hidden', 0)
  options.update(teachers=entries, temperature=float(options['temperature']),
                 weight=float(options['weight']), gate_hidden=int(options['gate_hidden']))
  return options


# --------------------------------------------------------------------------- label maps

def check_label_maps(teacher_classes: Sequence[int], label_maps: Sequence, num_classes: int
                     ) -> None:
  """Refuses teachers whose classes cannot be brought to the student's ``num_classes``.

  Args:
    teacher_classes: each teacher's number of classes.
    label_maps: each teacher's ``label_map`` (None: the identity).
    num_classes: the student's classes.

  Raises:
    UserError: a teacher without a map whose classes differ from the student's (or
      teachers that differ among themselves), a map whose length is not its teacher's
      classes, a target outside ``[-1, num_classes)``, or a map that drops every class.

  >>> check_label_maps([10, 4], [None, [0, 1, 1, 7]], 10)
  >>> check_label_maps([10, 4], [None, None], 10)
  Traceback (most recent call last):
  kdjax.errors.UserError: the teachers predict 10, 4 classes and the student 10; give config.scheme.teachers[1] a label_map (one student class, or -1 to drop, per teacher class)
  """
  for i, (c, m) in enumerate(zip(teacher_classes, label_maps)):
    where = f'config.scheme.teachers[{i}].label_map'
    if m is None:
      if c != num_classes:
        raise UserError(f'the teachers predict {", ".join(map(str, teacher_classes))} classes '
                        f'and the student {num_classes}; give config.scheme.teachers[{i}] a '
                        'label_map (one student class, or -1 to drop, per teacher class)')
      continue
    if len(m) != c:
      raise UserError(f'{where} has {len(m)} entries but teacher {i} predicts {c} classes; '
                      'give one student class (or -1) per teacher class')
    bad = [v for v in m if not -1 <= v < num_classes]
    if bad:
      raise UserError(f'{where} sends a class to {bad[0]}, outside the student\'s classes '
                      f'0..{num_classes - 1}; use a student class or -1 (drop)')
    if all(v == -1 for v in m):
      raise UserError(f'{where} drops every class; keep at least one')


def label_map_matrix(label_map: Sequence[int] | None, teacher_classes: int,
                     num_classes: int) -> np.ndarray:
  """``[teacher_classes, num_classes]`` 0/1 matrix of a ``label_map`` (None: identity).

  >>> label_map_matrix([1, -1, 1], 3, 2).tolist()
  [[0.0, 1.0], [0.0, 0.0], [0.0, 1.0]]
  """
  if label_map is None:
    return np.eye(teacher_classes, num_classes, dtype=np.float32)
  m = np.zeros((teacher_classes, num_classes), np.float32)
  for j, c in enumerate(label_map):
    if c >= 0:
      m[j, c] = 1.0
  return m


def map_probabilities(probs: jax.Array, matrix) -> jax.Array:
  """A teacher's probabilities ``[..., C_t]`` in the student's classes ``[..., C_s]``:
  summed through ``matrix`` (:func:`label_map_matrix`) and renormalised over the kept
  classes.

  >>> p = jnp.array([[0.5, 0.3, 0.2]])
  >>> map_probabilities(p, label_map_matrix([1, -1, 1], 3, 2)).round(4).tolist()
  [[0.0, 1.0]]
  """
  mapped = probs.astype(jnp.float32) @ jnp.asarray(matrix, jnp.float32)
  return mapped / jnp.maximum(jnp.sum(mapped, axis=-1, keepdims=True), 1e-30)


# --------------------------------------------------------------------------- combination

def confidence_weights(probs: jax.Array, labels: jax.Array, measure: str = 'ca_mkd'
                       ) -> jax.Array:
  r"""Per-example teacher weights ``[batch, M]`` (rows sum to 1) from the teachers'
  mapped probabilities ``probs`` ``[M, batch, classes]`` (at :math:`T = 1`).

  ``'ca_mkd'``: :math:`w_m = \frac{1}{M-1}(1 - \mathrm{softmax}_m(\mathrm{CE}_m))`,
  :math:`\mathrm{CE}_m = -\log \tilde p_{m,y}` (CA-MKD, Zhang et al. 2022, their
  Eq. 2); an unlabeled example (``label < 0``) and :math:`M = 1` give uniform weights.
  ``'max_prob'``: :math:`w_m \propto \max_c \tilde p_{m,c}`.

  >>> p = jnp.array([[[0.5, 0.5]], [[0.5, 0.5]], [[1.0, 0.0]]])   # 3 teachers, 1 example
  >>> confidence_weights(p, jnp.array([0]), 'max_prob').tolist()
  [[0.25, 0.25, 0.5]]
  """
  m = probs.shape[0]
  probs = probs.astype(jnp.float32)
  if measure == 'max_prob':
    conf = jnp.max(probs, axis=-1).T                               # [batch, M]
    return conf / jnp.sum(conf, axis=-1, keepdims=True)
  if measure != 'ca_mkd':
    raise ValueError(f'measure must be one of {CONFIDENCE}, got {measure!r}')
  if m == 1:
    return jnp.ones((probs.shape[1], 1), jnp.float32)
  picked = jnp.take_along_axis(probs, jnp.maximum(labels, 0)[None, :, None], axis=-1)[..., 0]
  ce = -jnp.log(jnp.maximum(picked, 1e-30)).T                     # [batch, M]
  w = (1.0 - jax.nn.softmax(ce, axis=-1)) / (m - 1)
  return jnp.where((labels >= 0)[:, None], w, 1.0 / m)


def combine_teachers(probs: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  r"""The combined target :math:`\bar p = \sum_m w_m \tilde p_m` ``[batch, classes]``
  from ``probs`` ``[M, batch, classes]``; ``weights`` ``[batch, M]`` or None (the mean).

  >>> p = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])
  >>> combine_teachers(p).tolist(), combine_teachers(p, jnp.array([[0.25, 0.75]])).tolist()
  ([[0.5, 0.5]], [[0.25, 0.75]])
  """
  if weights is None:
    return jnp.mean(probs, axis=0)
  return jnp.einsum('mbc,bm->bc', probs, weights)


def kd_from_probs(student_logits: jax.Array, target: jax.Array, *, temperature: float = 1.0
                  ) -> jax.Array:
  r"""Per-example :math:`T^2\,\mathrm{KL}(\bar p \,\|\, \mathrm{softmax}(s / T))` from
  target probabilities :math:`\bar p` (zeros allowed: :math:`0 \log 0 = 0`); the KD loss
  of Hinton et al. for a target given as probabilities, not logits.

  >>> from kdjax.losses import kd
  >>> s, t = jnp.array([[1.0, 0.0, -1.0]]), jnp.array([[2.0, 0.0, -2.0]])
  >>> print(kd_from_probs(s, jax.nn.softmax(t / 2), temperature=2).round(4),
  ...       kd(s, t, temperature=2).round(4))
  [0.2411] [0.2411]
  """
  log_q = jax.nn.log_softmax(student_logits.astype(jnp.float32) / temperature, axis=-1)
  p = target.astype(jnp.float32)
  log_p = jnp.log(jnp.where(p > 0, p, 1.0))
  return temperature ** 2 * jnp.sum(jnp.where(p > 0, p * (log_p - log_q), 0.0), axis=-1)


def teacher_probabilities(raw_logits: Sequence[jax.Array], matrices: Sequence[np.ndarray],
                          temperature: float) -> jax.Array:
  """Each teacher's tempered, mapped probabilities, ``[M, batch, classes]``."""
  return jnp.stack([map_probabilities(jax.nn.softmax(z.astype(jnp.float32) / temperature,
                                                     axis=-1), a)
                    for z, a in zip(raw_logits, matrices)])


# --------------------------------------------------------------------------- the step

def make_multi_teacher_init(init_params: Callable, apply: Callable, objective,
                            tx: optax.GradientTransformation, *, input_shape,
                            input_dtype=np.float32, num_teachers: int, gated: bool,
                            gate_hidden: int = 0) -> Callable[[Any], TrainState]:
  """``init(seed) -> TrainState``: the student as ``kdjax distill`` makes it (the same
  seed gives the same parameters), its objective's parts, and ``params['gate']``
  (``{}`` unless ``gated``; key ``fold_in(key(seed), 3)``); one optimizer state over
  ``params`` (``{'student', 'loss', 'gate'}``)."""
  x = np.zeros((2, *input_shape), input_dtype)
  input_dim = int(np.prod(input_shape))

  def init(seed) -> TrainState:
    params, model_state = init_params(seed)
    out, _ = apply(params, model_state, x, train=False)
    sample = sample_inputs(out)
    key = jax.random.key(seed)
    loss_params, loss_state = objective.init(jax.random.fold_in(key, 1), sample)
    gate = (init_gate(jax.random.fold_in(key, 3), input_dim, num_teachers, gate_hidden)
            if gated else {})
    trainable = {'student': params, 'loss': loss_params, 'gate': gate}
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                      model_state=model_state, loss_state=loss_state,
                      opt_state=tx.init(trainable),
                      rng=jax.random.key_data(jax.random.fold_in(key, 2)))

  return init


def make_multi_teacher_step(apply: Callable, objective, tx: optax.GradientTransformation, *,
                            matrices: Sequence[np.ndarray], combine: str = 'average',
                            confidence: str = 'ca_mkd', temperature: float = 4.0,
                            weight: float = 0.9, nonfinite: str = 'stop') -> Callable:
  """Builds ``step(state, batch) -> (state, metrics)`` for one student and M teachers.

  ``batch['teacher_logits']`` is a tuple of the M teachers' raw logits (the composite
  teacher of :func:`composite_teacher`, run by the feed). The loss is ``objective`` on
  the student's outputs plus ``weight`` times :func:`kd_from_probs` from the combined
  target (:func:`combine_teachers` of the teachers' :func:`map_probabilities` at
  ``temperature``, weighted by ``combine``), reduced over ``batch['mask']``; the
  gradient (student, objective parts, gate) goes through ``tx``.

  Returns:
    The pure step. ``metrics`` (``(sum, count)``): ``loss``, ``accuracy``, the
    objective's ``loss/<term>``, ``loss/kd``, ``teacher_<m>/weight`` (mean weight),
    ``teachers/accuracy`` (of the combined target), and ``grad_norm`` and
    ``nonfinite`` / ``skipped`` as :func:`kdjax.engine.make_train_step`'s.
  """
  if nonfinite not in NONFINITE:
    raise ValueError(f'nonfinite must be one of {NONFINITE}, got {nonfinite!r}')
  if combine not in COMBINE:
    raise ValueError(f'combine must be one of {COMBINE}, got {combine!r}')
  m = len(matrices)

  def weights_of(params, batch, raw):
    if combine == 'gate':
      return gate_apply(params['gate'], batch['x'])
    if combine == 'confidence':
      return jax.lax.stop_gradient(confidence_weights(
          teacher_probabilities(raw, matrices, 1.0), batch['label'], confidence))
    return jnp.full((batch['label'].shape[0], m), 1.0 / m, jnp.float32)

  def forward(params, state: TrainState, batch, rng):
    where = batch['mask']
    out, model_state = apply(params['student'], state.model_state, batch['x'], train=True,
                             rng=rng, **model_kwargs(batch))
    inputs = objective_inputs(out, batch['label'], where, state.step, batch.get('id'))
    label_loss, loss_state, metrics = objective.apply(params['loss'], state.loss_state, inputs)
    raw = jax.lax.stop_gradient(tuple(batch['teacher_logits']))
    weights = weights_of(params, batch, raw)
    target = combine_teachers(teacher_probabilities(raw, matrices, temperature), weights)
    distill, metrics['loss/kd'] = reduce_value(
        kd_from_probs(out.logits, target, temperature=temperature), where)
    return label_loss + weight * distill, (out, model_state, loss_state, metrics, weights,
                                           target)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, (out, model_state, loss_state, metrics, weights, target)), grads = \
        jax.value_and_grad(forward, has_aux=True)(state.params, state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, model_state=model_state,
                        loss_state=loss_state, opt_state=opt_state)
    where, labels = batch['mask'], batch['label']
    n = jnp.sum(where.astype(jnp.float32))
    valid = where.astype(jnp.float32)
    metrics = dict(metrics, loss=(loss * n, n), accuracy=accuracy(out.logits, labels, where))
    metrics['teachers/accuracy'] = accuracy(target, labels, where)
    metrics.update({f'teacher_{k}/weight': (jnp.sum(weights[:, k] * valid), n)
                    for k in range(m)})
    return guard_nonfinite(nonfinite, loss, grads, new, state.replace(step=state.step + 1),
                           metrics)

  return step


# --------------------------------------------------------------------------- the teachers

def composite_teacher(teachers: Sequence[teacher_lib.Teacher], num_classes: int
                      ) -> teacher_lib.Teacher:
  """The M teachers as one frozen :class:`kdjax.teacher.Teacher` for the engine's feed:
  its ``variables`` are every teacher's, its ``apply`` returns a
  :class:`~kdjax.models.ModelOutput` whose ``logits`` is the tuple of their raw logits
  (each over its own classes; mapped and combined in the step)."""
  applies = tuple(t.apply for t in teachers)

  def apply(params, state, x, *, train=False, **kwargs):
    del train
    logits = tuple(a(p, s, x, train=False, **kwargs)[0].logits
                   for a, p, s in zip(applies, params, state))
    return ModelOutput(logits, {}), state

  variables = (tuple(t.variables[0] for t in teachers), tuple(t.variables[1] for t in teachers))
  digest = hashlib.sha256(''.join(t.fingerprint for t in teachers).encode()).hexdigest()
  return teacher_lib.Teacher(apply=apply, variables=variables, num_classes=num_classes,
                             config=None, step=0, fingerprint=digest)


def _teacher_spec(workdir: str, i: int):
  """A teacher workdir's data set spec, read from its ``config.json`` (no weights)."""
  if workdir_lib.latest_step(workdir) is None:
    raise UserError(f'config.scheme.teachers[{i}].workdir {workdir} has no checkpoint; train '
                    f'it first with `kdjax train --config ... --workdir {workdir}`')
  config = from_dict(workdir_lib.read_config(workdir))
  return kdata.dataset_spec(config.data.name, data_dir=config.data.get('data_dir') or None)


class MultiTeacherSetup(NamedTuple):
  """What :func:`setup_multi_teacher` builds: the engine's :class:`~kdjax.engine.Setup`
  (its feed runs the composite teacher), the teachers, their label-map matrices, and
  the scheme's options."""

  run: Setup
  teachers: tuple
  matrices: tuple
  options: dict


def setup_multi_teacher(config: ml_collections.ConfigDict, *, data: Data | None = None,
                        teachers: Sequence[teacher_lib.Teacher] | None = None,
                        log: Callable[[str], None] = print) -> MultiTeacherSetup:
  """Builds a multi-teacher run from ``config`` (writes nothing). The teachers' classes
  and inputs are checked from their ``config.json`` before their weights are read.

  Args:
    config: a training config with ``config.scheme`` (:func:`multi_teacher_scheme`).
    data: a data set in memory instead of ``config.data``.
    teachers: teachers already made (tests), instead of ``config.scheme.teachers``'
      workdirs (whose label maps still apply).
    log: where one-line notes go.

  Raises:
    UserError: a config, teacher, label map or data set this run cannot use.
  """
  options = multi_teacher_options(config)
  check_label_objective(config, 'multi_teacher reads its teachers from config.scheme.teachers')
  validate(config)   # every other field, before the teachers' workdirs are read
  entries = options['teachers']
  spec = data.spec if data is not None else kdata.dataset_spec(
      config.data.name, data_dir=config.data.data_dir or None)
  if teachers is None:
    specs = [_teacher_spec(e['workdir'], i) for i, e in enumerate(entries)]
    for i, s in enumerate(specs):
      if tuple(s.input_shape) != tuple(spec.input_shape):
        raise UserError(f'config.scheme.teachers[{i}] was trained on {s.name} (inputs '
                        f'{tuple(s.input_shape)}) but the student reads {config.data.name} '
                        f'(inputs {tuple(spec.input_shape)}); use teachers of the same inputs')
    classes = [s.num_classes for s in specs]
  else:
    if len(teachers) != len(entries):
      raise ValueError(f'{len(teachers)} teachers given for {len(entries)} entries')
    classes = [t.num_classes for t in teachers]
  maps = [e['label_map'] for e in entries]
  check_label_maps(classes, maps, spec.num_classes)

  run = setup(config, data=data, log=log)
  if teachers is None:
    teachers = [teacher_lib.load_teacher(e['workdir'], run.mesh) for e in entries]
  else:
    teachers = [t._replace(variables=jax.device_put(t.variables, run.feed.source.repl))
                for t in teachers]
  matrices = tuple(label_map_matrix(m, c, spec.num_classes) for m, c in zip(maps, classes))
  gated = options['combine'] == 'gate'
  # The engine's feed (its source, augmentation and settings), running the teachers.
  feed = copy.copy(run.feed)
  feed.teacher = composite_teacher(teachers, spec.num_classes)
  feed.needs = ('teacher_logits',)

  _, init_params, _ = from_config(config.model, num_classes=spec.num_classes,
                                  input_shape=spec.input_shape)
  init = make_multi_teacher_init(init_params, run.apply, run.objective, run.tx,
                                 input_shape=spec.input_shape, input_dtype=spec.input_dtype,
                                 num_teachers=len(teachers), gated=gated,
                                 gate_hidden=options['gate_hidden'])
  step = make_multi_teacher_step(run.apply, run.objective, run.tx, matrices=matrices,
                                 combine=options['combine'], confidence=options['confidence'],
                                 temperature=options['temperature'], weight=options['weight'],
                                 nonfinite=str(config.nonfinite))
  run = with_step(run, config, init, step, run.evaluate, apply=run.apply, feed=feed)
  return MultiTeacherSetup(run, tuple(teachers), matrices, options)


def evaluate_teachers(mt: MultiTeacherSetup, arrays: dict, *, batch_size: int) -> dict:
  """Each teacher's accuracy and loss in the student's label space (its mapped
  probabilities), and those of their mean (``'average'``), over ``arrays``."""
  mesh = mt.run.mesh

  def mapped(apply, matrix):
    def run(params, state, x, *, train=False, rng=None, **kwargs):
      del train, rng
      out, state = apply(params, state, x, train=False, **kwargs)
      p = map_probabilities(jax.nn.softmax(out.logits.astype(jnp.float32), axis=-1), matrix)
      return ModelOutput(jnp.log(jnp.maximum(p, 1e-30)), {}), state
    return run

  out = {}
  for k, (t, a) in enumerate(zip(mt.teachers, mt.matrices)):
    row = make_evaluator(mapped(t.apply, a), arrays, mesh, batch_size=batch_size)(*t.variables)
    out.update({f'teacher_{k}/{name}': v for name, v in row.items()})

  def average(params, state, x, *, train=False, rng=None, **kwargs):
    del train, rng
    raw = tuple(t.apply(p, s, x, train=False, **kwargs)[0].logits
                for t, p, s in zip(mt.teachers, params, state))
    p = combine_teachers(teacher_probabilities(raw, mt.matrices, 1.0))
    return ModelOutput(jnp.log(jnp.maximum(p, 1e-30)), {}), state

  variables = (tuple(t.variables[0] for t in mt.teachers),
               tuple(t.variables[1] for t in mt.teachers))
  row = make_evaluator(average, arrays, mesh, batch_size=batch_size)(*variables)
  out.update({f'average/{name}': v for name, v in row.items()})
  return out


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Distills one student from ``config.scheme.teachers`` into ``workdir`` and returns the
  summary (``summary.json``): the usual figures, plus ``teacher_accuracies`` (each
  teacher in the student's label space), ``teachers_average_accuracy`` (the mean of
  their probabilities) and ``combine``. A rerun resumes from the last checkpoint to the
  same result as an uninterrupted run.

  Raises:
    UserError: a bad config, scheme, teacher, label map, data set or workdir (nothing
      written).
    Diverged: a non-finite loss or gradient norm.
  """
  workdir = workdir_lib.resolve(workdir)
  mt = setup_multi_teacher(config, log=log_line)
  run = mt.run
  fitted, start = fit_run(run, config, workdir, identity=IDENTITY)
  train = fitted.train
  eval_arrays = kdata.load_arrays(config.data.name, config.data.eval_split,
                                  data_dir=config.data.data_dir or None)
  teachers = evaluate_teachers(mt, eval_arrays, batch_size=int(config.data.eval_batch_size))
  m = len(mt.teachers)
  summary = {
      **fitted.summary(resumed_from=start, feed=run.feed_kind),
      'scheme': NAME,
      'combine': mt.options['combine'],
      'num_teachers': m,
      'teacher_accuracies': [teachers[f'teacher_{k}/accuracy'] for k in range(m)],
      'teachers_average_accuracy': teachers['average/accuracy'],
      'teacher_weights': [train.get(f'teacher_{k}/weight') for k in range(m)],
  }
  write_summary(workdir, summary)
  if jax.process_index() == 0:
    metrics_lib.plot_learning_curves(workdir, title=f'multi-teacher KD ({mt.options["combine"]}, '
                                                    f'{m} teachers)')
  return summary
