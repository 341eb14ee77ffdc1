"""A run's directory: its files, its config and its orbax checkpoints.

Every command that writes a run (``train``, ``distill``, ``fed run``, a sweep's cells)
writes the same layout::

    WORKDIR/config.json          the run's config (refused if it holds another run's)
    WORKDIR/checkpoints/<step>/  orbax: items ``state`` (a pytree) and ``data`` (JSON)
    WORKDIR/metrics.jsonl        one JSON object per line (kdjax.engine.metrics)
    WORKDIR/summary.json         the run's figures

A workdir may be a local path or a bucket URL (``gs://bucket/run``): every file goes
through :mod:`kdjax.storage`, and orbax writes the checkpoints there itself
(``docs/object_storage.md``).

JSON written here is valid for every reader: a non-finite float is written as
``null``, and the object gets ``"nonfinite": [the keys that were]`` (:func:`json_ready`).
"""

from __future__ import annotations

import copy
import json
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from kdjax import storage
from kdjax.config import config_to_dict
from kdjax.errors import CHECKPOINT_READ_ERRORS
from kdjax.errors import UserError
from kdjax.errors import quiet_orphaned_reads
from kdjax.errors import unreadable_checkpoint

CONFIG = 'config.json'
CHECKPOINTS = 'checkpoints'
METRICS = 'metrics.jsonl'
SUMMARY = 'summary.json'


def checkpoint_dir(workdir: str) -> str:
  return storage.join(storage.abspath(workdir), CHECKPOINTS)


def create(workdir: str) -> str:
  """Creates ``workdir`` (and its parents); a path that cannot be one is a :class:`UserError`."""
  workdir = storage.abspath(workdir)
  try:
    storage.makedirs(workdir)
  except OSError as e:
    raise UserError(f'cannot create the workdir {workdir} ({e.strerror or e}); pick another '
                    '--workdir') from None
  return workdir


def check_creatable(workdir: str) -> None:
  """Refuses a workdir that could not be created, without creating anything.

  >>> check_creatable('/dev/null/run')
  Traceback (most recent call last):
  kdjax.errors.UserError: cannot create the workdir /dev/null/run (/dev/null is not a directory); pick another --workdir

  A URL's bucket must exist (an object store creates the rest on write).
  """
  if storage.is_remote(workdir):
    if not storage.bucket_exists(workdir):
      raise UserError(f'cannot create the workdir {workdir} (its bucket does not exist or '
                      'cannot be reached); create the bucket or pick another --workdir')
    return
  path = os.path.abspath(workdir)
  while not os.path.exists(path):
    parent = storage.dirname(path)
    if parent == path:
      return
    path = parent
  if not os.path.isdir(path):
    raise UserError(f'cannot create the workdir {os.path.abspath(workdir)} ({path} is not a '
                    'directory); pick another --workdir')
  if not os.access(path, os.W_OK):
    raise UserError(f'cannot create the workdir {os.path.abspath(workdir)} ({path} is not '
                    'writable); pick another --workdir')


def resolve(workdir: str) -> str:
  """The absolute ``workdir`` (a URL unchanged), after :func:`check_creatable`: what a
  run calls first, so that a workdir it cannot write is refused before anything is.

  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> resolve(f'{d}/a/../run') == f'{d}/run'
  True
  """
  check_creatable(workdir)
  return storage.abspath(workdir)


# --------------------------------------------------------------------------- JSON

def json_ready(obj: Any) -> Any:
  """``obj`` with every non-finite float as ``None``; a dict that had any also gets
  ``nonfinite``: the sorted keys whose values were NaN or infinite.

  Python's ``json`` would write ``NaN`` and ``Infinity``, which strict readers refuse.

  >>> json_ready({'a': float('nan'), 'b': [1.5, float('inf')], 'c': 'x', 'd': 2})
  {'a': None, 'b': [1.5, None], 'c': 'x', 'd': 2, 'nonfinite': ['a']}
  """
  if isinstance(obj, dict):
    out, bad = {}, []
    for k, v in obj.items():
      if _is_nonfinite(v):
        bad.append(str(k))
        out[k] = None
      else:
        out[k] = json_ready(v)
    if bad:
      out['nonfinite'] = sorted(set(bad) | set(out.get('nonfinite') or ()))
    return out
  if isinstance(obj, (list, tuple)):
    return [None if _is_nonfinite(v) else json_ready(v) for v in obj]
  if isinstance(obj, np.generic):
    return json_ready(obj.item())
  return obj


