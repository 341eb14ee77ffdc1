"""The ``:paper`` MNIST-1D configs: the paper's CNN and MLP, parameter for parameter.

The reference architectures are transcribed from the MNIST-1D code
(github.com/greydanus/mnist1d, notebooks/models.py: ``ConvBase`` and ``MLPBase``;
training in notebooks/train.py) into numpy here: PyTorch's ``Conv1d`` (cross-correlation,
zero padding on both sides, stride) and the residual MLP. kdjax's models, built from the
``:paper`` configs, must have the same parameter counts (computed from those layer lists,
5,210 and 15,210 as the reference code prints) and compute the same function from the
same weights.

Reference: Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024
(arXiv:2011.14439).
"""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.config import load_config
from kdjax.errors import UserError
from kdjax.models import from_config

CONFIGS = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'mnist1d')
INPUT_SHAPE = (40, 1)

# The paper's ConvBase: (in, out, kernel, stride, padding) per conv, then Linear(125, 10).
PAPER_CONVS = ((1, 25, 5, 2, 1), (25, 25, 3, 2, 1), (25, 25, 3, 2, 1))
# The paper's MLPBase: Linear(40, 100), Linear(100, 100) (residual), Linear(100, 10).
PAPER_LINEARS = ((40, 100), (100, 100), (100, 10))


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _paper(name):
  return load_config(os.path.join(CONFIGS, name) + ':paper')


def _model(config):
  apply, init, _ = from_config(config.model, num_classes=10, input_shape=INPUT_SHAPE)
  params, state = jax.jit(init)()
  return jax.jit(apply), params, state


def _count(params) -> int:
  return sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))


def _torch_conv1d(x, kernel, bias, stride, padding):
  """PyTorch ``Conv1d`` on ``x [B, C_in, L]`` with its weight ``[C_out, C_in, K]``."""
  b, _, n = x.shape
  k = kernel.shape[-1]
  xp = np.pad(x, ((0, 0), (0, 0), (padding, padding)))
  n_out = (n + 2 * padding - k) // stride + 1
  out = np.empty((b, kernel.shape[0], n_out))
  for t in range(n_out):
    window = xp[:, :, t * stride:t * stride + k]            # [B, C_in, K]
    out[:, :, t] = np.einsum('bck,ock->bo', window, kernel) + bias
  return out


def test_cnn_paper_matches_convbase():
  config = _paper('teacher.py')
  assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.schedule,
          config.optimizer.weight_decay, config.batch_size, config.num_steps,
          config.eval_every) == ('adam', 1e-2, 'constant', 0.0, 100, 6000, 250)
  apply, params, state = _model(config)
  length = INPUT_SHAPE[0]
  for _, _, k, s, p in PAPER_CONVS:
    length = (length + 2 * p - k) // s + 1
  expected = sum(i * o * k + o for i, o, k, _, _ in PAPER_CONVS)
  expected += PAPER_CONVS[-1][1] * length * 10 + 10
  assert length == 5 and expected == 5210
  assert _count(params) == expected

  x = np.asarray(jax.random.normal(jax.random.key(0), (3, *INPUT_SHAPE)))
  out, _ = apply(params, state, jnp.asarray(x))
  h = x.astype(np.float64).transpose(0, 2, 1)               # [B, C, L] as PyTorch
  for i, (_, _, _, s, p) in enumerate(PAPER_CONVS):
    kernel = np.asarray(params['convs'][i]['kernel'], np.float64).transpose(2, 1, 0)
    bias = np.asarray(params['convs'][i]['bias'], np.float64)
    h = np.maximum(_torch_conv1d(h, kernel, bias, s, p), 0.0)
    np.testing.assert_allclose(out.features[f'stage{i + 1}'], h.transpose(0, 2, 1),
                               rtol=1e-5, atol=1e-5)
  # kdjax flattens channels last ([B, L, C]); the head's rows follow that order.
  flat = h.transpose(0, 2, 1).reshape(3, -1)
  logits = flat @ np.asarray(params['head']['kernel']) + np.asarray(params['head']['bias'])
  np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-5)


def test_mlp_paper_matches_mlpbase():
  config = _paper('student_baseline.py')
  assert (config.optimizer.name, config.optimizer.learning_rate, config.optimizer.schedule,
          config.optimizer.weight_decay, config.batch_size, config.num_steps,
          config.eval_every) == ('adam', 1e-2, 'constant', 0.0, 100, 6000, 250)
  apply, params, state = _model(config)
  expected = sum(i * o + o for i, o in PAPER_LINEARS)
  assert expected == 15210 and _count(params) == expected

  x = np.asarray(jax.random.normal(jax.random.key(1), (4, *INPUT_SHAPE)))
  out, _ = apply(params, state, jnp.asarray(x))
  w = [(np.asarray(params['hidden'][i]['kernel'], np.float64),
        np.asarray(params['hidden'][i]['bias'], np.float64)) for i in range(2)]
  h = np.maximum(x.reshape(4, -1) @ w[0][0] + w[0][1], 0.0)
  h = h + np.maximum(h @ w[1][0] + w[1][1], 0.0)           # MLPBase's residual layer
  logits = h @ np.asarray(params['head']['kernel']) + np.asarray(params['head']['bias'])
  np.testing.assert_allclose(out.features['penultimate'], h, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-5)


def test_defaults_unchanged():
  """The default demo configs keep their models: no residual, k // 2 padding, kernel 5."""
  apply, params, state = _model(load_config(os.path.join(CONFIGS, 'student_baseline.py')))
  x = jnp.ones((2, *INPUT_SHAPE))
  out, _ = apply(params, state, x)
  w = [(np.asarray(params['hidden'][i]['kernel']), np.asarray(params['hidden'][i]['bias']))
       for i in range(2)]
  h = np.maximum(np.ones((2, 40)) @ w[0][0] + w[0][1], 0.0)
  h = np.maximum(h @ w[1][0] + w[1][1], 0.0)               # no residual by default
  np.testing.assert_allclose(out.features['penultimate'], h, rtol=1e-5, atol=1e-5)
  apply, params, state = _model(load_config(os.path.join(CONFIGS, 'teacher.py')))
  out, _ = apply(params, state, x)
  assert _count(params) == (1 * 32 * 5 + 32) + 2 * (32 * 32 * 5 + 32) + 160 * 10 + 10
  assert [out.features[f'stage{i}'].shape[1] for i in (1, 2, 3)] == [20, 10, 5]


def test_bad_variant_and_kernel_sizes():
  with pytest.raises(UserError, match='tiny, paper or nothing'):
    load_config(os.path.join(CONFIGS, 'teacher.py') + ':papers')
  from kdjax.models import create
  with pytest.raises(ValueError, match='one entry per stage'):
    create('cnn1d', num_classes=10, input_shape=INPUT_SHAPE, kernel_sizes=(5, 3))
