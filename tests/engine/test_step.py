"""``make_train_step`` on its own: against numpy gradients of softmax regression, with its
penalty, masked auxiliary loss, empty batches and non-finite steps."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.engine import init_train_state
from kdjax.engine import make_train_step
from kdjax.engine import step as step_lib
from kdjax.engine.step import accuracy
from kdjax.losses import build_objective
from kdjax.models import ModelOutput

D, C, B = 5, 3, 8


def linear(params, state, x, *, train=False, rng=None):
  """Softmax regression as a model: logits = x W + b."""
  del train, rng
  logits = x @ params['w'] + params['b']
  return ModelOutput(logits, {'penultimate': x}), state


@pytest.fixture
def problem():
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(D, C)).astype(np.float32), 'b': rng.normal(size=C).astype(np.float32)}
  batch = {'x': rng.normal(size=(B, D)).astype(np.float32),
           'label': np.array([0, 1, 2, 1, -1, 0, 2, 1], np.int32),   # one unlabeled example
           'mask': np.array([1, 1, 1, 1, 1, 1, 0, 0], bool)}          # two padded
  return params, batch


def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def _ce_grads(params, batch):
  """Mean cross-entropy over labeled, unmasked examples and its gradient, in numpy (float64)."""
  x = batch['x'].astype(np.float64)
  keep = batch['mask'] & (batch['label'] >= 0)
  p = _softmax(x @ params['w'] + params['b'])
  onehot = np.eye(C)[np.maximum(batch['label'], 0)]
  n = keep.sum()
  loss = -(np.log(p[keep]) * onehot[keep]).sum() / n
  g = (p - onehot) * keep[:, None] / n
  return loss, {'w': x.T @ g, 'b': g.sum(0)}


def _state(params, tx, objective):
  lp, ls = objective.init(jax.random.key(1), {})
  return init_train_state(jax.tree.map(jnp.asarray, params), {}, tx, rng=jax.random.key(0),
                          loss_params=lp, loss_state=ls)


def test_one_sgd_step_equals_numpy(problem):
  params, batch = problem
  lr = 0.3
  ce = build_objective({'ce': {}})
  step = jax.jit(make_train_step(linear, ce, optax.sgd(lr)))
  state, metrics = step(_state(params, optax.sgd(lr), ce), batch)
  loss, grads = _ce_grads(params, batch)
  for k in params:
    np.testing.assert_allclose(state.params['student'][k], params[k] - lr * grads[k], rtol=1e-5,
                               atol=1e-6)
  assert int(state.step) == 1
  # (sum, count) metrics: the loss over the unmasked examples, accuracy over labeled ones.
  s, c = metrics['loss']
  assert float(c) == 6 and float(s) / float(c) == pytest.approx(loss, rel=1e-5)
  logits = batch['x'] @ params['w'] + params['b']
  keep = batch['mask'] & (batch['label'] >= 0)
  correct = (logits.argmax(-1) == batch['label']) & keep
  assert metrics['accuracy'] == (pytest.approx(correct.sum()), pytest.approx(keep.sum()))
  assert float(metrics['grad_norm'][0]) == pytest.approx(
      np.sqrt(sum((g ** 2).sum() for g in grads.values())), rel=1e-5)
  assert float(metrics['nonfinite'][0]) == 0.0


def test_adam_steps_in_a_scan_equal_optax_on_numpy_gradients(problem):
  params, batch = problem
  tx = optax.adam(0.05)
  ce = build_objective({'ce': {}})
  step = make_train_step(linear, ce, tx)
  state, _ = jax.jit(lambda s: jax.lax.scan(lambda st, _: step(st, batch), s, None, length=3))(
      _state(params, tx, ce))
  ref, opt = {k: v.astype(np.float64) for k, v in params.items()}, tx.init(params)
  for _ in range(3):
    _, grads = _ce_grads(ref, batch)
    updates, opt = tx.update(jax.tree.map(lambda g: g.astype(np.float32), grads), opt)
    ref = {k: ref[k] + np.asarray(updates[k], np.float64) for k in ref}
  for k in params:
    np.testing.assert_allclose(state.params['student'][k], ref[k], rtol=1e-4, atol=1e-5)


def test_teacher_entries_reach_the_objective(problem):
  # KD at T = 1 toward teacher logits in the batch: gradient (p_s - p_t) x / n, times T^2 = 1.
  params, batch = problem
  t = np.random.default_rng(1).normal(size=(B, C)).astype(np.float32)
  kd = build_objective({'kd': {'temperature': 1.0}})
  step = jax.jit(make_train_step(linear, kd, optax.sgd(1.0)))
  state, _ = step(_state(params, optax.sgd(1.0), kd), dict(batch, teacher_logits=t))
  x = batch['x'].astype(np.float64)
  g = (_softmax(x @ params['w'] + params['b']) - _softmax(t)) * batch['mask'][:, None] / 6
  np.testing.assert_allclose(state.params['student']['w'], params['w'] - x.T @ g, rtol=1e-5,
                             atol=1e-6)


def test_penalty_and_masked_auxiliary_loss(problem):
  params, batch = problem
  w0 = jax.tree.map(lambda a: a + 1.0, params)
  mu = 0.5
  penalty = lambda p: mu / 2 * sum(jnp.sum((p[k] - w0[k]) ** 2) for k in p)
  # An auxiliary loss on the logits (sum of squares) whose gradient reaches 'w' only.
  aux = lambda out, b: 0.1 * jnp.sum(out.logits ** 2)
  mask = {'w': 1.0, 'b': 0.0}
  ce = build_objective({'ce': {}})
  step = jax.jit(make_train_step(linear, ce, optax.sgd(1.0), penalty=penalty, aux_loss=aux,
                                 aux_grad_mask=mask))
  state, metrics = step(_state(params, optax.sgd(1.0), ce), batch)
  _, grads = _ce_grads(params, batch)
  x = batch['x'].astype(np.float64)
  logits = x @ params['w'] + params['b']
  aux_w = x.T @ (0.2 * logits)
  want_w = params['w'] - (grads['w'] + mu * (params['w'] - w0['w']) + aux_w)
  want_b = params['b'] - (grads['b'] + mu * (params['b'] - w0['b']))      # no aux gradient
  np.testing.assert_allclose(state.params['student']['w'], want_w, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(state.params['student']['b'], want_b, rtol=1e-4, atol=1e-5)
  # The reported loss includes both extra terms.
  ce, _ = _ce_grads(params, batch)
  pen = mu / 2 * sum(((params[k] - w0[k]) ** 2).sum() for k in params)
  total = ce + pen + 0.1 * (logits ** 2).sum()
  assert float(metrics['loss'][0]) / 6 == pytest.approx(total, rel=1e-4)


def test_an_empty_batch_leaves_the_state_unchanged(problem):
  params, batch = problem
  tx = optax.sgd(0.1, momentum=0.9)
  ce = build_objective({'ce': {}})
  step = jax.jit(make_train_step(linear, ce, tx, skip_empty=True))
  state = _state(params, tx, ce)
  new, metrics = step(state, dict(batch, mask=np.zeros(B, bool)))
  for a, b in zip(jax.tree.leaves(new), jax.tree.leaves(state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert float(metrics['loss'][1]) == 0.0
  moved, _ = step(state, batch)
  assert int(moved.step) == 1


def test_nonfinite_steps_stop_or_skip(problem):
  params, batch = problem
  bad = dict(batch, x=np.where(np.arange(D) == 2, np.nan, batch['x']).astype(np.float32))
  objective = build_objective({'ce': {}})
  stop = jax.jit(make_train_step(linear, objective, optax.sgd(0.1)))
  _, metrics = stop(_state(params, optax.sgd(0.1), objective), bad)
  assert float(metrics['nonfinite'][0]) == 1.0 and 'skipped' not in metrics
  skip = jax.jit(make_train_step(linear, objective, optax.sgd(0.1), nonfinite='skip'))
  state = _state(params, optax.sgd(0.1), objective)
  new, metrics = skip(state, bad)
  np.testing.assert_array_equal(new.params['student']['w'], params['w'])   # update dropped
  assert int(new.step) == 1                                                # the step moved on
  assert float(metrics['skipped'][0]) == 1.0 and 'nonfinite' not in metrics
  assert float(metrics['loss'][0]) == 0.0 and float(metrics['loss'][1]) == 0.0
  good, metrics = skip(state, batch)
  assert float(metrics['skipped'][0]) == 0.0 and float(metrics['loss'][1]) == 6.0
  assert not np.array_equal(good.params['student']['w'], params['w'])
  with pytest.raises(ValueError, match='nonfinite must be one of'):
    make_train_step(linear, objective, optax.sgd(0.1), nonfinite='nan')


def test_accuracy_skips_unlabeled_and_masked_examples():
  logits = jnp.array([[2.0, 0.0], [0.0, 2.0], [2.0, 0.0], [0.0, 2.0]])
  c, n = accuracy(logits, jnp.array([0, 0, -1, 1]), jnp.array([True, True, True, False]))
  assert (float(c), float(n)) == (1.0, 2.0)


@pytest.mark.parametrize('flat_max', [0, 1 << 20])   # leaf by leaf; one flat vector
def test_global_norm_equals_numpy(monkeypatch, flat_max):
  monkeypatch.setattr(step_lib, '_FLAT_NORM_MAX', flat_max)
  rng = np.random.default_rng(3)
  tree = {'a': rng.normal(size=(3, 4)), 'b': [rng.normal(size=5), rng.normal(size=(2, 2, 2))]}
  tree = jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), tree)
  want = np.sqrt(sum(np.sum(np.square(np.asarray(a, np.float64)))
                     for a in jax.tree.leaves(tree)))
  np.testing.assert_allclose(float(jax.jit(step_lib.global_norm)(tree)), want, rtol=1e-6)
  assert float(step_lib.global_norm({})) == 0.0
