"""Hugging Face checkpoints: parity with ``transformers`` and the loader's errors.

Tiny randomly initialised ``transformers`` models (GPT-2; Llama with grouped-query
attention, untied and tied, the tied one with Llama 3 RoPE scaling; Qwen2 with its
q/k/v biases, saved in shards) are written with their own ``save_pretrained``; kdjax's
``from_pretrained`` must give their logits, hidden states and attentions (float32,
eager attention, highest matmul precision), and kdjax's ``save_pretrained`` must give
a folder ``transformers`` loads with no missing or unexpected keys and the same
logits. Every parameter is perturbed after the default initialisation (which leaves
biases at 0 and norm weights at 1), so a mix-up of any of them shows.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax.errors import UserError
from kdjax.models import MLP, functional, from_pretrained, save_pretrained
from kdjax.models import hf
from kdjax.models.transformer import Decoder, DecoderConfig, hf_tensors

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

VOCAB = 96
LLAMA = dict(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
CASES = {
    'gpt2': lambda: transformers.GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4,
                                            n_positions=32, bos_token_id=1, eos_token_id=2),
    'llama_gqa': lambda: transformers.LlamaConfig(**LLAMA, tie_word_embeddings=False),
    # Tied head, one key/value head, head_dim 16: RoPE frequencies in all three bands of
    # Llama 3's scaling (wavelengths 6.3 < 8 kept, 19.9 interpolated, >= 62.8 stretched).
    'llama_tied_llama3_rope': lambda: transformers.LlamaConfig(
        **{**LLAMA, 'num_attention_heads': 2, 'num_key_value_heads': 1},
        tie_word_embeddings=True,
        rope_parameters={'rope_type': 'llama3', 'rope_theta': 10000.0, 'factor': 8.0,
                         'low_freq_factor': 1.0, 'high_freq_factor': 4.0,
                         'original_max_position_embeddings': 32}),
    'qwen2_sharded': lambda: transformers.Qwen2Config(**LLAMA, tie_word_embeddings=False),
}
SHARDED = {'qwen2_sharded'}   # saved with a small max_shard_size: the index path


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _hf_model(config, seed=0):
  torch.manual_seed(seed)
  model = transformers.AutoModelForCausalLM.from_config(config, attn_implementation='eager')
  with torch.no_grad():
    for p in model.parameters():
      p.add_(0.1 * torch.randn_like(p))
  return model.float().eval()


@pytest.fixture(scope='module')
def checkpoints(tmp_path_factory):
  """``{case: (transformers model, folder it saved itself to)}``."""
  out = {}
  for name, make in CASES.items():
    model = _hf_model(make())
    folder = str(tmp_path_factory.mktemp(name))
    model.save_pretrained(folder, max_shard_size='16KB' if name in SHARDED else '5GB')
    out[name] = (model, folder)
  return out


def _inputs():
  """Two rows of 7 tokens, the second left-padded by 2; HF gets kdjax's position ids."""
  ids = np.random.RandomState(0).randint(0, VOCAB, (2, 7)).astype(np.int32)
  mask = np.ones((2, 7), np.int32)
  mask[1, :2] = 0
  positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
  return ids, mask, positions


def _hf_forward(model, ids, mask, positions):
  with torch.no_grad():
    return model(torch.tensor(ids, dtype=torch.long), attention_mask=torch.tensor(mask),
                 position_ids=torch.tensor(positions, dtype=torch.long),
                 output_hidden_states=True, output_attentions=True)


def _kd_forward(module, ids, mask):
  apply, params, state = functional(module)
  run = jax.jit(lambda p, s, x, m: apply(p, s, x, attention_mask=m, output_hidden_states=True,
                                         output_attentions=True)[0])
  return run(params, state, jnp.asarray(ids), jnp.asarray(mask))


def _close(got, want, real):
  """Relative 1e-4 (of the reference's scale) at the real tokens ``real [B, T]``."""
  got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
  scale = np.abs(want).max()
  np.testing.assert_allclose(got[real], want[real], rtol=1e-4, atol=1e-4 * scale)


@pytest.mark.parametrize('case', sorted(CASES))
def test_from_pretrained_matches_transformers(checkpoints, case):
  model, folder = checkpoints[case]
  if case in SHARDED:
    assert os.path.isfile(os.path.join(folder, hf.WEIGHTS_INDEX))
    assert not os.path.isfile(os.path.join(folder, hf.WEIGHTS))
  ids, mask, positions = _inputs()
  ref = _hf_forward(model, ids, mask, positions)
  module = from_pretrained(folder)
  assert isinstance(module, Decoder)
  out = _kd_forward(module, ids, mask)
  real = mask.astype(bool)
  _close(out.logits, ref.logits.numpy(), real)
  assert len(out.hidden_states) == len(ref.hidden_states) == 3
  for got, want in zip(out.hidden_states, ref.hidden_states):
    _close(got, want.numpy(), real)
  assert len(out.attentions) == len(ref.attentions) == 2
  for got, want in zip(out.attentions, ref.attentions):
    # [B, H, T, S]: the real query rows (padding keys get probability 0 in both).
    _close(np.moveaxis(np.asarray(got), 1, 2), np.moveaxis(want.numpy(), 1, 2), real)


