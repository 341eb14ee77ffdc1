r"""Self-distillation in one run: the teacher is the student itself. Three schemes share
one train step (:func:`make_self_step`), which adds a scheme's term to the label loss of
``config.loss.terms`` (cross-entropy by default) and keeps the teacher, where it has
state, in the train state (checkpointed, so a resumed run ends where an uninterrupted
one does):

* ``byot`` (Be Your Own Teacher): a classifier head after some of the network's blocks
  (``config.scheme.heads``: block numbers; the model's ``stage{i}`` features), each head
  a bottleneck :math:`h_i = \mathrm{ReLU}(W_i\,\mathrm{flat}(F_i) + b_i)` of the deepest
  features' width and a linear classifier :math:`z_i = V_i h_i + c_i`. With the
  deepest (the model's own) logits :math:`z_N` and features :math:`f_N` (the model's
  ``penultimate``), both under ``stop_gradient``, every head adds (:func:`byot_loss`)

  .. math::

    L_i = (1 - \alpha)\,\mathrm{CE}(z_i, y)
          + \alpha\,\mathrm{KL}\big(\mathrm{softmax}(z_N / T) \,\|\,
                                   \mathrm{softmax}(z_i / T)\big)
          + \lambda\,\lVert h_i - f_N \rVert_2^2

  (:math:`\alpha`: ``alpha`` 0.3, :math:`T`: ``temperature`` 3, :math:`\lambda`:
  ``feature_weight`` 0.03, the authors' code's defaults). The deepest classifier
  trains with the label loss alone.
* ``mean_teacher``: the teacher is an exponential moving average of the student's
  weights (parameters and float model state), updated after every step
  (:func:`ema_update`) with :math:`d_t = \min(d, 1 - 1/(t + 1))` at step :math:`t`
  (``decay`` :math:`d`), and the student adds
  :math:`w_t\,T^2\,\mathrm{KL}(\mathrm{softmax}(z^{\mathrm{ema}}/T) \,\|\,
  \mathrm{softmax}(z/T))`, the teacher in evaluation mode; :math:`w_t` ramps up from
  0 to ``weight`` over ``rampup_steps`` as :math:`\exp(-5(1 - t/R)^2)` (0: no ramp).
* ``snapshot``: the learning rate follows ``num_cycles`` cosine cycles (each restarts
  at the configured rate and anneals to 0; :func:`cyclic_cosine`); the weights at the
  end of each cycle (a minimum of the rate) are kept, the last ``ensemble_size`` of
  them, in the state. From the second cycle on the student adds
  :math:`w\,T^2\,\mathrm{KL}(\bar p^T \,\|\, \mathrm{softmax}(z/T))`, :math:`\bar p^T`
  the mean of the kept snapshots' tempered softmax outputs. The summary reports the
  snapshot ensemble (the mean of their softmax outputs, the final weights among them).

The run is the engine's: :func:`kdjax.engine.setup` (data, feed, optimizer, mesh), the
state made in its shardings, :func:`kdjax.engine.loop.fit` with its checkpoints and
resume.

Choices against the papers. BYOT's shallow heads are convolutional bottlenecks (ResNet
blocks) and the feature hint passes through an adaptation layer; here a head is one
dense bottleneck (it maps straight to the deepest features' width, so no adaptation
layer is needed). The authors' code takes the unsquared distance over the whole batch
(``torch.dist``) and the soft cross-entropy without :math:`T^2`; here the paper's
squared distance per example and the KL without :math:`T^2` (the same gradient as that
cross-entropy). The mean teacher of Tarvainen & Valpola uses an MSE consistency of the
softmax outputs on differently noised inputs; here the KD loss on the same batch, the
EMA teacher in evaluation mode (no dropout). Snapshot ensembles (Huang et al.) train
without a teacher; distilling the ensemble of earlier snapshots into the later cycles
is snapshot distillation's idea (Yang et al.) with an ensemble teacher instead of the
last snapshot.

References:
  Zhang, Song, Gao, Chen, Bao, Ma. Be Your Own Teacher: Improve the Performance of
  Convolutional Neural Networks via Self Distillation. ICCV 2019. arXiv:1905.08094.
  Reference code luanyunteng/pytorch-be-your-own-teacher (``train.py``:
  ``--temperature 3``, ``--loss_coefficient 0.3``, ``--feature_loss_coefficient
  0.03``).
  Tarvainen, Valpola. Mean teachers are better role models: Weight-averaged consistency
  targets improve semi-supervised deep learning results. NeurIPS 2017.
  arXiv:1703.01780 (the EMA of the weights, :math:`d_t = \min(d, 1 - 1/(t+1))`,
  the sigmoid ramp-up :math:`\exp(-5(1 - t)^2)`).
  Huang, Li, Pleiss, Liu, Hopcroft, Weinberger. Snapshot Ensembles: Train 1, Get M for
  Free. ICLR 2017. arXiv:1704.00109 (cyclic cosine annealing, an ensemble of the
  snapshots at the cycles' ends).
  Yang, Xie, Qiao, Yuille. Snapshot Distillation: Teacher-Student Optimization in One
  Generation. CVPR 2019. arXiv:1812.00123.
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
from kdjax.engine.evaluate import make_evaluator
from kdjax.engine.loop import write_summary
from kdjax.engine.optim import make_optimizer
from kdjax.engine.setup import Data
from kdjax.engine.setup import Setup
from kdjax.engine.setup import setup
from kdjax.engine.state import TrainState
from kdjax.engine.step import NONFINITE
from kdjax.engine.step import accuracy
from kdjax.engine.step import guard_nonfinite
from kdjax.errors import UserError
from kdjax.losses import kd
from kdjax.models import ModelOutput
from kdjax.models import from_config
from kdjax.models.base import model_kwargs
from kdjax.models.base import objective_inputs
from kdjax.models.base import sample_inputs
from kdjax.schemes.online import check_label_objective
from kdjax.schemes.online import fit_run
from kdjax.schemes.online import log_line
from kdjax.schemes.online import with_step

# config.scheme's fields and their defaults, by scheme.
DEFAULTS = {
    'byot': {'name': 'byot', 'heads': [], 'alpha': 0.3, 'temperature': 3.0,
             'feature_weight': 0.03},
    'mean_teacher': {'name': 'mean_teacher', 'decay': 0.999, 'temperature': 1.0,
                     'weight': 1.0, 'rampup_steps': 0},
    'snapshot': {'name': 'snapshot', 'num_cycles': 4, 'ensemble_size': 2,
                 'temperature': 3.0, 'weight': 1.0},
}
NAMES = tuple(DEFAULTS)


def self_scheme(name: str, **options) -> ml_collections.ConfigDict:
  """``config.scheme`` of a self-distillation scheme: its :data:`DEFAULTS` with
  ``options`` over them.

  >>> self_scheme('mean_teacher', decay=0.99).decay
  0.99
  """
  if name not in DEFAULTS or set(options) - set(DEFAULTS[name]):
    raise ValueError(f'self_scheme({name!r}, {sorted(options)}): use a name of {NAMES} and '
                     'its options')
  return ml_collections.ConfigDict({**DEFAULTS[name], **options})


def self_options(config: ml_collections.ConfigDict) -> dict:
  """``config.scheme`` checked, with its scheme's :data:`DEFAULTS` for what it leaves out.

  Raises:
    UserError: an unknown field, or a value out of range (an EMA decay outside
      ``[0, 1)``, BYOT without heads, a cycle count below 2, ...).

  >>> self_options(ml_collections.ConfigDict({'scheme': {'name': 'mean_teacher',
  ...                                                    'decay': 1.0}}))
  Traceback (most recent call last):
  kdjax.errors.UserError: config.scheme.decay must be in [0, 1) (the EMA teacher's decay), got 1.0
  """
  raw = config.scheme.to_dict() if hasattr(config.scheme, 'to_dict') else dict(config.scheme)
  name = raw.get('name')
  if name not in DEFAULTS:
    raise UserError(f'config.scheme.name {name!r} is not a self-distillation scheme; use one '
                    f'of {", ".join(NAMES)}')
  options = with_defaults(raw, DEFAULTS[name], dotted='scheme', what=f'an option of {name}')
  checked = ml_collections.ConfigDict({'scheme': {k: v for k, v in options.items()
                                                  if k != 'heads'}})
  if 'temperature' in options:
    check_number(checked, 'scheme.temperature', lambda v: v > 0, 'positive')
  if name == 'byot':
    check_number(checked, 'scheme.alpha', lambda v: 0 <= v <= 1, 'in [0, 1]')
    check_number(checked, 'scheme.feature_weight', lambda v: v >= 0, '>= 0')
    heads = options['heads']
    if (not isinstance(heads, (list, tuple)) or not heads or any(
        isinstance(h, bool) or not isinstance(h, int) or h < 1 for h in heads)
        or len(set(heads)) != len(heads)):
      raise UserError(f'config.scheme.heads must list the blocks (1, 2, ...) to put a BYOT '
                      f'head after, such as [1, 2], without repeats (got {heads!r})')
    options['heads'] = sorted(int(h) for h in heads)
  elif name == 'mean_teacher':
    value = options['decay']
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value < 1:
      raise UserError(f'config.scheme.decay must be in [0, 1) (the EMA teacher\'s decay), '
                      f'got {value!r}')
    check_number(checked, 'scheme.weight', lambda v: v >= 0, '>= 0')
    check_int(checked, 'scheme.rampup_steps', 0)
  else:
    check_int(checked, 'scheme.num_cycles', 2)
    check_int(checked, 'scheme.ensemble_size', 1)
    check_number(checked, 'scheme.weight', lambda v: v >= 0, '>= 0')
    if int(config.num_steps) % int(options['num_cycles']):
      raise UserError(f'config.num_steps ({config.num_steps}) must be a multiple of '
                      f'config.scheme.num_cycles ({options["num_cycles"]}): equal cycles')
  return {k: (float(v) if isinstance(v, float) else v) for k, v in options.items()}


# --------------------------------------------------------------------------- the math

def byot_loss(head_logits: jax.Array, deepest_logits: jax.Array, head_features: jax.Array,
              deepest_features: jax.Array, labels: jax.Array, *, alpha: float,
              temperature: float, feature_weight: float) -> jax.Array:
  r"""BYOT's loss of one shallow head, per example (see the module docstring):
  :math:`(1-\alpha)\,\mathrm{CE}(z_i, y) + \alpha\,\mathrm{KL}(\mathrm{softmax}(z_N/T)
  \,\|\, \mathrm{softmax}(z_i/T)) + \lambda\lVert h_i - f_N\rVert^2`, the deepest
  logits and features held under ``stop_gradient``. Unlabeled examples (label ``-1``)
  keep the KL and feature terms only.

  Args:
    head_logits: :math:`z_i`, ``[batch, classes]``.
    deepest_logits: :math:`z_N`, ``[batch, classes]``.
    head_features: :math:`h_i`, ``[batch, dim]``.
    deepest_features: :math:`f_N`, ``[batch, dim]``.
    labels: ``[batch]`` class ids.
    alpha: :math:`\alpha`.
    temperature: :math:`T`.
    feature_weight: :math:`\lambda`.

  Returns:
    ``[batch]`` float32.

  References:
    Zhang et al., Be Your Own Teacher, ICCV 2019, arXiv:1905.08094 (Sec. 3.2).

  >>> z = jnp.array([[0.0, 2.0]]); h = jnp.zeros((1, 3))
  >>> float(byot_loss(z, z, h, h, jnp.array([1]), alpha=1.0, temperature=3.0,
  ...                 feature_weight=1.0)[0])
  0.0
  """
  z = head_logits.astype(jnp.float32)
  t = jax.lax.stop_gradient(deepest_logits.astype(jnp.float32))
  f = jax.lax.stop_gradient(deepest_features.astype(jnp.float32))
  valid = labels >= 0
  ce = optax.softmax_cross_entropy_with_integer_labels(z, jnp.maximum(labels, 0))
  log_p = jax.nn.log_softmax(t / temperature)
  kl = jnp.sum(jnp.exp(log_p) * (log_p - jax.nn.log_softmax(z / temperature)), axis=-1)
  hint = jnp.sum(jnp.square(head_features.astype(jnp.float32) - f), axis=-1)
  return (1.0 - alpha) * jnp.where(valid, ce, 0.0) + alpha * kl + feature_weight * hint


def ema_update(teacher, student, step: jax.Array, decay: float):
  r"""The mean teacher after step ``step`` (1 after the first update):
  :math:`\theta' \leftarrow d_t\,\theta' + (1 - d_t)\,\theta`,
  :math:`d_t = \min(d, 1 - 1/(t + 1))`; leaves that are not floating point (counters)
  are the student's.

  >>> ema_update({'w': jnp.zeros(2)}, {'w': jnp.ones(2)}, jnp.int32(1), 0.9)['w'].tolist()
  [0.5, 0.5]
  """
  d = jnp.minimum(jnp.float32(decay), 1.0 - 1.0 / (step.astype(jnp.float32) + 1.0))

  def one(t, s):
    if not jnp.issubdtype(jnp.asarray(s).dtype, jnp.floating):
      return s
    return (d * t.astype(jnp.float32) + (1.0 - d) * s.astype(jnp.float32)).astype(s.dtype)

  return jax.tree.map(one, teacher, student)


def rampup(step: jax.Array, steps: int) -> jax.Array:
  r"""The mean teacher's ramp-up :math:`\exp(-5(1 - \min(t/R, 1))^2)` (1 when ``steps``
  :math:`R` is 0).

  >>> float(rampup(jnp.int32(10), 10)), float(rampup(jnp.int32(0), 0))
  (1.0, 1.0)
  """
  if not steps:
    return jnp.ones((), jnp.float32)
  phase = jnp.clip(step.astype(jnp.float32) / steps, 0.0, 1.0)
  return jnp.exp(-5.0 * jnp.square(1.0 - phase))


def cyclic_cosine(cycle_steps: int) -> Callable[[jax.Array], jax.Array]:
  r"""The snapshot ensembles' learning-rate factor,
  :math:`\tfrac12(1 + \cos(\pi\,(t \bmod L) / L))` with :math:`L` = ``cycle_steps``:
  1 at each cycle's start, near 0 at its end.

  >>> f = cyclic_cosine(4)
  >>> [round(float(f(jnp.int32(t))), 3) for t in (0, 2, 3, 4)]
  [1.0, 0.5, 0.146, 1.0]
  """
  def factor(count):
    phase = jnp.mod(count, cycle_steps).astype(jnp.float32) / cycle_steps
    return 0.5 * (1.0 + jnp.cos(jnp.pi * phase))
  return factor


def ensemble_probs(logits: jax.Array, valid: jax.Array, temperature: float) -> jax.Array:
  r"""The mean tempered softmax of the ``valid`` members of ``logits``
  (``[M, batch, classes]``, ``valid`` ``[M]``); uniform when none is valid.

  >>> ensemble_probs(jnp.array([[[0.0, 0.0]], [[9.0, 0.0]]]), jnp.array([True, False]),
  ...                1.0).tolist()
  [[0.5, 0.5]]
  """
  w = valid.astype(jnp.float32)
  probs = jax.nn.softmax(logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.einsum('m,mbc->bc', w, probs) / jnp.maximum(jnp.sum(w), 1.0)


# --------------------------------------------------------------------------- BYOT heads

def init_heads(key: jax.Array, features: dict, heads, width: int, num_classes: int) -> dict:
  """BYOT's heads: for each block ``i`` of ``heads``, ``{'bottleneck': {'w', 'b'},
  'fc': {'w', 'b'}}`` from the flattened ``features['stage{i}']`` to ``width`` and on to
  the classes (LeCun normal weights, zero biases), under ``'stage{i}'``.

  >>> p = init_heads(jax.random.key(0), {'stage1': jnp.zeros((2, 5, 3))}, [1], 4, 10)
  >>> p['stage1']['bottleneck']['w'].shape, p['stage1']['fc']['w'].shape
  ((15, 4), (4, 10))
  """
  out = {}
  for n, i in enumerate(heads):
    dim = math.prod(features[f'stage{i}'].shape[1:])
    k1, k2 = jax.random.split(jax.random.fold_in(key, n))
    out[f'stage{i}'] = {
        'bottleneck': {'w': jax.random.normal(k1, (dim, width), jnp.float32) / math.sqrt(dim),
                       'b': jnp.zeros((width,), jnp.float32)},
        'fc': {'w': jax.random.normal(k2, (width, num_classes), jnp.float32) / math.sqrt(width),
               'b': jnp.zeros((num_classes,), jnp.float32)}}
  return out


def head_apply(params: dict, feature: jax.Array) -> tuple[jax.Array, jax.Array]:
  """One head on a block's features: ``(logits, bottleneck features)``."""
  h = jnp.reshape(feature, (feature.shape[0], -1)).astype(jnp.float32)
  h = jax.nn.relu(h @ params['bottleneck']['w'] + params['bottleneck']['b'])
  return h @ params['fc']['w'] + params['fc']['b'], h


