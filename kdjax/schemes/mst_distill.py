r"""MST-Distill: a student on one modality distilled from a routed mixture of specialized
teachers (cross-modal and multimodal), with learned masks that adapt each teacher.

The teachers are ``kdjax train`` workdirs (``config.scheme.teachers``, each ``{'workdir',
'label_map'}``), each trained on a *view* of the input (:data:`kdjax.schemes.cross.VIEWS`;
a ``cross`` run's ``student_view``, else the raw input): e.g. a *cross-modal* teacher on
the spectrogram and a *multimodal* one on ``'identity+spectrogram'`` (both modalities);
the student reads ``config.scheme.student_view`` (the raw signal by default). For each
teacher :math:`m` the run keeps two *experts*: the teacher as trained, :math:`z_m`, and
the teacher with a learned mask on its input, :math:`\hat z_m =
f_m(v_m(x) \odot \sigma(g_m(v_m(x))))` (``config.scheme.masked_experts``; without it
only the unmasked ones), so :math:`E = 2M` experts. Every expert's logits are brought to
the student's label space by its ``label_map`` (:func:`kdjax.schemes.multi_teacher.map_probabilities`,
logits :math:`\log \tilde p`).

One jitted step trains three independent parts with one gradient (each part's loss
reads the others only under ``stop_gradient``):

* **Router** :math:`r` (two dense layers :math:`C \to 2C \to E`, no activation between,
  as the authors' ``GateNet``) on the student's logits (held constant):
  :math:`\pi = \mathrm{softmax}(r(\mathrm{sg}(z_s)))`; the top-:math:`k` experts of each
  example (:math:`k` = ``config.scheme.top_k``) get weight :math:`1/k`, the others 0.
  The router is trained by the load-balancing loss
  :math:`\mathcal{L}_{lb} = \mathrm{KL}(u \,\|\, \bar\pi) / E`, :math:`\bar\pi` the
  batch mean of :math:`\pi`, :math:`u` uniform (the authors' ``load_balancing_loss``,
  mode ``'KL'``, with ``nn.KLDivLoss(reduction='batchmean')`` on an ``[E]`` vector,
  hence the :math:`1/E`); top-k selection passes no gradient, as in their code.
* **Student**: :math:`\mathcal{L}_{task}(z_s, y) + w\,T^2\,\mathrm{KL}(\bar p \,\|\,
  \mathrm{softmax}(z_s/T))` with the routed target
  :math:`\bar p = \sum_e w_e\,\mathrm{softmax}(\mathrm{sg}(z_e)/T)` (:func:`routed_target`).
  The authors average the top-k experts' KL divergences instead,
  :math:`\frac1k\sum_{e\in\mathrm{top}k} T^2\mathrm{KL}(p_e\|q)`, which differs from
  this by a term that does not depend on the student (it has the same gradient); for
  :math:`k = 1` the two are equal.
* **Masks** :math:`g_m` (a ReLU layer of ``mask_hidden`` units and a dense layer back to
  the view's size, a sigmoid per input element, starting at
  :math:`\sigma(4) \approx 0.98`): each trained, the teacher frozen, to bring the masked
  teacher to the student's current prediction,
  :math:`w_{mask}\,T^2\,\mathrm{KL}(\mathrm{sg}(p_s^T) \,\|\, \hat p_m^T)` (the
  authors' stage 2 loss, ``distillation_loss_detached(outputs_t, outputs_s)``).

What we had to choose (the paper's method as in its code, github.com/Gray-OREO/MST-Distill,
``KD_methods/MST.py`` and ``main-MST-Distill.py``):

* **No co-training stage.** The authors first co-train the multimodal teacher, the
  cross-modal teacher and the student (each CE + KL from the other two, stage 1), then
  train the masks (stage 2), then distill (stage 3). Here the teachers are trained
  beforehand, each from labels alone, and stages 2 and 3 run together: the masks follow
  the student as it learns instead of a co-trained student fixed after stage 1.
* **Input masks.** The authors' ``MaskNet`` is a multi-head self-attention over the
  features of one intermediate layer, inserted by a forward hook, one masked copy of the
  teacher per hooked layer (``mask_layer_num = 2`` layers, so their experts are two masked
  copies of each teacher). kdjax's models have no hook points, so here the mask is a
  dense network on the teacher's input, and the second expert of each teacher is the
  unmasked teacher.
* **Schedules.** Their weight decays (``w_lb`` times 0.9 every 10 epochs, ``w_kl`` times
  0.5 every 30) are not reproduced: the weights are constant. One optimizer
  (``config.optimizer``) updates the student, the masks and the router.
* **Defaults** are theirs: :math:`T = 4`, :math:`k = 1`, :math:`w = w_{lb} = 1`.

The run is the engine's (feed, loop, checkpoints, resume); the teachers are not
checkpointed, the masks and the router are. The summary reports the student
(``eval_accuracy``), every expert's accuracy in the student's label space
(``expert_accuracies``; names in ``experts``) and how often each expert was routed to over
the last logged steps (``routing``).

References:
  Li, Yang, Chen, Dong, Chen, Wang. MST-Distill: Mixture of Specialized Teachers for
  Cross-Modal Knowledge Distillation. ACM Multimedia 2025. arXiv:2507.07015. Code:
  github.com/Gray-OREO/MST-Distill (``KD_methods/MST.py``: ``GateNet``,
  ``load_balancing_loss``, ``k_ways_MTGdistillation_detached``, ``MaskNet_1d``;
  ``main-MST-Distill.py``: the three stages and their losses).
"""

