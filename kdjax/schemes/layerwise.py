r"""Layer-wise (stage-wise) distillation: the student is trained in stages, each stage
matching the teacher's features at one depth with only the layers up to that depth
trained, then a last stage of the config's own loss (logit KD + CE) over the whole
network.

``config.scheme.hints`` lists the hint stages in order, ``{'student': i, 'teacher': j}``
each: the student's features ``stage{i}`` (its ``i``-th block, 1-based: an MLP's hidden
layer, a CNN's conv stage) learn the teacher's ``stage{j}`` through a learned linear
projector (FitNets' regressor, the ``fitnet`` loss with ``regressor``: the MSE of
:math:`r(s)` and :math:`t`, features of different positions pooled to match; a
``[B, D]`` student feature against a ``[B, L, C]`` teacher feature averages the
teacher's positions). In hint stage ``i`` the loss is ``hint_weight`` times that hint
alone, and the optimizer updates (:func:`frozen`):

* ``train='prefix'`` (FitNets' stage 1): every student parameter the features at
  depth ``i`` depend on, that is the blocks 1..i;
* ``train='block'`` (progressive blockwise KD): only the parameters depth ``i``
  depends on and depth ``i'`` (the previous hint's) does not, block ``i``'s own; the
  blocks below stay as the previous stage left them.

Every other student parameter (the deeper blocks, the classifier) is frozen: its update
is zero, so it is exactly unchanged, weight decay and momentum included. Which
parameters a depth depends on is read from the model (:func:`depth_masks`: a parameter
belongs to depth ``i`` when the gradient of the ``stage{i}`` features with respect to
it, at the initial weights on a random probe batch, is not zero everywhere).

The last stage (``final``) is the config itself: its loss, its steps, its optimizer,
every parameter trained. Each stage starts from the previous stage's final student
weights (``config.init``, a warm start: a fresh optimizer and a fresh projector).

Each stage is an ordinary engine run in ``WORKDIR/<stage>/`` (``hint<i>``, then
``final``), run by :func:`kdjax.schemes.stages.run_stages`, so the one command
resumes stage by stage: a finished stage is skipped, an interrupted one resumes from its
last checkpoint, and ``kill -9`` at any point ends, after a rerun, in the uninterrupted
run's result. The teacher is ``config.teacher.workdir`` in every stage.

References:
  Romero, Ballas, Kahou, Chassang, Gatta, Bengio. FitNets: Hints for Thin Deep Nets.
  ICLR 2015. arXiv:1412.6550 (stage-wise training: first the student up to the guided
  layer on the hint through a regressor, then the whole student with KD).
  Wang, Zhang, Zhang, Xu, Liu. Progressive Blockwise Knowledge Distillation for Neural
  Network Acceleration. IJCAI 2018 (the student's blocks distilled one at a time from
  the teacher's features, the blocks already distilled kept fixed).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from kdjax import data as kdata
from kdjax import storage
from kdjax import workdir as workdir_lib
from kdjax.config import check_int
from kdjax.config import check_number
from kdjax.config import merge
from kdjax.config import with_defaults
from kdjax.engine.config import IDENTITY_FIELDS
from kdjax.engine.config import base_config
from kdjax.engine.config import validate
from kdjax.engine.loop import TrainCalls
from kdjax.engine.precision import with_precision
from kdjax.engine.setup import setup
from kdjax.engine.state import warm_start
from kdjax.engine.step import make_train_step
from kdjax.errors import UserError
from kdjax.models import from_config
from kdjax.schemes import stages as stages_lib

NAME = 'layerwise'
TRAIN = ('prefix', 'block')
FINAL = 'final'
# config.scheme's fields and their defaults.
DEFAULTS = {
    'name': NAME,
    'hints': [],             # [{'student': i, 'teacher': j}, ...]: a hint stage each, in order
    'hint_steps': 500,       # steps of each hint stage
    'hint_weight': 1.0,      # the hint loss's weight
    'regressor': 'linear',   # the fitnet projector ('linear' | 'conv' | 'auto')
    'train': 'prefix',       # 'prefix': blocks 1..i; 'block': block i only
}


def layerwise_scheme(**options) -> ml_collections.ConfigDict:
  """``config.scheme`` of a layer-wise run: :data:`DEFAULTS` with ``options`` over them.

  >>> layerwise_scheme(hints=[{'student': 1, 'teacher': 2}]).hints[0].teacher
  2
  """
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown layerwise options {sorted(unknown)}; use {", ".join(DEFAULTS)}')
  hints = [ml_collections.ConfigDict(dict(h)) for h in options.pop('hints', [])]
  out = ml_collections.ConfigDict({**DEFAULTS, **options})
  out.hints = hints
  return out


def layerwise_options(config: ml_collections.ConfigDict) -> dict:
  """``config.scheme`` checked, with :data:`DEFAULTS` for the fields it leaves out;
  ``hints`` as a list of ``(student depth, teacher depth)``.

  Raises:
    UserError: an unknown field, an empty or malformed hint list (depths are integers
      >= 1, the student's strictly increasing), or a number out of range.

  >>> layerwise_options(ml_collections.ConfigDict({'scheme': {
  ...     'name': 'layerwise', 'hints': [{'student': 2, 'teacher': 2},
  ...                                   {'student': 1, 'teacher': 3}]}}))
  Traceback (most recent call last):
  kdjax.errors.UserError: config.scheme.hints: the student depths must increase from stage to stage (got 2, 1)
  """
  options = with_defaults(config.scheme, DEFAULTS, dotted='scheme', what='a layerwise option')
  if options['train'] not in TRAIN:
    raise UserError(f'config.scheme.train must be one of {", ".join(TRAIN)} '
                    f'(got {options["train"]!r})')
  checked = ml_collections.ConfigDict({'scheme': {k: options[k] for k in
                                                  ('hint_steps', 'hint_weight')}})
  check_int(checked, 'scheme.hint_steps', 1)
  check_number(checked, 'scheme.hint_weight', lambda v: v > 0, 'positive')
  hints = options['hints']
  example = "such as [{'student': 1, 'teacher': 1}, {'student': 2, 'teacher': 2}]"
  if not isinstance(hints, (list, tuple)) or not hints:
    raise UserError(f'config.scheme.hints must list the hint stages, {example}')
  pairs = []
  for n, hint in enumerate(hints):
    hint = hint.to_dict() if hasattr(hint, 'to_dict') else hint
    if not isinstance(hint, dict) or set(hint) != {'student', 'teacher'} or any(
        isinstance(v, bool) or not isinstance(v, int) or v < 1 for v in hint.values()):
      raise UserError(f'config.scheme.hints[{n}] must be {{\'student\': i, \'teacher\': j}} '
                      f'with block numbers i, j >= 1 (got {hint!r}); {example}')
    pairs.append((int(hint['student']), int(hint['teacher'])))
  depths = [s for s, _ in pairs]
  if any(b <= a for a, b in zip(depths, depths[1:])):
    raise UserError('config.scheme.hints: the student depths must increase from stage to '
                    f'stage (got {", ".join(map(str, depths))})')
  options['hints'] = pairs
  options['hint_weight'] = float(options['hint_weight'])
  return options


# --------------------------------------------------------------------------- the parts

def block_names(model_config, *, num_classes: int, input_shape,
                input_dtype='float32') -> list[str]:
  """The model's ``stage{i}`` feature names, in order (shapes only: nothing computed).

  >>> block_names({'name': 'mlp', 'kwargs': {'hidden': (4, 3)}}, num_classes=2,
  ...             input_shape=(5,))
  ['stage1', 'stage2']
  """
  apply, init_params, _ = from_config(model_config, num_classes=num_classes,
                                      input_shape=tuple(input_shape))
  x = jax.ShapeDtypeStruct((2, *input_shape), np.dtype(input_dtype))
  shapes = jax.eval_shape(lambda xb: apply(*init_params(0), xb, train=False)[0].features, x)
  return sorted((k for k in shapes if k.startswith('stage') and k[5:].isdigit()),
                key=lambda k: int(k[5:]))


def depth_masks(model_config, *, num_classes: int, input_shape, input_dtype='float32',
                seed: int = 0) -> tuple[list[str], dict[int, Any]]:
  """``(feature names, masks)``: the model's ``stage{i}`` feature names, and for each
  depth ``i`` a pytree of bools shaped like its parameters, True on the parameters the
  ``stage{i}`` features depend on (the gradient of a random projection of those
  features, at the initial weights on an 8-example random probe, is not all zero).

  One compiled call (the model's init and one gradient per depth);
  ``tests/schemes/test_layerwise.py`` checks the masks of an MLP and a CNN.
  """
  apply, init_params, _ = from_config(model_config, num_classes=num_classes,
                                      input_shape=tuple(input_shape))
  key = jax.random.key(0)
  shape = (8, *input_shape)
  if np.issubdtype(np.dtype(input_dtype), np.integer):
    x = jax.random.randint(key, shape, 0, 2).astype(input_dtype)
  else:
    x = jax.random.normal(key, shape, jnp.float32).astype(input_dtype)
  features = lambda p, s: apply(p, s, x, train=False)[0].features
  shapes = jax.eval_shape(lambda: features(*init_params(seed)))
  names = sorted((k for k in shapes if k.startswith('stage') and k[5:].isdigit()),
                 key=lambda k: int(k[5:]))

  @jax.jit
  def touched():
    params, state = init_params(seed)
    out = {}
    for name in names:
      depth = int(name[5:])
      probe = jax.random.normal(jax.random.fold_in(key, depth), shapes[name].shape,
                                shapes[name].dtype)
      grads = jax.grad(lambda p, n=name, c=probe: jnp.vdot(c, features(p, state)[n]))(params)
      out[depth] = jax.tree.map(lambda g: jnp.any(g != 0), grads)
    return out

  masks = jax.tree.map(bool, jax.device_get(touched()))
  return names, masks


def frozen(tx: optax.GradientTransformation, trainable) -> optax.GradientTransformation:
  """``tx`` whose updates of the student's parameters are zero where ``trainable`` (a
  pytree of bools shaped like ``params['student']``) is False; the loss terms'
  parameters (the projector) are all trained. Same state as ``tx``, so a frozen
  parameter is exactly unchanged (weight decay and momentum included).

  >>> tx = frozen(optax.sgd(1.0), {'a': True, 'b': False})
  >>> p = {'student': {'a': jnp.ones(1), 'b': jnp.ones(1)}, 'loss': {}}
  >>> u, _ = tx.update(p, tx.init(p), p)
  >>> float(u['student']['a'][0]), float(u['student']['b'][0])
  (-1.0, 0.0)
  """
  def update(updates, state, params=None):
    updates, state = tx.update(updates, state, params)
    student = jax.tree.map(lambda u, keep: u if keep else jnp.zeros_like(u),
                           updates['student'], trainable)
    return dict(updates, student=student), state

  return optax.GradientTransformation(tx.init, update)


def parameter_names(mask) -> list[str]:
  """The ``/``-joined paths of the True leaves of ``mask``.

  >>> parameter_names({'hidden': [{'kernel': True, 'bias': False}], 'head': {'kernel': False}})
  ['hidden/0/kernel']
  """
  out = []
  for path, keep in jax.tree_util.tree_flatten_with_path(mask)[0]:
    if keep:   # attribute steps (a variable's ``.value``) are not part of the name
      out.append('/'.join(str(getattr(k, 'key', getattr(k, 'idx', k))) for k in path
                          if not isinstance(k, jax.tree_util.GetAttrKey)))
  return out


# --------------------------------------------------------------------------- the plan

class LayerStage(NamedTuple):
  """One planned stage: the :class:`kdjax.schemes.stages.Stage` and the student
  parameters it trains (a pytree of bools; None: all)."""

  stage: stages_lib.Stage
  trainable: Any


def plan_layerwise(config: ml_collections.ConfigDict, workdir: str) -> list[LayerStage]:
  """The stages of the layer-wise run in ``workdir``, each config composed and checked
  (see the module docstring); reads the teacher's config, writes nothing.

  Raises:
    UserError: a bad scheme, a depth the student or the teacher does not have, no
      teacher, or a stage config the engine refuses.
  """
  options = layerwise_options(config)
  base = ml_collections.ConfigDict(config.to_dict())
  del base.scheme
  validate(base)   # the config's own fields before the teacher's
  teacher_dir = config.teacher.workdir
  if not teacher_dir:
    raise UserError('the layerwise scheme matches a teacher\'s features: set '
                    '--config.teacher.workdir=DIR (a finished `kdjax train` run)')
  if config.teacher.cache or config.teacher.hf_path:
    raise UserError('the layerwise scheme reads the features of a workdir teacher: unset '
                    'config.teacher.cache and config.teacher.hf_path')
  teacher_dir = storage.abspath(teacher_dir)
  if workdir_lib.latest_step(teacher_dir) is None:
    raise UserError(f'config.teacher.workdir {teacher_dir} has no checkpoint; train that '
                    'teacher first')
  with base.ignore_type():
    base.teacher.workdir = teacher_dir
  spec = kdata.dataset_spec(base.data.name, data_dir=base.data.data_dir or None)
  shape = dict(num_classes=spec.num_classes, input_shape=spec.input_shape,
               input_dtype=spec.input_dtype)
  names = block_names(base.model, **shape)
  teacher_config = merge(base_config(), workdir_lib.read_config(teacher_dir))
  teacher_names = block_names(teacher_config.model, **shape)
  for side, have, depth in [('student', names, s) for s, _ in options['hints']] + [
      ('teacher', teacher_names, t) for _, t in options['hints']]:
    if f'stage{depth}' not in have:
      model = base.model.name if side == 'student' else teacher_config.model.name
      raise UserError(f'config.scheme.hints: the {side} ({model}) has no block {depth}; its '
                      f'blocks are 1..{len(have)}')

  _, masks = depth_masks(base.model, seed=int(base.seed), **shape)
  # The first stage starts where the config says (config.init: a warm start, or fresh).
  plan, previous, start_step, below = [], base.init.workdir, int(base.init.step), None
  for s, t in options['hints']:
    name = f'hint{s}'
    stage = ml_collections.ConfigDict(base.to_dict())
    with stage.ignore_type():
      stage.num_steps = int(options['hint_steps'])
      stage.loss.terms = ml_collections.ConfigDict({'hint': {
          'loss': 'fitnet', 'weight': options['hint_weight'], 'student': f'stage{s}',
          'teacher': f'stage{t}', 'regressor': options['regressor']}})
      stage.init.workdir = previous
      stage.init.step = start_step
    _check(stage, name)
    mask = masks[s]
    if options['train'] == 'block' and below is not None:
      mask = jax.tree.map(lambda now, old: now and not old, mask, masks[below])
    folder = storage.join(workdir, name)
    plan.append(LayerStage(stages_lib.Stage(name, stage, 'external', folder, False), mask))
    previous, start_step, below = folder, 0, s
  final = ml_collections.ConfigDict(base.to_dict())
  with final.ignore_type():
    final.init.workdir = previous
    final.init.step = start_step
  _check(final, FINAL)
  plan.append(LayerStage(stages_lib.Stage(FINAL, final, 'external',
                                          storage.join(workdir, FINAL), False), None))
  return plan


def _check(config, name: str) -> None:
  try:
    validate(config)
  except UserError as e:
    raise UserError(f'stage {name!r}: {e}') from None


# --------------------------------------------------------------------------- the run

def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def run_layer_stage(planned: LayerStage) -> dict[str, Any]:
  """One stage: the engine's run of its config with the frozen parameters' updates set
  to zero, a fresh run warm-started from the previous stage; returns its summary."""
  config = planned.stage.config
  run = setup(config, log=_log)
  if planned.trainable is not None:
    tx = frozen(run.tx, planned.trainable)
    step = with_precision(make_train_step(run.apply, run.objective, tx,
                                          nonfinite=str(config.nonfinite),
                                          train_accuracy=bool(config.train_accuracy)),
                          str(config.get('precision', 'default')))
    calls = TrainCalls(step, run.feed, state_shardings=run.state_shardings, mesh=run.mesh)
    run = run._replace(tx=tx, step=step, calls=calls)

  def fresh(r):
    state = r.init()
    if config.init.workdir:
      state = warm_start(state, config.init.workdir, int(config.init.step))
      _log(f'student initialized from {config.init.workdir}')
    return state

  return stages_lib.run_stage(config, planned.stage.workdir, run=run, fresh=fresh)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the hint stages and the final stage into ``workdir`` and returns the run's
  summary: ``stages`` (as :func:`kdjax.schemes.stages.train_and_evaluate`'s), the
  ``trainable`` parameters of each stage, and the final stage's ``step``,
  ``eval_accuracy``, ``eval_loss``, ``train_loss``, ``train_accuracy``.

  Raises:
    UserError: a bad scheme, hint list, teacher or stage config (nothing written), or
      what a stage's run raises.
    Diverged: a stage's non-finite loss (its ``summary.json`` says where).
  """
  workdir = workdir_lib.resolve(workdir)
  plan = plan_layerwise(config, workdir)
  stages_lib.check_resumable([p.stage for p in plan])
  # A stage's frozen parameters are not in its config: the run's scheme (hints, train)
  # must be the one its stages were trained under.
  started = any(workdir_lib.has_checkpoints(p.stage.workdir) for p in plan)
  workdir_lib.prepare(workdir, config, has_results=started,
                      identity=(*IDENTITY_FIELDS, 'scheme'))
  by_name = {p.stage.name: p for p in plan}
  rows = stages_lib.run_stages([p.stage for p in plan],
                               runner=lambda stage: run_layer_stage(by_name[stage.name]))
  final = rows[-1]['summary']
  out = {'scheme': NAME, 'final_stage': FINAL, 'stages': rows,
         'trainable': {p.stage.name: (parameter_names(p.trainable) if p.trainable is not None
                                      else 'all') for p in plan}}
  for key in ('step', 'eval_accuracy', 'eval_loss', 'train_loss', 'train_accuracy',
              'examples_per_sec'):
    out[key] = final.get(key)
  if jax.process_index() == 0:
    workdir_lib.write_json(storage.join(workdir, workdir_lib.SUMMARY), out)
    stages_lib.plot_stages(workdir, [p.stage.name for p in plan],
                           [p.stage.workdir for p in plan])
  return out
