r"""Online ensemble distillation: K branches trained together, each from the labels and
from the ensemble of all of them (KDCL-Naive, ONE).

Branch :math:`k` of :math:`K \ge 2` minimizes its label loss (the objective of
``config.loss.terms``, cross-entropy by default) plus the distillation loss from the
ensemble's logits :math:`z_e`, a teacher made of the branches themselves and held under
``stop_gradient``:

.. math::

  L_k = L_{\mathrm{label}}(z_k, y)
        + w\,T^2\,\mathrm{KL}\big(\mathrm{softmax}(\mathrm{sg}(z_e) / T) \,\|\,
                                  \mathrm{softmax}(z_k / T)\big)

(:math:`w`: ``config.scheme.weight``; :math:`T`: ``config.scheme.temperature``). The
ensemble (``config.scheme.ensemble``):

* ``'average'`` (scheme ``kdcl``): :math:`z_e = \frac{1}{K}\sum_k z_k`, the mean of the
  branch logits: KDCL-Naive of Guo et al. (the paper's other variants, KDCL-Linear,
  -MinLogit and -General, are not implemented).
* ``'gate'`` (scheme ``one``): :math:`z_e = \sum_k g_k(x)\, z_k`, with
  :math:`g(x) = \mathrm{softmax}(\mathrm{gate}(x))` a small network on the flattened
  input (:func:`gate_apply`: linear, or one ReLU hidden layer of
  ``config.scheme.gate_hidden`` units), trained by the ensemble's cross-entropy
  :math:`\mathrm{CE}(\sum_k g_k(x)\,\mathrm{sg}(z_k), y)` over the labeled examples. Its
  output layer starts at zero, so the gate starts uniform (the KDCL-Naive teacher).

Choices against the papers. ONE (Lan et al.) shares the low layers of one network
between its branches and puts the gate on those shared features; kdjax's models have no
branch points, so here the branches are K independent students of one architecture
(stacked and vmapped, as :mod:`kdjax.schemes.dml` does; ``config.scheme.students`` may
list K different ones, then looped) and the gate reads the input. In ONE the
ensemble's cross-entropy also trains the branches; here it trains the gate only, so
every branch's gradient is exactly that of its :math:`L_k`. KDCL gives each student
its own augmentation of the image; here all branches see the same (augmented) batch.
Branch :math:`k` starts from the parameters ``kdjax train`` would make with seed
``seed * K + k``; each branch has its own optimizer state, the gate one more.

The run is DML's (:func:`kdjax.schemes.dml.setup_dml` is its model): the engine's
setup, feed, loop, checkpoints and resume. Evaluation reports each branch, their
mean, and the ensemble (its logits :math:`z_e`).

References:
  Guo, Wang, Wu, Yu, Liang, Hu, Luo. Online Knowledge Distillation via Collaborative
  Learning. CVPR 2020 (KDCL; the Naive ensemble of logits, the loss of each student).
  Lan, Zhu, Gong. Knowledge Distillation by On-the-Fly Native Ensemble. NeurIPS 2018.
  arXiv:1806.04606 (ONE: the gated ensemble of branch logits, each branch's CE +
  :math:`T^2` KL from the ensemble, :math:`T = 3`).
"""

from __future__ import annotations

import math
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
from kdjax.engine.loop import Fitted
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
from kdjax.parallel import shardings_from_rules
from kdjax.schemes.cohort import Cohort
from kdjax.schemes.cohort import cohort_summary
from kdjax.schemes.cohort import make_cohort
from kdjax.schemes.dml import cohort_label_losses
from kdjax.schemes.dml import cohort_metrics
from kdjax.schemes.dml import make_dml_init
from kdjax.schemes.dml import member_update

# Scheme name -> its ensemble.
ENSEMBLES = {'kdcl': 'average', 'one': 'gate'}
NAMES = tuple(ENSEMBLES)
# config.scheme's fields and their defaults (students: [] -> num_branches copies of
# config.model; gate_hidden: 0 -> a linear gate; used by 'one' only).
DEFAULTS = {'name': 'kdcl', 'num_branches': 3, 'temperature': 3.0, 'weight': 1.0,
            'gate_hidden': 0, 'students': []}
