"""Tests for kdjax.losses.features against numpy references written from the formulas."""

import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.losses import features
from kdjax.losses import lelp
from kdjax.losses import minilm
from kdjax.losses import ofa
from kdjax.losses import projectors


def objective(terms):
  """``build_objective`` with ``apply`` jitted (eager dispatch is slow on CPU)."""
  obj = build_objective(terms)
  return obj._replace(apply=jax.jit(obj.apply))


def jitted(module, **static):
  """The module's names, with the given functions jitted (eager dispatch is slow on CPU)."""
  ns = types.SimpleNamespace(**vars(module))
  for name, argnames in static.items():
    setattr(ns, name, jax.jit(getattr(module, name), static_argnames=argnames))
  return ns


F = jitted(features, fitnet=('relu',), attention_transfer=('p', 'pool', 'reduction'), hidden_mse=(), hidden_cosine=(),
           nd_loss=(), batch_class_means=())
M = jitted(minilm, attention_kl=(), value_relation_kl=('num_heads',),
           minilm_attention=('num_heads', 'value_weight'))
O = jitted(ofa, ofa_loss=('eps', 'temperature'))
LP = jitted(lelp, lelp_directions=('num_classes', 'num_directions'), lelp_targets=('scale',),
            lelp_loss=('temperature',))

@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """Full-precision matmuls: the numpy references are float64, and TF32 on GPUs (the
  default there) is off by about 1e-4."""
  with jax.default_matmul_precision('highest'):
    yield


RTOL = 1e-5
ATOL = 1e-6


