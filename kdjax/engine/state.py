"""The train state: one pytree, every leaf a global array, checkpointed whole."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax


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
