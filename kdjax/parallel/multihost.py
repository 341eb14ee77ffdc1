"""Arrays across processes: devices set apart in every process, arrays moved between meshes.

In a multi-controller run (``jax.distributed``, one process per host) each process
addresses only its own devices; ``jax.device_put`` cannot move an array between two
meshes whose devices span processes, nor place a PRNG key array on devices of other
processes. The helpers here do both the multi-controller way: every process hands over
what it holds (:func:`jax.make_array_from_callback` asks each process only for the
pieces its own devices keep), and in one process they are plain ``jax.device_put``.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.errors import UserError


def split_devices(devices: Sequence[jax.Device], k: int, *, what: str = 'config.teacher.devices'
                  ) -> tuple[list[jax.Device], list[jax.Device]]:
  """``(rest, apart)``: ``k`` devices set apart, the last ``k / P`` of each of the ``P``
  processes, so every process holds its share of both groups (one process: the last
  ``k`` devices).

  Args:
    devices: all the devices, in ``jax.devices()`` order.
    k: how many to set apart; a multiple of the process count.
    what: the setting named in the error.

  Returns:
    The devices left and the devices set apart, each in ``devices`` order.

  Raises:
    UserError: ``k`` is not a multiple of the process count, or leaves a process no
      device of the rest.

  >>> rest, apart = split_devices(jax.devices(), 0)
  >>> len(rest) == jax.device_count(), apart
  (True, [])
  """
  processes = sorted({d.process_index for d in devices})
  if k % len(processes):
    raise UserError(f'{what}={k} must be a multiple of the {len(processes)} processes (each '
                    'process gives the same number of its devices); pick a multiple')
  share = k // len(processes)
  apart = set()
  for p in processes:
    local = [d for d in devices if d.process_index == p]
    if share >= len(local):
      raise UserError(f'{what}={k} leaves process {p} no device of its {len(local)} for the '
                      f'student; set it below {len(local) * len(processes)}')
    apart.update(d.id for d in local[len(local) - share:])
  return ([d for d in devices if d.id not in apart], [d for d in devices if d.id in apart])


def _local_block(a: jax.Array, axis: int) -> tuple[int, int, np.ndarray] | None:
  """``(lo, hi, rows)``: the rows ``lo:hi`` along ``axis`` that this process's shards of
  ``a`` cover whole (every other axis complete), as numpy; None when they do not."""
  shards = a.addressable_shards
  spans = [s.index[axis].indices(a.shape[axis])[:2] for s in shards]
  lo, hi = min(s for s, _ in spans), max(e for _, e in spans)
  block = np.empty((*a.shape[:axis], hi - lo, *a.shape[axis + 1:]), a.dtype)
  filled = np.zeros(block.shape, bool)
  for shard in shards:
    index = list(shard.index)
    start, stop, _ = index[axis].indices(a.shape[axis])
    index[axis] = slice(start - lo, stop - lo)
    block[tuple(index)] = np.asarray(shard.data)
    filled[tuple(index)] = True
  return (lo, hi, block) if filled.all() else None


def _put_one(a, sharding: NamedSharding, axis: int) -> jax.Array:
  shape = tuple(a.shape)
  local = _local_block(a, axis)
  needed = [idx[axis].indices(shape[axis])[:2]
            for idx in sharding.addressable_devices_indices_map(shape).values()]
  if local is not None and all(local[0] <= s and e <= local[1] for s, e in needed):
    lo, _, block = local
  else:   # this process does not hold the rows it must place: gather them all
    lo, block = 0, np.asarray(multihost_utils.process_allgather(a, tiled=True))

  def piece(index):
    index = list(index)
    start, stop, _ = index[axis].indices(shape[axis])
    index[axis] = slice(start - lo, stop - lo)
    return block[tuple(index)]

  return jax.make_array_from_callback(shape, sharding, piece)


def put_rows(tree, sharding: NamedSharding, *, axis: int = 0):
  """``tree``'s arrays (global arrays on any mesh) with the same values in ``sharding``.

  One process: ``jax.device_put``. Several: each process reads the rows along ``axis``
  that its own shards hold and places those its devices keep in ``sharding``; when
  the two layouts give a process different rows (they do not for a teacher's entries
  moved to the student, both split over process-major meshes, :func:`split_devices`),
  the rows are first gathered to every process (``process_allgather``).

  Args:
    tree: a pytree of ``jax.Array``.
    sharding: where the arrays go.
    axis: the axis both layouts split (the batch; the others whole in each process).

  Returns:
    The tree in ``sharding``.

  >>> mesh = jax.make_mesh((1,), ('data',))
  >>> put_rows({'a': jnp.arange(4)}, NamedSharding(mesh, P('data')))['a'].tolist()
  [0, 1, 2, 3]
  """
  if jax.process_count() == 1:
    return jax.device_put(tree, sharding)
  return jax.tree.map(lambda a: _put_one(a, sharding, axis), tree)


def replicate_global(tree, mesh: jax.sharding.Mesh):
  """``tree`` (host arrays, or arrays on this process's devices, every process the same)
  copied onto every device of ``mesh``, whichever processes those are in. PRNG key
  arrays go as their key data and are wrapped again (``jax.device_put`` cannot place
  a key on another process's devices).

  >>> out = replicate_global({'k': jax.random.key(1), 'w': np.ones(2)}, jax.make_mesh((1,), ('c',)))
  >>> out['k'].dtype == jax.random.key(1).dtype, out['w'].sharding.is_fully_replicated
  (True, True)
  """
  sharding = NamedSharding(mesh, P())

  def one(a):
    if isinstance(a, jax.Array) and jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      impl = jax.random.key_impl(a)
      return jax.random.wrap_key_data(jax.device_put(jax.random.key_data(a), sharding),
                                      impl=impl)
    return jax.device_put(a, sharding)

  return jax.tree.map(one, tree)