from __future__ import annotations

import math
import os
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import data as kdata
from kdjax import workdir as workdir_lib
from kdjax.config import check_int
from kdjax.config import check_number
from kdjax.config import from_dict
from kdjax.config import with_defaults
from kdjax.engine import metrics as metrics_lib
from kdjax.engine.config import validate
from kdjax.engine.evaluate import make_evaluator
from kdjax.engine.loop import write_summary
from kdjax.engine.setup import Setup
from kdjax.engine.setup import setup
from kdjax.engine.state import TrainState
from kdjax.engine.step import NONFINITE
from kdjax.engine.step import accuracy
from kdjax.engine.step import guard_nonfinite
from kdjax.errors import UserError
from kdjax.losses import kd
from kdjax.losses import reduce_value
from kdjax.models import from_config
from kdjax.models.base import model_kwargs
from kdjax.models.base import objective_inputs
from kdjax.models.base import sample_inputs
from kdjax.schemes.cross import load_cross_teacher
from kdjax.schemes.cross import teacher_view_and_classes
from kdjax.schemes.cross import view_fn
from kdjax.schemes.cross import view_shape
from kdjax.schemes.cross import viewed
from kdjax.schemes.multi_teacher import check_label_maps
from kdjax.schemes.multi_teacher import kd_from_probs
from kdjax.schemes.multi_teacher import label_map_matrix
from kdjax.schemes.multi_teacher import map_probabilities
from kdjax.schemes.online import IDENTITY
from kdjax.schemes.online import check_label_objective
from kdjax.schemes.online import fit_run
from kdjax.schemes.online import log_line
from kdjax.schemes.online import with_step

NAME = 'mst_distill'
# config.scheme's fields and their defaults (the authors' T, k and loss weights).
DEFAULTS = {'name': NAME, 'teachers': [], 'student_view': 'identity', 'top_k': 1,
            'temperature': 4.0, 'weight': 1.0, 'balance_weight': 1.0, 'mask_weight': 1.0,
            'mask_hidden': 32, 'masked_experts': True}
MASK_BIAS = 4.0   # the masks start at sigmoid(4) ~ 0.98: each masked expert ~ its teacher


def mst_distill_scheme(teachers: Sequence[Any] = (), **options) -> ml_collections.ConfigDict:
  """``config.scheme`` for MST-Distill: :data:`DEFAULTS` with ``options`` over them;
  ``teachers`` are workdirs or ``{'workdir', 'label_map'}`` dicts.

  >>> mst_distill_scheme(['/t/a', '/t/b'], top_k=2).teachers[1]
  {'workdir': '/t/b', 'label_map': None}
  """
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown mst_distill options {sorted(unknown)}; use {", ".join(DEFAULTS)}')
  entries = [t if isinstance(t, dict) else {'workdir': t, 'label_map': None} for t in teachers]
  return ml_collections.ConfigDict({**DEFAULTS, **options, 'teachers': entries})