IDENTITY = (*IDENTITY_FIELDS, 'scheme')


def online_scheme(name: str = 'kdcl', **options) -> ml_collections.ConfigDict:
  """``config.scheme`` for an online ensemble (``'kdcl'`` or ``'one'``): :data:`DEFAULTS`
  with ``options`` over them.

  >>> online_scheme('one', num_branches=4).num_branches
  4
  """
  unknown = set(options) - set(DEFAULTS)
  if unknown or name not in ENSEMBLES:
    raise ValueError(f'online_scheme({name!r}, {sorted(unknown)}): use a name of {NAMES} '
                     f'and options of {", ".join(DEFAULTS)}')
  return ml_collections.ConfigDict({**DEFAULTS, 'name': name, **options})


def online_options(config: ml_collections.ConfigDict) -> dict:
  """``config.scheme`` checked, with :data:`DEFAULTS` for the fields it leaves out, and
  ``ensemble`` (``'average'`` or ``'gate'``) from its name.

  Raises:
    UserError: an unknown field, fewer than two branches, a temperature that is not
      positive, a negative weight or gate width, or ``students`` that are not K model
      configs.

  >>> online_options(ml_collections.ConfigDict({'scheme': {'name': 'one',
  ...                                                      'num_branches': 1}}))
  Traceback (most recent call last):
  kdjax.errors.UserError: config.scheme.num_branches must be an integer >= 2, got 1
  """
  options = with_defaults(config.scheme, DEFAULTS, dotted='scheme', what='an option of the online ensembles (kdcl, one)')
  checked = ml_collections.ConfigDict({'scheme': {k: v for k, v in options.items()
                                                  if k != 'students'}})
  check_int(checked, 'scheme.num_branches', 2)
  check_number(checked, 'scheme.temperature', lambda v: v > 0, 'positive')
  check_number(checked, 'scheme.weight', lambda v: v >= 0, '>= 0')
  check_int(checked, 'scheme.gate_hidden', 0)
  k, students = int(options['num_branches']), options['students']
  if not isinstance(students, (list, tuple)) or not all(
      hasattr(s, 'get') and isinstance(s.get('name'), str) for s in students):
    raise UserError("config.scheme.students must be a list of model configs such as "
                    "[{'name': 'mlp', 'kwargs': {'hidden': (64,)}}] (or [] for "
                    f"num_branches copies of config.model), got {students!r}")
  if students and len(students) != k:
    raise UserError(f'config.scheme.students lists {len(students)} models but '
                    f'config.scheme.num_branches is {k}; make them agree')
  options.update(num_branches=k, temperature=float(options['temperature']),
                 weight=float(options['weight']), gate_hidden=int(options['gate_hidden']),
                 students=list(students), ensemble=ENSEMBLES[options['name']])
  return options


# --------------------------------------------------------------------------- the ensemble

def init_gate(key: jax.Array, input_dim: int, num_branches: int, hidden: int = 0) -> dict:
  """The gate's parameters: ``{'out': {'w', 'b'}}`` (zeros: a uniform gate at the start),
  and with ``hidden > 0`` a ReLU layer ``{'hidden': {'w', 'b'}}`` before it (LeCun
  normal weights, zero biases).

  >>> p = init_gate(jax.random.key(0), 5, 3, hidden=4)
  >>> p['hidden']['w'].shape, p['out']['w'].shape
  ((5, 4), (4, 3))
  """
  width = hidden or input_dim
  params = {'out': {'w': jnp.zeros((width, num_branches), jnp.float32),
                    'b': jnp.zeros((num_branches,), jnp.float32)}}
  if hidden:
    w = jax.random.normal(key, (input_dim, hidden), jnp.float32) / math.sqrt(input_dim)
    params['hidden'] = {'w': w, 'b': jnp.zeros((hidden,), jnp.float32)}
  return params


