"""SCAFFOLD: control variates correct the client drift of local SGD.

The server keeps a control variate ``c`` and each client ``i`` its own ``c_i``
(all zero at the start). A client starts from the global ``x``, takes ``K``
local steps ``y ← y − η (g_i(y) − c_i + c)`` and sets (option II of the paper)
``c_i⁺ = c_i − c + (x − y) / (K η)``. It reports ``Δy = y − x`` and
``Δc = c_i⁺ − c_i``. The server applies ``Δx = mean(Δy)`` through its optimizer
(η_g = 1 with ``optax.sgd(1.0)``) and sets ``c ← c + (|S| / N) · mean(Δc)``.

Choices made: the means are weighted by the clients' example counts, like
FedAvg (the paper's uniform means are the special case of equal clients);
``K`` is the client's number of real local steps, so it varies with the
client's size; a client that took no step keeps ``c_i``. Local SGD must be
plain (no momentum), as in the paper.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated.local import LocalTrainer


def scaffold(trainer: LocalTrainer, *,
             server_tx: optax.GradientTransformation | None = None) -> base.FedAlgorithm:
  """SCAFFOLD (option II control-variate update).

  Args:
    trainer: the local trainer; its momentum must be 0.
    server_tx: the server optimizer for ``x`` (default ``optax.sgd(1.0)``).

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm` whose client state is
    ``{'c': c_i}`` and whose server extra is ``{'c': c}``.

  References:
    Karimireddy, Kale, Mohri, Reddi, Stich & Suresh, "SCAFFOLD: Stochastic
    Controlled Averaging for Federated Learning", ICML 2020.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=2, input_shape=(3,), hidden=(4,)))
  >>> server, clients = scaffold(make_local_trainer(apply, batch_size=2)).init(params, state, 7)
  >>> clients['c']['head']['bias'].shape
  (7, 2)
  """
  if trainer.momentum:
    raise ValueError('SCAFFOLD needs plain local SGD: set the client momentum to 0')
  server_tx = optax.sgd(1.0) if server_tx is None else server_tx
  lr = trainer.lr

  def init(params, model_state, num_clients):
    zeros = jax.tree.map(jnp.zeros_like, params)
    stacked = jax.tree.map(lambda z: jnp.zeros((num_clients, *z.shape), z.dtype), params)
    server = base.ServerState(params, model_state, server_tx.init(params), {'c': zeros})
    return server, {'c': stacked}

  def client_update(server, client_state, data, rng):
    c, c_i = server.extra['c'], client_state['c']
    correction = base.tree_sub(c, c_i)
    res = trainer.train(server.params, server.model_state, data, rng, correction=correction)
    k = res.num_steps.astype(jnp.float32)
    scale = jnp.where(k > 0, 1.0 / (jnp.maximum(k, 1.0) * lr), 0.0)
    c_new = jax.tree.map(
        lambda ci, cg, x, y: jnp.where(k > 0, ci - cg + (x - y) * scale, ci),
        c_i, c, server.params, res.params)
    update = {'delta': base.tree_sub(res.params, server.params),
              'dc': base.tree_sub(c_new, c_i),
              'model_state': base.float_leaves(res.model_state)}
    weight = jnp.asarray(data[3], jnp.float32)
    return base.ClientOutput(update, weight, {'c': c_new}, res.metrics)

  def server_update(server, mean, info):
    params, opt_state = base.server_step(server_tx, server.params, server.opt_state,
                                         mean['delta'])
    frac = info['num_reported'].astype(jnp.float32) / info['num_clients']
    c = jax.tree.map(lambda a, d: a + frac * d, server.extra['c'], mean['dc'])
    model_state = base.merge_float_leaves(server.model_state, mean['model_state'])
    return base.ServerState(params, model_state, opt_state, {'c': c})

  def download(server):
    return (server.params, server.model_state, server.extra['c'])

  return base.FedAlgorithm('scaffold', init, client_update, server_update, base.global_model,
                           download)
