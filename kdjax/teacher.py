"""The frozen teacher: loaded from a finished ``kdjax train`` workdir, forward only.

A teacher is never checkpointed with the student and runs under ``stop_gradient``; its
parameters are placed with their own sharding (``config.teacher.partition_rules``,
often FSDP for a large teacher) on the student's mesh or on devices of its own. The
distillation engine, the cache builder and the benchmarks use it through
:func:`outputs`, so a live teacher and a cached one give the student the same batch
entries.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, Callable, NamedTuple

import jax
import numpy as np

from kdjax import workdir as workdir_lib
from kdjax.config import from_dict
from kdjax.errors import UserError
from kdjax.models import from_config
from kdjax.models.base import named_features
from kdjax.parallel import shardings_from_rules

# The batch entries a teacher can give a loss (kdjax.losses.registry).
OUTPUT_KEYS = ('teacher_logits', 'teacher_features', 'teacher_attentions')


class Teacher(NamedTuple):
  """A frozen teacher.

  Attributes:
    apply: ``apply(params, state, x, *, train) -> (ModelOutput, state)``.
    variables: ``(params, model_state)``, placed on the mesh it was loaded for.
    num_classes: classifier outputs.
    config: the teacher's own training config.
    step: the checkpoint step it was restored from.
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


def _model(config, *, input_shape=None):
  from kdjax.data import dataset_spec
  spec = dataset_spec(config.data.name, data_dir=config.data.get('data_dir') or None)
  apply, _, (params, state) = from_config(
      config.model, num_classes=spec.num_classes,
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
                 input_shape=None) -> Teacher:
  """Restores the latest checkpoint of a teacher workdir as a frozen teacher.

  Only the student parameters and model state of that checkpoint are read (not the
  optimizer state), each array straight into its sharding on ``mesh`` from ``rules``.
  """
  step, config = _checkpoint(workdir)
  apply, params, state, num_classes = _model(config, input_shape=input_shape)
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
