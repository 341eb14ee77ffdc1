"""Hugging Face checkpoints: read and write ``config.json`` + safetensors for every family.

:func:`from_pretrained` reads a checkpoint folder (``config.json`` and
``model.safetensors``, or ``model-0000i-of-0000n.safetensors`` shards listed in
``model.safetensors.index.json``) into an NNX module; :func:`save_pretrained` writes
one that ``transformers.AutoModel*.from_pretrained`` loads. Nothing is downloaded:
the folder must exist locally.

A **family** (:class:`Family`) tells this module how one kind of model maps to
``transformers``: how to build the module from ``config.json``, the ``config.json``
of a module, and each parameter's checkpoint tensor with its layout converters
(:class:`HFTensor`). Families live next to their models and are imported only
when a checkpoint of theirs is read (:data:`FAMILIES`): ``config.json``'s
``model_type`` picks one.

Loading is abstract first: the module is built with ``nnx.eval_shape`` (no
parameter is allocated), then each parameter is read from its file, converted,
checked and placed on its devices one tensor at a time. With a ``mesh`` each goes
straight into its ``NamedSharding`` (from the family's partition rules) through
``jax.make_array_from_callback``, so no host or device holds more than one whole
tensor beyond the sharded model.

bfloat16 (and float8) tensors, which ``safetensors``' numpy reader refuses, are
memory-mapped from the file with the offsets of its header (the safetensors format:
an 8-byte little-endian header length, a JSON header of ``dtype``/``shape``/
``data_offsets``, then the raw little-endian data).

References:
  huggingface/safetensors, ``docs/source/index.mdx`` (the file format);
  huggingface/transformers, ``src/transformers/modeling_utils.py`` (the sharded
  checkpoint index ``{"metadata": {"total_size": ...}, "weight_map": {...}}``).
"""

from __future__ import annotations

import contextlib
import importlib
import json
import math
import os
import re
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from kdjax.errors import UserError

CONFIG = 'config.json'
WEIGHTS = 'model.safetensors'
WEIGHTS_INDEX = 'model.safetensors.index.json'
TOKENIZER = 'tokenizer.json'
_SHARD = re.compile(r'model-\d{5}-of-\d{5}\.safetensors')
# safetensors dtypes numpy cannot read, memory-mapped with these dtypes instead.
_MAPPED_DTYPES = {'BF16': jnp.bfloat16, 'F8_E4M3': jnp.float8_e4m3fn,
                  'F8_E5M2': jnp.float8_e5m2}


class HFTensor(NamedTuple):
  """Where one kdjax parameter lives in a Hugging Face checkpoint.

  Attributes:
    name: the safetensors key (``'model.layers.0.self_attn.q_proj.weight'``).
    to_kdjax: Hugging Face layout -> kdjax parameter layout (numpy in, numpy out).
    to_hf: the inverse.
  """

  name: str
  to_kdjax: Callable[[np.ndarray], np.ndarray]
  to_hf: Callable[[np.ndarray], np.ndarray]


class Family(NamedTuple):
  """How one kind of kdjax module maps to ``transformers`` checkpoints.

  Attributes:
    model_types: the ``config.json`` ``model_type`` values it reads.
    build: ``build(hf_config, dtype, rngs) -> nnx.Module`` (called under
      ``nnx.eval_shape`` when loading).
    hf_config: ``module -> config.json`` dict, with ``architectures`` and
      ``model_type``.
    tensors: ``module -> {parameter path: HFTensor}`` for every ``nnx.Param`` (paths
      as ``kdjax.parallel.path_str`` writes them: ``'layers/0/attn/q/kernel'``).
    partition_rules: regex rules over those paths (``kdjax.parallel.mesh`` style).
    prefixes: base-model prefixes a checkpoint may have or lack (``'transformer.'``
      for GPT-2: a ``GPT2Model`` saves ``'h.0.ln_1.weight'``, a ``GPT2LMHeadModel``
      ``'transformer.h.0.ln_1.weight'``; ``'bert.'`` for a ``BertFor*`` task model):
      a name of :attr:`tensors` missing from the checkpoint is looked up with its
      prefix removed, or with each prefix added.
    ignored: regexes (full match) of checkpoint tensors that are not parameters and
      are skipped when unused (buffers such as ``position_ids``, task heads).
  """

  model_types: tuple[str, ...]
  build: Callable[[dict, Any, Any], nnx.Module]
  hf_config: Callable[[nnx.Module], dict]
  tensors: Callable[[nnx.Module], dict]
  partition_rules: Sequence[tuple[str, Any]]
  prefixes: tuple[str, ...] = ()
  ignored: tuple[str, ...] = ()


