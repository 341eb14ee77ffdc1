"""FD (federated distillation): clients exchange per-class average logits only.

Each client keeps its own model. In a round, a cohort client trains on its data
with ``CE + β · KD(z, ẑ_y)``, where ``ẑ_y`` is the server's global average
logit vector of the example's label ``y`` (the term is left out for labels the
server has not seen yet), then reports, for every class, the sum of its
model's logits over its local examples of that class and their count. The
server's global per-class logits are the pooled means over the cohort (a class
nobody in the cohort holds keeps its previous value).

Choices made: the teacher vector includes the client's own past contribution
(the paper subtracts it; that needs per-client server memory); the distance is
Hinton's KD at temperature ``temperature`` (:func:`kdjax.losses.kd`), the
paper leaves the distance open; logits are reported after local training, in
eval mode.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated import public
from kdjax.federated.local import LocalTrainer


def class_table_kd(table, known, *, beta: float, temperature: float):
  """``batch_loss(logits, labels, mask)``: β · mean KD towards the per-class logits of the label.

  ``table`` ``[C, C]`` holds one target logit vector per class, ``known`` ``[C]`` marks the
  classes that have one; examples of other classes, masked or unlabeled ones add nothing.
  """
  from kdjax.losses import kd

  def batch_loss(logits, labels, mask):
    y = jnp.maximum(labels, 0)
    where = jnp.logical_and(jnp.logical_and(mask, labels >= 0), known[y])
    per = kd(logits, table[y], temperature=temperature, where=where)
    w = where.astype(jnp.float32)
    return beta * jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)

  return batch_loss


def fd(trainer: LocalTrainer, *, num_classes: int, beta: float = 1.0,
       temperature: float = 1.0) -> base.FedAlgorithm:
  """Federated distillation with per-class average logits.

  Args:
    trainer: the local trainer.
    num_classes: the number of classes ``C`` (size of the exchanged ``[C, C]``).
    beta: weight of the distillation term.
    temperature: KD temperature.

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm` (no global model: clients
    keep ``{'params', 'model_state'}``; the server keeps ``{'logits' [C, C],
    'seen' [C]}``).

  References:
    Jeong, Oh, Kim, Park, Bennis & Kim, "Communication-Efficient On-Device
    Machine Learning: Federated Distillation and Augmentation under Non-IID
    Private Data", NeurIPS Workshop on ML on the Phone and other Consumer
    Devices, 2018 (arXiv:1811.11479).

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8,)))
  >>> server, clients = fd(make_local_trainer(apply, batch_size=2), num_classes=3).init(params, state, 5)
  >>> server.extra['logits'].shape, clients['params']['head']['bias'].shape
  ((3, 3), (5, 3))
  """
  c = int(num_classes)
  apply = trainer.apply

  def init(params, model_state, num_clients):
    extra = {'logits': jnp.zeros((c, c), jnp.float32), 'seen': jnp.zeros((c,), bool)}
    server = base.ServerState(params, model_state, optax.EmptyState(), extra)
    clients = {'params': public.stack_for_clients(params, num_clients),
               'model_state': public.stack_for_clients(model_state, num_clients)}
    return server, clients

  def client_update(server, client_state, data, rng):
    table, seen = server.extra['logits'], server.extra['seen']

    batch_loss = class_table_kd(table, seen, beta=beta, temperature=temperature)
    res = trainer.train(client_state['params'], client_state['model_state'], data, rng,
                        batch_loss=batch_loss)
    x, label, mask = data[0], data[1], data[2]
    logits = public.public_logits(apply, res.params, res.model_state, x)
    onehot = jax.nn.one_hot(jnp.maximum(label, 0), c) * jnp.logical_and(
        mask, label >= 0)[:, None]
    update = {'sum': onehot.T @ logits, 'count': jnp.sum(onehot, 0)}
    new_state = {'params': res.params, 'model_state': res.model_state}
    return base.ClientOutput(update, jnp.ones((), jnp.float32), new_state, res.metrics)

  def server_update(server, mean, info):
    del info
    count = mean['count']
    has = count > 0
    logits = jnp.where(has[:, None], mean['sum'] / jnp.maximum(count, 1e-12)[:, None],
                       server.extra['logits'])
    extra = {'logits': logits, 'seen': jnp.logical_or(server.extra['seen'], has)}
    return server._replace(extra=extra)

  def download(server):
    return server.extra['logits']

  return base.FedAlgorithm('fd', init, client_update, server_update, public.own_model,
                           download, has_global_model=False, heterogeneous=True)
