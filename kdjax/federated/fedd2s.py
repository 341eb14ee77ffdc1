"""FedD2S: personalized data-free federated distillation with deep-to-shallow layer dropping.

Clients keep their own models; no public or proxy data exists (data-free). A
cohort client's round:

1. *Distil and train.* It trains on its private data with
   ``CE + β · KD(z, t_y)``, where ``t_y`` is row ``y`` (the example's label) of
   the personalized teacher table ``T_k`` the server last sent it (the term is
   left out for classes its teacher has no knowledge of). **Layer dropping:**
   the gradient of the KD term reaches only the client's layers of depth
   ``≤ d(r)``; deeper layers are trained by the CE term alone and so keep
   the client's personal knowledge.
2. *Report.* For every class ``c`` it uploads the sum ``S_k[c]`` of its
   model's logits (eval mode, after training) over its local examples of class
   ``c`` and their count ``n_k[c]`` — a ``[C, C]`` table and a ``[C]`` vector,
   whatever the architecture, so clients of different architectures exchange
   the same knowledge (:mod:`kdjax.federated.groups`).

**Personalized server aggregation.** The server remembers every client's last
report. For client ``k`` it weighs the other reported clients ``j ≠ k`` by
how similar their label histograms are,
``w_kj = softmax_j(γ · cos(n_k, n_j))``, and fuses their knowledge per class:

.. math::

  T_k[c] = \\frac{\\sum_{j \\ne k} w_{kj} S_j[c]}{\\sum_{j \\ne k} w_{kj} n_j[c]}.

``γ = 0`` gives every other client the same weight: FD's per-class average
without the client's own contribution. A client receives ``T_k`` once it has
reported itself (before that it has no histogram and trains on CE alone).

**Deep-to-shallow schedule.** A model's layers are numbered by depth
``1 … D`` (:func:`layer_depths`: the ``i``-th entry of a layer list —
``hidden``, ``convs``, ``norms`` — has depth ``i + 1``; ``head`` has depth
``D``). In round ``r`` (0-based) the distillation reaches the layers of depth
``≤ d(r) = max(D − ⌊r / drop_every⌋, min_depth)``: at first every layer
learns from the federation; every ``drop_every`` rounds the deepest layer
still taking part drops out, down to ``min_depth``. ``drop_every = 0``
disables dropping (every layer distils in every round). ``drop_every`` is
the paper's layer-dropping rate and the layers deeper than ``min_depth`` its
dropping set. With several architectures, ``D`` is each architecture's own.

Choices made (this is our reading; the seed paper's abstract gives the idea,
not the equations): the paper's server-side heads, which turn uploaded
intermediate representations into soft labels, are replaced by per-class
logit knowledge (nothing example-level leaves a client, and heterogeneous
architectures share one knowledge space); layer dropping is applied to which
client layers the distillation gradient trains; the personalization weights
use label-histogram cosine similarity; the KD distance is Hinton's KD at
``temperature`` (:func:`kdjax.losses.kd`); the round counter that drives
``d(r)`` is kept in the server state.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import optax

from kdjax.federated import base
from kdjax.federated import public
from kdjax.federated.fd import class_table_kd
from kdjax.federated.local import LocalTrainer

# Layer lists whose ``i``-th entry is the ``(i + 1)``-th layer of a kdjax model.
LAYER_LISTS = ('hidden', 'convs', 'norms', 'blocks', 'layers', 'stages')


def _key_name(k) -> Any:
  for attr in ('key', 'idx', 'name'):
    if hasattr(k, attr):
      return getattr(k, attr)
  return k


def layer_depths(params) -> Any:
  """A params-shaped pytree of int depths ``1 … D`` (see the module docstring).

  Leaves under ``head`` get the largest depth ``D`` (one more than the
  deepest layer-list entry); leaves outside any layer list and the head get
  depth 1.

  >>> from kdjax.models import create, functional
  >>> _, p, _ = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8, 6)))
  >>> d = layer_depths(p)
  >>> int(d['hidden'][0]['kernel']), int(d['hidden'][1]['kernel']), int(d['head']['kernel'])
  (1, 2, 3)
  """
  flat, treedef = jax.tree_util.tree_flatten_with_path(params)
  raw = []
  for path, _ in flat:
    names = [_key_name(k) for k in path]
    depth = 1
    if names and names[0] == 'head':
      depth = None
    elif len(names) > 1 and names[0] in LAYER_LISTS and isinstance(names[1], int):
      depth = names[1] + 1
    raw.append(depth)
  deepest = max([d for d in raw if d is not None], default=0) + 1
  return jax.tree_util.tree_unflatten(treedef, [deepest if d is None else d for d in raw])


def num_layers(params) -> int:
  """``D``: the depth of the deepest layer (the head)."""
  return int(max(jax.tree.leaves(layer_depths(params))))


def kd_depth(round_index, num_layers: int, *, drop_every: int, min_depth: int = 1):
  """``d(r) = max(D − ⌊r / drop_every⌋, min_depth)`` (``D`` when ``drop_every = 0``).

  >>> [int(kd_depth(r, 4, drop_every=2, min_depth=2)) for r in range(7)]
  [4, 4, 3, 3, 2, 2, 2]
  """
  if not drop_every:
    return jnp.asarray(num_layers, jnp.int32)
  r = jnp.asarray(round_index, jnp.int32)
  return jnp.maximum(num_layers - r // int(drop_every), min(int(min_depth), num_layers))


def personalized_teachers(sums: jax.Array, counts: jax.Array, reported: jax.Array, *,
                          gamma: float) -> tuple[jax.Array, jax.Array]:
  """Every client's fused teacher table from the server's memory of reports.

  Args:
    sums: ``[N, C, C]`` per-class logit sums ``S_j``.
    counts: ``[N, C]`` per-class example counts ``n_j``.
    reported: ``[N]`` bool, clients whose report the server holds.
    gamma: sharpness ``γ`` of the similarity weights.

  Returns:
    ``(teachers [N, C, C], known [N, C])``: ``T_k`` and whether class ``c``
    has any knowledge for client ``k`` (rows of a client without a report are
    all unknown).

  >>> s = jnp.array([[[2., 0.], [0., 0.]], [[4., 0.], [0., 6.]]])
  >>> n = jnp.array([[1., 0.], [2., 3.]])
  >>> t, ok = personalized_teachers(s, n, jnp.array([True, True]), gamma=0.0)
  >>> t[0].tolist(), ok.tolist()
  ([[2.0, 0.0], [0.0, 2.0]], [[True, True], [True, False]])
  """
  n = counts.shape[0]
  norm = jnp.sqrt(jnp.sum(counts ** 2, -1))
  cos = (counts @ counts.T) / jnp.maximum(norm[:, None] * norm[None, :], 1e-12)
  ok = jnp.logical_and(jnp.logical_and(reported[:, None], reported[None, :]),
                       ~jnp.eye(n, dtype=bool))
  logits = jnp.where(ok, gamma * cos, -jnp.inf)
  has = jnp.any(ok, axis=1, keepdims=True)
  w = jnp.where(ok, jax.nn.softmax(jnp.where(has, logits, 0.0), axis=1), 0.0)
  num = jnp.einsum('kj,jcd->kcd', w, sums)
  den = w @ counts
  known = den > 0
  return num / jnp.maximum(den, 1e-12)[..., None], known


def fedd2s(trainer: LocalTrainer, *, num_classes: int, beta: float = 1.0,
           temperature: float = 1.0, gamma: float = 5.0, drop_every: int = 5,
           min_depth: int = 1) -> base.FedAlgorithm:
  """FedD2S with per-class logit knowledge and deep-to-shallow layer dropping.

  Args:
    trainer: the local trainer.
    num_classes: the number of classes ``C``.
    beta: weight ``β`` of the distillation term.
    temperature: KD temperature.
    gamma: sharpness ``γ`` of the personalized aggregation weights.
    drop_every: rounds between two layer drops (0: no dropping).
    min_depth: the shallowest depth the distillation keeps reaching (≥ 1).

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm` without a global model,
    usable with heterogeneous client architectures. Client states hold the
    model (``params``, ``model_state``) and the server's memory of the client
    (``sum``, ``count``, ``reported``) and its teacher (``teacher``,
    ``known``).

  References:
    Atapour, Seyedmohammadi, Abouei, Mohammadi & Plataniotis, "FedD2S:
    Personalized Data-Free Federated Knowledge Distillation", arXiv:2402.10846,
    2024.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8,)))
  >>> alg = fedd2s(make_local_trainer(apply, batch_size=2), num_classes=3)
  >>> _, clients = alg.init(params, state, 5)
  >>> clients['teacher'].shape, alg.heterogeneous
  ((5, 3, 3), True)
  """
  c = int(num_classes)
  if int(min_depth) < 1:
    raise ValueError(f'min_depth must be >= 1, got {min_depth}')
  if int(drop_every) < 0:
    raise ValueError(f'drop_every must be >= 0, got {drop_every}')
  apply = trainer.apply

  def init(params, model_state, num_clients):
    n = num_clients
    clients = {'params': public.stack_for_clients(params, n),
               'model_state': public.stack_for_clients(model_state, n),
               'sum': jnp.zeros((n, c, c), jnp.float32),
               'count': jnp.zeros((n, c), jnp.float32),
               'reported': jnp.zeros((n,), bool),
               'teacher': jnp.zeros((n, c, c), jnp.float32),
               'known': jnp.zeros((n, c), bool)}
    extra = {'round': jnp.zeros((), jnp.int32)}
    return base.ServerState(params, model_state, optax.EmptyState(), extra), clients

  def client_update(server, client_state, data, rng):
    p = client_state['params']
    table, known = client_state['teacher'], client_state['known']
    depths = layer_depths(p)
    d = kd_depth(server.extra['round'], int(max(jax.tree.leaves(depths))),
                 drop_every=drop_every, min_depth=min_depth)
    grad_mask = jax.tree.map(lambda dep: (dep <= d).astype(jnp.float32), depths)

    batch_loss = class_table_kd(table, known, beta=beta, temperature=temperature)
    res = trainer.train(p, client_state['model_state'], data, rng, batch_loss=batch_loss,
                        batch_loss_mask=grad_mask)
    x, label, mask = data[0], data[1], data[2]
    logits = public.public_logits(apply, res.params, res.model_state, x)
    onehot = jax.nn.one_hot(jnp.maximum(label, 0), c) * jnp.logical_and(
        mask, label >= 0)[:, None]
    update = {'sum': onehot.T @ logits, 'count': jnp.sum(onehot, 0)}
    new_state = dict(client_state, params=res.params, model_state=res.model_state,
                     sum=update['sum'], count=update['count'], reported=jnp.ones((), bool))
    # The update is what the client uploads; the server reads the per-client copies in
    # `personalize`, the cohort average is not used.
    return base.ClientOutput(update, jnp.ones((), jnp.float32), new_state, res.metrics)

  def server_update(server, mean, info):
    del mean
    return server._replace(extra={'round': jnp.asarray(info['round'], jnp.int32) + 1})

  def personalize(server, clients):
    del server
    teacher, known = personalized_teachers(clients['sum'], clients['count'],
                                           clients['reported'], gamma=gamma)
    return dict(clients, teacher=teacher, known=known)

  def download(server):
    del server
    return jax.ShapeDtypeStruct((c, c), jnp.float32)

  return base.FedAlgorithm('fedd2s', init, client_update, server_update, public.own_model,
                           download, has_global_model=False, personalize=personalize,
                           heterogeneous=True)
