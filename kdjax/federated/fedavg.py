"""FedAvg: local SGD on each client, the server averages the models.

Round: every cohort client starts from the global model ``w``, runs
``local_epochs`` of minibatch SGD on its data and reports ``Δ_k = w_k − w``;
the server averages with weights ``n_k`` (example counts) and applies its
optimizer to the pseudo-gradient ``−Δ``; with ``optax.sgd(1.0)`` this is
``w ← Σ_k n_k w_k / Σ_k n_k``, McMahan et al.'s FedAvg. Non-trainable model
state (batch statistics) is averaged the same way.
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated.local import LocalTrainer


def fedavg(trainer: LocalTrainer, *, server_tx: optax.GradientTransformation | None = None,
           penalty_fn=None, name: str = 'fedavg') -> base.FedAlgorithm:
  """Federated averaging, optionally with a server optimizer (FedOpt).

  Args:
    trainer: the local trainer (:func:`kdjax.federated.local.make_local_trainer`).
    server_tx: the server optimizer (default ``optax.sgd(1.0)``: plain FedAvg).
    penalty_fn: ``penalty_fn(params, global_params) -> scalar`` added to the
      local loss (FedProx uses it).
    name: the algorithm's name.

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm`.

  References:
    McMahan, Moore, Ramage, Hampson & Agüera y Arcas, "Communication-Efficient
    Learning of Deep Networks from Decentralized Data", AISTATS 2017.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=2, input_shape=(3,), hidden=(4,)))
  >>> alg = fedavg(make_local_trainer(apply, batch_size=2))
  >>> server, clients = alg.init(params, state, 5)
  >>> alg.name, clients
  ('fedavg', {})
  """
  server_tx = optax.sgd(1.0) if server_tx is None else server_tx

  def init(params, model_state, num_clients):
    del num_clients
    return base.ServerState(params, model_state, server_tx.init(params), {}), {}

  def client_update(server, client_state, data, rng):
    penalty = None
    if penalty_fn is not None:
      penalty = lambda p: penalty_fn(p, server.params)
    res = trainer.train(server.params, server.model_state, data, rng, penalty=penalty)
    update = {'delta': base.tree_sub(res.params, server.params),
              'model_state': base.float_leaves(res.model_state)}
    weight = jnp.asarray(data[3], jnp.float32)
    return base.ClientOutput(update, weight, client_state, res.metrics)

  def server_update(server, mean, info):
    del info
    params, opt_state = base.server_step(server_tx, server.params, server.opt_state,
                                         mean['delta'])
    model_state = base.merge_float_leaves(server.model_state, mean['model_state'])
    return base.ServerState(params, model_state, opt_state, server.extra)

  return base.FedAlgorithm(name, init, client_update, server_update, base.global_model,
                           base.download_params)