def gate_apply(params: dict, x: jax.Array) -> jax.Array:
  """The gate's weights over the branches, ``[batch, K]`` (each row sums to 1), from the
  inputs ``x`` (``[batch, ...]``, flattened).

  >>> gate_apply(init_gate(jax.random.key(0), 2, 4), jnp.ones((1, 2))).tolist()
  [[0.25, 0.25, 0.25, 0.25]]
  """
  h = jnp.reshape(x, (x.shape[0], -1)).astype(jnp.float32)
  if 'hidden' in params:
    h = jax.nn.relu(h @ params['hidden']['w'] + params['hidden']['b'])
  return jax.nn.softmax(h @ params['out']['w'] + params['out']['b'], axis=-1)


def ensemble_logits(logits: jax.Array, weights: jax.Array | None = None) -> jax.Array:
  r"""The ensemble's logits from the branches' ``[K, batch, classes]``: their mean
  (KDCL-Naive), or :math:`\sum_k g_{bk} z_{kb}` with ``weights`` :math:`g` of shape
  ``[batch, K]`` (ONE's gate).

  >>> z = jnp.array([[[2.0, 0.0]], [[0.0, 4.0]]])
  >>> ensemble_logits(z).tolist(), ensemble_logits(z, jnp.array([[0.75, 0.25]])).tolist()
  ([[1.0, 2.0]], [[1.5, 1.0]])
  """
  logits = logits.astype(jnp.float32)
  if weights is None:
    return jnp.mean(logits, axis=0)
  return jnp.einsum('kbc,bk->bc', logits, weights.astype(jnp.float32))


def masked_ce(logits: jax.Array, labels: jax.Array, where: jax.Array) -> jax.Array:
  """Mean cross-entropy over the examples with ``where`` True and a label (``>= 0``)."""
  valid = jnp.logical_and(where, labels >= 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(labels, 0))
  return jnp.sum(jnp.where(valid, ce, 0.0)) / jnp.maximum(jnp.sum(valid), 1)


# --------------------------------------------------------------------------- the step

def make_online_init(cohort: Cohort, objective, tx: optax.GradientTransformation, *,
                     input_shape, input_dtype=np.float32, gated: bool,
                     gate_hidden: int = 0) -> Callable[[Any], TrainState]:
  """``init(seed) -> TrainState``: the branches as
  :func:`kdjax.schemes.dml.make_dml_init` makes a cohort, and ``params['gate']`` (``{}``
  unless ``gated``; :func:`init_gate` with key ``fold_in(key(seed), 3)``). The
  optimizer state is ``{'branches': one per branch, 'gate': tx's of the gate}``."""
  branches = make_dml_init(cohort, objective, tx, input_shape=input_shape,
                           input_dtype=input_dtype)
  input_dim = int(np.prod(input_shape))

  def init(seed) -> TrainState:
    state = branches(seed)
    gate = (init_gate(jax.random.fold_in(jax.random.key(seed), 3), input_dim, cohort.size,
                      gate_hidden) if gated else {})
    return state.replace(params={**state.params, 'gate': gate},
                         opt_state={'branches': state.opt_state, 'gate': tx.init(gate)})

  return init