# model_type -> 'module:attribute' of its Family, imported on first use.
FAMILIES: dict[str, str] = {
    'gpt2': 'kdjax.models.transformer:HF_FAMILY',
    'llama': 'kdjax.models.transformer:HF_FAMILY',
    'qwen2': 'kdjax.models.transformer:HF_FAMILY',
    'bert': 'kdjax.models.bert:HF_FAMILY',
}


def _load_family(spec: str) -> Family:
  module, attr = spec.split(':')
  return getattr(importlib.import_module(module), attr)


def family(model_type: str) -> Family:
  """The :class:`Family` that reads ``model_type`` checkpoints.

  Raises:
    UserError: for a ``model_type`` no family reads (the message lists those that are).

  >>> family('llama').model_types
  ('gpt2', 'llama', 'qwen2')
  """
  if model_type not in FAMILIES:
    raise UserError(f'model_type {model_type!r} is not supported; kdjax reads '
                    f'{", ".join(sorted(FAMILIES))} checkpoints.')
  try:
    return _load_family(FAMILIES[model_type])
  except ImportError as e:
    raise UserError(f'model_type {model_type!r} needs {FAMILIES[model_type]}, which this '
                    f'installation lacks ({e}); update kdjax.') from None


def _family_of_module(module: nnx.Module) -> Family:
  """The family defined in the Python module of ``module``'s class."""
  home = type(module).__module__
  for spec in dict.fromkeys(FAMILIES.values()):
    if spec.split(':')[0] == home:
      return _load_family(spec)
  raise UserError(f'{type(module).__name__} has no Hugging Face format; save_pretrained '
                  f'writes the models of {", ".join(sorted(FAMILIES))}.')


# ----------------------------------------------------------------------------- sharding


def _key_str(key: Any) -> str:
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def _path_str(path: Sequence[Any]) -> str:
  parts = [_key_str(k) for k in path]
  if parts and parts[-1] == 'value':  # nnx.Variable leaves end in '.value'
    parts.pop()
  return '/'.join(parts)


def partition_spec(path: str, shape: Sequence[int], rules: Sequence[tuple[str, Any]] | None,
                   mesh: Mesh) -> P:
  """The ``PartitionSpec`` the first rule matching ``path`` gives, fitted to ``mesh``.

  Rules are those of ``kdjax.parallel.shardings_from_rules`` (value ``None``, a tuple
  of mesh axes (or tuples of axes) per dimension, or ``'fsdp'`` / ``'fsdp:<axis>'``:
  the largest dimension that divides by the axis size), but this never fails on the
  mesh: axes the mesh lacks are dropped, and a dimension whose size does not divide by
  its axes' total size is replicated.

  Args:
    path: the parameter path (``'layers/0/attn/q/kernel'``).
    shape: its shape.
    rules: ``(regex, value)`` pairs, first full match wins; none: replicated.
    mesh: the mesh.

  Returns:
    A ``PartitionSpec`` valid for ``shape`` on ``mesh``.

  >>> mesh = jax.make_mesh((1,), ('fsdp',))
  >>> partition_spec('w', (6, 4), [('w', ('model', 'fsdp'))], mesh)
  P(None, 'fsdp')
  """
  shape = tuple(shape)
  for regex, value in rules or ():
    if re.fullmatch(regex, path):
      break
  else:
    return P()
  if value is None:
    return P()
  if isinstance(value, str):
    if not value.startswith('fsdp'):
      raise ValueError(f'unknown partition rule {value!r}; use None, a tuple of axis names, '
                       'or "fsdp"')
    axis = value.split(':', 1)[1] if ':' in value else mesh.axis_names[0]
    if axis not in mesh.shape:
      return P()
    size = mesh.shape[axis]
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % size == 0 and shape[dim] >= size:
        return P(*[axis if d == dim else None for d in range(len(shape))])
    return P()
  value = tuple(value)
  if len(value) > len(shape):
    raise ValueError(f'partition rule {value} for {path} has more axes than its shape {shape}')
  spec = []
  for dim, axes in zip(shape, value):
    names = (axes,) if isinstance(axes, str) else tuple(axes or ())
    names = tuple(a for a in names if a in mesh.shape)
    if not names or dim % math.prod(mesh.shape[a] for a in names):
      spec.append(None)
    else:
      spec.append(names[0] if len(names) == 1 else names)
  return P(*spec)


