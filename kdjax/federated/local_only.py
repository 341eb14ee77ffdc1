"""Local-only training: the baseline every personalized federated method must beat.

Every client keeps its own model and trains it on its own data; nothing is
exchanged (0 bytes up, 0 bytes down). The budget is matched to the other
algorithms of a run: a client trains only in the rounds it is sampled into
the cohort, for the trainer's ``local_epochs`` with the trainer's optimizer,
exactly the local work a federated-distillation client (FD, FedD2S, KnFu,
EdgeFD, ...) does on its private data in those rounds. Over ``R`` rounds with
cohorts of ``K`` among ``N`` clients a client thus trains about
``R · K / N`` times. Clients start from the same initial model; one never
sampled keeps it.

Evaluation, as for every algorithm without a global model: personalized
accuracy is each client's own model on its own local test split
(:func:`kdjax.federated.simulator.make_personal_evaluate`); "global accuracy"
is the mean over clients of each client's model on the global test set
(:func:`kdjax.federated.simulator.make_clients_global_evaluate`).
"""

from __future__ import annotations

import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated import public
from kdjax.federated.local import LocalTrainer


def local_only(trainer: LocalTrainer) -> base.FedAlgorithm:
  """Each client trains its own model on its own data; nothing is sent.

  Args:
    trainer: the local trainer (its epochs, batch size and optimizer are the
      per-round budget of a sampled client).

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm` without a global model whose
    client states are ``{'params', 'model_state'}`` stacked over clients; its
    update and download are empty pytrees (0 bytes).

  References:
    The local-training baseline of personalized FL benchmarks, e.g. Li, Diao,
    Chen & He, "Federated Learning on Non-IID Data Silos: An Experimental
    Study", ICDE 2022 ("SOLO").

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8,)))
  >>> alg = local_only(make_local_trainer(apply, batch_size=2))
  >>> _, clients = alg.init(params, state, 5)
  >>> clients['params']['head']['bias'].shape, alg.download(None), alg.has_global_model
  ((5, 3), {}, False)
  """

  def init(params, model_state, num_clients):
    clients = {'params': public.stack_for_clients(params, num_clients),
               'model_state': public.stack_for_clients(model_state, num_clients)}
    return base.ServerState(params, model_state, optax.EmptyState(), {}), clients

  def client_update(server, client_state, data, rng):
    del server
    res = trainer.train(client_state['params'], client_state['model_state'], data, rng)
    return base.ClientOutput({}, jnp.ones((), jnp.float32),
                             {'params': res.params, 'model_state': res.model_state},
                             res.metrics)

  def server_update(server, mean, info):
    del mean, info
    return server

  def download(server):
    del server
    return {}

  return base.FedAlgorithm('local_only', init, client_update, server_update, public.own_model,
                           download, has_global_model=False, heterogeneous=True)

