"""The decoder family: cache decoding, packing, padding, outputs, registry, sharding.

Every comparison runs in float32 at the highest matmul precision, so it also holds on
GPUs with TF32. The Hugging Face parity tests are in ``test_hf_parity.py``.
"""

import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from kdjax.models import create, functional
from kdjax.models.transformer import (
    PARTITION_RULES, Decoder, DecoderConfig, KVCache, config_from_hf, config_to_hf,
    hf_model_type, init_cache, partition_rules, segment_positions)
from kdjax.errors import UserError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
SIZES = dict(vocab_size=37, hidden_size=16, num_layers=2, num_heads=4, intermediate_size=24,
             max_positions=32)
CONFIGS = {
    'gpt2': DecoderConfig.gpt2(**SIZES),
    'llama_gqa': DecoderConfig.llama(**SIZES, num_kv_heads=2),
    'qwen2_mqa_tied': DecoderConfig.qwen2(**SIZES, num_kv_heads=1, tie_embeddings=True),
}


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def random_decoder(config, seed=0):
  """A :class:`Decoder` with random parameters drawn by numpy (building it abstractly and
  filling it compiles nothing): norm scales ``1 + 0.1 N(0, 1)``, everything else
  ``0.1 N(0, 1)``, so a wrong wiring of any parameter, biases and norms included, shows."""
  model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
  params = nnx.state(model, nnx.Param)
  rng = np.random.RandomState(seed)

  def draw(path, x):
    noise = 0.1 * rng.standard_normal(x.shape)
    return jnp.asarray(noise + (path[-2].key == 'scale'), x.dtype)

  nnx.update(model, jax.tree_util.tree_map_with_path(draw, params))
  return model


def _model(name, seed=0):
  return random_decoder(CONFIGS[name], seed)


class _Jitted:
  """``model(ids, **kwargs)`` compiled once per shape (op-by-op dispatch compiles every
  primitive of a new shape, which is slower for these tests)."""

  def __init__(self, model):
    apply, self.params, self.state = functional(model)
    self.fn = jax.jit(lambda p, s, ids, kw, flags: apply(p, s, ids, **kw, **dict(flags))[0],
                      static_argnums=4)

  def __call__(self, ids, **kwargs):
    flags = tuple(sorted((k, kwargs.pop(k)) for k in list(kwargs) if k.startswith('output_')))
    return self.fn(self.params, self.state, jnp.asarray(ids, jnp.int32), kwargs, flags)


def _rows(lengths, seed=0):
  rng = np.random.RandomState(seed)
  return [rng.randint(1, SIZES['vocab_size'], n).tolist() for n in lengths]


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_cached_decoding_equals_the_full_forward_of_each_row(name):
  """Left-padded prompts of different lengths, a prefill, then greedy steps with the
  cache donated under jit: every step's logits are those of the row's unpadded
  sequence run without a cache."""
  model = _model(name)
  apply, params, state = functional(model)
  step = jax.jit(lambda p, s, ids, mask, cache: apply(p, s, ids, attention_mask=mask,
                                                      cache=cache)[0],
                 donate_argnums=(4,))
  prompts = _rows([5, 2, 4])
  width, new = 5, 4
  ids = np.array([[0] * (width - len(r)) + r for r in prompts], np.int32)
  mask = np.array([[0] * (width - len(r)) + [1] * len(r) for r in prompts], np.int32)
  cache = init_cache(model, len(prompts), width + new)
  out = step(params, state, ids, mask, cache)
  seqs, steps = [list(r) for r in prompts], []
  for i in range(new):
    steps.append(np.asarray(out.logits[:, -1]))
    tokens = steps[-1].argmax(-1).astype(np.int32)
    for seq, token in zip(seqs, tokens):
      seq.append(int(token))
    cache = out.cache
    assert int(cache.index) == width + i
    out = step(params, state, tokens[:, None], np.ones((len(seqs), 1), np.int32), cache)
  np.testing.assert_array_equal(np.asarray(out.cache.positions), [len(s) for s in seqs])
  np.testing.assert_array_equal(np.asarray(out.cache.mask), np.concatenate(
      [mask, np.ones((len(seqs), new), np.int32)], axis=1).astype(bool))
  # The reference: each row's unpadded sequence, without a cache. Rows are right-padded
  # to one batch, which a causal model's earlier positions do not see.
  longest = max(map(len, seqs))
  full = np.asarray(_Jitted(model)([s + [0] * (longest - len(s)) for s in seqs]).logits)
  for i, got in enumerate(steps):
    for row, prompt in enumerate(prompts):
      np.testing.assert_allclose(got[row], full[row, len(prompt) - 1 + i], rtol=1e-5, atol=1e-5)


