"""FedNova: normalized averaging removes the objective inconsistency of unequal local work.

Client ``i`` runs ``τ_i`` local SGD steps (here: more steps for clients with
more examples) and reports its normalized update ``d_i = Δ_i / a_i``, where
for SGD with momentum ρ, ``a_i = (τ_i − ρ(1 − ρ^τ_i)/(1 − ρ)) / (1 − ρ)``
(``a_i = τ_i`` for plain SGD). With data weights ``p_i = n_i / Σ n``, the
server applies ``Δ = τ_eff · Σ p_i d_i`` with ``τ_eff = Σ p_i a_i`` (the
paper's default choice of τ_eff for vanilla SGD; with momentum we use the
same Σ p_i a_i, our choice), through its optimizer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated.local import LocalTrainer


def local_work(steps, momentum: float = 0.0):
  """``a_i`` of FedNova for ``steps`` SGD steps with momentum ``momentum``.

  >>> float(local_work(5.0)), round(float(local_work(2.0, 0.5)), 3)
  (5.0, 2.5)
  """
  steps = jnp.asarray(steps, jnp.float32)
  if not momentum:
    return steps
  r = float(momentum)
  return (steps - r * (1.0 - r ** steps) / (1.0 - r)) / (1.0 - r)


def fednova(trainer: LocalTrainer, *,
            server_tx: optax.GradientTransformation | None = None) -> base.FedAlgorithm:
  """FedNova with data-size weights.

  Args:
    trainer: the local trainer.
    server_tx: the server optimizer (default ``optax.sgd(1.0)``).

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm`.

  References:
    Wang, Liu, Liang, Joshi & Poor, "Tackling the Objective Inconsistency
    Problem in Heterogeneous Federated Optimization", NeurIPS 2020.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=2, input_shape=(3,), hidden=(4,)))
  >>> fednova(make_local_trainer(apply, batch_size=2)).name
  'fednova'
  """
  server_tx = optax.sgd(1.0) if server_tx is None else server_tx
  momentum = trainer.momentum

  def init(params, model_state, num_clients):
    del num_clients
    return base.ServerState(params, model_state, server_tx.init(params), {}), {}

  def client_update(server, client_state, data, rng):
    res = trainer.train(server.params, server.model_state, data, rng)
    a = local_work(res.num_steps, momentum)
    inv = jnp.where(a > 0, 1.0 / jnp.maximum(a, 1e-12), 0.0)
    d = jax.tree.map(lambda p, w: (p - w) * inv, res.params, server.params)
    update = {'d': d, 'a': a, 'model_state': base.float_leaves(res.model_state)}
    return base.ClientOutput(update, jnp.asarray(data[3], jnp.float32), client_state,
                             res.metrics)

  def server_update(server, mean, info):
    del info
    delta = jax.tree.map(lambda d: mean['a'] * d, mean['d'])
    params, opt_state = base.server_step(server_tx, server.params, server.opt_state, delta)
    model_state = base.merge_float_leaves(server.model_state, mean['model_state'])
    return base.ServerState(params, model_state, opt_state, server.extra)

  return base.FedAlgorithm('fednova', init, client_update, server_update, base.global_model,
                           base.download_params)
