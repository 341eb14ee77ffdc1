"""The frozen teacher: loaded from a finished ``kdjax train`` workdir or from a Hugging
Face checkpoint folder, forward only.

A teacher is never checkpointed with the student and runs under ``stop_gradient``; its
parameters are placed with their own sharding (``config.teacher.partition_rules``,
often FSDP for a large teacher) on the student's mesh or on devices of its own. The
distillation engine, the cache builder and the benchmarks use it through
:func:`outputs`, so a live teacher and a cached one give the student the same batch
entries.

Where it comes from (``config.teacher``, exactly one of the two; :func:`load`):

* ``workdir``: the latest checkpoint of a ``kdjax train`` run (:func:`load_teacher`);
  its tokenizer is its data set's (:func:`kdjax.data.load_tokenizer`).
* ``hf_path``: a folder with ``config.json``, ``*.safetensors`` and ``tokenizer.json``
  as :func:`kdjax.models.save_pretrained` or ``transformers`` write it
  (:func:`load_hf_teacher`), read in ``config.teacher.dtype``.

Either way its :func:`fingerprint` covers its parameters, so one set of weights gives
one fingerprint whichever folder it was read from.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from kdjax import workdir as workdir_lib
from kdjax.config import from_dict
from kdjax.errors import UserError
from kdjax.models import from_config
from kdjax.models.base import named_features
from kdjax.parallel import shardings_from_rules

# The batch entries a teacher can give a loss (kdjax.losses.registry).
OUTPUT_KEYS = ('teacher_logits', 'teacher_features', 'teacher_attentions')


class Teacher(NamedTuple):
  """A frozen teacher.

  Attributes:
    apply: ``apply(params, state, x, *, train) -> (ModelOutput, state)``.
    variables: ``(params, model_state)``, placed on the mesh it was loaded for.
    num_classes: classifier outputs.
    config: the teacher's own training config; for a Hugging Face folder, a config
      with ``model`` (``name='decoder'``, its :class:`kdjax.models.DecoderConfig`
      fields as ``kwargs``, ``dtype``) and ``hf_path``.
    step: the checkpoint step it was restored from (0 for a Hugging Face folder).
    fingerprint: sha256 over its parameters (:func:`fingerprint`).
  """

  apply: Callable[..., Any]
  variables: Any
  num_classes: int
  config: Any
  step: int
  fingerprint: str


def fingerprint(params) -> str:
  """sha256 over every parameter's path and bytes (host arrays, or fully addressable ones).

  >>> a = fingerprint({'w': np.zeros(2, np.float32)})
  >>> len(a), a == fingerprint({'w': np.ones(2, np.float32)})
  (64, False)
  """
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()


def _checkpoint(workdir: str) -> tuple[int, Any]:
  if not workdir:
    raise UserError('this config needs a teacher: set --config.teacher.workdir=DIR '
                    '(a finished `kdjax train` workdir)')
  step = workdir_lib.latest_step(workdir)
  if step is None:
    raise UserError(f'teacher workdir {workdir} has no checkpoint; train the teacher first '
                    f'with `kdjax train --config ... --workdir {workdir}`')
  return step, from_dict(workdir_lib.read_config(workdir))


def _model(config, *, input_shape=None):
  from kdjax.data import dataset_spec
  spec = dataset_spec(config.data.name, data_dir=config.data.get('data_dir') or None)
  apply, _, (params, state) = from_config(
      config.model, num_classes=spec.num_classes,
      input_shape=input_shape or spec.input_shape, seed=int(config.seed))
  return apply, params, state, spec.num_classes


def _fill(template, restored, workdir: str):
  """``restored`` (nested dicts) in the structure of ``template`` (nnx state), shapes checked."""
  leaves = jax.tree.leaves(restored)
  want, treedef = jax.tree.flatten(template)
  if len(want) != len(leaves):
    raise UserError(f'the checkpoint in {workdir} does not match its config.json model; '
                    'was the workdir written by another kdjax version?')
  for w, got in zip(want, leaves):
    if tuple(w.shape) != tuple(np.shape(got)):
      raise UserError(f'the checkpoint in {workdir} does not match its config.json model '
                      f'(a parameter of shape {tuple(w.shape)} is stored as {np.shape(got)})')
  return jax.tree.unflatten(treedef, leaves)


def load_teacher(workdir: str, mesh: jax.sharding.Mesh, rules: Sequence | None = None, *,
                 input_shape=None) -> Teacher:
  """Restores the latest checkpoint of a teacher workdir as a frozen teacher.

  Only the student parameters and model state of that checkpoint are read (not the
  optimizer state), each array straight into its sharding on ``mesh`` from ``rules``.
  """
  step, config = _checkpoint(workdir)
  apply, params, state, num_classes = _model(config, input_shape=input_shape)
  shardings = shardings_from_rules((params, state), rules, mesh)
  param_sh, state_sh = (jax.tree.leaves(s) for s in shardings)
  params = _fill(params, workdir_lib.restore_subtree(workdir, step, ('params', 'student'),
                                                     shardings=param_sh), workdir)
  state = _fill(state, workdir_lib.restore_subtree(workdir, step, ('model_state',),
                                                   shardings=state_sh), workdir)
  return Teacher(apply, (params, state), num_classes, config, step, fingerprint(params))


def read_fingerprint(workdir: str) -> str:
  """The :func:`fingerprint` of a teacher workdir's latest checkpoint, read on the host
  (parameters only: no model, no devices, no optimizer state)."""
  step, config = _checkpoint(workdir)
  _, params, _, _ = _model(config)
  return fingerprint(_fill(params, workdir_lib.restore_subtree(
      workdir, step, ('params', 'student')), workdir))


def outputs(apply: Callable[..., Any], variables, x, needs=OUTPUT_KEYS, **kwargs) -> dict:
  """The teacher's batch entries for inputs ``x``: those of :data:`OUTPUT_KEYS` in
  ``needs``, forward only (eval mode) and under ``stop_gradient``; ``kwargs`` are the
  model's other inputs (:func:`kdjax.models.model_kwargs` of the batch)."""
  params, state = variables
  out, _ = apply(params, state, x, train=False, **kwargs)
  out = jax.lax.stop_gradient(out)
  entries = {'teacher_logits': out.logits, 'teacher_features': named_features(out),
             'teacher_attentions': out.attentions}
  return {k: v for k, v in entries.items() if k in needs}


