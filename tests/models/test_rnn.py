"""char_lstm / char_gru: shapes, parameter counts, cells and the model against numpy."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx
from jax.test_util import check_grads

from kdjax.models import count_params
from kdjax.models import create
from kdjax.models import functional
from kdjax.models import rnn


def _sigmoid(z):
  return 1.0 / (1.0 + np.exp(-z))


def _np_lstm_step(h, c, xt, w, u, b):
  z = xt @ w + h @ u + b
  H = h.shape[-1]
  i, f, g, o = z[:, :H], z[:, H:2 * H], z[:, 2 * H:3 * H], z[:, 3 * H:]
  c = _sigmoid(f) * c + _sigmoid(i) * np.tanh(g)
  return _sigmoid(o) * np.tanh(c), c


def _np_gru_step(h, xt, w, u, b, b_h):
  H = h.shape[-1]
  zx, zh = xt @ w + b, h @ u + b_h
  r = _sigmoid(zx[:, :H] + zh[:, :H])
  upd = _sigmoid(zx[:, H:2 * H] + zh[:, H:2 * H])
  n = np.tanh(zx[:, 2 * H:] + r * zh[:, 2 * H:])
  return (1 - upd) * n + upd * h


def _np_model(p, x, cell):
  """The whole model from the equations, in float64 numpy."""
  h = np.asarray(p['embed']['embedding'], np.float64)[x]
  for layer in (p['rnn'][k] for k in sorted(p['rnn'])):
    w, u, b = (np.asarray(layer[k], np.float64) for k in ('w', 'u', 'b'))
    H = u.shape[0]
    hs, ht, ct = [], np.zeros((x.shape[0], H)), np.zeros((x.shape[0], H))
    for t in range(x.shape[1]):
      if cell == 'lstm':
        ht, ct = _np_lstm_step(ht, ct, h[:, t], w, u, b)
      else:
        ht = _np_gru_step(ht, h[:, t], w, u, b, np.asarray(layer['b_h'], np.float64))
      hs.append(ht)
    h = np.stack(hs, 1)
  head = p['head']
  return h[:, -1] @ np.asarray(head['kernel'], np.float64) + np.asarray(head['bias'])


@pytest.mark.parametrize('name', ['char_lstm', 'char_gru'])
def test_shapes_and_features(name):
  m = create(name, num_classes=11, input_shape=(7,), embed_dim=3, hidden=(5, 6))
  apply, params, state = functional(m)
  out, _ = apply(params, state, jnp.zeros((2, 7), jnp.int32))
  assert out.logits.shape == (2, 11)
  assert out.features['stage1'].shape == (2, 7, 5)
  assert out.features['stage2'].shape == (2, 7, 6)
  assert out.features['penultimate'].shape == (2, 6)
  np.testing.assert_array_equal(out.features['penultimate'], out.features['stage2'][:, -1])


def test_parameter_counts_by_hand():
  # V=5, E=3, H=4, two layers. LSTM (4 gates):
  #   embed 5*3 = 15; layer 1: 3*16 + 4*16 + 16 = 128; layer 2: 4*16 + 4*16 + 16 = 144;
  #   head 4*5 + 5 = 25; total 312.
  m = create('char_lstm', num_classes=5, input_shape=(6,), embed_dim=3, hidden=4, layers=2)
  assert count_params(m) == 312 == rnn.num_params(5, embed_dim=3, hidden=4, layers=2)
  # GRU (3 gates, two biases): layer 1: 3*12 + 4*12 + 12 + 12 = 108; layer 2: 4*12 + 4*12
  # + 24 = 120; total 15 + 108 + 120 + 25 = 268.
  m = create('char_gru', num_classes=5, input_shape=(6,), embed_dim=3, hidden=4, layers=2)
  assert count_params(m) == 268 == rnn.num_params(5, embed_dim=3, hidden=4, layers=2,
                                                   cell='gru')
  # LEAF's Shakespeare LSTM: 76*8 + (8*1024 + 256*1024 + 1024) + (2*256*1024 + 1024)
  # + 256*76 + 76.
  assert rnn.num_params(76) == 608 + 271360 + 525312 + 19532


def test_forget_bias_starts_at_one():
  m = create('char_lstm', num_classes=5, input_shape=(6,), hidden=4, layers=1)
  b = np.asarray(nnx.to_pure_dict(functional(m)[1])['rnn'][0]['b'])
  np.testing.assert_array_equal(b, np.r_[np.zeros(4), np.ones(4), np.zeros(8)])


def test_cell_steps_match_numpy():
  rng = np.random.default_rng(0)
  h, c = rng.normal(size=(3, 4)), rng.normal(size=(3, 4))
  xt, w = rng.normal(size=(3, 2)), rng.normal(size=(2, 16))
  u, b = rng.normal(size=(4, 16)), rng.normal(size=16)
  (hj, cj), out = rnn.lstm_step((jnp.asarray(h, jnp.float32), jnp.asarray(c, jnp.float32)),
                                jnp.asarray(xt @ w + b, jnp.float32), jnp.asarray(u, jnp.float32))
  hn, cn = _np_lstm_step(h, c, xt, w, u, b)
  np.testing.assert_allclose(hj, hn, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(cj, cn, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out, hj)
  w3, u3, b3, bh = (rng.normal(size=s) for s in ((2, 12), (4, 12), 12, 12))
  hg, _ = rnn.gru_step(jnp.asarray(h, jnp.float32), jnp.asarray(xt @ w3 + b3, jnp.float32),
                       jnp.asarray(u3, jnp.float32), jnp.asarray(bh, jnp.float32))
  np.testing.assert_allclose(hg, _np_gru_step(h, xt, w3, u3, b3, bh), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name', ['char_lstm', 'char_gru'])
def test_model_matches_numpy_and_accepts_float_ids(name):
  m = create(name, num_classes=9, input_shape=(6,), embed_dim=3, hidden=(4, 5), seed=3)
  apply, params, state = functional(m)
  x = np.random.default_rng(1).integers(0, 9, size=(4, 6)).astype(np.int32)
  out, _ = jax.jit(apply)(params, state, x)
  ref = _np_model(nnx.to_pure_dict(params), x, name[5:])
  np.testing.assert_allclose(out.logits, ref, rtol=1e-4, atol=1e-5)
  out_f, _ = apply(params, state, x.astype(np.float32))   # padded client arrays
  np.testing.assert_array_equal(out_f.logits, out.logits)


@pytest.mark.parametrize('name', ['char_lstm', 'char_gru'])
def test_gradients_match_finite_differences(name):
  x = jnp.array([[1, 2, 3, 4], [5, 0, 2, 1]], jnp.int32)
  y = jnp.array([3, 1])
  with jax.enable_x64(True):
    m = create(name, num_classes=6, input_shape=(4,), embed_dim=2, hidden=3, layers=2,
               seed=1, dtype=jnp.float64, param_dtype=jnp.float64)
    apply, p64, state = functional(m)
    assert all(a.dtype == jnp.float64 for a in jax.tree.leaves(p64))

    def loss(p):
      out, _ = apply(p, state, x)
      return optax.softmax_cross_entropy_with_integer_labels(out.logits, y).mean()

    check_grads(loss, (p64,), order=1, modes=['rev'], eps=1e-6, atol=1e-6, rtol=1e-5)


def test_vmap_over_clients_equals_per_client_calls():
  m = create('char_lstm', num_classes=7, input_shape=(5,), embed_dim=2, hidden=3, layers=1)
  apply, params, state = functional(m)
  keys = jax.random.split(jax.random.key(0), 3)
  stacked = jax.vmap(lambda k: jax.tree.map(
      lambda a: a + 0.1 * jax.random.normal(k, a.shape), params))(keys)
  x = jax.random.randint(jax.random.key(1), (3, 2, 5), 0, 7)
  batched = jax.vmap(lambda p, xb: apply(p, state, xb)[0].logits)(stacked, x)
  for i in range(3):
    one = apply(jax.tree.map(lambda a: a[i], stacked), state, x[i])[0].logits
    np.testing.assert_allclose(batched[i], one, rtol=1e-5, atol=1e-6)


def test_bad_input_shape_and_cell():
  with pytest.raises(ValueError, match='seq_len'):
    create('char_lstm', num_classes=5, input_shape=(6, 1))
  with pytest.raises(ValueError, match='cell'):
    rnn.RecurrentLayer(2, 3, cell='rnn', rngs=nnx.Rngs(0))
