"""DS-FL: distillation-based semi-supervised FL with entropy-reduction aggregation.

Clients keep their own models and share an unlabeled *open* set. A cohort
client first distills toward the current global soft labels on the open set
(cross-entropy with the soft labels), then trains on its private data, then
reports its softmax predictions on the open set. The server aggregates them
with *entropy reduction averaging* (ERA): ``softmax(log(mean_k p_k) / T)``
with ``T < 1``, which sharpens the averaged prediction (non-IID clients'
averages are otherwise close to uniform).

Choices made: the one-round lag of :mod:`kdjax.federated.fedmd` (the soft
labels a client distills toward come from the previous cohort); the paper's
server-side model trained on the open set is left out; predictions are
averaged with equal client weights.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated import public
from kdjax.federated.local import LocalTrainer


def era(mean_probs: jax.Array, temperature: float) -> jax.Array:
  """Entropy reduction aggregation: ``softmax(log(p) / T)`` over the last axis.

  >>> [round(float(v), 3) for v in era(jnp.array([[0.5, 0.3, 0.2]]), 0.5)[0]]
  [0.658, 0.237, 0.105]
  """
  return jax.nn.softmax(jnp.log(jnp.maximum(mean_probs, 1e-12)) / temperature, axis=-1)


def dsfl(trainer: LocalTrainer, open_x, *, temperature: float = 0.1,
         distill_epochs: int = 1, distill_batch_size: int = 32,
         distill_lr: float | None = None) -> base.FedAlgorithm:
  """DS-FL with ERA.

  Args:
    trainer: the local trainer.
    open_x: ``[P, ...]`` unlabeled open inputs.
    temperature: the ERA temperature ``T`` (``< 1`` sharpens).
    distill_epochs: passes over the open set per round.
    distill_batch_size: open-set minibatch size.
    distill_lr: distillation SGD learning rate (default: the trainer's).

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm` without a global model.

  References:
    Itahara, Nishio, Koda, Morikura & Yamamoto, "Distillation-Based
    Semi-Supervised Federated Learning for Communication-Efficient
    Collaborative Training with Non-IID Private Data", IEEE Transactions on
    Mobile Computing, 2021 (arXiv:2008.06180).

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8,)))
  >>> dsfl(make_local_trainer(apply, batch_size=2), jnp.zeros((6, 4))).name
  'dsfl'
  """
  open_x = jnp.asarray(open_x)
  apply = trainer.apply
  distill = public.make_public_trainer(
      apply, batch_size=distill_batch_size, epochs=distill_epochs,
      lr=trainer.lr if distill_lr is None else distill_lr, loss='soft_ce')

  def init(params, model_state, num_clients):
    shape = jax.eval_shape(lambda: public.public_logits(apply, params, model_state, open_x))
    extra = {'soft_labels': jnp.full(shape.shape, 1.0 / shape.shape[-1], jnp.float32),
             'ready': jnp.zeros((), bool)}
    server = base.ServerState(params, model_state, optax.EmptyState(), extra)
    clients = {'params': public.stack_for_clients(params, num_clients),
               'model_state': public.stack_for_clients(model_state, num_clients)}
    return server, clients

  def client_update(server, client_state, data, rng):
    res = public.public_then_local(distill, trainer, client_state, open_x,
                                   server.extra['soft_labels'], data, rng,
                                   ready=server.extra['ready'])
    probs = jax.nn.softmax(public.public_logits(apply, res.params, res.model_state, open_x))
    return base.ClientOutput({'probs': probs}, jnp.ones((), jnp.float32),
                             {'params': res.params, 'model_state': res.model_state},
                             res.metrics)

  def server_update(server, mean, info):
    del info
    return server._replace(extra={'soft_labels': era(mean['probs'], temperature),
                                  'ready': jnp.ones((), bool)})

  def download(server):
    return server.extra['soft_labels']

  return base.FedAlgorithm('dsfl', init, client_update, server_update, public.own_model,
                           download, has_global_model=False, heterogeneous=True)
