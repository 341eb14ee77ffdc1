"""``train_and_evaluate(config, workdir)``: the run behind ``kdjax train`` and ``kdjax distill``.

Setup (:func:`kdjax.engine.setup`), the workdir (its ``config.json`` and orbax
checkpoints, :mod:`kdjax.workdir`), the loop (:func:`kdjax.engine.train_loop`), then
``summary.json`` and a learning-curve PNG. A rerun of the same command resumes from
the last checkpoint to the same result as an uninterrupted run.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import ml_collections

from kdjax import cache as cache_lib
from kdjax import storage
from kdjax import workdir as workdir_lib
from kdjax.engine import metrics as metrics_lib
from kdjax.engine.config import IDENTITY_FIELDS
from kdjax.engine.config import base_config
from kdjax.engine.loop import fit_workdir
from kdjax.engine.loop import write_summary
from kdjax.engine.setup import setup
from kdjax.engine.state import warm_start
from kdjax.errors import UserError


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       require_teacher: bool = False) -> dict[str, Any]:
  """Trains (and distills, when the loss reads a teacher) and returns the summary.

  Raises:
    UserError: a bad config, data set, teacher, cache or workdir (nothing written).
    Diverged: a non-finite loss or gradient norm (``summary.json`` says where).
  """
  workdir = storage.abspath(workdir)   # a gs:// URL stays one
  workdir_lib.check_creatable(workdir)
  cache = cache_lib.open_for_run(config) if config.teacher.cache else None
  run = setup(config, cache=cache, log=_log)
  if require_teacher and not run.distills:
    raise UserError('`kdjax distill` needs a loss that uses the teacher (e.g. kd); '
                    'use `kdjax train` for training from labels')

  def warm():   # checked before anything is written
    state = warm_start(run.init(), config.init.workdir, int(config.init.step))
    _log(f'student initialized from {config.init.workdir}')
    return state

  fitted, start = fit_workdir(run, config, workdir, identity=IDENTITY_FIELDS,
                              defaults=base_config(),
                              fresh=warm if config.init.workdir else None, log=_log)
  teacher = run.teacher
  summary = {
      **fitted.summary(resumed_from=start, feed=run.feed_kind),
      'teacher_devices': int(config.teacher.devices),
      'teacher_step': teacher.step if teacher else None,
      'teacher_fingerprint': teacher.fingerprint if teacher else None,
  }
  if len(run.spec.input_shape) == 1 and run.spec.input_dtype.startswith('int'):
    # Token data: the losses are per-token cross-entropies (nats).
    tokens = run.spec.input_shape[0]
    summary['eval_perplexity'] = _exp(summary['eval_loss'])
    summary['eval_bits_per_token'] = _bits(summary['eval_loss'])
    summary['tokens_per_sec'] = (summary['examples_per_sec'] * tokens
                                 if summary['examples_per_sec'] else None)
  write_summary(workdir, summary)
  if jax.process_index() == 0:
    metrics_lib.plot_learning_curves(workdir)
  return summary


def _exp(loss):
  return None if loss is None else float(math.exp(min(loss, 700.0)))


def _bits(loss):
  return None if loss is None else float(loss / math.log(2.0))

