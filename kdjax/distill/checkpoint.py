"""Checkpoints: one orbax ``CheckpointManager`` under ``WORKDIR/checkpoints/<step>``.

Items: ``state`` (the whole :class:`TrainState`, global arrays) and ``data`` (the
input pipeline position, JSON). Saves are async and keep the latest N. The run's
config is written to ``WORKDIR/config.json``; a workdir whose saved config differs in
the fields that give a checkpoint its meaning is refused rather than overwritten.
"""

from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp

from kdjax.distill.defaults import IDENTITY_FIELDS
from kdjax.errors import CHECKPOINT_READ_ERRORS
from kdjax.errors import UserError
from kdjax.errors import quiet_orphaned_reads
from kdjax.errors import unreadable_checkpoint


def checkpoint_dir(workdir: str) -> str:
  return os.path.join(os.path.abspath(workdir), 'checkpoints')


def make_manager(workdir: str, *, keep: int, async_save: bool = True) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=keep,
      enable_async_checkpointing=async_save,
      create=True,
  )
  return ocp.CheckpointManager(checkpoint_dir(workdir), options=options,
                               item_names=('state', 'data'))


def save(manager: ocp.CheckpointManager, step: int, state, data_state: dict, *, force=False) -> bool:
  return manager.save(step, args=ocp.args.Composite(
      state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)), force=force)


def restore(manager: ocp.CheckpointManager, step: int, abstract_state) -> tuple[Any, dict]:
  """The ``(state, data position)`` saved at ``step``; a damaged one is a :class:`UserError`."""
  quiet_orphaned_reads()  # before: a failed restore's other reads may report at once
  try:
    restored = manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()))
  except CHECKPOINT_READ_ERRORS as e:
    raise unreadable_checkpoint(os.path.join(str(manager.directory), str(step)), e) from None
  return restored['state'], restored['data']


def latest_step(workdir: str) -> int | None:
  path = checkpoint_dir(workdir)
  if not os.path.isdir(path):
    return None
  steps = [int(name) for name in os.listdir(path) if name.isdigit()
           and ocp.path.step.is_checkpoint_finalized(os.path.join(path, name))]
  return max(steps) if steps else None


def _get(cfg: dict, dotted: str):
  node = cfg
  for part in dotted.split('.'):
    if not isinstance(node, dict) or part not in node:
      return None
    node = node[part]
  return node


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  return json.loads(config.to_json_best_effort())


def check_or_write_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Writes ``config.json``, or refuses a workdir holding another config's checkpoints."""
  path = os.path.join(workdir, 'config.json')
  new = config_to_dict(config)
  if latest_step(workdir) is not None and os.path.exists(path):
    with open(path) as f:
      old = json.load(f)
    diff = [f for f in IDENTITY_FIELDS if _get(old, f) != _get(new, f)]
    if diff:
      raise UserError(
          f'{workdir} holds checkpoints of another config (it differs in {", ".join(diff)}); '
          'use a new --workdir, or delete that one to start over')
  elif latest_step(workdir) is not None:
    raise UserError(f'{workdir} holds checkpoints but no config.json; use a new --workdir')
  if jax.process_index() == 0:
    os.makedirs(workdir, exist_ok=True)
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(new, f, indent=2, sort_keys=True)
    os.replace(tmp, path)


def load_config(workdir: str) -> ml_collections.ConfigDict:
  path = os.path.join(workdir, 'config.json')
  if not os.path.exists(path):
    raise UserError(f'{workdir} has no config.json: is it a kdjax workdir? '
                    'Train one with `kdjax train --config ... --workdir DIR`')
  with open(path) as f:
    raw = json.load(f)
  from kdjax.distill.defaults import base_config
  config = base_config()
  _merge(config, raw)
  return config


def _merge(config: ml_collections.ConfigDict, raw: dict) -> None:
  for key, value in raw.items():
    if isinstance(value, dict) and key in config and isinstance(config[key], ml_collections.ConfigDict) \
        and key not in ('terms', 'kwargs', 'augment'):
      _merge(config[key], value)
    else:
      with config.ignore_type():
        if isinstance(value, dict):
          value = ml_collections.ConfigDict(value)
        elif key in ('mesh', 'partition_rules') and isinstance(value, list):
          value = [tuple(v) for v in value]
        config[key] = value
