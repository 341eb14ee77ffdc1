"""Setup: everything a training run needs, built from its config, top to bottom.

``setup(config)`` returns a :class:`Setup`: the mesh, the data set, the objective, the
teacher (live, cached or none), the student, the optimizer, the feed, the train
state's shapes and shardings (the parameters are made directly in them), the one
train step and its jitted calls, the evaluator and the schedule. It reads data and
checkpoints but writes nothing: a bad config is refused before a workdir exists.
``kdjax train`` / ``kdjax distill`` (:mod:`kdjax.distill.train`), the benchmarks and
the tests all start here.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Protocol

import jax
import ml_collections
import numpy as np

from kdjax import data as kdata
from kdjax import teacher as teacher_lib
from kdjax.data.text import EOS_ID
from kdjax.data.text import PAD_ID
from kdjax.engine import policy as policy_lib
from kdjax.engine.config import validate
from kdjax.engine.evaluate import make_evaluator
from kdjax.engine.feed import TEACHER_VIEW_KEYS
from kdjax.engine.feed import DeviceSource
from kdjax.engine.feed import Feed
from kdjax.engine.feed import Retokenizer
from kdjax.engine.feed import StreamSource
from kdjax.engine.feed import TeacherAhead
from kdjax.engine.feed import teacher_inputs
from kdjax.engine.loop import Schedule
from kdjax.engine.loop import TrainCalls
from kdjax.engine.optim import make_optimizer
from kdjax.engine.precision import student_model
from kdjax.engine.precision import with_precision
from kdjax.engine.state import TrainState
from kdjax.engine.step import init_train_state
from kdjax.engine.step import make_train_step
from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.models.base import output_kwargs
from kdjax.models.base import sample_inputs
from kdjax.parallel import batch_axes
from kdjax.parallel import batch_shards
from kdjax.parallel import initialize_from_env
from kdjax.parallel import make_mesh
from kdjax.parallel import shardings_from_rules
from kdjax.parallel import split_devices

TEACHER_NEEDS = frozenset(teacher_lib.OUTPUT_KEYS)
CACHE_NEEDS = frozenset({'teacher_topk_logits', 'teacher_topk_indices',
                         'teacher_sample_indices', 'teacher_sample_weights'})


class CachedTeacher(Protocol):
  """A teacher cache as a run reads it (``kdjax.cache.read.RunCache`` is one)."""

  epochs: int
  nbytes: int

  def check(self, config, *, num_classes: int, needs) -> None: ...
  def check_arrays(self, arrays: dict) -> None: ...
  def check_stream(self, config) -> None: ...
  def columns(self, needs) -> dict: ...
  def join(self, columns, epoch, positions) -> dict: ...
  def reader(self, config) -> str: ...
  def host_rows(self, reader: str, needs) -> Callable[[np.ndarray, np.ndarray], dict]: ...
  def sample(self, needs) -> dict: ...


class Data(NamedTuple):
  """A data set already in memory (notebooks, benchmarks): its spec and its training and
  evaluation splits as ``{'x', 'label', 'id'}`` numpy arrays (fed from the devices)."""

  spec: kdata.DatasetSpec
  train: dict
  eval: dict


class Setup(NamedTuple):
  """What :func:`setup` builds (see the module docstring)."""

  config: ml_collections.ConfigDict
  mesh: jax.sharding.Mesh
  spec: kdata.DatasetSpec
  objective: Any
  teacher: teacher_lib.Teacher | None
  cache: CachedTeacher | None
  apply: Callable[..., Any]
  tx: Any
  feed: Feed
  feed_kind: str
  step: Callable
  calls: TrainCalls
  state_shardings: Any
  abstract_state: TrainState
  init: Callable[[], TrainState]
  evaluate: Callable[[TrainState], dict]
  schedule: Schedule

  @property
  def distills(self) -> bool:
    """Whether the run learns from a teacher: an objective that reads one (live or
    cached), or a cache of its generations (sequence-level KD trains with CE on them)."""
    return bool(self.objective.needs & (TEACHER_NEEDS | CACHE_NEEDS)) or self.cache is not None


def setup(config: ml_collections.ConfigDict, *, cache: CachedTeacher | None = None,
          teacher: teacher_lib.Teacher | None = None, data: Data | None = None,
          log: Callable[[str], None] = print) -> Setup:
  """Builds a run from ``config`` (see the module docstring).

  Args:
    config: a training config (:func:`kdjax.engine.config.base_config`).
    cache: the teacher cache of ``config.teacher.cache``, opened by the caller
      (``kdjax.cache.open_for_run``); it replaces the live teacher.
    teacher: a teacher already made (notebooks, benchmarks), placed here by
      ``config.teacher.partition_rules``; default: ``config.teacher.workdir``'s, when the
      objective needs one.
    data: a data set in memory instead of ``config.data`` (the device feed).
    log: where one-line notes go (process 0 prints them).

  Raises:
    UserError: a config, data set, teacher or cache this run cannot use.
  """
  # ---- the config, the processes and the devices
  validate(config)
  initialize_from_env()
  mesh, teacher_mesh = _meshes(config)
  batch_size = int(config.batch_size)

  # ---- the data set
  data_dir = config.data.data_dir or None
  spec = data.spec if data is not None else kdata.dataset_spec(config.data.name, data_dir=data_dir)
  num_train = (len(data.train['label']) if data is not None
               else _split_size(spec, config.data.train_split))
  if num_train is not None and batch_size > num_train:
    raise UserError(f'batch_size {batch_size} is larger than the {num_train} examples of '
                    f'{config.data.name}:{config.data.train_split}; lower config.batch_size')

  # ---- the objective, and the teacher it reads: live, cached or none
  objective = _objective(config)
  _check_bank_rows(config, num_train)
  needs = objective.needs
  if cache is not None:
    cache.check(config, num_classes=spec.num_classes, needs=needs)
  elif needs & CACHE_NEEDS:
    raise UserError('sparse (top-k) and sampled losses read the teacher cache: build one with '
                    '`kdjax cache build` and pass --config.teacher.cache=DIR')
  # A cache of generated sequences (``rows_only``) replaces the data's rows, not the
  # teacher's outputs: a loss that reads those has the live teacher score the cached rows.
  scores_rows = (cache is not None and getattr(cache, 'rows_only', False)
                 and bool(needs & TEACHER_NEEDS))
  live = scores_rows or (cache is None and (bool(needs & TEACHER_NEEDS)
                                            or teacher_lib.source(config.teacher) is not None))
  # The tokenizers are compared before the teacher's weights are read.
  vocabularies = (_check_tokenizers(config, spec, teacher) if live and data is None
                  else None)
  if live and teacher is None:
    teacher = teacher_lib.load(config.teacher, teacher_mesh or mesh)
  elif live:
    teacher = teacher._replace(variables=jax.device_put(teacher.variables, shardings_from_rules(
        teacher.variables, config.teacher.partition_rules, teacher_mesh or mesh)))
    # Its own computation dtype; int8 as config.teacher.quantize says.
    teacher = teacher_lib.convert(teacher, quantize=config.teacher.get('quantize') or 'none')
  if not live:
    teacher = None
  retokenize = None
  if config.teacher.vocab_method == 'uld':
    _check_uld_terms(config, teacher)
    if vocabularies is None:
      raise UserError('config.teacher.vocab_method=uld re-tokenizes the rows of config.data, '
                      'and a data set passed in memory has no tokenizer; name it in config.data')
    retokenize = _retokenizer(config, spec, teacher, *vocabularies)
  elif teacher is not None and teacher.num_classes != spec.num_classes:
    raise UserError(f'the teacher predicts {teacher.num_classes} classes but {config.data.name} '
                    f'has {spec.num_classes}; use a teacher trained on the same label space')

  if teacher is not None and config.teacher.outputs:
    teacher = teacher._replace(apply=functools.partial(
        teacher.apply, **output_kwargs(config.teacher.outputs)))
  # Every forward below is traced under config.precision (kdjax.engine.precision).
  precision = str(config.get('precision', 'default'))
  if teacher is not None:
    teacher = teacher._replace(apply=with_precision(teacher.apply, precision))

  # ---- the student and its optimizer
  eval_apply, init_params, _ = student_model(config.model, num_classes=spec.num_classes,
                                            input_shape=spec.input_shape)
  eval_apply = with_precision(eval_apply, precision)
  # The per-layer outputs the losses read (attentions, hidden states, q/k/v), only in training.
  apply = functools.partial(eval_apply, **output_kwargs(config.model.outputs))
  tx = make_optimizer(config.optimizer, int(config.num_steps))
  schedule = Schedule(int(config.num_steps), int(config.steps_per_call), int(config.log_every),
                      int(config.eval_every), int(config.checkpoint_every))

  # ---- on-policy distillation: the student (GKD, DistiLLM) writes the continuations
  policy = None
  if config.get('on_policy') is not None:
    policy = policy_lib.from_config(config, spec, apply=eval_apply, teacher=teacher, data=data)
    objective = policy_lib.carry_policy_state(objective, policy)   # its state, checkpointed

  # ---- the feed: device-resident split or grain stream; cache rows; teacher's devices
  augment = kdata.make_augment(_plain(config.data.augment))
  kind = 'device' if data is not None else _feed_kind(config, spec, cache)
  if teacher_mesh is not None and (kind != 'device' or teacher is None or not needs & TEACHER_NEEDS):
    raise UserError('config.teacher.devices > 0 needs a live teacher (no teacher cache) and '
                    "the device feed (config.data.feed='device'); set it to 0")
  feed = _feed(config, kind, mesh=mesh, cache=cache, needs=needs, augment=augment,
               teacher=teacher, teacher_mesh=teacher_mesh, schedule=schedule, log=log,
               arrays=data.train if data is not None else None, policy=policy,
               retokenize=retokenize)

  # ---- the state: shapes, shardings by rule, and an init that makes it in them
  init = _init_fn(apply, init_params, objective, tx, config=config, spec=spec,
                  teacher=teacher, cache=cache, needs=needs, retokenize=retokenize)
  seed = np.int32(config.seed)
  abstract = jax.eval_shape(init, seed)
  state_shardings = shardings_from_rules(abstract, config.partition_rules, mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_shardings)
  make_state = jax.jit(init, out_shardings=state_shardings)

  # ---- the one step, its calls, and the evaluator
  step = with_precision(make_train_step(apply, objective, tx, nonfinite=str(config.nonfinite),
                                        train_accuracy=bool(config.train_accuracy)), precision)
  calls = TrainCalls(step, feed, state_shardings=state_shardings, mesh=mesh)
  eval_arrays = (data.eval if data is not None else
                 kdata.load_arrays(config.data.name, config.data.eval_split, data_dir=data_dir))
  evaluate_params = make_evaluator(eval_apply, eval_arrays, mesh,
                                   batch_size=int(config.data.eval_batch_size))
  return Setup(config, mesh, spec, objective, teacher, cache, apply, tx, feed, kind, step,
               calls, state_shardings, abstract, lambda: make_state(seed),
               lambda state: evaluate_params(state.params['student'], state.model_state),
               schedule)


def _meshes(config) -> tuple[jax.sharding.Mesh, jax.sharding.Mesh | None]:
  """``(student mesh, teacher mesh or None)``; ``config.teacher.devices`` sets devices
  apart for the teacher: the last ones, in a multi-process run the last
  ``k / processes`` of each process (:func:`kdjax.parallel.split_devices`), so that
  every process holds its share of the teacher's batch and of the student's."""
  k = int(config.teacher.devices)
  devices = jax.devices()
  teacher_mesh = None
  if k:
    if k >= len(devices):
      raise UserError(f'config.teacher.devices={k}: must be in 0..{len(devices) - 1} (there are '
                      f'{len(devices)} devices and the student needs at least one)')
    devices, apart = split_devices(devices, k)
    teacher_mesh = make_mesh([('data', -1)], devices=apart)
  axes = [tuple(axis) for axis in config.mesh]
  wanted = math.prod(size for _, size in axes)
  if wanted > 0 and wanted < len(devices) and jax.process_count() == 1:
    devices = devices[:wanted]   # a mesh of fixed size takes the first devices
  try:
    mesh = make_mesh(axes, devices=devices)
  except ValueError as e:
    raise UserError(f'config.mesh: {e}') from None
  batch = int(config.batch_size)
  if batch % batch_shards(mesh):
    raise UserError(f'batch_size {batch} does not divide over the {batch_shards(mesh)} '
                    f'devices of mesh axes {" x ".join(batch_axes(mesh))}; pick a multiple')
  if teacher_mesh is not None and batch % teacher_mesh.size:
    raise UserError(f'batch_size {batch} does not divide over the teacher\'s '
                    f'{teacher_mesh.size} devices (config.teacher.devices); pick a multiple')
  return mesh, teacher_mesh


def _objective(config):
  terms = config.loss.terms
  terms = terms.to_dict() if hasattr(terms, 'to_dict') else dict(terms)
  try:
    return build_objective(terms)
  except (KeyError, ValueError) as e:
    raise UserError(f'config.loss.terms: {e.args[0] if e.args else e}') from None


def _plain(value: Any) -> Any:
  return value.to_dict() if hasattr(value, 'to_dict') else value


def _check_bank_rows(config, num_train: int | None) -> None:
  """A loss with a row per training example (CRD's memory banks, ``n_data``) has a row
  for each example of the train split: an example id past the last row would be
  clamped by the jitted gather, silently updating another example's row."""
  if num_train is None:
    return
  for name, term in config.loss.terms.items():
    n_data = term.get('n_data')
    if n_data is not None and int(n_data) < num_train:
      raise UserError(f'config.loss.terms.{name}.n_data is {int(n_data)}, fewer rows than the '
                      f'{num_train} examples of {config.data.name}:{config.data.train_split}; '
                      f'set it to {num_train}')


def _split_size(spec: kdata.DatasetSpec, split: str) -> int | None:
  """Examples in a split expression such as ``'train+transfer'`` (None if sliced)."""
  total = 0
  for part in split.split('+'):
    part = part.strip()
    if part not in spec.splits:
      if '[' in part:
        return None
      raise UserError(f'{spec.name} has no split {part!r}; its splits: '
                      f'{", ".join(sorted(spec.splits))}')
    total += spec.splits[part]
  return total


def _feed_kind(config, spec, cache) -> str:
  """``config.data.feed``; ``auto``: the device feed when the split (and the cache) fit in
  ``config.data.device_max_bytes``."""
  kind = config.data.feed
  if kind != 'auto':
    return kind
  n = _split_size(spec, config.data.train_split)
  if n is None:
    return 'stream'
  nbytes = n * 4 * math.prod(spec.input_shape) + (cache.nbytes if cache is not None else 0)
  return 'device' if nbytes <= int(config.data.device_max_bytes) else 'stream'


def _feed(config, kind: str, *, mesh, cache, needs, augment, teacher, teacher_mesh,
          schedule: Schedule, log, arrays=None, policy=None, retokenize=None) -> Feed:
  data_dir = config.data.data_dir or None
  seed, batch_size = int(config.seed), int(config.batch_size)
  prompt_loss = bool(config.data.prompt_loss)
  keys = policy.keys if policy is not None else ()
  if kind == 'device':
    if arrays is None:
      arrays = kdata.load_arrays(config.data.name, config.data.train_split, data_dir=data_dir)
    if retokenize is not None:   # the whole split in the teacher's tokens, once
      arrays = {**arrays, **retokenize(arrays['x'], arrays.get('segment_ids'))}
      keys = (*keys, *TEACHER_VIEW_KEYS)
    columns = None
    if cache is not None:
      if config.teacher.cache_reader == 'chunks':
        raise UserError("config.teacher.cache_reader='chunks' needs the stream feed (the device "
                        "feed keeps the cache on device); add --config.data.feed=stream")
      cache.check_arrays(arrays)
      columns = cache.columns(needs)
      log(f'teacher cache: {cache.nbytes / 2**20:.1f} MiB, on device with the data')
    source = DeviceSource(arrays, batch_size=batch_size, seed=seed, mesh=mesh, columns=columns,
                          join=cache.join if cache is not None else None, extra_keys=keys)
    if teacher_mesh is not None:
      ahead = TeacherAhead(arrays, teacher, teacher_mesh=teacher_mesh, student_mesh=mesh,
                           batch_size=batch_size, seed=seed, augment=augment, needs=needs,
                           next_chunk=schedule.chunk)
      return Feed(source, augment=augment, seed=seed, needs=needs, ahead=ahead,
                  prompt_loss=prompt_loss)
    return Feed(source, augment=augment, seed=seed, teacher=teacher, needs=needs, policy=policy,
                prompt_loss=prompt_loss)
  iterator = kdata.make_train_iterator(
      config.data.name, split=config.data.train_split, batch_size=batch_size, seed=seed,
      data_dir=data_dir, shard_index=jax.process_index(), shard_count=jax.process_count())
  rows = None
  if cache is not None:
    cache.check_stream(config)
    reader = cache.reader(config)
    rows = cache.host_rows(reader, needs)
    log(f'teacher cache: {cache.nbytes / 2**20:.1f} MiB, ' + (
        'loaded whole' if reader == 'memory' else 'rows read per batch from its chunk files'))
  source = StreamSource(iterator, mesh=mesh, rows=rows,
                        num_cached=cache.epochs if cache is not None else None, extra_keys=keys,
                        retokenize=retokenize)
  return Feed(source, augment=augment, seed=seed, teacher=teacher, needs=needs, policy=policy,
              prompt_loss=prompt_loss)


def _init_fn(apply, init_params, objective, tx, *, config, spec, teacher, cache, needs,
             retokenize=None):
  """``init(seed) -> TrainState`` (pure; jitted with the state's shardings; the seed is
  an argument, so runs that differ only in it share the program).

  The objective's learned parts (projectors, queues) are initialized from a
  two-example sample: the student's outputs, and the teacher's (live, computed once
  on its devices, or a cache row; a re-tokenizing teacher on rows of its own length).
  """
  x = np.zeros((2, *spec.input_shape), spec.input_dtype)
  extra = cache.sample(needs) if cache is not None else {}
  if teacher is not None:
    view = {}
    if retokenize is not None:
      shape = (2, retokenize.length)
      view = {'teacher_input_ids': np.zeros(shape, np.int32),
              'teacher_segment_ids': np.ones(shape, np.int32),
              'teacher_positions': np.broadcast_to(np.arange(shape[1], dtype=np.int32), shape),
              'teacher_where': np.ones(shape, bool)}
    teacher_x, kwargs = teacher_inputs({'x': x, **view})
    forward = jax.jit(lambda v: teacher_lib.outputs(teacher.apply, v, teacher_x, **kwargs))
    extra = {**jax.device_get(forward(teacher.variables)),
             **({'teacher_where': view['teacher_where']} if view else {})}

  def init(seed) -> TrainState:
    params, model_state = init_params(seed)
    out, _ = apply(params, model_state, x, train=False)
    sample = {**sample_inputs(out), **extra}
    key = jax.random.key(seed)
    loss_params, loss_state = objective.init(jax.random.fold_in(key, 1), sample)
    return init_train_state(params, model_state, tx, rng=jax.random.fold_in(key, 2),
                            loss_params=loss_params, loss_state=loss_state)

  return init


# --------------------------------------------------------------------------- tokenizers

def _check_tokenizers(config, spec, teacher) -> tuple[Any, Any] | None:
  """Compares the teacher's tokenizer with the student data's (token data only; before
  the teacher's weights are read). Returns ``(student, teacher)`` tokenizers for
  ``vocab_method='uld'``, else None.

  Raises:
    UserError: the tokenizers differ and no vocabulary method is chosen; or ``uld``
      without a tokenizer on both sides.
  """
  uld = config.teacher.vocab_method == 'uld'
  tokens = len(spec.input_shape) == 1 and spec.input_dtype.startswith('int')
  student = (teacher_lib.data_tokenizer(config.data.name, config.data.data_dir or None)
             if tokens else None)
  if student is None and not uld:
    return None    # not text: the class counts are compared once the teacher is loaded
  if teacher is not None and teacher_lib.source(config.teacher) is None:
    ours = _given_teacher_tokenizer(teacher)
  else:
    ours = teacher_lib.tokenizer(config.teacher)
  if uld:
    if student is None or ours is None:
      raise UserError('config.teacher.vocab_method=uld re-tokenizes text: the student\'s data '
                      'set and the teacher must both have a tokenizer (a language-model data '
                      'set; a workdir teacher trained on one, or a tokenizer.json in hf_path)')
    return student, ours
  if ours is None:
    return None
  a, b = teacher_lib.tokenizer_digest(ours), teacher_lib.tokenizer_digest(student)
  if a != b:
    raise UserError(f"the teacher's and the student's tokenizers differ (teacher "
                    f'{ours.get_vocab_size()} tokens, digest {a[:12]}; {config.data.name} '
                    f'{student.get_vocab_size()} tokens, digest {b[:12]}); set '
                    '--config.teacher.vocab_method=uld to distill across tokenizers')
  return None


def _given_teacher_tokenizer(teacher):
  """The tokenizer of a teacher made by the caller, from its config (None if unknown)."""
  config = teacher.config
  if config is None:
    return None
  if config.get('hf_path'):
    return teacher_lib.tokenizer({'hf_path': config.hf_path})
  data = config.get('data')
  if data is None or not data.get('name'):
    return None
  return teacher_lib.data_tokenizer(data.name, data.get('data_dir') or None)


def _check_uld_terms(config, teacher) -> None:
  """``vocab_method='uld'``: a live teacher, a ``uld`` term, and no other term reading the
  teacher (its logits are over another vocabulary, its positions another text cut)."""
  terms = _plain(config.loss.terms)
  losses = {name: (options or {}).get('loss', name) for name, options in terms.items()}
  if teacher is None or 'uld' not in losses.values():
    raise UserError("config.teacher.vocab_method=uld distills with the uld loss from a live "
                    "teacher: add a term such as --config.loss.terms=\"{'ce': {'weight': 1.0}, "
                    "'uld': {'weight': 1.5}}\" and set config.teacher.workdir or hf_path")
  from kdjax.losses import get as get_loss
  others = sorted(name for name, loss in losses.items()
                  if loss != 'uld' and set(get_loss(loss).needs) & (TEACHER_NEEDS | CACHE_NEEDS))
  if others:
    raise UserError(f'config.loss.terms: {", ".join(others)} read the teacher position by '
                    'position in one vocabulary, which a teacher with another tokenizer does not '
                    'share (config.teacher.vocab_method=uld); keep uld and terms without a teacher')


def _retokenizer(config, spec, teacher, student_tok, teacher_tok) -> Retokenizer:
  """The student rows -> teacher rows rewriter of ``vocab_method='uld'``, with the
  teacher's row length checked against its context."""
  context = teacher_lib.context_length(teacher) if teacher.config is not None else None
  length = int(config.teacher.seq_len) or int(spec.input_shape[0])
  if context is not None and length > context:
    if config.teacher.seq_len:
      raise UserError(f'config.teacher.seq_len={length} is longer than the teacher\'s context '
                      f'of {context} positions; lower it')
    length = context
  eos_token = student_tok.id_to_token(EOS_ID)
  teacher_eos = teacher_tok.token_to_id(eos_token) if eos_token is not None else None
  if teacher_eos is None and teacher.config is not None:
    eos = (teacher.config.model.get('kwargs') or {}).get('eos_token_id')
    teacher_eos = eos[0] if isinstance(eos, (list, tuple)) and eos else eos
  return Retokenizer(student_tok, teacher_tok, length=length, student_eos=EOS_ID,
                     teacher_eos=None if teacher_eos is None else int(teacher_eos),
                     pad_id=PAD_ID)
