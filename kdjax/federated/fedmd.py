"""FedMD: heterogeneous clients agree on class scores for a shared public set.

Each client keeps its own model (architectures may differ between clients, as
in the paper: see :mod:`kdjax.federated.groups`; each architecture group is
vmapped). A round, for a
cohort client: *digest* — train toward the current consensus on the public
set (``digest_epochs`` passes, L1 loss between logits); *revisit* — train on
its private data (the local trainer); then report its logits on the public
set. The server's new consensus is the average of the reported logits.

Choices made: the consensus a client digests is the one formed by the
previous round's cohort (the paper has every client digest and revisit in the
same round in lockstep; with partial participation the one-round lag is the
natural form); the whole public set is used every round (the paper samples a
subset per round); the public set is unlabeled here (the paper also
pre-trains on it with labels — transfer learning is left to the user).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated import public
from kdjax.federated.local import LocalTrainer


def fedmd(trainer: LocalTrainer, public_x, *, digest_epochs: int = 1,
          digest_batch_size: int = 32, digest_lr: float | None = None,
          digest_loss: str = 'l1') -> base.FedAlgorithm:
  """FedMD with consensus on a public set.

  Args:
    trainer: the local trainer (the revisit step).
    public_x: ``[P, ...]`` public inputs.
    digest_epochs: passes over the public set in the digest step.
    digest_batch_size: public minibatch size.
    digest_lr: digest SGD learning rate (default: the trainer's).
    digest_loss: ``'l1'`` (logits) or ``'kd'``.

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm` without a global model.

  References:
    Li & Wang, "FedMD: Heterogenous Federated Learning via Model Distillation",
    NeurIPS Workshop on Federated Learning, 2019 (arXiv:1910.03581).

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8,)))
  >>> server, _ = fedmd(make_local_trainer(apply, batch_size=2), jnp.zeros((6, 4))).init(params, state, 2)
  >>> server.extra['consensus'].shape
  (6, 3)
  """
  public_x = jnp.asarray(public_x)
  apply = trainer.apply
  digest = public.make_public_trainer(
      apply, batch_size=digest_batch_size, epochs=digest_epochs,
      lr=trainer.lr if digest_lr is None else digest_lr, loss=digest_loss)

  def init(params, model_state, num_clients):
    shape = jax.eval_shape(lambda: public.public_logits(apply, params, model_state, public_x))
    extra = {'consensus': jnp.zeros(shape.shape, jnp.float32), 'ready': jnp.zeros((), bool)}
    server = base.ServerState(params, model_state, optax.EmptyState(), extra)
    clients = {'params': public.stack_for_clients(params, num_clients),
               'model_state': public.stack_for_clients(model_state, num_clients)}
    return server, clients

  def client_update(server, client_state, data, rng):
    res = public.public_then_local(digest, trainer, client_state, public_x,
                                   server.extra['consensus'], data, rng,
                                   ready=server.extra['ready'])
    logits = public.public_logits(apply, res.params, res.model_state, public_x)
    return base.ClientOutput({'logits': logits}, jnp.ones((), jnp.float32),
                             {'params': res.params, 'model_state': res.model_state},
                             res.metrics)

  def server_update(server, mean, info):
    del info
    return server._replace(extra={'consensus': mean['logits'], 'ready': jnp.ones((), bool)})

  def download(server):
    return server.extra['consensus']

  return base.FedAlgorithm('fedmd', init, client_update, server_update, public.own_model,
                           download, has_global_model=False, heterogeneous=True)