def shardings(tree: Any, rules: Sequence[tuple[str, Any]] | None, mesh: Mesh) -> Any:
  """A pytree of ``NamedSharding`` for ``tree`` (e.g. ``nnx.state(model, nnx.Param)``),
  each from :func:`partition_spec` of the leaf's path and shape.

  >>> mesh = jax.make_mesh((1,), ('data',))
  >>> shardings({'w': jnp.zeros((2, 3))}, [('w', ('fsdp', 'model'))], mesh)['w'].spec
  P(None, None)
  """
  def one(path, leaf):
    return NamedSharding(mesh, partition_spec(_path_str(path), np.shape(leaf), rules, mesh))

  return jax.tree_util.tree_map_with_path(one, tree)


# ----------------------------------------------------------------------------- reading


def load_config(path: str | os.PathLike) -> dict:
  """The parsed ``config.json`` of the checkpoint folder ``path``.

  Raises:
    UserError: the folder or its ``config.json`` is missing or unreadable.
  """
  path = os.fspath(path)
  if not os.path.isdir(path):
    raise UserError(f'checkpoint folder {path} does not exist; pass a local folder with '
                    f'{CONFIG} and {WEIGHTS} (e.g. one written by save_pretrained).')
  file = os.path.join(path, CONFIG)
  if not os.path.isfile(file):
    raise UserError(f'{path} has no {CONFIG}; pass a Hugging Face checkpoint folder (the one '
                    'save_pretrained wrote).')
  try:
    with open(file) as f:
      config = json.load(f)
  except (OSError, ValueError) as e:
    raise UserError(f'cannot read {file} ({type(e).__name__}: {e}); restore the file from '
                    'the checkpoint.') from None
  if not isinstance(config, dict):
    raise UserError(f'{file} is not a JSON object; restore the file from the checkpoint.')
  return config