def mst_options(config: ml_collections.ConfigDict) -> dict:
  """``config.scheme`` checked, with :data:`DEFAULTS` for the fields it leaves out.

  Raises:
    UserError: an unknown field, no teachers, a teacher entry without a workdir, a bad
      view, ``top_k`` outside ``[1, E]``, a temperature that is not positive, or a
      negative weight.

  >>> mst_options(ml_collections.ConfigDict({'scheme': {'name': 'mst_distill'}}))
  Traceback (most recent call last):
  kdjax.errors.UserError: config.scheme.teachers is empty; list the teachers' workdirs, e.g. [{'workdir': 'workdirs/teacher_mm', 'label_map': None}, ...]
  """
  options = with_defaults(config.scheme, DEFAULTS, dotted='scheme', what='an mst_distill option')
  checked = ml_collections.ConfigDict({'scheme': {k: v for k, v in options.items()
                                                  if k not in ('teachers', 'student_view')}})
  check_int(checked, 'scheme.top_k', 1)
  check_int(checked, 'scheme.mask_hidden', 1)
  check_number(checked, 'scheme.temperature', lambda v: v > 0, 'positive')
  for key in ('weight', 'balance_weight', 'mask_weight'):
    check_number(checked, f'scheme.{key}', lambda v: v >= 0, '>= 0')
  teachers = options['teachers']
  if not teachers:
    raise UserError("config.scheme.teachers is empty; list the teachers' workdirs, e.g. "
                    "[{'workdir': 'workdirs/teacher_mm', 'label_map': None}, ...]")
  entries = []
  for i, t in enumerate(teachers):
    t = {'workdir': t, 'label_map': None} if isinstance(t, str) else t
    if not (hasattr(t, 'get') and isinstance(t.get('workdir'), str) and t.get('workdir')):
      raise UserError(f'config.scheme.teachers[{i}] must be a workdir or '
                      f"{{'workdir': ..., 'label_map': None}}, got {t!r}")
    label_map = t.get('label_map')
    if label_map is not None and not isinstance(label_map, (list, tuple)):
      raise UserError(f'config.scheme.teachers[{i}].label_map must be None or a list of '
                      f'student classes, got {label_map!r}')
    entries.append({'workdir': t['workdir'],
                    'label_map': None if label_map is None else [int(v) for v in label_map]})
  view_fn(str(options['student_view']))
  experts = len(entries) * (2 if options['masked_experts'] else 1)
  if int(options['top_k']) > experts:
    raise UserError(f'config.scheme.top_k is {options["top_k"]} but there are {experts} '
                    'experts; use a top_k between 1 and the number of experts')
  options.update(teachers=entries, student_view=str(options['student_view']),
                 top_k=int(options['top_k']), temperature=float(options['temperature']),
                 weight=float(options['weight']),
                 balance_weight=float(options['balance_weight']),
                 mask_weight=float(options['mask_weight']),
                 mask_hidden=int(options['mask_hidden']),
                 masked_experts=bool(options['masked_experts']))
  return options


# --------------------------------------------------------------------------- router

def init_router(key: jax.Array, num_classes: int, num_experts: int) -> dict:
  """The router's parameters: ``fc1`` ``[C, 2C]`` and ``fc2`` ``[2C, E]`` (LeCun normal
  weights, zero biases).

  >>> p = init_router(jax.random.key(0), 4, 3)
  >>> p['fc1']['w'].shape, p['fc2']['w'].shape
  ((4, 8), (8, 3))
  """
  k1, k2 = jax.random.split(key)
  hidden = 2 * num_classes
  return {'fc1': {'w': jax.random.normal(k1, (num_classes, hidden)) / math.sqrt(num_classes),
                  'b': jnp.zeros((hidden,))},
          'fc2': {'w': jax.random.normal(k2, (hidden, num_experts)) / math.sqrt(hidden),
                  'b': jnp.zeros((num_experts,))}}


def router_probs(params: dict, student_logits: jax.Array) -> jax.Array:
  """``softmax(fc2(fc1(z)))`` over the experts, ``[batch, E]`` (no activation between the
  layers, as the authors' ``GateNet``)."""
  h = student_logits.astype(jnp.float32) @ params['fc1']['w'] + params['fc1']['b']
  return jax.nn.softmax(h @ params['fc2']['w'] + params['fc2']['b'], axis=-1)


