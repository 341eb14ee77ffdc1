r"""Deep mutual learning (DML): K students trained together, each from the labels and
from the others' predictions.

Student :math:`k` of a cohort of :math:`K \ge 2` minimizes its label loss (the
objective of ``config.loss.terms``, cross-entropy by default) plus the mean over the
other students of the KL divergence from their predictions to its own:

.. math::

  L_k = L_{\mathrm{label}}(z_k, y)
        + \frac{w}{K - 1} \sum_{j \ne k} T^2\,
          \mathrm{KL}\big(\mathrm{sg}(p_j^T) \,\|\, p_k^T\big),\qquad
  p_j^T = \mathrm{softmax}(z_j / T)

(:math:`w`: ``config.scheme.weight``; :math:`T`: ``config.scheme.temperature``, 1 in the
paper; ``sg``: stop-gradient). The paper updates the students in turn within an
iteration, each against the others' predictions of the mini-batch. Here the K updates
are made at once: one forward pass of every student over the same (augmented) batch,
every student's loss from those logits with the others' predictions under
``stop_gradient``, and one gradient of :math:`\sum_k L_k`, whose part for student
:math:`k`'s parameters is the gradient of :math:`L_k` alone (the other losses see
:math:`z_k` only through ``stop_gradient``). With two students this is the paper's
Algorithm 1 with both updates computed from the predictions before either; the
students' optimizers are independent (one optax state each, clipping included).

The students share an architecture (``config.scheme.students`` empty: K copies of
``config.model``, or K equal entries) and are then stacked on a leading axis and
vmapped, or differ (``config.scheme.students``: K model configs) and run in a Python
loop inside the same jitted step (:mod:`kdjax.schemes.cohort`). Student :math:`k`
starts from the parameters ``kdjax train`` would make with seed ``seed * K + k``.

The run is the engine's: :func:`kdjax.engine.setup` builds the mesh, the data, the
feed, the optimizer and the schedule; :func:`kdjax.engine.train_loop` runs the calls
(:class:`kdjax.engine.TrainCalls` of the step below), evaluates, logs and checkpoints
into the workdir (:mod:`kdjax.workdir`), so a killed run resumes to the same result.
Evaluation reports each student, their mean, and the ensemble (the mean of the
students' softmax probabilities).

References:
  Zhang, Xiang, Hospedales, Lu. Deep Mutual Learning. CVPR 2018. arXiv:1706.00384
  (the loss of a cohort of K students; Algorithm 1; ensembles of the students).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import data as kdata
from kdjax import workdir as workdir_lib
from kdjax.config import check_int
from kdjax.config import check_number
from kdjax.config import with_defaults
from kdjax.engine import metrics as metrics_lib
from kdjax.engine.config import IDENTITY_FIELDS
from kdjax.engine.evaluate import make_evaluator
from kdjax.engine.loop import TrainCalls
from kdjax.engine.loop import fit_workdir
from kdjax.engine.loop import write_summary
from kdjax.engine.setup import CACHE_NEEDS
from kdjax.engine.setup import TEACHER_NEEDS
from kdjax.engine.setup import Data
from kdjax.engine.setup import Setup
from kdjax.engine.setup import setup
from kdjax.engine.state import TrainState
from kdjax.engine.step import NONFINITE
from kdjax.engine.step import accuracy
from kdjax.engine.step import guard_nonfinite
from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.losses import kd
from kdjax.losses import reduce_value
from kdjax.models import ModelOutput
from kdjax.models.base import model_kwargs
from kdjax.parallel import shardings_from_rules
from kdjax.schemes.cohort import Cohort
from kdjax.schemes.cohort import cohort_summary
from kdjax.schemes.cohort import make_cohort

NAME = 'dml'
# config.scheme's fields and their defaults (students: [] -> num_students copies of
# config.model).
DEFAULTS = {'name': NAME, 'num_students': 4, 'temperature': 1.0, 'weight': 1.0,
            'students': []}
# What a DML checkpoint means: the engine's fields and the scheme's.
IDENTITY = (*IDENTITY_FIELDS, 'scheme')
# Per-step metrics kept for the cohort only (not per student).
_FLAGS = ('nonfinite', 'skipped')


def dml_scheme(**options) -> ml_collections.ConfigDict:
  """``config.scheme`` for DML: :data:`DEFAULTS` with ``options`` over them.

  >>> dml_scheme(num_students=3).num_students
  3
  """
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown DML options {sorted(unknown)}; use {", ".join(DEFAULTS)}')
  return ml_collections.ConfigDict({**DEFAULTS, **options})


def scheme_options(config: ml_collections.ConfigDict) -> dict:
  """``config.scheme`` checked, with :data:`DEFAULTS` for the fields it leaves out.

  Raises:
    UserError: an unknown field, fewer than two students, a temperature that is not
      positive, a negative weight, or a ``students`` list that is not K model configs.
  """
  options = with_defaults(config.scheme, DEFAULTS, dotted='scheme', what='a DML option')
  checked = ml_collections.ConfigDict({'scheme': {k: v for k, v in options.items()
                                                  if k != 'students'}})
  check_int(checked, 'scheme.num_students', 2)
  check_number(checked, 'scheme.temperature', lambda v: v > 0, 'positive')
  check_number(checked, 'scheme.weight', lambda v: v >= 0, '>= 0')
  k, students = int(options['num_students']), options['students']
  if not isinstance(students, (list, tuple)) or not all(
      hasattr(s, 'get') and isinstance(s.get('name'), str) for s in students):
    raise UserError("config.scheme.students must be a list of model configs such as "
                    "[{'name': 'mlp', 'kwargs': {'hidden': (64,)}}] (or [] for "
                    f"num_students copies of config.model), got {students!r}")
  if students and len(students) != k:
    raise UserError(f'config.scheme.students lists {len(students)} models but '
                    f'config.scheme.num_students is {k}; make them agree')
  options.update(num_students=k, temperature=float(options['temperature']),
                 weight=float(options['weight']), students=list(students))
  return options


# --------------------------------------------------------------------------- the loss

def mutual_kl(logits: jax.Array, *, temperature: float = 1.0, where=None) -> jax.Array:
  r"""DML's mimicry loss: each student's mean KL divergence from the other students.

  .. math::

    \ell_k = \frac{1}{K - 1} \sum_{j \ne k} T^2\,
             \mathrm{KL}\big(\mathrm{sg}(p_j^T) \,\|\, p_k^T\big),\qquad
    p_j^T = \mathrm{softmax}(z_j / T)

  Every target :math:`p_j` is under ``stop_gradient``, so :math:`\ell_k` trains
  student :math:`k` only. A peer whose logits for an example are not finite is left out
  of that example's mean (a diverged student stops teaching the others). Each pair is :func:`kdjax.losses.kd` (Hinton's :math:`T^2`
  scaling; at :math:`T = 1` the plain KL of the paper).

  Args:
    logits: ``[K, ..., classes]``, the K students' logits for one batch (``K >= 2``).
    temperature: :math:`T > 0`.
    where: optional mask of the per-example shape (``logits.shape[1:-1]``); masked
      examples give 0.

  Returns:
    ``[K, ...]``: per student, per example, float32.

  References:
    Zhang, Xiang, Hospedales, Lu. Deep Mutual Learning. CVPR 2018. arXiv:1706.00384
    (the mimicry loss of a cohort of K students).

  >>> z = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]])     # two students, one example
  >>> print(mutual_kl(z)[:, 0].round(4))
  [0.4621 0.4621]
  """
  k = logits.shape[0]
  if k < 2:
    raise ValueError(f'mutual_kl needs at least two students, got {k}')
  targets = jax.lax.stop_gradient(logits)
  # A peer whose prediction for an example is not finite (a diverged student) stops
  # teaching that example instead of poisoning its peers: it leaves the mean, and its
  # logits are replaced before the KL so no NaN reaches a gradient.
  finite = jnp.all(jnp.isfinite(targets), axis=-1)                  # [K, ...]
  targets = jnp.where(finite[..., None], targets, 0.0)

  def row(student):   # [K (others), ...]: KL from every target to one student
    return jax.vmap(lambda t: kd(student, t, temperature=temperature, where=where))(targets)

  table = jax.vmap(row)(logits)                      # [K (self), K (other), ...]
  others = ~jnp.eye(k, dtype=bool).reshape(k, k, *([1] * (table.ndim - 2)))
  teaching = jnp.logical_and(others, finite[None])
  count = jnp.sum(teaching, axis=1)
  return jnp.sum(jnp.where(teaching, table, 0.0), axis=1) / jnp.maximum(count, 1)


# --------------------------------------------------------------------------- the step

def make_dml_init(cohort: Cohort, objective, tx: optax.GradientTransformation, *,
                  input_shape, input_dtype=np.float32) -> Callable[[Any], TrainState]:
  """``init(seed) -> TrainState`` of a cohort (pure; the seed may be traced).

  The state's ``params`` is ``{'student': cohort params, 'loss': cohort loss params}``,
  ``model_state``, ``loss_state`` and ``opt_state`` are cohort trees (one optax state
  per student); ``step`` and ``rng`` are the cohort's. Student ``k`` is initialized with
  seed ``seed * K + k``; the objective's learned parts from a two-example sample of its
  outputs, as :func:`kdjax.engine.setup` does for one student.
  """
  x = np.zeros((2, *input_shape), input_dtype)
  size = cohort.size

  def one(student, seed):
    params, model_state = student.init(seed)
    out, _ = student.apply(params, model_state, x, train=False)
    labels = jnp.zeros(out.logits.shape[:-1], jnp.int32)
    sample = {'student_logits': out.logits, 'student_features': out.features,
              'student_attentions': out.attentions, 'labels': labels,
              'where': jnp.ones(labels.shape, bool), 'step': 0}
    loss_params, loss_state = objective.init(
        jax.random.fold_in(jax.random.key(seed), 1), sample)
    opt_state = tx.init({'student': params, 'loss': loss_params})
    return params, loss_params, model_state, loss_state, opt_state

  def init(seed) -> TrainState:
    seeds = cohort.split(seed * size + jnp.arange(size, dtype=jnp.int32))
    params, loss_params, model_state, loss_state, opt_state = cohort.loop(one, seeds)
    return TrainState(step=jnp.zeros((), jnp.int32),
                      params={'student': params, 'loss': loss_params},
                      model_state=model_state, loss_state=loss_state, opt_state=opt_state,
                      rng=jax.random.key_data(jax.random.fold_in(jax.random.key(seed), 2)))

  return init


def make_dml_step(cohort: Cohort, objective, tx: optax.GradientTransformation, *,
                  temperature: float = 1.0, weight: float = 1.0,
                  nonfinite: str = 'stop') -> Callable:
  """Builds ``step(state, batch) -> (state, metrics)`` that trains every student at once.

  One forward pass of every student (vmapped when stacked), each student's loss
  (``objective`` on its outputs, plus ``weight`` times :func:`mutual_kl` reduced over
  ``batch['mask']`` as the objective's terms are), one gradient of their sum, and one
  ``tx`` update per student; a non-finite student is handled as
  :func:`kdjax.engine.make_train_step` handles a non-finite step
  (:func:`kdjax.engine.step.guard_nonfinite`, student by student).

  Args:
    cohort: the students (:func:`kdjax.schemes.cohort.make_cohort`).
    objective: each student's label loss (a :class:`kdjax.losses.Objective` that reads
      no teacher).
    tx: each student's optimizer (:func:`kdjax.engine.make_optimizer`).
    temperature: the mimicry loss's :math:`T`.
    weight: the mimicry loss's weight :math:`w`.
    nonfinite: ``'stop'``, ``'skip'`` (a student's update) or ``'ignore'``.

  Returns:
    The pure step. ``metrics`` (``(sum, count)`` pairs): for the cohort, ``loss``,
    ``accuracy``, the objective's ``loss/<term>``, ``loss/mutual`` and ``grad_norm``
    as means over the students, and ``nonfinite`` or ``skipped`` counting students;
    for each student ``student_<k>/<name>``, the same but the flags.
  """
  if nonfinite not in NONFINITE:
    raise ValueError(f'nonfinite must be one of {NONFINITE}, got {nonfinite!r}')
  size = cohort.size

  def forward(params, state: TrainState, batch, rngs):
    where = batch['mask']

    logits, label_loss, model_state, loss_state, metrics = cohort_label_losses(
        cohort, objective, params, state, batch, rngs)
    mutual = mutual_kl(logits, temperature=temperature, where=where)
    mutual_mean, metrics['loss/mutual'] = jax.vmap(lambda v: reduce_value(v, where))(mutual)
    losses = label_loss + weight * mutual_mean
    return jnp.sum(losses), (losses, logits, model_state, loss_state, metrics)

  update = member_update(tx, nonfinite)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    rngs = cohort.split(jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(size)))
    (_, (losses, logits, model_state, loss_state, metrics)), grads = jax.value_and_grad(
        forward, has_aux=True)(state.params, state, batch, rngs)
    where = batch['mask']
    n = jnp.sum(where.astype(jnp.float32))
    metrics['loss'] = (losses * n, jnp.full((size,), n))
    metrics['accuracy'] = jax.vmap(lambda z: accuracy(z, batch['label'], where))(logits)
    p, lp, opt_state, model_state, loss_state, metrics = cohort.map(
        update, state.params['student'], state.params['loss'], grads['student'],
        grads['loss'], state.opt_state, model_state, loss_state, state.model_state,
        state.loss_state, cohort.split(losses), cohort.split(metrics))
    new = state.replace(step=state.step + 1, params={'student': p, 'loss': lp},
                        model_state=model_state, loss_state=loss_state, opt_state=opt_state)
    return new, cohort_metrics(cohort.stack(metrics))

  return step


def cohort_label_losses(cohort: Cohort, objective, params, state: TrainState, batch, rngs):
  """Every member's forward and objective on ``batch`` (``cohort.map``: vmapped for one
  architecture, looped otherwise), stacked over the members.

  Returns:
    ``(logits [K, ...], label losses [K, B], model_state, loss_state, metrics [K])``;
    the two states per member as ``cohort.map`` returns them.
  """
  where = batch['mask']

  def one(student, p, lp, model_state, loss_state, rng):
    out, model_state = student.apply(p, model_state, batch['x'], train=True, rng=rng,
                                     **model_kwargs(batch))
    inputs = {'labels': batch['label'], 'where': where, 'step': state.step,
              'student_logits': out.logits, 'student_features': out.features,
              'student_attentions': out.attentions}
    if 'id' in batch:
      inputs['example_ids'] = batch['id']
    loss, loss_state, metrics = objective.apply(lp, loss_state, inputs)
    return out.logits, loss, model_state, loss_state, metrics

  logits, label_loss, model_state, loss_state, metrics = cohort.map(
      one, params['student'], params['loss'], state.model_state, state.loss_state, rngs)
  return (cohort.stack(logits), cohort.stack(label_loss), model_state, loss_state,
          cohort.stack(metrics))


def member_update(tx: optax.GradientTransformation, nonfinite: str) -> Callable:
  """``update(student, p, lp, g, lg, opt_state, model_state, loss_state, old_model_state,
  old_loss_state, loss, metrics)``: one member's optimizer step on its student and loss
  parameters, kept from being applied by :func:`kdjax.engine.step.guard_nonfinite` when
  its loss or gradients are not finite (``cohort.map`` runs it over the members)."""

  def update(student, p, lp, g, lg, opt_state, model_state, loss_state, old_model_state,
             old_loss_state, loss, metrics):
    del student
    params, grads = {'student': p, 'loss': lp}, {'student': g, 'loss': lg}
    updates, new_opt = tx.update(grads, opt_state, params)
    new_params = optax.apply_updates(params, updates)
    (new_params, new_opt, model_state, loss_state), metrics = guard_nonfinite(
        nonfinite, loss, grads, (new_params, new_opt, model_state, loss_state),
        (params, opt_state, old_model_state, old_loss_state), metrics)
    return new_params['student'], new_params['loss'], new_opt, model_state, loss_state, \
        metrics

  return update


def cohort_metrics(per_student: dict) -> dict:
  """The step's metrics from per-student ``(sum [K], count [K])`` pairs: each summed over
  the students (a mean over them, as their counts agree), and ``student_<k>/<name>``
  for each student (but the ``nonfinite`` / ``skipped`` flags).

  >>> m = cohort_metrics({'loss': (jnp.array([2.0, 4.0]), jnp.array([2.0, 2.0]))})
  >>> {k: (float(s), float(c)) for k, (s, c) in m.items()}
  {'loss': (6.0, 4.0), 'student_0/loss': (2.0, 2.0), 'student_1/loss': (4.0, 2.0)}
  """
  out = {name: (jnp.sum(s), jnp.sum(c)) for name, (s, c) in per_student.items()}
  for name, (s, c) in per_student.items():
    if name not in _FLAGS:
      out.update({f'student_{k}/{name}': (s[k], c[k]) for k in range(s.shape[0])})
  return out


# --------------------------------------------------------------------------- evaluation

def ensemble_apply(cohort: Cohort) -> Callable:
  """``apply(params, model_state, x) -> (ModelOutput, model_state)`` of the cohort's
  ensemble: the log of the mean of the students' softmax probabilities (evaluation
  mode always; ``train`` and ``rng`` are ignored)."""

  def apply(params, model_state, x, *, train=False, rng=None, **kwargs):
    del train, rng
    logits, = cohort.map(
        lambda s, p, ms: (s.apply(p, ms, x, train=False, **kwargs)[0].logits,),
        params, model_state)
    log_p = jax.nn.log_softmax(cohort.stack(logits).astype(jnp.float32), axis=-1)
    return ModelOutput(jax.nn.logsumexp(log_p, axis=0) - jnp.log(cohort.size), {}), \
        model_state

  return apply


def make_cohort_evaluator(cohort: Cohort, arrays: dict, mesh, *, batch_size: int
                          ) -> Callable[[TrainState], dict]:
  """``evaluate(state)``: ``accuracy`` and ``loss`` (means over the students),
  ``student_<k>/accuracy``, ``student_<k>/loss`` and ``ensemble/accuracy``,
  ``ensemble/loss`` over ``arrays`` (:func:`kdjax.engine.make_evaluator` each)."""
  by_student: dict[int, Callable] = {}
  for s in cohort.students:
    by_student.setdefault(id(s), make_evaluator(s.apply, arrays, mesh, batch_size=batch_size))
  ensemble = make_evaluator(ensemble_apply(cohort), arrays, mesh, batch_size=batch_size)

  def evaluate(state: TrainState) -> dict:
    params, model_state = state.params['student'], state.model_state
    rows = [by_student[id(cohort.student(k))](cohort.take(params, k),
                                              cohort.take(model_state, k))
            for k in range(cohort.size)]
    out = {name: float(np.mean([r[name] for r in rows])) for name in ('accuracy', 'loss')}
    for k, r in enumerate(rows):
      out.update({f'student_{k}/{name}': r[name] for name in ('accuracy', 'loss')})
    out.update({f'ensemble/{k}': v for k, v in ensemble(params, model_state).items()})
    return out

  return evaluate


# --------------------------------------------------------------------------- the run

class DMLSetup(NamedTuple):
  """What :func:`setup_dml` builds: the engine's :class:`~kdjax.engine.Setup` with the
  cohort's step, calls, state and evaluator in it (``apply`` is the ensemble's), the
  cohort, and the scheme's options."""

  run: Setup
  cohort: Cohort
  options: dict