@pytest.mark.parametrize('case', sorted(CASES))
def test_save_pretrained_loads_in_transformers(checkpoints, case, tmp_path):
  model, folder = checkpoints[case]
  module = from_pretrained(folder)
  files = save_pretrained(module, tmp_path, max_shard_bytes=8192 if case in SHARDED else 2**30)
  assert (len(files) > 1) == (case in SHARDED)
  config = json.load(open(tmp_path / 'config.json'))
  assert config['architectures'] == model.config.architectures
  assert config['dtype'] == config['torch_dtype'] == 'float32'
  loaded, info = transformers.AutoModelForCausalLM.from_pretrained(
      tmp_path, attn_implementation='eager', output_loading_info=True)
  assert not info['missing_keys'] and not info['unexpected_keys'], info
  assert not info['mismatched_keys'], info
  ids, mask, positions = _inputs()
  want = _hf_forward(model, ids, mask, positions).logits.numpy()
  got = _hf_forward(loaded.eval(), ids, mask, positions).logits.numpy()
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
  # Same tensors, names and shapes as transformers' own save (a tied head is not written).
  theirs = _tensor_shapes(folder)
  assert _tensor_shapes(tmp_path) == theirs


def _tensor_shapes(folder):
  from safetensors import safe_open
  out = {}
  for f in sorted(os.listdir(folder)):
    if f.endswith('.safetensors'):
      with safe_open(os.path.join(folder, f), framework='numpy') as h:
        out.update({k: tuple(h.get_slice(k).get_shape()) for k in h.keys()})
  return out


def test_bfloat16_checkpoints(checkpoints, tmp_path):
  """bfloat16 tensors (which numpy cannot read) load, in float32 or bfloat16, and a
  bfloat16 module saves bit-identical tensors with dtype bfloat16 in config.json."""
  model, _ = checkpoints['llama_gqa']
  model_bf16 = _hf_model(CASES['llama_gqa']()).to(torch.bfloat16)
  model_bf16.save_pretrained(tmp_path / 'bf16')
  reference = _hf_model(CASES['llama_gqa']()).to(torch.bfloat16).float()   # same rounding
  ids, mask, positions = _inputs()
  want = _hf_forward(reference, ids, mask, positions).logits.numpy()
  got = _kd_forward(from_pretrained(tmp_path / 'bf16'), ids, mask).logits
  _close(got, want, mask.astype(bool))

  module = from_pretrained(tmp_path / 'bf16', dtype=jnp.bfloat16)
  assert module.embed.embedding[...].dtype == jnp.bfloat16
  save_pretrained(module, tmp_path / 'again')
  assert json.load(open(tmp_path / 'again' / 'config.json'))['dtype'] == 'bfloat16'
  again = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / 'again')
  assert again.dtype == torch.bfloat16
  for (name, a), b in zip(model_bf16.state_dict().items(), again.state_dict().values()):
    assert torch.equal(a, b), name


def test_base_model_checkpoints_without_the_prefix(checkpoints, tmp_path):
  """A bare GPT2Model checkpoint (names without 'transformer.', like the original gpt2
  upload) with the causal-mask buffers older versions saved loads as the tied LM."""
  from safetensors.numpy import load_file, save_file
  model, _ = checkpoints['gpt2']
  model.transformer.save_pretrained(tmp_path)
  tensors = load_file(tmp_path / 'model.safetensors')
  assert 'h.0.ln_1.weight' in tensors
  tensors['h.0.attn.bias'] = np.tril(np.ones((1, 1, 32, 32), np.float32))
  save_file(tensors, tmp_path / 'model.safetensors', metadata={'format': 'pt'})
  ids, mask, positions = _inputs()
  want = _hf_forward(model, ids, mask, positions).logits.numpy()
  _close(_kd_forward(from_pretrained(tmp_path), ids, mask).logits, want, mask.astype(bool))


