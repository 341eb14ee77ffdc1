"""The config of a training run: the defaults every file in ``configs/`` starts from, and
the checks that refuse a bad one before anything is written.

Every field here can be overridden on the command line
(``--config.optimizer.learning_rate=3e-3``); unknown keys and wrong types are
refused, and :func:`validate` refuses values out of range, each in one line.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections

from kdjax.config import check_int
from kdjax.config import check_number
from kdjax.config import check_numbers_in
from kdjax.engine.precision import PRECISIONS
from kdjax.errors import UserError
from kdjax.models.base import OUTPUTS as MODEL_OUTPUTS
from kdjax.models.base import REMAT_POLICIES

NONFINITE = ('stop', 'skip')
FEEDS = ('auto', 'device', 'stream')
OPTIMIZERS = ('adam', 'adamw', 'sgd')
SCHEDULES = ('constant', 'cosine', 'step')
CACHE_READERS = ('auto', 'memory', 'chunks')
ON_POLICY_METHODS = ('gkd', 'distillm')
TEACHER_DTYPES = ('float32', 'bfloat16')
# A frozen teacher's weights: 'none' as stored; 'int8': the kernels of its linear,
# convolution and embedding layers as per-output-channel symmetric int8 (kdjax.teacher).
TEACHER_QUANTIZE = ('none', 'int8')
# How a teacher with another tokenizer than the student's data is distilled from:
# 'none' refuses it; 'uld' re-tokenizes the text for the teacher (kdjax.engine.feed.Retokenizer)
# and reads its logits with the `uld` loss (kdjax.losses.uld).
VOCAB_METHODS = ('none', 'uld')
# DistiLLM's schedules of its fresh-sample probability over training (kdjax.engine.policy).
REPLAY_RATIOS = ('decreasing', 'constant', 'increasing')


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.num_steps = 1000
  c.batch_size = 256               # global batch, over all devices and hosts
  c.log_every = 50
  c.eval_every = 500
  c.checkpoint_every = 500
  c.keep_checkpoints = 3
  c.steps_per_call = 50            # steps fused in one jitted call (lax.scan)
  c.progress = True
  # A step whose loss or gradient norm is not finite: 'stop' the run there (exit 3,
  # nothing saved after the last good checkpoint) or 'skip' its update and count it.
  c.nonfinite = 'stop'
  # Start the student from another run's checkpoint (its parameters and model state; a
  # fresh optimizer): a data-trained student before on-policy distillation, say. Only a
  # fresh run reads it; a resumed one continues from its own checkpoints.
  c.init = ml_collections.ConfigDict({'workdir': '', 'step': 0})   # step 0: its latest

  c.mesh = [('data', -1)]          # -1: every device (the teacher's apart); fixed sizes take the first
  c.partition_rules = [('.*', None)]  # (regex over parameter paths, None | spec | 'fsdp')

  c.data = ml_collections.ConfigDict()
  c.data.name = 'mnist1d'
  c.data.data_dir = ''             # '' -> $KDJAX_DATA_DIR or ~/.cache/kdjax/tensorflow_datasets
  c.data.train_split = 'train'
  c.data.eval_split = 'test'
  c.data.feed = 'auto'             # 'device' (whole split on device), 'stream' (grain), 'auto'
  c.data.device_max_bytes = 1 << 30
  c.data.augment = ml_collections.ConfigDict({'kind': 'none'})
  c.data.eval_batch_size = 1000
  # Prompt -> continuation records: the loss reads the prompt's next-token targets too,
  # not only the continuation's (kdjax.engine.feed.with_prompt_loss).
  c.data.prompt_loss = False

  c.model = ml_collections.ConfigDict()
  c.model.name = 'mlp'
  c.model.kwargs = ml_collections.ConfigDict()
  # The computation dtype ('bfloat16': bf16 activations and matmuls); the parameters, the
  # optimizer state and the loss math stay float32 whatever it is (docs/precision.md).
  c.model.dtype = 'float32'
  # Activation rematerialization (kdjax.models.base.REMAT_POLICIES): 'none', 'full',
  # 'dots_saveable', 'dots_with_no_batch_dims_saveable', 'nothing_saveable',
  # 'save_attention_out'; per block for transformers, around the whole forward otherwise.
  c.model.remat = 'none'
  # Transformers' per-layer outputs the losses read: 'attentions', 'hidden_states' (features
  # hidden0..hiddenL), 'qkv' (features query{i}, key{i}, value{i}); computed only if listed.
  c.model.outputs = []

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = 'adam'        # adam | adamw | sgd
  c.optimizer.learning_rate = 1e-3
  c.optimizer.schedule = 'cosine'  # constant | cosine | step
  c.optimizer.decay_steps = [0]    # 'step': where the rate is multiplied by decay_factor
  c.optimizer.decay_factor = 0.1
  c.optimizer.warmup_steps = 0
  c.optimizer.weight_decay = 0.0
  c.optimizer.momentum = 0.9
  c.optimizer.grad_clip_norm = 0.0

  c.loss = ml_collections.ConfigDict()
  c.loss.terms = ml_collections.ConfigDict({'ce': {'weight': 1.0}})

  c.teacher = ml_collections.ConfigDict()
  c.teacher.workdir = ''           # a finished `kdjax train` workdir
  # Or a Hugging Face checkpoint folder (config.json, *.safetensors, tokenizer.json) of a
  # decoder LM (kdjax.models.from_pretrained); exactly one of workdir / hf_path.
  c.teacher.hf_path = ''
  c.teacher.dtype = 'float32'      # the teacher's parameters and computation (workdir or HF)
  c.teacher.quantize = 'none'      # 'int8': int8 kernels, dequantized in the forward
  # A teacher whose tokenizer differs from the student data's: 'none' refuses the run,
  # 'uld' distills across tokenizers (the `uld` loss; live teacher only).
  c.teacher.vocab_method = 'none'
  # 'uld': the teacher's row length for the re-tokenized text; 0: the student's row
  # length, at most the teacher's context (its data set's rows, or max_positions).
  c.teacher.seq_len = 0
  # [('.*', None)] (the default) replicates a workdir teacher and gives a Hugging Face
  # teacher its family's rules (kdjax.models.from_pretrained); any other list is used as is.
  c.teacher.partition_rules = [('.*', None)]
  c.teacher.outputs = []           # as model.outputs, for the teacher
  c.teacher.cache = ''             # a `kdjax cache build` directory
  # Stream feed: load the cache whole up to this size, else read rows per batch from its
  # chunk files ('auto'); 'memory' or 'chunks' force one (kdjax.cache.read.choose_reader).
  c.teacher.cache_reader = 'auto'
  c.teacher.cache_memory_max_bytes = 1 << 30
  # Devices set apart for a live teacher (the last ones; the student's mesh takes the
  # rest). 0: the teacher runs inside the student's step. >0 (device feed, one process):
  # the teacher's forward for the next call runs on its own devices while the student's
  # call runs (kdjax.engine.feed.TeacherAhead); same result either way.
  c.teacher.devices = 0
  # On-policy distillation (kdjax.engine.policy) adds a group `on_policy` (configs/lm/gkd.py,
  # configs/lm/distillm.py): `method` ('gkd' | 'distillm'), the sampling fields
  # (`max_new_tokens`, `temperature`, `top_k`, `top_p`, `stop_tokens`) and the method's own.
  # Count the train accuracy every step (an argmax over the logits); False: the summary's
  # train_accuracy is None (language models: a pass over [batch, tokens, vocab] saved).
  c.train_accuracy = True
  # The matmul precision the step, the evaluation and the teacher's forward are traced
  # under (kdjax.engine.precision): 'default' is the backend's (TF32 on recent NVIDIA
  # GPUs, one bfloat16 pass on TPUs), 'high' (TPU: three bfloat16 passes), 'highest'
  # (full float32). XLA:CPU computes float32 whatever the value.
  c.precision = 'default'
  return c


# Fields that define what a checkpoint means. A workdir whose saved config differs in
# any of them holds another run's checkpoints and is refused.
IDENTITY_FIELDS = ('seed', 'batch_size', 'data.name', 'data.train_split', 'data.augment',
                   'model', 'optimizer', 'loss', 'teacher.workdir', 'teacher.cache',
                   'teacher.hf_path', 'teacher.dtype', 'teacher.vocab_method',
                   'teacher.seq_len', 'on_policy', 'teacher.quantize')


def _one_of(config, dotted: str, allowed) -> None:
  node = config
  for part in dotted.split('.'):
    node = node[part]
  if node not in allowed:
    raise UserError(f'config.{dotted} must be one of {", ".join(allowed)} (got {node!r})')


def _mapping(value) -> dict:
  return value.to_dict() if isinstance(value, ml_collections.ConfigDict) else dict(value or {})


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses a config no run can use, in one line (:class:`UserError`), before anything
  is read or written. What needs the data or the devices (a batch larger than the
  split, a mesh larger than the machine) is checked by the setup."""
  check_int(config, 'seed', 0)
  for field in ('num_steps', 'batch_size', 'log_every', 'eval_every', 'checkpoint_every',
                'keep_checkpoints', 'steps_per_call'):
    check_int(config, field, 1)
  _one_of(config, 'nonfinite', NONFINITE)
  _check_precision(config)
  check_int(config, 'init.step', 0)
  _check_mesh(config.mesh)
  for field in ('model', 'teacher'):
    outputs = list(config[field].get('outputs', []))
    unknown = sorted(set(outputs) - set(MODEL_OUTPUTS))
    if unknown:
      raise UserError(f'config.{field}.outputs: unknown {unknown}; choose from '
                      f'{", ".join(MODEL_OUTPUTS)}')
  _check_rules(config.partition_rules, 'partition_rules')
  _one_of(config, 'data.feed', FEEDS)
  check_int(config, 'data.device_max_bytes', 0)
  check_int(config, 'data.eval_batch_size', 1)
  _check_augment(config.data.augment)
  check_numbers_in(_mapping(config.model.kwargs), 'config.model.kwargs', lambda v: v >= 0,
                   '>= 0')
  try:
    jnp.dtype(config.model.dtype)
  except TypeError:
    raise UserError(f'config.model.dtype must name a dtype such as float32 or bfloat16 '
                    f'(got {config.model.dtype!r})') from None
  _check_optimizer(config)
  _check_terms(config.loss.terms)
  _check_rules(config.teacher.partition_rules, 'teacher.partition_rules')
  _one_of(config, 'teacher.cache_reader', CACHE_READERS)
  check_int(config, 'teacher.cache_memory_max_bytes', 0)
  check_int(config, 'teacher.devices', 0)
  _check_teacher_source(config)
  _check_on_policy(config)


