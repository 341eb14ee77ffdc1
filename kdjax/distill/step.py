"""The train step builder: one step for teacher training, baselines and distillation.

``make_train_step`` returns a pure ``step(state, batch, teacher_vars) -> (state,
metrics)``. Augmentation runs inside it, as a pure function of ``(seed, example id,
epoch)``; the teacher sees the same augmented input as the student (consistent
teaching) and runs forward only, under ``stop_gradient``. Metrics are ``(sum, count)``
pairs, so they reduce correctly over devices, hosts and fused steps.

``make_fused_steps`` runs several steps in one call with ``lax.scan``, gathering each
batch on device from the whole dataset kept there (no host round trip per step).
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from kdjax.distill.state import TrainState


class TeacherFns(NamedTuple):
  """A frozen teacher: ``apply(params, state, x, *, train, rng) -> (ModelOutput, state)``."""

  apply: Callable[..., Any]
  num_classes: int


def _teacher_inputs(teacher: TeacherFns | None, teacher_vars, x, batch, needs) -> dict:
  inputs = {}
  if 'teacher_topk_logits' in batch:            # from the teacher cache
    for key in ('teacher_topk_logits', 'teacher_topk_indices', 'teacher_logsumexp'):
      if key in batch:
        inputs[key] = batch[key]
  if 'teacher_logits' in batch:
    inputs['teacher_logits'] = batch['teacher_logits']
  if 'teacher_features' in batch:
    inputs['teacher_features'] = batch['teacher_features']
  if teacher is not None and not inputs:
    params, state = teacher_vars
    out, _ = teacher.apply(params, state, x, train=False)
    out = jax.lax.stop_gradient(out)
    inputs['teacher_logits'] = out.logits
    inputs['teacher_features'] = out.features
    inputs['teacher_attentions'] = out.attentions
  return inputs


def make_train_step(*, student_apply, objective, tx: optax.GradientTransformation,
                    augment: Callable, augment_seed: int,
                    teacher: TeacherFns | None = None):
  """Builds ``step(state, batch, teacher_vars) -> (state, metrics)``.

  ``batch`` holds ``x``, ``label`` (−1 = unlabeled), ``id``, ``epoch`` and ``mask``
  (False on padding), and optionally cached teacher outputs.
  """

  def step(state: TrainState, batch, teacher_vars=None):
    x = augment(batch['x'], batch['id'], batch['epoch'], seed=augment_seed)
    where = batch['mask']
    labels = batch['label']
    base = {'labels': labels, 'where': where, 'step': state.step}
    base.update(_teacher_inputs(teacher, teacher_vars, x, batch, objective.needs))
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)

    def loss_fn(params):
      out, model_state = student_apply(params['student'], state.model_state, x, train=True, rng=rng)
      inputs = dict(base, student_logits=out.logits, student_features=out.features,
                    student_attentions=out.attentions)
      loss, loss_state, metrics = objective.apply(params['loss'], state.loss_state, inputs)
      return loss, (model_state, loss_state, metrics, out.logits)

    (loss, (model_state, loss_state, term_metrics, logits)), grads = jax.value_and_grad(
        loss_fn, has_aux=True)(state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    new_state = state.replace(step=state.step + 1, params=params, model_state=model_state,
                              loss_state=loss_state, opt_state=opt_state)
    metrics = dict(term_metrics)
    n = jnp.sum(where.astype(jnp.float32))
    metrics['loss'] = (loss * n, n)
    metrics.update(accuracy_metrics(logits, labels, where))
    return new_state, metrics

  return step


def accuracy_metrics(logits, labels, where) -> dict:
  """``accuracy`` as (correct, labeled count); unlabeled (−1) and padded examples skipped."""
  valid = jnp.logical_and(where, labels >= 0).astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * valid
  return {'accuracy': (jnp.sum(correct), jnp.sum(valid))}


def epoch_permutations(seed: int, first_epoch, num_epochs: int, num_examples: int):
  """``[num_epochs, num_examples]`` shuffles for epochs ``first_epoch, ...``."""
  base = jax.random.key(seed)
  epochs = first_epoch + jnp.arange(num_epochs)
  return jax.vmap(lambda e: jax.random.permutation(jax.random.fold_in(base, e), num_examples))(epochs)


def make_fused_steps(step_fn, *, num_examples: int, batch_size: int, shuffle_seed: int,
                     num_steps: int, batch_sharding=None):
  """``run(state, data, teacher_vars) -> (state, summed_metrics)`` for ``num_steps`` steps.

  ``data`` is the whole training split on device (``x``, ``label``, ``id``). Step ``s``
  takes examples ``perm_e[(s mod E)·B : (s mod E + 1)·B]`` of epoch ``e = s // E``
  (``E`` = steps per epoch, the remainder of each epoch dropped), so the batches are a
  pure function of the step and the seed: a resumed run sees exactly the same batches.
  """
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'batch size {batch_size} is larger than the {num_examples} training examples')
  max_epochs = (num_steps + steps_per_epoch - 1) // steps_per_epoch + 1

  def run(state, data, teacher_vars=None):
    first_epoch = state.step // steps_per_epoch
    perms = epoch_permutations(shuffle_seed, first_epoch, max_epochs, num_examples)

    def body(state, _):
      epoch = state.step // steps_per_epoch
      pos = state.step % steps_per_epoch
      idx = jax.lax.dynamic_slice(perms[epoch - first_epoch], (pos * batch_size,), (batch_size,))
      batch = {k: jnp.take(v, idx, axis=0) for k, v in data.items() if k != 'teacher_cache'}
      batch['epoch'] = jnp.full((batch_size,), epoch, jnp.int32)
      if 'teacher_cache' in data:  # teacher cache (issue 5): cached epoch e mod E, same views
        from kdjax.cache.read import gather_rows
        num_cached = jax.tree.leaves(data['teacher_cache'])[0].shape[0]
        batch.update(gather_rows(data['teacher_cache'], epoch, idx))
        batch['epoch'] = jnp.full((batch_size,), epoch % num_cached, jnp.int32)
      batch['mask'] = jnp.ones((batch_size,), bool)
      if batch_sharding is not None:
        batch = jax.lax.with_sharding_constraint(batch, batch_sharding)
      return step_fn(state, batch, teacher_vars)

    state, metrics = jax.lax.scan(body, state, None, length=num_steps)
    return state, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)

  return run


def make_eval_step(apply_fn):
  """``eval_step(params, model_state, batch) -> metrics`` with loss and accuracy as (sum, count)."""

  def eval_step(params, model_state, batch):
    out, _ = apply_fn(params, model_state, batch['x'], train=False)
    where = jnp.logical_and(batch['mask'], batch['label'] >= 0)
    ce = optax.softmax_cross_entropy_with_integer_labels(
        out.logits.astype(jnp.float32), jnp.maximum(batch['label'], 0))
    w = where.astype(jnp.float32)
    metrics = accuracy_metrics(out.logits, batch['label'], batch['mask'])
    metrics['loss'] = (jnp.sum(ce * w), jnp.sum(w))
    return metrics

  return eval_step