class _Checkpoint:
  """The tensors of a checkpoint folder: names, shapes and (memory-mapped) reads."""

  def __init__(self, path: str, stack: contextlib.ExitStack):
    from safetensors import safe_open
    single, index = os.path.join(path, WEIGHTS), os.path.join(path, WEIGHTS_INDEX)
    if os.path.isfile(single):
      files = [single]
    elif os.path.isfile(index):
      try:
        with open(index) as f:
          weight_map = json.load(f)['weight_map']
      except (OSError, ValueError, KeyError, TypeError) as e:
        raise UserError(f'cannot read {index} ({type(e).__name__}: {e}); restore it from '
                        'the checkpoint.') from None
      files = [os.path.join(path, f) for f in dict.fromkeys(weight_map.values())]
      for f in files:
        if not os.path.isfile(f):
          raise UserError(f'{index} lists {os.path.basename(f)}, which is not in {path}; '
                          'copy every shard of the checkpoint.')
    else:
      other = [f for f in ('pytorch_model.bin', 'model.pt', 'tf_model.h5', 'flax_model.msgpack')
               if os.path.isfile(os.path.join(path, f))]
      hint = (f' (it has {other[0]}: convert it to safetensors, e.g. load it with '
              'transformers and save_pretrained it)' if other else '')
      raise UserError(f'{path} has no {WEIGHTS} or {WEIGHTS_INDEX}{hint}; pass a folder with '
                      'safetensors weights.')
    self.file_of: dict[str, str] = {}
    self._handles, self._headers = {}, {}
    for f in files:
      try:
        handle = stack.enter_context(safe_open(f, framework='numpy'))
      except Exception as e:  # safetensors raises its own error type for a damaged file
        raise UserError(f'cannot read {f} ({type(e).__name__}: {e}); restore the file from '
                        'the checkpoint.') from None
      self._handles[f] = handle
      for name in handle.keys():
        self.file_of.setdefault(name, f)

  def shape(self, name: str) -> tuple[int, ...]:
    return tuple(self._handles[self.file_of[name]].get_slice(name).get_shape())

  def read(self, name: str) -> np.ndarray:
    file = self.file_of[name]
    handle = self._handles[file]
    kind = handle.get_slice(name).get_dtype()
    if kind not in _MAPPED_DTYPES:
      return handle.get_tensor(name)
    if file not in self._headers:
      with open(file, 'rb') as f:
        size = int.from_bytes(f.read(8), 'little')
        self._headers[file] = (8 + size, json.loads(f.read(size)))
    start, header = self._headers[file]
    entry = header[name]
    begin, _ = entry['data_offsets']
    return np.memmap(file, dtype=np.dtype(_MAPPED_DTYPES[kind]), mode='r',
                     offset=start + begin, shape=tuple(entry['shape']))

  def find(self, name: str, prefixes: Sequence[str]) -> str | None:
    """``name`` or its prefix variant present in the checkpoint (None: absent)."""
    candidates = [name]
    for p in prefixes:
      candidates.append(name[len(p):] if name.startswith(p) else p + name)
    return next((c for c in candidates if c in self.file_of), None)


def _hf_shape(spec: HFTensor, shape: tuple[int, ...], dtype: Any) -> tuple[int, ...] | None:
  """The checkpoint shape ``spec.to_hf`` makes of a parameter shape (None: unknown,
  when the converter cannot be traced)."""
  try:
    return tuple(jax.eval_shape(spec.to_hf, jax.ShapeDtypeStruct(shape, dtype)).shape)
  except Exception:  # a numpy-only converter: fall back to checking after to_kdjax
    return None


def _listing(names: Sequence[str], limit: int = 3) -> str:
  shown = ', '.join(repr(n) for n in names[:limit])
  return shown + (f' (and {len(names) - limit} more)' if len(names) > limit else '')


