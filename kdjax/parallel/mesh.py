"""Meshes from configs and parameter shardings from regex rules.

``config.mesh = [('data', -1)]`` makes a 1-axis mesh over every device; ``-1``
takes the devices the other axes leave. Parameters are placed by rules::

    partition_rules = [
        ('.*kernel', 'fsdp'),        # shard the largest divisible axis over 'data'
        ('.*embedding', ('data', None)),
        ('.*', None),                # replicate the rest
    ]

The first rule whose regex matches (``re.fullmatch``) the parameter's path
(``'stage1/conv/kernel'``) wins. A rule's value is ``None`` (replicated), a
tuple (a ``PartitionSpec``) or ``'fsdp'`` / ``'fsdp:<axis>'``. In a tuple, axes the
mesh does not have are dropped and a dimension the axes' size does not divide is
replicated, so the same rules (``kdjax.models.transformer.PARTITION_RULES``: FSDP over
``'fsdp'``, tensor parallelism over ``'model'``) fit any mesh.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P


def make_mesh(axes: Sequence[tuple[str, int]], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """A mesh with the named axes; one size may be -1 (all remaining devices).

  >>> make_mesh([('data', -1)]).axis_names
  ('data',)
  """
  devices = list(jax.devices() if devices is None else devices)
  names = tuple(str(name) for name, _ in axes)
  sizes = [int(size) for _, size in axes]
  if sizes.count(-1) > 1:
    raise ValueError(f'mesh {list(axes)}: at most one axis may have size -1')
  known = math.prod(s for s in sizes if s != -1)
  if -1 in sizes:
    if len(devices) % known:
      raise ValueError(f'mesh {list(axes)}: {len(devices)} devices do not divide by {known}')
    sizes[sizes.index(-1)] = len(devices) // known
  if math.prod(sizes) != len(devices):
    raise ValueError(f'mesh {list(axes)} needs {math.prod(sizes)} devices; there are {len(devices)}')
  # Auto axes: shardings are given to jit (in/out shardings, constraints) and GSPMD
  # propagates them.
  axis_types = (jax.sharding.AxisType.Auto,) * len(names)
  if len(devices) == len(jax.devices()):
    return jax.make_mesh(tuple(sizes), names, axis_types=axis_types, devices=devices)
  return Mesh(np.asarray(devices).reshape(sizes), names, axis_types=axis_types)


def path_str(path) -> str:
  parts = []
  for key in path:
    for attr in ('key', 'name', 'idx'):
      if hasattr(key, attr):
        parts.append(str(getattr(key, attr)))
        break
    else:
      parts.append(str(key))
  if parts and parts[-1] == 'value':  # nnx.Variable leaves end in '.value'
    parts.pop()
  return '/'.join(parts)


def _spec_for(leaf, rule: Any, mesh: Mesh) -> P:
  shape = getattr(leaf, 'shape', ())
  if rule is None:
    return P()
  if isinstance(rule, str):
    if not rule.startswith('fsdp'):
      raise ValueError(f'unknown partition rule {rule!r}; use None, a tuple of axis names, or "fsdp"')
    axis = rule.split(':', 1)[1] if ':' in rule else mesh.axis_names[0]
    size = mesh.shape[axis]
    # Shard the largest axis that divides evenly; replicate if none does.
    for dim in sorted(range(len(shape)), key=lambda d: -shape[d]):
      if shape[dim] % size == 0 and shape[dim] >= size:
        spec = [None] * len(shape)
        spec[dim] = axis
        return P(*spec)
    return P()
  spec = tuple(rule)
  if len(spec) > len(shape):
    raise ValueError(f'partition rule {rule} has more axes than the parameter shape {shape}')
  return P(*(_fitting(axes, dim, mesh) for axes, dim in zip(spec, shape)))


def _fitting(axes, dim: int, mesh: Mesh):
  """The mesh axes of one dimension's rule that apply here: axes the mesh lacks are
  dropped, and a dimension their size does not divide is replicated, so one rule set
  serves every mesh (a data-only mesh, an odd vocabulary)."""
  if axes is None:
    return None
  names = tuple(a for a in ((axes,) if isinstance(axes, str) else axes) if a in mesh.shape)
  size = math.prod(mesh.shape[a] for a in names)
  if not names or dim % size:
    return None
  return names[0] if len(names) == 1 else names


def shardings_from_rules(tree, rules: Sequence[tuple[str, Any]] | None, mesh: Mesh):
  """A pytree of ``NamedSharding`` matching ``tree``, from the first matching rule."""
  compiled = [(re.compile(regex), value) for regex, value in (rules or ())]

  def one(path, leaf):
    name = path_str(path)
    for regex, value in compiled:
      if regex.fullmatch(name):
        return NamedSharding(mesh, _spec_for(leaf, value, mesh))
    return NamedSharding(mesh, P())

  return jax.tree_util.tree_map_with_path(one, tree)


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_axes(mesh: Mesh) -> tuple[str, ...]:
  """The mesh axes a batch is split over: the first (data) axis, and ``'fsdp'`` when the
  mesh has one, since fully sharded data parallelism gives every shard its own examples
  (a ``'model'`` axis, tensor parallelism, sees the same examples on all its devices).

  >>> batch_axes(make_mesh([('data', 1), ('fsdp', 1), ('model', 1)], jax.devices()[:1]))
  ('data', 'fsdp')
  """
  axes = [mesh.axis_names[0]]
  if 'fsdp' in mesh.axis_names and axes[0] != 'fsdp':
    axes.append('fsdp')
  return tuple(axes)


def batch_shards(mesh: Mesh) -> int:
  """How many ways a batch is split (:func:`batch_axes`): a global batch size must be a
  multiple of it."""
  return math.prod(mesh.shape[a] for a in batch_axes(mesh))


def batch_spec(mesh: Mesh, *, leading: int = 0) -> P:
  """The ``PartitionSpec`` of a batch over :func:`batch_axes`, after ``leading``
  unsharded axes (a chunk of steps ``[steps, batch, ...]`` has one)."""
  return P(*([None] * leading), batch_axes(mesh))


def batch_sharding(mesh: Mesh, *, leading: int = 0) -> NamedSharding:
  """The sharding of a batch: its batch axis over :func:`batch_axes`."""
  return NamedSharding(mesh, batch_spec(mesh, leading=leading))
