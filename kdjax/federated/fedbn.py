"""FedBN: normalization layers stay local; everything else is averaged.

Each client keeps its own copy of the parameters whose path matches
``local_pattern`` (by default every normalization layer) and its own
non-trainable model state (batch statistics). It trains the merged model and
reports the change of the shared parameters only; the server averages those
as in FedAvg. A client's personalized model is the global shared parameters
with its own local ones. Clients that never took part evaluate with the
initial local parameters.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated.local import LocalTrainer

DEFAULT_LOCAL = r'norm|bn|batch_?stat'


def local_mask(params, pattern: str = DEFAULT_LOCAL):
  """A pytree of bools: True where the leaf's path matches ``pattern`` (kept local).

  >>> local_mask({'norms': {'scale': jnp.ones(2)}, 'head': {'w': jnp.ones(2)}})
  {'head': {'w': False}, 'norms': {'scale': True}}
  """
  rx = re.compile(pattern)
  return jax.tree_util.tree_map_with_path(
      lambda path, _: bool(rx.search(jax.tree_util.keystr(path))), params)


def fedbn(trainer: LocalTrainer, *, local_pattern: str = DEFAULT_LOCAL,
          server_tx: optax.GradientTransformation | None = None) -> base.FedAlgorithm:
  """FedBN (local normalization layers).

  Args:
    trainer: the local trainer.
    local_pattern: regex over parameter paths (``jax.tree_util.keystr``) that
      stay on the clients.
    server_tx: the server optimizer (default ``optax.sgd(1.0)``).

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm` whose client state is
    ``{'params': full params, 'model_state': model state}`` per client (only
    the local leaves of ``params`` are used).

  References:
    Li, Jiang, Zhang, Kamp & Dou, "FedBN: Federated Learning on Non-IID
    Features via Local Batch Normalization", ICLR 2021.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=2, input_shape=(3,), hidden=(4,), norm='batch'))
  >>> server, clients = fedbn(make_local_trainer(apply, batch_size=2)).init(params, state, 3)
  >>> clients['params']['norms'][0]['scale'].shape
  (3, 4)
  """
  server_tx = optax.sgd(1.0) if server_tx is None else server_tx

  def merged(server, client_state):
    is_local = local_mask(server.params, local_pattern)
    params = jax.tree.map(lambda m, g, l: l if m else g, is_local, server.params,
                          client_state['params'])
    return params, client_state['model_state']

  def init(params, model_state, num_clients):
    stack = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients, *a.shape)), t)
    server = base.ServerState(params, model_state, server_tx.init(params), {})
    return server, {'params': stack(params), 'model_state': stack(model_state)}

  def client_update(server, client_state, data, rng):
    params, model_state = merged(server, client_state)
    res = trainer.train(params, model_state, data, rng)
    is_local = local_mask(server.params, local_pattern)
    delta = jax.tree.map(lambda m, p, g: jnp.zeros_like(g) if m else p - g, is_local,
                         res.params, server.params)
    new_state = {'params': res.params, 'model_state': res.model_state}
    return base.ClientOutput({'delta': delta}, jnp.asarray(data[3], jnp.float32), new_state,
                             res.metrics)

  def server_update(server, mean, info):
    del info
    params, opt_state = base.server_step(server_tx, server.params, server.opt_state,
                                         mean['delta'])
    return base.ServerState(params, server.model_state, opt_state, server.extra)

  def download(server):
    is_local = local_mask(server.params, local_pattern)
    return [g for m, g in zip(jax.tree.leaves(is_local), jax.tree.leaves(server.params))
            if not m]

  return base.FedAlgorithm('fedbn', init, client_update, server_update, merged, download)
