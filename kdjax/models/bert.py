"""BERT: a post-LayerNorm transformer encoder that reads Hugging Face checkpoints.

:class:`BertEncoder` computes what ``transformers.BertModel`` computes (no pooler):
token, position and token-type embeddings, then ``num_layers`` blocks of
self-attention and a GELU MLP, each followed by a residual LayerNorm. Its
``ModelOutput.logits`` is the last hidden state ``[B, T, hidden]``: an encoder has
no vocabulary head, so the per-token hidden states are the model's output.

:func:`sentence_embeddings` is the all-MiniLM-L6-v2 sentence encoder (mean over the
attended tokens, then L2 normalisation), :func:`sentence_tokenizer` and
:func:`tokenize_texts` turn text into its inputs with the checkpoint's own ``tokenizer.json``, and
:data:`HF_FAMILY` tells :mod:`kdjax.models.hf` how ``config.json`` and the
safetensors names map onto :class:`BertConfig` and the module's parameters.

References:
  Devlin, Chang, Lee, Toutanova. BERT: Pre-training of Deep Bidirectional
  Transformers for Language Understanding. NAACL 2019. arXiv:1810.04805.
  Reimers, Gurevych. Sentence-BERT: Sentence Embeddings using Siamese
  BERT-Networks. EMNLP 2019. arXiv:1908.10084.
  The layout of the checkpoints: huggingface/transformers,
  ``src/transformers/models/bert/modeling_bert.py``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from kdjax.errors import UserError
from kdjax.errors import check_number
from kdjax.models.base import ATTENTION_OUT
from kdjax.models.base import REMAT_POLICIES
from kdjax.models.base import ModelOutput
from kdjax.models.base import remat_policy
from kdjax.models.hf import Family
from kdjax.models.hf import HFTensor
from kdjax.models.hf import load_tokenizer
from kdjax.models.registry import register

# Activations by their Hugging Face ``hidden_act`` names. 'gelu' is the exact (erf)
# GELU; 'gelu_new' and 'gelu_pytorch_tanh' are its tanh approximation.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),
    'gelu_new': lambda x: jax.nn.gelu(x, approximate=True),
    'gelu_pytorch_tanh': lambda x: jax.nn.gelu(x, approximate=True),
    'relu': jax.nn.relu,
    'silu': jax.nn.silu,
}


@dataclasses.dataclass(frozen=True)
class BertConfig:
  """The sizes and options of a :class:`BertEncoder`.

  The defaults are all-MiniLM-L6-v2's (MiniLM-L6-H384: 6 layers, width 384,
  12 heads). :func:`config_from_hf` reads a Hugging Face ``config.json``.

  Attributes:
    vocab_size: token embedding rows.
    hidden_size: width of the residual stream; a multiple of ``num_heads``.
    num_layers: encoder blocks.
    num_heads: attention heads per block.
    intermediate_size: hidden width of each block's MLP.
    max_positions: learned absolute positions (the longest input).
    type_vocab_size: token-type (segment) embedding rows.
    layer_norm_eps: LayerNorm epsilon.
    hidden_act: the MLP activation, a key of :data:`ACTIVATIONS` ('gelu' is exact).
    dropout: dropout rate on the embeddings and the residual branches
      (``hidden_dropout_prob``); active only in the training view of
      :func:`~kdjax.models.functional`.
    attention_dropout: dropout rate on the attention probabilities
      (``attention_probs_dropout_prob``), likewise.
    initializer_range: standard deviation of the normal initial weights.
    pad_token_id: kept for ``config.json``; the forward pass reads the padding
      from ``attention_mask`` only.
    dtype: computation dtype.
    param_dtype: parameter dtype.
    remat: activation rematerialization per block, a
      :data:`kdjax.models.base.REMAT_POLICIES` name (``'none'``: keep every block's
      activations; ``'save_attention_out'`` keeps each block's attention context).
  """

  vocab_size: int = 30522
  hidden_size: int = 384
  num_layers: int = 6
  num_heads: int = 12
  intermediate_size: int = 1536
  max_positions: int = 512
  type_vocab_size: int = 2
  layer_norm_eps: float = 1e-12
  hidden_act: str = 'gelu'
  dropout: float = 0.0
  attention_dropout: float = 0.0
  initializer_range: float = 0.02
  pad_token_id: int = 0
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = 'none'

  def __post_init__(self):
    for name in ('vocab_size', 'hidden_size', 'num_layers', 'num_heads', 'intermediate_size',
                 'max_positions', 'type_vocab_size'):
      value = getattr(self, name)
      if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise UserError(f'BERT {name} must be a positive integer, got {value!r}.')
    if self.hidden_size % self.num_heads:
      raise UserError(f'BERT hidden_size ({self.hidden_size}) must be a multiple of num_heads '
                      f'({self.num_heads}); change one of them.')
    if self.hidden_act not in ACTIVATIONS:
      raise UserError(f'BERT hidden_act {self.hidden_act!r} is not supported; use one of '
                      f'{", ".join(sorted(ACTIVATIONS))}.')
    for name in ('dropout', 'attention_dropout'):
      value = getattr(self, name)
      check_number(value, lambda v: 0.0 <= v < 1.0,
                   f'BERT {name} must be a number in [0, 1), got {value!r}.')
    check_number(self.layer_norm_eps, lambda v: v > 0,
                 f'BERT layer_norm_eps must be a positive number, got {self.layer_norm_eps!r}.')
    if self.remat not in REMAT_POLICIES:
      raise UserError(f'BERT remat must be one of {", ".join(REMAT_POLICIES)}, got '
                      f'{self.remat!r}.')


def _normal(std: float):
  return nnx.initializers.normal(std)


def _dropout(rate: float, rngs: nnx.Rngs) -> nnx.Dropout | None:
  """An inactive-by-default dropout (``functional``'s training view turns it on).

  Its random stream is ``rngs``' 'dropout' (or 'default') stream; without either,
  the module still builds, and a training call must then pass ``rngs`` itself.
  """
  if rate <= 0:
    return None
  try:
    stream = rngs['dropout']
  except KeyError:
    stream = None
  return nnx.Dropout(rate, deterministic=True, rngs=stream)


def _drop(dropout: nnx.Dropout | None, x: jax.Array) -> jax.Array:
  return x if dropout is None else dropout(x)


class BertEmbeddings(nnx.Module):
  """``LayerNorm(word[ids] + position[0..T-1] + token_type[types])``, then dropout."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    c = config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype,
              embedding_init=_normal(c.initializer_range), rngs=rngs)
    self.word = nnx.Embed(c.vocab_size, c.hidden_size, **kw)
    self.position = nnx.Embed(c.max_positions, c.hidden_size, **kw)
    self.token_type = nnx.Embed(c.type_vocab_size, c.hidden_size, **kw)
    self.norm = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, dtype=c.dtype,
                              param_dtype=c.param_dtype, rngs=rngs)
    self.dropout = _dropout(c.dropout, rngs)

  def __call__(self, input_ids: jax.Array, token_type_ids: jax.Array,
               positions: jax.Array) -> jax.Array:
    h = self.word(input_ids) + self.position(positions) + self.token_type(token_type_ids)
    return _drop(self.dropout, self.norm(h))