def make_online_step(cohort: Cohort, objective, tx: optax.GradientTransformation, *,
                     gated: bool, temperature: float = 3.0, weight: float = 1.0,
                     nonfinite: str = 'stop') -> Callable:
  """Builds ``step(state, batch) -> (state, metrics)`` that trains every branch (and the
  gate) at once.

  One forward pass of every branch (vmapped when stacked), the ensemble's logits from
  the branches' under ``stop_gradient`` (:func:`ensemble_logits`; gated: the weights
  of :func:`gate_apply`), each branch's loss (``objective`` + ``weight`` times
  :func:`kdjax.losses.kd` from the ensemble, reduced over ``batch['mask']``), the
  gate's loss (:func:`masked_ce` of the ensemble), one gradient of their sum, one ``tx``
  update per branch and one of the gate; a non-finite branch or gate is handled as
  :func:`kdjax.engine.make_train_step` handles a non-finite step.

  Returns:
    The pure step. ``metrics`` (``(sum, count)`` pairs): as DML's
    (:func:`kdjax.schemes.dml.cohort_metrics`: ``loss``, ``accuracy``, ``loss/<term>``,
    ``loss/kd``, ``grad_norm``, per branch ``student_<k>/...``), and
    ``ensemble/accuracy``; gated, also ``gate/loss`` and ``gate/weight_<k>`` (the
    batch's mean gate weights).
  """
  if nonfinite not in NONFINITE:
    raise ValueError(f'nonfinite must be one of {NONFINITE}, got {nonfinite!r}')
  size = cohort.size

  def forward(params, state: TrainState, batch, rngs):
    where = batch['mask']

    logits, label_loss, model_state, loss_state, metrics = cohort_label_losses(
        cohort, objective, params, state, batch, rngs)
    weights = gate_apply(params['gate'], batch['x']) if gated else None
    ensemble = ensemble_logits(jax.lax.stop_gradient(logits), weights)
    target = jax.lax.stop_gradient(ensemble)
    distill = jax.vmap(lambda z: kd(z, target, temperature=temperature, where=where))(logits)
    distill_mean, metrics['loss/kd'] = jax.vmap(lambda v: reduce_value(v, where))(distill)
    losses = label_loss + weight * distill_mean
    gate_loss = masked_ce(ensemble, batch['label'], where) if gated else jnp.zeros(())
    aux = (losses, gate_loss, logits, target, weights, model_state, loss_state, metrics)
    return jnp.sum(losses) + gate_loss, aux

  update = member_update(tx, nonfinite)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    rngs = cohort.split(jax.vmap(lambda k: jax.random.fold_in(rng, k))(jnp.arange(size)))
    (_, aux), grads = jax.value_and_grad(forward, has_aux=True)(
        state.params, state, batch, rngs)
    losses, gate_loss, logits, target, weights, model_state, loss_state, metrics = aux
    where, labels = batch['mask'], batch['label']
    n = jnp.sum(where.astype(jnp.float32))
    metrics['loss'] = (losses * n, jnp.full((size,), n))
    metrics['accuracy'] = jax.vmap(lambda z: accuracy(z, labels, where))(logits)
    p, lp, opt_state, model_state, loss_state, metrics = cohort.map(
        update, state.params['student'], state.params['loss'], grads['student'],
        grads['loss'], state.opt_state['branches'], model_state, loss_state,
        state.model_state, state.loss_state, cohort.split(losses), cohort.split(metrics))
    out = cohort_metrics(cohort.stack(metrics))
    out['ensemble/accuracy'] = accuracy(target, labels, where)
    gate, gate_opt = state.params['gate'], state.opt_state['gate']
    if gated:
      updates, new_opt = tx.update(grads['gate'], gate_opt, gate)
      new_gate = optax.apply_updates(gate, updates)
      (gate, gate_opt), gate_metrics = guard_nonfinite(
          nonfinite, gate_loss, grads['gate'], (new_gate, new_opt), (gate, gate_opt),
          {'gate/loss': (gate_loss, jnp.ones((), jnp.float32))})
      for name, (s, c) in gate_metrics.items():
        if name in ('nonfinite', 'skipped'):   # the gate counts as one more member
          out[name] = (out[name][0] + s, out[name][1] + c)
        else:
          out[name if name.startswith('gate/') else f'gate/{name}'] = (s, c)
      valid = where.astype(jnp.float32)
      out.update({f'gate/weight_{k}': (jnp.sum(weights[:, k] * valid), n)
                  for k in range(size)})
    new = state.replace(step=state.step + 1,
                        params={'student': p, 'loss': lp, 'gate': gate},
                        model_state=model_state, loss_state=loss_state,
                        opt_state={'branches': opt_state, 'gate': gate_opt})
    return new, out

  return step