def setup_dml(config: ml_collections.ConfigDict, *, data: Data | None = None,
              stack: bool | None = None, log: Callable[[str], None] = print) -> DMLSetup:
  """Builds a DML run from ``config`` (writes nothing).

  Args:
    config: a training config with ``config.scheme`` (:func:`dml_scheme`).
    data: a data set in memory instead of ``config.data`` (as :func:`kdjax.engine.setup`).
    stack: stack the students (vmap) or loop over them; default: stacked when they
      share an architecture.
    log: where one-line notes go.

  Raises:
    UserError: a config, data set or scheme this run cannot use.
  """
  options = scheme_options(config)
  terms = config.loss.terms.to_dict() if hasattr(config.loss.terms, 'to_dict') else dict(
      config.loss.terms)
  try:
    reads_teacher = bool(build_objective(terms).needs & (TEACHER_NEEDS | CACHE_NEEDS))
  except (KeyError, ValueError):
    reads_teacher = False   # the engine's setup reports a bad term
  if reads_teacher or config.teacher.workdir or config.teacher.cache:
    raise UserError('DML trains its students from the labels and from each other: use label '
                    "losses in config.loss.terms (e.g. {'ce': {}}) and leave "
                    'config.teacher.workdir and config.teacher.cache empty')
  run = setup(config, data=data, log=log)
  size = options['num_students']
  models = options['students'] or [config.model] * size
  cohort = make_cohort(models, num_classes=run.spec.num_classes,
                       input_shape=run.spec.input_shape, stack=stack)

  init = make_dml_init(cohort, run.objective, run.tx, input_shape=run.spec.input_shape,
                       input_dtype=run.spec.input_dtype)
  seed = np.int32(config.seed)
  abstract = jax.eval_shape(init, seed)
  shardings = shardings_from_rules(abstract, config.partition_rules, run.mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  make_state = jax.jit(init, out_shardings=shardings)

  step = make_dml_step(cohort, run.objective, run.tx, temperature=options['temperature'],
                       weight=options['weight'], nonfinite=str(config.nonfinite))
  calls = TrainCalls(step, run.feed, state_shardings=shardings, mesh=run.mesh)
  eval_arrays = (data.eval if data is not None else kdata.load_arrays(
      config.data.name, config.data.eval_split, data_dir=config.data.data_dir or None))
  evaluate = make_cohort_evaluator(cohort, eval_arrays, run.mesh,
                                   batch_size=int(config.data.eval_batch_size))
  run = run._replace(apply=ensemble_apply(cohort), step=step, calls=calls,
                     state_shardings=shardings, abstract_state=abstract,
                     init=lambda: make_state(seed), evaluate=evaluate)
  return DMLSetup(run, cohort, options)


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains a DML cohort into ``workdir`` and returns the summary (``summary.json``).

  The workdir is the engine's (``config.json``, orbax checkpoints, ``metrics.jsonl``,
  TensorBoard, ``learning_curves.png``); a rerun resumes from the last checkpoint to
  the same result as an uninterrupted run. The summary adds to the usual figures
  ``student_accuracies``, ``student_losses``, ``ensemble_accuracy`` and
  ``ensemble_loss`` (``eval_accuracy``, ``eval_loss``: the students' means).

  Raises:
    UserError: a bad config, scheme, data set or workdir (nothing written).
    Diverged: a non-finite loss or gradient norm (``summary.json`` says where).
  """
  workdir = workdir_lib.resolve(workdir)
  dml = setup_dml(config, log=_log)
  run = dml.run
  fitted, start = fit_workdir(run, config, workdir, identity=IDENTITY, log=_log)
  size = dml.cohort.size
  summary = {'scheme': NAME, 'num_students': size, 'stacked': dml.cohort.stacked,
             **cohort_summary(fitted, size, resumed_from=start, feed=run.feed_kind)}
  write_summary(workdir, summary)
  if jax.process_index() == 0:
    metrics_lib.plot_learning_curves(workdir, title=f'DML, {size} students')
  return summary