def _is_nonfinite(v) -> bool:
  return isinstance(v, (float, np.floating)) and not math.isfinite(float(v))


def dumps(obj: Any, **kwargs) -> str:
  """Strict JSON text of ``obj`` (see :func:`json_ready`)."""
  return json.dumps(json_ready(obj), allow_nan=False, default=_default, **kwargs)


def _default(o):
  if isinstance(o, (np.integer, np.floating, np.bool_)):
    return o.item()
  if isinstance(o, np.ndarray):
    return o.tolist()
  raise TypeError(f'{type(o).__name__} is not JSON serializable')


def write_json(path: str, obj: Any) -> None:
  """Writes ``obj`` as strict JSON, atomically (a reader never sees half a file)."""
  storage.write_text(path, dumps(obj, indent=2) + '\n')


def read_json(path: str, *, what: str = 'file') -> Any:
  """The JSON in ``path``; damaged or not JSON is a :class:`UserError` naming the file."""
  try:
    return json.loads(storage.read_text(path))
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise UserError(f'{path} is not valid JSON ({e}); restore the {what} or use a new '
                    '--workdir') from None


# --------------------------------------------------------------------------- config.json

def _get(tree: dict, dotted: str):
  node = tree
  for part in dotted.split('.'):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def _flat(tree, prefix: str = '') -> dict[str, Any]:
  if not isinstance(tree, dict):
    return {prefix: tree}
  out = {}
  for k, v in tree.items():
    out.update(_flat(v, f'{prefix}.{k}' if prefix else str(k)))
  return out


def read_config(workdir: str) -> dict:
  """``WORKDIR/config.json`` as a dict (:class:`UserError` if missing or damaged)."""
  path = storage.join(workdir, CONFIG)
  if not storage.exists(path):
    raise UserError(f'{workdir} has no {CONFIG}: is it a kdjax workdir? Train one with '
                    '`kdjax train --config ... --workdir DIR`')
  raw = read_json(path, what='config')
  if not isinstance(raw, dict):
    raise UserError(f'{path} does not hold a config (a JSON object); use a new --workdir')
  return raw


def config_differences(old: dict, new: dict, *, identity: Sequence[str] | None = None,
                       ignore: Sequence[str] = (), defaults: dict | None = None) -> list[str]:
  """The fields where two configs differ, as ``'key: old here, new now'``.

  ``identity``: compare only these (dotted) fields; else every field but the top-level
  ``ignore`` ones. ``defaults``: a field the old config lacks (written before the field
  existed) reads as its default here.

  >>> config_differences({'a': 1, 'b': {'c': 2}}, {'a': 1, 'b': {'c': 3}})
  ['b.c: 2 here, 3 now']
  >>> config_differences({'a': 1, 'n': 5}, {'a': 1, 'n': 9}, ignore=('n',))
  []
  >>> config_differences({'m': {'x': 1, 'y': 2}, 'n': 5}, {'m': {'x': 1, 'y': 3}, 'n': 9},
  ...                    identity=('m',))
  ['m.y: 2 here, 3 now']
  >>> config_differences({'a': 1}, {'a': 1, 'new': ''}, defaults={'new': ''})
  []
  >>> config_differences({'t': {'x': 1}}, {'t': {'x': 1, 'y': 0}, 'l': {'kd': 1}},
  ...                    defaults={'t': {'y': 0}, 'l': {'ce': 1}})
  ['l.kd: None here, 1 now']
  """
  a, b = _flat(old), _flat(new)
  if defaults:
    # Only a field added to a group the old config has (not the entries of a free-form
    # group such as loss.terms, which a config may replace whole).
    groups = {k.rsplit('.', 1)[0] for k in a if '.' in k} | {''}
    a = {**{k: v for k, v in _flat(defaults).items()
            if k not in a and (k.rsplit('.', 1)[0] if '.' in k else '') in groups}, **a}
  if identity is not None:
    compared = lambda k: any(k == f or k.startswith(f + '.') for f in identity)
  else:
    compared = lambda k: k.split('.')[0] not in ignore
  keys = [k for k in sorted(set(a) | set(b)) if compared(k) and a.get(k) != b.get(k)]
  return [f'{k}: {a.get(k)!r} here, {b.get(k)!r} now' for k in keys]