# --------------------------------------------------------------------------- evaluation

def online_ensemble_apply(cohort: Cohort, *, gated: bool) -> Callable:
  """``apply(params, model_state, x) -> (ModelOutput, model_state)`` of the ensemble
  (:func:`ensemble_logits`), ``params`` being ``{'student': ..., 'gate': ...}`` (the
  train state's ``params``); evaluation mode always."""

  def apply(params, model_state, x, *, train=False, rng=None, **kwargs):
    del train, rng
    logits, = cohort.map(
        lambda s, p, ms: (s.apply(p, ms, x, train=False, **kwargs)[0].logits,),
        params['student'], model_state)
    weights = gate_apply(params['gate'], x) if gated else None
    return ModelOutput(ensemble_logits(cohort.stack(logits), weights), {}), model_state

  return apply


def make_online_evaluator(cohort: Cohort, arrays: dict, mesh, *, gated: bool,
                          batch_size: int) -> Callable[[TrainState], dict]:
  """``evaluate(state)``: ``accuracy`` and ``loss`` (means over the branches),
  ``student_<k>/accuracy``, ``student_<k>/loss``, ``ensemble/accuracy`` and
  ``ensemble/loss`` over ``arrays``."""
  by_student: dict[int, Callable] = {}
  for s in cohort.students:
    by_student.setdefault(id(s), make_evaluator(s.apply, arrays, mesh, batch_size=batch_size))
  ensemble = make_evaluator(online_ensemble_apply(cohort, gated=gated), arrays, mesh,
                            batch_size=batch_size)

  def evaluate(state: TrainState) -> dict:
    params, model_state = state.params['student'], state.model_state
    rows = [by_student[id(cohort.student(k))](cohort.take(params, k),
                                              cohort.take(model_state, k))
            for k in range(cohort.size)]
    out = {name: float(np.mean([r[name] for r in rows])) for name in ('accuracy', 'loss')}
    for k, r in enumerate(rows):
      out.update({f'student_{k}/{name}': r[name] for name in ('accuracy', 'loss')})
    both = {'student': params, 'gate': state.params['gate']}
    out.update({f'ensemble/{k}': v for k, v in ensemble(both, model_state).items()})
    return out

  return evaluate


# --------------------------------------------------------------------------- the run

class OnlineSetup(NamedTuple):
  """What :func:`setup_online` builds: the engine's :class:`~kdjax.engine.Setup` with the
  branches' step, calls, state and evaluator in it, the cohort, and the options."""

  run: Setup
  cohort: Cohort
  options: dict


def check_label_objective(config: ml_collections.ConfigDict, what: str) -> None:
  """Refuses a scheme config whose ``config.loss.terms`` read a teacher, or that names
  ``config.teacher.workdir`` / ``config.teacher.cache`` (the scheme makes its own
  teacher).

  Raises:
    UserError: such a config.
  """
  terms = config.loss.terms.to_dict() if hasattr(config.loss.terms, 'to_dict') else dict(
      config.loss.terms)
  try:
    reads_teacher = bool(build_objective(terms).needs & (TEACHER_NEEDS | CACHE_NEEDS))
  except (KeyError, ValueError):
    reads_teacher = False   # the engine's setup reports a bad term
  if reads_teacher or config.teacher.workdir or config.teacher.cache:
    raise UserError(f'{what}: use label losses in config.loss.terms (e.g. {{\'ce\': {{}}}}) '
                    'and leave config.teacher.workdir and config.teacher.cache empty')