def _check_precision(config) -> None:
  """``precision``, ``model.remat`` and ``teacher.quantize`` (each optional in a config
  that does not start from :func:`base_config`)."""
  for dotted, allowed, default in (('precision', PRECISIONS, 'default'),
                                   ('model.remat', REMAT_POLICIES, 'none'),
                                   ('teacher.quantize', TEACHER_QUANTIZE, 'none')):
    group, _, key = dotted.rpartition('.')
    node = config[group] if group else config
    value = node.get(key, default) if hasattr(node, 'get') else default
    if value not in allowed:
      raise UserError(f'config.{dotted} must be one of {", ".join(allowed)} (got {value!r})')


def _check_teacher_source(config) -> None:
  """Where the teacher comes from (at most one of workdir / hf_path), its dtype, and a
  vocabulary method the rest of the config allows."""
  from kdjax.teacher import source
  source(config.teacher)
  _one_of(config, 'teacher.dtype', TEACHER_DTYPES)
  _one_of(config, 'teacher.vocab_method', VOCAB_METHODS)
  check_int(config, 'teacher.seq_len', 0)
  if config.teacher.vocab_method != 'uld':
    return
  if config.teacher.cache:
    raise UserError('config.teacher.vocab_method=uld runs the teacher live on the re-tokenized '
                    'text; unset config.teacher.cache')
  if int(config.teacher.devices):
    raise UserError('config.teacher.vocab_method=uld runs the teacher inside the student\'s '
                    'call; set config.teacher.devices=0')
  if config.get('on_policy') is not None:
    raise UserError('config.teacher.vocab_method=uld re-tokenizes the data set\'s rows, not '
                    'the student\'s samples; remove config.on_policy')
  from kdjax.data import normalize_spec
  augment = config.data.augment
  augment = augment.to_dict() if hasattr(augment, 'to_dict') else augment
  if normalize_spec(augment)['kind'] != 'none':
    raise UserError('config.teacher.vocab_method=uld gives the teacher the rows\' text, which '
                    "an augmentation would change for the student only; set "
                    "config.data.augment={'kind': 'none'}")


