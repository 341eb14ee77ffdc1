"""Local training of one client: epochs of minibatch steps as one ``lax.scan``.

The trainer is a pure function of one client's padded data, so the simulator
can ``vmap`` it over a cohort. The loss is kdjax's objective (by default
``build_objective({'ce': {}})``, the same objective object the distill engine's
step evaluates), plus an optional algorithm penalty (FedProx's proximal term,
Ditto's regularizer) and an optional gradient correction (SCAFFOLD).

Batches: each local epoch orders the client's examples by a seeded random key,
real examples first (padding gets key 2, above every uniform key), and cuts
the order into ``E / B`` batches of ``B`` positions. A batch holding only
padding is a *masked step*: parameters, optimizer state and model state are
left unchanged. So a client with ``n`` examples takes exactly
``ceil(n / B)`` real steps per epoch, the last one on ``n mod B`` examples when
``B`` does not divide ``n`` — the same steps a per-client loop over its own
``n`` examples would take.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax


class LocalResult(NamedTuple):
  """What local training returns.

  Attributes:
    params: the trained parameters.
    model_state: the model's non-trainable state after training.
    num_steps: int32 count of real (unmasked) steps taken.
    metrics: ``{'loss': (sum, count), 'accuracy': (correct, count)}`` over
      every real example seen in every epoch (training metrics).
  """

  params: Any
  model_state: Any
  num_steps: jax.Array
  metrics: dict


class LocalTrainer(NamedTuple):
  """``train(params, model_state, data, rng, *, penalty=None, correction=None)``.

  ``data`` is one client's ``(x [E, ...], label [E], mask [E], count)``
  (a :class:`~kdjax.federated.packing.ClientData` row). ``penalty(params)``
  is added to the loss; ``batch_loss(logits, labels, mask) -> scalar`` too
  (FD's distillation toward per-class logits); ``batch_loss_mask`` (a
  params-shaped pytree of scalars, FedD2S's layer dropping) scales the
  gradient of ``batch_loss`` leafwise, so that leaves with mask 0 are trained
  by the main loss only; ``correction`` (a
  params-shaped pytree) is added to every gradient. ``lr``, ``momentum``, ``batch_size`` and ``epochs`` are the
  settings it was built with (algorithms such as SCAFFOLD and FedNova need
  them).
  """

  train: Callable[..., LocalResult]
  apply: Callable[..., Any]
  lr: float
  momentum: float
  batch_size: int
  epochs: int


def epoch_orders(rng: jax.Array, mask: jax.Array, epochs: int) -> jax.Array:
  """``[epochs, E]`` example orders: real examples first, in a seeded random order.

  Args:
    rng: the client's shuffling key.
    mask: ``[E]`` bool, True on real examples.
    epochs: number of local epochs.

  Returns:
    int32 positions into the client's padded arrays.

  >>> o = epoch_orders(jax.random.key(0), jnp.array([True, True, False, True]), 2)
  >>> o.shape, sorted(o[0, :3].tolist()), int(o[0, 3])
  ((2, 4), [0, 1, 3], 2)
  """
  def one(key):
    u = jax.random.uniform(key, mask.shape)
    return jnp.argsort(jnp.where(mask, u, 2.0)).astype(jnp.int32)
  return jax.vmap(one)(jax.random.split(rng, epochs))


def step_key(rng: jax.Array, step) -> jax.Array:
  """The model key of local step ``step`` (dropout masks), from the client key."""
  return jax.random.fold_in(jax.random.fold_in(rng, 1), step)


def make_local_trainer(apply_fn: Callable[..., Any], *, batch_size: int, epochs: int = 1,
                       lr: float = 0.1, momentum: float = 0.0,
                       objective=None) -> LocalTrainer:
  """Builds the pure local trainer of one client.

  Args:
    apply_fn: ``apply(params, state, x, *, train, rng) -> (ModelOutput, state)``
      from :func:`kdjax.models.functional`.
    batch_size: local minibatch size ``B``; the packed example axis must be a
      multiple of it.
    epochs: local epochs.
    lr: client SGD learning rate.
    momentum: client SGD momentum (0 for plain SGD). The optimizer state is
      reset at every round.
    objective: a stateless, parameter-free :class:`kdjax.losses.Objective`
      (default: cross-entropy, ``build_objective({'ce': {}})``).

  Returns:
    A :class:`LocalTrainer`.

  >>> from kdjax.models import create, functional
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8,)))
  >>> trainer = make_local_trainer(apply, batch_size=2, epochs=1, lr=0.1)
  >>> data = (jnp.ones((4, 4)), jnp.array([0, 1, 2, -1]), jnp.array([True, True, True, False]), 3)
  >>> res = jax.jit(trainer.train)(params, state, data, jax.random.key(0))
  >>> int(res.num_steps), float(res.metrics['accuracy'][1])
  (2, 3.0)
  """
  if objective is None:
    from kdjax.losses import build_objective
    objective = build_objective({'ce': {}})
  obj_params, obj_state = objective.init(jax.random.key(0), {})
  if jax.tree.leaves((obj_params, obj_state)):
    raise ValueError('federated local training needs a stateless objective without '
                     'trainable loss parameters')
  tx = optax.sgd(lr, momentum if momentum else None)
  batch_size, epochs = int(batch_size), int(epochs)

  def train(params, model_state, data, rng, *, penalty=None, correction=None,
            batch_loss=None, batch_loss_mask=None) -> LocalResult:
    x, label, mask = data[0], data[1], data[2]
    e = mask.shape[0]
    if e % batch_size:
      raise ValueError(f'the packed example axis ({e}) is not a multiple of the batch '
                       f'size ({batch_size}); pack with multiple=batch_size')
    nb = e // batch_size
    order = epoch_orders(jax.random.fold_in(rng, 0), mask, epochs).reshape(
        epochs * nb, batch_size)

    def loss_fn(p, ms, xb, yb, mb, key, step):
      out, new_ms = apply_fn(p, ms, xb, train=True, rng=key)
      inputs = {'student_logits': out.logits, 'labels': yb, 'where': mb, 'step': step}
      loss, _, _ = objective.apply(obj_params, obj_state, inputs)
      if penalty is not None:
        loss = loss + penalty(p)
      if batch_loss is not None:
        loss = loss + batch_loss(out.logits, yb, mb)
      return loss, (new_ms, out.logits)

    def split_loss_fn(p, ms, xb, yb, mb, key, step):
      # (main loss, batch loss) separately, for a leafwise mask on the second's gradient.
      out, new_ms = apply_fn(p, ms, xb, train=True, rng=key)
      inputs = {'student_logits': out.logits, 'labels': yb, 'where': mb, 'step': step}
      loss, _, _ = objective.apply(obj_params, obj_state, inputs)
      if penalty is not None:
        loss = loss + penalty(p)
      return (loss, batch_loss(out.logits, yb, mb)), (new_ms, out.logits)

    def masked_value_and_grad(p, ms, xb, yb, mb, key, step):
      (main, extra), vjp, (new_ms, logits) = jax.vjp(
          lambda q: split_loss_fn(q, ms, xb, yb, mb, key, step), p, has_aux=True)
      (g_main,) = vjp((jnp.ones_like(main), jnp.zeros_like(extra)))
      (g_extra,) = vjp((jnp.zeros_like(main), jnp.ones_like(extra)))
      g = jax.tree.map(lambda a, b, m: a + jnp.asarray(m, b.dtype) * b, g_main, g_extra,
                       batch_loss_mask)
      return (main + extra, (new_ms, logits)), g

    def body(carry, idx):
      p, ms, opt, steps = carry
      xb, yb, mb = x[idx], label[idx], mask[idx]
      if batch_loss is not None and batch_loss_mask is not None:
        (loss, (new_ms, logits)), g = masked_value_and_grad(
            p, ms, xb, yb, mb, step_key(rng, steps), steps)
      else:
        (loss, (new_ms, logits)), g = jax.value_and_grad(loss_fn, has_aux=True)(
            p, ms, xb, yb, mb, step_key(rng, steps), steps)
      if correction is not None:
        g = jax.tree.map(jnp.add, g, correction)
      updates, new_opt = tx.update(g, opt, p)
      new_p = optax.apply_updates(p, updates)
      valid = jnp.any(mb)
      keep = lambda new, old: jax.tree.map(lambda a, b: _select(valid, a, b), new, old)
      carry = (keep(new_p, p), keep(new_ms, ms), keep(new_opt, opt),
               steps + valid.astype(jnp.int32))
      lab = jnp.logical_and(mb, yb >= 0).astype(jnp.float32)
      n = jnp.sum(lab)
      correct = jnp.sum((jnp.argmax(logits, -1) == yb).astype(jnp.float32) * lab)
      return carry, (loss * n, correct, n)

    init = (params, model_state, tx.init(params), jnp.zeros((), jnp.int32))
    (params, model_state, _, steps), (ls, cs, ns) = jax.lax.scan(body, init, order)
    n = jnp.sum(ns)
    metrics = {'loss': (jnp.sum(ls), n), 'accuracy': (jnp.sum(cs), n)}
    return LocalResult(params, model_state, steps, metrics)

  return LocalTrainer(train, apply_fn, float(lr), float(momentum), batch_size, epochs)


def _select(pred, new, old):
  """``where(pred, new, old)``; PRNG-key leaves (RNG streams, never advanced here) keep ``old``."""
  if jnp.issubdtype(jnp.asarray(old).dtype, jax.dtypes.prng_key):
    return old
  return jnp.where(pred, new, old)
