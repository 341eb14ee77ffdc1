"""The one train step, and the one accuracy.

``make_train_step`` returns a pure ``step(state, batch) -> (state, metrics)``. Every
mode trains through it: the distillation loop jits it inside a ``lax.scan`` of
``steps_per_call`` steps (:mod:`kdjax.engine.loop`), the federated local trainer runs
it in a scan and ``vmap``\\ s that over clients (:mod:`kdjax.federated.local`), and the
proxy-set algorithms train on their public data with it (:mod:`kdjax.federated.public`).

``batch`` is a ready batch: ``x`` (the model input, already augmented), ``label``
(``-1``: unlabeled), ``mask`` (False on padding; ``[batch, tokens]`` for token data, where
``label`` holds the next tokens), the model's other inputs (``segment_ids``, ``positions``
of packed sequences: :data:`kdjax.models.base.MODEL_INPUT_KEYS`) and the teacher's
entries, live or cached (every ``teacher_*`` key goes to the objective as it is; see
:mod:`kdjax.losses.registry`). Metrics are ``(sum, count)`` pairs, so they add up over
steps, devices and hosts.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from kdjax.engine.precision import float32_outputs
from kdjax.engine.state import TrainState
from kdjax.models.base import model_kwargs
from kdjax.models.base import named_features

NONFINITE = ('stop', 'skip', 'ignore')


def make_train_step(apply: Callable[..., Any], objective, tx: optax.GradientTransformation, *,
                    penalty: Callable[[Any], jax.Array] | None = None,
                    aux_loss: Callable[[Any, dict], jax.Array] | None = None,
                    aux_grad_mask: Any = None, skip_empty: bool = False,
                    nonfinite: str = 'stop', train_accuracy: bool = True) -> Callable:
  """Builds ``step(state, batch) -> (state, metrics)``.

  The loss is ``objective`` on the student's outputs and the batch, plus
  ``penalty(student_params)`` (FedProx's proximal term, Ditto's regularizer), plus
  ``aux_loss(student_output, batch)``; with ``aux_grad_mask`` (a pytree of scalars shaped
  like the student's parameters) the gradient of ``aux_loss`` is scaled leafwise by it
  (FedD2S trains only the first layers toward its teacher). The gradient goes through
  ``tx`` and ``optax.apply_updates``.

  Args:
    apply: the student's pure ``apply(params, state, x, *, train, rng)``.
    objective: a :class:`kdjax.losses.Objective`.
    tx: the optimizer of ``state.params`` (``{'student': ..., 'loss': ...}``).
    penalty: optional ``penalty(student_params) -> scalar``.
    aux_loss: optional ``aux_loss(student_output, batch) -> scalar``.
    aux_grad_mask: optional leafwise scale of ``aux_loss``'s gradient.
    skip_empty: a batch whose ``mask`` is all False leaves the state as it is (the
      padded batches of a federated client), step counter included.
    nonfinite: what a step with a non-finite loss or gradient norm does. ``'stop'``:
      it is applied, and its ``metrics['nonfinite']`` says so (the loop stops there);
      ``'skip'``: its update is dropped (the step counter still moves on) and
      ``metrics['skipped']`` counts it; ``'ignore'``: no check (no gradient norm).
    train_accuracy: also count the step's ``accuracy`` (an argmax over the logits: on a
      language model one more pass over ``[batch, tokens, vocab]``, a few percent of
      the demo LM's step on a CPU). False leaves it out of the metrics (the run's
      ``train_accuracy`` is then None); the update and the other metrics are unchanged.

  Returns:
    The pure step. ``metrics``: ``loss``, ``accuracy`` (over labeled examples; left out
    with ``train_accuracy=False``), the objective's ``loss/<term>``, and unless
    ``nonfinite='ignore'`` ``grad_norm`` and ``nonfinite`` (``'stop'``: 1 on a
    non-finite step) or ``skipped`` (``'skip'``: 1 on a dropped step; its other
    metrics are zeros).
  """
  if nonfinite not in NONFINITE:
    raise ValueError(f'nonfinite must be one of {NONFINITE}, got {nonfinite!r}')

  def forward(params, state: TrainState, batch, rng):
    out, model_state = apply(params['student'], state.model_state, batch['x'], train=True,
                             rng=rng, **model_kwargs(batch))
    # The loss math is float32 whatever the computation dtype (bfloat16 models, teachers).
    inputs = float32_outputs({k: v for k, v in batch.items() if k.startswith('teacher_')})
    if 'id' in batch:   # each example's index in its split (CRD's memory bank)
      inputs['example_ids'] = batch['id']
    inputs.update(labels=batch['label'], where=batch['mask'], step=state.step,
                  **float32_outputs(dict(student_logits=out.logits,
                                         student_features=named_features(out),
                                         student_attentions=out.attentions)))
    loss, loss_state, metrics = objective.apply(params['loss'], state.loss_state, inputs)
    if penalty is not None:
      loss = loss + penalty(params['student'])
    return loss, (out, model_state, loss_state, metrics)

  def loss_and_grads(params, state, batch, rng):
    if aux_loss is None:
      return jax.value_and_grad(forward, has_aux=True)(params, state, batch, rng)
    if aux_grad_mask is None:
      def total(p):
        loss, aux = forward(p, state, batch, rng)
        return loss + aux_loss(aux[0], batch), aux
      return jax.value_and_grad(total, has_aux=True)(params)

    def split(p):
      loss, aux = forward(p, state, batch, rng)
      return (loss, aux_loss(aux[0], batch)), aux
    (main, extra), vjp, aux = jax.vjp(split, params, has_aux=True)
    (g_main,) = vjp((jnp.ones_like(main), jnp.zeros_like(extra)))
    (g_extra,) = vjp((jnp.zeros_like(main), jnp.ones_like(extra)))
    masked = jax.tree.map(lambda g, m: jnp.asarray(m, g.dtype) * g, g_extra['student'],
                          aux_grad_mask)
    grads = jax.tree.map(jnp.add, g_main, dict(g_extra, student=masked))
    return (main + extra, aux), grads

  def step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    (loss, (out, model_state, loss_state, metrics)), grads = loss_and_grads(
        state.params, state, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new = state.replace(step=state.step + 1, params=params, model_state=model_state,
                        loss_state=loss_state, opt_state=opt_state)
    where = batch['mask']
    n = jnp.sum(where.astype(jnp.float32))
    metrics = dict(metrics, loss=(loss * n, n))
    if train_accuracy:
      metrics['accuracy'] = accuracy(out.logits, batch['label'], where)
    new, metrics = guard_nonfinite(nonfinite, loss, grads, new,
                                   state.replace(step=state.step + 1), metrics)
    if skip_empty:
      new = tree_where(jnp.any(where), new, state)
    return new, metrics

  return step


def guard_nonfinite(nonfinite: str, loss, grads, new, skipped, metrics: dict
                    ) -> tuple[Any, dict]:
  """The engine's answer to a non-finite update, on any state (one student's, a cohort's).

  Args:
    nonfinite: ``'stop'``, ``'skip'`` or ``'ignore'`` (see :func:`make_train_step`).
    loss: the update's scalar loss.
    grads: its gradient (any pytree).
    new: the state after the update.
    skipped: the state to keep instead when the update is dropped (``'skip'``).
    metrics: the update's ``(sum, count)`` metrics.

  Returns:
    ``(state, metrics)``: ``new`` (``'skip'``: ``skipped`` where the loss or the gradient
    norm is not finite, and the metrics zeroed) and, unless ``'ignore'``, the metrics
    with ``grad_norm`` and ``nonfinite`` (``'stop'``) or ``skipped`` (``'skip'``) added.

  >>> state, m = guard_nonfinite('skip', jnp.float32(jnp.nan), {'w': jnp.ones(2)},
  ...                            {'w': jnp.zeros(2)}, {'w': jnp.ones(2)}, {})
  >>> state['w'].tolist(), float(m['skipped'][0])
  ([1.0, 1.0], 1.0)
  """
  if nonfinite == 'ignore':
    return new, metrics
  grad_norm = global_norm(grads)
  finite = jnp.logical_and(jnp.isfinite(loss), jnp.isfinite(grad_norm))
  one = jnp.ones((), jnp.float32)
  metrics = dict(metrics, grad_norm=(grad_norm, one))
  flag = (1.0 - finite.astype(jnp.float32), one)
  if nonfinite == 'stop':
    metrics['nonfinite'] = flag
    return new, metrics
  # 'skip': drop the update, move on, count it
  metrics = {k: _zero_unless(finite, v) for k, v in metrics.items()}
  metrics['skipped'] = flag
  return tree_where(finite, new, skipped), metrics


# Up to this many elements the gradient norm is taken over one flat vector: on small
# models one reduction costs less than one per leaf (XLA:CPU, MNIST-1D MLP: 2 us instead
# of 15 us of a 175 us step); larger (and sharded) trees reduce leaf by leaf, with no copy.
_FLAT_NORM_MAX = 1 << 20


def global_norm(tree) -> jax.Array:
  """The L2 norm of all the leaves of ``tree`` together, in float32."""
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.zeros((), jnp.float32)
  if sum(x.size for x in leaves) <= _FLAT_NORM_MAX:
    flat = jnp.concatenate([jnp.ravel(x).astype(jnp.float32) for x in leaves])
    return jnp.sqrt(jnp.sum(jnp.square(flat)))
  return jnp.sqrt(sum(jnp.sum(jnp.square(x.astype(jnp.float32))) for x in leaves))


def _zero_unless(pred, pair):
  s, c = pair
  return jnp.where(pred, s, 0.0), jnp.where(pred, c, 0.0)


def tree_where(pred, new, old):
  """``new`` where ``pred`` else ``old``, leafwise; typed PRNG-key leaves keep ``old``
  (RNG streams: their keys cannot be selected).

  >>> tree_where(jnp.asarray(False), {'a': jnp.ones(2)}, {'a': jnp.zeros(2)})['a'].tolist()
  [0.0, 0.0]
  """
  def one(a, b):
    if jnp.issubdtype(jnp.asarray(b).dtype, jax.dtypes.prng_key):
      return b
    return jnp.where(pred, a, b)
  return jax.tree.map(one, new, old)


def accuracy(logits, labels, where) -> tuple[jax.Array, jax.Array]:
  """``(correct, count)`` over the examples with ``where`` True and a label (``>= 0``).

  >>> c, n = accuracy(jnp.array([[0., 1.], [1., 0.], [0., 1.]]), jnp.array([1, 1, -1]),
  ...                 jnp.array([True, True, True]))
  >>> float(c), float(n)
  (1.0, 2.0)
  """
  valid = jnp.logical_and(where, labels >= 0).astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * valid
  return jnp.sum(correct), jnp.sum(valid)


def eval_metrics(logits, labels, where) -> dict:
  """``accuracy`` and cross-entropy ``loss`` as ``(sum, count)`` over labeled examples."""
  valid = jnp.logical_and(where, labels >= 0)
  ce = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32),
                                                       jnp.maximum(labels, 0))
  w = valid.astype(jnp.float32)
  return {'accuracy': accuracy(logits, labels, where), 'loss': (jnp.sum(ce * w), jnp.sum(w))}


def init_train_state(params, model_state, tx: optax.GradientTransformation, *, rng,
                     loss_params=None, loss_state=None) -> TrainState:
  """A :class:`TrainState` at step 0; ``rng`` (a typed key) seeds the per-step keys."""
  trainable = {'student': params, 'loss': {} if loss_params is None else loss_params}
  return TrainState(step=jnp.zeros((), jnp.int32), params=trainable, model_state=model_state,
                    loss_state={} if loss_state is None else loss_state,
                    opt_state=tx.init(trainable), rng=jax.random.key_data(rng))