def rand(seed, shape, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------- numpy references

def np_pool_axis(x, axis, out):
  """Adaptive average pooling of one axis, from the bin formula (independent of the lib)."""
  n = x.shape[axis]
  cells = []
  for i in range(out):
    start = math.floor(i * n / out)
    end = math.ceil((i + 1) * n / out)
    cells.append(np.take(x, np.arange(start, end), axis=axis).mean(axis=axis, keepdims=True))
  return np.concatenate(cells, axis=axis)


def np_match(s, t):
  if s.ndim == t.ndim:
    for ax in range(1, s.ndim - 1):
      m = min(s.shape[ax], t.shape[ax])
      s, t = np_pool_axis(s, ax, m), np_pool_axis(t, ax, m)
    return s, t
  if s.ndim == 2:
    return s, t.mean(axis=tuple(range(1, t.ndim - 1)))
  return s.mean(axis=tuple(range(1, s.ndim - 1))), t


def np_fitnet(kernel, bias, s, t, ex=None, pos=None):
  s, t = np_match(s.astype(np.float64), t.astype(np.float64))
  r = s @ kernel + bias
  err = ((r - t) ** 2).mean(-1)
  out = []
  for i in range(s.shape[0]):
    if ex is not None and not ex[i]:
      out.append(0.0)
      continue
    e = err[i]
    if pos is not None:
      out.append(e[pos[i]].mean() if pos[i].any() else 0.0)
    else:
      out.append(e.mean())
  return np.array(out)


def np_at(s, t, p=2.0, ex=None, pool='feature', reduction='mean'):
  s, t = s.astype(np.float64), t.astype(np.float64)
  if pool == 'feature':
    s, t = np_match(s, t)
  qs = (np.abs(s) ** p).mean(-1)[..., None]
  qt = (np.abs(t) ** p).mean(-1)[..., None]
  if pool == 'map':
    qs, qt = np_match(qs, qt)
  out = []
  for i in range(s.shape[0]):
    a = qs[i].ravel()
    b = qt[i].ravel()
    a = a / np.linalg.norm(a) if np.linalg.norm(a) > 0 else a
    b = b / np.linalg.norm(b) if np.linalg.norm(b) > 0 else b
    v = ((a - b) ** 2).sum() / (a.size if reduction == 'mean' else 1)
    out.append(0.0 if ex is not None and not ex[i] else v)
  return np.array(out)


# ----------------------------------------------------------------------- pooling

@pytest.mark.parametrize('n,m', [(8, 4), (7, 3), (5, 5), (6, 4), (3, 1)])
def test_pool_matrix_matches_bins(n, m):
  x = rand(0, (2, n, 3))
  got = projectors.adaptive_avg_pool(jnp.asarray(x), (m,))
  np.testing.assert_allclose(got, np_pool_axis(x, 1, m), rtol=RTOL, atol=ATOL)


def test_match_spatial_rank_mismatch_errors():
  with pytest.raises(ValueError, match='same rank'):
    projectors.match_spatial(jnp.ones((2, 4, 4, 3)), jnp.ones((2, 4, 3)))


# ----------------------------------------------------------------------- FitNet

FITNET_CASES = [
    ((3, 5), (3, 7)),                      # [B, D]
    ((3, 9, 4), (3, 6, 5)),                # 1-D conv, 9 -> 6 (uneven bins)
    ((2, 8, 8, 3), (2, 4, 4, 6)),          # 2-D conv, student larger
    ((2, 3, 5, 3), (2, 7, 2, 4)),          # mixed: each axis pooled to the smaller
    ((2, 4, 4, 3), (2, 6)),                # spatial student vs vector teacher
    ((2, 6, 4), (2, 6, 8)),                # tokens
]


@pytest.mark.parametrize('s_shape,t_shape', FITNET_CASES)
def test_fitnet_matches_numpy(s_shape, t_shape):
  s, t = rand(1, s_shape), rand(2, t_shape)
  params = F.fitnet_init(jax.random.key(0), s_shape, t_shape, regressor='linear')
  params['bias'] = jnp.asarray(rand(3, params['bias'].shape))
  got = F.fitnet(params, s, t)
  want = np_fitnet(np.asarray(params['kernel']), np.asarray(params['bias']), s, t)
  assert got.shape == (s_shape[0],) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


def test_linear_apply_pins_its_own_precision():
  """FitNet's, LELP's and CRD's projector with ``precision='highest'`` named at the call
  (not only by this module's fixture): a float32 product to 1e-6 wherever it runs, and
  the lowered product carries the pin."""
  params = projectors.linear_init(jax.random.key(0), 16, 8)
  params['bias'] = jnp.asarray(rand(3, (8,)))
  x = rand(4, (3, 5, 16))
  apply = jax.jit(lambda p, x: projectors.linear_apply(p, x, precision='highest'))
  want = x @ np.asarray(params['kernel'], np.float64) + np.asarray(params['bias'])
  np.testing.assert_allclose(apply(params, x), want, rtol=1e-6, atol=1e-6)
  assert 'HIGHEST' in apply.lower(params, x).as_text()
  with jax.default_matmul_precision('default'):   # the pin wins over the ambient setting
    assert 'HIGHEST' in apply.lower(params, x).as_text()


def test_fitnet_init_shapes():
  p = F.fitnet_init(jax.random.key(0), (2, 8, 8, 16), (2, 4, 4, 64), regressor='linear')
  assert p['kernel'].shape == (16, 64) and p['bias'].shape == (64,)
  assert 'bias' not in F.fitnet_init(jax.random.key(0), (2, 16), (2, 64), use_bias=False)
  # The conv regressor's kernel follows the reference's rule on the spatial sizes.
  init = lambda s, t: jax.eval_shape(lambda k: F.fitnet_init(k, s, t), jax.random.key(0))
  conv = lambda s, t: init(s, t)['conv']['kernel'].shape
  assert conv((2, 8, 8, 16), (2, 4, 4, 64)) == (3, 3, 16, 64)     # 2x larger: stride 2
  assert conv((2, 4, 4, 16), (2, 8, 8, 64)) == (4, 4, 16, 64)     # 2x smaller: transposed
  assert conv((2, 6, 5, 16), (2, 4, 4, 64)) == (3, 2, 16, 64)     # valid conv
  assert conv((2, 4, 4, 16), (2, 4, 4, 64)) == (1, 1, 16, 64)
  assert init((2, 4, 4, 16), (2, 4, 4, 64))['bn']['scale'].shape == (64,)
  with pytest.raises(UserError, match="regressor='linear'"):
    F.fitnet_init(jax.random.key(0), (2, 3, 3, 16), (2, 5, 5, 64))
  with pytest.raises(UserError, match="regressor='linear'"):
    F.fitnet_init(jax.random.key(0), (2, 16), (2, 64), regressor='conv')
  with pytest.raises(UserError, match='unknown regressor'):
    F.fitnet_init(jax.random.key(0), (2, 16), (2, 64), regressor='mlp')
  # LeCun normal: variance ~ 1 / fan_in.
  big = F.fitnet_init(jax.random.key(1), (2, 256), (2, 256))['kernel']
  assert abs(float(jnp.var(big)) * 256 - 1.0) < 0.15


def test_fitnet_grads():
  s, t = rand(1, (2, 4, 4, 3)), rand(2, (2, 2, 2, 5))
  params = F.fitnet_init(jax.random.key(0), s.shape, t.shape, regressor='linear')
  f = lambda p, s: F.fitnet(p, s, t).sum()
  check_grads(f, (params, jnp.asarray(s, jnp.float64) if jax.config.x64_enabled else s),
              order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


def test_fitnet_conv_regressor_extremes_and_relu_option():
  # Values, gradients and masks against the reference: test_feature_parity.py.
  s, t = rand(1, (3, 4, 4, 3)), rand(2, (3, 4, 4, 5))
  params = F.fitnet_init(jax.random.key(0), s.shape, t.shape)          # 1x1 conv, BN, ReLU
  params['bn'] = {'scale': jnp.asarray(rand(3, (5,))), 'bias': jnp.asarray(rand(4, (5,)))}
  vg = jax.jit(jax.value_and_grad(lambda s: F.fitnet(params, s, t).sum()))
  for x in (np.zeros_like(s), rand(5, s.shape, 1e15), rand(5, s.shape, 1e-15)):
    v, g = vg(x)                   # batch norm of a constant (zero variance) or extreme batch
    assert np.isfinite(v) and np.all(np.isfinite(g))
  # The reference's use_relu=False drops the final ReLU.
  assert not np.allclose(F.fitnet(params, s, t, relu=False), F.fitnet(params, s, t))


def test_fitnet_example_mask_zero_value_and_grad():
  s, t = rand(1, (3, 4, 4, 3)), rand(2, (3, 4, 4, 5))
  s[1] = np.nan                          # garbage in a padded example must not leak
  where = np.array([True, False, True])
  params = F.fitnet_init(jax.random.key(0), s.shape, t.shape, regressor='linear')
  val = F.fitnet(params, s, t, where=where)
  assert val[1] == 0.0
  sc, tc = s.copy(), t.copy()
  sc[1] = 0.0
  np.testing.assert_allclose(val, np_fitnet(np.asarray(params['kernel']), 0.0, sc, tc, ex=where),
                             rtol=RTOL, atol=ATOL)
  gs, gp = jax.grad(lambda s, p: F.fitnet(p, s, t, where=where).sum(), argnums=(0, 1))(s, params)
  assert np.all(np.asarray(gs[1]) == 0.0)
  assert np.all(np.isfinite(gs)) and np.all(np.isfinite(gp['kernel']))


def test_fitnet_position_mask():
  s, t = rand(1, (2, 5, 4)), rand(2, (2, 5, 6))
  pos = np.array([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]], bool)
  params = F.fitnet_init(jax.random.key(0), s.shape, t.shape)
  got = F.fitnet(params, s, t, where=pos)
  want = np_fitnet(np.asarray(params['kernel']), 0.0, s, t, pos=pos)
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  g = jax.grad(lambda s: F.fitnet(params, s, t, where=pos).sum())(s)
  assert np.all(np.asarray(g)[~pos] == 0.0)


def test_fitnet_extreme_and_bf16():
  params = F.fitnet_init(jax.random.key(0), (2, 4, 4, 3), (2, 4, 4, 5), regressor='linear')
  vg = jax.jit(jax.value_and_grad(lambda s: F.fitnet(params, s, jnp.zeros((2, 4, 4, 5))).sum()))
  for s in (np.zeros((2, 4, 4, 3), np.float32), rand(1, (2, 4, 4, 3), 1e15)):
    v, g = vg(s)
    assert np.isfinite(v) and np.all(np.isfinite(g))
  s, t = rand(1, (2, 4, 4, 3)), rand(2, (2, 4, 4, 5))
  got = F.fitnet(params, jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, F.fitnet(params, s, t), rtol=3e-2)


def fake_inputs(batch=3, seed=0, where=None):
  return {
      'student_features': {'stage1': jnp.asarray(rand(seed, (batch, 8, 8, 4))),
                           'penultimate': jnp.asarray(rand(seed + 1, (batch, 6)))},
      'teacher_features': {'stage1': jnp.asarray(rand(seed + 2, (batch, 8, 8, 8))),
                           'stage2': jnp.asarray(rand(seed + 3, (batch, 4, 4, 16))),
                           'penultimate': jnp.asarray(rand(seed + 4, (batch, 10)))},
      'where': jnp.ones((batch,), bool) if where is None else jnp.asarray(where),
      'step': jnp.zeros((), jnp.int32),
  }


def test_fitnet_objective_init_apply_and_grads_reach_projector():
  inputs = fake_inputs()
  s, t = inputs['student_features']['stage1'], inputs['teacher_features']['stage2']
  obj = objective({'hint': dict(loss='fitnet', student='stage1', teacher='stage2',
                                regressor='linear')})
  params, state = obj.init(jax.random.key(0), inputs)
  assert params['hint']['kernel'].shape == (4, 16)
  loss, _, metrics = obj.apply(params, state, inputs)
  want = np_fitnet(np.asarray(params['hint']['kernel']), np.asarray(params['hint']['bias']),
                   np.asarray(s), np.asarray(t)).mean()
  np.testing.assert_allclose(loss, want, rtol=RTOL)
  assert float(metrics['loss/hint'][1]) == 3.0
  grads = jax.grad(lambda p: obj.apply(p, state, inputs)[0])(params)
  assert float(jnp.abs(grads['hint']['kernel']).sum()) > 0
  # The default: the reference's conv + batch norm + ReLU regressor (values and gradients:
  # test_feature_parity.py).
  obj = build_objective({'hint': dict(loss='fitnet', student='stage1', teacher='stage2')})
  params = jax.eval_shape(obj.init, jax.random.key(0), inputs)[0]
  assert params['hint']['conv']['kernel'].shape == (3, 3, 4, 16)
  assert params['hint']['bn']['scale'].shape == (16,)


def test_fitnet_term_masks_examples_and_reports_missing_feature():
  obj = objective({'hint': dict(loss='fitnet', student='stage1', teacher='stage2')})
  inputs = fake_inputs(where=[True, False, True])
  params, state = obj.init(jax.random.key(0), inputs)
  loss, _, metrics = obj.apply(params, state, inputs)
  kept = {k: v for k, v in inputs.items()}
  rows = jnp.array([0, 2])
  for side in ('student_features', 'teacher_features'):
    kept[side] = {n: v[rows] for n, v in inputs[side].items()}
  kept['where'] = jnp.ones((2,), bool)
  loss2, _, _ = obj.apply(params, state, kept)
  np.testing.assert_allclose(loss, loss2, rtol=RTOL)
  assert float(metrics['loss/hint'][1]) == 2.0
  bad = objective({'hint': dict(loss='fitnet', student='nope', teacher='stage2')})
  with pytest.raises(ValueError, match="student feature 'nope' not found"):
    bad.init(jax.random.key(0), inputs)


def test_fitnet_term_per_token_where():
  b, t_len = 2, 5
  inputs = {
      'student_features': {'h': jnp.asarray(rand(0, (b, t_len, 4)))},
      'teacher_features': {'h': jnp.asarray(rand(1, (b, t_len, 6)))},
      'where': jnp.asarray([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool),
  }
  obj = objective({'hint': dict(loss='fitnet', student='h', teacher='h')})
  params, state = obj.init(jax.random.key(0), inputs)
  loss, _, _ = obj.apply(params, state, inputs)
  # The objective's masked mean then equals the mean over all valid tokens.
  k, bias = np.asarray(params['hint']['kernel']), np.asarray(params['hint']['bias'])
  err = (((np.asarray(inputs['student_features']['h']) @ k + bias)
          - np.asarray(inputs['teacher_features']['h'])) ** 2).mean(-1)
  np.testing.assert_allclose(loss, err[np.asarray(inputs['where'])].mean(), rtol=RTOL)


# ----------------------------------------------------------------------- attention transfer

AT_CASES = [
    ((3, 4, 4, 3), (3, 4, 4, 7)),
    ((2, 8, 8, 3), (2, 4, 4, 5)),          # student pooled
    ((2, 3, 3, 3), (2, 7, 5, 5)),          # teacher pooled, uneven
    ((2, 6, 4), (2, 6, 8)),                # tokens
]


@pytest.mark.parametrize('s_shape,t_shape', AT_CASES)
@pytest.mark.parametrize('p', [2.0, 1.0])
def test_attention_transfer_matches_numpy(s_shape, t_shape, p):
  s, t = rand(1, s_shape), rand(2, t_shape)
  np.testing.assert_allclose(F.attention_transfer(s, t, p=p), np_at(s, t, p),
                             rtol=RTOL, atol=ATOL)
  # The options: pool the map instead of the feature, sum instead of mean.
  np.testing.assert_allclose(F.attention_transfer(s, t, p=p, pool='map', reduction='sum'),
                             np_at(s, t, p, pool='map', reduction='sum'), rtol=RTOL, atol=ATOL)


def test_attention_transfer_known_values():
  # Identical maps -> 0; disjoint one-hot maps -> |e1 - e2|^2 = 2.
  s = np.zeros((1, 2, 2, 1), np.float32)
  t = np.zeros((1, 2, 2, 1), np.float32)
  s[0, 0, 0, 0], t[0, 1, 1, 0] = 3.0, 5.0
  assert float(F.attention_transfer(s, t, reduction='sum')[0]) == pytest.approx(2.0)
  assert float(F.attention_transfer(s, t)[0]) == pytest.approx(2.0 / 4)   # mean over 4 cells
  assert float(F.attention_transfer(s, 2 * s)[0]) == pytest.approx(0.0, abs=1e-7)
  with pytest.raises(UserError, match='pool'):
    features.attention_transfer(s, t, pool='both')
  with pytest.raises(UserError, match='reduction'):
    features.attention_transfer(s, t, reduction='max')


def test_attention_transfer_grads():
  s, t = rand(1, (2, 3, 3, 2)), rand(2, (2, 3, 3, 4))
  check_grads(lambda s: F.attention_transfer(s, t).sum(), (s,), order=1, modes=['rev'],
              atol=1e-2, rtol=1e-2)


def test_attention_transfer_mask_extreme_bf16():
  s, t = rand(1, (3, 4, 4, 3)), rand(2, (3, 4, 4, 5))
  s[1] = np.inf
  where = np.array([True, False, True])
  val = F.attention_transfer(s, t, where=where)
  assert val[1] == 0.0
  np.testing.assert_allclose(np.asarray(val)[[0, 2]], np_at(s[[0, 2]], t[[0, 2]]),
                             rtol=RTOL, atol=ATOL)
  g = jax.grad(lambda s: F.attention_transfer(s, t, where=where).sum())(s)
  assert np.all(np.asarray(g[1]) == 0.0) and np.all(np.isfinite(g))
  vg = jax.jit(jax.value_and_grad(lambda x: F.attention_transfer(x, t[:2]).sum()))
  for scale in (0.0, 1e-30, 1e30):
    x = rand(3, (2, 4, 4, 3), scale) if scale else np.zeros((2, 4, 4, 3), np.float32)
    v, g = vg(x)
    assert np.isfinite(v) and np.all(np.isfinite(g)), scale
  # Scale invariance holds at the extremes too.
  np.testing.assert_allclose(F.attention_transfer(s[[0]] * 1e30, t[[0]]),
                             np_at(s[[0]], t[[0]]), rtol=1e-4)
  got = F.attention_transfer(jnp.asarray(s[[0, 2]], jnp.bfloat16),
                             jnp.asarray(t[[0, 2]], jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_at(s[[0, 2]], t[[0, 2]]), rtol=5e-2, atol=5e-3)


def test_attention_transfer_token_mask():
  s, t = rand(1, (2, 5, 3)), rand(2, (2, 5, 4))
  pos = np.array([[1, 1, 1, 0, 0], [1, 0, 1, 0, 1]], bool)
  s_bad = s.copy()
  s_bad[~pos] = np.nan
  got = F.attention_transfer(s_bad, t, where=pos)
  want = [np_at(s[i][pos[i]][None], t[i][pos[i]][None])[0] for i in range(2)]
  np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)
  g = jax.grad(lambda s: F.attention_transfer(s, t, where=pos).sum())(s_bad)
  assert np.all(np.asarray(g)[~pos] == 0.0) and np.all(np.isfinite(g))
  with pytest.raises(ValueError, match='same positions'):
    F.attention_transfer(rand(1, (2, 4, 3)), rand(2, (2, 5, 3)), where=np.ones((2, 4), bool))


def test_attention_transfer_term_sums_pairs():
  inputs = fake_inputs()
  s, t = inputs['student_features'], inputs['teacher_features']
  obj = objective({'at': dict(loss='attention_transfer', student=['stage1', 'stage1'],
                                    teacher=['stage1', 'stage2'])})
  params, state = obj.init(jax.random.key(0), inputs)
  assert params == {'at': {}}
  loss, _, _ = obj.apply(params, state, inputs)
  want = (np_at(np.asarray(s['stage1']), np.asarray(t['stage1']))
          + np_at(np.asarray(s['stage1']), np.asarray(t['stage2']))).mean()
  np.testing.assert_allclose(loss, want, rtol=RTOL)
  with pytest.raises(ValueError, match='pair up'):
    objective({'at': dict(loss='attention_transfer', student=['a', 'b'], teacher='c')})
  # By default every stage both sides have, paired by name (here stage1 only).
  obj = objective({'at': dict(loss='attention_transfer')})
  loss, _, _ = obj.apply(*obj.init(jax.random.key(0), inputs), inputs)
  want = np_at(np.asarray(s['stage1']), np.asarray(t['stage1'])).mean()
  np.testing.assert_allclose(loss, want, rtol=RTOL)
  with pytest.raises(UserError, match='both student and teacher'):
    objective({'at': dict(loss='attention_transfer', student='stage1')})


# ----------------------------------------------------------------------- hidden states

def np_hidden(s, t, kind, pos=None):
  s, t = s.astype(np.float64), t.astype(np.float64)
  if kind == 'mse':
    e = ((s - t) ** 2).mean(-1)
  else:
    ns, nt = np.linalg.norm(s, axis=-1), np.linalg.norm(t, axis=-1)
    cos = (s * t).sum(-1) / np.where(ns * nt > 0, ns * nt, 1.0)
    e = 1.0 - cos
  out = []
  for i in range(s.shape[0]):
    if pos is None:
      out.append(e[i].mean())
    else:
      out.append(e[i][pos[i]].mean() if pos[i].any() else 0.0)
  return np.array(out)


@pytest.mark.parametrize('kind', ['mse', 'cosine'])
def test_hidden_losses_match_numpy_with_token_mask(kind):
  fn = F.hidden_mse if kind == 'mse' else F.hidden_cosine
  s, t = rand(1, (3, 5, 4)), rand(2, (3, 5, 4))
  np.testing.assert_allclose(fn(s, t), np_hidden(s, t, kind), rtol=RTOL, atol=ATOL)
  pos = np.array([[1, 1, 0, 0, 0], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], bool)
  s_bad = s.copy()
  s_bad[~pos] = np.nan
  got = fn(s_bad, t, where=pos)
  np.testing.assert_allclose(got, np_hidden(s, t, kind, pos), rtol=RTOL, atol=ATOL)
  g = jax.grad(lambda s: fn(s, t, where=pos).sum())(s_bad)
  assert np.all(np.asarray(g)[~pos] == 0.0) and np.all(np.isfinite(g))
  check_grads(lambda s: fn(s, t).sum(), (s,), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


def test_hidden_cosine_zero_and_extreme_vectors_and_bf16():
  t = rand(2, (2, 3, 4))
  vg = jax.jit(jax.value_and_grad(lambda s: F.hidden_cosine(s, t).sum()))
  for s in (np.zeros((2, 3, 4), np.float32), rand(1, (2, 3, 4), 1e30), rand(1, (2, 3, 4), 1e-30)):
    v, g = vg(s)
    assert np.isfinite(v) and np.all(np.isfinite(g))
  np.testing.assert_allclose(F.hidden_cosine(np.zeros((2, 3, 4), np.float32), t), [1.0, 1.0])
  s = rand(1, (2, 3, 4))
  np.testing.assert_allclose(F.hidden_cosine(s * 1e30, t), np_hidden(s, t, 'cosine'), rtol=1e-4)
  for fn, kind in ((F.hidden_mse, 'mse'), (F.hidden_cosine, 'cosine')):
    got = fn(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
    assert got.dtype == jnp.float32
    np.testing.assert_allclose(got, np_hidden(s, t, kind), rtol=3e-2, atol=1e-2)
  v, g = jax.value_and_grad(lambda s: F.hidden_mse(s, t).sum())(rand(1, (2, 3, 4), 1e15))
  assert np.isfinite(v) and np.all(np.isfinite(g))


def test_hidden_term_token_where_is_token_mean():
  s, t = rand(1, (2, 4, 3)), rand(2, (2, 4, 3))
  where = np.array([[1, 1, 1, 0], [1, 0, 0, 0]], bool)
  inputs = {'student_features': {'hidden': s}, 'teacher_features': {'hidden': t},
            'where': where}
  obj = objective({'h': dict(loss='hidden_mse')})
  params, state = obj.init(jax.random.key(0), inputs)
  loss, _, _ = obj.apply(params, state, inputs)
  np.testing.assert_allclose(loss, ((s - t) ** 2).mean(-1)[where].mean(), rtol=RTOL)
  with pytest.raises(ValueError, match='use fitnet'):
    F.hidden_mse(s, rand(3, (2, 4, 5)))


# ----------------------------------------------------------------------- ND

def np_nd(s, t, c):
  out = []
  for si, ti, ci in zip(s.astype(np.float64), t.astype(np.float64), c.astype(np.float64)):
    if not np.linalg.norm(ci) > 0:
      out.append(np.nan)
      continue
    e = ci / np.linalg.norm(ci)
    out.append(1.0 - si @ e / max(np.linalg.norm(si), np.linalg.norm(ti)))
  return np.array(out)


def test_nd_loss_matches_numpy_and_masks():
  s, t, c = rand(1, (4, 5)), rand(2, (4, 5)), rand(3, (4, 5))
  np.testing.assert_allclose(F.nd_loss(s, t, c), np_nd(s, t, c), rtol=RTOL, atol=ATOL)
  check_grads(lambda s: F.nd_loss(s, t, c).sum(), (s,), order=1, modes=['rev'],
              atol=1e-2, rtol=1e-2)
  where = np.array([True, False, True, True])
  s_bad = s.copy()
  s_bad[1] = np.nan
  got = F.nd_loss(s_bad, t, c, where=where)
  assert got[1] == 0.0
  np.testing.assert_allclose(np.asarray(got)[where], np_nd(s, t, c)[where], rtol=RTOL)
  g = jax.grad(lambda s: F.nd_loss(s, t, c, where=where).sum())(s_bad)
  assert np.all(np.asarray(g[1]) == 0.0) and np.all(np.isfinite(g))
  # Extreme and zero vectors: finite values and gradients; scale handled jointly.
  for scale in (1e30, 1e-30):
    np.testing.assert_allclose(F.nd_loss(s * scale, t * scale, c), np_nd(s, t, c), rtol=1e-4)
  z = np.zeros_like(s)
  for args in ((z, z, c), (z, t, z), (s * 1e30, t, c)):
    v, g = jax.value_and_grad(lambda s: F.nd_loss(s, *args[1:]).sum())(args[0])
    assert np.isfinite(v) and np.all(np.isfinite(g))
  got = F.nd_loss(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), c)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_nd(s, t, c), rtol=5e-2, atol=5e-3)


def test_batch_class_means_and_nd_term():
  t = rand(2, (5, 3))
  labels = np.array([0, 1, 0, -1, 1])
  means = F.batch_class_means(t, labels)
  want = np.stack([t[[0, 2]].mean(0), t[[1, 4]].mean(0), t[[0, 2]].mean(0), np.zeros(3),
                   t[[1, 4]].mean(0)])
  np.testing.assert_allclose(means, want, rtol=RTOL, atol=ATOL)
  s = rand(1, (5, 3))
  inputs = {'student_features': {'penultimate': s}, 'teacher_features': {'penultimate': t},
            'labels': labels, 'where': np.ones(5, bool)}
  obj = objective({'nd': dict(loss='nd_loss')})
  params, state = obj.init(jax.random.key(0), inputs)
  assert params == {'nd': {}}                              # same width: no projector
  loss, _, metrics = obj.apply(params, state, inputs)
  per = np_nd(s, t, want)
  np.testing.assert_allclose(loss, per[labels >= 0].mean(), rtol=RTOL)
  assert float(metrics['loss/nd'][1]) == 4.0               # the unlabeled example is skipped
  fixed = rand(4, (2, 3))
  obj2 = objective({'nd': dict(loss='nd_loss', class_means=fixed)})
  loss2, _, _ = obj2.apply(params, state, inputs)
  np.testing.assert_allclose(loss2, np_nd(s, t, fixed[np.maximum(labels, 0)])[labels >= 0].mean(),
                             rtol=RTOL)
  # Different widths: a learned projector that receives gradients.
  inputs['student_features'] = {'penultimate': rand(5, (5, 7))}
  params, state = obj.init(jax.random.key(0), inputs)
  assert params['nd']['kernel'].shape == (7, 3)
  g = jax.grad(lambda p: obj.apply(p, state, inputs)[0])(params)
  assert float(jnp.abs(g['nd']['kernel']).sum()) > 0


# ----------------------------------------------------------------------- MiniLM



def np_softmax(x, axis=-1):
  x = x - x.max(axis=axis, keepdims=True)
  e = np.exp(x)
  return e / e.sum(axis=axis, keepdims=True)


def np_minilm(a_s, a_t, v_s=None, v_t=None, heads=None, pos=None):
  b, h, q, _ = a_s.shape
  out = []
  for i in range(b):
    qs = range(q) if pos is None else [j for j in range(q) if pos[i, j]]
    keys = list(range(q)) if pos is None else [j for j in range(q) if pos[i, j]]
    total, count = 0.0, 0
    for a in range(h):
      for j in qs:
        p, r = a_t[i, a, j].astype(np.float64), a_s[i, a, j].astype(np.float64)
        total += (p * (np.log(p) - np.log(r))).sum()
        count += 1
    val = total / max(count, 1)
    if v_s is not None:
      total, count = 0.0, 0
      for vs_all, vt_all in [(v_s[i], v_t[i])]:
        def rel(v):
          d = v.shape[-1] // heads
          vh = v[keys].astype(np.float64).reshape(len(keys), heads, d).transpose(1, 0, 2)
          return np_softmax(vh @ vh.transpose(0, 2, 1) / np.sqrt(d))
        rs, rt = rel(vs_all), rel(vt_all)
        for a in range(heads):
          for j in range(len(keys)):
            total += (rt[a, j] * (np.log(rt[a, j]) - np.log(rs[a, j]))).sum()
            count += 1
      val += total / max(count, 1)
    out.append(val)
  return np.array(out)


def rand_attn(seed, shape):
  return np_softmax(rand(seed, shape) * 2).astype(np.float32)


def test_minilm_matches_numpy():
  a_s, a_t = rand_attn(1, (2, 3, 4, 4)), rand_attn(2, (2, 3, 4, 4))
  v_s, v_t = rand(3, (2, 4, 6)), rand(4, (2, 4, 9))
  np.testing.assert_allclose(M.attention_kl(a_s, a_t), np_minilm(a_s, a_t), rtol=1e-4)
  np.testing.assert_allclose(M.minilm_attention(a_s, a_t, v_s, v_t),
                             np_minilm(a_s, a_t, v_s, v_t, heads=3), rtol=1e-4)


def test_minilm_token_mask_and_grads():
  a_s, a_t = rand_attn(1, (2, 2, 4, 4)), rand_attn(2, (2, 2, 4, 4))
  v_s, v_t = rand(3, (2, 4, 4)), rand(4, (2, 4, 6))
  pos = np.array([[1, 1, 1, 0], [1, 1, 0, 0]], bool)
  # Padded keys carry no attention, as a model's masked softmax would give.
  a_s = a_s * pos[:, None, None, :]
  a_s /= a_s.sum(-1, keepdims=True)
  a_t = a_t * pos[:, None, None, :]
  a_t /= a_t.sum(-1, keepdims=True)
  v_bad = v_s.copy()
  v_bad[~pos] = np.nan
  got = M.minilm_attention(a_s, a_t, v_bad, v_t, where=pos)
  ref_as = [a_s[i][:, pos[i]][:, :, pos[i]] for i in range(2)]
  ref_at = [a_t[i][:, pos[i]][:, :, pos[i]] for i in range(2)]
  want = [np_minilm(ref_as[i][None], ref_at[i][None], v_s[i][pos[i]][None],
                    v_t[i][pos[i]][None], heads=2)[0] for i in range(2)]
  np.testing.assert_allclose(got, want, rtol=1e-4)
  g = jax.grad(lambda v: M.minilm_attention(a_s, a_t, v, v_t, where=pos).sum())(v_bad)
  assert np.all(np.asarray(g)[~pos] == 0.0) and np.all(np.isfinite(g))
  check_grads(lambda v: M.value_relation_kl(v, v_t, 2).sum(), (v_s,), order=1, modes=['rev'],
              atol=1e-2, rtol=1e-2)
  # Example mask: exactly zero.
  ex = np.array([True, False])
  assert float(M.minilm_attention(a_s, a_t, v_s, v_t, where=ex)[1]) == 0.0


def test_minilm_extremes_bf16_and_term():
  a = rand_attn(1, (2, 2, 3, 3))
  hard = np.zeros_like(a)
  hard[..., 0] = 1.0                                     # one-hot teacher, zero elsewhere
  v, g = jax.value_and_grad(lambda a: M.attention_kl(a, hard).sum())(a)
  assert np.isfinite(v) and np.all(np.isfinite(g))
  v, g = jax.value_and_grad(lambda a: M.attention_kl(hard, a).sum())(hard)
  assert np.isfinite(v) and np.all(np.isfinite(g))       # zero student probs: large, finite
  vz = np.zeros((2, 3, 4), np.float32)
  val, g = jax.value_and_grad(lambda v: M.value_relation_kl(v, rand(5, (2, 3, 4)), 2).sum())(vz)
  assert np.isfinite(val) and np.all(np.isfinite(g))
  got = M.attention_kl(jnp.asarray(a, jnp.bfloat16), jnp.asarray(a[::-1], jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_minilm(a, a[::-1]), rtol=5e-2, atol=1e-2)
  inputs = {'student_attentions': (a[::-1], a), 'teacher_attentions': (a, a, a[::-1]),
            'student_features': {'v': rand(2, (2, 3, 4))},
            'teacher_features': {'v': rand(3, (2, 3, 8))}, 'where': np.ones(2, bool)}
  obj = objective({'m': dict(loss='minilm_attention', student_values='v',
                                   teacher_values='v')})
  p, s = obj.init(jax.random.key(0), inputs)
  loss, _, _ = obj.apply(p, s, inputs)
  want = np_minilm(a, a[::-1], np.asarray(inputs['student_features']['v']),
                   np.asarray(inputs['teacher_features']['v']), heads=2).mean()
  np.testing.assert_allclose(loss, want, rtol=1e-4)


# ----------------------------------------------------------------------- OFA



def np_ofa(zs, zt, labels, eps, temp):
  ps = np_softmax(zs.astype(np.float64) / temp)
  pt = np_softmax(zt.astype(np.float64) / temp)
  out = []
  for i in range(zs.shape[0]):
    total = 0.0
    for c in range(zs.shape[1]):
      m = 1.0 if c == labels[i] else 0.0
      total -= ((pt[i, c] + m) ** eps - m) * np.log(ps[i, c])
    out.append(total)
  return np.array(out)


@pytest.mark.parametrize('eps,temp', [(1.0, 1.0), (1.5, 1.0), (1.2, 2.0)])
def test_ofa_loss_matches_numpy(eps, temp):
  zs, zt = rand(1, (4, 5)), rand(2, (4, 5))
  labels = np.array([0, 3, -1, 4])
  np.testing.assert_allclose(O.ofa_loss(zs, zt, labels, eps=eps, temperature=temp),
                             np_ofa(zs, zt, labels, eps, temp), rtol=RTOL, atol=ATOL)
  check_grads(lambda z: O.ofa_loss(z, zt, labels, eps=eps).sum(), (zs,), order=1,
              modes=['rev'], atol=1e-2, rtol=1e-2)


def test_ofa_mask_extreme_bf16_and_term():
  zs, zt = rand(1, (3, 4)), rand(2, (3, 4))
  labels = np.array([1, 2, 0])
  where = np.array([True, False, True])
  z_bad = zs.copy()
  z_bad[1] = np.nan
  got = O.ofa_loss(z_bad, zt, labels, eps=1.3, where=where)
  assert got[1] == 0.0
  np.testing.assert_allclose(np.asarray(got)[where], np_ofa(zs, zt, labels, 1.3, 1.0)[where],
                             rtol=RTOL)
  g = jax.grad(lambda z: O.ofa_loss(z, zt, labels, where=where).sum())(z_bad)
  assert np.all(np.asarray(g[1]) == 0.0) and np.all(np.isfinite(g))
  for z in (zs * 1e30, np.zeros_like(zs)):
    v, g = jax.value_and_grad(lambda z: O.ofa_loss(z, zt * 1e30, labels, eps=1.5).sum())(z)
    assert np.all(np.isfinite(g))
  got = O.ofa_loss(jnp.asarray(zs, jnp.bfloat16), jnp.asarray(zt, jnp.bfloat16), labels)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_ofa(zs, zt, labels, 1.0, 1.0), rtol=3e-2)
  inputs = fake_inputs()
  inputs['teacher_logits'] = jnp.asarray(rand(9, (3, 5)))
  inputs['student_logits'] = jnp.asarray(rand(10, (3, 5)))
  inputs['labels'] = jnp.asarray([0, 4, 2])
  obj = objective({'ofa': dict(loss='ofa', student=['stage1', 'penultimate'], eps=1.2,
                                     projector='linear')})
  params, state = obj.init(jax.random.key(0), inputs)
  assert params['ofa']['stage1']['kernel'].shape == (4, 5)
  assert params['ofa']['penultimate']['kernel'].shape == (6, 5)
  loss, _, _ = obj.apply(params, state, inputs)
  lab = np.asarray(inputs['labels'])
  zt_np = np.asarray(inputs['teacher_logits'])
  want = np_ofa(np.asarray(inputs['student_logits']), zt_np, lab, 1.2, 1.0)
  for name in ('stage1', 'penultimate'):
    f = np.asarray(inputs['student_features'][name]).astype(np.float64)
    f = f.reshape(f.shape[0], -1, f.shape[-1]).mean(1)
    p = params['ofa'][name]
    want = want + np_ofa(f @ np.asarray(p['kernel']) + np.asarray(p['bias']), zt_np, lab, 1.2, 1.0)
  np.testing.assert_allclose(loss, want.mean(), rtol=1e-4)
  g = jax.grad(lambda p: obj.apply(p, state, inputs)[0])(params)
  assert all(float(jnp.abs(g['ofa'][n]['kernel']).sum()) > 0 for n in ('stage1', 'penultimate'))
  # Without the logits term, per-feature eps (one per feature, one for the logits).
  obj = objective({'ofa': dict(loss='ofa', student=['stage1', 'penultimate'], projector='linear',
                               eps=[1.1, 1.3, 1.7], include_logits=False)})
  loss, _, _ = obj.apply(params, state, inputs)
  want = 0.0
  for name, eps in (('stage1', 1.1), ('penultimate', 1.3)):
    f = np.asarray(inputs['student_features'][name]).astype(np.float64)
    f = f.reshape(f.shape[0], -1, f.shape[-1]).mean(1)
    p = params['ofa'][name]
    want = want + np_ofa(f @ np.asarray(p['kernel']) + np.asarray(p['bias']), zt_np, lab, eps, 1.0)
  np.testing.assert_allclose(loss, want.mean(), rtol=1e-4)
  with pytest.raises(UserError, match='eps needs'):
    objective({'ofa': dict(loss='ofa', student='stage1', eps=[1.0, 1.1, 1.2])}).apply(
        params, state, inputs)


def test_ofa_default_term_uses_reference_projectors_on_every_stage():
  # Values, gradients and masks against the reference: test_feature_parity.py.
  b, classes = 3, 5
  inputs = {'student_features': {'stage1': jnp.zeros((b, 8, 8, 4)),
                                 'stage2': jnp.zeros((b, 4, 4, 8)),
                                 'penultimate': jnp.zeros((b, 8))},
            'teacher_features': {'penultimate': jnp.zeros((b, 12))},
            'teacher_logits': jnp.zeros((b, classes))}
  p = jax.eval_shape(build_objective({'ofa': {}}).init, jax.random.key(0), inputs)[0]['ofa']
  assert sorted(p) == ['stage1', 'stage2']
  # stage1 of 2: one SepConv block to max(student 8, teacher 12) = 12; the last stage: 1x1 conv.
  assert len(p['stage1']['sepconv']) == 1
  assert p['stage1']['sepconv'][0]['pw2']['kernel'].shape == (1, 1, 4, 12)
  assert p['stage2']['conv']['kernel'].shape == (1, 1, 8, 12)
  assert p['stage2']['fc']['kernel'].shape == (12, 5)
  # Without the teacher's width, the student's; or head_dim.
  del inputs['teacher_features']
  p = jax.eval_shape(build_objective({'ofa': {}}).init, jax.random.key(0), inputs)[0]['ofa']
  assert p['stage2']['conv']['kernel'].shape == (1, 1, 8, 8)
  p = jax.eval_shape(build_objective({'ofa': {'head_dim': 6, 'depth': 2}}).init,
                     jax.random.key(0), inputs)[0]['ofa']
  assert [blk['pw2']['kernel'].shape[-1] for blk in p['stage2']['sepconv']] == [16, 6]


def test_ofa_default_stages_and_vit_projector_shapes():
  assert ofa.default_stages(['stage1', 'stage2', 'stage3', 'stage4', 'penultimate']) == (
      'stage1', 'stage2', 'stage3', 'stage4')
  assert ofa.default_stages([f'stage{i}' for i in range(1, 7)]) == (
      'stage1', 'stage2', 'stage5', 'stage6')
  init = lambda shape, **kw: jax.eval_shape(
      lambda k: ofa.ofa_projector_init(k, shape, 5, **kw), jax.random.key(0))
  # A ViT feature of 1 + 14x14 tokens: one patch merging (14 -> 7), blocks, the class token.
  p = init((2, 197, 8), depth=2)
  assert len(p['merge']) == 1 and len(p['blocks']) == 2
  # A [B, L, C] sequence whose tokens are no square grid falls back to the linear head.
  assert 'kernel' in init((2, 11, 8))
  with pytest.raises(UserError, match="projector='linear'"):
    init((2, 8), projector='cnn')


# ----------------------------------------------------------------------- LELP



def np_pca_top(x, k, null=None):
  x = x.astype(np.float64) - x.mean(0)
  if null is not None:
    q = np.linalg.qr(null.astype(np.float64))[0]
    x = x - x @ q @ q.T
  return np.linalg.svd(x, full_matrices=False)[2][:k]


def test_lelp_directions_are_per_class_principal_axes_in_classifier_null_space():
  rng = np.random.default_rng(0)
  # Class 0 spreads mostly along e0, then e1; class 1 along e2.
  e0 = rng.standard_normal((50, 2)) * np.array([[5.0, 1.0]])
  e0 = np.concatenate([e0, np.zeros((50, 2))], 1)
  e1 = rng.standard_normal((50, 2)) * np.array([[3.0, 0.5]])
  e1 = np.concatenate([np.zeros((50, 2)), e1], 1) + np.array([[0, 0, 0, 7.0]])
  emb = np.concatenate([e0, e1]).astype(np.float32)
  labels = np.array([0] * 50 + [1] * 50)
  v, mu = LP.lelp_directions(emb, labels, 2, 2)
  for c, rows in ((0, slice(0, 50)), (1, slice(50, 100))):
    ref = np_pca_top(emb[rows], 2)
    np.testing.assert_allclose(np.abs(v[c]), np.abs(ref), atol=1e-4)
    # Sign convention: the largest-magnitude component is positive.
    assert np.all(np.take_along_axis(np.asarray(v[c]), np.abs(v[c]).argmax(1)[:, None], 1) > 0)
  np.testing.assert_allclose(mu, np.stack([emb[:50].mean(0), emb[50:].mean(0)]), atol=1e-5)
  assert abs(float(v[0, 0, 0])) > 0.99                     # the big axis first
  # With a classifier reading e0, class 0's directions avoid e0.
  w = np.zeros((4, 2), np.float32)
  w[0, 0] = 1.0
  w[3, 1] = 1.0
  v2, _ = LP.lelp_directions(emb, labels, 2, 1, classifier=w)
  np.testing.assert_allclose(np.abs(v2[0, 0]), np.abs(np_pca_top(emb[:50], 1, null=w)[0]),
                             atol=1e-4)
  assert abs(float(v2[0, 0, 0])) < 1e-5
  # Masked examples do not count.
  where = np.ones(100, bool)
  where[:50] = False
  _, mu3 = LP.lelp_directions(emb, labels, 2, 1, where=where)
  np.testing.assert_allclose(mu3[0], 0.0)


def np_lelp_targets(h, z, v, mu, scale):
  b = h.shape[0]
  c, k, _ = v.shape
  out = np.zeros((b, c * 2 * k))
  for i in range(b):
    for ci in range(c):
      proj = np.array([(h[i] - mu[ci]) @ v[ci, j] for j in range(k)], np.float64)
      signed = np.stack([proj, -proj], -1).reshape(-1) * scale
      within = signed - np.log(np.exp(signed - signed.max()).sum()) - signed.max()
      out[i, ci * 2 * k:(ci + 1) * 2 * k] = z[i, ci] + within
  return out


def test_lelp_targets_loss_and_term():
  h, z = rand(1, (3, 4)), rand(2, (3, 2))
  v = np.linalg.qr(rand(3, (4, 4)))[0][:, :4].T.reshape(2, 2, 4).astype(np.float32)
  mu = rand(4, (2, 4))
  got = LP.lelp_targets(h, z, v, mu, scale=0.7)
  np.testing.assert_allclose(got, np_lelp_targets(h, z, v, mu, 0.7), rtol=1e-5, atol=1e-5)
  # Class marginals of the subclass distribution equal the teacher's class probabilities.
  p = np_softmax(np.asarray(got, np.float64)).reshape(3, 2, 4).sum(-1)
  np.testing.assert_allclose(p, np_softmax(z.astype(np.float64)), rtol=1e-5)
  zs = rand(5, (3, 8))
  temp = 2.0
  pt = np_softmax(np.asarray(got, np.float64) / temp)
  ps = np_softmax(zs.astype(np.float64) / temp)
  want = (pt * (np.log(pt) - np.log(ps))).sum(-1) * temp ** 2
  np.testing.assert_allclose(LP.lelp_loss(zs, got, temperature=temp), want, rtol=1e-5)
  check_grads(lambda z: LP.lelp_loss(z, got).sum(), (zs,), order=1, modes=['rev'],
              atol=1e-2, rtol=1e-2)
  where = np.array([True, False, True])
  z_bad = zs.copy()
  z_bad[1] = np.nan
  g = jax.grad(lambda z: LP.lelp_loss(z, got, where=where).sum())(z_bad)
  assert np.all(np.asarray(g[1]) == 0.0) and np.all(np.isfinite(g))
  assert float(LP.lelp_loss(z_bad, got, where=where)[1]) == 0.0
  v_, g_ = jax.value_and_grad(lambda z: LP.lelp_loss(z, got * 1e30).sum())(zs * 1e30)
  assert np.all(np.isfinite(g_))
  assert LP.lelp_loss(jnp.asarray(zs, jnp.bfloat16), got).dtype == jnp.float32
  # The registered term: directions from the init batch, fixed in state; head learns.
  inputs = {'student_features': {'penultimate': jnp.asarray(rand(6, (6, 5)))},
            'teacher_features': {'penultimate': jnp.asarray(rand(7, (6, 4)))},
            'teacher_logits': jnp.asarray(rand(8, (6, 2))),
            'labels': jnp.asarray([0, 1, 0, 1, 0, 1]), 'where': jnp.ones(6, bool)}
  obj = objective({'lelp': dict(num_directions=2, temperature=2.0)})
  params, state = obj.init(jax.random.key(0), inputs)
  assert params['lelp']['kernel'].shape == (5, 2 * 2 * 2)
  assert state['lelp']['directions'].shape == (2, 2, 4)
  loss, new_state, _ = obj.apply(params, state, inputs)
  assert np.isfinite(loss)
  np.testing.assert_array_equal(new_state['lelp']['directions'], state['lelp']['directions'])
  g = jax.grad(lambda p: obj.apply(p, state, inputs)[0])(params)
  assert float(jnp.abs(g['lelp']['kernel']).sum()) > 0


def test_every_feature_loss_is_registered_with_docs():
  from kdjax.losses import catalog
  names = {s.name: s for s in catalog()}
  for name in ('fitnet', 'attention_transfer', 'nd_loss', 'hidden_mse', 'hidden_cosine',
               'minilm_attention', 'ofa', 'lelp'):
    spec = names[name]
    assert spec.family == 'feature' and not spec.batch_level and 'arXiv' in spec.reference
    assert spec.summary