# --------------------------------------------------------------------------- by config

WORKDIR, HF = 'workdir', 'hf'
# The teacher's partition rules when config.teacher.partition_rules is left at this
# default: a workdir teacher replicates; a Hugging Face teacher takes its family's rules
# (kdjax.models.hf: FSDP / tensor axes where the mesh has them, else replicated).
DEFAULT_RULES = (('.*', None),)


def source(teacher_config) -> tuple[str, str] | None:
  """``(WORKDIR, path)`` or ``(HF, path)`` from ``config.teacher``, or None when neither
  ``workdir`` nor ``hf_path`` is set.

  Raises:
    UserError: both are set.

  >>> source({'workdir': '/t', 'hf_path': ''})
  ('workdir', '/t')
  """
  get = teacher_config.get
  workdir, hf_path = get('workdir') or '', get('hf_path') or ''
  if workdir and hf_path:
    raise UserError('config.teacher.workdir and config.teacher.hf_path are both set; keep one '
                    '(a kdjax workdir or a Hugging Face checkpoint folder)')
  if hf_path:
    return HF, str(hf_path)
  if workdir:
    return WORKDIR, str(workdir)
  return None


def load(teacher_config, mesh: jax.sharding.Mesh, *, input_shape=None) -> Teacher:
  """The teacher ``config.teacher`` names (:func:`source`), placed on ``mesh`` by
  ``config.teacher.partition_rules``.

  Raises:
    UserError: no teacher named, both named, or one that cannot be read.
  """
  where = source(teacher_config)
  rules = _plain_rules(teacher_config.get('partition_rules'))
  if where is None:
    raise UserError('this config needs a teacher: set --config.teacher.workdir=DIR (a finished '
                    '`kdjax train` workdir) or --config.teacher.hf_path=DIR (a Hugging Face '
                    'checkpoint folder)')
  kind, path = where
  if kind == HF:
    return load_hf_teacher(path, mesh, None if rules == list(DEFAULT_RULES) else rules,
                           dtype=teacher_config.get('dtype') or 'float32')
  return load_teacher(path, mesh, rules, input_shape=input_shape)


def _plain_rules(rules) -> list | None:
  if rules is None:
    return None
  return [tuple(r) if isinstance(r, (list, tuple)) else r for r in rules]


def load_hf_teacher(path: str, mesh: jax.sharding.Mesh | None = None,
                    rules: Sequence | None = None, *, dtype: str = 'float32') -> Teacher:
  """A decoder language model from a Hugging Face checkpoint folder as a frozen teacher.

  Args:
    path: a folder with ``config.json`` and ``model.safetensors`` (or shards).
    mesh: place each parameter straight into its sharding on this mesh (default: the
      default device).
    rules: partition rules over parameter paths; None: the family's
      (:func:`kdjax.models.from_pretrained`).
    dtype: ``'float32'`` or ``'bfloat16'`` (parameters and computation).

  Raises:
    UserError: the folder cannot be read, or holds no decoder language model.
  """
  import jax.numpy as jnp
  from kdjax.models import Decoder
  from kdjax.models import from_pretrained
  from kdjax.models.base import functional
  module = from_pretrained(path, dtype=jnp.dtype(dtype), mesh=mesh, rules=rules)
  if not isinstance(module, Decoder):
    raise UserError(f'{path} holds a {type(module).__name__}; config.teacher.hf_path needs a '
                    'decoder language model (gpt2, llama or qwen2)')
  apply, params, state = functional(module)
  config = from_dict({'model': {'name': 'decoder', 'kwargs': decoder_kwargs(module.config),
                                'dtype': str(dtype)},
                      'hf_path': os.path.abspath(path)})
  return Teacher(apply, (params, state), int(module.config.vocab_size), config, 0,
                 fingerprint(params))