# --------------------------------------------------------------------------- the step

class Method(NamedTuple):
  """What a scheme adds to the shared step.

  Attributes:
    init: ``init(key, params, model_state, sample_output) -> (extra_params, teacher)``:
      trainable parameters beside the student's (BYOT's heads) and the teacher's
      state (the EMA weights, the snapshots).
    loss: ``loss(params, teacher, out, model_state, batch, step) -> (per-example loss,
      metrics)``: the scheme's term.
    update: ``update(teacher, params, model_state, step) -> teacher`` after the
      optimizer's update, ``step`` the new step count.
  """

  init: Callable
  loss: Callable
  update: Callable


def make_method(name: str, options: dict, apply: Callable) -> Method:
  """The :class:`Method` of scheme ``name`` with its checked ``options``; ``apply`` is
  the student's pure apply (the teacher's, too)."""
  T = options.get('temperature', 1.0)
  if name == 'byot':
    heads = options['heads']

    def init(key, params, model_state, out):
      del params, model_state
      width = out.features['penultimate'].shape[-1]
      return {'heads': init_heads(key, out.features, heads, width, out.logits.shape[-1])}, {}

    def loss(params, teacher, out, model_state, batch, step):
      del teacher, model_state, step
      total, metrics = 0.0, {}
      for i in heads:
        z, h = head_apply(params['heads'][f'stage{i}'], out.features[f'stage{i}'])
        per = byot_loss(z, out.logits, h, out.features['penultimate'], batch['label'],
                        alpha=options['alpha'], temperature=T,
                        feature_weight=options['feature_weight'])
        total = total + per
        metrics[f'head{i}/accuracy'] = accuracy(z, batch['label'], batch['mask'])
      return total, metrics

    return Method(init, loss, lambda teacher, params, model_state, step: teacher)

  if name == 'mean_teacher':
    def init(key, params, model_state, out):
      del key, out
      return {}, {'params': params, 'model_state': model_state}

    def loss(params, teacher, out, model_state, batch, step):
      del params, model_state
      t_out, _ = apply(teacher['params'], teacher['model_state'], batch['x'], train=False,
                       **model_kwargs(batch))
      target = jax.lax.stop_gradient(t_out.logits.astype(jnp.float32))
      w = options['weight'] * rampup(step, int(options['rampup_steps']))
      return w * kd(out.logits, target, temperature=T), {
          'teacher/accuracy': accuracy(target, batch['label'], batch['mask'])}

    def update(teacher, params, model_state, step):
      return ema_update(teacher, {'params': params['student'], 'model_state': model_state},
                        step, options['decay'])

    return Method(init, loss, update)

  size, cycle = int(options['ensemble_size']), int(options['cycle_steps'])

  def init(key, params, model_state, out):
    del key, out
    stack = lambda tree: jax.tree.map(lambda a: jnp.stack([a] * size), tree)
    return {}, {'params': stack(params), 'model_state': stack(model_state),
                'taken': jnp.zeros((), jnp.int32)}

  def loss(params, teacher, out, model_state, batch, step):
    del params, model_state, step
    logits = jax.vmap(lambda p, s: apply(p, s, batch['x'], train=False,
                                         **model_kwargs(batch))[0].logits)(
        teacher['params'], teacher['model_state'])
    valid = jnp.arange(size) < teacher['taken']
    target = jax.lax.stop_gradient(ensemble_probs(logits, valid, T))
    log_q = jax.nn.log_softmax(out.logits.astype(jnp.float32) / T)
    kl = jnp.sum(target * (jnp.log(jnp.maximum(target, 1e-30)) - log_q), axis=-1)
    on = (teacher['taken'] > 0).astype(jnp.float32)
    return on * options['weight'] * T * T * kl, {'snapshots': (teacher['taken'].astype(
        jnp.float32), jnp.ones((), jnp.float32))}

  def update(teacher, params, model_state, step):
    end = jnp.mod(step, cycle) == 0
    slot = jnp.mod(teacher['taken'], size)
    put = jnp.logical_and(end, jnp.arange(size) == slot)

    def one(buf, new):
      mask = jnp.reshape(put, (size,) + (1,) * new.ndim)
      return jnp.where(mask, new[None].astype(buf.dtype), buf)

    return {'params': jax.tree.map(one, teacher['params'], params['student']),
            'model_state': jax.tree.map(one, teacher['model_state'], model_state),
            'taken': teacher['taken'] + end.astype(jnp.int32)}

  return Method(init, loss, update)