def top_k_weights(probs: jax.Array, k: int) -> jax.Array:
  """Per example, ``1/k`` on the ``k`` most probable experts and 0 elsewhere (no
  gradient), ``[batch, E]``; each row sums to 1.

  >>> top_k_weights(jnp.array([[0.1, 0.6, 0.3], [0.5, 0.2, 0.3]]), 2).tolist()
  [[0.0, 0.5, 0.5], [0.5, 0.0, 0.5]]
  """
  _, idx = jax.lax.top_k(jax.lax.stop_gradient(probs), k)
  return jnp.sum(jax.nn.one_hot(idx, probs.shape[-1], dtype=jnp.float32), axis=-2) / k


def load_balance(probs: jax.Array, where=None) -> jax.Array:
  r""":math:`\mathrm{KL}(u \,\|\, \bar\pi) / E`, :math:`\bar\pi` the mean of ``probs``
  ``[batch, E]`` over the examples ``where`` is True (the authors' ``'KL'`` mode).

  >>> print(float(load_balance(jnp.array([[0.5, 0.5], [0.5, 0.5]]))))
  0.0
  """
  if where is None:
    where = jnp.ones(probs.shape[:1], bool)
  w = where.astype(jnp.float32)[:, None]
  mean = jnp.sum(probs * w, axis=0) / jnp.maximum(jnp.sum(w), 1.0)
  e = probs.shape[-1]
  return jnp.sum((1.0 / e) * (jnp.log(1.0 / e) - jnp.log(jnp.maximum(mean, 1e-30)))) / e


def routed_target(expert_logits: jax.Array, weights: jax.Array, temperature: float
                  ) -> jax.Array:
  r""":math:`\bar p = \sum_e w_e\,\mathrm{softmax}(z_e / T)`, ``[batch, C]``, from the
  experts' logits ``[E, batch, C]`` and the weights ``[batch, E]``.

  >>> z = jnp.log(jnp.array([[[0.8, 0.2]], [[0.2, 0.8]]]))
  >>> [f'{float(p):.3f}' for p in routed_target(z, jnp.array([[0.0, 1.0]]), 1.0)[0]]
  ['0.200', '0.800']
  """
  p = jax.nn.softmax(expert_logits.astype(jnp.float32) / temperature, axis=-1)
  return jnp.einsum('ebc,be->bc', p, weights.astype(jnp.float32))


# --------------------------------------------------------------------------- masks

def init_mask(key: jax.Array, size: int, hidden: int) -> dict:
  """One mask network for inputs of ``size`` elements: a ReLU layer ``[size, hidden]``
  (LeCun normal) and ``[hidden, size]`` (zeros), output bias :data:`MASK_BIAS`."""
  return {'w1': jax.random.normal(key, (size, hidden)) / math.sqrt(size),
          'b1': jnp.zeros((hidden,)), 'w2': jnp.zeros((hidden, size)),
          'b2': jnp.full((size,), MASK_BIAS)}


def mask_apply(params: dict, v: jax.Array) -> jax.Array:
  """``v * sigmoid(g(v))``: the viewed input ``v`` ``[batch, ...]`` masked element-wise.

  >>> v = jnp.ones((1, 3, 1))
  >>> [f'{float(m):.3f}' for m in mask_apply(init_mask(jax.random.key(0), 3, 2), v)[0, :, 0]]
  ['0.982', '0.982', '0.982']
  """
  flat = v.reshape(v.shape[0], -1).astype(jnp.float32)
  h = jax.nn.relu(flat @ params['w1'] + params['b1'])
  mask = jax.nn.sigmoid(h @ params['w2'] + params['b2'])
  return (flat * mask).reshape(v.shape).astype(v.dtype)


class Expert(NamedTuple):
  """One frozen teacher as the step uses it: its ``apply`` (raw model), its variables,
  its view's name and its label-map matrix (None: the student's classes)."""

  apply: Callable
  variables: Any
  view: str
  matrix: Any


def expert_logits(teacher: Expert, x: jax.Array, mask: dict | None = None) -> jax.Array:
  """The teacher's logits on ``view(x)`` (masked by ``mask`` when given), in the
  student's label space (:math:`\\log \\tilde p` through its map)."""
  v = view_fn(teacher.view)(x)
  if mask is not None:
    v = mask_apply(mask, v)
  params, state = teacher.variables
  z = teacher.apply(params, state, v, train=False)[0].logits.astype(jnp.float32)
  if teacher.matrix is None:
    return z
  p = map_probabilities(jax.nn.softmax(z, axis=-1), teacher.matrix)
  return jnp.log(jnp.maximum(p, 1e-30))