def from_pretrained(path: str | os.PathLike, *, dtype: Any = jnp.float32,
                    mesh: Mesh | None = None,
                    rules: Sequence[tuple[str, Any]] | None = None) -> nnx.Module:
  """Reads a Hugging Face checkpoint folder into a kdjax module.

  Args:
    path: a local folder with ``config.json`` and ``model.safetensors`` (or shards
      with ``model.safetensors.index.json``).
    dtype: the computation and parameter dtype (tensors are cast to it).
    mesh: place each parameter in its ``NamedSharding`` on this mesh; default: the
      default device.
    rules: partition rules (regex, value) over parameter paths; default: the family's
      ``partition_rules``. Axes the mesh lacks and dimensions that do not divide are
      replicated (:func:`partition_spec`).

  Returns:
    The module (e.g. a :class:`kdjax.models.transformer.Decoder` for ``gpt2``,
    ``llama`` and ``qwen2``), ready for :func:`kdjax.models.functional`.

  Raises:
    UserError: the folder, ``config.json`` or weights are missing; ``model_type`` is
      unsupported; a parameter's tensor is missing from the checkpoint, the checkpoint
      has a tensor the model does not use, or a tensor's shape does not match
      ``config.json``.
  """
  path = os.fspath(path)
  hf_config = load_config(path)
  model_type = hf_config.get('model_type')
  if model_type is None:
    raise UserError(f'{os.path.join(path, CONFIG)} has no model_type; use the config.json '
                    'saved with the weights.')
  fam = family(model_type)
  rules = fam.partition_rules if rules is None else rules

  def build() -> nnx.Module:
    return fam.build(hf_config, dtype, nnx.Rngs(0))

  with contextlib.ExitStack() as stack:
    checkpoint = _Checkpoint(path, stack)
    try:
      module = nnx.eval_shape(build)
    except (ValueError, TypeError) as e:
      raise UserError(f'{os.path.join(path, CONFIG)} describes a model kdjax cannot build '
                      f'({str(e).splitlines()[0]}); fix config.json.') from None
    tensors = fam.tensors(module)
    params = nnx.state(module, nnx.Param)
    flat = [('/'.join(map(str, p)), var) for p, var in nnx.to_flat_state(params)]
    unmapped = [key for key, _ in flat if key not in tensors]
    if unmapped:
      raise ValueError(f'the {model_type} family maps no checkpoint tensor to {unmapped}')

    # Names and shapes first: nothing is read before the checkpoint is known to fit.
    found, missing = {}, []
    for key, var in flat:
      name = checkpoint.find(tensors[key].name, fam.prefixes)
      if name is None:
        missing.append(tensors[key].name)
      found[key] = name
    if missing:
      raise UserError(f'checkpoint {path} lacks tensor {_listing(missing)} that its '
                      f'config.json ({model_type}) needs; use the weights saved with this '
                      'config.json.')
    used = set(found.values())
    unexpected = [n for n in checkpoint.file_of if n not in used
                  and not any(re.fullmatch(r, n) for r in fam.ignored)]
    if unexpected:
      raise UserError(f'checkpoint {path} has tensor {_listing(sorted(unexpected))} that a '
                      f'{model_type} model with this config.json does not use; use the '
                      'config.json saved with the weights.')
    for key, var in flat:
      want = _hf_shape(tensors[key], tuple(var.shape), var.dtype)
      have = checkpoint.shape(found[key])
      if want is not None and want != have:
        raise UserError(f'checkpoint tensor {found[key]!r} has shape {have}, but config.json '
                        f'implies {want}; use the config.json saved with the weights.')

    for key, var in flat:
      hf_array = checkpoint.read(found[key])
      try:
        host = np.asarray(tensors[key].to_kdjax(hf_array))
      except ValueError as e:
        raise UserError(f'checkpoint tensor {found[key]!r} of shape {tuple(hf_array.shape)} '
                        f'does not fit parameter {key} of shape {tuple(var.shape)} ({e}); '
                        'use the config.json saved with the weights.') from None
      if host.shape != tuple(var.shape):
        raise UserError(f'checkpoint tensor {found[key]!r} of shape {tuple(hf_array.shape)} '
                        f'gives {host.shape} for parameter {key}, which config.json makes '
                        f'{tuple(var.shape)}; use the config.json saved with the weights.')
      host = host.astype(var.dtype, copy=False)
      if mesh is None:
        value = jnp.asarray(host)
      else:
        sharding = NamedSharding(mesh, partition_spec(key, host.shape, rules, mesh))
        value = jax.make_array_from_callback(host.shape, sharding, lambda i, h=host: h[i])
      var.set_value(value)
      del hf_array, host
    nnx.update(module, params)

  # Non-parameter state (RNG streams of dropout layers): built for real; XLA drops the
  # parameter initialisers whose results are unused.
  rest = nnx.state(module, nnx.Not(nnx.Param))
  if jax.tree.leaves(rest):
    rest = jax.jit(lambda: nnx.state(build(), nnx.Not(nnx.Param)))()
    if mesh is not None:
      rest = jax.device_put(rest, NamedSharding(mesh, P()))
    nnx.update(module, rest)
  return module


# ----------------------------------------------------------------------------- writing


def _dtype_name(dtype: Any) -> str:
  return {'bfloat16': 'bfloat16', 'float16': 'float16'}.get(np.dtype(dtype).name, 'float32')