def decoder_kwargs(decoder_config) -> dict:
  """The :class:`kdjax.models.DecoderConfig` fields that rebuild it with
  ``create('decoder', num_classes=vocab_size, dtype=..., **kwargs)`` (all but the
  vocabulary and the dtypes), as plain config values."""
  fields = dataclasses.asdict(decoder_config)
  for name in ('vocab_size', 'dtype', 'param_dtype'):
    fields.pop(name)
  return json.loads(json.dumps(fields))   # tuples -> lists: a ConfigDict's plain values


def context_length(teacher: Teacher) -> int | None:
  """The longest row the teacher was made for: a Hugging Face decoder's
  ``max_positions``; a workdir teacher's ``model.kwargs.max_positions`` or else its data
  set's row length; None for a model without one."""
  kwargs = teacher.config.model.get('kwargs') or {}
  if kwargs.get('max_positions'):
    return int(kwargs['max_positions'])
  data = teacher.config.get('data')
  if data is None or not data.get('name'):
    return None
  from kdjax.data import dataset_spec
  shape = dataset_spec(data.name, data_dir=data.get('data_dir') or None).input_shape
  return int(shape[0]) if len(shape) == 1 else None


def config_fingerprint(teacher_config) -> str | None:
  """The :func:`fingerprint` of the teacher ``config.teacher`` names, read on the host
  (None when it names none): a workdir's parameters (:func:`read_fingerprint`) or a
  Hugging Face folder's, in ``config.teacher.dtype``."""
  where = source(teacher_config)
  if where is None:
    return None
  kind, path = where
  if kind == WORKDIR:
    return read_fingerprint(path)
  return load_hf_teacher(path, dtype=teacher_config.get('dtype') or 'float32').fingerprint


# --------------------------------------------------------------------------- tokenizers

def tokenizer(teacher_config):
  """The ``tokenizers.Tokenizer`` of the teacher ``config.teacher`` names: a workdir
  teacher's data set tokenizer (None when its data set stores none: not text), or a
  Hugging Face folder's ``tokenizer.json``.

  Raises:
    UserError: a Hugging Face folder without ``tokenizer.json``, or no teacher named.
  """
  where = source(teacher_config)
  if where is None:
    raise UserError('this config needs a teacher: set --config.teacher.workdir=DIR or '
                    '--config.teacher.hf_path=DIR')
  kind, path = where
  if kind == HF:
    from kdjax.models import load_tokenizer as load_hf_tokenizer
    return load_hf_tokenizer(path)
  _, config = _checkpoint(path)
  return data_tokenizer(config.data.name, config.data.get('data_dir') or None)


def data_tokenizer(name: str, data_dir: str | None = None):
  """The tokenizer a data set stores (:func:`kdjax.data.load_tokenizer`), or None when it
  stores none (a data set that is not text)."""
  from kdjax.data import DataError
  from kdjax.data import load_tokenizer as load_data_tokenizer
  try:
    return load_data_tokenizer(name, data_dir=data_dir)
  except DataError:
    return None


def tokenizer_digest(tok) -> str:
  """sha256 of what makes a tokenizer cut text into ids: its model section (type,
  vocabulary, merges) and its added tokens (ids and strings), in a canonical JSON.

  Formatting, padding, truncation, post-processing and the ``tokenizers`` version that
  wrote the file are left out, so the same tokenizer saved twice (by ``tokenizers`` or
  ``transformers``) has one digest; BPE merges written as ``"a b"`` or ``["a", "b"]``
  compare equal.

  >>> from kdjax.data.text import char_tokenizer
  >>> a, b, c = (tokenizer_digest(char_tokenizer([t])) for t in ('abc', 'cab', 'abd'))
  >>> a == b, a == c
  (True, False)
  """
  raw = json.loads(tok.to_str())
  model = dict(raw.get('model') or {})
  if isinstance(model.get('merges'), list):
    model['merges'] = [m.split(' ', 1) if isinstance(m, str) else list(m)
                       for m in model['merges']]
  keep = ('type', 'vocab', 'merges', 'unk_token', 'continuing_subword_prefix',
          'end_of_word_suffix', 'byte_fallback')
  canonical = {'model': {k: model.get(k) for k in keep},
               'added_tokens': sorted((t['id'], t['content'])
                                      for t in raw.get('added_tokens') or ())}
  text = json.dumps(canonical, sort_keys=True, ensure_ascii=False, separators=(',', ':'))
  return hashlib.sha256(text.encode()).hexdigest()