def all_expert_logits(teachers: Sequence[Expert], masks, x, masked: bool) -> jax.Array:
  """``[E, batch, C]``: each teacher unmasked, then (``masked``) each teacher masked."""
  out = [expert_logits(t, x) for t in teachers]
  if masked:
    out += [expert_logits(t, x, m) for t, m in zip(teachers, masks)]
  return jnp.stack(out)


# --------------------------------------------------------------------------- the step

def make_mst_init(init_params: Callable, apply: Callable, objective,
                  tx: optax.GradientTransformation, *, input_shape, input_dtype=np.float32,
                  num_classes: int, mask_sizes: Sequence[int], num_experts: int,
                  mask_hidden: int) -> Callable[[Any], TrainState]:
  """``init(seed) -> TrainState``: the student as ``kdjax train`` makes it, its objective's
  parts, ``params['masks']`` (one per teacher, keys ``fold_in(key(seed), 4 + m)``) and
  ``params['router']`` (key ``fold_in(key(seed), 3)``); one optimizer state over
  ``params``."""
  x = np.zeros((2, *input_shape), input_dtype)

  def init(seed) -> TrainState:
    params, model_state = init_params(seed)
    out, _ = apply(params, model_state, x, train=False)
    sample = sample_inputs(out)
    key = jax.random.key(seed)
    loss_params, loss_state = objective.init(jax.random.fold_in(key, 1), sample)
    masks = tuple(init_mask(jax.random.fold_in(key, 4 + m), size, mask_hidden)
                  for m, size in enumerate(mask_sizes))
    router = init_router(jax.random.fold_in(key, 3), num_classes, num_experts)
    trainable = {'student': params, 'loss': loss_params, 'masks': masks, 'router': router}
    return TrainState(step=jnp.zeros((), jnp.int32), params=trainable,
                      model_state=model_state, loss_state=loss_state,
                      opt_state=tx.init(trainable),
                      rng=jax.random.key_data(jax.random.fold_in(key, 2)))

  return init


def make_mst_step(apply: Callable, objective, tx: optax.GradientTransformation, *,
                  teachers: Sequence[Expert], masked_experts: bool = True, top_k: int = 1,
                  temperature: float = 4.0, weight: float = 1.0, balance_weight: float = 1.0,
                  mask_weight: float = 1.0, nonfinite: str = 'stop') -> Callable:
  """Builds ``step(state, batch) -> (state, metrics)``: the student, the masks and the
  router of the module docstring, one gradient of their summed losses, one ``tx`` update.

  Returns:
    The pure step. ``metrics`` (``(sum, count)``): the student's ``loss``, ``accuracy``,
    ``loss/<term>`` and ``loss/kd``; ``mask/loss`` (the masks' summed KL), ``router/balance``,
    ``route/expert_<e>`` (the share of examples routed to expert e, over ``k``),
    ``experts/accuracy`` (of the routed target), and ``grad_norm`` and ``nonfinite`` /
    ``skipped`` as :func:`kdjax.engine.make_train_step`'s.
  """
  if nonfinite not in NONFINITE:
    raise ValueError(f'nonfinite must be one of {NONFINITE}, got {nonfinite!r}')
  num_experts = len(teachers) * (2 if masked_experts else 1)

  def forward(params, state: TrainState, batch, rng):
    where = batch['mask']
    out, model_state = apply(params['student'], state.model_state, batch['x'], train=True,
                             rng=rng, **model_kwargs(batch))
    inputs = objective_inputs(out, batch['label'], where, state.step, batch.get('id'))
    task, loss_state, metrics = objective.apply(params['loss'], state.loss_state, inputs)
    student = jax.lax.stop_gradient(out.logits.astype(jnp.float32))
    logits = all_expert_logits(teachers, params['masks'], batch['x'], masked_experts)
    probs = router_probs(params['router'], student)
    weights = top_k_weights(probs, top_k)
    target = routed_target(jax.lax.stop_gradient(logits), weights, temperature)
    distill, metrics['loss/kd'] = reduce_value(
        kd_from_probs(out.logits, target, temperature=temperature), where)
    balance = load_balance(probs, where)
    mask_loss = jnp.zeros((), jnp.float32)
    if masked_experts:
      per = jax.vmap(lambda z: reduce_value(kd(z, student, temperature=temperature,
                                               where=where), where)[0])(
          logits[len(teachers):])
      mask_loss = jnp.sum(per)
    total = (task + weight * distill) + balance_weight * balance + mask_weight * mask_loss
    aux = (task + weight * distill, out, model_state, loss_state, metrics, weights, target,
           balance, mask_loss)
    return total, aux

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (total, aux), grads = jax.value_and_grad(forward, has_aux=True)(
        state.params, state, batch, rng)
    loss, out, model_state, loss_state, metrics, weights, target, balance, mask_loss = aux
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, model_state=model_state,
                        loss_state=loss_state, opt_state=opt_state)
    where, labels = batch['mask'], batch['label']
    n = jnp.sum(where.astype(jnp.float32))
    one = jnp.ones((), jnp.float32)
    valid = where.astype(jnp.float32)
    metrics = dict(metrics, loss=(loss * n, n), accuracy=accuracy(out.logits, labels, where))
    metrics['experts/accuracy'] = accuracy(target, labels, where)
    metrics['router/balance'] = (balance, one)
    metrics['mask/loss'] = (mask_loss, one)
    metrics.update({f'route/expert_{e}': (jnp.sum(weights[:, e] * valid), n)
                    for e in range(num_experts)})
    return guard_nonfinite(nonfinite, total, grads, new, state.replace(step=state.step + 1),
                           metrics)

  return step