class BertSelfAttention(nnx.Module):
  """Multi-head attention over all unmasked keys, with its output projection.

  ``softmax(q k^T / sqrt(head_dim) + bias)`` in float32, where ``bias`` is the most
  negative float32 for masked keys (as ``transformers``' eager attention adds
  ``finfo.min``), so a masked key gets probability exactly 0 whenever its row has
  an unmasked key. The mask is ``[B, T]`` (per key) or ``[B, T, T]`` (per query and
  key, for packed sequences).
  """

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    c = config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype,
              kernel_init=_normal(c.initializer_range), rngs=rngs)
    self.num_heads = c.num_heads
    self.query = nnx.Linear(c.hidden_size, c.hidden_size, **kw)
    self.key = nnx.Linear(c.hidden_size, c.hidden_size, **kw)
    self.value = nnx.Linear(c.hidden_size, c.hidden_size, **kw)
    self.output = nnx.Linear(c.hidden_size, c.hidden_size, **kw)
    self.dropout = _dropout(c.attention_dropout, rngs)

  def __call__(self, x: jax.Array, mask: jax.Array
               ) -> tuple[jax.Array, jax.Array, tuple[jax.Array, jax.Array, jax.Array]]:
    """``x [B, T, D]``, ``mask [B, T]`` or ``[B, T, T]`` bool -> ``(output, probs, (q, k, v))``."""
    b, t, d = x.shape
    h = self.num_heads
    q, k, v = self.query(x), self.key(x), self.value(x)
    split = lambda a: a.reshape(b, t, h, d // h)
    scores = jnp.einsum('bqhd,bkhd->bhqk', split(q), split(k),
                        preferred_element_type=jnp.float32) * (d // h) ** -0.5
    mask = mask[:, None, None, :] if mask.ndim == 2 else mask[:, None]
    scores = jnp.where(mask, scores, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(scores, axis=-1)
    p = _drop(self.dropout, probs.astype(x.dtype))
    context = jnp.einsum('bhqk,bkhd->bqhd', p, split(v)).reshape(b, t, d)
    return self.output(checkpoint_name(context, ATTENTION_OUT)), probs, (q, k, v)


class BertLayer(nnx.Module):
  """Post-LN block: ``x = LN(x + attn(x))``, then ``x = LN(x + W2 act(W1 x))``."""

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    c = config
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.attention = BertSelfAttention(c, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, **kw)
    self.intermediate = nnx.Linear(c.hidden_size, c.intermediate_size,
                                   kernel_init=_normal(c.initializer_range), **kw)
    self.output = nnx.Linear(c.intermediate_size, c.hidden_size,
                             kernel_init=_normal(c.initializer_range), **kw)
    self.output_norm = nnx.LayerNorm(c.hidden_size, epsilon=c.layer_norm_eps, **kw)
    self.dropout = _dropout(c.dropout, rngs)
    self.hidden_act = c.hidden_act

  def __call__(self, x: jax.Array, mask: jax.Array):
    y, probs, qkv = self.attention(x, mask)
    x = self.attention_norm(x + _drop(self.dropout, y))
    y = self.output(ACTIVATIONS[self.hidden_act](self.intermediate(x)))
    x = self.output_norm(x + _drop(self.dropout, y))
    return x, probs, qkv


class BertEncoder(nnx.Module):
  """The BERT encoder (``transformers.BertModel`` without its pooler).

  ``ModelOutput.logits`` is the last hidden state ``[B, T, hidden_size]``: an
  encoder has no vocabulary head. ``features['last_hidden']`` is the same array.
  On request: ``attentions`` (one ``[B, heads, T, T]`` float32 probability array
  per layer, before attention dropout), ``hidden_states`` (the embedding output and
  every layer's output, ``num_layers + 1`` arrays, as ``transformers``'
  ``output_hidden_states``) and ``qkv`` (per layer the query, key and value
  projections ``[B, T, hidden_size]``, heads concatenated, for MiniLM's relations).

  Parameter paths (the names of :data:`PARTITION_RULES` and :func:`hf_tensors`):
  ``embeddings/{word,position,token_type}/embedding``, ``embeddings/norm/{scale,bias}``,
  ``layers/<i>/attention/{query,key,value,output}/{kernel,bias}``,
  ``layers/<i>/attention_norm``, ``layers/<i>/{intermediate,output}/{kernel,bias}``,
  ``layers/<i>/output_norm``.

  Args:
    config: the sizes (:class:`BertConfig`).
    rngs: ``nnx.Rngs``; 'params' initialises, 'dropout' (when a rate is set)
      drives dropout.

  References:
    Devlin et al., BERT, NAACL 2019, arXiv:1810.04805; the computation as in
    huggingface/transformers ``src/transformers/models/bert/modeling_bert.py``.

  >>> m = BertEncoder(BertConfig(vocab_size=20, hidden_size=8, num_layers=2, num_heads=2,
  ...                            intermediate_size=16, max_positions=6), rngs=nnx.Rngs(0))
  >>> out = m(jnp.array([[2, 5, 7, 0]]), attention_mask=jnp.array([[1, 1, 1, 0]]),
  ...         output_attentions=True, output_hidden_states=True)
  >>> out.logits.shape, len(out.hidden_states), out.attentions[0].shape
  ((1, 4, 8), 3, (1, 2, 4, 4))
  >>> out.attentions[0][0, :, :, 3].tolist()  # the padded key gets no attention
  [[0.0, 0.0, 0.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
  """

  def __init__(self, config: BertConfig, *, rngs: nnx.Rngs):
    self.config = config
    self.embeddings = BertEmbeddings(config, rngs=rngs)
    self.layers = nnx.List([BertLayer(config, rngs=rngs) for _ in range(config.num_layers)])

  def __call__(
      self,
      input_ids: jax.Array,
      *,
      attention_mask: jax.Array | None = None,
      token_type_ids: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      positions: jax.Array | None = None,
      output_hidden_states: bool = False,
      output_attentions: bool = False,
      output_qkv: bool = False,
  ) -> ModelOutput:
    """Encodes ``input_ids``.

    Args:
      input_ids: ``[B, T]`` integer token ids, ``T <= max_positions``.
      attention_mask: ``[B, T]``; nonzero marks the tokens to attend to
        (default: all). Padded positions still get outputs (ignore them).
      token_type_ids: ``[B, T]`` BERT's sentence-A/B ids (default: zeros).
      segment_ids: ``[B, T]`` ids of the packed sequences a row holds: a token
        attends only to the tokens of its own segment (and of ``attention_mask``).
      positions: ``[B, T]`` position ids (default: ``0..T-1`` in every row;
        restart them per packed sequence).
      output_hidden_states: fill ``ModelOutput.hidden_states``.
      output_attentions: fill ``ModelOutput.attentions``.
      output_qkv: fill ``ModelOutput.qkv``.

    Returns:
      A :class:`~kdjax.models.ModelOutput`.

    Raises:
      UserError: ``input_ids`` is not a ``[B, T]`` integer array, ``T`` exceeds
        ``max_positions``, or another per-token input has another shape.
    """
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2 or not jnp.issubdtype(input_ids.dtype, jnp.integer):
      raise UserError(f'BERT input_ids must be a [batch, tokens] integer array, got shape '
                      f'{input_ids.shape} and dtype {input_ids.dtype}; tokenize the text first.')
    shape = input_ids.shape
    if shape[1] > self.config.max_positions:
      raise UserError(f'BERT input has {shape[1]} tokens but the model has '
                      f'{self.config.max_positions} positions; truncate the input.')
    given = {'attention_mask': attention_mask, 'token_type_ids': token_type_ids,
             'segment_ids': segment_ids, 'positions': positions}
    for name, value in given.items():
      if value is not None and jnp.shape(value) != shape:
        raise UserError(f'BERT {name} has shape {jnp.shape(value)} but input_ids has shape '
                        f'{shape}; pass one entry per token.')
    mask = jnp.ones(shape, bool) if attention_mask is None else jnp.asarray(attention_mask) != 0
    if segment_ids is not None:
      segment_ids = jnp.asarray(segment_ids)
      mask = mask[:, None, :] & (segment_ids[:, :, None] == segment_ids[:, None, :])
    types = jnp.zeros(shape, jnp.int32) if token_type_ids is None else jnp.asarray(token_type_ids)
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(shape[1]), shape)

    h = self.embeddings(input_ids, types, jnp.asarray(positions))
    hidden, attentions, qkv = [h], [], []
    call = lambda layer, h, mask: layer(h, mask)
    if self.config.remat != 'none':
      call = nnx.remat(call, policy=remat_policy(self.config.remat))
    for layer in self.layers:
      h, probs, layer_qkv = call(layer, h, mask)
      hidden.append(h)
      attentions.append(probs)
      qkv.append(layer_qkv)
    return ModelOutput(
        logits=h,
        features={'last_hidden': h},
        attentions=tuple(attentions) if output_attentions else None,
        hidden_states=tuple(hidden) if output_hidden_states else None,
        qkv=tuple(qkv) if output_qkv else None,
    )


# ----------------------------------------------------------------- sentence embeddings


def mean_pool_normalize(hidden: jax.Array, attention_mask: jax.Array) -> jax.Array:
  r"""Mean of the attended token vectors, scaled to unit L2 norm (float32).

  .. math::

    m_b = \frac{\sum_t a_{bt} h_{bt}}{\max(\sum_t a_{bt}, 10^{-9})},\qquad
    e_b = \frac{m_b}{\max(\lVert m_b \rVert_2, 10^{-12})}

  (the floors are those of sentence-transformers' ``Pooling`` and of
  ``torch.nn.functional.normalize``; a row with no attended token gives zeros).

  Args:
    hidden: ``[B, T, D]`` token vectors.
    attention_mask: ``[B, T]``, nonzero for real tokens.

  Returns:
    ``[B, D]`` float32.

  References:
    Reimers, Gurevych, Sentence-BERT, EMNLP 2019, arXiv:1908.10084 (mean pooling);
    UKPLab/sentence-transformers, ``Pooling`` (mean mode) and ``Normalize`` modules.

  >>> h = jnp.array([[[3.0, 0.0], [0.0, 4.0], [100.0, 100.0]]])
  >>> mean_pool_normalize(h, jnp.array([[1, 1, 0]])).tolist()
  [[0.6000000238418579, 0.800000011920929]]
  """
  h = hidden.astype(jnp.float32)
  mask = (jnp.asarray(attention_mask) != 0).astype(jnp.float32)[..., None]
  mean = jnp.sum(h * mask, axis=1) / jnp.maximum(jnp.sum(mask, axis=1), 1e-9)
  norm = jnp.sqrt(jnp.sum(jnp.square(mean), axis=-1, keepdims=True))
  return mean / jnp.maximum(norm, 1e-12)


def sentence_embeddings(module: BertEncoder, input_ids: jax.Array, attention_mask: jax.Array,
                        *, token_type_ids: jax.Array | None = None) -> jax.Array:
  """Sentence vectors as all-MiniLM-L6-v2 computes them: encode, mean-pool, L2-normalise.

  That model's ``modules.json`` is ``Transformer -> Pooling (mean tokens) ->
  Normalize``; this is the same pipeline on a :class:`BertEncoder` (see
  :func:`mean_pool_normalize`). Pure in the module's state and jittable (a module
  is a pytree: ``jax.jit(sentence_embeddings)(module, ids, mask)``).

  Args:
    module: the encoder.
    input_ids: ``[B, T]`` token ids (:func:`tokenize_texts`).
    attention_mask: ``[B, T]``, nonzero for real tokens.
    token_type_ids: optional ``[B, T]`` segment ids.

  Returns:
    ``[B, hidden_size]`` float32 unit vectors.

  References:
    Reimers, Gurevych, Sentence-BERT, EMNLP 2019, arXiv:1908.10084.

  >>> m = BertEncoder(BertConfig(vocab_size=20, hidden_size=8, num_layers=1, num_heads=2,
  ...                            intermediate_size=16, max_positions=6), rngs=nnx.Rngs(0))
  >>> e = jax.jit(sentence_embeddings)(m, jnp.array([[2, 5, 0]]), jnp.array([[1, 1, 0]]))
  >>> e.shape, round(float(jnp.linalg.norm(e)), 5)
  ((1, 8), 1.0)
  """
  out = module(input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids)
  return mean_pool_normalize(out.logits, attention_mask)


# ------------------------------------------------------------------------ tokenization


def sentence_tokenizer(path: str | os.PathLike, *, max_length: int | None = None,
                       pad_to_multiple_of: int | None = None) -> Any:
  """The checkpoint's ``tokenizer.json``, set to truncate and pad as sentence-transformers does.

  Truncation keeps at most ``max_length`` tokens (special tokens included);
  padding goes to the longest text of each batch (right side, the tokenizer's pad
  token, type id 0). The padding and truncation saved in ``tokenizer.json`` are
  replaced (all-MiniLM-L6-v2's file pads every text to 128).

  Args:
    path: a checkpoint directory holding ``tokenizer.json``.
    max_length: the longest tokenized text. Default: ``max_seq_length`` from
      ``sentence_bert_config.json`` if present (256 for all-MiniLM-L6-v2), else
      ``max_position_embeddings`` from ``config.json``, else 512.
    pad_to_multiple_of: also round each batch's length up to a multiple of this
      (fewer distinct shapes, so fewer compilations under ``jit``).

  Returns:
    A ``tokenizers.Tokenizer``.

  Raises:
    UserError: ``path`` has no readable ``tokenizer.json``, or it names no pad token.
  """
  tokenizer = load_tokenizer(path)
  if max_length is None:
    max_length = (_json_field(path, 'sentence_bert_config.json', 'max_seq_length')
                  or _json_field(path, 'config.json', 'max_position_embeddings') or 512)
  pad_token, pad_id = None, None
  if tokenizer.padding is not None:
    pad_token, pad_id = tokenizer.padding['pad_token'], tokenizer.padding['pad_id']
  elif tokenizer.token_to_id('[PAD]') is not None:
    pad_token, pad_id = '[PAD]', tokenizer.token_to_id('[PAD]')
  if pad_id is None:
    raise UserError(f'{os.path.join(path, "tokenizer.json")} names no padding token; add a '
                    '"padding" section with pad_id and pad_token.')
  tokenizer.enable_truncation(max_length=int(max_length))
  tokenizer.enable_padding(direction='right', pad_id=pad_id, pad_token=pad_token, pad_type_id=0,
                           pad_to_multiple_of=pad_to_multiple_of)
  return tokenizer


def _json_field(path, name: str, key: str) -> Any:
  file = os.path.join(path, name)
  if not os.path.isfile(file):
    return None
  try:
    with open(file) as f:
      return json.load(f).get(key)
  except (OSError, ValueError, AttributeError) as e:
    raise UserError(f'cannot read {file} ({type(e).__name__}: {e}); restore it from the '
                    'checkpoint.') from None


def tokenize_texts(tokenizer: Any, texts: Sequence[str]) -> dict[str, np.ndarray]:
  """Token ids, attention mask and token types of a batch of texts.

  Args:
    tokenizer: from :func:`sentence_tokenizer`.
    texts: the sentences.

  Returns:
    ``{'input_ids', 'attention_mask', 'token_type_ids'}``, each ``[len(texts), T]``
    int32, ``T`` the longest tokenized text (after truncation and rounding).
  """
  encodings = tokenizer.encode_batch(list(texts))
  return {
      'input_ids': np.asarray([e.ids for e in encodings], np.int32),
      'attention_mask': np.asarray([e.attention_mask for e in encodings], np.int32),
      'token_type_ids': np.asarray([e.type_ids for e in encodings], np.int32),
  }


# --------------------------------------------------------- a student from teacher layers


def _param_key(path) -> str:
  """``'layers/0/attention/query/kernel'`` for a key path of a params pytree."""
  parts = []
  for entry in path:
    if isinstance(entry, jax.tree_util.GetAttrKey):   # nnx.Param's ``.value``
      continue
    parts.append(str(getattr(entry, 'key', getattr(entry, 'idx', entry))))
  return '/'.join(parts)


def _layer_count(keys) -> int:
  return len({key.split('/')[1] for key in keys if key.startswith('layers/')})


def init_from_teacher(student_params: Any, teacher_params: Any, *,
                      layers: Sequence[int] | None = None, embeddings: bool = True) -> Any:
  """Student parameters initialised from a wider-or-equal, deeper BERT teacher.

  DistilBERT's initialisation: the student keeps the teacher's width and takes its
  embeddings and one layer out of several (``layers=[0, 2, 4]`` for a 3-layer student
  of a 6-layer teacher). Every parameter not copied keeps the student's own value.
  The teacher's learned positions beyond the student's ``max_positions`` are dropped.

  Args:
    student_params: the student's parameters (``nnx.State`` from
      :func:`~kdjax.models.functional`, or the same nested mapping of arrays).
    teacher_params: the teacher's, likewise.
    layers: for each student layer ``i``, the (0-based) teacher layer it copies; one
      entry per student layer. None: no layer is copied.
    embeddings: copy the word, position and token-type embeddings and their
      LayerNorm.

  Returns:
    The student's parameters with the copied entries replaced (same structure).

  Raises:
    UserError: ``layers`` does not give one teacher layer per student layer, names a
      layer the teacher lacks, or a copied tensor's shape differs (another width or
      vocabulary: initialise such a student at random and distill it through a
      projection instead).

  References:
    Sanh, Debut, Chaumond, Wolf. DistilBERT, a distilled version of BERT: smaller,
    faster, cheaper and lighter. NeurIPS EMC^2 workshop 2019. arXiv:1910.01108
    (Section 3: "taking one layer out of two").

  >>> small = dict(vocab_size=20, hidden_size=8, num_heads=2, intermediate_size=16)
  >>> t = BertEncoder(BertConfig(num_layers=4, max_positions=8, **small), rngs=nnx.Rngs(0))
  >>> s = BertEncoder(BertConfig(num_layers=2, max_positions=6, **small), rngs=nnx.Rngs(1))
  >>> p = init_from_teacher(nnx.state(s, nnx.Param), nnx.state(t, nnx.Param), layers=[1, 3])
  >>> bool(jnp.all(p['layers'][1]['output']['kernel'][...] == t.layers[3].output.kernel[...]))
  True
  >>> p['embeddings']['position']['embedding'].shape   # the first 6 of the teacher's 8
  (6, 8)
  """
  teacher = {_param_key(path): leaf
             for path, leaf in jax.tree_util.tree_flatten_with_path(teacher_params)[0]}
  student_keys = [_param_key(path)
                  for path, _ in jax.tree_util.tree_flatten_with_path(student_params)[0]]
  num_student, num_teacher = _layer_count(student_keys), _layer_count(teacher)
  if layers is not None:
    layers = [int(i) for i in layers]
    if len(layers) != num_student:
      raise UserError(f'the student has {num_student} layers but {len(layers)} teacher layers '
                      f'were given ({layers}); give one teacher layer per student layer.')
    if any(not 0 <= i < num_teacher for i in layers):
      raise UserError(f'teacher layers {layers} are not all in 0..{num_teacher - 1}; pick '
                      'layers the teacher has.')

  def pick(path, leaf):
    key = _param_key(path)
    if embeddings and key.startswith('embeddings/'):
      source = key
    elif layers is not None and key.startswith('layers/'):
      _, index, rest = key.split('/', 2)
      source = f'layers/{layers[int(index)]}/{rest}'
    else:
      return leaf
    value = teacher.get(source)
    if value is None:
      raise UserError(f'the teacher has no parameter {source}; is it a BertEncoder?')
    if key == 'embeddings/position/embedding' and value.shape[0] > leaf.shape[0]:
      value = value[:leaf.shape[0]]
    if tuple(value.shape) != tuple(leaf.shape):
      raise UserError(f'teacher {source} has shape {tuple(value.shape)} but student {key} has '
                      f'{tuple(leaf.shape)}; copy layers only between models of one width and '
                      'vocabulary.')
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(pick, student_params)


# ------------------------------------------------------------------ Hugging Face layout

# config.json key -> BertConfig field, with transformers' BertConfig default.
_HF_FIELDS = (
    ('vocab_size', 'vocab_size', 30522),
    ('hidden_size', 'hidden_size', 768),
    ('num_hidden_layers', 'num_layers', 12),
    ('num_attention_heads', 'num_heads', 12),
    ('intermediate_size', 'intermediate_size', 3072),
    ('max_position_embeddings', 'max_positions', 512),
    ('type_vocab_size', 'type_vocab_size', 2),
    ('layer_norm_eps', 'layer_norm_eps', 1e-12),
    ('hidden_act', 'hidden_act', 'gelu'),
    ('hidden_dropout_prob', 'dropout', 0.1),
    ('attention_probs_dropout_prob', 'attention_dropout', 0.1),
    ('initializer_range', 'initializer_range', 0.02),
    ('pad_token_id', 'pad_token_id', 0),
)

# The prefix under which task checkpoints (BertForMaskedLM, BertForSequenceClassification,
# ...) store the encoder; a bare BertModel (and all-MiniLM-L6-v2) has none. The names of
# hf_tensors are the bare ones; from_pretrained (Family.prefixes) also tries them with it.
HF_PREFIXES = ('bert.',)

# Checkpoint tensors that are not parameters of BertEncoder (Family.ignored): the
# pooler, the position-id buffer older checkpoints saved, and the task heads.
HF_IGNORED = (r'(bert\.)?pooler\..*', r'(bert\.)?embeddings\.position_ids', r'cls\..*',
              r'classifier\..*', r'qa_outputs\..*')


def config_from_hf(hf_config: Mapping[str, Any], *, dtype: Any = jnp.float32,
                   param_dtype: Any = None) -> BertConfig:
  """A :class:`BertConfig` from a Hugging Face BERT ``config.json`` dict.

  Keys it lacks take ``transformers.BertConfig``'s defaults.

  Args:
    hf_config: the parsed ``config.json``.
    dtype: computation dtype.
    param_dtype: parameter dtype (default: ``dtype``).

  Returns:
    The config.

  Raises:
    UserError: not a BERT encoder config (another ``model_type``, relative
      position embeddings, a decoder or cross-attention) or invalid sizes.

  >>> config_from_hf({'model_type': 'bert', 'hidden_size': 32, 'num_attention_heads': 4,
  ...                 'num_hidden_layers': 2}).num_layers
  2
  """
  model_type = hf_config.get('model_type', 'bert')
  if model_type != 'bert':
    raise UserError(f'config.json has model_type {model_type!r}; BertEncoder reads "bert" '
                    'checkpoints only.')
  position = hf_config.get('position_embedding_type', 'absolute')
  if position != 'absolute':
    raise UserError(f'config.json has position_embedding_type {position!r}; BertEncoder '
                    'supports "absolute" only.')
  if hf_config.get('is_decoder') or hf_config.get('add_cross_attention'):
    raise UserError('config.json describes a BERT decoder (is_decoder / add_cross_attention); '
                    'BertEncoder is an encoder only.')
  fields = {ours: hf_config.get(theirs, default) for theirs, ours, default in _HF_FIELDS}
  if fields['pad_token_id'] is None:
    fields['pad_token_id'] = 0
  param_dtype = dtype if param_dtype is None else param_dtype
  return BertConfig(**fields, dtype=dtype, param_dtype=param_dtype)


def config_to_hf(config: BertConfig) -> dict[str, Any]:
  """The Hugging Face ``config.json`` dict of ``config`` (``transformers.BertModel``).

  >>> config_to_hf(BertConfig())['num_hidden_layers']
  6
  """
  out = {'architectures': ['BertModel'], 'model_type': 'bert'}
  out.update({theirs: getattr(config, ours) for theirs, ours, _ in _HF_FIELDS})
  out.update(position_embedding_type='absolute', is_decoder=False, add_cross_attention=False)
  return out


def _hf_names(num_layers: int) -> dict[str, tuple[str, bool]]:
  """Parameter path -> (canonical safetensors name, is a Linear kernel)."""
  names = {
      'embeddings/word/embedding': ('embeddings.word_embeddings.weight', False),
      'embeddings/position/embedding': ('embeddings.position_embeddings.weight', False),
      'embeddings/token_type/embedding': ('embeddings.token_type_embeddings.weight', False),
      'embeddings/norm/scale': ('embeddings.LayerNorm.weight', False),
      'embeddings/norm/bias': ('embeddings.LayerNorm.bias', False),
  }
  linears = (('attention/query', 'attention.self.query'), ('attention/key', 'attention.self.key'),
             ('attention/value', 'attention.self.value'),
             ('attention/output', 'attention.output.dense'),
             ('intermediate', 'intermediate.dense'), ('output', 'output.dense'))
  norms = (('attention_norm', 'attention.output.LayerNorm'), ('output_norm', 'output.LayerNorm'))
  for i in range(num_layers):
    ours, theirs = f'layers/{i}/', f'encoder.layer.{i}.'
    for a, b in linears:
      names[f'{ours}{a}/kernel'] = (f'{theirs}{b}.weight', True)
      names[f'{ours}{a}/bias'] = (f'{theirs}{b}.bias', False)
    for a, b in norms:
      names[f'{ours}{a}/scale'] = (f'{theirs}{b}.weight', False)
      names[f'{ours}{a}/bias'] = (f'{theirs}{b}.bias', False)
  return names


def _converters(name: str, shape: tuple[int, ...], transpose: bool):
  hf_shape = shape[::-1] if transpose else shape

  def to_kdjax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x)
    if tuple(x.shape) != hf_shape:
      raise UserError(f'checkpoint tensor {name!r} has shape {tuple(x.shape)} but this BERT '
                      f'expects {hf_shape}; the weights do not match config.json, use the '
                      'config saved with them.')
    return x.T if transpose else x

  def to_hf(x: np.ndarray) -> np.ndarray:  # also traced (hf.py's shape check): no np calls
    if tuple(x.shape) != shape:
      raise ValueError(f'parameter for {name!r} has shape {tuple(x.shape)}, expected {shape}')
    return x.T if transpose else x

  return to_kdjax, to_hf


def hf_tensors(module: BertEncoder) -> dict[str, HFTensor]:
  """Parameter path -> :class:`~kdjax.models.hf.HFTensor` for every parameter of ``module``.

  Names are the canonical ones ``transformers.BertModel.save_pretrained`` writes
  (``'encoder.layer.0.attention.self.query.weight'``, no ``'bert.'`` prefix; task
  checkpoints add one of :data:`HF_PREFIXES`). Linear weights are ``[out, in]`` in
  the checkpoint and ``[in, out]`` kernels here, so their converters transpose;
  ``to_kdjax`` raises :class:`~kdjax.errors.UserError` for a tensor whose shape
  does not match the module.

  >>> m = BertEncoder(BertConfig(vocab_size=10, hidden_size=4, num_layers=1, num_heads=2,
  ...                            intermediate_size=8, max_positions=4), rngs=nnx.Rngs(0))
  >>> t = hf_tensors(m)['layers/0/intermediate/kernel']
  >>> t.name, t.to_kdjax(np.zeros((8, 4))).shape
  ('encoder.layer.0.intermediate.dense.weight', (4, 8))
  """
  names = _hf_names(module.config.num_layers)
  params = {'/'.join(map(str, path)): tuple(var.shape)
            for path, var in nnx.to_flat_state(nnx.state(module, nnx.Param))}
  if set(params) != set(names):
    raise ValueError(f'BertEncoder parameters {sorted(set(params) ^ set(names))} have no '
                     'Hugging Face name mapping')
  out = {}
  for path, shape in params.items():
    name, transpose = names[path]
    out[path] = HFTensor(name, *_converters(name, shape, transpose))
  return out


def _build(hf_config: dict, dtype: Any, rngs: nnx.Rngs) -> BertEncoder:
  return BertEncoder(config_from_hf(hf_config, dtype=dtype), rngs=rngs)


def _hf_config(module: BertEncoder) -> dict:
  return config_to_hf(module.config)


# Regex rules over parameter paths (kdjax.parallel.shardings_from_rules) for a mesh
# with an 'fsdp' and a 'model' axis (either may have size 1): Megatron-style tensor
# parallelism (query/key/value and the MLP's first layer split by output columns,
# i.e. by heads and hidden units, over 'model'; the projections back split by input
# rows) with the other kernel axis sharded over 'fsdp'. Embedding tables shard their
# width over 'fsdp' (vocabulary sizes such as 30522 rarely divide a mesh axis);
# LayerNorms and the remaining biases are replicated. Each sharded size must divide
# by its axis size.
PARTITION_RULES: tuple[tuple[str, Any], ...] = (
    (r'embeddings/(word|position|token_type)/embedding', (None, 'fsdp')),
    (r'layers/\d+/attention/(query|key|value)/kernel', ('fsdp', 'model')),
    (r'layers/\d+/attention/(query|key|value)/bias', ('model',)),
    (r'layers/\d+/attention/output/kernel', ('model', 'fsdp')),
    (r'layers/\d+/intermediate/kernel', ('fsdp', 'model')),
    (r'layers/\d+/intermediate/bias', ('model',)),
    (r'layers/\d+/output/kernel', ('model', 'fsdp')),
    (r'.*', None),
)

HF_FAMILY = Family(
    model_types=('bert',),
    build=_build,
    hf_config=_hf_config,
    tensors=hf_tensors,
    partition_rules=PARTITION_RULES,
    prefixes=HF_PREFIXES,
    ignored=HF_IGNORED,
)


# ----------------------------------------------------------------------------- registry


@register('bert')
def _bert(*, num_classes, input_shape, rngs, dtype, **kwargs) -> BertEncoder:
  """A randomly initialised :class:`BertEncoder`.

  ``num_classes`` is the vocabulary size (the ids an input may hold: an encoder's
  outputs are hidden states, not classes); ``input_shape`` is ``(tokens,)`` and must
  fit ``max_positions``; ``kwargs`` are the other :class:`BertConfig` fields
  (defaults: MiniLM-L6-H384's sizes).
  """
  input_shape = tuple(input_shape)
  config = BertConfig(vocab_size=num_classes, dtype=dtype, **kwargs)
  if len(input_shape) != 1 or input_shape[0] > config.max_positions:
    raise UserError(f'bert takes input_shape (tokens,) with at most {config.max_positions} '
                    f'tokens, got {input_shape}; set data sequence length or max_positions.')
  return BertEncoder(config, rngs=rngs)