def test_parameter_paths_are_kdjax_parallel_paths():
  from kdjax.parallel import path_str
  config = DecoderConfig.gpt2(vocab_size=10, hidden_size=8, num_layers=2, num_heads=2,
                              max_positions=8, tie_embeddings=False)
  module = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
  paths = {path_str(p) for p, _ in
           jax.tree_util.tree_flatten_with_path(nnx.state(module, nnx.Param))[0]}
  assert set(hf_tensors(module)) == paths
  assert 'layers/1/attn/qkv/kernel' in paths and 'lm_head/kernel' in paths


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def kd_checkpoint(tmp_path):
  """A kdjax-written Llama checkpoint (no torch needed) and its folder."""
  config = DecoderConfig.llama(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2,
                               intermediate_size=12, max_positions=16)
  module = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
  rng = np.random.RandomState(0)
  nnx.update(module, jax.tree.map(lambda x: rng.standard_normal(x.shape).astype(np.float32),
                                  nnx.state(module, nnx.Param)))
  folder = tmp_path / 'ckpt'
  save_pretrained(module, folder)
  return folder


def _edit_tensors(folder, edit):
  from safetensors.numpy import load_file, save_file
  file = os.path.join(folder, 'model.safetensors')
  tensors = load_file(file)
  edit(tensors)
  save_file(tensors, file, metadata={'format': 'pt'})


def test_errors_for_missing_files(tmp_path, kd_checkpoint):
  with pytest.raises(UserError, match='does not exist'):
    from_pretrained(tmp_path / 'nowhere')
  (tmp_path / 'empty').mkdir()
  with pytest.raises(UserError, match='has no config.json'):
    from_pretrained(tmp_path / 'empty')
  shutil.copy(kd_checkpoint / 'config.json', tmp_path / 'empty')
  with pytest.raises(UserError, match='has no model.safetensors'):
    from_pretrained(tmp_path / 'empty')
  (tmp_path / 'empty' / 'pytorch_model.bin').write_bytes(b'')
  with pytest.raises(UserError, match='convert it to safetensors'):
    from_pretrained(tmp_path / 'empty')
  (tmp_path / 'empty' / hf.WEIGHTS_INDEX).write_text(
      json.dumps({'weight_map': {'model.norm.weight': 'model-00001-of-00002.safetensors'}}))
  with pytest.raises(UserError, match='lists model-00001-of-00002.safetensors'):
    from_pretrained(tmp_path / 'empty')
  with pytest.raises(UserError, match='has no tokenizer.json'):
    hf.load_tokenizer(kd_checkpoint)


def test_error_for_unsupported_model_type(kd_checkpoint):
  config = json.load(open(kd_checkpoint / 'config.json'))
  json.dump({**config, 'model_type': 't5'}, open(kd_checkpoint / 'config.json', 'w'))
  with pytest.raises(UserError, match="'t5' is not supported; kdjax reads bert, gpt2, llama, "
                                      'qwen2'):
    from_pretrained(kd_checkpoint)


def test_error_for_a_missing_tensor(kd_checkpoint):
  _edit_tensors(kd_checkpoint, lambda t: t.pop('model.layers.0.mlp.up_proj.weight'))
  with pytest.raises(UserError, match="lacks tensor 'model.layers.0.mlp.up_proj.weight'"):
    from_pretrained(kd_checkpoint)


def test_error_for_an_unexpected_tensor(kd_checkpoint):
  _edit_tensors(kd_checkpoint, lambda t: t.update(
      {'model.layers.0.self_attn.q_proj.bias': np.zeros(8, np.float32)}))
  with pytest.raises(UserError, match="has tensor 'model.layers.0.self_attn.q_proj.bias'"):
    from_pretrained(kd_checkpoint)


def test_error_for_a_shape_that_does_not_match_the_config(kd_checkpoint):
  config = json.load(open(kd_checkpoint / 'config.json'))
  json.dump({**config, 'intermediate_size': 16}, open(kd_checkpoint / 'config.json', 'w'))
  with pytest.raises(UserError, match=r"'model.layers.0.mlp.down_proj.weight' has shape "
                                      r'\(8, 12\), but config.json implies \(8, 16\)'):
    from_pretrained(kd_checkpoint)


def test_error_for_a_module_without_a_format(tmp_path):
  with pytest.raises(UserError, match='has no Hugging Face format'):
    save_pretrained(nnx.eval_shape(lambda: MLP((4,), 3, hidden=(2,), rngs=nnx.Rngs(0))), tmp_path)


def test_load_tokenizer(tmp_path):
  import tokenizers
  vocab = {'[UNK]': 0, 'to': 1, 'be': 2, 'or': 3, 'not': 4}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token='[UNK]'))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.save(str(tmp_path / 'tokenizer.json'))
  assert hf.load_tokenizer(tmp_path).encode('to be or not to be').ids == [1, 2, 3, 4, 1, 2]
  (tmp_path / 'tokenizer.json').write_text('{not json')
  with pytest.raises(UserError, match='cannot read'):
    hf.load_tokenizer(tmp_path)
