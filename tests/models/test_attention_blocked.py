"""Blocked causal attention and the tied head's gradient against the plain computations.

``blocked_attention`` must give ``dense_attention``'s outputs and gradients (float32
rounding apart) for every mask the decoder builds: causal, left padding (rows with no
key at all), packed segments, grouped-query heads, blocks that do not divide the rows;
a :class:`Decoder` must give the same logits, hidden states, q/k/v and parameter
gradients whichever ``attention_impl`` it runs, and fall back to the dense path where
the blocked one does not apply (a cache, ``output_attentions``). ``tied_logits``'
hand-written gradient must equal autodiff of the einsum. Every comparison runs at the
highest matmul precision, so it also holds on GPUs with TF32.
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.test_util import check_grads

from kdjax.models import functional
from kdjax.models.transformer import (
    Decoder, DecoderConfig, blocked_attention, dense_attention, init_cache, tied_logits)

SIZES = dict(vocab_size=29, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=24,
             max_positions=32)
T = 11    # rows of 11 tokens: blocks of 4 leave a last block of 3
# Two packed rows; segment 0 is padding (its queries see no key at all).
SEGMENTS = np.array([[1] * 4 + [2] * 5 + [0] * 2, [1] * 2 + [2] * 2 + [3] * 7])


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _masks():
  """``allowed [6, T, T]``: the masks :class:`Decoder` builds without a cache, two rows
  each: causal, causal with left padding (empty rows), packed segments."""
  causal = np.tril(np.ones((T, T), bool))[None].repeat(2, 0)
  real = np.ones((2, T), bool)
  real[1, :3] = False                                   # left padding: 3 empty rows
  same = SEGMENTS[:, :, None] == SEGMENTS[:, None, :]
  packed = causal & same & (SEGMENTS != 0)[:, None, :]  # padding rows (segment 0) empty
  return np.concatenate([causal, causal & real[:, None, :], packed])


def _qkv(heads, kv_heads, d=8, seed=0):
  rng = np.random.RandomState(seed)
  return tuple(jnp.asarray(rng.standard_normal((6, T, n, d)), jnp.float32)
               for n in (heads, kv_heads, kv_heads))


@pytest.mark.parametrize('heads,kv_heads,block', [(4, 2, 4), (3, 1, 2), (2, 2, 16)])
def test_blocked_equals_dense_values_and_gradients(heads, kv_heads, block):
  allowed = jnp.asarray(_masks())
  q, k, v = _qkv(heads, kv_heads)
  weights = jnp.asarray(np.random.RandomState(1).standard_normal(q.shape), jnp.float32)

  @jax.jit
  def value_and_grads(q, k, v):
    out = {}
    for name, f in (('blocked', functools.partial(blocked_attention, allowed=allowed,
                                                  block_size=block)),
                    ('dense', lambda q, k, v: dense_attention(q, k, v, allowed)[0])):
      y, vjp = jax.vjp(f, q, k, v)
      out[name] = (y, vjp(weights))
    return out

  out = value_and_grads(q, k, v)
  np.testing.assert_allclose(out['blocked'][0], out['dense'][0], rtol=1e-5, atol=1e-6)
  for got, want in zip(out['blocked'][1], out['dense'][1]):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_empty_rows_get_the_mean_value_as_the_dense_softmax_gives_them():
  allowed = jnp.asarray(_masks()[2:4])                  # the left-padded pair
  q, k, v = (x[:2] for x in _qkv(2, 1))
  run = jax.jit(blocked_attention, static_argnames=('block_size', 'fill_empty_rows'))
  y = run(q, k, v, allowed, block_size=2)
  mean = np.asarray(v[1]).mean(0)                        # [K=1, d]
  np.testing.assert_allclose(y[1, :3], np.broadcast_to(mean, (3, 2, 8)), rtol=1e-5, atol=1e-6)
  # Without the fix-up an empty row of block [0, 2) averages only the keys [0, 2).
  raw = run(q, k, v, allowed, block_size=2, fill_empty_rows=False)
  np.testing.assert_allclose(raw[1, 0], np.broadcast_to(np.asarray(v[1, :2]).mean(0), (2, 8)),
                             rtol=1e-5, atol=1e-6)


CONFIGS = {
    'gpt2': DecoderConfig.gpt2(**SIZES),
    'llama_gqa': DecoderConfig.llama(**SIZES, num_kv_heads=2),
    'qwen2_mqa_tied': DecoderConfig.qwen2(**SIZES, num_kv_heads=1, tie_embeddings=True),
}


def _pair(name, **blocked):
  """The same random weights as a dense decoder and as a blocked one (blocks of 4)."""
  dense = dataclasses.replace(CONFIGS[name], attention_impl='dense')
  other = dataclasses.replace(dense, **{'attention_impl': 'blocked', 'attention_block_size': 4,
                                        **blocked})
  model = nnx.eval_shape(lambda: Decoder(dense, rngs=nnx.Rngs(0)))
  rng = np.random.RandomState(0)
  params = jax.tree_util.tree_map_with_path(
      lambda p, x: jnp.asarray(0.2 * rng.standard_normal(x.shape) + (p[-2].key == 'scale'),
                               x.dtype), nnx.state(model, nnx.Param))
  nnx.update(model, params)
  apply, params, state = functional(model)
  apply_blocked, _, _ = functional(nnx.eval_shape(lambda: Decoder(other, rngs=nnx.Rngs(0))))
  return apply, apply_blocked, params, state


def _inputs(case):
  rng = np.random.RandomState(3)
  ids = jnp.asarray(rng.randint(1, SIZES['vocab_size'], (2, T)), jnp.int32)
  kwargs = {'plain': {}, 'segments': {'segment_ids': jnp.asarray(SEGMENTS)},
            'left_padding': {'attention_mask': jnp.asarray(np.arange(T)[None]
                                                            >= np.array([[0], [3]]))}}
  return ids, kwargs[case]


@pytest.mark.parametrize('name,case', [('gpt2', 'left_padding'), ('llama_gqa', 'segments'),
                                       ('qwen2_mqa_tied', 'plain')])
def test_decoder_blocked_equals_dense(name, case):
  apply, apply_blocked, params, state = _pair(name)
  ids, kw = _inputs(case)

  @jax.jit
  def run(p):
    return [f(p, state, ids, **kw, output_hidden_states=True, output_qkv=True)[0]
            for f in (apply_blocked, apply)]

  got, want = run(params)
  np.testing.assert_allclose(got.logits, want.logits, rtol=1e-5, atol=1e-5)
  for a, b in zip(jax.tree.leaves((got.hidden_states, got.qkv)),
                  jax.tree.leaves((want.hidden_states, want.qkv))):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize('name,case', [('llama_gqa', 'segments'),
                                       ('qwen2_mqa_tied', 'left_padding')])
def test_decoder_blocked_gradients_equal_dense(name, case):
  apply, apply_blocked, params, state = _pair(name)
  ids, kw = _inputs(case)
  targets = jnp.roll(ids, -1, axis=1)

  def loss(f, p):
    logits = f(p, state, ids, **kw)[0].logits
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), targets[..., None], -1))

  got, want = jax.jit(lambda p: [jax.grad(functools.partial(loss, f))(p)
                                 for f in (apply_blocked, apply)])(params)
  for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def _count_dots(apply, params, state, ids, **kw):
  jaxpr = jax.make_jaxpr(lambda p: apply(p, state, ids, **kw)[0].logits)(params)
  return str(jaxpr).count('dot_general')


def test_auto_blocks_long_rows_and_falls_back_where_it_must():
  apply, apply_blocked, params, state = _pair('llama_gqa')
  ids, _ = _inputs('plain')
  dense_dots = _count_dots(apply, params, state, ids)
  # Blocked: 3 query blocks per layer, 2 products each (dense: 2 per layer).
  assert _count_dots(apply_blocked, params, state, ids) == dense_dots + 2 * 2 * 2
  _, apply_auto, _, _ = _pair('llama_gqa', attention_impl='auto', attention_block_size=5)
  on_cpu = jax.default_backend() == 'cpu'          # 'auto' blocks on XLA:CPU only
  assert _count_dots(apply_auto, params, state, ids) == dense_dots + on_cpu * 2 * 2 * 2
  _, apply_short, _, _ = _pair('llama_gqa', attention_impl='auto', attention_block_size=6)
  assert _count_dots(apply_short, params, state, ids) == dense_dots   # 11 < 2 x 6: dense
  # output_attentions: the dense path, with its probabilities.
  assert _count_dots(apply_blocked, params, state, ids, output_attentions=True) == dense_dots
  got, want = jax.jit(lambda p: [f(p, state, ids, output_attentions=True)[0].attentions
                                 for f in (apply_blocked, apply)])(params)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_cache_decoding_is_the_same_with_blocked_configured():
  """A prompt's prefill and one decoding step through the cache (the dense path) give
  the logits of the whole sequence run at once through the blocked path."""
  _, apply_blocked, params, state = _pair('llama_gqa')
  ids, _ = _inputs('plain')

  @jax.jit
  def run(p):
    full = apply_blocked(p, state, ids)[0].logits
    prefill = apply_blocked(p, state, ids[:, :-1], cache=init_cache(CONFIGS['llama_gqa'], 2, T))[0]
    step = apply_blocked(p, state, ids[:, -1:], cache=prefill.cache)[0]
    return full, prefill.logits, step.logits

  full, prefill, step = run(params)
  np.testing.assert_allclose(prefill, full[:, :-1], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(step[:, 0], full[:, -1], rtol=1e-5, atol=1e-5)


def test_tied_logits_gradient_equals_autodiff_of_the_einsum():
  rng = np.random.RandomState(0)
  h = jnp.asarray(rng.standard_normal((2, 3, 5)), jnp.float32)
  e = jnp.asarray(rng.standard_normal((7, 5)), jnp.float32)
  g = jnp.asarray(rng.standard_normal((2, 3, 7)), jnp.float32)
  plain = lambda h, e: jnp.einsum('btd,vd->btv', h, e)
  np.testing.assert_array_equal(tied_logits(h, e), plain(h, e))
  got = jax.vjp(tied_logits, h, e)[1](g)
  want = jax.vjp(plain, h, e)[1](g)
  for a, b in zip(got, want):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  check_grads(tied_logits, (h, e), order=1, modes=('rev',))


def test_tied_logits_keeps_the_dtypes():
  h = jnp.ones((1, 2, 4), jnp.bfloat16)
  e = jnp.ones((3, 4), jnp.bfloat16)
  d_h, d_e = jax.grad(lambda h, e: tied_logits(h, e).astype(jnp.float32).sum(),
                      argnums=(0, 1))(h, e)
  assert d_h.dtype == d_e.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(d_e, np.float32), np.full((3, 4), 2.0))


def test_config_refuses_an_unknown_attention_impl():
  with pytest.raises(ValueError, match='attention_impl'):
    DecoderConfig.llama(**SIZES, attention_impl='flash')
  with pytest.raises(ValueError, match='attention_block_size'):
    DecoderConfig.llama(**SIZES, attention_block_size=0)
