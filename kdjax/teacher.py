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

How it is held (:func:`convert`, applied by :func:`load`): ``config.teacher.dtype``
``'bfloat16'`` makes a workdir teacher's floating parameters and computation bfloat16
(half the memory); ``config.teacher.quantize='int8'`` stores the kernels of its linear,
convolution and embedding layers as int8 with one float32 scale per output channel
(:class:`Int8Weight`; biases and norms stay float), a quarter of their float32 bytes,
dequantized inside the forward. Either changes the teacher's outputs, so it is part of
the fingerprint.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import workdir as workdir_lib
from kdjax.config import from_dict
from kdjax.errors import UserError
from kdjax.models import from_config
from kdjax.models.base import named_features
from kdjax.parallel import path_str
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


def _model(config, *, input_shape=None, dtype=None):
  from kdjax.data import dataset_spec
  spec = dataset_spec(config.data.name, data_dir=config.data.get('data_dir') or None)
  model = config.model
  if dtype is not None:   # the computation dtype; the parameters are cast by the caller
    model = {**(model.to_dict() if hasattr(model, 'to_dict') else dict(model)),
             'dtype': str(dtype)}
  apply, _, (params, state) = from_config(
      model, num_classes=spec.num_classes,
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
                 input_shape=None, dtype: str | None = None) -> Teacher:
  """Restores the latest checkpoint of a teacher workdir as a frozen teacher.

  Only the student parameters and model state of that checkpoint are read (not the
  optimizer state), each array straight into its sharding on ``mesh`` from ``rules``.
  ``dtype`` (e.g. ``'bfloat16'``): the computation dtype, instead of the one the
  teacher was trained with; pass the parameters through :func:`convert` to store them
  in it too. The fingerprint is the stored parameters'.
  """
  step, config = _checkpoint(workdir)
  apply, params, state, num_classes = _model(config, input_shape=input_shape, dtype=dtype)
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
  dtype = teacher_config.get('dtype') or 'float32'
  quantize = teacher_config.get('quantize') or 'none'
  if kind == HF:   # read in its dtype already
    teacher = load_hf_teacher(path, mesh, None if rules == list(DEFAULT_RULES) else rules,
                              dtype=dtype)
    return convert(teacher, quantize=quantize)
  teacher = load_teacher(path, mesh, rules, input_shape=input_shape,
                         dtype=None if dtype == 'float32' else dtype)
  return convert(teacher, dtype=None if dtype == 'float32' else dtype, quantize=quantize)


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
  for name in ('vocab_size', 'dtype', 'param_dtype', 'remat'):
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
  dtype = teacher_config.get('dtype') or 'float32'
  quantize = teacher_config.get('quantize') or 'none'
  if kind == WORKDIR:
    return converted_fingerprint(read_fingerprint(path),
                                 dtype=None if dtype == 'float32' else dtype, quantize=quantize)
  return converted_fingerprint(load_hf_teacher(path, dtype=dtype).fingerprint,
                               quantize=quantize)


# --------------------------------------------------------------------------- dtype and int8

QUANTIZE = ('none', 'int8')
# The decoder's query/key/value projections keep their input axis first and their heads
# after it ([hidden, heads, head_dim]; kdjax.models.transformer): their output channels are
# every axis but the first. Every other kernel (nnx.Linear, nnx.Conv, the attention output
# projection [heads, head_dim, hidden]) has its output channels on the last axis.
_INPUT_FIRST = re.compile(r'(^|/)attn/(q|k|v|qkv)/kernel$')


@functools.partial(jax.tree_util.register_dataclass, data_fields=['values', 'scale'],
                   meta_fields=['dtype'])
@dataclasses.dataclass(frozen=True)
class Int8Weight:
  """A weight stored as symmetric int8: ``weight ~= values * scale``.

  Attributes:
    values: int8, the weight's shape, in ``[-127, 127]``.
    scale: float32, the weight's shape with the reduced (input) axes kept at size 1:
      ``max |weight| / 127`` over each output channel.
    dtype: the dtype :func:`dequantize` gives back (the weight's before).
  """

  values: jax.Array
  scale: jax.Array
  dtype: str


def quantize_int8(weight: jax.Array, axes: Sequence[int]) -> Int8Weight:
  r"""Symmetric int8 quantization with one scale per output channel.

  .. math::
    s_c = \max_{i \in c} |w_i| / 127, \qquad q_i = \mathrm{round}(w_i / s_c)

  over ``axes`` (the reduced axes: a channel is every index of the other axes); an
  all-zero channel gets scale 1 (its values are 0). The rounding error of an entry is
  at most ``s_c / 2``.

  References:
    Jacob et al., "Quantization and Training of Neural Networks for Efficient
    Integer-Arithmetic-Only Inference", CVPR 2018 (symmetric per-channel weights);
    Dettmers et al., "LLM.int8()", NeurIPS 2022 (absmax int8 of transformer weights).

  >>> w = quantize_int8(jnp.array([[1.0, -0.5], [-2.0, 0.25]]), axes=(0,))
  >>> w.values.tolist(), (w.scale * 127).tolist()
  ([[64, -127], [-127, 64]], [[2.0, 0.5]])
  >>> np.round(np.asarray(dequantize(w), np.float64), 3).tolist()
  [[1.008, -0.5], [-2.0, 0.252]]
  """
  w = jnp.asarray(weight).astype(jnp.float32)
  amax = jnp.max(jnp.abs(w), axis=tuple(axes), keepdims=True)
  scale = jnp.where(amax > 0, amax / 127.0, 1.0)
  values = jnp.clip(jnp.round(w / scale), -127, 127).astype(jnp.int8)
  return Int8Weight(values, scale, str(jnp.dtype(weight.dtype)))


