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
  if 'teacher_attentions' in batch:
    inputs['teacher_attentions'] = batch['teacher_attentions']
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

  The returned step has two attributes. ``teacher_outputs(batch, teacher_vars) -> dict``
  gives those of the live teacher's ``teacher_logits``, ``teacher_features`` and
  ``teacher_attentions`` on the batch's augmented inputs that the objective reads (empty
  without a live teacher); a batch that already carries them skips the teacher forward,
  which is how :func:`make_teacher_steps` runs the teacher apart from the student.
  ``live_teacher`` says whether a teacher was given.
  """

  def teacher_outputs(batch, teacher_vars=None) -> dict:
    if teacher is None or 'teacher_topk_logits' in batch or 'teacher_logits' in batch:
      return {}
    x = augment(batch['x'], batch['id'], batch['epoch'], seed=augment_seed)
    outputs = _teacher_inputs(teacher, teacher_vars, x, {}, objective.needs)
    return {k: v for k, v in outputs.items() if k in objective.needs}

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

  step.teacher_outputs = teacher_outputs
  step.live_teacher = teacher is not None
  return step


def accuracy_metrics(logits, labels, where) -> dict:
  """``accuracy`` as (correct, labeled count); unlabeled (−1) and padded examples skipped."""
  valid = jnp.logical_and(where, labels >= 0).astype(jnp.float32)
  correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32) * valid
  return {'accuracy': (jnp.sum(correct), jnp.sum(valid))}


def epoch_permutations(seed: int, first_epoch, num_epochs: int, num_examples: int):
  """``[num_epochs, num_examples]`` shuffles for epochs ``first_epoch, ...`` (see
  :func:`packed_permutation`)."""
  base = jax.random.key(seed)
  epochs = first_epoch + jnp.arange(num_epochs)
  return jax.vmap(lambda e: packed_permutation(jax.random.fold_in(base, e), num_examples))(epochs)


# Below this many random bits per sort key, packed_permutation would need too many
# rounds; it then takes jax.random.permutation (n above 2**24).
_MIN_FREE_BITS = 8


def packed_permutation(key: jax.Array, n: int) -> jax.Array:
  """A uniformly random permutation of ``range(n)`` (int32), as rounds of one-operand sorts.

  Each round draws ``32 - b`` random bits per position (``b`` = bits of ``n - 1``),
  packs them above the position, sorts the packed uint32 words (unique, so one
  operand and no payload) and reorders by the positions read back from the low bits;
  ties in the random bits keep the previous round's (random) order. Rounds are
  added until they hold ``3·b`` random bits in all, the criterion
  ``jax.random.permutation`` applies to its 32-bit key rounds. Same distribution,
  different draws: on XLA:CPU a key-value sort is far slower than a one-operand
  sort (five shuffles of 4,000 positions: 7.9 ms with ``jax.random.permutation``,
  1.95 ms this way, jax 0.10.2, one core; 1.5x at a million positions:
  ``benchmarks/shuffle.py``), and the fused distillation call shuffles every epoch it
  spans. For ``n > 2**24`` it is ``jax.random.permutation``.

  >>> p = packed_permutation(jax.random.key(0), 10)
  >>> sorted(p.tolist()) == list(range(10))
  True
  """
  bits = max(1, (n - 1).bit_length())
  free = 32 - bits
  if free < _MIN_FREE_BITS:
    return jax.random.permutation(key, n)
  rounds = -(-3 * bits // free)
  positions = jnp.arange(n, dtype=jnp.uint32)
  order = positions
  for r in range(rounds):
    draws = jax.random.bits(jax.random.fold_in(key, r), (n,), jnp.uint32) >> bits
    packed = jax.lax.sort((draws << bits) | positions, is_stable=False)
    order = jnp.take(order, packed & jnp.uint32((1 << bits) - 1))
  return order.astype(jnp.int32)


# The key under which make_teacher_steps hands its batches' positions in the split to
# make_fused_steps (so the student's call does not shuffle again).
POSITIONS = 'batch_positions'


def _batches(data, *, shuffle_seed: int, num_examples: int, batch_size: int, first_step,
             num_steps: int, batch_sharding=None):
  """``batch_at(step, idx=None)`` for steps ``first_step .. first_step + num_steps - 1``.

  ``idx``: the batch's positions in the split, when already known (from the teacher's
  call); the epoch shuffles are then unused, and XLA drops them from the program.
  """
  steps_per_epoch = num_examples // batch_size
  if steps_per_epoch < 1:
    raise ValueError(f'batch size {batch_size} is larger than the {num_examples} training examples')
  first_epoch = first_step // steps_per_epoch
  max_epochs = (num_steps + steps_per_epoch - 1) // steps_per_epoch + 1
  perms = epoch_permutations(shuffle_seed, first_epoch, max_epochs, num_examples)

  def index_at(step):
    epoch, pos = step // steps_per_epoch, step % steps_per_epoch
    return jax.lax.dynamic_slice(perms[epoch - first_epoch], (pos * batch_size,), (batch_size,))

  def batch_at(step, idx=None):
    epoch = step // steps_per_epoch
    if idx is None:
      idx = index_at(step)
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
    return batch

  batch_at.index_at = index_at
  return batch_at


def make_fused_steps(step_fn, *, num_examples: int, batch_size: int, shuffle_seed: int,
                     num_steps: int, batch_sharding=None):
  """``run(state, data, teacher_vars, teacher_outputs=None) -> (state, summed_metrics)``.

  Runs ``num_steps`` steps. ``data`` is the whole training split on device (``x``,
  ``label``, ``id``). Step ``s`` takes examples ``perm_e[(s mod E)·B : (s mod E + 1)·B]``
  of epoch ``e = s // E`` (``E`` = steps per epoch, the remainder of each epoch
  dropped), so the batches are a pure function of the step and the seed: a resumed
  run sees exactly the same batches.

  ``teacher_outputs``: the live teacher's outputs for these steps, stacked on a leading
  ``num_steps`` axis, from :func:`make_teacher_steps` (run elsewhere, typically on
  other devices, while the previous call's student steps run); the steps then skip the
  teacher forward, and take their batches at the positions the teacher's call used
  (``teacher_outputs[POSITIONS]``) instead of shuffling the epochs again.
  """
  def run(state, data, teacher_vars=None, teacher_outputs=None):
    batch_at = _batches(data, shuffle_seed=shuffle_seed, num_examples=num_examples,
                        batch_size=batch_size, first_step=state.step, num_steps=num_steps,
                        batch_sharding=batch_sharding)

    def body(st, outputs):
      if outputs is None:
        batch = batch_at(st.step)
      else:
        outputs = dict(outputs)
        batch = batch_at(st.step, outputs.pop(POSITIONS, None))
        batch.update(outputs)
      return step_fn(st, batch, teacher_vars)

    state, metrics = jax.lax.scan(body, state, teacher_outputs, length=num_steps)
    return state, jax.tree.map(lambda m: jnp.sum(m, axis=0), metrics)

  return run


def make_teacher_steps(step_fn, *, num_examples: int, batch_size: int, shuffle_seed: int,
                       num_steps: int, batch_sharding=None):
  """``teach(first_step, data, teacher_vars) -> outputs`` for :func:`make_fused_steps`.

  The live teacher's outputs (``step_fn.teacher_outputs``: logits, features,
  attentions on the augmented inputs) for the same ``num_steps`` batches that the fused
  steps starting at ``first_step`` take, stacked on a leading axis, with the batches'
  positions in the split under :data:`POSITIONS` (the student's call reuses them
  instead of shuffling again). The result is the same as the fused steps' own teacher
  forward; what it buys is placement: the teacher's call can run on its own devices,
  one call ahead of the student's.
  """
  def teach(first_step, data, teacher_vars):
    batch_at = _batches(data, shuffle_seed=shuffle_seed, num_examples=num_examples,
                        batch_size=batch_size, first_step=first_step, num_steps=num_steps,
                        batch_sharding=batch_sharding)

    def body(step, _):
      idx = batch_at.index_at(step)
      outputs = dict(step_fn.teacher_outputs(batch_at(step, idx), teacher_vars))
      outputs[POSITIONS] = idx
      return step + 1, outputs

    _, outputs = jax.lax.scan(body, jnp.asarray(first_step, jnp.int32), None, length=num_steps)
    return outputs

  return teach


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
