"""Jitted decoding (kdjax.models.decoding) against decoding without a cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.errors import UserError
from kdjax.models import decoding as gen
from kdjax.models import transformer


@pytest.fixture(scope='module')
def model():
  config = transformer.DecoderConfig(
      vocab_size=37, hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
      intermediate_size=64, max_positions=32, norm='rmsnorm', mlp='swiglu', positions='rope',
      tie_embeddings=False)
  return transformer.Decoder(config, rngs=nnx.Rngs(0))


def _greedy_without_cache(model, prompts, steps, stop=None):
  """Greedy continuation of each prompt alone, recomputing the whole sequence each step
  (right-padded to one width, so one compiled forward; causal: padding after the last
  real token changes nothing before it)."""
  from kdjax.models import functional
  apply, params, state = functional(model)
  width = max(len(p) for p in prompts) + steps
  forward = jax.jit(lambda ids: apply(params, state, ids)[0].logits)
  out = []
  for prompt in prompts:
    seq = list(prompt)
    new = []
    for _ in range(steps):
      ids = np.zeros((1, width), np.int32)
      ids[0, :len(seq)] = seq
      logits = forward(jnp.asarray(ids))[0, len(seq) - 1]
      token = int(jnp.argmax(logits))
      new.append(token)
      seq.append(token)
      if token == stop:
        break
    out.append(new)
  return out


def test_greedy_left_padded_batch_equals_each_prompt_alone(model):
  with jax.default_matmul_precision('highest'):
    prompts = [[3, 5, 7, 9, 11], [2], [30, 1, 4]]
    ids, mask = gen.left_pad(prompts)
    got = gen.generate(model, ids, mask, max_new_tokens=6)
    want = _greedy_without_cache(model, prompts, 6)
  assert got.tokens.shape == (3, 6)
  assert got.tokens.tolist() == want
  assert got.mask.all() and got.lengths.tolist() == [6, 6, 6]


def test_stop_tokens_end_a_row_and_pad_after_it(model):
  with jax.default_matmul_precision('highest'):
    prompts = [[3, 5, 7], [8, 9]]
    ids, mask = gen.left_pad(prompts)
    free = gen.generate(model, ids, mask, max_new_tokens=5)
    stop = int(free.tokens[0, 1])        # row 0's second token becomes a stop token
    got = gen.generate(model, ids, mask, max_new_tokens=5, stop_tokens=(stop,), pad_id=0)
  row = got.tokens[0].tolist()
  assert row[:2] == free.tokens[0, :2].tolist() and row[2:] == [0, 0, 0]
  assert got.mask[0].tolist() == [True, True, False, False, False]
  assert int(got.lengths[0]) == 2
  # the other row is unaffected unless it met the stop token itself
  other = free.tokens[1].tolist()
  cut = other.index(stop) + 1 if stop in other else 5
  assert got.tokens[1, :cut].tolist() == other[:cut]


def test_top_k_1_and_tiny_top_p_are_greedy(model):
  ids, mask = gen.left_pad([[4, 6, 8], [1, 2]])
  greedy = gen.generate(model, ids, mask, max_new_tokens=4)
  for kw in (dict(top_k=1), dict(top_p=1e-6)):
    got = gen.generate(model, ids, mask, max_new_tokens=4, temperature=0.7, rng=3, **kw)
    assert got.tokens.tolist() == greedy.tokens.tolist()
    np.testing.assert_allclose(got.logprobs, 0.0, atol=1e-6)


def _hf_style_filter(z, top_k, top_p):
  """numpy transcription of Hugging Face's TopKLogitsWarper then TopPLogitsWarper
  (transformers/generation/logits_process.py): top-k keeps logits >= the k-th largest;
  top-p sorts ascending and removes entries whose cumulative probability <= 1 - top_p,
  always keeping the most probable one."""
  z = z.astype(np.float64).copy()
  if top_k is not None:
    kth = np.sort(z)[-top_k]
    z[z < kth] = -np.inf
  if top_p is not None:
    order = np.argsort(z, kind='stable')
    p = np.exp(z[order] - np.max(z))
    p /= p.sum()
    remove = np.cumsum(p) <= 1 - top_p
    remove[-1] = False
    z[order[remove]] = -np.inf
  return z


@pytest.mark.parametrize('top_k,top_p', [(None, 0.9), (5, None), (8, 0.7), (None, 0.3)])
def test_process_logits_keeps_what_hugging_face_keeps(top_k, top_p):
  rng = np.random.default_rng(0)
  for _ in range(20):
    z = rng.normal(size=40) * 2
    got = np.asarray(gen.process_logits(jnp.asarray(z, jnp.float32), top_k=top_k, top_p=top_p))
    want = _hf_style_filter(z, top_k, top_p)
    assert ((got > -1e29) == np.isfinite(want)).all()


def test_sampling_frequencies_follow_the_processed_distribution():
  logits = jnp.log(jnp.asarray([[0.4, 0.3, 0.2, 0.1]]))
  keys = jax.random.split(jax.random.key(0), 4000)
  draws = jax.vmap(lambda k: gen._choose(logits, k, 1.0, None, 0.75)[0][0])(keys)
  freq = np.bincount(np.asarray(draws), minlength=4) / 4000
  # top-p 0.75 keeps {0.4, 0.3, 0.2} (0.4 + 0.3 < 0.75), renormalised to 4/9, 3/9, 2/9
  np.testing.assert_allclose(freq, [4 / 9, 3 / 9, 2 / 9, 0.0], atol=0.03)


def test_sample_runs_inside_an_outer_jit_with_a_traced_key(model):
  apply_view = nnx.view(model, deterministic=True, raise_if_not_found=False)
  graphdef, params, state = nnx.split(apply_view, nnx.Param, ...)

  def apply(p, s, x, **kw):
    return nnx.merge(graphdef, p, s)(x, **kw), s

  @jax.jit
  def run(params, key):
    ids, mask = jnp.asarray([[0, 5, 6]]), jnp.asarray([[0, 1, 1]])
    return gen.sample(apply, params, state, ids, mask, key, max_new_tokens=3,
                      init_cache=lambda b, n: transformer.init_cache(model.config, b, n),
                      temperature=1.0, top_k=10)

  a, b = run(params, jax.random.key(1)), run(params, jax.random.key(1))
  assert a.tokens.tolist() == b.tokens.tolist()
  assert np.all(np.asarray(a.logprobs) <= 0)


def test_bad_requests_are_one_line_user_errors(model):
  with pytest.raises(UserError, match='exceeds the model context of 32'):
    gen.generate(model, np.ones((1, 30), np.int32), max_new_tokens=5)
  with pytest.raises(UserError, match='top_p'):
    gen.generate(model, np.ones((1, 3), np.int32), max_new_tokens=2, temperature=1.0, top_p=1.5)
  with pytest.raises(UserError, match='at least one token'):
    gen.left_pad([[1, 2], []])


def test_logits_to_keep_gives_the_last_tokens_logits_and_the_same_cache(model):
  ids = jnp.asarray(np.random.default_rng(0).integers(1, 37, (2, 6)), jnp.int32)
  mask = jnp.asarray([[0, 0, 1, 1, 1, 1], [1] * 6], jnp.int32)
  cache = transformer.init_cache(model.config, 2, 6)
  with jax.default_matmul_precision('highest'):
    full = model(ids, attention_mask=mask, cache=cache)
    last = model(ids, attention_mask=mask, cache=cache, logits_to_keep=2)
  assert last.logits.shape == (2, 2, 37)
  np.testing.assert_allclose(last.logits, full.logits[:, -2:], rtol=1e-6, atol=1e-6)
  jax.tree.map(np.testing.assert_array_equal, last.cache, full.cache)


def test_a_cache_grown_after_the_prompt_decodes_as_one_sized_for_everything(model):
  # The prompt read into a cache of its own length, then grown, continues exactly as
  # in a cache made for prompt + new tokens from the start.
  ids = jnp.asarray([[0, 0, 3, 4, 5], [6, 7, 8, 9, 10]], jnp.int32)
  mask = (ids > 0).astype(jnp.int32)
  step = jnp.asarray([[11], [12]], jnp.int32)
  with jax.default_matmul_precision('highest'):
    grown = model(ids, attention_mask=mask, cache=transformer.init_cache(model.config, 2, 5))
    big = model(ids, attention_mask=mask, cache=transformer.init_cache(model.config, 2, 8))
    a = model(step, cache=grown.cache.grow(3))
    b = model(step, cache=big.cache)
  np.testing.assert_allclose(a.logits, b.logits, rtol=1e-5, atol=1e-6)
  assert a.cache.mask.shape == b.cache.mask.shape == (2, 8)
  np.testing.assert_array_equal(a.cache.mask, b.cache.mask)


def test_a_generator_reads_the_weights_once_and_equals_generate(model):
  prompts, mask = gen.left_pad([[1, 2, 3], [4]])
  g = gen.generator(model, max_new_tokens=5, temperature=1.0, top_k=8)
  a, b = g(prompts, mask, 3), gen.generate(model, prompts, mask, max_new_tokens=5, rng=3,
                                           temperature=1.0, top_k=8)
  np.testing.assert_array_equal(a.tokens, b.tokens)
  np.testing.assert_array_equal(a.mask, b.mask)
  with pytest.raises(UserError, match='max_positions|context'):
    g(np.ones((1, 30), np.int32))
