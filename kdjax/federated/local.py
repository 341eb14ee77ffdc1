"""Local training of one client: epochs of minibatch steps as one ``lax.scan``.

The trainer is a pure function of one client's padded data, so the simulator
can ``vmap`` it over a cohort. Each step is kdjax's one train step
(:func:`kdjax.engine.make_train_step`): the objective (by default
``build_objective({'ce': {}})``), plus an optional algorithm penalty (FedProx's
proximal term, Ditto's regularizer), an optional per-batch loss (FD, FedD2S), and an
optional gradient correction (SCAFFOLD, added before the optimizer).

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

from kdjax.engine.step import init_train_state
from kdjax.engine.step import make_train_step
from kdjax.losses import build_objective


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
  """``train(params, model_state, data, rng, *, penalty=None, correction=None,
  batch_loss=None, batch_loss_mask=None, batch_extra=None, loss_extra=None)``.

  ``data`` is one client's ``(x [E, ...], label [E], mask [E], count)``
  (a :class:`~kdjax.federated.packing.ClientData` row). ``penalty(params)``
  is added to the loss; ``batch_loss(logits, labels, mask) -> scalar`` too
  (FD's distillation toward per-class logits). ``batch_extra`` is a dict of
  per-example arrays ``[E, ...]`` (FedD2S's per-example soft labels): each
  step's batch holds the rows of its examples under the same keys, next to
  ``x``, ``label`` and ``mask``, and ``loss_extra(output, batch) -> scalar``
  (the model's :class:`~kdjax.models.ModelOutput` and that batch) is added to
  the loss. ``batch_loss_mask`` (a params-shaped pytree of scalars, FedD2S's
  layer dropping) scales the gradient of ``batch_loss`` and ``loss_extra``
  leafwise, so that leaves with mask 0 are trained by the main loss only;
  ``correction`` (a params-shaped pytree) is added to every gradient. ``lr``,
  ``momentum``, ``batch_size`` and ``epochs`` are the settings it was built
  with (algorithms such as SCAFFOLD and FedNova need them).
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


def make_local_trainer(apply_fn: Callable[..., Any], *, batch_size: int, epochs: int = 1,
                       lr: float = 0.1, momentum: float = 0.0, objective=None,
                       tx: optax.GradientTransformation | None = None) -> LocalTrainer:
  """Builds the pure local trainer of one client.

  Each local step is kdjax's one train step (:func:`kdjax.engine.make_train_step`) on a
  minibatch of the client's packed data; a minibatch of padding only leaves the state
  unchanged (``skip_empty``).

  Args:
    apply_fn: ``apply(params, state, x, *, train, rng) -> (ModelOutput, state)``
      from :func:`kdjax.models.functional`.
    batch_size: local minibatch size ``B``; the packed example axis must be a
      multiple of it.
    epochs: local epochs.
    lr: client learning rate.
    momentum: client SGD momentum (0 for plain SGD). The optimizer state is
      reset at every round.
    objective: a stateless, parameter-free :class:`kdjax.losses.Objective`
      (default: cross-entropy, ``build_objective({'ce': {}})``).
    tx: the client optimizer (default ``optax.sgd(lr, momentum)``); ``lr`` and
      ``momentum`` must describe it for the algorithms that read them (SCAFFOLD, FedNova).

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
    objective = build_objective({'ce': {}})
  obj_params, obj_state = objective.init(jax.random.key(0), {})
  if jax.tree.leaves((obj_params, obj_state)):
    raise ValueError('federated local training needs a stateless objective without '
                     'trainable loss parameters')
  if tx is None:
    tx = optax.sgd(lr, momentum if momentum else None)
  batch_size, epochs = int(batch_size), int(epochs)

  def train(params, model_state, data, rng, *, penalty=None, correction=None,
            batch_loss=None, batch_loss_mask=None, batch_extra=None,
            loss_extra=None) -> LocalResult:
    x, label, mask = data[0], data[1], data[2]
    e = mask.shape[0]
    if e % batch_size:
      raise ValueError(f'the packed example axis ({e}) is not a multiple of the batch '
                       f'size ({batch_size}); pack with multiple=batch_size')
    nb = e // batch_size
    order = epoch_orders(jax.random.fold_in(rng, 0), mask, epochs).reshape(
        epochs * nb, batch_size)
    opt = tx if correction is None else optax.chain(add_to_student(correction), tx)
    aux = _aux_loss(batch_loss, loss_extra)
    step = make_train_step(apply_fn, objective, opt, penalty=penalty, aux_loss=aux,
                           aux_grad_mask=batch_loss_mask, skip_empty=True, nonfinite='ignore')
    state = init_train_state(params, model_state, opt, rng=jax.random.fold_in(rng, 1),
                             loss_params=obj_params, loss_state=obj_state)

    clash = {'x', 'label', 'mask'} & set(batch_extra or {})
    if clash:
      raise ValueError(f'batch_extra may not use the batch keys {sorted(clash)}')
    columns = dict(batch_extra or {}, x=x, label=label, mask=mask)

    def body(state, idx):
      return step(state, {k: v[idx] for k, v in columns.items()})

    state, metrics = jax.lax.scan(body, state, order)
    summed = {k: jax.tree.map(jnp.sum, metrics[k]) for k in ('loss', 'accuracy')}
    return LocalResult(state.params['student'], state.model_state, state.step, summed)

  return LocalTrainer(train, apply_fn, float(lr), float(momentum), batch_size, epochs)


def _aux_loss(batch_loss, loss_extra):
  """The step's ``aux_loss(output, batch)``: ``batch_loss`` on the logits plus
  ``loss_extra`` (either may be None; None when both are)."""
  if batch_loss is None and loss_extra is None:
    return None

  def aux(out, batch):
    terms = []
    if batch_loss is not None:
      terms.append(batch_loss(out.logits, batch['label'], batch['mask']))
    if loss_extra is not None:
      terms.append(loss_extra(out, batch))
    return sum(terms[1:], terms[0])
  return aux


def add_to_student(correction) -> optax.GradientTransformation:
  """Adds ``correction`` (student-parameter shaped) to the student's gradient (SCAFFOLD)."""
  def update(updates, state, params=None):
    del params
    return dict(updates, student=jax.tree.map(jnp.add, updates['student'], correction)), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)
