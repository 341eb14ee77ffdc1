"""FedDF: FedAvg, then server-side ensemble distillation on unlabeled proxy data.

Round: cohort clients train from the global model as in FedAvg. The server
first averages them (``w̄``), then fine-tunes ``w̄`` for ``server_steps`` Adam
steps to match the cohort's *ensemble* on the unlabeled proxy set: the loss is
Hinton's KD (:func:`kdjax.losses.kd`) between the student ``w̄`` and the
averaged logits of the client models, at temperature ``temperature``.

Choices made (the simulation, not the paper): each client reports its model's
logits on the whole proxy set with its update (a real server would evaluate the
received models itself; the bytes counted include those logits); the ensemble
averages logits with the clients' example-count weights; the paper's early
stopping on a validation set is replaced by a fixed ``server_steps``; proxy
minibatches are drawn by a key derived from ``(seed, round)``. The server's
distillation steps are kdjax's one train step (:func:`kdjax.federated.public.make_public_trainer`).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated import public
from kdjax.federated.local import LocalTrainer


def feddf(trainer: LocalTrainer, proxy_x, *, server_steps: int = 50,
          server_batch_size: int = 64, server_lr: float = 1e-3, temperature: float = 1.0,
          seed: int = 0) -> base.FedAlgorithm:
  """FedDF with a fixed unlabeled proxy set.

  Args:
    trainer: the local trainer.
    proxy_x: ``[P, ...]`` unlabeled proxy inputs.
    server_steps: Adam distillation steps per round on the server.
    server_batch_size: proxy examples per server step.
    server_lr: Adam learning rate of the server distillation.
    temperature: distillation temperature.
    seed: seed of the server's proxy minibatches.

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm`.

  References:
    Lin, Kong, Stich & Jaggi, "Ensemble Distillation for Robust Model Fusion in
    Federated Learning", NeurIPS 2020.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=2, input_shape=(3,), hidden=(4,)))
  >>> feddf(make_local_trainer(apply, batch_size=2), jnp.zeros((8, 3))).name
  'feddf'
  """
  proxy_x = jnp.asarray(proxy_x)
  apply = trainer.apply
  distill = public.make_public_trainer(apply, batch_size=server_batch_size, loss='kd',
                                       temperature=temperature, tx=optax.adam(server_lr),
                                       steps=int(server_steps))
  server_tx = optax.sgd(1.0)

  def init(params, model_state, num_clients):
    del num_clients
    return base.ServerState(params, model_state, server_tx.init(params), {}), {}

  def client_update(server, client_state, data, rng):
    res = trainer.train(server.params, server.model_state, data, rng)
    out, _ = apply(res.params, res.model_state, proxy_x, train=False)
    update = {'delta': base.tree_sub(res.params, server.params),
              'model_state': base.float_leaves(res.model_state),
              'proxy_logits': out.logits.astype(jnp.float32)}
    return base.ClientOutput(update, jnp.asarray(data[3], jnp.float32), client_state,
                             res.metrics)

  def server_update(server, mean, info):
    params, opt_state = base.server_step(server_tx, server.params, server.opt_state,
                                         mean['delta'])
    model_state = base.merge_float_leaves(server.model_state, mean['model_state'])
    key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), info['round'])
    params, model_state = distill(params, model_state, proxy_x,
                                  jax.lax.stop_gradient(mean['proxy_logits']), key)
    return base.ServerState(params, model_state, opt_state, server.extra)

  return base.FedAlgorithm('feddf', init, client_update, server_update, base.global_model,
                           base.download_params, heterogeneous=True,
                           group_keys=('delta', 'model_state'))
