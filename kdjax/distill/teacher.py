"""The frozen teacher: rebuilt from a finished ``kdjax train`` workdir.

Forward only, never checkpointed with the student, placed with its own sharding
(``config.teacher.partition_rules``, often FSDP for a large teacher).
"""

from __future__ import annotations

import hashlib
import os
from typing import Any, NamedTuple

import jax
import numpy as np
import orbax.checkpoint as ocp

from kdjax.distill import checkpoint as ckpt
from kdjax.distill.step import TeacherFns
from kdjax.errors import UserError
from kdjax.parallel import shardings_from_rules


class Teacher(NamedTuple):
  fns: TeacherFns
  variables: Any          # (params, model_state), placed on the mesh
  config: Any             # the teacher's own training config
  step: int
  fingerprint: str        # sha256 over the parameter bytes


def build_model(model_cfg, *, num_classes: int, input_shape, seed: int):
  from kdjax import models
  import jax.numpy as jnp
  kwargs = dict(model_cfg.kwargs.to_dict()) if hasattr(model_cfg.kwargs, 'to_dict') else dict(model_cfg.kwargs)
  try:
    module = models.create(model_cfg.name, num_classes=num_classes, input_shape=tuple(input_shape),
                           seed=seed, dtype=jnp.dtype(model_cfg.dtype), **kwargs)
  except KeyError as e:
    raise UserError(str(e.args[0]) if e.args else str(e)) from None
  except TypeError as e:
    raise UserError(f'model {model_cfg.name!r}: {e}') from None
  return models.functional(module)


def fingerprint(tree) -> str:
  h = hashlib.sha256()
  for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
    h.update(jax.tree_util.keystr(path).encode())
    h.update(np.asarray(jax.device_get(leaf)).tobytes())
  return h.hexdigest()


def load_teacher(workdir: str, mesh, rules, *, input_shape=None) -> Teacher:
  """Restores the latest checkpoint of a teacher workdir as a frozen teacher."""
  if not workdir:
    raise UserError('this config needs a teacher: set --config.teacher.workdir=DIR '
                    '(a finished `kdjax train` workdir)')
  step = ckpt.latest_step(workdir)
  if step is None:
    raise UserError(f'teacher workdir {workdir} has no checkpoint; train the teacher first '
                    f'with `kdjax train --config ... --workdir {workdir}`')
  tconfig = ckpt.load_config(workdir)
  from kdjax.data import dataset_spec
  spec = dataset_spec(tconfig.data.name, data_dir=tconfig.data.data_dir or None)
  apply, params, model_state = build_model(
      tconfig.model, num_classes=spec.num_classes,
      input_shape=input_shape or spec.input_shape, seed=tconfig.seed)
  raw = _restore_replicated(os.path.join(ckpt.checkpoint_dir(workdir), str(step), 'state'), mesh)
  params = _fill(params, raw['params']['student'], workdir)
  model_state = _fill(model_state, raw['model_state'], workdir)
  variables = (params, model_state)
  shardings = shardings_from_rules(variables, rules, mesh)
  variables = jax.device_put(variables, shardings)
  return Teacher(TeacherFns(apply, spec.num_classes), variables, tconfig, step, fingerprint(params))


def _restore_replicated(path: str, mesh):
  """Restores a saved state pytree replicated over ``mesh`` (any process layout).

  The target comes from the checkpoint's own metadata, so the checkpoint may have
  been written by another number of processes or devices.
  """
  from jax.sharding import NamedSharding, PartitionSpec as P
  checkpointer = ocp.StandardCheckpointer()
  meta = checkpointer.metadata(path).item_metadata
  repl = NamedSharding(mesh, P())
  abstract = jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=repl), meta)
  restored = checkpointer.restore(path, abstract)
  checkpointer.close()
  return restored


def _fill(template, restored, workdir):
  leaves = jax.tree.leaves(restored)
  treedef = jax.tree.structure(template)
  if treedef.num_leaves != len(leaves):
    raise UserError(f'the checkpoint in {workdir} does not match its config.json model; '
                    'was the workdir written by another kdjax version?')
  for want, got in zip(jax.tree.leaves(template), leaves):
    if tuple(want.shape) != tuple(np.shape(got)):
      raise UserError(f'the checkpoint in {workdir} does not match its config.json model '
                      f'(a parameter of shape {tuple(want.shape)} is stored as {np.shape(got)})')
  return jax.tree.unflatten(treedef, [np.asarray(jax.device_get(l)) for l in leaves])
