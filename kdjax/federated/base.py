"""The shape of a federated algorithm: three pure functions, optax style.

An algorithm is a :class:`FedAlgorithm`:

* ``init(params, model_state, num_clients) -> (server_state, client_states)``;
  ``client_states`` is a pytree whose leaves have a leading ``[num_clients]``
  axis (SCAFFOLD's control variates, Ditto's personal models, FedBN's local
  normalisation layers), or ``{}`` for stateless clients.
* ``client_update(server_state, client_state, data, rng) -> ClientOutput``:
  one client's round. The simulator ``vmap``s it over the cohort.
* ``server_update(server_state, mean_update, info) -> server_state``: given
  the weighted mean of the cohort's ``ClientOutput.update`` (weights
  ``ClientOutput.weight``, zero for clients that dropped out) and ``info``
  (``num_reported``, ``num_clients``, ``cohort_size``, ``round`` as arrays).
* ``personal(server_state, client_state) -> (params, model_state)``: the model
  a client would evaluate on its local test split (the global model for
  non-personalized algorithms).
* ``download(server_state)``: the pytree a cohort client receives (for the
  bytes-down count).
* ``personalize(server_state, client_states) -> client_states`` (optional):
  run by the server after ``server_update`` over *all* stacked client states,
  for algorithms that send each client its own message (KnFu's personalized
  fused knowledge). The client states then also hold the server's memory of
  each client's last report.
* ``finetune(server_state, client_state, data, rng) -> (params, model_state)``
  (optional): the model a client evaluates on its local test split, given its
  packed *training* split (FedAvg + fine-tuning of the final global model).
  When set, the personalized evaluation
  (:func:`kdjax.federated.simulator.make_personal_evaluate`) calls it for
  every client, vmapped, instead of ``personal``; nothing it returns is kept.
* ``server_distill(server_state, client_states) -> (server_state, client_states)``
  (optional): run by the server after ``personalize`` over all stacked client
  states, for algorithms whose server *trains* on the clients' stored reports
  (FedD2S's server-side heads) and sends each client its own message. Only
  single-architecture runs call it (:mod:`kdjax.federated.groups` does not).
* ``personal_logits(server_state, client_state, x) -> [B, C]`` (optional): a
  client's scores for inputs ``x`` when its prediction is more than one model's
  output (FedD2S's client head combined with the server's head on the client's
  features). When set, the personalized evaluation and the clients' global-test
  evaluation score its arg-max instead of ``personal``'s model.
* ``has_global_model``: False for federated distillation algorithms without
  a server model (FD, FedMD, DS-FL); their "global accuracy" is then the mean
  accuracy of the client models on the global test set.
* ``heterogeneous``: True when clients may use different architectures
  (:mod:`kdjax.federated.groups`): the knowledge exchanged lives in logit
  space, so the updates of every architecture group have the same shapes and
  are averaged together. Parameter-averaging algorithms leave it False.
* ``group_keys``: keys of the update dict that are averaged within an
  architecture group only (FedDF's parameter deltas, averaged into one server
  model per architecture); every other key is averaged over all groups.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kdjax.errors import UserError


class ServerState(NamedTuple):
  """The server's state: the global model and the server optimizer.

  Attributes:
    params: global trainable parameters.
    model_state: global non-trainable model state (e.g. batch statistics).
    opt_state: the server optimizer's state.
    extra: algorithm-specific server state (SCAFFOLD's control variate, ...).
  """

  params: Any
  model_state: Any
  opt_state: Any
  extra: Any


class ClientOutput(NamedTuple):
  """One client's contribution to a round.

  Attributes:
    update: a pytree, averaged over the cohort with ``weight``.
    weight: scalar aggregation weight (usually the client's example count).
    client_state: the client's new persistent state (``{}`` if none).
    metrics: per-client ``(sum, count)`` training metrics.
  """

  update: Any
  weight: jax.Array
  client_state: Any
  metrics: dict


class FedAlgorithm(NamedTuple):
  """A federated algorithm as pure functions (see the module docstring)."""

  name: str
  init: Callable[..., tuple[ServerState, Any]]
  client_update: Callable[..., ClientOutput]
  server_update: Callable[..., ServerState]
  personal: Callable[..., tuple[Any, Any]]
  download: Callable[[ServerState], Any]
  has_global_model: bool = True
  personalize: Callable[[ServerState, Any], Any] | None = None
  heterogeneous: bool = False
  group_keys: tuple[str, ...] = ()
  finetune: Callable[..., tuple[Any, Any]] | None = None
  server_distill: Callable[[ServerState, Any], tuple[ServerState, Any]] | None = None
  personal_logits: Callable[[ServerState, Any, Any], Any] | None = None


def global_model(server: ServerState, client_state: Any = None) -> tuple[Any, Any]:
  """``personal`` of non-personalized algorithms: the global model."""
  del client_state
  return server.params, server.model_state


def download_params(server: ServerState) -> Any:
  """What a client downloads in FedAvg-like algorithms: the global model."""
  return (server.params, server.model_state)


def tree_sub(a, b):
  """``a - b`` leafwise."""
  return jax.tree.map(jnp.subtract, a, b)


def tree_sq_norm(a) -> jax.Array:
  """Sum of squares of every leaf.

  >>> float(tree_sq_norm({'a': jnp.array([3.0]), 'b': jnp.array(4.0)}))
  25.0
  """
  return sum(jnp.sum(jnp.square(x)) for x in jax.tree.leaves(a))


def is_float(x) -> bool:
  return jnp.issubdtype(jnp.result_type(x), jnp.floating)


def float_leaves(tree):
  """``tree`` with every non-float leaf (RNG keys and counters) replaced by a float zero.

  The weighted mean of model states then averages batch statistics and
  leaves the rest to :func:`merge_float_leaves`.
  """
  return jax.tree.map(lambda a: a if is_float(a) else jnp.zeros((), jnp.float32), tree)


def merge_float_leaves(old, new_floats):
  """Takes the float leaves of ``new_floats``, keeping ``old``'s other leaves."""
  return jax.tree.map(lambda o, n: n.astype(o.dtype) if is_float(o) else o, old, new_floats)


def server_step(tx: optax.GradientTransformation, params, opt_state, delta):
  """Applies the server optimizer to the pseudo-gradient ``-delta``.

  With ``optax.sgd(1.0)`` this is ``params + delta`` (FedAvg).

  Args:
    tx: the server optimizer.
    params: global parameters.
    opt_state: its state.
    delta: the aggregated client change ``mean_i(w_i) - w``.

  Returns:
    ``(params, opt_state)``.

  References:
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

  >>> p, _ = server_step(optax.sgd(1.0), jnp.ones(2), optax.sgd(1.0).init(jnp.ones(2)), jnp.full(2, 0.5))
  >>> p.tolist()
  [1.5, 1.5]
  """
  grads = jax.tree.map(jnp.negative, delta)
  updates, opt_state = tx.update(grads, opt_state, params)
  return optax.apply_updates(params, updates), opt_state


def server_optimizer(name: str = 'sgd', *, lr: float = 1.0, momentum: float = 0.9,
                     b1: float = 0.9, b2: float = 0.99,
                     eps: float = 1e-3) -> optax.GradientTransformation:
  """The named server optimizers of adaptive federated optimization.

  * ``'sgd'``: ``optax.sgd(lr)``; ``lr=1`` is FedAvg.
  * ``'momentum'``: ``optax.sgd(lr, momentum)`` — FedAvgM (Hsu et al. 2019).
  * ``'adam'``: ``optax.adam(lr, b1, b2, eps)`` — FedAdam (Reddi et al. 2021;
    ``eps`` is their adaptivity τ; optax's Adam applies bias correction, the
    paper's pseudo-code does not).
  * ``'yogi'``: ``optax.yogi(lr, b1, b2, eps)`` — FedYogi.
  * ``'adagrad'``: ``optax.adagrad(lr, eps=eps)`` — FedAdagrad.

  Args:
    name: one of the above.
    lr: server learning rate.
    momentum: FedAvgM momentum.
    b1: first-moment decay (adam, yogi).
    b2: second-moment decay (adam, yogi).
    eps: adaptivity τ.

  Returns:
    An ``optax.GradientTransformation``.

  >>> server_optimizer('momentum', lr=1.0, momentum=0.9) is not None
  True
  """
  if name == 'sgd':
    return optax.sgd(lr)
  if name == 'momentum':
    return optax.sgd(lr, momentum)
  if name == 'adam':
    return optax.adam(lr, b1=b1, b2=b2, eps=eps)
  if name == 'yogi':
    return optax.yogi(lr, b1=b1, b2=b2, eps=eps)
  if name == 'adagrad':
    return optax.adagrad(lr, eps=eps)
  raise UserError(f"unknown server optimizer {name!r}; use sgd, momentum, adam, yogi or adagrad.")


def client_data_fields(data):
  """``(x, label, mask, count)`` of one client's packed data."""
  return data[0], data[1], data[2], data[3]
