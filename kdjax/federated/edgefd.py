"""EdgeFD: federated distillation with client-side KMeans filtering of proxy data.

Clients keep their own models and share an unlabeled proxy set. Each client
decides which proxy examples are *in distribution* for it with a cheap
KMeans density-ratio proxy, and shares its logits only on those; the server
averages, per proxy example, over the clients that shared it — no
server-side filtering. A cohort client's round: distill toward the current
averaged logits on the proxy examples that have any (KD), train on its
private data, then filter and report.

Filtering (our reading of the paper's KMeans estimator; the details are our
choice): ``num_clusters`` centroids are fitted to the client's flattened
local inputs by ``kmeans_iters`` Lloyd iterations (seeded initialisation
among its real examples); a proxy example is in distribution when its
distance to the nearest centroid is at most the ``quantile`` of the client's
own examples' distances — the region where the local density is at least
what the client sees on most of its data. The one-round lag of
:mod:`kdjax.federated.fedmd` applies (the averaged logits come from the
previous cohort).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated import public
from kdjax.federated.local import LocalTrainer


def kmeans(x: jax.Array, mask: jax.Array, num_clusters: int, iters: int,
           rng: jax.Array) -> jax.Array:
  """``[num_clusters, d]`` centroids of the rows of ``x`` where ``mask`` (Lloyd's algorithm).

  Initial centroids are distinct real rows drawn by ``rng``; an empty cluster
  keeps its previous centroid.

  >>> x = jnp.array([[0.0], [0.1], [5.0], [5.1]])
  >>> c = kmeans(x, jnp.ones(4, bool), 2, 5, jax.random.key(0))
  >>> sorted(round(float(v), 2) for v in c[:, 0])
  [0.05, 5.05]
  """
  n = x.shape[0]
  p = mask.astype(jnp.float32) / jnp.maximum(jnp.sum(mask), 1)
  start = jax.random.choice(rng, n, (num_clusters,), replace=False, p=p)
  w = mask.astype(x.dtype)

  def step(c, _):
    d = jnp.sum((x[:, None, :] - c[None]) ** 2, -1)
    assign = jax.nn.one_hot(jnp.argmin(d, -1), num_clusters, dtype=x.dtype) * w[:, None]
    size = jnp.sum(assign, 0)
    new = (assign.T @ x) / jnp.maximum(size, 1.0)[:, None]
    return jnp.where(size[:, None] > 0, new, c), None

  c, _ = jax.lax.scan(step, x[start], None, length=iters)
  return c


def in_distribution(x, mask, proxy, *, num_clusters: int, iters: int, quantile: float,
                    rng) -> jax.Array:
  """``[P]`` bool: proxy rows within the client's ``quantile`` nearest-centroid distance."""
  xf = x.reshape(x.shape[0], -1).astype(jnp.float32)
  pf = proxy.reshape(proxy.shape[0], -1).astype(jnp.float32)
  k = min(int(num_clusters), x.shape[0])
  c = kmeans(xf, mask, k, iters, rng)
  own = jnp.min(jnp.sum((xf[:, None] - c[None]) ** 2, -1), -1)
  own = jnp.sort(jnp.where(mask, own, jnp.inf))
  n = jnp.sum(mask.astype(jnp.int32))
  radius = own[jnp.clip(jnp.floor(quantile * (n - 1)).astype(jnp.int32), 0, x.shape[0] - 1)]
  dist = jnp.min(jnp.sum((pf[:, None] - c[None]) ** 2, -1), -1)
  return dist <= radius


def edgefd(trainer: LocalTrainer, proxy_x, *, num_clusters: int = 5, kmeans_iters: int = 10,
           quantile: float = 0.95, distill_epochs: int = 1, distill_batch_size: int = 32,
           distill_lr: float | None = None, temperature: float = 1.0) -> base.FedAlgorithm:
  """EdgeFD with KMeans proxy filtering.

  Args:
    trainer: the local trainer.
    proxy_x: ``[P, ...]`` unlabeled proxy inputs.
    num_clusters: KMeans clusters per client.
    kmeans_iters: Lloyd iterations.
    quantile: the in-distribution radius as a quantile of the client's own
      nearest-centroid distances.
    distill_epochs: passes over the proxy set per round.
    distill_batch_size: proxy minibatch size.
    distill_lr: distillation SGD learning rate (default: the trainer's).
    temperature: KD temperature.

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm` without a global model.

  References:
    Mujtaba et al., "Federated Distillation on Edge Devices: Efficient
    Client-Side Filtering for Non-IID Data", FLTA 2025 (arXiv:2508.14769).

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8,)))
  >>> edgefd(make_local_trainer(apply, batch_size=2), jnp.zeros((6, 4))).name
  'edgefd'
  """
  proxy_x = jnp.asarray(proxy_x)
  apply = trainer.apply
  distill = public.make_public_trainer(
      apply, batch_size=distill_batch_size, epochs=distill_epochs,
      lr=trainer.lr if distill_lr is None else distill_lr, loss='kd', temperature=temperature)

  def init(params, model_state, num_clients):
    shape = jax.eval_shape(lambda: public.public_logits(apply, params, model_state, proxy_x))
    extra = {'logits': jnp.zeros(shape.shape, jnp.float32),
             'seen': jnp.zeros(shape.shape[:1], bool)}
    server = base.ServerState(params, model_state, optax.EmptyState(), extra)
    clients = {'params': public.stack_for_clients(params, num_clients),
               'model_state': public.stack_for_clients(model_state, num_clients)}
    return server, clients

  def client_update(server, client_state, data, rng):
    seen = server.extra['seen']
    res = public.public_then_local(distill, trainer, client_state, proxy_x,
                                   server.extra['logits'], data, rng, ready=jnp.any(seen),
                                   mask=seen)
    keep = in_distribution(data[0], data[2], proxy_x, num_clusters=num_clusters,
                           iters=kmeans_iters, quantile=quantile,
                           rng=jax.random.fold_in(rng, 8))
    logits = public.public_logits(apply, res.params, res.model_state, proxy_x)
    update = {'sum': logits * keep[:, None], 'count': keep.astype(jnp.float32)}
    return base.ClientOutput(update, jnp.ones((), jnp.float32),
                             {'params': res.params, 'model_state': res.model_state},
                             res.metrics)

  def server_update(server, mean, info):
    del info
    has = mean['count'] > 0
    logits = jnp.where(has[:, None], mean['sum'] / jnp.maximum(mean['count'], 1e-12)[:, None],
                       server.extra['logits'])
    return server._replace(extra={'logits': logits,
                                  'seen': jnp.logical_or(server.extra['seen'], has)})

  def download(server):
    return server.extra['logits']

  return base.FedAlgorithm('edgefd', init, client_update, server_update, public.own_model,
                           download, has_global_model=False, heterogeneous=True)
