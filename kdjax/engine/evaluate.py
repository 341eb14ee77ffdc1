"""Evaluation over a whole split: padded batches on device, one jitted ``lax.map``."""

from __future__ import annotations

import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax.engine.feed import example_keys
from kdjax.engine.feed import put_global
from kdjax.engine.metrics import Accumulator
from kdjax.engine.step import eval_metrics
from kdjax.models.base import model_kwargs
from kdjax.parallel import batch_shards
from kdjax.parallel import batch_sharding


def make_evaluator(apply: Callable[..., Any], arrays: dict, mesh: jax.sharding.Mesh, *,
                   batch_size: int) -> Callable[[Any, Any], dict[str, float]]:
  """``evaluate(params, model_state) -> {'accuracy', 'loss'}`` over ``arrays`` (``x``, ``label``;
  token data: per-token accuracy and cross-entropy over its ``mask``, so ``exp(loss)`` is
  the perplexity).

  The split is kept on device in batches of ``batch_size`` (rounded to the mesh's
  first axis), the last one padded and masked.
  """
  n_dev = batch_shards(mesh)
  batch_size = max(n_dev, (int(batch_size) // n_dev) * n_dev)
  n = len(arrays['label'])
  num_batches = math.ceil(n / batch_size)
  pad = num_batches * batch_size - n
  keys = example_keys(arrays)
  stacked = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]).reshape(
      num_batches, batch_size, *v.shape[1:]) for k, v in arrays.items() if k in keys}
  if 'mask' not in stacked:   # token data: its own per-position mask, zero-padded above
    stacked['mask'] = np.concatenate([np.ones(n, bool), np.zeros(pad, bool)]).reshape(
        num_batches, batch_size)
  data = put_global(stacked, NamedSharding(mesh, P()))
  batch_sh = batch_sharding(mesh)

  @jax.jit
  def evaluate_all(params, model_state, data):
    def one(batch):
      batch = jax.lax.with_sharding_constraint(batch, batch_sh)
      out, _ = apply(params, model_state, batch['x'], train=False, **model_kwargs(batch))
      return eval_metrics(out.logits, batch['label'], batch['mask'])
    return jax.tree.map(lambda m: jnp.sum(m, axis=0), jax.lax.map(one, data))

  def evaluate(params, model_state) -> dict[str, float]:
    acc = Accumulator()
    acc.add(evaluate_all(params, model_state, data))
    return acc.means()

  return evaluate
