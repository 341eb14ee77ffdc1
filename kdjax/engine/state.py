"""The train state: one pytree, every leaf a global array, checkpointed whole."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax

from kdjax import workdir as workdir_lib
from kdjax.errors import UserError


@flax.struct.dataclass
class TrainState:
  """Student training state.

  Attributes:
    step: optimizer step (int32 scalar).
    params: trainable pytree ``{'student': ..., 'loss': ...}``; ``'loss'`` holds the
      parameters of learned loss terms (FitNet projectors, CRD heads).
    model_state: the student's non-trainable state (batch statistics).
    loss_state: non-differentiated state of loss terms (TAID's coefficient, queues).
    opt_state: the optax state of ``params``.
    rng: raw PRNG key data (uint32) for dropout; folded with ``step`` each step.
  """

  step: jax.Array
  params: Any
  model_state: Any
  loss_state: Any
  opt_state: Any
  rng: jax.Array


def warm_start(state, workdir: str, step: int = 0):
  """``state`` with the student's parameters and model state of ``workdir``'s checkpoint
  at ``step`` (0: its latest), each array in the sharding of the one it replaces; the
  optimizer, the loss terms' parameters and the step stay fresh.

  Raises:
    UserError: no such workdir or checkpoint, or one of another model (shapes differ).
  """
  steps = workdir_lib.all_steps(workdir)
  if not steps:
    raise UserError(f'config.init.workdir {workdir} has no checkpoint to start the student '
                    'from; train that run first')
  step = step or max(steps)
  if step not in steps:
    raise UserError(f'config.init.workdir {workdir} has no checkpoint at step {step} '
                    f'(it has {", ".join(map(str, sorted(steps)))})')

  def take(template, subtree):
    leaves, treedef = jax.tree.flatten(template)
    another = (f'config.init.workdir {workdir} holds another model than this run\'s '
               '(its parameters differ in number or shape)')
    try:
      got = jax.tree.leaves(workdir_lib.restore_subtree(
          workdir, step, subtree, shardings=[x.sharding for x in leaves]))
    except UserError as e:
      raise UserError(f'{another}: {e}') from None
    if len(got) != len(leaves) or any(a.shape != b.shape for a, b in zip(leaves, got)):
      raise UserError(another)
    return jax.tree.unflatten(treedef, [b.astype(a.dtype) for a, b in zip(leaves, got)])

  params = dict(state.params)
  params['student'] = take(state.params['student'], ('params', 'student'))
  model_state = (take(state.model_state, ('model_state',))
                 if jax.tree.leaves(state.model_state) else state.model_state)
  return state.replace(params=params, model_state=model_state)
