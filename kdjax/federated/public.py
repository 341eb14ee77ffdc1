"""Pieces shared by the federated distillation algorithms that use public data.

FedMD, DS-FL, EdgeFD and KnFu exchange predictions on a shared public (or open,
unlabeled) set instead of weights: a cohort client first trains toward the current
targets on that set, then on its private data (:func:`public_then_local`). FedDF's
server trains the averaged model toward the cohort's ensemble the same way
(:func:`make_public_trainer` with Adam). Every one of those steps is kdjax's one
train step (:func:`kdjax.engine.make_train_step`). All of it is pure and
vmappable over clients.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kdjax.engine.step import init_train_state
from kdjax.engine.step import make_train_step
from kdjax.engine.step import tree_where
from kdjax.losses import Objective
from kdjax.losses import kd
from kdjax.losses import reduce_value

LOSSES = ('kd', 'soft_ce', 'l1')


def public_logits(apply_fn, params, model_state, x) -> jax.Array:
  """``[P, classes]`` float32 logits of a model on the public inputs (eval mode)."""
  out, _ = apply_fn(params, model_state, x, train=False)
  return out.logits.astype(jnp.float32)


def target_objective(loss: str = 'kd', *, temperature: float = 1.0) -> Objective:
  """The objective of training toward targets on public data (``batch['teacher_logits']``).

  ``'kd'``: Hinton KD from target logits (:func:`kdjax.losses.kd`); ``'soft_ce'``:
  cross-entropy with target *probabilities* (DS-FL); ``'l1'``: mean absolute error between
  logits (FedMD's digest). The mean over the batch's unmasked examples.
  """
  if loss not in LOSSES:
    raise ValueError(f"public-data loss must be 'kd', 'soft_ce' or 'l1', got {loss!r}")

  def per_example(logits, targets):
    if loss == 'kd':
      return kd(logits, targets, temperature=temperature)
    if loss == 'soft_ce':
      return -jnp.sum(targets * jax.nn.log_softmax(logits), -1)
    return jnp.mean(jnp.abs(logits - targets), -1)

  def apply(params, state, inputs):
    del params
    value = per_example(inputs['student_logits'], inputs['teacher_logits'])
    mean, pair = reduce_value(value, inputs['where'])
    return mean, state, {f'loss/{loss}': pair}

  return Objective(lambda rng, inputs: ({}, {}), apply, (loss,),
                   frozenset({'student_logits', 'teacher_logits'}))


def make_public_trainer(apply_fn: Callable[..., Any], *, batch_size: int, epochs: int = 1,
                        lr: float = 0.05, loss: str = 'kd', temperature: float = 1.0,
                        tx: optax.GradientTransformation | None = None,
                        steps: int | None = None) -> Callable:
  """``train(params, model_state, x, targets, rng, mask=None) -> (params, model_state)``.

  By default ``epochs`` shuffled passes of ``floor(P / batch_size)`` full batches of the
  public set (the rest of each pass dropped); with ``steps``, that many batches each
  drawn without replacement. ``mask`` (``[P]`` bool) leaves examples out: the loss is
  the mean over the batch's unmasked examples, and a batch without any leaves the
  model unchanged.

  Args:
    apply_fn: the model's pure apply.
    batch_size: public minibatch size.
    epochs: passes over the public set.
    lr: SGD learning rate (when ``tx`` is not given).
    loss: see :func:`target_objective`.
    temperature: the KD temperature.
    tx: the optimizer (default ``optax.sgd(lr)``).
    steps: draw this many independent batches instead of epochs.

  Returns:
    The pure train function.

  >>> from kdjax.models import create, functional
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8,)))
  >>> train = make_public_trainer(apply, batch_size=2, loss='l1')
  >>> p, _ = jax.jit(train)(params, state, jnp.ones((5, 4)), jnp.zeros((5, 3)), jax.random.key(0))
  >>> jax.tree.structure(p) == jax.tree.structure(params)
  True
  """
  objective = target_objective(loss, temperature=temperature)
  tx = optax.sgd(lr) if tx is None else tx
  step = make_train_step(apply_fn, objective, tx, skip_empty=True, nonfinite='ignore')

  def train(params, model_state, x, targets, rng, mask=None):
    n = x.shape[0]
    b = min(int(batch_size), n)
    # Without a mask every batch is whole: a constant, not a gather of ones (which XLA
    # folds in one program and not in its vmapped form, whose rounding then differs).
    mask_of = (lambda idx: jnp.ones((b,), bool)) if mask is None else (lambda idx: mask[idx])
    key = jax.random.fold_in(rng, 0)
    if steps is None:
      nb = n // b
      keys = jax.random.split(key, epochs)
      order = jax.vmap(lambda k: jax.random.permutation(k, n)[:nb * b])(keys).reshape(-1, b)
    else:   # batch s from fold_in(fold_in(rng, s), 0)
      order = jax.vmap(lambda s: jax.random.choice(
          jax.random.fold_in(jax.random.fold_in(rng, s), 0), n, (b,), replace=False))(
              jnp.arange(int(steps)))
    labels = jnp.full((b,), -1, jnp.int32)

    def body(state, idx):
      batch = {'x': x[idx], 'label': labels, 'mask': mask_of(idx), 'teacher_logits': targets[idx]}
      return step(state, batch)

    state = init_train_state(params, model_state, tx, rng=jax.random.fold_in(rng, 1))
    state, _ = jax.lax.scan(body, state, order)
    return state.params['student'], state.model_state

  return train


def public_then_local(distill: Callable, trainer, client_state, public_x, targets, data, rng,
                      *, ready, mask=None):
  """A client's round in the public-data algorithms: train toward ``targets`` on
  ``public_x`` with ``distill`` (a :func:`make_public_trainer`), kept only where ``ready``
  (no targets yet in the first rounds), then on its private ``data`` with ``trainer``.

  Returns:
    The local trainer's :class:`~kdjax.federated.local.LocalResult`.
  """
  p, ms = client_state['params'], client_state['model_state']
  dp, dms = distill(p, ms, public_x, targets, jax.random.fold_in(rng, 7), mask=mask)
  p, ms = tree_where(ready, (dp, dms), (p, ms))
  return trainer.train(p, ms, data, rng)


def stack_for_clients(tree, num_clients: int):
  """Copies of ``tree`` with a leading ``[num_clients]`` axis."""
  return jax.tree.map(lambda a: jnp.broadcast_to(a, (num_clients, *a.shape)), tree)


def own_model(server, client_state):
  """``personal`` of the algorithms whose clients keep their own models."""
  del server
  return client_state['params'], client_state['model_state']