def make_self_init(init_params: Callable, apply: Callable, objective, tx, method: Method, *,
                   input_shape, input_dtype=np.float32) -> Callable[[Any], TrainState]:
  """``init(seed) -> TrainState``: the student as ``kdjax train`` makes it with ``seed``,
  the objective's learned parts, the method's extra parameters (in ``params``) and its
  teacher (``loss_state['teacher']``; the objective's state is ``loss_state['objective']``)."""
  x = np.zeros((2, *input_shape), input_dtype)

  def init(seed) -> TrainState:
    params, model_state = init_params(seed)
    out, _ = apply(params, model_state, x, train=False)
    sample = sample_inputs(out)
    key = jax.random.key(seed)
    loss_params, loss_state = objective.init(jax.random.fold_in(key, 1), sample)
    extra, teacher = method.init(jax.random.fold_in(key, 3), params, model_state, out)
    trainable = {'student': params, 'loss': loss_params, **extra}
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                      model_state=model_state,
                      loss_state={'objective': loss_state, 'teacher': teacher},
                      opt_state=tx.init(trainable),
                      rng=jax.random.key_data(jax.random.fold_in(key, 2)))

  return init


def make_self_step(apply: Callable, objective, tx: optax.GradientTransformation,
                   method: Method, *, nonfinite: str = 'stop') -> Callable:
  """``step(state, batch) -> (state, metrics)``: the label loss of ``objective`` plus the
  method's term (batch mean over the labeled-or-unlabeled real examples), one update of
  every trainable parameter by ``tx``, then the method's teacher update. ``nonfinite``
  as :func:`kdjax.engine.make_train_step`'s (a dropped step keeps the teacher too)."""
  if nonfinite not in NONFINITE:
    raise ValueError(f'nonfinite must be one of {NONFINITE}, got {nonfinite!r}')

  def forward(params, state: TrainState, batch, rng):
    where = batch['mask']
    out, model_state = apply(params['student'], state.model_state, batch['x'], train=True,
                             rng=rng, **model_kwargs(batch))
    inputs = objective_inputs(out, batch['label'], where, state.step, batch.get('id'))
    label_loss, loss_state, metrics = objective.apply(
        params['loss'], state.loss_state['objective'], inputs)
    per, extra = method.loss(params, state.loss_state['teacher'], out, model_state, batch,
                             state.step)
    w = where.astype(jnp.float32)
    term = jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)
    metrics = dict(metrics, **extra)
    metrics['loss/self'] = (term * jnp.sum(w), jnp.sum(w))
    return label_loss + term, (out, model_state, loss_state, metrics)

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, (out, model_state, loss_state, metrics)), grads = jax.value_and_grad(
        forward, has_aux=True)(state.params, state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    teacher = method.update(state.loss_state['teacher'], params, model_state, state.step + 1)
    new = state.replace(step=state.step + 1, params=params, model_state=model_state,
                        loss_state={'objective': loss_state, 'teacher': teacher},
                        opt_state=opt_state)
    where = batch['mask']
    n = jnp.sum(where.astype(jnp.float32))
    metrics = dict(metrics, loss=(loss * n, n))
    metrics['accuracy'] = accuracy(out.logits, batch['label'], where)
    return guard_nonfinite(nonfinite, loss, grads, new, state.replace(step=state.step + 1),
                           metrics)

  return step


# --------------------------------------------------------------------------- evaluation

def make_self_evaluator(name: str, options: dict, apply: Callable, arrays: dict, mesh, *,
                        batch_size: int) -> Callable[[TrainState], dict]:
  """``evaluate(state)``: the student's ``accuracy`` and ``loss``, and by scheme each
  BYOT head's (``head<i>/...``) and the heads' ensemble (``ensemble/...``: the mean of
  the softmax outputs of every head and the deepest), the EMA teacher's
  (``teacher/...``), or the snapshot ensemble's (``ensemble/...``: the mean softmax of
  the kept snapshots; the current weights before the first)."""
  student = make_evaluator(apply, arrays, mesh, batch_size=batch_size)
  ev = lambda fn: make_evaluator(fn, arrays, mesh, batch_size=batch_size)
  extra: dict[str, tuple[Callable, Callable]] = {}
  if name == 'byot':
    def head_fn(i):
      def fn(params, model_state, x, **kwargs):
        out, ms = apply(params['student'], model_state, x, **kwargs)
        return ModelOutput(head_apply(params['heads'][f'stage{i}'],
                                      out.features[f'stage{i}'])[0], {}), ms
      return fn

    def all_fn(params, model_state, x, **kwargs):
      out, ms = apply(params['student'], model_state, x, **kwargs)
      logits = [head_apply(params['heads'][f'stage{i}'], out.features[f'stage{i}'])[0]
                for i in options['heads']] + [out.logits.astype(jnp.float32)]
      probs = jnp.mean(jax.nn.softmax(jnp.stack(logits), axis=-1), axis=0)
      return ModelOutput(jnp.log(jnp.maximum(probs, 1e-30)), {}), ms

    pick = lambda s: (s.params, s.model_state)
    for i in options['heads']:
      extra[f'head{i}'] = (ev(head_fn(i)), pick)
    extra['ensemble'] = (ev(all_fn), pick)
  elif name == 'mean_teacher':
    extra['teacher'] = (ev(apply), lambda s: (s.loss_state['teacher']['params'],
                                             s.loss_state['teacher']['model_state']))
  else:
    def snap_fn(params, model_state, x, **kwargs):
      (buf, cur), (buf_ms, cur_ms) = params, model_state
      logits = jax.vmap(lambda p, s: apply(p, s, x, **kwargs)[0].logits)(buf['params'],
                                                                          buf_ms)
      now = apply(cur, cur_ms, x, **kwargs)[0].logits
      valid = jnp.arange(logits.shape[0]) < buf['taken']
      probs = ensemble_probs(logits, valid, 1.0)   # no snapshot yet: the current weights
      probs = jnp.where(buf['taken'] > 0, probs, jax.nn.softmax(now.astype(jnp.float32)))
      return ModelOutput(jnp.log(jnp.maximum(probs, 1e-30)), {}), model_state

    extra['ensemble'] = (ev(snap_fn), lambda s: (
        (s.loss_state['teacher'], s.params['student']),
        (s.loss_state['teacher']['model_state'], s.model_state)))

  def evaluate(state: TrainState) -> dict:
    out = student(state.params['student'], state.model_state)
    for prefix, (fn, pick) in extra.items():
      out.update({f'{prefix}/{k}': v for k, v in fn(*pick(state)).items()})
    return out

  return evaluate


# --------------------------------------------------------------------------- the run

class SelfSetup(NamedTuple):
  """What :func:`setup_self` builds: the engine's :class:`~kdjax.engine.Setup` with the
  scheme's step, state and evaluator in it, and the checked options."""

  run: Setup
  options: dict


def setup_self(config: ml_collections.ConfigDict, *, data: Data | None = None,
               log: Callable[[str], None] = print) -> SelfSetup:
  """Builds a self-distillation run (``byot``, ``mean_teacher``, ``snapshot``) from
  ``config`` (writes nothing).

  Raises:
    UserError: a config, data set or scheme this run cannot use.
  """
  options = self_options(config)
  name = options['name']
  check_label_objective(config, f'{name} distills the student from itself')
  run = setup(config, data=data, log=log)
  init_params = from_config(config.model, num_classes=run.spec.num_classes,
                            input_shape=run.spec.input_shape)[1]
  apply = run.apply
  tx = run.tx
  if name == 'snapshot':
    options['cycle_steps'] = int(config.num_steps) // options['num_cycles']
    constant = ml_collections.ConfigDict(config.optimizer.to_dict())
    constant.schedule, constant.warmup_steps = 'constant', 0
    # Scaling the update by the factor scales the rate (adam, adamw, sgd: the rate is
    # the last factor of each), so the configured rate restarts at every cycle.
    tx = optax.chain(make_optimizer(constant, int(config.num_steps)),
                     optax.scale_by_schedule(cyclic_cosine(options['cycle_steps'])))
  if name == 'byot':
    probe, _ = jax.eval_shape(lambda: apply(*init_params(0), np.zeros(
        (2, *run.spec.input_shape), run.spec.input_dtype), train=False))
    blocks = sorted(int(k[5:]) for k in probe.features if k.startswith('stage'))
    bad = [h for h in options['heads'] if h >= len(blocks)]
    if bad or 'penultimate' not in probe.features:
      raise UserError(f'config.scheme.heads {options["heads"]}: {config.model.name} has '
                      f'{len(blocks)} blocks, and a BYOT head goes after one of blocks '
                      f'1..{len(blocks) - 1} (the last is the deepest classifier)')
  method = make_method(name, options, apply)
  init = make_self_init(init_params, apply, run.objective, tx, method,
                        input_shape=run.spec.input_shape, input_dtype=run.spec.input_dtype)
  step = make_self_step(apply, run.objective, tx, method, nonfinite=str(config.nonfinite))
  eval_arrays = (data.eval if data is not None else kdata.load_arrays(
      config.data.name, config.data.eval_split, data_dir=config.data.data_dir or None))
  evaluate = make_self_evaluator(name, options, apply, eval_arrays, run.mesh,
                                 batch_size=int(config.data.eval_batch_size))
  run = with_step(run._replace(tx=tx), config, init, step, evaluate, apply=run.apply)
  return SelfSetup(run, options)


TITLES = {'byot': 'BYOT', 'mean_teacher': 'mean teacher (EMA)', 'snapshot': 'snapshot ensemble'}


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains a self-distillation scheme into ``workdir`` and returns the summary
  (``summary.json``): the usual figures (``eval_accuracy``: the student, the deepest
  classifier for BYOT), plus ``head_accuracies`` (BYOT, by block) and
  ``ensemble_accuracy`` (BYOT's heads, or the snapshots), or ``teacher_accuracy`` (the
  EMA teacher). A rerun resumes from the last checkpoint to the uninterrupted result.

  Raises:
    UserError: a bad config, scheme, data set or workdir (nothing written).
    Diverged: a non-finite loss or gradient norm (``summary.json`` says where).
  """
  workdir = workdir_lib.resolve(workdir)
  built = setup_self(config, log=log_line)
  run, options = built.run, built.options
  fitted, start = fit_run(run, config, workdir)
  evaluation = fitted.eval
  summary = {**fitted.summary(resumed_from=start, feed=run.feed_kind),
             'scheme': options['name']}
  if options['name'] == 'byot':
    summary['head_accuracies'] = {str(i): evaluation.get(f'head{i}/accuracy')
                                  for i in options['heads']}
  if options['name'] == 'mean_teacher':
    summary['teacher_accuracy'] = evaluation.get('teacher/accuracy')
    summary['teacher_loss'] = evaluation.get('teacher/loss')
  else:
    summary['ensemble_accuracy'] = evaluation.get('ensemble/accuracy')
    summary['ensemble_loss'] = evaluation.get('ensemble/loss')
  write_summary(workdir, summary)
  if jax.process_index() == 0:
    metrics_lib.plot_learning_curves(workdir, title=TITLES[options['name']])
  return summary
