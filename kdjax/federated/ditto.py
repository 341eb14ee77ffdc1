"""Ditto: a personalized model per client, regularized toward the global one.

Each round a cohort client (1) trains a copy of the global model ``w`` as in
FedAvg and reports its change, and (2) trains its personal model ``v_k`` on
``F_k(v) + (λ/2)·‖v − w‖²`` (``w`` the global model received this round) for
the same number of local epochs, with its own shuffling key. Personalized
accuracy is measured with ``v_k``. Clients that never took part start their
personal model from the initial global model (our choice: the paper
initializes ``v_k`` with ``w`` at the first participation; both coincide
when the initial model is shared).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated.local import LocalTrainer


def ditto(trainer: LocalTrainer, *, lam: float = 0.1,
          server_tx: optax.GradientTransformation | None = None) -> base.FedAlgorithm:
  """Ditto with regularization strength ``lam``.

  Args:
    trainer: the local trainer (used for both the global and the personal model).
    lam: λ ≥ 0; large λ pulls personal models to the global one.
    server_tx: the server optimizer (default ``optax.sgd(1.0)``).

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm` whose client state is
    ``{'params': v_k, 'model_state': ...}``.

  References:
    Li, Hu, Beirami & Smith, "Ditto: Fair and Robust Federated Learning Through
    Personalization", ICML 2021.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=2, input_shape=(3,), hidden=(4,)))
  >>> ditto(make_local_trainer(apply, batch_size=2), lam=0.5).name
  'ditto'
  """
  server_tx = optax.sgd(1.0) if server_tx is None else server_tx
  lam = float(lam)

  def init(params, model_state, num_clients):
    stack = lambda t: jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients, *a.shape)), t)
    server = base.ServerState(params, model_state, server_tx.init(params), {})
    return server, {'params': stack(params), 'model_state': stack(model_state)}

  def client_update(server, client_state, data, rng):
    res = trainer.train(server.params, server.model_state, data, jax.random.fold_in(rng, 0))
    penalty = lambda v: 0.5 * lam * base.tree_sq_norm(base.tree_sub(v, server.params))
    own = trainer.train(client_state['params'], client_state['model_state'], data,
                        jax.random.fold_in(rng, 1), penalty=penalty)
    update = {'delta': base.tree_sub(res.params, server.params),
              'model_state': base.float_leaves(res.model_state)}
    return base.ClientOutput(update, jnp.asarray(data[3], jnp.float32),
                             {'params': own.params, 'model_state': own.model_state},
                             res.metrics)

  def server_update(server, mean, info):
    del info
    params, opt_state = base.server_step(server_tx, server.params, server.opt_state,
                                         mean['delta'])
    model_state = base.merge_float_leaves(server.model_state, mean['model_state'])
    return base.ServerState(params, model_state, opt_state, server.extra)

  def personal(server, client_state):
    del server
    return client_state['params'], client_state['model_state']

  return base.FedAlgorithm('ditto', init, client_update, server_update, personal,
                           base.download_params)