def dequantize(weight: Int8Weight) -> jax.Array:
  """``values * scale`` in the weight's dtype (:class:`Int8Weight`)."""
  return (weight.values.astype(jnp.float32) * weight.scale).astype(weight.dtype)


def _is_int8(x) -> bool:
  return isinstance(x, Int8Weight)


def quantize_params(params):
  """``params`` with every ``kernel`` (linear, convolution, projection) and
  ``embedding`` leaf of two or more dimensions as an :class:`Int8Weight`: a kernel per
  output channel (its last axis; the decoder's input-first query/key/value projections
  per ``[heads, head_dim]`` entry), an embedding per row (a token's vector, or a tied
  head's output). Biases, norms and everything else are left as they are.

  >>> q = quantize_params({'dense': {'kernel': jnp.ones((3, 2)), 'bias': jnp.ones(2)}})
  >>> q['dense']['kernel'].values.dtype, q['dense']['kernel'].scale.shape, q['dense']['bias'].dtype
  (dtype('int8'), (1, 2), dtype('float32'))
  """
  def one(path, leaf):
    name = path_str(path)
    last = name.rsplit('/', 1)[-1]
    if jnp.ndim(leaf) < 2 or not jnp.issubdtype(leaf.dtype, jnp.floating):
      return leaf
    if last == 'embedding':
      return quantize_int8(leaf, axes=(leaf.ndim - 1,))
    if last == 'kernel':
      axes = (0,) if _INPUT_FIRST.search(name) else tuple(range(leaf.ndim - 1))
      return quantize_int8(leaf, axes=axes)
    return leaf
  return jax.tree_util.tree_map_with_path(one, params)


def dequantize_params(params):
  """The inverse of :func:`quantize_params` (up to its rounding): every
  :class:`Int8Weight` leaf dequantized, the others as they are."""
  return jax.tree.map(lambda x: dequantize(x) if _is_int8(x) else x, params, is_leaf=_is_int8)


def nbytes(tree) -> int:
  """The bytes of a pytree's arrays (an :class:`Int8Weight` counts its values and scales).

  >>> nbytes({'w': np.zeros((4, 2), np.float32), 'q': quantize_int8(jnp.ones((4, 2)), (0,))})
  48
  """
  return sum(int(np.prod(np.shape(x))) * jnp.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def converted_fingerprint(fingerprint_: str, *, dtype: str | None = None,
                          quantize: str = 'none') -> str:
  """The fingerprint of a teacher :func:`convert` made from one with ``fingerprint_``:
  the same when nothing is converted, else sha256 over it and the conversion.

  >>> converted_fingerprint('ab') == 'ab', converted_fingerprint('ab', quantize='int8') == 'ab'
  (True, False)
  """
  parts = ([f'dtype={dtype}'] if dtype is not None else []) + (
      [f'quantize={quantize}'] if quantize != 'none' else [])
  if not parts:
    return fingerprint_
  return hashlib.sha256(':'.join([fingerprint_, *parts]).encode()).hexdigest()


def convert(teacher: Teacher, *, dtype: str | None = None, quantize: str = 'none') -> Teacher:
  """The teacher with its parameters held another way.

  Args:
    teacher: a loaded teacher.
    dtype: cast its floating parameters to this dtype (``'bfloat16'``); None: as they
      are. The computation dtype is the model's (:func:`load_teacher` builds the model
      in it).
    quantize: ``'int8'``: :func:`quantize_params`, and an ``apply`` that dequantizes
      inside the forward (under ``jit`` the int8 arrays are what is held; each weight
      is dequantized where it is used); ``'none'``: unchanged.

  Returns:
    The teacher, its fingerprint :func:`converted_fingerprint`; the model state
    (batch statistics) is left as it is.

  Raises:
    ValueError: an unknown ``quantize``.
  """
  if quantize not in QUANTIZE:
    raise ValueError(f'quantize must be one of {QUANTIZE}, got {quantize!r}')
  params, state = teacher.variables
  apply = teacher.apply
  if dtype is not None:
    params = jax.tree.map(
        lambda x: x.astype(dtype) if jnp.issubdtype(x.dtype, jnp.floating) else x, params)
  if quantize == 'int8':
    params = jax.jit(quantize_params)(params)
    apply = functools.partial(_dequantized_apply, teacher.apply)
  return teacher._replace(
      apply=apply, variables=(params, state),
      fingerprint=converted_fingerprint(teacher.fingerprint, dtype=dtype, quantize=quantize))


def _dequantized_apply(apply, params, state, x, **kwargs):
  return apply(dequantize_params(params), state, x, **kwargs)


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