def setup_online(config: ml_collections.ConfigDict, *, data: Data | None = None,
                 stack: bool | None = None, log: Callable[[str], None] = print
                 ) -> OnlineSetup:
  """Builds an online-ensemble run (``kdcl`` or ``one``) from ``config`` (writes nothing).

  Raises:
    UserError: a config, data set or scheme this run cannot use.
  """
  options = online_options(config)
  check_label_objective(config, f'{options["name"]} trains its branches from the labels and '
                        'from their own ensemble')
  run = setup(config, data=data, log=log)
  size, gated = options['num_branches'], options['ensemble'] == 'gate'
  models = options['students'] or [config.model] * size
  cohort = make_cohort(models, num_classes=run.spec.num_classes,
                       input_shape=run.spec.input_shape, stack=stack)
  init = make_online_init(cohort, run.objective, run.tx, input_shape=run.spec.input_shape,
                          input_dtype=run.spec.input_dtype, gated=gated,
                          gate_hidden=options['gate_hidden'])
  step = make_online_step(cohort, run.objective, run.tx, gated=gated,
                          temperature=options['temperature'], weight=options['weight'],
                          nonfinite=str(config.nonfinite))
  eval_arrays = (data.eval if data is not None else kdata.load_arrays(
      config.data.name, config.data.eval_split, data_dir=config.data.data_dir or None))
  evaluate = make_online_evaluator(cohort, eval_arrays, run.mesh, gated=gated,
                                   batch_size=int(config.data.eval_batch_size))
  run = with_step(run, config, init, step, evaluate,
                  apply=online_ensemble_apply(cohort, gated=gated))
  return OnlineSetup(run, cohort, options)


def with_step(run: Setup, config: ml_collections.ConfigDict, init: Callable, step: Callable,
              evaluate: Callable, *, apply: Callable, feed=None) -> Setup:
  """``run`` with a scheme's pure ``init(seed)``, ``step`` and ``evaluate`` (and
  ``feed``, default ``run.feed``): the state's shapes, its shardings by
  ``config.partition_rules``, a jitted init that makes it in them, and the calls."""
  seed = np.int32(config.seed)
  abstract = jax.eval_shape(init, seed)
  shardings = shardings_from_rules(abstract, config.partition_rules, run.mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  make_state = jax.jit(init, out_shardings=shardings)
  feed = run.feed if feed is None else feed
  calls = TrainCalls(step, feed, state_shardings=shardings, mesh=run.mesh)
  return run._replace(apply=apply, step=step, calls=calls, feed=feed,
                      state_shardings=shardings, abstract_state=abstract,
                      init=lambda: make_state(seed), evaluate=evaluate)


def log_line(msg: str) -> None:
  """Prints ``msg`` on process 0."""
  if jax.process_index() == 0:
    print(msg, flush=True)


def fit_run(run: Setup, config: ml_collections.ConfigDict, workdir: str, *,
            identity=IDENTITY, log: Callable[[str], None] = log_line
            ) -> tuple[Fitted, int | None]:
  """:func:`kdjax.engine.loop.fit_workdir` with a scheme's identity fields and log."""
  return fit_workdir(run, config, workdir, identity=identity, log=log)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains an online ensemble (``kdcl`` or ``one``) into ``workdir`` and returns the
  summary (``summary.json``): the usual figures, with ``eval_accuracy`` / ``eval_loss``
  the branches' means, plus ``student_accuracies``, ``student_losses``,
  ``ensemble_accuracy`` and ``ensemble_loss``. A rerun resumes from the last checkpoint
  to the same result as an uninterrupted run.

  Raises:
    UserError: a bad config, scheme, data set or workdir (nothing written).
    Diverged: a non-finite loss or gradient norm (``summary.json`` says where).
  """
  workdir = workdir_lib.resolve(workdir)
  online = setup_online(config, log=log_line)
  run, size = online.run, online.cohort.size
  fitted, start = fit_run(run, config, workdir)
  summary = {'scheme': online.options['name'], 'ensemble': online.options['ensemble'],
             'num_branches': size, 'stacked': online.cohort.stacked,
             **cohort_summary(fitted, size, resumed_from=start, feed=run.feed_kind)}
  write_summary(workdir, summary)
  if jax.process_index() == 0:
    title = {'average': 'KDCL-Naive', 'gate': 'ONE'}[online.options['ensemble']]
    metrics_lib.plot_learning_curves(workdir, title=f'{title}, {size} branches')
  return summary