def prepare(workdir: str, config: ml_collections.ConfigDict, *, has_results: bool,
            identity: Sequence[str] | None = None, ignore: Sequence[str] = (),
            defaults: ml_collections.ConfigDict | None = None) -> str:
  """Creates ``workdir`` and writes its ``config.json``, or refuses a workdir of another run.

  Args:
    workdir: the run's directory.
    config: this run's config.
    has_results: the workdir holds results this run would continue or reuse
      (checkpoints, a sweep's finished cell).
    identity: the fields that give those results their meaning (the others may change
      on a resume); default every field but ``ignore``.
    ignore: top-level fields that may change on a resume.
    defaults: the config's defaults: a field an older ``config.json`` lacks reads as its
      default (a run written before a field existed resumes).

  Returns:
    The absolute workdir.

  Raises:
    UserError: the workdir cannot be created; or it has results and its
      ``config.json`` is missing, damaged, or differs in a compared field.

  >>> import tempfile
  >>> d = tempfile.mkdtemp()
  >>> _ = prepare(d, ml_collections.ConfigDict({'seed': 0, 'num_rounds': 5}), has_results=False)
  >>> _ = prepare(d, ml_collections.ConfigDict({'seed': 0, 'num_rounds': 9}), has_results=True,
  ...             ignore=('num_rounds',))
  >>> prepare(d, ml_collections.ConfigDict({'seed': 1, 'num_rounds': 9}), has_results=True)
  Traceback (most recent call last):
  kdjax.errors.UserError: ... holds results of another config (it differs in seed: 0 here, 1 now); use a new --workdir, or delete that one to start over
  """
  check_creatable(workdir)
  path = storage.join(storage.abspath(workdir), CONFIG)
  new = config_to_dict(config)
  if has_results:
    if not storage.exists(path):
      raise UserError(f'{workdir} holds results but no {CONFIG}; use a new --workdir, or '
                      'delete that one to start over')
    old = read_config(workdir)
    diff = config_differences(old, new, identity=identity, ignore=ignore,
                              defaults=config_to_dict(defaults) if defaults is not None else None)
    if diff:
      more = f' and {len(diff) - 3} more' if len(diff) > 3 else ''
      raise UserError(f'{workdir} holds results of another config (it differs in '
                      f'{"; ".join(diff[:3])}{more}); use a new --workdir, or delete that one '
                      'to start over')
  elif storage.exists(path):
    read_config(workdir)   # a damaged config.json is refused, not silently replaced
  workdir = create(workdir)
  if jax.process_index() == 0:
    write_json(path, new)
  return workdir


# --------------------------------------------------------------------------- checkpoints

def all_steps(workdir: str) -> list[int]:
  """The finished checkpoint steps under ``WORKDIR/checkpoints``, ascending."""
  path = checkpoint_dir(workdir)
  if not storage.isdir(path):
    return []
  return sorted(int(name) for name in storage.listdir(path) if name.isdigit()
                and ocp.path.step.is_checkpoint_finalized(storage.as_path(
                    storage.join(path, name))))


def latest_step(workdir: str) -> int | None:
  """The newest finished checkpoint step under ``WORKDIR/checkpoints`` (None: none)."""
  steps = all_steps(workdir)
  return steps[-1] if steps else None


def has_checkpoints(workdir: str) -> bool:
  return latest_step(workdir) is not None


