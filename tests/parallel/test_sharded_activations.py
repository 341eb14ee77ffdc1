"""Data and FSDP parallelism keep the batch split: the chunked token loss and the decoder's
residual stream on 4 fake CPU devices (one subprocess), and the decoder unchanged without
a mesh in context."""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models.transformer import Decoder, DecoderConfig

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))

# Mesh data=2 x fsdp=2; the batch is split over both (kdjax.parallel.batch_axes).
SCRIPT = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np
    from flax import nnx
    import kdjax.losses as L
    from kdjax.models.transformer import Decoder, DecoderConfig, PARTITION_RULES
    from kdjax.parallel import batch_sharding, make_mesh, shardings_from_rules
    from kdjax.plan import collective_bytes

    jax.config.update('jax_default_matmul_precision', 'highest')
    mesh = make_mesh([('data', 2), ('fsdp', 2)])
    rows = batch_sharding(mesh)
    sent = lambda hlo: sum(c['link_bytes'] for c in collective_bytes(hlo, 4).values())

    # 1. chunked_kd over a batch split 4 ways: each device its own rows' chunks, so the
    #    value and gradient of the summed loss need one scalar all-reduce and nothing else
    #    (the former flat chunks cut across the split batch and gathered the logits).
    rng = np.random.default_rng(0)
    s, t = (jnp.asarray(rng.normal(size=(8, 12, 64)) * 2, jnp.float32) for _ in range(2))
    where = jnp.asarray(rng.uniform(size=(8, 12)) > 0.3)
    def grad_of(loss):
      return jax.jit(jax.value_and_grad(lambda a, b, w: jnp.sum(loss(a, b, w))))
    chunked = grad_of(lambda a, b, w: L.chunked_kd(a, b, temperature=2.0, chunk_size=5, where=w))
    plain = grad_of(lambda a, b, w: L.kd(a, b, temperature=2.0, where=w))
    args = jax.device_put((s, t, where), rows)
    compiled = chunked.lower(*args).compile()
    (v1, g1), (v0, g0) = compiled(*args), plain(s, t, where)
    np.testing.assert_allclose(v1, v0, rtol=1e-6)
    np.testing.assert_allclose(g1, g0, rtol=1e-5, atol=1e-7)
    assert g1.sharding.spec == rows.spec, g1.sharding
    got = collective_bytes(compiled.as_text(), 4)
    assert set(got) == {'all-reduce'} and got['all-reduce']['bytes'] == 4, got

    # 2. The decoder under FSDP. With the mesh in context (jax.set_mesh) the residual
    #    stream is constrained to the batch axes: the collectives move the weights and
    #    their gradients only, so their bytes do not grow with the batch; without it the
    #    partitioner moves activations (bytes that grow with the batch).
    cfg = DecoderConfig.llama(vocab_size=64, hidden_size=32, num_layers=1, num_heads=4,
                              num_kv_heads=2, intermediate_size=64, max_positions=16,
                              tie_embeddings=False)
    graph, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
    placed = shardings_from_rules(params, PARTITION_RULES, mesh)
    def loss(p, ids):
      return jnp.mean(jax.nn.log_softmax(nnx.merge(graph, p)(ids).logits)[..., 0])
    step = jax.jit(jax.value_and_grad(loss), in_shardings=(placed, rows),
                   out_shardings=(None, placed))
    params = jax.device_put(params, placed)
    def compile_for(batch, in_mesh):
      ids = jax.ShapeDtypeStruct((batch, 12), jnp.int32, sharding=rows)
      if not in_mesh:
        return step.lower(params, ids).compile()
      with jax.set_mesh(mesh):
        return step.lower(params, ids).compile()
    small, large = compile_for(8, True), compile_for(32, True)
    large_free = compile_for(32, False)
    small_bytes, large_bytes, free_bytes = (sent(c.as_text()) for c in (small, large, large_free))
    assert large_bytes <= 1.02 * small_bytes, (small_bytes, large_bytes)
    assert large_bytes < 0.7 * free_bytes, (large_bytes, free_bytes)
    # Same numbers with and without the constraint (float32 rounding apart).
    ids = jax.device_put(jnp.asarray(rng.integers(0, 64, size=(32, 12)), jnp.int32), rows)
    for a, b in zip(jax.tree.leaves(large_free(params, ids)), jax.tree.leaves(large(params, ids))):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    print('ok', small_bytes, large_bytes, free_bytes)
''')


def test_batch_stays_split_on_four_devices():
  env = {**os.environ, 'JAX_NUM_CPU_DEVICES': '4', 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-c', SCRIPT], env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.startswith('ok'), out.stdout


def test_decoder_without_a_mesh_has_no_constraint():
  """No mesh in context: the traced program is the one without the constraint."""
  cfg = DecoderConfig.llama(vocab_size=16, hidden_size=8, num_layers=1, num_heads=2,
                            intermediate_size=16, max_positions=8)
  graph, params = nnx.split(Decoder(cfg, rngs=nnx.Rngs(0)))
  ids = jnp.zeros((4, 8), jnp.int32)
  jaxpr = jax.make_jaxpr(lambda p: nnx.merge(graph, p)(ids).logits)(params)
  assert 'sharding_constraint' not in str(jaxpr)
