"""Tests for kdjax.models: registry, shapes, parameter counts, the functional core."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from kdjax import models
from kdjax.models import layers

ALL_NAMES = [
    'mlp', 'cnn1d', 'cnn2d',
    'resnet8', 'resnet14', 'resnet20', 'resnet32', 'resnet44', 'resnet56',
    'resnet110', 'resnet8x4', 'resnet32x4',
    'wrn_16_1', 'wrn_16_2', 'wrn_40_1', 'wrn_40_2',
    'vit_tiny',
]  # fmt: skip


def _abstract(name, **kw):
  """Builds the model without computing its initial values (fast for big ones)."""
  return nnx.eval_shape(lambda: models.create(name, **kw))


def _shapes(name, input_shape, batch=2, **kw):
  if not kw.keys() - {'num_classes'}:
    return _cached_shapes(name, tuple(input_shape), batch, kw['num_classes'])
  return _eval_shapes(_abstract(name, input_shape=input_shape, **kw), input_shape, batch)


@functools.lru_cache(maxsize=None)
def _cached_abstract(name, input_shape, num_classes):
  return _abstract(name, input_shape=input_shape, num_classes=num_classes)


@functools.lru_cache(maxsize=None)
def _cached_shapes(name, input_shape, batch, num_classes):
  return _eval_shapes(_cached_abstract(name, input_shape, num_classes), input_shape, batch)


def _eval_shapes(module, input_shape, batch):
  apply, params, state = models.functional(module)
  x = jax.ShapeDtypeStruct((batch, *input_shape), jnp.float32)
  out, new_state = jax.eval_shape(
      lambda p, s, x: apply(p, s, x, train=True), params, state, x
  )
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  return out


# --------------------------------------------------------------------- registry


def test_names_lists_the_whole_zoo():
  assert set(ALL_NAMES) <= set(models.names())
  assert models.names() == sorted(models.names())


def test_unknown_name_raises_key_error_listing_known_names():
  with pytest.raises(KeyError) as err:
    models.create('resnet9000', num_classes=10, input_shape=(32, 32, 3))
  msg = str(err.value)
  assert 'resnet9000' in msg
  for name in ALL_NAMES:
    assert name in msg


def test_register_custom_builder_and_duplicate_error():
  def build(*, num_classes, input_shape, rngs, dtype, **kw):
    return models.MLP(input_shape, num_classes, hidden=(3,), rngs=rngs, dtype=dtype)

  name = '_test_tiny_mlp'
  try:
    models.register(name, build)
    m = models.create(name, num_classes=4, input_shape=(5,))
    out = m(jnp.ones((2, 5)))
    assert out.logits.shape == (2, 4)
    with pytest.raises(ValueError, match='already registered'):
      models.register(name, build)
    models.register(name, build, overwrite=True)
  finally:
    from kdjax.models import registry

    registry._REGISTRY.pop(name, None)
  assert name not in models.names()


def test_seed_controls_initialisation():
  a = models.create('mlp', num_classes=3, input_shape=(4,), hidden=(5,), seed=0)
  b = models.create('mlp', num_classes=3, input_shape=(4,), hidden=(5,), seed=0)
  c = models.create('mlp', num_classes=3, input_shape=(4,), hidden=(5,), seed=1)
  np.testing.assert_array_equal(a.hidden[0].kernel[...], b.hidden[0].kernel[...])
  assert not np.allclose(a.hidden[0].kernel[...], c.hidden[0].kernel[...])


# ----------------------------------------------------------------------- shapes


def test_mlp_defaults_and_shapes():
  out = _shapes('mlp', (40, 1), num_classes=10)
  assert out.logits.shape == (2, 10)
  assert {k: v.shape for k, v in out.features.items()} == {
      'stage1': (2, 100), 'stage2': (2, 100), 'penultimate': (2, 100)
  }  # fmt: skip
  out = _shapes('mlp', (8, 8, 1), num_classes=3, hidden=(7, 6, 5))
  assert [out.features[f'stage{i}'].shape for i in (1, 2, 3)] == [
      (2, 7), (2, 6), (2, 5)
  ]  # fmt: skip
  assert out.features['penultimate'].shape == (2, 5)


def test_cnn1d_defaults_match_mnist1d_cnn():
  m = models.create('cnn1d', num_classes=10, input_shape=(40, 1))
  assert [c.kernel.shape for c in m.convs] == [(5, 1, 32), (5, 32, 32), (5, 32, 32)]
  assert [c.strides for c in m.convs] == [(2,), (2,), (2,)]
  out = _shapes('cnn1d', (40, 1), num_classes=10)
  assert [out.features[f'stage{i}'].shape for i in (1, 2, 3)] == [
      (2, 20, 32), (2, 10, 32), (2, 5, 32)
  ]  # fmt: skip
  assert out.features['penultimate'].shape == (2, 160)
  assert out.logits.shape == (2, 10)


@pytest.mark.parametrize('norm', [None, 'batch', 'layer'])
@pytest.mark.parametrize('pool', ['flatten', 'mean'])
def test_cnn_options(norm, pool):
  out = _shapes(
      'cnn1d', (40, 1), num_classes=4, channels=(3, 5), kernel_size=3,
      strides=(1, 2), norm=norm, pool=pool,
  )  # fmt: skip
  assert out.features['stage1'].shape == (2, 40, 3)
  assert out.features['stage2'].shape == (2, 20, 5)
  assert out.features['penultimate'].shape == (2, 100 if pool == 'flatten' else 5)
  out = _shapes('cnn2d', (8, 8, 1), num_classes=4, channels=(3, 5), norm=norm, pool=pool)
  assert out.features['stage1'].shape == (2, 4, 4, 3)
  assert out.features['stage2'].shape == (2, 2, 2, 5)
  assert out.features['penultimate'].shape == (2, 20 if pool == 'flatten' else 5)


@pytest.mark.parametrize(
    'name', [n for n in ALL_NAMES if n.startswith('resnet')]
)
def test_resnet_feature_shapes(name):
  # Full CIFAR geometry, abstract evaluation (no FLOPs spent).
  out = _shapes(name, (32, 32, 3), num_classes=100)
  w = (64, 128, 256) if name.endswith('x4') else (16, 32, 64)
  assert out.features['stage1'].shape == (2, 32, 32, w[0])
  assert out.features['stage2'].shape == (2, 16, 16, w[1])
  assert out.features['stage3'].shape == (2, 8, 8, w[2])
  assert out.features['penultimate'].shape == (2, w[2])
  assert out.logits.shape == (2, 100)
  assert set(out.features) == {'stage1', 'stage2', 'stage3', 'penultimate'}


@pytest.mark.parametrize('name', [n for n in ALL_NAMES if n.startswith('wrn')])
def test_wrn_feature_shapes(name):
  k = int(name.split('_')[2])
  out = _shapes(name, (32, 32, 3), num_classes=100)
  assert out.features['stage1'].shape == (2, 32, 32, 16 * k)
  assert out.features['stage2'].shape == (2, 16, 16, 32 * k)
  assert out.features['stage3'].shape == (2, 8, 8, 64 * k)
  assert out.features['penultimate'].shape == (2, 64 * k)
  assert out.logits.shape == (2, 100)


@functools.lru_cache(maxsize=None)
def _small_vit():
  """A 2-block ViT with dropout, and its jitted training-mode apply."""
  m = models.create(
      'vit_tiny', num_classes=5, input_shape=(8, 8, 3), patch_size=4, dim=8,
      depth=2, heads=2, dropout=0.3,
  )  # fmt: skip
  apply, params, state = models.functional(m)
  return m, apply, params, state, jax.jit(functools.partial(apply, train=True))


def test_vit_shapes_and_attention_probabilities():
  m, apply, params, state, _ = _small_vit()
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 3))
  out, _ = jax.jit(apply)(params, state, x)
  assert out.logits.shape == (2, 5)
  assert [out.features[f'stage{i}'].shape for i in (1, 2)] == [(2, 5, 8)] * 2
  assert out.features['penultimate'].shape == (2, 8)
  assert len(out.attentions) == 2
  # Against a numpy attention for block 1, from its input (stage1) and weights.
  blk = m.blocks[1]
  h = np.asarray(out.features['stage1'], np.float64)
  mu, var = h.mean(-1, keepdims=True), h.var(-1, keepdims=True)
  ln = (h - mu) / np.sqrt(var + 1e-6) * np.asarray(blk.ln1.scale[...]) + np.asarray(blk.ln1.bias[...])
  qkv = ln @ np.asarray(blk.attn.qkv.kernel[...]) + np.asarray(blk.attn.qkv.bias[...])
  q, k = qkv[..., :8].reshape(2, 5, 2, 4), qkv[..., 8:16].reshape(2, 5, 2, 4)
  sc = np.einsum('bqhd,bkhd->bhqk', q, k) / 2.0
  ref = np.exp(sc - sc.max(-1, keepdims=True))
  ref /= ref.sum(-1, keepdims=True)
  np.testing.assert_allclose(out.attentions[1], ref, rtol=1e-4, atol=1e-6)
  for a in out.attentions:
    assert a.shape == (2, 2, 5, 5) and a.dtype == jnp.float32
    np.testing.assert_allclose(a.sum(-1), 1.0, rtol=1e-5)
    assert (a >= 0).all()
  # 1-D signals (MNIST-1D): 40 / 8 = 5 patches + class token.
  out = _shapes('vit_tiny', (40, 1), num_classes=10, patch_size=8, dim=8, depth=1, heads=2)
  assert out.features['stage1'].shape == (2, 6, 8)
  assert out.attentions[0].shape == (2, 2, 6, 6)
  # Defaults: DeiT-Ti sizes.
  out = _shapes('vit_tiny', (32, 32, 3), num_classes=10)
  assert len(out.attentions) == 12 and out.attentions[0].shape == (2, 3, 65, 65)
  assert out.features['penultimate'].shape == (2, 192)


def test_resnet8x4_full_size_forward():
  m = models.create('resnet8x4', num_classes=100, input_shape=(32, 32, 3))
  apply, params, state = models.functional(m)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  out, new_state = jax.jit(apply)(params, state, x)
  assert out.logits.shape == (2, 100)
  assert out.features['stage1'].shape == (2, 32, 32, 64)
  assert out.features['stage2'].shape == (2, 16, 16, 128)
  assert out.features['stage3'].shape == (2, 8, 8, 256)
  assert out.features['penultimate'].shape == (2, 256)
  assert np.isfinite(out.logits).all()
  # Stage outputs are post-ReLU; the head is linear in 'penultimate'.
  assert (out.features['stage3'] >= 0).all()
  np.testing.assert_allclose(
      out.features['penultimate'], out.features['stage3'].mean((1, 2)), rtol=1e-5
  )
  np.testing.assert_allclose(
      out.logits,
      out.features['penultimate'] @ m.head.kernel[...] + m.head.bias[...],
      rtol=1e-4, atol=1e-5,
  )  # fmt: skip


# ------------------------------------------------------ independent references


def test_mlp_matches_numpy_reference():
  m = models.create('mlp', num_classes=3, input_shape=(6, 1), hidden=(5, 4))
  x = np.random.RandomState(0).randn(7, 6, 1).astype(np.float32)
  out = m(jnp.asarray(x))
  p = [(np.asarray(l.kernel[...]), np.asarray(l.bias[...])) for l in m.hidden]
  h1 = np.maximum(x.reshape(7, 6) @ p[0][0] + p[0][1], 0)
  h2 = np.maximum(h1 @ p[1][0] + p[1][1], 0)
  logits = h2 @ np.asarray(m.head.kernel[...]) + np.asarray(m.head.bias[...])
  np.testing.assert_allclose(out.features['stage1'], h1, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.features['stage2'], h2, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(out.logits, logits, rtol=1e-5, atol=1e-5)


def _np_conv1d(x, w, b, stride, pad):
  """Direct loops: x [B, L, C], w [K, C, O], symmetric zero padding."""
  bsz, length, _ = x.shape
  k = w.shape[0]
  xp = np.pad(x, ((0, 0), (pad, pad), (0, 0)))
  n_out = (length + 2 * pad - k) // stride + 1
  y = np.zeros((bsz, n_out, w.shape[2]), np.float64)
  for i in range(n_out):
    for j in range(k):
      y[:, i] += xp[:, i * stride + j] @ w[j]
  return y + b


def test_cnn1d_matches_numpy_reference():
  m = models.create('cnn1d', num_classes=10, input_shape=(40, 1), channels=(4, 3, 2))
  x = np.random.RandomState(1).randn(3, 40, 1).astype(np.float32)
  out = m(jnp.asarray(x))
  h = x.astype(np.float64)
  for i, cv in enumerate(m.convs):
    h = np.maximum(
        _np_conv1d(h, np.asarray(cv.kernel[...]), np.asarray(cv.bias[...]), 2, 2), 0
    )
    np.testing.assert_allclose(out.features[f'stage{i + 1}'], h, rtol=1e-4, atol=1e-5)
  logits = h.reshape(3, -1) @ np.asarray(m.head.kernel[...]) + np.asarray(m.head.bias[...])
  np.testing.assert_allclose(out.logits, logits, rtol=1e-4, atol=1e-5)


# ------------------------------------------------------------ parameter counts


def _resnet_count(depth, widths, num_classes=100, in_ch=3):
  """From the architecture: convs without bias, BN scale+bias, 1x1 conv+BN shortcuts."""
  n = (depth - 2) // 6
  total = 9 * in_ch * widths[0] + 2 * widths[0]
  c = widths[0]
  for s, w in enumerate(widths[1:]):
    for b in range(n):
      stride = 2 if (s > 0 and b == 0) else 1
      total += 9 * c * w + 2 * w + 9 * w * w + 2 * w
      if stride != 1 or c != w:
        total += c * w + 2 * w
      c = w
  return total + c * num_classes + num_classes


def _wrn_count(depth, k, num_classes=100, in_ch=3):
  """Pre-activation blocks: BN(in), conv3x3, BN(out), conv3x3, 1x1 shortcut conv."""
  n = (depth - 4) // 6
  total = 9 * in_ch * 16
  c = 16
  for w in (16 * k, 32 * k, 64 * k):
    for _ in range(n):
      total += 2 * c + 9 * c * w + 2 * w + 9 * w * w + (c * w if c != w else 0)
      c = w
  return total + 2 * c + c * num_classes + num_classes


@pytest.mark.parametrize(
    'name,expected',
    [
        ('resnet8x4', _resnet_count(8, (32, 64, 128, 256))),
        ('resnet32x4', _resnet_count(32, (32, 64, 128, 256))),
        ('resnet8', _resnet_count(8, (16, 16, 32, 64))),
        ('resnet56', _resnet_count(56, (16, 16, 32, 64))),
        ('resnet110', _resnet_count(110, (16, 16, 32, 64))),
        ('wrn_40_2', _wrn_count(40, 2)),
        ('wrn_16_2', _wrn_count(16, 2)),
        ('wrn_40_1', _wrn_count(40, 1)),
        ('wrn_16_1', _wrn_count(16, 1)),
    ],
)
def test_parameter_counts(name, expected):
  m = _cached_abstract(name, (32, 32, 3), 100)
  _, params, _ = models.functional(m)
  assert models.count_params(params) == expected


def test_parameter_counts_agree_with_the_crd_zoo():
  # The CRD paper reports 1.23M, 7.43M and 2.26M parameters (CIFAR-100 heads).
  assert _resnet_count(8, (32, 64, 128, 256)) == 1_233_540
  assert _resnet_count(32, (32, 64, 128, 256)) == 7_433_860
  assert _wrn_count(40, 2) == 2_255_156


# ----------------------------------------------------------------- functional


def _bn_cnn(seed=0):
  return models.create(
      'cnn1d', num_classes=3, input_shape=(16, 2), channels=(4, 3),
      kernel_size=3, norm='batch', seed=seed,
  )  # fmt: skip


def _x(shape, seed=0):
  return jax.random.normal(jax.random.key(seed), shape)


def _leaves_np(tree):
  return [np.array(a) for a in jax.tree.leaves(tree)]


def test_apply_is_pure_and_jit_matches_eager():
  module = _bn_cnn()
  module_before = _leaves_np(nnx.state(module))
  apply, params, state = models.functional(module)
  params_before, state_before = _leaves_np(params), _leaves_np(state)
  x = _x((8, 16, 2))
  out1, ns1 = apply(params, state, x, train=True)
  out2, ns2 = apply(params, state, x, train=True)
  # Inputs and the module are untouched, and the call is repeatable.
  for a, b in zip(_leaves_np(params), params_before):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves_np(state), state_before):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(_leaves_np(nnx.state(module)), module_before):
    np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(out1.logits, out2.logits)
  for a, b in zip(_leaves_np(ns1), _leaves_np(ns2)):
    np.testing.assert_array_equal(a, b)
  # The module's own call (stateful NNX) agrees with the functional one.
  module.train()
  np.testing.assert_allclose(module(x).logits, out1.logits, rtol=1e-6)
  # jit gives the same result, for both modes.
  for train in (False, True):
    out_e, ns_e = apply(params, state, x, train=train)
    out_j, ns_j = jax.jit(functools.partial(apply, train=train))(params, state, x)
    np.testing.assert_allclose(out_j.logits, out_e.logits, rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(ns_j), jax.tree.leaves(ns_e)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert jax.tree.structure(ns_j) == jax.tree.structure(state)


def test_train_must_be_static():
  apply, params, state = models.functional(_bn_cnn())
  with pytest.raises(TypeError, match='static'):
    apply(params, state, _x((2, 16, 2)), train=jnp.array(True))


def test_batchnorm_train_updates_stats_eval_does_not():
  m = models.create(
      'mlp', num_classes=2, input_shape=(5,), hidden=(4,), norm='batch'
  )
  apply, params, state = models.functional(m)
  x = np.random.RandomState(2).randn(16, 5).astype(np.float32)
  w = np.asarray(params['hidden'][0]['kernel'][...])
  b = np.asarray(params['hidden'][0]['bias'][...])
  pre = x @ w + b  # the BN input

  # eval: running averages (initial mean 0, var 1) are used and left alone.
  out, new_state = apply(params, state, x, train=False)
  for a, c in zip(_leaves_np(new_state), _leaves_np(state)):
    np.testing.assert_array_equal(a, c)
  np.testing.assert_allclose(
      out.features['stage1'], np.maximum(pre / np.sqrt(1 + 1e-5), 0), rtol=1e-5, atol=1e-6
  )

  # train: batch statistics normalise, running averages move with momentum 0.9.
  out, new_state = apply(params, state, x, train=True)
  mu, var = pre.mean(0), pre.var(0)
  np.testing.assert_allclose(
      out.features['stage1'], np.maximum((pre - mu) / np.sqrt(var + 1e-5), 0),
      rtol=1e-4, atol=1e-5,
  )  # fmt: skip
  bn = new_state['norms'][0]
  np.testing.assert_allclose(bn['mean'][...], 0.1 * mu, rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(bn['var'][...], 0.9 + 0.1 * var, rtol=1e-5)
  # The original state object still holds the initial statistics.
  np.testing.assert_array_equal(state['norms'][0]['mean'][...], np.zeros(4))


def test_vmap_over_stacked_clients():
  n_clients = 3
  mods = [_bn_cnn(seed=i) for i in range(n_clients)]
  apply, _, _ = models.functional(mods[0])
  trios = [models.functional(m) for m in mods]
  stack = lambda *t: jnp.stack(t)
  params = jax.tree.map(stack, *[t[1] for t in trios])
  state = jax.tree.map(stack, *[t[2] for t in trios])
  x = _x((n_clients, 6, 16, 2))
  fn = jax.jit(jax.vmap(functools.partial(apply, train=True)))
  out, new_state = fn(params, state, x)
  assert out.logits.shape == (n_clients, 6, 3)
  assert jax.tree.structure(new_state) == jax.tree.structure(state)
  single = jax.jit(functools.partial(apply, train=True))
  for i, (_, p, s) in enumerate(trios):
    o, ns = single(p, s, x[i])
    np.testing.assert_allclose(out.logits[i], o.logits, rtol=1e-5, atol=1e-6)
    for name in o.features:
      np.testing.assert_allclose(out.features[name][i], o.features[name], rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(ns)):
      np.testing.assert_allclose(a[i], b, rtol=1e-5, atol=1e-6)
  # Different seeds really gave different clients.
  assert not np.allclose(out.logits[0], out.logits[1])


def test_grad_matches_finite_differences():
  m = models.create(
      'cnn1d', num_classes=3, input_shape=(8, 1), channels=(2,), kernel_size=3,
      norm='batch',
  )  # fmt: skip
  apply, params, state = models.functional(m)
  x = _x((4, 8, 1))
  labels = jnp.array([0, 1, 2, 0])

  def loss(p, train):
    logits = apply(p, state, x, train=train)[0].logits
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), labels[:, None], 1))

  for train in (False, True):
    f = jax.jit(functools.partial(loss, train=train))
    check_grads(f, (params,), order=1, modes=['rev'], eps=1e-2, atol=2e-2, rtol=2e-2)
    g = jax.jit(jax.grad(f))(params)
    assert jax.tree.structure(g) == jax.tree.structure(params)
    assert all(np.isfinite(a).all() for a in jax.tree.leaves(g))
    assert np.abs(g['convs'][0]['kernel'][...]).sum() > 0


def test_grad_of_value_and_grad_under_jit_with_bn_state():
  # The training-step pattern: state is a non-differentiated input whose BN
  # statistics are updated inside grad, inside jit.
  apply, params, state = models.functional(_bn_cnn())
  x = _x((4, 16, 2))

  def loss(p, s):
    out, ns = apply(p, s, x, train=True)
    return jnp.sum(out.logits**2), ns

  (v, ns), g = jax.jit(jax.value_and_grad(loss, has_aux=True))(params, state)
  v2, ns2 = jax.jit(loss)(params, state)
  np.testing.assert_allclose(v, v2, rtol=1e-5)
  for a, b in zip(jax.tree.leaves(ns), jax.tree.leaves(ns2)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
  assert jax.tree.structure(g) == jax.tree.structure(params)
  assert all(np.abs(a).sum() > 0 for a in jax.tree.leaves(g))
  changed = [
      not np.allclose(a, b) for a, b in zip(jax.tree.leaves(ns), jax.tree.leaves(state))
  ]
  assert all(changed)  # every BN mean and var moved


# ---------------------------------------------------------------------- dropout


def _raw(a):
  """Key data for PRNG key arrays, the array otherwise."""
  if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
    return np.asarray(jax.random.key_data(a))
  return np.asarray(a)


def _dropout_mlp():
  return models.create('mlp', num_classes=4, input_shape=(6,), hidden=(32,), dropout=0.5)


def test_dropout_reseeding_from_rng():
  apply, params, state = models.functional(_dropout_mlp())
  x = jnp.ones((5, 6))
  k1, k2 = jax.random.key(1), jax.random.key(2)
  a, sa = apply(params, state, x, train=True, rng=k1)
  b, _ = apply(params, state, x, train=True, rng=k1)
  c, _ = apply(params, state, x, train=True, rng=k2)
  np.testing.assert_array_equal(a.logits, b.logits)
  assert not np.allclose(a.logits, c.logits)
  h = np.asarray(a.features['stage1'])
  assert 0.2 < (h == 0).mean() < 0.8  # about half the units dropped
  # A raw uint32 key works and is the same key as its typed form.
  d, _ = apply(params, state, x, train=True, rng=jax.random.PRNGKey(1))
  e, _ = apply(params, state, x, train=True, rng=jax.random.wrap_key_data(jax.random.PRNGKey(1)))
  np.testing.assert_array_equal(d.logits, e.logits)
  # With rng, the stored RNG streams are left as they were.
  assert jax.tree.structure(sa) == jax.tree.structure(state)
  for u, v in zip(jax.tree.leaves(sa), jax.tree.leaves(state)):
    np.testing.assert_array_equal(_raw(u), _raw(v))
  # Under jit: same rng same output, and the same as eager.
  f = jax.jit(functools.partial(apply, train=True))
  np.testing.assert_allclose(f(params, state, x, rng=k1)[0].logits, a.logits, rtol=1e-6)
  # Evaluation ignores dropout (rng or not) and equals the dropout-free network.
  ev, _ = apply(params, state, x, train=False, rng=k1)
  ev2, _ = apply(params, state, x, train=False)
  np.testing.assert_array_equal(ev.logits, ev2.logits)
  w0, b0 = params['hidden'][0]['kernel'][...], params['hidden'][0]['bias'][...]
  ref = jnp.maximum(x @ w0 + b0, 0) @ params['head']['kernel'][...] + params['head']['bias'][...]
  np.testing.assert_allclose(ev.logits, ref, rtol=1e-5, atol=1e-6)


def test_dropout_without_rng_advances_stored_stream():
  apply, params, state = models.functional(_dropout_mlp())
  x = jnp.ones((5, 6))
  a, s1 = apply(params, state, x, train=True)
  a2, _ = apply(params, state, x, train=True)
  b, _ = apply(params, s1, x, train=True)
  np.testing.assert_array_equal(a.logits, a2.logits)  # pure: same state, same mask
  assert not np.allclose(a.logits, b.logits)  # the carried counter moved on


def test_dropout_rng_under_vmap_per_client():
  apply, params, state = models.functional(_dropout_mlp())
  n = 4
  params = jax.tree.map(lambda a: jnp.stack([a] * n), params)
  state = jax.tree.map(lambda a: jnp.stack([a] * n), state)
  x = jnp.ones((n, 5, 6))
  rngs = jax.random.split(jax.random.key(0), n)
  out, _ = jax.jit(jax.vmap(functools.partial(apply, train=True)))(params, state, x, rng=rngs)
  # Identical clients, different rngs -> different masks; each equals its own call.
  assert not np.allclose(out.logits[0], out.logits[1])
  single = jax.tree.map(lambda a: a[0], (params, state))
  for i in range(n):
    o, _ = apply(*single, x[i], train=True, rng=rngs[i])
    np.testing.assert_allclose(out.logits[i], o.logits, rtol=1e-5, atol=1e-6)


def test_dropout_in_vit_is_reseeded():
  _, _, params, state, f = _small_vit()
  x = _x((2, 8, 8, 3))
  a = f(params, state, x, rng=jax.random.key(0))
  b = f(params, state, x, rng=jax.random.key(0))
  c = f(params, state, x, rng=jax.random.key(5))
  np.testing.assert_array_equal(a[0].logits, b[0].logits)
  assert not np.allclose(a[0].logits, c[0].logits)
  # Attention probabilities are returned before attention dropout.
  np.testing.assert_allclose(a[0].attentions[0].sum(-1), 1.0, rtol=1e-5)


def test_wrn_dropout_sits_in_every_block():
  m = _abstract('wrn_16_1', num_classes=3, input_shape=(8, 8, 3), dropout=0.3)
  blocks = [b for stage in m.stages for b in stage]
  assert len(blocks) == 6
  assert all(isinstance(b.dropout, nnx.Dropout) and b.dropout.rate == 0.3 for b in blocks)
  streams = nnx.state(m, nnx.RngState)
  assert len(jax.tree.leaves(streams)) == 2 * len(blocks)  # a key and a count each
  assert _abstract('wrn_16_1', num_classes=3, input_shape=(8, 8, 3)).stages[0][0].dropout is None


# --------------------------------------------------------------- conv lowering


@pytest.mark.parametrize('groups,lhs_dilation', [(2, (1, 1)), (1, (2, 1))])
def test_patches_conv_covers_grouped_and_input_dilated_convs(groups, lhs_dilation):
  # im2col has no form for these; the drop-in hands them to lax.conv_general_dilated.
  x, w = _x((2, 6, 6, 4), 3), _x((3, 3, 4 // groups, 6), 4)
  kw = dict(lhs_dilation=lhs_dilation, feature_group_count=groups, precision='highest')
  pad = [(1, 1), (1, 1)]
  ref = jax.lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=(
      'NHWC', 'HWIO', 'NHWC'), **kw)
  got = jax.jit(lambda x, w: layers.patches_conv_general_dilated(x, w, (1, 1), pad, **kw))(
      x, w)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    'shape,window,strides,padding,dilation',
    [
        ((2, 40, 3), (5,), (2,), [(2, 2)], (1,)),
        ((2, 11, 3), (3,), (1,), 'SAME', (2,)),
        ((1, 5, 6, 2), (3, 3), (2, 2), 'SAME', (1, 1)),
        ((2, 8, 8, 3), (3, 3), (2, 1), [(1, 1), (0, 2)], (1, 1)),
        ((2, 8, 8, 3), (1, 1), (2, 2), 'VALID', (1, 1)),
    ],
)
def test_patches_conv_equals_lax_conv(shape, window, strides, padding, dilation):
  x = _x(shape, 3)
  w = _x((*window, shape[-1], 4), 4)
  nd = len(window)
  dn = ('NWC', 'WIO', 'NWC') if nd == 1 else ('NHWC', 'HWIO', 'NHWC')
  ref = jax.lax.conv_general_dilated(
      x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=dn,
      precision='highest',
  )  # fmt: skip
  got = jax.jit(
      lambda x, w: layers.patches_conv_general_dilated(
          x, w, strides, padding, rhs_dilation=dilation, precision='highest'
      )
  )(x, w)
  np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5)
  # Both gradients (the kernel's from the channels-first patches, a custom VJP)
  # equal lax.conv's, alone and vmapped over a client axis with per-client kernels.
  ct = _x(ref.shape, 5)
  conv_ref = lambda x, w: jnp.sum(ct * jax.lax.conv_general_dilated(
      x, w, strides, padding, rhs_dilation=dilation, dimension_numbers=dn,
      precision='highest'))
  conv_got = lambda x, w: jnp.sum(ct * layers.patches_conv_general_dilated(
      x, w, strides, padding, rhs_dilation=dilation, precision='highest'))
  gx_ref, gw_ref = jax.grad(conv_ref, argnums=(0, 1))(x, w)
  gx, gw = jax.jit(jax.grad(conv_got, argnums=(0, 1)))(x, w)
  np.testing.assert_allclose(gx, gx_ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, gw_ref, rtol=1e-5, atol=1e-5)
  xs, ws = jnp.stack([x, 2 * x]), jnp.stack([w, -w])
  gxs, gws = jax.jit(jax.vmap(jax.grad(conv_got, argnums=(0, 1))))(xs, ws)
  for c in range(2):
    rx, rw = jax.grad(conv_ref, argnums=(0, 1))(xs[c], ws[c])
    np.testing.assert_allclose(gxs[c], rx, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(gws[c], rw, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
    'name,kw,shape',
    [
        ('cnn1d', dict(channels=(4, 5, 3)), (40, 1)),
        ('cnn2d', dict(channels=(3, 4)), (8, 8, 1)),
        ('resnet8', dict(widths=(3, 4, 5, 6)), (8, 8, 3)),
    ],
)
def test_conv_impl_patches_equals_xla(name, kw, shape):
  trios = {
      impl: models.functional(
          models.create(name, num_classes=3, input_shape=shape, conv_impl=impl, **kw)
      )
      for impl in ('xla', 'patches')
  }
  (apply_x, params, state), (apply_p, params_p, _) = trios['xla'], trios['patches']
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(params_p)):
    np.testing.assert_array_equal(a, b)  # same parameters
  x = _x((2, *shape))

  def loss(apply, p):
    out, ns = apply(p, state, x, train=True)
    return jnp.sum(out.logits**2), (out, ns)

  if name.startswith('cnn'):  # gradients too (the 2-D case covers strided 3x3)
    vg = lambda apply: jax.jit(jax.value_and_grad(functools.partial(loss, apply), has_aux=True))
    (_, (ox, nsx)), gx = vg(apply_x)(params)
    (_, (op, nsp)), gp = vg(apply_p)(params)
    for a, b in zip(jax.tree.leaves(gp), jax.tree.leaves(gx)):
      np.testing.assert_allclose(a, b, rtol=1e-3, atol=1e-4)
  else:  # forward only, to keep compile time down
    _, (ox, nsx) = jax.jit(functools.partial(loss, apply_x))(params)
    _, (op, nsp) = jax.jit(functools.partial(loss, apply_p))(params)
  np.testing.assert_allclose(op.logits, ox.logits, rtol=1e-4, atol=1e-5)
  for k in ox.features:
    np.testing.assert_allclose(op.features[k], ox.features[k], rtol=1e-4, atol=1e-5)
  for a, b in zip(jax.tree.leaves(nsp), jax.tree.leaves(nsx)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_unknown_conv_impl_rejected():
  with pytest.raises(ValueError, match='conv_impl'):
    models.create('cnn1d', num_classes=2, input_shape=(40, 1), conv_impl='fft')


# ------------------------------------------------------------------------ dtype


@pytest.mark.parametrize(
    'name,kw,shape',
    [
        ('mlp', dict(hidden=(8,)), (40, 1)),
        ('cnn1d', dict(channels=(4, 4), norm='batch'), (40, 1)),
        ('resnet8', dict(widths=(2, 3, 4, 5)), (8, 8, 3)),
        ('vit_tiny', dict(dim=8, depth=1, heads=2), (8, 8, 3)),
    ],
)
def test_bfloat16_compute_float32_params(name, kw, shape):
  m = models.create(name, num_classes=3, input_shape=shape, dtype=jnp.bfloat16, **kw)
  apply, params, state = models.functional(m)
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.float32)}
  out, new_state = jax.jit(functools.partial(apply, train=True))(params, state, _x((2, *shape)))
  assert out.logits.dtype == jnp.bfloat16
  assert all(v.dtype == jnp.bfloat16 for v in out.features.values())
  assert np.isfinite(np.asarray(out.logits, np.float32)).all()
  # Stored statistics keep their dtype, so the state is a stable carry.
  for a, b in zip(jax.tree.leaves(new_state), jax.tree.leaves(state)):
    assert a.dtype == b.dtype
  if name not in ('mlp', 'cnn1d'):
    return
  # The bf16 model approximates the float32 one with the same parameters.
  m32 = models.create(name, num_classes=3, input_shape=shape, **kw)
  a32, p32, s32 = models.functional(m32)
  ref = jax.jit(functools.partial(a32, train=True))(p32, s32, _x((2, *shape)))[0].logits
  np.testing.assert_allclose(np.asarray(out.logits, np.float32), ref, rtol=0.1, atol=0.1)


def test_param_dtype_bfloat16():
  m = models.create(
      'cnn1d', num_classes=3, input_shape=(40, 1), channels=(4,),
      param_dtype=jnp.bfloat16, dtype=jnp.bfloat16,
  )  # fmt: skip
  _, params, _ = models.functional(m)
  assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype(jnp.bfloat16)}


# ---------------------------------------------------------------- small-row Linear gradient


@pytest.mark.parametrize('lead', [(1,), (3,), (10,), (2, 8), (16,), (17,), (40,)])
def test_small_rows_dot_general_equals_the_dot_and_numpy(lead):
  """Value and both gradients equal the plain dot's and the numpy formula
  (dW = x^T g, dx = g W^T), on both sides of SMALL_ROWS."""
  rng = np.random.default_rng(0)
  x = rng.standard_normal((*lead, 7)).astype(np.float32)
  w = rng.standard_normal((7, 5)).astype(np.float32)
  ct = rng.standard_normal((*lead, 5)).astype(np.float32)
  dims = (((x.ndim - 1,), (0,)), ((), ()))
  f = lambda x, w: jnp.sum(layers.small_rows_dot_general(x, w, dims) * ct)
  ref = lambda x, w: jnp.sum(jax.lax.dot_general(x, w, dims) * ct)
  gx, gw = jax.jit(jax.grad(f, argnums=(0, 1)))(x, w)
  rx, rw = jax.grad(ref, argnums=(0, 1))(x, w)
  np.testing.assert_allclose(gw, x.reshape(-1, 7).T @ ct.reshape(-1, 5), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, ct @ w.T, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gw, rw, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(gx, rx, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(layers.small_rows_dot_general(x, w, dims), x @ w, rtol=1e-5,
                             atol=1e-5)
  check_grads(lambda x, w: layers.small_rows_dot_general(x, w, dims), (x, w), order=1,
              modes=['rev'], atol=2e-2, rtol=2e-2)


def test_small_rows_dot_general_under_vmap_per_client_and_bfloat16():
  """vmapped over clients (each its own kernel): each client's gradient is its own
  x_c^T g_c; bfloat16 inputs give bfloat16 gradients close to the float32 ones."""
  rng = np.random.default_rng(1)
  x = rng.standard_normal((6, 10, 12)).astype(np.float32)
  w = rng.standard_normal((6, 12, 9)).astype(np.float32)
  dims = (((1,), (0,)), ((), ()))
  loss = lambda w, x: jnp.sum(jnp.tanh(layers.small_rows_dot_general(x, w, dims)))
  g = jax.jit(jax.vmap(jax.grad(loss)))(w, x)
  for c in range(6):
    gc = jax.grad(lambda w: jnp.sum(jnp.tanh(x[c] @ w)))(w[c])
    np.testing.assert_allclose(g[c], gc, rtol=1e-5, atol=1e-5)
  gb = jax.grad(loss)(w[0].astype(jnp.bfloat16), x[0].astype(jnp.bfloat16))
  assert gb.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(gb, np.float32), g[0], rtol=0.05, atol=0.05)


def test_mlp_dense_impl_auto_and_xla_train_alike():
  """The MLP's default (small-row kernel gradients) and dense_impl='xla' give the same
  gradients at a federated client's batch of 10 and at 64; unknown impls are refused."""
  for batch in (10, 64):
    x = jnp.asarray(np.random.default_rng(batch).standard_normal((batch, 40, 1)), jnp.float32)
    grads = []
    for impl in ('auto', 'xla'):
      apply, params, state = models.functional(
          models.create('mlp', num_classes=10, input_shape=(40, 1), dense_impl=impl))
      loss = lambda p: jnp.sum(jax.nn.log_softmax(apply(p, state, x)[0].logits)[:, 3])
      grads.append(jax.jit(jax.grad(loss))(params))
    for a, b in zip(jax.tree.leaves(grads[0]), jax.tree.leaves(grads[1])):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match='dense_impl'):
    models.create('mlp', num_classes=10, input_shape=(40, 1), dense_impl='fast')