def checkpoint_manager(workdir: str, *, keep: int, async_save: bool = True
                       ) -> ocp.CheckpointManager:
  """The run's orbax manager: items ``state`` and ``data``, async, the newest ``keep`` kept."""
  options = ocp.CheckpointManagerOptions(max_to_keep=int(keep),
                                         enable_async_checkpointing=async_save, create=True)
  return ocp.CheckpointManager(storage.as_path(checkpoint_dir(workdir)), options=options,
                               item_names=('state', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state, data: dict) -> bool:
  """Saves ``state`` (a pytree; typed PRNG keys as their key data) and ``data`` (JSON).

  ``data`` is copied first: an async manager writes it in the background, after the
  caller may have changed it (a loop's log window goes on summing the next steps).
  """
  data = copy.deepcopy(data)
  return manager.save(int(step), args=ocp.args.Composite(
      state=ocp.args.StandardSave(to_saveable(state)), data=ocp.args.JsonSave(data)),
                      force=True)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
  """The ``(state, data)`` saved at ``step``, placed as ``abstract_state``'s shardings.

  ``abstract_state`` is the state's pytree (arrays or ``jax.ShapeDtypeStruct`` with
  shardings). A damaged checkpoint, or one of another structure, is a
  :class:`UserError` that names it.
  """
  quiet_orphaned_reads()  # before: a failed restore's other reads may report at once
  target = to_saveable(jax.tree.map(_abstract, abstract_state))
  try:
    restored = manager.restore(int(step), args=ocp.args.Composite(
        state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()))
  except CHECKPOINT_READ_ERRORS as e:
    raise unreadable_checkpoint(storage.join(str(manager.directory), str(step)), e) from None
  return from_saveable(abstract_state, restored['state']), restored['data']


def _abstract(a):
  if isinstance(a, jax.ShapeDtypeStruct):
    return a
  return jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=getattr(a, 'sharding', None))


def _is_key(a) -> bool:
  return jnp.issubdtype(a.dtype, jax.dtypes.prng_key)


def to_saveable(tree):
  """``tree`` with typed PRNG keys as their ``uint32`` key data (what orbax stores)."""
  def one(a):
    if not _is_key(a):
      return a
    if isinstance(a, jax.ShapeDtypeStruct):
      data = jax.eval_shape(jax.random.key_data, a)
      return jax.ShapeDtypeStruct(data.shape, data.dtype, sharding=a.sharding)
    return jax.random.key_data(a)
  return jax.tree.map(one, tree)


def from_saveable(template, tree):
  """Inverse of :func:`to_saveable`, with ``template``'s key implementations."""
  return jax.tree.map(
      lambda t, a: jax.random.wrap_key_data(a, impl=jax.random.key_impl(t)) if _is_key(t) else a,
      template, tree)


def restore_subtree(workdir: str, step: int, subtree: Sequence[str], *, shardings=None):
  """One subtree of a checkpoint's ``state`` (``('params', 'student')``, say), on its own.

  Reads only that subtree's arrays, whatever the process and device layout that wrote
  the checkpoint: as host numpy arrays (``shardings=None``) or placed with
  ``shardings``, a list with one sharding per leaf in ``jax.tree.leaves`` order.

  Returns:
    The subtree as nested dicts of arrays.

  Raises:
    UserError: a damaged checkpoint, or one without that subtree.
  """
  path = storage.join(checkpoint_dir(workdir), str(step), 'state')
  quiet_orphaned_reads()
  handler = ocp.PyTreeCheckpointHandler()
  try:
    full = handler.metadata(storage.as_path(path)).tree
    node = full
    for key in subtree:
      if not isinstance(node, Mapping) or key not in node:
        raise UserError(f'the checkpoint {storage.dirname(path)} has no {"/".join(subtree)}; '
                        'was it written by kdjax train?')
      node = node[key]
    leaves, treedef = jax.tree.flatten(node)
    if shardings is None:
      args = [ocp.RestoreArgs(restore_type=np.ndarray) for _ in leaves]
    else:
      if len(shardings) != len(leaves):
        raise UserError(f'the checkpoint {storage.dirname(path)} does not match its config.json '
                        f'model ({len(leaves)} arrays stored, {len(shardings)} expected)')
      args = [ocp.ArrayRestoreArgs(sharding=s, global_shape=m.shape, dtype=m.dtype)
              for s, m in zip(shardings, leaves)]
    restore_args = jax.tree.unflatten(treedef, args)
    for key in reversed(subtree):
      restore_args = {key: restore_args}
    item = jax.tree.map(lambda _: 0, restore_args,
                        is_leaf=lambda x: isinstance(x, ocp.RestoreArgs))
    restored = handler.restore(storage.as_path(path), args=ocp.args.PyTreeRestore(
        item=item, restore_args=restore_args, partial_restore=True))
  except CHECKPOINT_READ_ERRORS as e:
    raise unreadable_checkpoint(storage.dirname(path), e) from None
  finally:
    handler.close()
  for key in subtree:
    restored = restored[key]
  return restored