def _check_on_policy(config) -> None:
  """``config.on_policy`` (when present): its method, sampling and method fields, and a
  live teacher inside the student's call (the teacher scores the student's samples)."""
  if config.get('on_policy') is None:
    return
  _one_of(config, 'on_policy.method', ON_POLICY_METHODS)
  check_int(config, 'on_policy.max_new_tokens', 1)
  check_number(config, 'on_policy.temperature', lambda v: v >= 0, '>= 0 (0: greedy)')
  check_int(config, 'on_policy.top_k', 0)
  check_number(config, 'on_policy.top_p', lambda v: 0 < v <= 1, 'in (0, 1]')
  stops = config.on_policy.get('stop_tokens')
  if not isinstance(stops, (list, tuple)) or any(
      isinstance(t, bool) or not isinstance(t, int) or t < 0 for t in stops):
    raise UserError(f'config.on_policy.stop_tokens must be a list of token ids >= 0 '
                    f'(got {stops!r})')
  if config.on_policy.method == 'gkd':
    check_number(config, 'on_policy.lmbda', lambda v: 0 <= v <= 1, 'in [0, 1]')
    if not isinstance(config.on_policy.get('seq_kd'), bool):
      raise UserError(f'config.on_policy.seq_kd must be true or false '
                      f'(got {config.on_policy.get("seq_kd")!r})')
  else:
    check_number(config, 'on_policy.init_threshold', lambda v: 0 <= v <= 1, 'in [0, 1]')
    check_number(config, 'on_policy.threshold_step', lambda v: 0 < v <= 1, 'in (0, 1]')
    check_number(config, 'on_policy.loss_eps', lambda v: v >= 0, '>= 0')
    check_int(config, 'on_policy.capacity', 1)
    _one_of(config, 'on_policy.replay_ratio', REPLAY_RATIOS)
    if config.on_policy.capacity < config.batch_size:
      raise UserError(f'config.on_policy.capacity ({config.on_policy.capacity}) must hold at '
                      f'least one batch ({config.batch_size} rows); raise it')
  if 'on_policy' in _mapping(config.loss.terms):
    raise UserError("config.loss.terms.on_policy: the name is taken by the on-policy state; "
                    'rename the term')
  if config.teacher.cache:
    raise UserError('on-policy distillation scores the student\'s own samples with a live '
                    'teacher; unset config.teacher.cache')
  if int(config.teacher.devices):
    raise UserError('on-policy distillation runs the teacher inside the student\'s call; set '
                    'config.teacher.devices=0')
  if config.get('scheme') is not None:
    raise UserError('on-policy distillation trains one student; remove config.scheme or '
                    'config.on_policy')


