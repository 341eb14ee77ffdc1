"""Saving grain iterator state in an orbax ``CheckpointManager``.

grain 0.2.18 ships ``grain.checkpoint.CheckpointHandler`` and registers the
argument classes ``grain.checkpoint.CheckpointSave`` / ``CheckpointRestore``
with orbax, so an iterator is one more item of an ``ocp.args.Composite``::

  mngr.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state),
      data=iterator_save_args(train_iter)))
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(abstract_state),
      data=iterator_restore_args(train_iter)))

Each process writes its own ``process_I-of-N.json`` (grain's handler uses
``jax.process_index()``), so every process restores its own position.
"""

from __future__ import annotations

from typing import Any


def iterator_save_args(iterator: Any) -> Any:
  """Orbax save args for a grain iterator (``grain.checkpoint.CheckpointSave``)."""
  from grain import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.CheckpointSave(iterator)


def iterator_restore_args(iterator: Any) -> Any:
  """Orbax restore args; restoring sets ``iterator``'s state in place."""
  from grain import checkpoint  # pylint: disable=g-import-not-at-top
  return checkpoint.CheckpointRestore(iterator)
