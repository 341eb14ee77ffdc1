r"""BD-KD, online: a large teacher and a compact student trained together from scratch,
the student with the balanced (forward + reverse KL) distillation loss.

A cohort of two members of different architectures (:mod:`kdjax.schemes.cohort`,
listed and looped inside one jitted step): member 0 is the student (``config.model``),
member 1 the teacher (``config.scheme.teacher``). Each minimizes its label loss (the
objective of ``config.loss.terms``, cross-entropy by default) plus a distillation term
from the other's current predictions, held constant:

.. math::

  L_S = L_{\mathrm{label}}(z_s, y) + w\,\mathrm{BD}(z_s;\,\mathrm{sg}(z_t)),\qquad
  L_T = L_{\mathrm{label}}(z_t, y) + w_t\,T^2\,
        \mathrm{KL}\big(\mathrm{sg}(p_s^T)\,\|\,p_t^T\big)

with :math:`\mathrm{BD}` :func:`kdjax.losses.bdkd` (``side='student'``: the sample-wise
entropy-balanced sum of the forward :math:`\mathrm{KL}(p_t\|p_s)` and the reverse
:math:`\mathrm{KL}(p_s\|p_t)`, times :math:`T^2`), :math:`w` ``config.scheme.weight``,
:math:`w_t` ``config.scheme.teacher_weight``, :math:`T` ``config.scheme.temperature``.

The teacher's term (``config.scheme.teacher_loss``):

* ``'kl'`` (default): :math:`T^2\,\mathrm{KL}(p_s^T \| p_t^T)`, the student's
  prediction the target. In the paper's notation (forward :math:`\mathrm{KL}(p^t\|p^s)`,
  reverse :math:`\mathrm{KL}(p^s\|p^t)`) this is the *reverse* KL, which the paper's
  teacher objective uses as a regularizer while the balancing is applied "at the level of
  the student distillation loss" (arXiv:2212.12965 v1 abstract; the v2 summary: "the
  teacher objective uses reverse KL as a regularizer"). For the teacher it is the
  ordinary online (DML) mimicry term.
* ``'bdkd'``: :func:`kdjax.losses.bdkd` with ``side='teacher'``, the balanced loss on
  the teacher's side too (an option; not what the paper's teacher uses).

What we had to choose: the paper's method section (its exact sample-wise weights) was not
available to us, only its abstracts and a summary; the student's balance is kdjax's
:func:`kdjax.losses.bdkd` weight (entropy ratio, documented there), not a transcription
of the paper's. No authors' code was found. Both members share one optimizer
configuration (``config.optimizer``; one optax state each), see the same augmented batch,
and the teacher starts from seed ``2 * seed + 1``, the student from ``2 * seed`` (the
DML cohort's rule).

One gradient of :math:`L_S + L_T` trains both: the student's term reads the teacher's
logits only under ``stop_gradient`` and the teacher's term the student's, so each
member's part of the gradient is the gradient of its own loss alone
(``tests/schemes/test_bdkd_online.py`` checks this against ``jax.grad`` of each loss).

Evaluation reports both members; the summary's ``eval_accuracy`` is the student's.

References:
  Amara, Sepahvand, Meyer, Gross, Clark. BD-KD: Balancing the Divergences for Online
  Knowledge Distillation. 2022. arXiv:2212.12965.
  Zhang, Xiang, Hospedales, Lu. Deep Mutual Learning. CVPR 2018 (the online step).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import optax

from kdjax import data as kdata
from kdjax import workdir as workdir_lib
from kdjax.config import check_number
from kdjax.config import with_defaults
from kdjax.engine import metrics as metrics_lib
from kdjax.engine.evaluate import make_evaluator
from kdjax.engine.loop import write_summary
from kdjax.engine.setup import Data
from kdjax.engine.setup import Setup
from kdjax.engine.setup import setup
from kdjax.engine.state import TrainState
from kdjax.engine.step import NONFINITE
from kdjax.engine.step import accuracy
from kdjax.errors import UserError
from kdjax.losses import bdkd
from kdjax.losses import kd
from kdjax.losses import reduce_value
from kdjax.schemes.cohort import Cohort
from kdjax.schemes.cohort import make_cohort
from kdjax.schemes.cohort import model_spec
from kdjax.schemes.dml import cohort_label_losses
from kdjax.schemes.dml import make_dml_init
from kdjax.schemes.dml import member_update
from kdjax.schemes.online import IDENTITY
from kdjax.schemes.online import check_label_objective
from kdjax.schemes.online import fit_run
from kdjax.schemes.online import log_line
from kdjax.schemes.online import with_step

NAME = 'bdkd_online'
TEACHER_LOSSES = ('kl', 'bdkd')
# config.scheme's fields and their defaults (teacher: a model config, required).
DEFAULTS = {'name': NAME, 'teacher': None, 'temperature': 1.0, 'weight': 1.0,
            'teacher_weight': 1.0, 'teacher_loss': 'kl'}
MEMBERS = ('student', 'teacher')   # the cohort's order
_FLAGS = ('nonfinite', 'skipped')


def bdkd_online_scheme(**options) -> ml_collections.ConfigDict:
  """``config.scheme`` for online BD-KD: :data:`DEFAULTS` with ``options`` over them.

  >>> bdkd_online_scheme(teacher={'name': 'cnn1d'}).teacher_loss
  'kl'
  """
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown bdkd_online options {sorted(unknown)}; use '
                     f'{", ".join(DEFAULTS)}')
  return ml_collections.ConfigDict({**DEFAULTS, **options})


def bdkd_online_options(config: ml_collections.ConfigDict) -> dict:
  """``config.scheme`` checked, with :data:`DEFAULTS` for the fields it leaves out.

  Raises:
    UserError: an unknown field, no teacher model, a teacher of the student's own
      architecture (one member), a temperature that is not positive, a negative weight,
      or an unknown teacher loss.

  >>> bdkd_online_options(ml_collections.ConfigDict({'scheme': {'name': 'bdkd_online'},
  ...                                                'model': {'name': 'mlp'}}))
  Traceback (most recent call last):
  kdjax.errors.UserError: config.scheme.teacher must be a model config such as {'name': 'cnn1d'} (the student is config.model), got None
  """
  options = with_defaults(config.scheme, DEFAULTS, dotted='scheme', what='a bdkd_online option')
  teacher = options['teacher']
  if not (hasattr(teacher, 'get') and isinstance(teacher.get('name'), str)):
    raise UserError("config.scheme.teacher must be a model config such as {'name': "
                    f"'cnn1d'}} (the student is config.model), got {teacher!r}")
  if model_spec(teacher) == model_spec(config.model):
    raise UserError('config.scheme.teacher is the student\'s own architecture (config.model): '
                    'online BD-KD needs a larger teacher of another architecture; for peers of '
                    'one architecture use the dml scheme')
  checked = ml_collections.ConfigDict({'scheme': {k: v for k, v in options.items()
                                                  if k != 'teacher'}})
  check_number(checked, 'scheme.temperature', lambda v: v > 0, 'positive')
  check_number(checked, 'scheme.weight', lambda v: v >= 0, '>= 0')
  check_number(checked, 'scheme.teacher_weight', lambda v: v >= 0, '>= 0')
  if options['teacher_loss'] not in TEACHER_LOSSES:
    raise UserError(f'config.scheme.teacher_loss must be one of {", ".join(TEACHER_LOSSES)}, '
                    f'got {options["teacher_loss"]!r}')
  options.update(temperature=float(options['temperature']), weight=float(options['weight']),
                 teacher_weight=float(options['teacher_weight']),
                 teacher=teacher.to_dict() if hasattr(teacher, 'to_dict') else dict(teacher))
  return options


# --------------------------------------------------------------------------- the losses

def bdkd_online_losses(student_logits: jax.Array, teacher_logits: jax.Array, *,
                       temperature: float = 1.0, teacher_loss: str = 'kl',
                       where=None) -> tuple[jax.Array, jax.Array]:
  r"""The two distillation terms of online BD-KD, per example.

  Returns ``(student term, teacher term)``: :func:`kdjax.losses.bdkd` with
  ``side='student'`` (differentiates the student's logits only), and the teacher's
  :math:`T^2\,\mathrm{KL}(\mathrm{sg}(p_s^T)\|p_t^T)` (``'kl'``) or
  ``bdkd(..., side='teacher')`` (``'bdkd'``), which differentiates the teacher's only.

  Args:
    student_logits: ``[..., classes]``.
    teacher_logits: the same shape.
    temperature: :math:`T > 0`.
    teacher_loss: ``'kl'`` or ``'bdkd'``.
    where: optional mask of the per-example shape; masked examples give 0.

  >>> s = jnp.array([[1.0, 0.0, -1.0]]); t = jnp.array([[2.0, 0.0, -2.0]])
  >>> a, b = bdkd_online_losses(s, t)
  >>> print(f'{float(a[0]):.4f} {float(b[0]):.4f}')
  0.1447 0.1601
  """
  if teacher_loss not in TEACHER_LOSSES:
    raise ValueError(f'teacher_loss must be one of {TEACHER_LOSSES}, got {teacher_loss!r}')
  student = bdkd(student_logits, teacher_logits, temperature=temperature, side='student',
                 where=where)
  if teacher_loss == 'kl':
    teacher = kd(teacher_logits, jax.lax.stop_gradient(student_logits),
                 temperature=temperature, where=where)
  else:
    teacher = bdkd(student_logits, teacher_logits, temperature=temperature, side='teacher',
                   where=where)
  return student, teacher


# --------------------------------------------------------------------------- the step

def make_bdkd_online_step(cohort: Cohort, objective, tx: optax.GradientTransformation, *,
                          temperature: float = 1.0, weight: float = 1.0,
                          teacher_weight: float = 1.0, teacher_loss: str = 'kl',
                          nonfinite: str = 'stop') -> Callable:
  """Builds ``step(state, batch) -> (state, metrics)`` that trains the student (member 0)
  and the teacher (member 1) at once.

  One forward pass of both, each member's loss (``objective`` plus its weighted term of
  :func:`bdkd_online_losses`, reduced over ``batch['mask']``), one gradient of their sum,
  one ``tx`` update per member (:func:`kdjax.schemes.dml.member_update`).

  Returns:
    The pure step. ``metrics`` (``(sum, count)`` pairs): the student's ``loss``,
    ``accuracy``, ``loss/<term>``, ``loss/distill`` and ``grad_norm``; the teacher's the
    same as ``teacher/<name>``; ``nonfinite`` / ``skipped`` counting members.
  """
  if nonfinite not in NONFINITE:
    raise ValueError(f'nonfinite must be one of {NONFINITE}, got {nonfinite!r}')
  if cohort.size != 2 or cohort.stacked:
    raise ValueError('online BD-KD needs a listed cohort of two members (student, teacher)')
  weights = jnp.array([weight, teacher_weight], jnp.float32)

  def forward(params, state: TrainState, batch, rngs):
    where = batch['mask']
    logits, label_loss, model_state, loss_state, metrics = cohort_label_losses(
        cohort, objective, params, state, batch, rngs)
    distill = jnp.stack(bdkd_online_losses(logits[0], logits[1], temperature=temperature,
                                           teacher_loss=teacher_loss, where=where))
    distill_mean, metrics['loss/distill'] = jax.vmap(lambda v: reduce_value(v, where))(distill)
    losses = label_loss + weights * distill_mean
    return jnp.sum(losses), (losses, logits, model_state, loss_state, metrics)

  update = member_update(tx, nonfinite)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    rngs = cohort.split(jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(2)))
    (_, (losses, logits, model_state, loss_state, metrics)), grads = jax.value_and_grad(
        forward, has_aux=True)(state.params, state, batch, rngs)
    where = batch['mask']
    n = jnp.sum(where.astype(jnp.float32))
    metrics['loss'] = (losses * n, jnp.full((2,), n))
    metrics['accuracy'] = jax.vmap(lambda z: accuracy(z, batch['label'], where))(logits)
    p, lp, opt_state, model_state, loss_state, metrics = cohort.map(
        update, state.params['student'], state.params['loss'], grads['student'],
        grads['loss'], state.opt_state, model_state, loss_state, state.model_state,
        state.loss_state, cohort.split(losses), cohort.split(metrics))
    new = state.replace(step=state.step + 1, params={'student': p, 'loss': lp},
                        model_state=model_state, loss_state=loss_state, opt_state=opt_state)
    return new, member_metrics(metrics)

  return step


def member_metrics(per_member: tuple[dict, dict]) -> dict:
  """The step's metrics from the two members' ``(sum, count)`` dicts: the student's under
  their names, the teacher's as ``teacher/<name>``, the flags summed over both.

  >>> one = lambda v: (jnp.float32(v), jnp.float32(1))
  >>> m = member_metrics(({'loss': one(2.0)}, {'loss': one(5.0)}))
  >>> {k: float(s) for k, (s, c) in m.items()}
  {'loss': 2.0, 'teacher/loss': 5.0}
  """
  student, teacher = per_member
  out = {name: v for name, v in student.items() if name not in _FLAGS}
  out.update({f'teacher/{name}': v for name, v in teacher.items() if name not in _FLAGS})
  for name in _FLAGS:
    if name in student:
      out[name] = (student[name][0] + teacher[name][0], student[name][1] + teacher[name][1])
  return out


# --------------------------------------------------------------------------- evaluation

def make_member_evaluator(cohort: Cohort, arrays: dict, mesh, *, batch_size: int
                          ) -> Callable[[TrainState], dict]:
  """``evaluate(state)``: the student's ``accuracy`` and ``loss``, and the teacher's as
  ``teacher/accuracy``, ``teacher/loss`` (:func:`kdjax.engine.make_evaluator` each)."""
  evaluators = [make_evaluator(cohort.student(k).apply, arrays, mesh, batch_size=batch_size)
                for k in range(2)]

  def evaluate(state: TrainState) -> dict:
    params, model_state = state.params['student'], state.model_state
    student, teacher = (evaluators[k](params[k], model_state[k]) for k in range(2))
    return {**student, **{f'teacher/{k}': v for k, v in teacher.items()}}

  return evaluate


# --------------------------------------------------------------------------- the run

class BDKDOnlineSetup(NamedTuple):
  """What :func:`setup_bdkd_online` builds: the engine's :class:`~kdjax.engine.Setup`
  with the two members' step, state and evaluator (``apply`` is the student's), the
  cohort, and the options."""

  run: Setup
  cohort: Cohort
  options: dict


def setup_bdkd_online(config: ml_collections.ConfigDict, *, data: Data | None = None,
                      log: Callable[[str], None] = print) -> BDKDOnlineSetup:
  """Builds an online BD-KD run from ``config`` (writes nothing).

  Raises:
    UserError: a config, data set or scheme this run cannot use.
  """
  options = bdkd_online_options(config)
  check_label_objective(config, 'bdkd_online trains its teacher and student from the labels '
                        'and from each other')
  run = setup(config, data=data, log=log)
  cohort = make_cohort([config.model, options['teacher']], num_classes=run.spec.num_classes,
                       input_shape=run.spec.input_shape, stack=False)
  init = make_dml_init(cohort, run.objective, run.tx, input_shape=run.spec.input_shape,
                       input_dtype=run.spec.input_dtype)
  step = make_bdkd_online_step(cohort, run.objective, run.tx,
                               temperature=options['temperature'], weight=options['weight'],
                               teacher_weight=options['teacher_weight'],
                               teacher_loss=options['teacher_loss'],
                               nonfinite=str(config.nonfinite))
  eval_arrays = (data.eval if data is not None else kdata.load_arrays(
      config.data.name, config.data.eval_split, data_dir=config.data.data_dir or None))
  evaluate = make_member_evaluator(cohort, eval_arrays, run.mesh,
                                   batch_size=int(config.data.eval_batch_size))
  student_apply = cohort.student(0).apply

  def apply(params, model_state, x, **kwargs):   # the student's, on the cohort's trees
    return student_apply(params[0], model_state[0], x, **kwargs)

  run = with_step(run, config, init, step, evaluate, apply=apply)
  return BDKDOnlineSetup(run, cohort, options)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains online BD-KD into ``workdir`` and returns the summary (``summary.json``):
  ``eval_accuracy`` / ``eval_loss`` the student's, ``teacher_accuracy`` /
  ``teacher_eval_loss`` the teacher's, ``teacher_term`` the teacher's distillation term, ``train_loss`` the student's. A rerun resumes from
  the last checkpoint to the same result as an uninterrupted run.

  Raises:
    UserError: a bad config, scheme, data set or workdir (nothing written).
    Diverged: a non-finite loss or gradient norm.
  """
  workdir = workdir_lib.resolve(workdir)
  online = setup_bdkd_online(config, log=log_line)
  run = online.run
  fitted, start = fit_run(run, config, workdir, identity=IDENTITY)
  summary = {'scheme': NAME, 'members': list(MEMBERS),
             'teacher_term': online.options['teacher_loss'],
             **fitted.summary(resumed_from=start, feed=run.feed_kind),
             'teacher_accuracy': fitted.eval.get('teacher/accuracy'),
             'teacher_eval_loss': fitted.eval.get('teacher/loss'),
             'teacher_train_loss': fitted.train.get('teacher/loss')}
  summary['skipped_member_steps'] = summary.pop('skipped_steps')
  write_summary(workdir, summary)
  if jax.process_index() == 0:
    metrics_lib.plot_learning_curves(workdir, title='online BD-KD (student)')
  return summary
