"""Token-level losses: [batch, time, vocab] with a token mask, and the chunked form."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as L


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """Exact comparisons: no TF32 (or bfloat16 passes) where XLA turns sums into dots."""
  with jax.default_matmul_precision('highest'):
    yield

Bt, T, V, K = 2, 7, 11, 3


def make(seed=0, dtype=jnp.float32):
  rng = np.random.default_rng(seed)
  s = jnp.asarray(rng.normal(size=(Bt, T, V)) * 2.0, dtype)
  t = jnp.asarray(rng.normal(size=(Bt, T, V)) * 2.0, dtype)
  y = jnp.asarray(rng.integers(0, V, size=(Bt, T)))
  where = jnp.asarray(rng.uniform(size=(Bt, T)) > 0.3)
  return s, t, y, where


# (name, loss_fn, extra positional arrays builder, options)
PER_TOKEN = [
    ('kd', L.kd, lambda s, t, y: (t,), dict(temperature=2.0)),
    ('reverse_kl', L.reverse_kl, lambda s, t, y: (t,), dict(temperature=1.5)),
    ('gjsd', L.generalized_jsd, lambda s, t, y: (t,), dict(beta=0.3)),
    ('tvd', L.tvd, lambda s, t, y: (t,), {}),
    ('dkd', L.dkd, lambda s, t, y: (t, y), dict(temperature=2.0)),
    ('ce', L.ce, lambda s, t, y: (y,), dict(label_smoothing=0.1)),
    ('sparse_kd', L.sparse_kd, lambda s, t, y: jax.lax.top_k(t, K),
     dict(temperature=2.0)),
]


@pytest.mark.parametrize('chunk_size', [4])  # 14 tokens: 4 chunks, the last one padded
@pytest.mark.parametrize('name,fn,extra,opts', PER_TOKEN, ids=[p[0] for p in PER_TOKEN])
def test_chunked_equals_plain_value_and_gradient(name, fn, extra, opts, chunk_size):
  s, t, y, where = make(1)
  args = extra(s, t, y)
  plain = lambda s_: fn(s_, *args, where=where, **opts)
  chunk = lambda s_: L.chunked(fn, chunk_size)(s_, *args, where=where, **opts)
  np.testing.assert_allclose(chunk(s), plain(s), rtol=1e-6, atol=1e-7)
  assert chunk(s).shape == (Bt, T)
  weights = jnp.asarray(np.random.default_rng(2).uniform(size=(Bt, T)), jnp.float32)
  g_plain = jax.grad(lambda s_: jnp.sum(plain(s_) * weights))(s)
  g_chunk = jax.grad(lambda s_: jnp.sum(chunk(s_) * weights))(s)
  np.testing.assert_allclose(g_chunk, g_plain, rtol=1e-5, atol=1e-7)
  np.testing.assert_array_equal(np.asarray(g_chunk)[~np.asarray(where)], 0.0)


def test_one_chunk_larger_than_the_batch():
  s, t, _, where = make(8)
  np.testing.assert_allclose(L.chunked_kd(s, t, chunk_size=100, where=where),
                             L.kd(s, t, where=where), rtol=1e-6, atol=1e-7)


def test_token_mask_matches_per_token_loop():
  s, t, _, where = make(3)
  got = L.kd(s, t, temperature=2.0, where=where)
  for b in range(Bt):
    for i in range(T):
      want = L.kd(s[b, i][None], t[b, i][None], temperature=2.0)[0] if where[b, i] else 0.0
      np.testing.assert_allclose(got[b, i], want, rtol=1e-6, atol=1e-7)


def test_chunked_kd_bfloat16_under_jit_with_traced_temperature():
  s, t, _, where = make(4, jnp.bfloat16)
  f = jax.jit(lambda s_, temp: L.chunked_kd(s_, t, temperature=temp, chunk_size=4, where=where))
  got = f(s, jnp.asarray(3.0))
  assert got.dtype == jnp.float32
  # float32: the jitted chunks (traced temperature) and the eager whole array round apart
  # by a few ulps.
  np.testing.assert_allclose(got, L.kd(s, t, temperature=3.0, where=where), rtol=1e-5,
                             atol=1e-6)
  g = jax.grad(lambda s_: jnp.sum(f(s_, jnp.asarray(3.0))))(s)
  assert g.dtype == jnp.bfloat16 and np.all(np.isfinite(np.asarray(g, np.float32)))


def test_registered_chunked_kd_term():
  s, t, _, where = make(5)
  objective = L.build_objective({'chunked_kd': dict(temperature=2.0, chunk_size=5)})
  inputs = dict(student_logits=s, teacher_logits=t, where=where)
  params, state = objective.init(jax.random.key(0), inputs)
  loss, _, _ = objective.apply(params, state, inputs)
  w = np.asarray(where)
  np.testing.assert_allclose(loss, np.asarray(L.kd(s, t, temperature=2.0))[w].mean(), rtol=1e-6)


def test_chunked_rejects_mismatched_shapes_and_bad_chunks():
  s, t, _, _ = make(6)
  with pytest.raises(ValueError, match='per-example shape'):
    L.chunked(L.kd, 4)(s, t[:, :3])
  with pytest.raises(ValueError, match='chunk_size'):
    L.chunked(L.kd, 0)


def test_chunked_keeps_float32_temporaries_to_one_chunk():
  """Compiled scratch memory of value+grad: chunked far below plain.

  float32 inputs: with bfloat16 inputs XLA:CPU upcasts the whole input arrays
  before the loop (see benchmarks/RESULTS.md), which hides the effect on CPU.
  """
  n, vocab = 512, 2048
  s = jax.ShapeDtypeStruct((n, vocab), jnp.float32)

  def temp_bytes(fn):
    grad = jax.jit(jax.value_and_grad(lambda s_, t_: jnp.sum(fn(s_, t_))))
    # An executable loaded from the persistent compilation cache has no memory analysis.
    was = jax.config.jax_enable_compilation_cache
    jax.config.update('jax_enable_compilation_cache', False)
    try:
      analysis = grad.lower(s, s).compile().memory_analysis()
    finally:
      jax.config.update('jax_enable_compilation_cache', was)
    assert analysis is not None, 'XLA:CPU gives a memory analysis of a fresh compile'
    return analysis.temp_size_in_bytes

  plain = temp_bytes(lambda s_, t_: L.kd(s_, t_, temperature=2.0))
  chunk = temp_bytes(lambda s_, t_: L.chunked_kd(s_, t_, temperature=2.0, chunk_size=32))
  assert chunk < plain / 4, (chunk, plain)


def test_chunks_of_rows_keep_float32_temporaries_to_one_chunk():
  """[rows, time, vocab]: a chunk is chunk_size tokens of every row (the batch axis is
  never cut, so a sharded batch stays sharded); 8 rows x 4 tokens of 64, the plain
  loss's scratch over 4x smaller. The chunks are sliced in the loop, not stacked before
  it (moving the chunk axis first would copy the logits and their gradient)."""
  s = jax.ShapeDtypeStruct((8, 64, 2048), jnp.float32)

  def temp_bytes(fn):
    grad = jax.jit(jax.value_and_grad(lambda s_, t_: jnp.sum(fn(s_, t_))))
    return grad.lower(s, s).compile().memory_analysis().temp_size_in_bytes

  plain = temp_bytes(lambda s_, t_: L.kd(s_, t_, temperature=2.0))
  chunk = temp_bytes(lambda s_, t_: L.chunked_kd(s_, t_, temperature=2.0, chunk_size=4))
  assert chunk < plain / 4, (chunk, plain)


def test_chunked_gradient_reaches_a_traced_option():
  s, t, _, where = make(7)
  plain = jax.grad(lambda T: jnp.sum(L.kd(s, t, temperature=T, where=where)))(2.0)
  chunk = jax.grad(lambda T: jnp.sum(L.chunked_kd(s, t, temperature=T, chunk_size=4,
                                                  where=where)))(2.0)
  np.testing.assert_allclose(chunk, plain, rtol=1e-5)