def test_cache_contract_fields_and_room():
  model = _model('llama_gqa')
  cache = init_cache(model.config, 2, 6)
  assert isinstance(cache, KVCache) and cache.keys[0].shape == (2, 6, 2, 4)
  assert cache.positions.dtype == jnp.int32 and cache.index.dtype == jnp.int32
  out = _Jitted(model)(jnp.ones((2, 4), jnp.int32), attention_mask=jnp.array([[0, 1, 1, 1]] * 2),
                      cache=cache)
  np.testing.assert_array_equal(out.cache.positions, [3, 3])
  assert int(out.cache.index) == 4 and out.attentions is None
  with pytest.raises(ValueError, match='do not fit'):   # a concrete index is checked
    model(jnp.ones((2, 3), jnp.int32), cache=out.cache)


@pytest.mark.parametrize('name', ['gpt2', 'llama_gqa'])
def test_packed_segments_equal_separate_rows(name):
  """Two sequences packed in one row (plus padding) give each sequence's own logits."""
  model = _Jitted(_model(name))
  a, b = _rows([4, 3], seed=1)
  packed = jnp.asarray([a + b + [0, 0]], jnp.int32)
  segments = jnp.asarray([[1] * 4 + [2] * 3 + [0, 0]], jnp.int32)
  out = model(packed, segment_ids=segments, output_attentions=True)
  alone = model([a, b + [0]]).logits   # b right-padded: its 3 positions do not see it
  np.testing.assert_allclose(out.logits[0, :4], alone[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(out.logits[0, 4:7], alone[1, :3], rtol=1e-5, atol=1e-5)
  probs = np.asarray(out.attentions[0][0])
  assert np.all(probs[:, 4:7, :4] == 0) and np.all(probs[:, :4, 4:] == 0)


def test_segment_positions_restart_per_segment():
  got = segment_positions(jnp.array([[3, 3, 5, 5, 5, 0], [1, 2, 2, 2, 2, 2]]))
  np.testing.assert_array_equal(got, [[0, 1, 0, 1, 2, 0], [0, 0, 1, 2, 3, 4]])


@pytest.mark.parametrize('name', ['gpt2', 'qwen2_mqa_tied'])
def test_left_padding_does_not_change_the_real_tokens(name):
  model = _Jitted(_model(name))
  (row,) = _rows([4], seed=2)
  padded = model([[0, 0] + row], attention_mask=jnp.asarray([[0, 0, 1, 1, 1, 1]]))
  np.testing.assert_allclose(padded.logits[0, 2:], model([row + [0, 0]]).logits[0, :4],
                             rtol=1e-5, atol=1e-5)


def test_fully_masked_rows_stay_finite():
  model = _Jitted(_model('llama_gqa'))
  out = model(jnp.ones((2, 3), jnp.int32), attention_mask=jnp.zeros((2, 3), jnp.int32),
              output_attentions=True)
  assert np.all(np.isfinite(out.logits)) and np.all(np.isfinite(out.attentions[0]))


def test_outputs_only_when_asked():
  model = _Jitted(_model('llama_gqa'))
  ids = jnp.ones((2, 5), jnp.int32)
  plain = model(ids)
  assert plain.hidden_states is None and plain.attentions is None and plain.qkv is None
  assert plain.cache is None and plain.features['final_hidden'].shape == (2, 5, 16)
  out = model(ids, output_hidden_states=True, output_attentions=True, output_qkv=True)
  assert len(out.hidden_states) == 3 and len(out.attentions) == 2 and len(out.qkv) == 2
  # As transformers: the last hidden state is the final norm's output.
  np.testing.assert_array_equal(out.hidden_states[-1], out.features['final_hidden'])
  q, k, v = out.qkv[0]
  assert q.shape == (2, 5, 16) and k.shape == v.shape == (2, 5, 8)
  assert out.attentions[0].shape == (2, 4, 5, 5)
  np.testing.assert_allclose(out.attentions[1].sum(-1), 1.0, rtol=1e-6)
  # Another compiled program (fusions differ): equal up to float rounding.
  np.testing.assert_allclose(out.logits, plain.logits, rtol=1e-6, atol=1e-6)


def test_bfloat16_computation_keeps_float32_attention():
  config = DecoderConfig.llama(**SIZES, num_kv_heads=2, dtype=jnp.bfloat16)
  out = _Jitted(random_decoder(config))(jnp.ones((1, 4)), output_attentions=True)
  assert out.logits.dtype == jnp.bfloat16 and out.attentions[0].dtype == jnp.float32


@pytest.mark.parametrize('preset', ['gpt2', 'llama', 'qwen2', 'decoder'])
def test_registry_builds_each_preset(preset):
  model = create(preset, num_classes=29, input_shape=(12,), hidden_size=16, num_layers=1,
                 num_heads=2)
  assert model.config.vocab_size == 29 and model.config.max_positions == 12
  apply, params, state = functional(model)
  out, _ = jax.jit(apply)(params, state, jnp.zeros((2, 12), jnp.int32))
  assert out.logits.shape == (2, 12, 29)
  with pytest.raises(ValueError, match='input_shape'):
    create(preset, num_classes=29, input_shape=(4, 4), hidden_size=16, num_layers=1,
           num_heads=2)


def test_config_validation():
  with pytest.raises(ValueError, match='num_kv_heads'):
    DecoderConfig.llama(**SIZES, num_kv_heads=3)
  with pytest.raises(ValueError, match='norm'):
    DecoderConfig(**SIZES, norm='batchnorm')
  with pytest.raises(ValueError, match='fused_qkv'):
    DecoderConfig.gpt2(**SIZES, num_kv_heads=2)


@pytest.mark.parametrize('name', sorted(CONFIGS))
def test_hf_config_round_trip(name):
  config = CONFIGS[name]
  assert config_from_hf(config_to_hf(config)) == config


def test_hf_config_errors():
  with pytest.raises(UserError, match='supported: gpt2, llama, qwen2'):
    config_from_hf({'model_type': 't5'})
  with pytest.raises(UserError, match="lacks 'intermediate_size'"):
    config_from_hf({'model_type': 'llama', 'vocab_size': 4, 'hidden_size': 8,
                    'num_hidden_layers': 1, 'num_attention_heads': 2})
  with pytest.raises(UserError, match='sliding'):
    config_from_hf({**config_to_hf(CONFIGS['qwen2_mqa_tied']), 'use_sliding_window': True})
  with pytest.raises(UserError, match='RoPE type'):
    config_from_hf({**config_to_hf(CONFIGS['llama_gqa']),
                    'rope_parameters': {'rope_type': 'yarn', 'rope_theta': 1e4}})
  with pytest.raises(UserError, match='none of'):
    hf_model_type(DecoderConfig(**SIZES, norm='layernorm'))


def test_partition_rules_drop_absent_axes():
  mesh = jax.make_mesh((1,), ('data',))
  assert all(value is None or set(value) == {None}
             for _, value in partition_rules(mesh))
  mesh = jax.make_mesh((1, 1), ('fsdp', 'model'))
  assert partition_rules(mesh) == PARTITION_RULES
  from kdjax.parallel import shardings_from_rules
  params = nnx.state(nnx.eval_shape(lambda: _model('llama_gqa')), nnx.Param)
  sh = shardings_from_rules(params, partition_rules(jax.make_mesh((1,), ('data',))),
                            jax.make_mesh((1,), ('data',)))
  assert sh['layers'][0]['attn']['q']['kernel'].spec == P(None, None, None)


def test_sharded_loading_on_eight_devices(tmp_path):
  """from_pretrained with a (data=2, fsdp=2, model=2) mesh: parameters land in their
  shardings (a dimension that does not divide is replicated) and the jitted logits
  equal the single-device ones."""
  code = textwrap.dedent('''
      import sys
      import jax, jax.numpy as jnp, numpy as np
      from flax import nnx
      from jax.sharding import PartitionSpec as P
      jax.config.update('jax_default_matmul_precision', 'highest')
      from kdjax.models import functional, from_pretrained, save_pretrained
      from kdjax.models.transformer import Decoder, DecoderConfig, partition_rules
      from kdjax.parallel import make_mesh, shardings_from_rules
      sys.path.insert(0, sys.argv[2])
      from test_transformer import random_decoder
      assert jax.device_count() == 8
      mesh = make_mesh([('data', 2), ('fsdp', 2), ('model', 2)])
      sizes = dict(hidden_size=16, num_layers=2, num_heads=4, intermediate_size=24,
                   max_positions=16)
      configs = {'llama': DecoderConfig.llama(vocab_size=40, num_kv_heads=2, **sizes),
                 'gpt2': DecoderConfig.gpt2(vocab_size=41, **sizes)}
      ids = np.random.RandomState(0).randint(0, 40, (4, 6)).astype(np.int32)
      for name, config in configs.items():
        folder = sys.argv[1] + '/' + name
        save_pretrained(random_decoder(config), folder)
        local = from_pretrained(folder)
        sharded = from_pretrained(folder, mesh=mesh)
        params = nnx.state(sharded, nnx.Param)
        layer = params['layers'][0]
        if name == 'llama':
          assert layer['attn']['q']['kernel'][...].sharding.spec == P('fsdp', 'model', None)
          assert layer['attn']['o']['kernel'][...].sharding.spec == P('model', None, 'fsdp')
          assert layer['mlp']['down']['kernel'][...].sharding.spec == P('model', 'fsdp')
          assert params['embed']['embedding'][...].sharding.spec == P('model', 'fsdp')
          shard = layer['attn']['q']['kernel'][...].addressable_shards[0].data
          assert shard.shape == (8, 2, 4), shard.shape
          # The rules mean the same through kdjax.parallel where every size divides.
          rules = shardings_from_rules(params, partition_rules(mesh), mesh)
          for want, got in zip(jax.tree.leaves(rules), jax.tree.leaves(params)):
            assert got.sharding.spec == want.spec, (got.sharding.spec, want.spec)
        else:
          assert layer['attn']['qkv']['kernel'][...].sharding.spec == P('fsdp', None, 'model', None)
          # 41 tokens do not divide by 'model': that dimension is replicated.
          assert params['embed']['embedding'][...].sharding.spec == P(None, 'fsdp')
        apply, p, s = functional(local)
        want = np.asarray(jax.jit(apply)(p, s, jnp.asarray(ids))[0].logits)
        apply, p, s = functional(sharded)
        got = jax.jit(apply)(p, s, jnp.asarray(ids))[0].logits
        np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5)
      print('ok')
  ''')
  env = {**os.environ, 'JAX_NUM_CPU_DEVICES': '8', 'JAX_PLATFORMS': 'cpu',
         'XLA_FLAGS': (os.environ.get('XLA_FLAGS', '') +
                       ' --xla_force_host_platform_device_count=8').strip()}
  out = subprocess.run([sys.executable, '-c', code, str(tmp_path), os.path.dirname(__file__)],
                       env=env, cwd=ROOT,
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'ok' in out.stdout
