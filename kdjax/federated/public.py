"""Pieces shared by the federated distillation algorithms that use public data.

FedMD and DS-FL exchange predictions on a shared public (or open, unlabeled)
set instead of weights. :func:`make_public_trainer` trains a client model
toward soft targets on that set; :func:`public_logits` evaluates a model on
it. Both are pure and vmappable over clients.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax


def public_logits(apply_fn, params, model_state, x) -> jax.Array:
  """``[P, classes]`` float32 logits of a model on the public inputs (eval mode)."""
  out, _ = apply_fn(params, model_state, x, train=False)
  return out.logits.astype(jnp.float32)


def make_public_trainer(apply_fn: Callable[..., Any], *, batch_size: int, epochs: int = 1,
                        lr: float = 0.05, loss: str = 'kd',
                        temperature: float = 1.0) -> Callable:
  """``train(params, model_state, x, targets, rng, mask=None) -> (params, model_state)``.

  Plain SGD over ``epochs`` shuffled passes of ``floor(P / batch_size)`` full
  batches of the public set (the remainder of each pass dropped). ``mask``
  (``[P]`` bool) leaves examples out: the loss is the mean over the batch's
  unmasked examples, and a batch without any leaves the model unchanged.

  Args:
    apply_fn: the model's pure apply.
    batch_size: public minibatch size.
    epochs: passes over the public set.
    lr: SGD learning rate.
    loss: ``'kd'`` (Hinton KD from target logits, :func:`kdjax.losses.kd`),
      ``'soft_ce'`` (cross-entropy with target *probabilities*, DS-FL) or
      ``'l1'`` (mean absolute error between logits, FedMD's digest).
    temperature: the KD temperature.

  Returns:
    The pure train function.

  >>> from kdjax.models import create, functional
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8,)))
  >>> train = make_public_trainer(apply, batch_size=2, loss='l1')
  >>> p, _ = jax.jit(train)(params, state, jnp.ones((5, 4)), jnp.zeros((5, 3)), jax.random.key(0))
  >>> jax.tree.structure(p) == jax.tree.structure(params)
  True
  """
  from kdjax.losses import kd

  tx = optax.sgd(lr)
  if loss not in ('kd', 'soft_ce', 'l1'):
    raise ValueError(f"public-data loss must be 'kd', 'soft_ce' or 'l1', got {loss!r}")

  def objective(logits, targets, w):
    if loss == 'kd':
      per = kd(logits, targets, temperature=temperature)
    elif loss == 'soft_ce':
      per = -jnp.sum(targets * jax.nn.log_softmax(logits), -1)
    else:
      per = jnp.mean(jnp.abs(logits - targets), -1)
    return jnp.sum(jnp.where(w > 0, per, 0.0)) / jnp.maximum(jnp.sum(w), 1.0)

  def train(params, model_state, x, targets, rng, mask=None):
    n = x.shape[0]
    w_all = jnp.ones((n,), jnp.float32) if mask is None else mask.astype(jnp.float32)
    b = min(int(batch_size), n)
    nb = n // b
    keys = jax.random.split(jax.random.fold_in(rng, 0), epochs)
    order = jax.vmap(lambda k: jax.random.permutation(k, n)[:nb * b])(keys).reshape(-1, b)

    def body(carry, args):
      p, ms, opt = carry
      idx, s = args

      w = w_all[idx]

      def loss_fn(q):
        out, new_ms = apply_fn(q, ms, x[idx], train=True,
                               rng=jax.random.fold_in(jax.random.fold_in(rng, 1), s))
        return objective(out.logits, targets[idx], w), new_ms

      (_, new_ms), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
      updates, new_opt = tx.update(g, opt, p)
      any_w = jnp.sum(w) > 0
      keep = lambda a, b: jax.tree.map(lambda u, v: _select(any_w, u, v), a, b)
      return (keep(optax.apply_updates(p, updates), p), keep(new_ms, ms),
              keep(new_opt, opt)), None

    (params, model_state, _), _ = jax.lax.scan(
        body, (params, model_state, tx.init(params)), (order, jnp.arange(order.shape[0])))
    return params, model_state

  return train


def stack_for_clients(tree, num_clients: int):
  """Copies of ``tree`` with a leading ``[num_clients]`` axis."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients, *a.shape)), tree)


def own_model(server, client_state):
  """``personal`` of the algorithms whose clients keep their own models."""
  del server
  return client_state['params'], client_state['model_state']


def _select(pred, new, old):
  if jnp.issubdtype(jnp.asarray(old).dtype, jax.dtypes.prng_key):
    return old
  return jnp.where(pred, new, old)
