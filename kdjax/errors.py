"""Errors a user can cause, and a diverged run.

The CLI prints each on one line: a :class:`UserError` exits with code 2, a
:class:`Diverged` run with code 3.
"""

import numbers
import sys


class UserError(Exception):
  """A mistake in the command, config, data or workdir, with what to do about it."""


class Diverged(Exception):
  """A run stopped at a non-finite loss or gradient norm, with what to do about it.

  Attributes:
    step: the first step (or round) whose loss or gradient norm was not finite.
    checkpoint: the last checkpoint saved before it (None: none).
  """

  def __init__(self, message: str, *, step: int, checkpoint: str | None):
    super().__init__(message)
    self.step = step
    self.checkpoint = checkpoint


# What reading a damaged checkpoint raises (orbax, tensorstore, the tree template).
CHECKPOINT_READ_ERRORS = (ValueError, OSError, KeyError, TypeError)


def check_number(value, ok, message: str) -> None:
  """Raises ``UserError(message)`` unless ``value`` is a number (not a bool) with
  ``ok(float(value))`` true.

  >>> check_number(0.5, lambda v: 0 <= v < 1, 'bad')
  >>> check_number(True, lambda v: 0 <= v < 1, 'x must be in [0, 1), got True.')
  Traceback (most recent call last):
  kdjax.errors.UserError: x must be in [0, 1), got True.
  """
  if isinstance(value, bool) or not isinstance(value, numbers.Real) or not ok(float(value)):
    raise UserError(message)


def unreadable_checkpoint(path: str, error: BaseException) -> UserError:
  """The :class:`UserError` for a checkpoint directory ``path`` that cannot be restored.

  >>> str(unreadable_checkpoint('/w/checkpoints/3', ValueError('OUT_OF_RANGE: bad\\nmore')))
  'cannot read the checkpoint /w/checkpoints/3 (ValueError: OUT_OF_RANGE: bad); delete that directory to resume from an earlier checkpoint, or use a new --workdir.'
  """
  lines = str(error).strip().splitlines()
  first = lines[0][:200] if lines else ''
  return UserError(f'cannot read the checkpoint {path} ({type(error).__name__}: {first}); '
                   'delete that directory to resume from an earlier checkpoint, or use a new '
                   '--workdir.')


def quiet_orphaned_reads() -> None:
  """Drops the noise of a failed orbax restore: its other reads still in flight finish
  after orbax closed their asyncio loop, and each would print an "Event loop is closed"
  traceback (through ``sys.unraisablehook``, with no object, so with no "Exception
  ignored" line) under the one-line error. Call it before the restore: some report
  before the restore's error reaches the caller. Other unraisable exceptions reach the
  previous hook. Calling this again installs nothing more."""
  if getattr(sys.unraisablehook, 'kdjax_quiet', False):
    return
  previous = sys.unraisablehook

  def hook(unraisable):
    exc = unraisable.exc_value
    if not (isinstance(exc, RuntimeError) and str(exc) == 'Event loop is closed'):
      previous(unraisable)

  hook.kdjax_quiet = True
  sys.unraisablehook = hook
