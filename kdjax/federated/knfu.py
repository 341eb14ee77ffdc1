"""KnFu: each client fuses only its semantic neighbours' knowledge.

Clients keep their own models and share a transfer set. A client's
*knowledge* is its model's logits on the transfer set; its *estimated
probability distribution* (EPD) is the label distribution of its local data.
For each client ``k`` the server fuses the knowledge of the other clients
``j`` that have reported, weighted by how close their EPDs are:
``w_kj ∝ exp(−β · JS(EPD_k, EPD_j))`` over the ``num_neighbors`` closest
clients (its semantic neighbours), zero for the rest. A cohort client's round:
fine-tune on the transfer set toward its own fused knowledge (KD), train on
its private data, then report knowledge and EPD. A client receives fused
knowledge only once it has reported itself.

Choices made (the paper's equations are not reproduced here; this is our
reading): the Jensen–Shannon divergence as the EPD distance, a softmax with
``beta`` (the paper sets its β to 10) over the top-``num_neighbors`` clients;
the server remembers every client's last report (kept in the stacked client
states, see :attr:`~kdjax.federated.base.FedAlgorithm.personalize`); the
one-round lag of :mod:`kdjax.federated.fedmd`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated import public
from kdjax.federated.local import LocalTrainer


def js_divergence(p: jax.Array, q: jax.Array) -> jax.Array:
  """Jensen–Shannon divergence (nats) between distributions on the last axis.

  >>> round(float(js_divergence(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]))), 4)
  0.6931
  """
  m = 0.5 * (p + q)
  kl = lambda a, b: jnp.sum(jnp.where(a > 0, a * (jnp.log(jnp.maximum(a, 1e-12))
                                                  - jnp.log(jnp.maximum(b, 1e-12))), 0.0), -1)
  return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def neighbor_weights(epd: jax.Array, valid: jax.Array, *, beta: float,
                     num_neighbors: int) -> jax.Array:
  """``[N, N]`` fusion weights: row ``k`` sums to 1 over ``k``'s neighbours (0 if none).

  Args:
    epd: ``[N, C]`` label distributions.
    valid: ``[N]`` bool, clients with a report.
    beta: sharpness of ``exp(−β · JS)``.
    num_neighbors: neighbours kept per client (the closest by JS).

  Returns:
    The weights; the diagonal is zero, and so is the row of a client without
    a report (it has no EPD yet).

  >>> w = neighbor_weights(jnp.array([[1., 0.], [1., 0.], [0., 1.]]), jnp.ones(3, bool), beta=10.0, num_neighbors=1)
  >>> w.round(2).tolist()
  [[0.0, 1.0, 0.0], [1.0, 0.0, 0.0], [0.5, 0.5, 0.0]]
  """
  n = epd.shape[0]
  d = jax.vmap(lambda a: jax.vmap(lambda b: js_divergence(a, b))(epd))(epd)
  ok = jnp.logical_and(jnp.logical_and(valid[None, :], valid[:, None]),
                       ~jnp.eye(n, dtype=bool))
  d = jnp.where(ok, d, jnp.inf)
  m = min(int(num_neighbors), max(n - 1, 1))
  kth = jnp.sort(d, axis=1)[:, m - 1:m]
  keep = jnp.logical_and(ok, d <= kth)
  logits = jnp.where(keep, -beta * jnp.where(keep, d, 0.0), -jnp.inf)
  has = jnp.any(keep, axis=1, keepdims=True)
  w = jax.nn.softmax(jnp.where(has, logits, 0.0), axis=1)
  return jnp.where(has, jnp.where(keep, w, 0.0), 0.0)


def knfu(trainer: LocalTrainer, transfer_x, *, num_classes: int, beta: float = 10.0,
         num_neighbors: int = 5, distill_epochs: int = 1, distill_batch_size: int = 32,
         distill_lr: float | None = None, temperature: float = 1.0) -> base.FedAlgorithm:
  """KnFu with JS-divergence neighbours.

  Args:
    trainer: the local trainer.
    transfer_x: ``[P, ...]`` unlabeled transfer inputs.
    num_classes: the number of classes (EPD size).
    beta: neighbour weight sharpness.
    num_neighbors: semantic neighbours fused per client.
    distill_epochs: passes over the transfer set per round.
    distill_batch_size: transfer minibatch size.
    distill_lr: fine-tuning SGD learning rate (default: the trainer's).
    temperature: KD temperature.

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm` without a global model.

  References:
    Seyedmohammadi, Atapour, Abouei & Mohammadi, "KnFu: Effective Knowledge
    Fusion", arXiv:2403.11892, 2024.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8,)))
  >>> _, clients = knfu(make_local_trainer(apply, batch_size=2), jnp.zeros((6, 4)), num_classes=3).init(params, state, 4)
  >>> clients['fused'].shape, clients['epd'].shape
  ((4, 6, 3), (4, 3))
  """
  transfer_x = jnp.asarray(transfer_x)
  apply = trainer.apply
  c = int(num_classes)
  distill = public.make_public_trainer(
      apply, batch_size=distill_batch_size, epochs=distill_epochs,
      lr=trainer.lr if distill_lr is None else distill_lr, loss='kd', temperature=temperature)

  def init(params, model_state, num_clients):
    shape = jax.eval_shape(lambda: public.public_logits(apply, params, model_state, transfer_x))
    z = jnp.zeros((num_clients, *shape.shape), jnp.float32)
    clients = {'params': public.stack_for_clients(params, num_clients),
               'model_state': public.stack_for_clients(model_state, num_clients),
               'report': z, 'epd': jnp.zeros((num_clients, c), jnp.float32),
               'reported': jnp.zeros((num_clients,), bool),
               'fused': z, 'fused_ok': jnp.zeros((num_clients,), bool)}
    return base.ServerState(params, model_state, optax.EmptyState(), {}), clients

  def client_update(server, client_state, data, rng):
    res = public.public_then_local(distill, trainer, client_state, transfer_x,
                                   client_state['fused'], data, rng,
                                   ready=client_state['fused_ok'])
    label, mask = data[1], data[2]
    hist = jnp.sum(jax.nn.one_hot(jnp.maximum(label, 0), c)
                   * jnp.logical_and(mask, label >= 0)[:, None], 0)
    new_state = dict(client_state, params=res.params, model_state=res.model_state,
                     report=public.public_logits(apply, res.params, res.model_state,
                                                 transfer_x),
                     epd=hist / jnp.maximum(jnp.sum(hist), 1.0),
                     reported=jnp.ones((), bool))
    # The update is what the client uploads (its knowledge and EPD); the server reads the
    # per-client copies in `personalize`, the cohort average is not used.
    update = {'report': new_state['report'], 'epd': new_state['epd']}
    return base.ClientOutput(update, jnp.ones((), jnp.float32), new_state, res.metrics)

  def server_update(server, mean, info):
    del mean, info
    return server

  def personalize(server, clients):
    del server
    w = neighbor_weights(clients['epd'], clients['reported'], beta=beta,
                         num_neighbors=num_neighbors)
    fused = jnp.einsum('kj,jpc->kpc', w, clients['report'])
    return dict(clients, fused=fused, fused_ok=jnp.sum(w, axis=1) > 0)

  def download(server):
    del server
    return jax.ShapeDtypeStruct((transfer_x.shape[0], c), jnp.float32)

  return base.FedAlgorithm('knfu', init, client_update, server_update, public.own_model,
                           download, has_global_model=False, personalize=personalize,
                           heterogeneous=True)