# --------------------------------------------------------------------------- the run

class MSTSetup(NamedTuple):
  """What :func:`setup_mst` builds: the engine's :class:`~kdjax.engine.Setup` (its
  ``apply`` the student's on its view), the teachers, the expert names and the options."""

  run: Setup
  teachers: tuple
  experts: tuple
  options: dict


def _teacher_view_classes(workdir: str, i: int) -> tuple[str, int, tuple]:
  """A teacher workdir's view, classes and raw input shape, from its ``config.json``."""
  if workdir_lib.latest_step(workdir) is None:
    raise UserError(f'config.scheme.teachers[{i}].workdir {workdir} has no checkpoint; train '
                    f'it first with `kdjax train --config ... --workdir {workdir}`')
  config = from_dict(workdir_lib.read_config(workdir))
  view, classes = teacher_view_and_classes(config)
  spec = kdata.dataset_spec(config.data.name, data_dir=config.data.get('data_dir') or None)
  return view, classes or spec.num_classes, tuple(spec.input_shape)


def setup_mst(config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print
              ) -> MSTSetup:
  """Builds an MST-Distill run from ``config`` (writes nothing). The teachers' views,
  classes and inputs are checked from their ``config.json`` before their weights are read.

  Raises:
    UserError: a config, teacher, label map or data set this run cannot use.
  """
  validate(config)   # the engine's fields first: they do not depend on the teachers
  options = mst_options(config)
  check_label_objective(config, 'mst_distill reads its teachers from config.scheme.teachers')
  entries = options['teachers']
  spec = kdata.dataset_spec(config.data.name, data_dir=config.data.data_dir or None)
  found = [_teacher_view_classes(e['workdir'], i) for i, e in enumerate(entries)]
  for i, (_, _, shape) in enumerate(found):
    if shape != tuple(spec.input_shape):
      raise UserError(f'config.scheme.teachers[{i}] was trained on inputs {shape} but the '
                      f'student reads {config.data.name} (inputs {tuple(spec.input_shape)}); '
                      'use teachers of the same data')
  classes = [c for _, c, _ in found]
  maps = [e['label_map'] for e in entries]
  check_label_maps(classes, maps, spec.num_classes)

  run = setup(config, log=log)
  teachers = []
  for e, c, m in zip(entries, classes, maps):
    raw, view = load_cross_teacher(e['workdir'], run.mesh)
    matrix = None if m is None and c == spec.num_classes else label_map_matrix(
        m, c, spec.num_classes)
    teachers.append(Expert(raw.apply, raw.variables, view, matrix))
  names = [f'{os.path.basename(os.path.normpath(e["workdir"]))}:{t.view}'
           for e, t in zip(entries, teachers)]
  experts = tuple(names + ([f'{n}:masked' for n in names] if options['masked_experts'] else []))

  student_view = view_fn(options['student_view'])
  apply_raw, init_params, _ = from_config(
      config.model, num_classes=spec.num_classes,
      input_shape=view_shape(options['student_view'], spec.input_shape))
  apply = viewed(apply_raw, student_view)
  mask_sizes = [int(np.prod(view_shape(t.view, spec.input_shape))) for t in teachers]
  init = make_mst_init(init_params, apply, run.objective, run.tx,
                       input_shape=spec.input_shape, input_dtype=spec.input_dtype,
                       num_classes=spec.num_classes, mask_sizes=mask_sizes,
                       num_experts=len(experts), mask_hidden=options['mask_hidden'])
  step = make_mst_step(apply, run.objective, run.tx, teachers=teachers,
                       masked_experts=options['masked_experts'], top_k=options['top_k'],
                       temperature=options['temperature'], weight=options['weight'],
                       balance_weight=options['balance_weight'],
                       mask_weight=options['mask_weight'], nonfinite=str(config.nonfinite))
  eval_arrays = kdata.load_arrays(config.data.name, config.data.eval_split,
                                  data_dir=config.data.data_dir or None)
  student_eval = make_evaluator(apply, eval_arrays, run.mesh,
                                batch_size=int(config.data.eval_batch_size))

  def evaluate(state: TrainState) -> dict:
    return student_eval(state.params['student'], state.model_state)

  run = with_step(run, config, init, step, evaluate, apply=apply)
  return MSTSetup(run, tuple(teachers), experts, options)


