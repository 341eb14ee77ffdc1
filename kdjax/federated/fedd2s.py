"""FedD2S: personalized data-free federated distillation with deep-to-shallow layer dropping.

Clients keep their own models; no public or proxy data exists (data-free).
Two forms of the exchanged knowledge, ``knowledge=``:

``'heads'`` (the paper's form; the sweep's setting). The server holds *head models*
that turn a client's intermediate representations into soft labels; the
distillation runs both ways. A cohort client's round ``r``:

1. *Distil and train.* With the server's head ``g_s`` of the current cut
   ``s`` (see below), each of its examples ``x_i`` gets the soft label
   ``q_i = g_s(h_s(x_i))`` from its own representation ``h_s(x_i)`` at layer
   ``s`` (eval mode, before training; the representation it uploaded at its
   last report, since its model changes only when it trains). It trains on
   ``CE(z_i, y_i) + β · KD(z_i, q_i)`` (Hinton KD at ``temperature``); the
   target depends on the example, not only on its label. **Layer dropping:**
   the KD gradient reaches only layers of depth ``≤ d(r)``.
2. *Report.* It uploads, for ``reps_per_client`` of its examples (a seeded
   random subset; all of them when it holds fewer), the representation
   ``h_s(x_i)`` at the cut, its logits ``z_i`` and the label ``y_i``.

The server remembers every client's last report and, after each round,
trains the head of the current cut on the reports made at that cut with
``CE(g_s(h), y) + KD(g_s(h), z)`` (``head_steps`` full-batch Adam steps at
``head_lr``): the server head learns from every client, and each client
learns from it through the soft labels of its own examples. The cut is
``s(r) = min(d(r), D − 1)``: the representation entering the client's
classifier head at first, one layer shallower every ``drop_every`` rounds.
A server head ``g_s`` is a linear classifier on the (pooled) stage-``s``
features, one per stage. A client distils once the head of its cut has
been trained (round 1 on).

*Prediction.* A client's own model only distils toward the server head on
its own training examples, where the head is less accurate than the labels
the client already fits; what the head learned from the other clients
reaches new inputs only through :func:`ensemble_logits` (the client's
log-probabilities plus the head's on its own representation; FedGKT's
inference with the personal head kept), evaluated by
:func:`make_ensemble_evaluate` (docs/fed_baselines.md, "Update 2").

``'class_table'`` (kdjax's earlier data-free reading, kept for
heterogeneous architectures). Clients upload per-class sums of their logits
and counts; the server fuses, per client ``k``, the other clients' tables
with weights ``w_kj = softmax_j(γ · cos(n_k, n_j))`` of label-histogram
similarity:

.. math::

  T_k[c] = \\frac{\\sum_{j \\ne k} w_{kj} S_j[c]}{\\sum_{j \\ne k} w_{kj} n_j[c]},

and a client trains on ``CE + β · KD(z, T_k[y])``. Its target depends only
on the example's label: a per-class label smoothing, which cannot teach a
client about inputs it does not hold (docs/fed_baselines.md measures it).

**Deep-to-shallow schedule** (both forms). A model's layers are numbered by
depth ``1 … D`` (:func:`layer_depths`: the ``i``-th entry of a layer list —
``hidden``, ``convs``, ``norms`` — has depth ``i + 1``; ``head`` has depth
``D``). In round ``r`` (0-based) the distillation reaches the layers of depth
``≤ d(r) = max(D − ⌊r / drop_every⌋, min_depth)``; ``drop_every = 0``
disables dropping. ``drop_every`` is the paper's layer-dropping rate and the
layers deeper than ``min_depth`` its dropping set.

Sources and choices made: the arXiv abstract (arXiv:2402.10846) gives the
idea; the method summary (https://www.sciencestack.ai/paper/2402.10846:
"using head models to convert intermediate representations into soft
labels and enforcing KL-divergence and cross-entropy losses on both
distillation directions"; deeper layers progressively dropped from the
federation) gives the server heads. The paper's equations were not
available to us; ours are this reading, with the two-way mutual
distillation of FedGKT (He, Annavaram & Avestimehr, "Group Knowledge
Transfer", NeurIPS 2020) as the template: linear server heads per stage
(global-average pooled for convolutional stages), Adam on the server, the
subset of ``reps_per_client`` examples per report, the client computing its
soft labels with the downloaded head (the same numbers as the server
applying it to the uploaded representations), the round counter that
drives ``d(r)`` kept in the server state. ``'heads'`` needs one
architecture (``heterogeneous=False``).
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.federated import base
from kdjax.federated import public
from kdjax.federated.fd import class_table_kd
from kdjax.errors import UserError
from kdjax.federated.local import LocalTrainer
from kdjax.federated.local import epoch_orders
from kdjax.losses import kd

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


def _class_table_fedd2s(trainer: LocalTrainer, *, num_classes: int, beta: float = 1.0,
                        temperature: float = 1.0, gamma: float = 5.0, drop_every: int = 5,
                        min_depth: int = 1) -> base.FedAlgorithm:
  """FedD2S with per-class logit knowledge (``knowledge='class_table'``).

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
  >>> alg = fedd2s(make_local_trainer(apply, batch_size=2), num_classes=3, knowledge='class_table')
  >>> _, clients = alg.init(params, state, 5)
  >>> clients['teacher'].shape, alg.heterogeneous
  ((5, 3, 3), True)
  """
  c = int(num_classes)
  _check_schedule(drop_every, min_depth)
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


KNOWLEDGE = ('heads', 'class_table')


def _check_schedule(drop_every, min_depth) -> None:
  if int(min_depth) < 1:
    raise ValueError(f'min_depth must be >= 1, got {min_depth}')
  if int(drop_every) < 0:
    raise ValueError(f'drop_every must be >= 0, got {drop_every}')


def fedd2s(trainer: LocalTrainer, *, num_classes: int, knowledge: str = 'class_table',
           beta: float = 1.0, temperature: float = 1.0, gamma: float = 5.0,
           drop_every: int = 5, min_depth: int = 1, reps_per_client: int = 64,
           head_steps: int = 20, head_lr: float = 0.01,
           predict: str = 'ensemble') -> base.FedAlgorithm:
  """FedD2S with deep-to-shallow layer dropping (see the module docstring).

  Args:
    trainer: the local trainer (its learning rate, momentum, batch size and
      epochs; its optimizer is ``optax.sgd(lr, momentum)``).
    num_classes: the number of classes ``C``.
    knowledge: ``'class_table'`` (the default: per-class logit tables; any mix
      of architectures, so grouped heterogeneous runs use it) or ``'heads'``
      (server-side heads turn uploaded representations into per-example soft
      labels; the paper's form, one architecture; the sweep sets it).
    beta: weight ``β`` of the distillation term.
    temperature: KD temperature (both directions).
    gamma: ``'class_table'``: sharpness ``γ`` of the personalized weights.
    drop_every: rounds between two layer drops (0: no dropping).
    min_depth: the shallowest depth the distillation keeps reaching (≥ 1).
    reps_per_client: ``'heads'``: examples per report.
    head_steps: ``'heads'``: server Adam steps per round on each head.
    head_lr: ``'heads'``: the server heads' Adam learning rate.
    predict: ``'heads'``: a client's prediction, ``'ensemble'`` (the default: its
      model's log-probabilities plus the server head's on its own features,
      :func:`ensemble_logits`; the server's knowledge reaches the prediction) or
      ``'own'`` (its model alone: it only distils toward the heads on its own
      training examples, which does not beat local training;
      docs/fed_baselines.md).

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm` without a global model.
    ``'heads'``: the server state's ``extra`` holds ``round`` and the heads
    (``w`` ``[S, H, C]``, ``b`` ``[S, C]``, ``trained`` ``[S]``: ``S = D − 1``
    stages, ``H`` the widest stage); client states hold the model and the
    server's memory of the client's last report (``rep`` ``[M, H]``,
    ``logits`` ``[M, C]``, ``label`` ``[M]`` with ``-1`` on unused rows,
    ``stage``).

  Raises:
    UserError: an unknown ``knowledge``.

  References:
    Atapour, Seyedmohammadi, Abouei, Mohammadi & Plataniotis, "FedD2S:
    Personalized Data-Free Federated Knowledge Distillation", arXiv:2402.10846,
    2024; He, Annavaram & Avestimehr, "Group Knowledge Transfer: Federated
    Learning of Large CNNs at the Edge", NeurIPS 2020.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8, 6)))
  >>> alg = fedd2s(make_local_trainer(apply, batch_size=2), num_classes=3, knowledge='heads',
  ...              reps_per_client=4)
  >>> server, clients = alg.init(params, state, 5)
  >>> server.extra['w'].shape, clients['rep'].shape, alg.heterogeneous
  ((2, 8, 3), (5, 4, 8), False)
  """
  if knowledge == 'class_table':
    return _class_table_fedd2s(trainer, num_classes=num_classes, beta=beta,
                               temperature=temperature, gamma=gamma, drop_every=drop_every,
                               min_depth=min_depth)
  if knowledge != 'heads':
    raise UserError(f"fedd2s knowledge must be 'heads' or 'class_table', got {knowledge!r}; "
                    'set algorithm_options.knowledge.')
  if predict not in ('ensemble', 'own'):
    raise UserError(f"fedd2s predict must be 'ensemble' or 'own', got {predict!r}; "
                    'set algorithm_options.predict.')
  _check_schedule(drop_every, min_depth)
  c, m = int(num_classes), int(reps_per_client)
  apply = trainer.apply
  head_tx = optax.adam(float(head_lr))

  def init(params, model_state, num_clients):
    n = num_clients
    depth = num_layers(params)
    if depth < 2:
      raise UserError('fedd2s with server heads needs a model with at least one hidden '
                      "layer; use knowledge='class_table'.")
    width = _stage_width(params)
    extra = {'round': jnp.zeros((), jnp.int32),
             'w': jnp.zeros((depth - 1, width, c), jnp.float32),
             'b': jnp.zeros((depth - 1, c), jnp.float32),
             'trained': jnp.zeros((depth - 1,), bool)}
    clients = {'params': public.stack_for_clients(params, n),
               'model_state': public.stack_for_clients(model_state, n),
               'rep': jnp.zeros((n, m, width), jnp.float32),
               'logits': jnp.zeros((n, m, c), jnp.float32),
               'label': jnp.full((n, m), -1, jnp.int32),
               'stage': jnp.zeros((n,), jnp.int32)}
    return base.ServerState(params, model_state, optax.EmptyState(), extra), clients

  def client_update(server, client_state, data, rng):
    p, ms = client_state['params'], client_state['model_state']
    x, label, mask = data[0], data[1], data[2]
    depths = layer_depths(p)
    depth = int(max(jax.tree.leaves(depths)))
    d = kd_depth(server.extra['round'], depth, drop_every=drop_every, min_depth=min_depth)
    stage = current_stage(d, depth)
    grad_mask = jax.tree.map(lambda dep: (dep <= d).astype(jnp.float32), depths)
    width = server.extra['w'].shape[1]
    # Soft labels of every example from its representation at the cut (before training).
    reps = stage_features(apply(p, ms, x, train=False)[0].features, depth - 1, width)[stage]
    soft = soft_labels(server.extra['w'][stage], server.extra['b'][stage], reps)
    distil = server.extra['trained'][stage]

    def loss_extra(out, batch):
      where = jnp.logical_and(batch['mask'], distil)
      per = kd(out.logits, batch['soft'], temperature=temperature, where=where)
      w = where.astype(jnp.float32)
      return beta * jnp.sum(per * w) / jnp.maximum(jnp.sum(w), 1.0)

    res = trainer.train(p, ms, data, rng, batch_extra={'soft': soft}, loss_extra=loss_extra,
                        batch_loss_mask=grad_mask)
    params, model_state, metrics = res.params, res.model_state, res.metrics
    # The report: `m` examples (real ones first, in a seeded order).
    order = epoch_orders(jax.random.fold_in(rng, 7), mask, 1)[0]
    idx = order[:min(m, order.shape[0])]
    out = apply(params, model_state, x[idx], train=False)[0]
    rep = stage_features(out.features, depth - 1, width)[stage]
    lab = jnp.where(mask[idx], label[idx], -1)
    pad = m - idx.shape[0]
    report = {'rep': jnp.pad(rep, ((0, pad), (0, 0))),
              'logits': jnp.pad(out.logits.astype(jnp.float32), ((0, pad), (0, 0))),
              'label': jnp.pad(lab, (0, pad), constant_values=-1).astype(jnp.int32)}
    new_state = dict(client_state, params=params, model_state=model_state,
                     stage=stage.astype(jnp.int32), **report)
    # The update is what the client uploads; the server reads the per-client copies in
    # `server_distill`, the cohort average is not used.
    return base.ClientOutput(report, jnp.ones((), jnp.float32), new_state, metrics)

  def server_update(server, mean, info):
    del mean
    return server._replace(extra=dict(server.extra,
                                      round=jnp.asarray(info['round'], jnp.int32) + 1))

  def server_distill(server, clients):
    ex = server.extra
    depth = ex['w'].shape[0] + 1
    # The cut the round that just ended used (its round index is round - 1).
    stage = current_stage(kd_depth(ex['round'] - 1, depth, drop_every=drop_every,
                                   min_depth=min_depth), depth)
    at_cut = (clients['stage'] == stage)[:, None] & (clients['label'] >= 0)
    w, b = train_server_head(ex['w'][stage], ex['b'][stage], clients['rep'],
                             clients['logits'], clients['label'], at_cut, tx=head_tx,
                             steps=head_steps, temperature=temperature)
    trained = jnp.any(at_cut)
    extra = dict(ex, w=ex['w'].at[stage].set(jnp.where(trained, w, ex['w'][stage])),
                 b=ex['b'].at[stage].set(jnp.where(trained, b, ex['b'][stage])),
                 trained=ex['trained'].at[stage].set(ex['trained'][stage] | trained))
    return server._replace(extra=extra), clients

  def download(server):
    # The head of the client's cut.
    return (server.extra['w'][0], server.extra['b'][0])

  scores = None
  if predict == 'ensemble':
    scores = functools.partial(_ensemble_scores, trainer.apply, drop_every=drop_every,
                               min_depth=min_depth)
  return base.FedAlgorithm('fedd2s', init, client_update, server_update, public.own_model,
                           download, has_global_model=False, server_distill=server_distill,
                           personal_logits=scores)


def _ensemble_scores(apply, server, client_state, x, *, drop_every, min_depth):
  return ensemble_logits(apply, server, client_state, x, drop_every=drop_every,
                         min_depth=min_depth)


def ensemble_logits(apply, server: base.ServerState, client_state, x, *, drop_every: int = 5,
                    min_depth: int = 1) -> jax.Array:
  """A ``'heads'`` client's prediction with the server's knowledge: its own log-probabilities
  plus those of the server head on its own representation at the cut.

  ``log softmax(z(x)) + log softmax(g_s(h_s(x)))`` (a product of the two experts), ``s`` the
  cut of the round that last ran (the head :func:`fedd2s` trained last); only the client's
  term while that head is untrained. The client's own model alone never sees what the server
  head learned from the other clients (it only distils toward the head on its own training
  examples); this prediction is FedGKT's inference — the server model on the client's
  features — with the client's personal head kept as the second expert
  (docs/fed_baselines.md measures both).

  Args:
    apply: the client model's functional apply.
    server: the ``'heads'`` server state (``extra``: ``round``, ``w``, ``b``, ``trained``).
    client_state: one client's state (``params``, ``model_state``).
    x: ``[B, ...]`` inputs.
    drop_every: the algorithm's ``drop_every``.
    min_depth: the algorithm's ``min_depth``.

  Returns:
    ``[B, C]`` float32 scores (their arg-max is the prediction).

  References:
    He, Annavaram & Avestimehr, "Group Knowledge Transfer: Federated Learning of Large
    CNNs at the Edge", NeurIPS 2020 (inference by the server model on client features).

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8, 6)))
  >>> alg = fedd2s(make_local_trainer(apply, batch_size=2), num_classes=3, knowledge='heads')
  >>> server, clients = alg.init(params, state, 2)
  >>> ensemble_logits(apply, server, jax.tree.map(lambda a: a[0], clients), jnp.ones((5, 4))).shape
  (5, 3)
  """
  ex = server.extra
  depth, width = ex['w'].shape[0] + 1, ex['w'].shape[1]
  stage = current_stage(kd_depth(jnp.maximum(ex['round'] - 1, 0), depth, drop_every=drop_every,
                                 min_depth=min_depth), depth)
  out = apply(client_state['params'], client_state['model_state'], x, train=False)[0]
  own = jax.nn.log_softmax(out.logits.astype(jnp.float32))
  reps = stage_features(out.features, depth - 1, width)[stage]
  q = jax.nn.log_softmax(soft_labels(ex['w'][stage], ex['b'][stage], reps))
  return own + jnp.where(ex['trained'][stage], q, 0.0)


def make_ensemble_evaluate(apply, *, drop_every: int = 5, min_depth: int = 1):
  """``evaluate(state, test) -> (correct [N], count [N])``, jitted: every client's
  :func:`ensemble_logits` on its own local test split (``label == -1`` is padding).

  ``state`` is a :class:`~kdjax.federated.simulator.SimState` of :func:`fedd2s` with
  ``knowledge='heads'``; ``test`` the packed local test splits. Feed the counts to
  :func:`kdjax.federated.simulator.personalized_summary`.
  """
  def one(server, cstate, x, label):
    pred = jnp.argmax(ensemble_logits(apply, server, cstate, x, drop_every=drop_every,
                                      min_depth=min_depth), -1)
    valid = label >= 0
    return jnp.sum(jnp.logical_and(pred == label, valid)), jnp.sum(valid)

  def evaluate(state, test):
    clients = {'params': state.clients['params'], 'model_state': state.clients['model_state']}
    return jax.lax.map(lambda a: one(state.server, *a), (clients, test.x, test.label))

  return jax.jit(evaluate)


def current_stage(d, depth: int):
  """The 0-based stage index of the cut: ``min(d, D − 1) − 1`` (stage ``s`` is the
  output of the ``s``-th layer; the head's input is stage ``D − 1``).

  >>> [int(current_stage(d, 3)) for d in (3, 2, 1)]
  [1, 1, 0]
  """
  return jnp.minimum(jnp.asarray(d, jnp.int32), depth - 1) - 1


def stage_features(features: dict, num_stages: int, width: int) -> jax.Array:
  """``[S, B, width]``: the ``stage1 … stageS`` features, each averaged over its middle
  (spatial) axes, in float32, zero-padded to ``width``.

  >>> f = {'stage1': jnp.ones((2, 5, 3)), 'stage2': jnp.ones((2, 4))}
  >>> stage_features(f, 2, 4)[:, 0].tolist()
  [[1.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0]]
  """
  out = []
  for i in range(num_stages):
    h = features[f'stage{i + 1}'].astype(jnp.float32)
    if h.ndim > 2:
      h = jnp.mean(h, axis=tuple(range(1, h.ndim - 1)))
    out.append(jnp.pad(h, ((0, 0), (0, width - h.shape[-1]))))
  return jnp.stack(out)


def _stage_width(params) -> int:
  """The widest stage: the largest last axis of a parameter of a layer below the head."""
  depths = layer_depths(params)
  top = max(jax.tree.leaves(depths))
  return int(max(np.shape(a)[-1] for a, d in zip(jax.tree.leaves(params),
                                                   jax.tree.leaves(depths))
                 if d < top and np.ndim(a) >= 1))


def soft_labels(w: jax.Array, b: jax.Array, reps: jax.Array) -> jax.Array:
  """A server head's soft labels (logits) ``reps @ w + b`` of ``[..., H]`` representations.

  >>> soft_labels(jnp.eye(2), jnp.ones(2), jnp.array([[1., 2.]])).tolist()
  [[2.0, 3.0]]
  """
  return reps @ w + b


def head_loss(w, b, reps, logits, labels, where, *, temperature: float = 1.0) -> jax.Array:
  """The server head's loss: mean over ``where`` of ``CE(g(h), y) + KD(g(h), z)``.

  ``g(h) = h @ w + b``; ``KD`` is Hinton's (:func:`kdjax.losses.kd`, the client's logits
  ``z`` as teacher).
  """
  u = soft_labels(w, b, reps)
  ce = -jnp.take_along_axis(jax.nn.log_softmax(u), jnp.maximum(labels, 0)[..., None], -1)[..., 0]
  per = ce + kd(u, logits, temperature=temperature, where=where)
  wt = where.astype(jnp.float32)
  return jnp.sum(per * wt) / jnp.maximum(jnp.sum(wt), 1.0)


def train_server_head(w, b, reps, logits, labels, where, *, tx, steps: int,
                      temperature: float = 1.0):
  """``steps`` full-batch steps of ``tx`` on :func:`head_loss` from ``(w, b)``; ``(w, b)``."""
  grad = jax.grad(lambda p: head_loss(p[0], p[1], reps, logits, labels, where,
                                      temperature=temperature))

  def body(carry, _):
    p, opt = carry
    updates, opt = tx.update(grad(p), opt, p)
    return (optax.apply_updates(p, updates), opt), None

  (p, _), _ = jax.lax.scan(body, ((w, b), tx.init((w, b))), None, length=int(steps))
  return p
