"""``make_train_step(..., train_accuracy=False)``: the same update and loss without the
per-step accuracy; ``config.train_accuracy`` defaults to today's behaviour."""

import jax
import numpy as np
import optax
import pytest

from kdjax.engine import init_train_state
from kdjax.engine import make_train_step
from kdjax.engine.config import base_config
from kdjax.losses import build_objective
from kdjax.models import ModelOutput

B, T, V = 2, 5, 7


def token_model(params, state, x, *, train=False, rng=None):
  """A bigram language model: logits of the next token = a row of ``w`` per token."""
  del train, rng
  return ModelOutput(params['w'][x], {}), state


@pytest.mark.parametrize('nonfinite', ['stop', 'skip'])
def test_without_accuracy_the_step_is_the_same_less_its_accuracy(nonfinite):
  rng = np.random.default_rng(0)
  params = {'w': rng.normal(size=(V, V)).astype(np.float32)}
  x = rng.integers(0, V, (B, T + 1)).astype(np.int32)
  mask = np.ones((B, T), bool)
  mask[1, 3:] = False
  batch = {'x': x[:, :-1], 'label': x[:, 1:], 'mask': mask}
  objective = build_objective({'ce': {}})
  tx = optax.adam(0.1)
  lp, ls = objective.init(jax.random.key(1), {})
  state = init_train_state(params, {}, tx, rng=jax.random.key(0), loss_params=lp,
                           loss_state=ls)
  runs = {flag: jax.jit(make_train_step(token_model, objective, tx, nonfinite=nonfinite,
                                        train_accuracy=flag))(state, batch)
          for flag in (True, False)}
  (with_state, with_metrics), (without_state, without_metrics) = runs[True], runs[False]
  assert 'accuracy' in with_metrics and 'accuracy' not in without_metrics
  assert set(with_metrics) - set(without_metrics) == {'accuracy'}
  for key in without_metrics:
    np.testing.assert_array_equal(without_metrics[key], with_metrics[key])
  jax.tree.map(np.testing.assert_array_equal, without_state, with_state)
  # The accuracy that was left out: argmax over the vocabulary at the 8 unmasked tokens.
  correct = (params['w'][batch['x']].argmax(-1) == batch['label']) & mask
  assert [float(v) for v in with_metrics['accuracy']] == [correct.sum(), mask.sum()]


def test_config_keeps_train_accuracy_on_by_default():
  assert base_config().train_accuracy is True