def evaluate_experts(mst: MSTSetup, state: TrainState, arrays: dict, *, batch_size: int
                     ) -> list[float]:
  """Each expert's accuracy over ``arrays`` (labeled examples) in the student's label
  space, the masked ones with the state's masks: one jitted function for all experts,
  over batches of ``batch_size`` (the last one padded)."""
  teachers, masked = mst.teachers, mst.options['masked_experts']
  predict = jax.jit(lambda masks, x: jnp.argmax(
      all_expert_logits(teachers, masks, x, masked), axis=-1))
  masks = jax.device_get(state.params['masks'])
  x, labels = np.asarray(arrays['x']), np.asarray(arrays['label'])
  correct, n = np.zeros(len(mst.experts)), len(labels)
  for start in range(0, n, batch_size):
    chunk = x[start:start + batch_size]
    pad = batch_size - len(chunk)
    if pad:
      chunk = np.concatenate([chunk, np.zeros((pad, *chunk.shape[1:]), chunk.dtype)])
    pred = np.asarray(predict(masks, chunk))[:, :batch_size - pad]
    y = labels[start:start + batch_size]
    correct += ((pred == y[None]) & (y[None] >= 0)).sum(axis=1)
  return [float(c) / max(int(np.sum(labels >= 0)), 1) for c in correct]


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Distills one student by MST-Distill into ``workdir`` and returns the summary
  (``summary.json``): the usual figures, plus ``experts``, ``expert_accuracies`` and
  ``routing``. A rerun resumes from the last checkpoint to the same result as an
  uninterrupted run.

  Raises:
    UserError: a bad config, scheme, teacher, label map, data set or workdir (nothing
      written).
    Diverged: a non-finite loss or gradient norm.
  """
  workdir = workdir_lib.resolve(workdir)
  mst = setup_mst(config, log=log_line)
  run = mst.run
  fitted, start = fit_run(run, config, workdir, identity=IDENTITY)
  eval_arrays = kdata.load_arrays(config.data.name, config.data.eval_split,
                                  data_dir=config.data.data_dir or None)
  manager = workdir_lib.checkpoint_manager(workdir, keep=int(config.keep_checkpoints))
  state, _ = workdir_lib.restore(manager, fitted.result.step, run.abstract_state)
  accuracies = evaluate_experts(mst, state, eval_arrays,
                                batch_size=int(config.data.eval_batch_size))
  train = fitted.train
  summary = {
      **fitted.summary(resumed_from=start, feed=run.feed_kind),
      'scheme': NAME,
      'student_view': mst.options['student_view'],
      'top_k': mst.options['top_k'],
      'experts': list(mst.experts),
      'expert_accuracies': accuracies,
      'routing': [train.get(f'route/expert_{e}') for e in range(len(mst.experts))],
      'routed_target_train_accuracy': train.get('experts/accuracy'),
  }
  write_summary(workdir, summary)
  if jax.process_index() == 0:
    metrics_lib.plot_learning_curves(workdir, title=f'MST-Distill ({len(mst.experts)} experts, '
                                                    f'top-{mst.options["top_k"]})')
  return summary