def _check_optimizer(config) -> None:
  _one_of(config, 'optimizer.name', OPTIMIZERS)
  _one_of(config, 'optimizer.schedule', SCHEDULES)
  check_number(config, 'optimizer.learning_rate', lambda v: v > 0, 'positive')
  check_number(config, 'optimizer.decay_factor', lambda v: v > 0, 'positive')
  check_int(config, 'optimizer.warmup_steps', 0)
  check_number(config, 'optimizer.weight_decay', lambda v: v >= 0, '>= 0')
  check_number(config, 'optimizer.momentum', lambda v: 0 <= v < 1, 'in [0, 1)')
  check_number(config, 'optimizer.grad_clip_norm', lambda v: v >= 0, '>= 0')
  steps = config.optimizer.decay_steps
  if not isinstance(steps, (list, tuple)) or any(
      isinstance(s, bool) or not isinstance(s, int) or s < 0 for s in steps):
    raise UserError(f'config.optimizer.decay_steps must be a list of steps >= 0 (got {steps!r})')


def _check_mesh(mesh) -> None:
  ok = isinstance(mesh, (list, tuple)) and len(mesh) > 0 and all(
      isinstance(a, (list, tuple)) and len(a) == 2 and isinstance(a[0], str)
      and isinstance(a[1], int) and not isinstance(a[1], bool) and (a[1] == -1 or a[1] >= 1)
      for a in mesh)
  if not ok:
    raise UserError(f"config.mesh must be a list of (axis name, size >= 1 or -1) pairs such "
                    f"as [('data', -1)] (got {mesh!r})")


def _check_rules(rules, field: str) -> None:
  if not isinstance(rules, (list, tuple)):
    raise UserError(f'config.{field} must be a list of (regex, spec) pairs (got {rules!r})')
  for rule in rules:
    if not isinstance(rule, (list, tuple)) or len(rule) != 2 or not isinstance(rule[0], str):
      raise UserError(f'config.{field}: {rule!r} is not a (regex, spec) pair')
    try:
      re.compile(rule[0])
    except re.error as e:
      raise UserError(f'config.{field}: {rule[0]!r} is not a regex ({e})') from None


def _check_augment(augment) -> None:
  from kdjax.data import DataError
  from kdjax.data import normalize_spec
  spec = augment.to_dict() if hasattr(augment, 'to_dict') else augment
  if isinstance(spec, Mapping):
    check_numbers_in(dict(spec), 'config.data.augment', lambda v: v >= 0, '>= 0')
  try:
    normalize_spec(spec)
  except DataError as e:
    raise UserError(f'config.data.augment: {e}') from None


def _check_terms(terms) -> None:
  terms = _mapping(terms)
  if not terms:
    raise UserError('config.loss.terms is empty: name at least one loss term, e.g. ce')
  for name, options in terms.items():
    if options is None:
      continue
    if not isinstance(options, Mapping):
      raise UserError(f'config.loss.terms.{name} must be a mapping of options (got {options!r})')
    where = f'config.loss.terms.{name}'
    for key, value in options.items():
      if key == 'axis' or isinstance(value, Mapping):   # an axis, or a schedule
        continue
      if key == 'temperature':
        check_numbers_in({key: value}, where, lambda v: v > 0, '> 0')
      else:
        check_numbers_in({key: value}, where, lambda v: v >= 0, '>= 0')