def save_pretrained(module: nnx.Module, path: str | os.PathLike, *,
                    max_shard_bytes: int = 5 * 2**30) -> list[str]:
  """Writes ``module`` as a Hugging Face checkpoint folder.

  ``config.json`` is the family's config (with ``architectures``, ``model_type`` and
  the parameters' dtype as ``dtype`` and ``torch_dtype``); the weights go to
  ``model.safetensors``, or, when larger than ``max_shard_bytes``, to
  ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``. A tied
  head is not written (as ``transformers`` does). Earlier weight files of these names
  in the folder are removed first. Parameters are fetched to the host one shard file
  at a time; every parameter must be addressable from this process (a single-host
  run: gather the parameters first in a multi-host one).

  Args:
    module: a module of a family in :data:`FAMILIES` (e.g. a ``Decoder``).
    path: the folder (created if needed).
    max_shard_bytes: the largest weight file (a bigger single tensor gets a file of
      its own).

  Returns:
    The weight files written.

  Raises:
    UserError: a module with no Hugging Face format.
  """
  from safetensors.numpy import save_file
  path = os.fspath(path)
  fam = _family_of_module(module)
  config = dict(fam.hf_config(module))
  tensors = fam.tensors(module)
  flat = [('/'.join(map(str, p)), var)
          for p, var in nnx.to_flat_state(nnx.state(module, nnx.Param))]
  names = [tensors[key].name for key, _ in flat]
  if len(set(names)) != len(names):
    raise ValueError(f'two parameters map to one checkpoint tensor in {sorted(names)}')

  shards: list[list[tuple[str, Any]]] = [[]]
  size = 0
  for key, var in flat:
    nbytes = math.prod(var.shape) * np.dtype(var.dtype).itemsize
    if shards[-1] and size + nbytes > max_shard_bytes:
      shards.append([])
      size = 0
    shards[-1].append((key, var))
    size += nbytes

  os.makedirs(path, exist_ok=True)
  for f in os.listdir(path):
    if f in (WEIGHTS, WEIGHTS_INDEX) or _SHARD.fullmatch(f):
      os.remove(os.path.join(path, f))
  n = len(shards)
  files = [WEIGHTS] if n == 1 else [f'model-{i + 1:05d}-of-{n:05d}.safetensors' for i in range(n)]
  weight_map, total = {}, 0
  for file, shard in zip(files, shards):
    arrays = {}
    for key, var in shard:
      spec = tensors[key]
      arrays[spec.name] = np.ascontiguousarray(spec.to_hf(np.asarray(jax.device_get(var[...]))))
      weight_map[spec.name] = file
      total += arrays[spec.name].nbytes
    save_file(arrays, os.path.join(path, file), metadata={'format': 'pt'})
    del arrays
  if n > 1:
    with open(os.path.join(path, WEIGHTS_INDEX), 'w') as f:
      json.dump({'metadata': {'total_size': total}, 'weight_map': dict(sorted(weight_map.items()))},
                f, indent=2)
  dtype = _dtype_name(flat[0][1].dtype) if flat else 'float32'
  config.setdefault('dtype', dtype)
  config.setdefault('torch_dtype', dtype)
  with open(os.path.join(path, CONFIG), 'w') as f:
    json.dump(config, f, indent=2, sort_keys=True)
    f.write('\n')
  return [os.path.join(path, f) for f in files]


def load_tokenizer(path: str | os.PathLike):
  """The ``tokenizers.Tokenizer`` of a checkpoint folder's ``tokenizer.json``.

  Raises:
    UserError: the folder has no ``tokenizer.json``.
  """
  import tokenizers
  file = os.path.join(os.fspath(path), TOKENIZER)
  if not os.path.isfile(file):
    raise UserError(f'{os.fspath(path)} has no {TOKENIZER}; copy the tokenizer.json of the '
                    'model into the checkpoint folder.')
  try:
    return tokenizers.Tokenizer.from_file(file)
  except Exception as e:  # tokenizers raises a plain Exception for a malformed file
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    raise UserError(f'cannot read {file} ({first}); restore it from the model.') from None
