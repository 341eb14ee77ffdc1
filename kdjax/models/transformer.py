r"""Decoder-only transformer language models: GPT-2, Llama and Qwen2 in one module.

One :class:`Decoder` covers the three families; a frozen :class:`DecoderConfig` says
which pieces it uses:

============  =============  ========  ==========  =====================  ==========
family        norm           MLP       positions   biases                 q/k/v
============  =============  ========  ==========  =====================  ==========
GPT-2         LayerNorm      GELU      learned     everywhere             one fused
                             (tanh)                                       projection
Llama         RMSNorm        SwiGLU    RoPE        none (``attention_     separate,
                                                   bias`` adds q/k/v/o)   GQA
Qwen2         RMSNorm        SwiGLU    RoPE        q, k, v only           separate,
                                                                          GQA
============  =============  ========  ==========  =====================  ==========

Every block is pre-norm: ``x + attn(norm(x))`` then ``x + mlp(norm(x))``, and a final
norm precedes the language-model head (tied to the token embedding or not). Attention
scores and the softmax are float32 whatever the computation dtype; masked scores are
a large negative *finite* number, so a query row with nothing to attend to (a padding
token) gets a uniform distribution instead of NaNs.

Parameter paths (the names :data:`PARTITION_RULES` and the Hugging Face mapping use)::

    embed/embedding                      [vocab, hidden]
    pos_embed/embedding                  [max_positions, hidden]     (learned positions)
    layers/{i}/attn_norm/{scale,bias}
    layers/{i}/attn/{q,k,v}/kernel       [hidden, heads (or kv heads), head_dim]
    layers/{i}/attn/{q,k,v}/bias         [heads (or kv heads), head_dim]
    layers/{i}/attn/qkv/{kernel,bias}    [hidden, 3, heads, head_dim] (fused, GPT-2)
    layers/{i}/attn/o/{kernel,bias}      [heads, head_dim, hidden]
    layers/{i}/mlp_norm/{scale,bias}
    layers/{i}/mlp/{gate,up,down}/{kernel,bias}   (gate: SwiGLU only)
    final_norm/{scale,bias}
    lm_head/kernel                       [hidden, vocab]              (untied only)

**Hugging Face configs.** :func:`config_from_hf` maps a ``config.json`` dict
(``model_type`` ``'gpt2'``, ``'llama'`` or ``'qwen2'``) to a :class:`DecoderConfig`
and :func:`config_to_hf` back; :data:`HF_FAMILY` plugs the family into
:mod:`kdjax.models.hf` (``from_pretrained`` / ``save_pretrained``).

**Decoding.** :func:`init_cache` makes an empty :class:`KVCache`; a call with
``cache=`` appends the new tokens' keys and values and returns the updated cache in
``ModelOutput.cache`` (see :class:`Decoder`).

References:
  Radford et al., "Language Models are Unsupervised Multitask Learners", 2019 (GPT-2);
  Touvron et al., "LLaMA: Open and Efficient Foundation Language Models", 2023;
  Qwen Team, "Qwen2 Technical Report", 2024;
  Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding", 2021;
  Shazeer, "GLU Variants Improve Transformer", 2020 (SwiGLU);
  Ainslie et al., "GQA: Training Generalized Multi-Query Transformer Models from
  Multi-Head Checkpoints", EMNLP 2023;
  the checkpoint layouts and ``config.json`` keys: huggingface/transformers,
  ``src/transformers/models/{gpt2,llama,qwen2}/`` (``modeling_*.py``,
  ``configuration_*.py``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name
from jax.sharding import Mesh

from kdjax.errors import UserError
from kdjax.models.base import ATTENTION_OUT
from kdjax.models.base import REMAT_POLICIES
from kdjax.models.base import ModelOutput
from kdjax.models.base import remat_policy
from kdjax.models.hf import Family
from kdjax.models.hf import HFTensor
from kdjax.models.registry import register

NORMS = ('layernorm', 'rmsnorm')
MLPS = ('gelu', 'swiglu')
POSITIONS = ('learned', 'rope')
ATTENTION_IMPLS = ('auto', 'dense', 'blocked')
# What a masked attention score is replaced with: finite, so a fully masked row stays finite.
MASK_VALUE = -1e30
_INIT_STD = 0.02   # transformers' initializer_range default for all three families


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """Llama 3's frequency-dependent RoPE scaling (``rope_type: 'llama3'``).

  Wavelengths longer than ``original_max_positions / low_freq_factor`` are
  stretched by ``factor``, those shorter than ``original_max_positions /
  high_freq_factor`` are kept, and the band between is interpolated linearly in
  ``original_max_positions / wavelength``.

  References:
    Meta, "The Llama 3 Herd of Models", 2024; meta-llama/llama-models,
    ``models/llama3/reference_impl/model.py`` (``apply_scaling``).
  """

  factor: float
  low_freq_factor: float
  high_freq_factor: float
  original_max_positions: int


@dataclasses.dataclass(frozen=True)
class DecoderConfig:
  """The shape and architecture of a :class:`Decoder` (hashable: a jit-static value).

  The defaults are Llama's architecture; :meth:`gpt2`, :meth:`llama` and
  :meth:`qwen2` set each family's architecture fields and take the sizes.

  Attributes:
    vocab_size: token ids are in ``[0, vocab_size)``; the logits' width.
    hidden_size: the residual stream's width ``D``.
    num_layers: transformer blocks.
    num_heads: query heads ``H``.
    num_kv_heads: key/value heads (grouped-query attention); ``None``: ``num_heads``
      (multi-head attention). Must divide ``num_heads``.
    head_dim: per-head width; ``None``: ``hidden_size // num_heads``.
    intermediate_size: the MLP's hidden width; ``None``: ``4 * hidden_size``.
    max_positions: the context length: the learned position table's size, and the
      longest prompt plus generation :mod:`kdjax.models.decoding` allows.
    norm: ``'layernorm'`` (with bias) or ``'rmsnorm'``.
    norm_eps: the norms' epsilon.
    mlp: ``'gelu'`` (``up -> gelu_tanh -> down``; GPT-2's ``gelu_new``) or
      ``'swiglu'`` (``down(silu(gate(x)) * up(x))``).
    positions: ``'learned'`` (a table added to the token embeddings) or ``'rope'``
      (rotary embeddings of queries and keys, the half-split layout of Llama).
    rope_theta: RoPE's base wavelength.
    rope_scaling: optional :class:`RopeScaling` (Llama 3.1+).
    qkv_bias: biases on the query/key/value projections.
    attn_out_bias: a bias on the attention output projection.
    mlp_bias: biases on the MLP's projections.
    fused_qkv: one ``[D, 3, H, head_dim]`` query/key/value kernel (GPT-2's
      ``c_attn``) instead of three; needs ``num_kv_heads == num_heads``.
    tie_embeddings: the head is the transposed token embedding (no ``lm_head``).
    bos_token_id: kept for the Hugging Face config (and generation), else unused.
    eos_token_id: an id or a tuple of ids; kept likewise.
    pad_token_id: kept likewise.
    dtype: the computation dtype.
    param_dtype: the parameters' dtype.
    attention_impl: how self-attention without a cache is computed. ``'dense'``: one
      ``[T, T]`` score matrix per head; ``'blocked'``: query blocks of
      ``attention_block_size`` rows, each against only the key prefix it can see (the
      fully masked key blocks above the diagonal are skipped; see
      :func:`blocked_attention`); ``'auto'``: blocked on a CPU backend when the rows
      hold at least two blocks, else dense (blocked was measured faster on XLA:CPU
      only; elsewhere ask for it). Decoding with a cache and ``output_attentions=True``
      always take the dense path. Both give the same numbers up to float32 rounding.
    attention_block_size: the query block of the blocked path (a runtime choice: it
      changes no parameter).
    remat: activation rematerialization per block, a
      :data:`kdjax.models.base.REMAT_POLICIES` name: ``'none'`` keeps every block's
      activations for the backward pass; the others wrap each block in ``nnx.remat``
      with that policy (``'save_attention_out'`` keeps the attention output, named
      ``'attention_out'``, and recomputes the rest). A runtime choice: same numbers,
      same parameters, less memory and more compute in the backward pass.
  """

  vocab_size: int
  hidden_size: int
  num_layers: int
  num_heads: int
  num_kv_heads: int | None = None
  head_dim: int | None = None
  intermediate_size: int | None = None
  max_positions: int = 2048
  norm: str = 'rmsnorm'
  norm_eps: float = 1e-6
  mlp: str = 'swiglu'
  positions: str = 'rope'
  rope_theta: float = 10000.0
  rope_scaling: RopeScaling | None = None
  qkv_bias: bool = False
  attn_out_bias: bool = False
  mlp_bias: bool = False
  fused_qkv: bool = False
  tie_embeddings: bool = False
  bos_token_id: int | None = None
  eos_token_id: int | tuple[int, ...] | None = None
  pad_token_id: int | None = None
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  attention_impl: str = 'auto'
  attention_block_size: int = 64
  remat: str = 'none'

  def __post_init__(self):
    fill = {'num_kv_heads': self.num_kv_heads or self.num_heads,
            'head_dim': self.head_dim or (self.hidden_size // max(self.num_heads, 1)),
            'intermediate_size': self.intermediate_size or 4 * self.hidden_size}
    if isinstance(self.eos_token_id, list):
      fill['eos_token_id'] = tuple(self.eos_token_id)
    if isinstance(self.rope_scaling, Mapping):
      fill['rope_scaling'] = RopeScaling(**self.rope_scaling)
    for name, value in fill.items():
      object.__setattr__(self, name, value)
    for name in ('vocab_size', 'hidden_size', 'num_heads', 'head_dim', 'intermediate_size',
                 'max_positions', 'attention_block_size'):
      if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
        raise ValueError(f'{name} must be a positive int, got {getattr(self, name)!r}')
    if self.num_layers < 0:
      raise ValueError(f'num_layers must be >= 0, got {self.num_layers}')
    for name, allowed in (('norm', NORMS), ('mlp', MLPS), ('positions', POSITIONS),
                          ('attention_impl', ATTENTION_IMPLS), ('remat', REMAT_POLICIES)):
      if getattr(self, name) not in allowed:
        raise ValueError(f'{name} must be one of {allowed}, got {getattr(self, name)!r}')
    if self.num_heads % self.num_kv_heads:
      raise ValueError(f'num_kv_heads ({self.num_kv_heads}) must divide num_heads '
                       f'({self.num_heads})')
    if self.positions == 'rope' and self.head_dim % 2:
      raise ValueError(f'rotary embeddings need an even head_dim, got {self.head_dim}')
    if self.fused_qkv and self.num_kv_heads != self.num_heads:
      raise ValueError('fused_qkv needs num_kv_heads == num_heads')

  @classmethod
  def gpt2(cls, **kwargs: Any) -> DecoderConfig:
    """GPT-2's architecture (LayerNorm eps 1e-5, GELU-tanh MLP, learned positions,
    biases everywhere, fused q/k/v, tied head); ``kwargs`` give the sizes and may
    override any field.

    >>> DecoderConfig.gpt2(vocab_size=50257, hidden_size=768, num_layers=12,
    ...                    num_heads=12, max_positions=1024).intermediate_size
    3072
    """
    arch = dict(norm='layernorm', norm_eps=1e-5, mlp='gelu', positions='learned',
                qkv_bias=True, attn_out_bias=True, mlp_bias=True, fused_qkv=True,
                tie_embeddings=True)
    return cls(**{**arch, **kwargs})

  @classmethod
  def llama(cls, **kwargs: Any) -> DecoderConfig:
    """Llama's architecture (RMSNorm, SwiGLU, RoPE, no biases, untied head)."""
    arch = dict(norm='rmsnorm', norm_eps=1e-6, mlp='swiglu', positions='rope',
                qkv_bias=False, attn_out_bias=False, mlp_bias=False, fused_qkv=False,
                tie_embeddings=False)
    return cls(**{**arch, **kwargs})

  @classmethod
  def qwen2(cls, **kwargs: Any) -> DecoderConfig:
    """Qwen2's architecture: Llama's with biases on the query/key/value projections."""
    return cls.llama(**{'qkv_bias': True, **kwargs})


class KVCache(NamedTuple):
  """The decoding state of a :class:`Decoder`: keys and values of the tokens seen so far.

  Slots ``[0, index)`` are filled; every row writes the same slots (left padding
  keeps the rows aligned), and ``mask`` says which slots hold real tokens.

  Attributes:
    keys: per layer ``[batch, max_length, num_kv_heads, head_dim]`` (after RoPE).
    values: per layer, the same shape.
    mask: ``[batch, max_length]`` bool: the slot holds a real (not padding) token.
    positions: ``[batch]`` int32: the next position id of each row (its number of
      real tokens so far).
    index: int32 scalar: the next slot to write.
  """

  keys: tuple[jax.Array, ...]
  values: tuple[jax.Array, ...]
  mask: jax.Array
  positions: jax.Array
  index: jax.Array

  def grow(self, n: int) -> KVCache:
    """The cache with ``n`` more empty slots at the end (a prompt is read into a cache
    of its own length, so its attention spans only its tokens, then the cache grows
    for the tokens to generate).

    >>> c = init_cache(DecoderConfig.llama(vocab_size=10, hidden_size=8, num_layers=1,
    ...                                    num_heads=2, num_kv_heads=1), 3, 5).grow(2)
    >>> c.keys[0].shape, c.mask.shape
    ((3, 7, 1, 4), (3, 7))
    """
    pad = lambda a: jnp.pad(a, [(0, 0), (0, int(n))] + [(0, 0)] * (a.ndim - 2))
    return self._replace(keys=tuple(map(pad, self.keys)), values=tuple(map(pad, self.values)),
                         mask=pad(self.mask))


def init_cache(config_or_module: DecoderConfig | Decoder, batch: int, max_length: int,
               dtype: Any = None) -> KVCache:
  """An empty :class:`KVCache` for ``batch`` rows of up to ``max_length`` tokens.

  Args:
    config_or_module: a :class:`DecoderConfig` or a :class:`Decoder`.
    batch: rows.
    max_length: slots: the prompt length plus the tokens to generate.
    dtype: the keys' and values' dtype; default: the config's computation dtype.

  Returns:
    Zero keys and values, an all-False mask, positions 0 and index 0.

  >>> c = init_cache(DecoderConfig.llama(vocab_size=10, hidden_size=8, num_layers=2,
  ...                                    num_heads=2, num_kv_heads=1), 3, 5)
  >>> len(c.keys), c.keys[0].shape, c.mask.shape, int(c.index)
  (2, (3, 5, 1, 4), (3, 5), 0)
  """
  config = getattr(config_or_module, 'config', config_or_module)
  dtype = config.dtype if dtype is None else dtype
  shape = (batch, max_length, config.num_kv_heads, config.head_dim)
  zeros = tuple(jnp.zeros(shape, dtype) for _ in range(config.num_layers))
  return KVCache(keys=zeros, values=tuple(jnp.zeros(shape, dtype) for _ in zeros),
                 mask=jnp.zeros((batch, max_length), bool),
                 positions=jnp.zeros((batch,), jnp.int32), index=jnp.zeros((), jnp.int32))


# ----------------------------------------------------------------------------- layers


class _Proj(nnx.Module):
  """``y = tensordot(x, kernel, in_ndim) + bias``: a projection whose kernel keeps the
  head axes (``[D, H, head_dim]``, ``[H, head_dim, D]``), so tensor parallelism shards
  heads, not flattened columns."""

  def __init__(self, shape: Sequence[int], in_ndim: int, *, use_bias: bool, dtype: Any,
               param_dtype: Any, rngs: nnx.Rngs):
    shape = tuple(shape)
    self.in_ndim = in_ndim
    self.dtype = dtype
    init = nnx.initializers.normal(_INIT_STD)
    self.kernel = nnx.Param(init(rngs.params(), shape, param_dtype))
    self.bias = nnx.Param(jnp.zeros(shape[in_ndim:], param_dtype)) if use_bias else None

  def __call__(self, x: jax.Array) -> jax.Array:
    y = jnp.tensordot(x.astype(self.dtype), self.kernel[...].astype(self.dtype),
                      axes=self.in_ndim)
    if self.bias is not None:
      y = y + self.bias[...].astype(self.dtype)
    return y


def _norm(c: DecoderConfig, rngs: nnx.Rngs) -> nnx.Module:
  kw = dict(epsilon=c.norm_eps, use_fast_variance=False, dtype=c.dtype,
            param_dtype=c.param_dtype, rngs=rngs)
  if c.norm == 'layernorm':
    return nnx.LayerNorm(c.hidden_size, **kw)
  return nnx.RMSNorm(c.hidden_size, **kw)


def rope_frequencies(config: DecoderConfig) -> jax.Array:
  r"""RoPE's inverse frequencies ``theta^(-2i / head_dim)``, ``[head_dim // 2]`` float32
  (rescaled by :class:`RopeScaling` when the config has one).

  >>> rope_frequencies(DecoderConfig.llama(vocab_size=2, hidden_size=8, num_layers=1,
  ...                                      num_heads=2, rope_theta=100.0)).tolist()
  [1.0, 0.10000000149011612]
  """
  d = config.head_dim
  inv = 1.0 / (config.rope_theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
  s = config.rope_scaling
  if s is None:
    return inv
  wavelength = 2 * math.pi / inv
  low = s.original_max_positions / s.low_freq_factor    # longer: stretched by factor
  high = s.original_max_positions / s.high_freq_factor  # shorter: unchanged
  smooth = ((s.original_max_positions / wavelength - s.low_freq_factor)
            / (s.high_freq_factor - s.low_freq_factor))
  mixed = (1 - smooth) * inv / s.factor + smooth * inv
  return jnp.where(wavelength > low, inv / s.factor, jnp.where(wavelength < high, inv, mixed))


def _rotate(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """Rotates ``x [B, T, heads, d]`` by the angles of ``cos``/``sin [B, T, d]``: the
  half-split layout (pairs ``(i, i + d/2)``) of Llama's checkpoints."""
  x32 = x.astype(jnp.float32)
  half = x.shape[-1] // 2
  rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
  return (x32 * cos[:, :, None] + rotated * sin[:, :, None]).astype(x.dtype)


def dense_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array
                    ) -> tuple[jax.Array, jax.Array]:
  """Grouped-query attention with one ``[T, S]`` score matrix per head.

  Args:
    q: queries ``[B, T, H, hd]``.
    k: keys ``[B, S, K, hd]`` (``K`` divides ``H``; query head ``h`` reads key head
      ``h // (H // K)``).
    v: values, as ``k``.
    allowed: ``[B, T, S]`` bool: which keys each query may attend to. A query with no
      allowed key attends uniformly to all ``S`` (finite, never NaN).

  Returns:
    ``(y [B, T, H, hd], probs [B, H, T, S] float32)``; scores and softmax in float32.
  """
  b, t, h, d = q.shape
  groups = h // k.shape[2]
  q = q.reshape(b, t, k.shape[2], groups, d)
  scores = jnp.einsum('btkgd,bskd->bkgts', q, k, preferred_element_type=jnp.float32)
  scores = jnp.where(allowed[:, None, None], scores * d ** -0.5, MASK_VALUE)
  probs = jax.nn.softmax(scores, axis=-1)
  y = jnp.einsum('bkgts,bskd->btkgd', probs.astype(v.dtype), v)
  return y.reshape(b, t, h, d), probs.reshape(b, h, t, -1)


def blocked_attention(q: jax.Array, k: jax.Array, v: jax.Array, allowed: jax.Array, *,
                      block_size: int = 64, fill_empty_rows: bool = True) -> jax.Array:
  r"""Causal grouped-query self-attention computed by query blocks, skipping the key
  blocks no query of a block can see.

  The ``T`` queries are cut into blocks of ``block_size`` rows; block ``[i, e)`` is
  scored against the keys ``[0, e)`` only (a causal query never sees a later key), with
  an ordinary softmax over that prefix, so the result is :func:`dense_attention`'s up
  to float32 rounding while about ``(1 + 1 / n) / 2`` of the score matrix is computed
  (``n`` blocks). Queries, keys and values are moved to a head-major layout
  (``[B, K, G, T, hd]``) once, so every block's two products are plain batched
  matrix products over contiguous rows; on XLA:CPU a block's scores stay in cache,
  which matters more than the skipped work (the forward of a 256-token layer with 8
  heads of 32: about 5x faster than the dense einsums). The loop is unrolled at trace time (``ceil(T /
  block_size)`` pieces) and differentiates like any JAX code.

  Args:
    q: queries ``[B, T, H, hd]``.
    k: keys ``[B, T, K, hd]`` (the same tokens: self-attention without a cache).
    v: values, as ``k``.
    allowed: ``[B, T, T]`` bool, **causal** (``allowed[:, i, j]`` False for ``j > i``);
      padding and segment masks may remove more keys.
    block_size: query rows per block.
    fill_empty_rows: a query row with no allowed key (padding) gets the mean of all
      ``T`` values, as :func:`dense_attention`'s uniform softmax gives it; False
      skips that fix-up (rows that cannot be empty: no padding, no segments).

  Returns:
    ``y [B, T, H, hd]``.

  References:
    The skipped blocks are those of Dao et al., "FlashAttention: Fast and
    Memory-Efficient Exact Attention with IO-Awareness", NeurIPS 2022 (causal block
    skipping); here each block keeps an exact softmax over its key prefix instead of
    an online one.

  >>> q = k = v = jnp.ones((1, 5, 2, 4))
  >>> causal = jnp.tril(jnp.ones((5, 5), bool))[None]
  >>> y = blocked_attention(q, k[:, :, :1], v[:, :, :1], causal, block_size=2)
  >>> y.shape, bool(jnp.allclose(y, dense_attention(q, k[:, :, :1], v[:, :, :1], causal)[0]))
  ((1, 5, 2, 4), True)
  """
  b, t, h, d = q.shape
  kv_heads = k.shape[2]
  groups = h // kv_heads
  qh = q.reshape(b, t, kv_heads, groups, d).transpose(0, 2, 3, 1, 4)   # [B, K, G, T, d]
  kh = k.transpose(0, 2, 1, 3)                                          # [B, K, T, d]
  vh = v.transpose(0, 2, 1, 3)
  pieces = []
  for start in range(0, t, block_size):
    end = min(start + block_size, t)
    scores = jnp.einsum('bkgtd,bksd->bkgts', qh[:, :, :, start:end], kh[:, :, :end],
                        preferred_element_type=jnp.float32)
    scores = jnp.where(allowed[:, None, None, start:end, :end], scores * d ** -0.5,
                       MASK_VALUE)
    probs = jax.nn.softmax(scores, axis=-1)
    pieces.append(jnp.einsum('bkgts,bksd->bkgtd', probs.astype(v.dtype), vh[:, :, :end]))
  y = pieces[0] if len(pieces) == 1 else jnp.concatenate(pieces, axis=3)
  if fill_empty_rows:
    empty = ~jnp.any(allowed, axis=-1)                                  # [B, T]
    mean = jnp.mean(vh.astype(jnp.float32), axis=2).astype(y.dtype)     # [B, K, d]
    y = jnp.where(empty[:, None, None, :, None], mean[:, :, None, None, :], y)
  return y.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


class Attention(nnx.Module):
  """Causal grouped-query self-attention with an optional key/value cache."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    d, h, k, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, rngs=rngs)
    self.config = c
    if c.fused_qkv:
      self.qkv = _Proj((d, 3, h, hd), 1, use_bias=c.qkv_bias, **kw)
    else:
      self.q = _Proj((d, h, hd), 1, use_bias=c.qkv_bias, **kw)
      self.k = _Proj((d, k, hd), 1, use_bias=c.qkv_bias, **kw)
      self.v = _Proj((d, k, hd), 1, use_bias=c.qkv_bias, **kw)
    self.o = _Proj((h, hd, d), 2, use_bias=c.attn_out_bias, **kw)

  def __call__(self, x: jax.Array, allowed: jax.Array, rope: tuple[jax.Array, jax.Array] | None,
               kv: tuple[jax.Array, jax.Array] | None, index: jax.Array | None,
               *, want_probs: bool, want_qkv: bool, blocked: bool = False,
               fill_empty_rows: bool = True):
    """``x [B, T, D]``, ``allowed [B, T, S]`` -> ``(y, probs, qkv, (keys, values))``.

    Without a cache ``S = T``; with ``kv = (keys, values)`` (``[B, S, K, hd]``) the
    new keys/values are written at slots ``[index, index + T)`` and attention runs
    over all ``S`` slots. ``probs`` (``[B, H, T, S]`` float32) and ``qkv`` are None
    unless asked for. ``blocked`` (no cache, no ``probs``): :func:`blocked_attention`
    with ``config.attention_block_size``.
    """
    c = self.config
    b, t, _ = x.shape
    if c.fused_qkv:
      fused = self.qkv(x)   # [B, T, 3, H, hd]
      q, k, v = fused[:, :, 0], fused[:, :, 1], fused[:, :, 2]
    else:
      q, k, v = self.q(x), self.k(x), self.v(x)
    if rope is not None:
      q, k = _rotate(q, *rope), _rotate(k, *rope)
    qkv = ((q.reshape(b, t, -1), k.reshape(b, t, -1), v.reshape(b, t, -1))
           if want_qkv else None)
    if kv is not None:
      keys = jax.lax.dynamic_update_slice(kv[0], k.astype(kv[0].dtype), (0, index, 0, 0))
      values = jax.lax.dynamic_update_slice(kv[1], v.astype(kv[1].dtype), (0, index, 0, 0))
      k, v = keys.astype(c.dtype), values.astype(c.dtype)
    else:
      keys, values = k, v
    probs = None
    if blocked and kv is None and not want_probs:
      y = blocked_attention(q, k, v, allowed, block_size=c.attention_block_size,
                            fill_empty_rows=fill_empty_rows)
    else:
      y, probs = dense_attention(q, k, v, allowed)
    y = self.o(checkpoint_name(y, ATTENTION_OUT))
    return y, (probs if want_probs else None), qkv, (keys, values)


class MLP(nnx.Module):
  """``down(gelu_tanh(up(x)))`` or ``down(silu(gate(x)) * up(x))``."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    kw = dict(use_bias=c.mlp_bias, dtype=c.dtype, param_dtype=c.param_dtype,
              kernel_init=nnx.initializers.normal(_INIT_STD), rngs=rngs)
    self.swiglu = c.mlp == 'swiglu'
    if self.swiglu:
      self.gate = nnx.Linear(c.hidden_size, c.intermediate_size, **kw)
    self.up = nnx.Linear(c.hidden_size, c.intermediate_size, **kw)
    self.down = nnx.Linear(c.intermediate_size, c.hidden_size, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    if self.swiglu:
      return self.down(jax.nn.silu(self.gate(x)) * self.up(x))
    return self.down(jax.nn.gelu(self.up(x), approximate=True))


class DecoderLayer(nnx.Module):
  """Pre-norm block: ``x + attn(attn_norm(x))``, then ``x + mlp(mlp_norm(x))``."""

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    self.attn_norm = _norm(config, rngs)
    self.attn = Attention(config, rngs=rngs)
    self.mlp_norm = _norm(config, rngs)
    self.mlp = MLP(config, rngs=rngs)

  def __call__(self, x, allowed, rope, kv, index, *, want_probs, want_qkv, blocked=False,
               fill_empty_rows=True):
    y, probs, qkv, kv = self.attn(self.attn_norm(x), allowed, rope, kv, index,
                                  want_probs=want_probs, want_qkv=want_qkv, blocked=blocked,
                                  fill_empty_rows=fill_empty_rows)
    x = x + y
    return x + self.mlp(self.mlp_norm(x)), probs, qkv, kv


@jax.custom_vjp
def tied_logits(h: jax.Array, embedding: jax.Array) -> jax.Array:
  r"""The tied head: ``logits[b, t] = embedding @ h[b, t]`` (``h [B, T, D]``,
  ``embedding [V, D]`` -> ``[B, T, V]``), with a gradient written for XLA:CPU.

  The gradients are the plain ones,

  .. math::
    \partial h = g E, \qquad \partial E = g^\top h = (h^\top g)^\top,

  but ``∂E`` is computed as the ``[D, V]`` product ``h^T g`` and then transposed:
  autodiff of the einsum asks for ``g^T h``, whose large operand ``g`` (``[B T, V]``)
  XLA:CPU copies into a transposed layout first (in the LM benchmark the loss
  gradient's fusion wrote the whole ``[V, B T]`` array transposed, 13% of the step);
  transposing the small ``[D, V]`` result instead costs ``V D`` floats.

  >>> h, e = jnp.ones((1, 2, 3)), jnp.arange(12.0).reshape(4, 3)
  >>> tied_logits(h, e)[0, 0].tolist()
  [3.0, 12.0, 21.0, 30.0]
  >>> jax.grad(lambda e: tied_logits(h, e).sum())(e)[0].tolist()
  [2.0, 2.0, 2.0]
  """
  return jnp.einsum('btd,vd->btv', h, embedding)


def _tied_logits_fwd(h, embedding):
  return tied_logits(h, embedding), (h, embedding)


def _tied_logits_bwd(residuals, g):
  h, embedding = residuals
  d_h = jnp.einsum('btv,vd->btd', g, embedding).astype(h.dtype)
  d_embedding = jnp.einsum('btd,btv->dv', h, g).T.astype(embedding.dtype)
  return d_h, d_embedding


tied_logits.defvjp(_tied_logits_fwd, _tied_logits_bwd)


# ----------------------------------------------------------------------------- the model


def segment_positions(segment_ids: jax.Array) -> jax.Array:
  """Each token's position within its segment, for packed rows ``[B, T]`` whose
  segments are contiguous runs of one id.

  >>> segment_positions(jnp.array([[1, 1, 1, 2, 2, 0]])).tolist()
  [[0, 1, 2, 0, 1, 0]]
  """
  t = segment_ids.shape[1]
  idx = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), segment_ids.shape)
  starts = jnp.concatenate(
      [jnp.ones_like(segment_ids[:, :1], bool), segment_ids[:, 1:] != segment_ids[:, :-1]],
      axis=1)
  return idx - jax.lax.cummax(jnp.where(starts, idx, 0), axis=1)


class Decoder(nnx.Module):
  """A decoder-only transformer language model (GPT-2, Llama, Qwen2; see the module doc).

  ``__call__(input_ids, *, attention_mask=None, positions=None, segment_ids=None,
  cache=None, output_hidden_states=False, output_attentions=False,
  output_qkv=False, logits_to_keep=0) -> ModelOutput``

  * ``input_ids``: int ``[B, T]``; ``logits``: ``[B, T, vocab]`` (computation dtype),
    or ``[B, n, vocab]`` for the last ``n`` tokens with ``logits_to_keep=n > 0`` (a
    prompt read for decoding needs only its last token's).
  * ``attention_mask``: ``[B, T]``, 1 for real tokens, 0 for padding (left padding for
    generation); padding keys are never attended to.
  * ``segment_ids``: ``[B, T]`` for packed rows: a token attends (causally) only to
    tokens of its own segment; id 0 is padding. Segments must be contiguous runs.
  * ``positions``: ``[B, T]`` position ids. Default: the position within the segment
    with ``segment_ids``; else, with ``attention_mask``, ``cumsum(mask) - 1`` clipped
    at 0 (left padding does not shift the real tokens); else ``arange(T)``. With a
    cache: ``cache.positions + cumsum(mask) - 1`` (clipped at 0).
  * ``cache``: a :class:`KVCache` (:func:`init_cache`). The ``T`` new keys/values go
    to slots ``[index, index + T)`` (``index + T`` must not exceed the cache length),
    ``mask`` there is set from ``attention_mask``, every query attends causally to the
    real slots before it, and ``ModelOutput.cache`` is the updated cache. Jit it with
    the cache donated. ``segment_ids`` cannot be combined with a cache.
  * ``features``: ``{'final_hidden': [B, T, D]}``, the output of the final norm
    (what the head reads).
  * ``hidden_states`` (``output_hidden_states=True``): ``num_layers + 1`` arrays
    ``[B, T, D]``: the embedding output (token plus learned position embeddings),
    then each block's output, **except that the last is after the final norm** (it
    equals ``features['final_hidden']``): what ``transformers`` returns for these
    three families (its ``capture_outputs`` replaces the last hidden state by the
    final-norm output).
  * ``attentions`` (``output_attentions=True``): per layer ``[B, H, T, S]`` float32
    probabilities (``S = T``, or the cache length).
  * ``qkv`` (``output_qkv=True``): per layer ``(queries [B, T, H * hd], keys [B, T,
    K * hd], values [B, T, K * hd])`` of the new tokens, queries and keys after RoPE.

  Args:
    config: a :class:`DecoderConfig`.
    rngs: ``nnx.Rngs`` with a ``params`` stream.

  >>> import functools
  >>> from kdjax.models import create, functional
  >>> m = create('qwen2', num_classes=11, input_shape=(5,), hidden_size=16, num_layers=2,
  ...            num_heads=4, num_kv_heads=2)
  >>> apply, params, state = functional(m)
  >>> run = jax.jit(functools.partial(apply, output_hidden_states=True))
  >>> out, _ = run(params, state, jnp.zeros((2, 5), jnp.int32))
  >>> out.logits.shape, len(out.hidden_states), m.config.num_kv_heads
  ((2, 5, 11), 3, 2)
  """

  def __init__(self, config: DecoderConfig, *, rngs: nnx.Rngs):
    c = config
    self.config = c
    init = nnx.initializers.normal(_INIT_STD)
    kw = dict(dtype=c.dtype, param_dtype=c.param_dtype, embedding_init=init, rngs=rngs)
    self.embed = nnx.Embed(c.vocab_size, c.hidden_size, **kw)
    self.pos_embed = (nnx.Embed(c.max_positions, c.hidden_size, **kw)
                      if c.positions == 'learned' else None)
    self.layers = nnx.List([DecoderLayer(c, rngs=rngs) for _ in range(c.num_layers)])
    self.final_norm = _norm(c, rngs)
    self.lm_head = (None if c.tie_embeddings else
                    nnx.Linear(c.hidden_size, c.vocab_size, use_bias=False, dtype=c.dtype,
                               param_dtype=c.param_dtype, kernel_init=init, rngs=rngs))

  def __call__(
      self,
      input_ids: jax.Array,
      *,
      attention_mask: jax.Array | None = None,
      positions: jax.Array | None = None,
      segment_ids: jax.Array | None = None,
      cache: KVCache | None = None,
      output_hidden_states: bool = False,
      output_attentions: bool = False,
      output_qkv: bool = False,
      logits_to_keep: int = 0,
  ) -> ModelOutput:
    c = self.config
    input_ids = jnp.asarray(input_ids)
    if input_ids.ndim != 2:
      raise ValueError(f'input_ids must be [batch, tokens], got shape {input_ids.shape}')
    b, t = input_ids.shape
    real = (jnp.ones((b, t), bool) if attention_mask is None
            else jnp.asarray(attention_mask).astype(bool))
    if segment_ids is not None:
      if cache is not None:
        raise ValueError('segment_ids (packed rows) cannot be combined with a cache')
      segment_ids = jnp.asarray(segment_ids)
      real = real & (segment_ids != 0)

    if positions is None:
      if cache is not None:
        positions = cache.positions[:, None] + jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1
      elif segment_ids is not None:
        positions = segment_positions(segment_ids)
      elif attention_mask is not None:
        positions = jnp.cumsum(real, axis=1, dtype=jnp.int32) - 1
      else:
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
      positions = jnp.maximum(positions, 0)
    positions = jnp.asarray(positions, jnp.int32)

    # Which keys each query may attend to: allowed [B, T, S].
    if cache is None:
      index = None
      allowed = (jnp.arange(t)[:, None] >= jnp.arange(t)[None, :])[None] & real[:, None, :]
      if segment_ids is not None:
        allowed = allowed & (segment_ids[:, :, None] == segment_ids[:, None, :])
    else:
      index = jnp.asarray(cache.index, jnp.int32)
      _check_room(index, t, cache.mask.shape[1])
      slot_mask = jax.lax.dynamic_update_slice(cache.mask, real, (0, index))
      slots = jnp.arange(cache.mask.shape[1])
      causal = slots[None, :] <= (index + jnp.arange(t))[:, None]
      allowed = causal[None] & slot_mask[:, None, :]

    rope = None
    if c.positions == 'rope':
      angles = positions[..., None].astype(jnp.float32) * rope_frequencies(c)
      angles = jnp.concatenate([angles, angles], axis=-1)
      rope = (jnp.cos(angles), jnp.sin(angles))

    blocked = cache is None and not output_attentions and (
        c.attention_impl == 'blocked'
        or (c.attention_impl == 'auto' and t >= 2 * c.attention_block_size
            and jax.default_backend() == 'cpu'))
    # Without a padding or segment mask every query sees at least itself.
    fill_empty_rows = attention_mask is not None or segment_ids is not None

    h = self.embed(input_ids).astype(c.dtype)
    if self.pos_embed is not None:
      h = h + self.pos_embed(positions).astype(c.dtype)
    h = _batch_sharded(h)
    hidden, probs_all, qkv_all, keys, values = [h], [], [], [], []
    block = _block_call(c.remat, want_probs=output_attentions, want_qkv=output_qkv,
                        blocked=blocked, fill_empty_rows=fill_empty_rows)
    for i, layer in enumerate(self.layers):
      kv = None if cache is None else (cache.keys[i], cache.values[i])
      h, probs, qkv, (k, v) = block(layer, h, allowed, rope, kv, index)
      h = _batch_sharded(h)
      hidden.append(h)
      probs_all.append(probs)
      qkv_all.append(qkv)
      keys.append(k)
      values.append(v)
    h = self.final_norm(h)
    hidden[-1] = h

    last = h[:, -int(logits_to_keep):] if logits_to_keep else h
    if self.lm_head is None:
      logits = tied_logits(last, self.embed.embedding[...].astype(c.dtype))
    else:
      logits = self.lm_head(last)
    new_cache = None
    if cache is not None:
      new_cache = KVCache(keys=tuple(keys), values=tuple(values), mask=slot_mask,
                          positions=cache.positions + jnp.sum(real, axis=1, dtype=jnp.int32),
                          index=index + t)
    return ModelOutput(
        logits=logits,
        features={'final_hidden': h},
        attentions=tuple(probs_all) if output_attentions else None,
        hidden_states=tuple(hidden) if output_hidden_states else None,
        qkv=tuple(qkv_all) if output_qkv else None,
        cache=new_cache,
    )


def _batch_sharded(x: jax.Array) -> jax.Array:
  """``x`` (``[batch, ...]``) constrained to be split over the batch axes of the mesh in
  context (``jax.set_mesh``): its first axis, and ``'fsdp'`` when it has one (the rule of
  :func:`kdjax.parallel.batch_axes`, a sibling layer this module does not import);
  ``x`` itself without a mesh, inside ``shard_map`` over those axes, or when they do not
  divide the batch.

  Under FSDP only the weights are gathered, one layer at a time; with nothing said about
  the activations the partitioner may instead gather them (the whole batch's residual
  stream on every device). The constraint on the residual stream after the embedding and
  after each block keeps every device on its own rows. Without a mesh in context the
  program is unchanged.

  References:
    Xu et al. GSPMD: General and Scalable Parallelization for ML Computation Graphs.
    2021. arXiv:2105.04663 (sharding annotations on activations).

  >>> _batch_sharded(jnp.ones((4, 3))).shape   # no mesh in context: x as it is
  (4, 3)
  """
  mesh = jax.sharding.get_abstract_mesh()
  if mesh.empty or not x.ndim:
    return x
  first = mesh.axis_names[0]
  axes = (first, 'fsdp') if 'fsdp' in mesh.axis_names and first != 'fsdp' else (first,)
  shards = math.prod(mesh.shape[a] for a in axes)
  if shards == 1 or x.shape[0] % shards or set(axes) & set(mesh.manual_axes):
    return x
  return jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec(axes))


def _block_call(remat: str, **options):
  """``call(layer, h, allowed, rope, kv, index)``: one block with the call's static
  ``options``, wrapped in ``nnx.remat`` with the policy ``remat`` names (unless
  ``'none'``)."""
  def call(layer, h, allowed, rope, kv, index):
    return layer(h, allowed, rope, kv, index, **options)
  if remat == 'none':
    return call
  return nnx.remat(call, policy=remat_policy(remat))


def _check_room(index: jax.Array, new: int, length: int) -> None:
  """Raises when a concrete cache index leaves no room for ``new`` tokens (under jit
  the index is traced and the caller must size the cache)."""
  try:
    start = int(index)
  except jax.errors.ConcretizationTypeError:
    return
  if start + new > length:
    raise ValueError(f'the cache holds {length} tokens; {start} are used and {new} more do '
                     'not fit: make it longer with init_cache(..., max_length=...)')


# ----------------------------------------------------------------------------- sharding

# Regex rules over parameter paths (kdjax.parallel.shardings_from_rules style) for a mesh
# with an 'fsdp' axis (parameters sharded, gathered per layer) and a 'model' axis
# (Megatron-style tensor parallelism): query/key/value and the MLP's gate/up projections
# are split by heads / hidden units (column-parallel), the attention output and the MLP's
# down projection by their input (row-parallel); the token embedding and the head are
# split on the vocabulary over 'model' and on the width over 'fsdp'. Norms and the
# remaining biases are replicated. Use `partition_rules(mesh)` for a mesh that lacks
# one of the axes; every sharded size must divide by its axis size (kdjax.models.hf's
# loader replicates an axis that does not).
PARTITION_RULES: tuple[tuple[str, Any], ...] = (
    (r'embed/embedding', ('model', 'fsdp')),
    (r'pos_embed/embedding', (None, 'fsdp')),
    (r'layers/\d+/attn/(q|k|v)/kernel', ('fsdp', 'model', None)),
    (r'layers/\d+/attn/(q|k|v)/bias', ('model', None)),
    (r'layers/\d+/attn/qkv/kernel', ('fsdp', None, 'model', None)),
    (r'layers/\d+/attn/qkv/bias', (None, 'model', None)),
    (r'layers/\d+/attn/o/kernel', ('model', None, 'fsdp')),
    (r'layers/\d+/mlp/(gate|up)/kernel', ('fsdp', 'model')),
    (r'layers/\d+/mlp/(gate|up)/bias', ('model',)),
    (r'layers/\d+/mlp/down/kernel', ('model', 'fsdp')),
    (r'lm_head/kernel', ('fsdp', 'model')),
    (r'.*', None),
)


def partition_rules(mesh: Mesh, rules: Sequence[tuple[str, Any]] = PARTITION_RULES
                    ) -> tuple[tuple[str, Any], ...]:
  """``rules`` with the mesh axes that ``mesh`` lacks replaced by ``None``.

  A mesh with only a ``'data'`` axis replicates every parameter; a mesh with
  ``('data', 'fsdp')`` keeps the FSDP part. ``'fsdp:<axis>'`` rules on an absent
  axis become ``None``.

  Args:
    mesh: the mesh (only its axis names are read).
    rules: regex rules; default :data:`PARTITION_RULES`.

  Returns:
    Rules for ``kdjax.parallel.shardings_from_rules(tree, rules, mesh)``.

  >>> mesh = jax.make_mesh((1,), ('fsdp',))
  >>> dict(partition_rules(mesh))[r'layers/\\d+/attn/o/kernel']
  (None, None, 'fsdp')
  """
  names = set(mesh.axis_names)

  def keep(axis):
    if axis is None:
      return None
    if isinstance(axis, str):
      return axis if axis in names else None
    kept = tuple(a for a in axis if a in names)
    return kept or None

  out = []
  for regex, value in rules:
    if isinstance(value, str):
      axis = value.split(':', 1)[1] if ':' in value else None
      value = value if axis is None or axis in names else None
    elif value is not None:
      value = tuple(keep(a) for a in value)
    out.append((regex, value))
  return tuple(out)


# ----------------------------------------------------------------------------- Hugging Face

HF_MODEL_TYPES = ('gpt2', 'llama', 'qwen2')
_ARCHITECTURES = {'gpt2': 'GPT2LMHeadModel', 'llama': 'LlamaForCausalLM',
                  'qwen2': 'Qwen2ForCausalLM'}
# GPT-2's activation_function values that are the tanh approximation of GELU.
_GELU_TANH = ('gelu_new', 'gelu_pytorch_tanh', 'gelu_fast')


def _require(hf: Mapping[str, Any], *keys: str) -> list[Any]:
  missing = [k for k in keys if hf.get(k) is None]
  if missing:
    raise UserError(f'config.json of this {hf.get("model_type")} model lacks '
                    f'{", ".join(map(repr, missing))}; use the config.json saved with the '
                    'weights.')
  return [hf[k] for k in keys]


def _rope_from_hf(hf: Mapping[str, Any]) -> tuple[float, RopeScaling | None]:
  """``(rope_theta, rope_scaling)`` from ``rope_parameters`` (transformers >= 5) or the
  older top-level ``rope_theta`` / ``rope_scaling``."""
  params = dict(hf.get('rope_scaling') or {})
  params.update(hf.get('rope_parameters') or {})
  theta = params.get('rope_theta', hf.get('rope_theta', 10000.0))
  kind = params.get('rope_type', params.get('type', 'default'))
  if kind == 'default':
    return float(theta), None
  if kind == 'llama3':
    return float(theta), RopeScaling(
        factor=float(params['factor']), low_freq_factor=float(params['low_freq_factor']),
        high_freq_factor=float(params['high_freq_factor']),
        original_max_positions=int(params['original_max_position_embeddings']))
  raise UserError(f'RoPE type {kind!r} is not supported (supported: default, llama3); use a '
                  'checkpoint with plain or Llama 3 rotary embeddings.')


def config_from_hf(hf: Mapping[str, Any], *, dtype: Any = jnp.float32,
                   param_dtype: Any = None) -> DecoderConfig:
  """A :class:`DecoderConfig` from a Hugging Face ``config.json`` dict.

  ``model_type`` picks the mapping: ``'gpt2'`` (``n_embd``, ``n_layer``, ``n_head``,
  ``n_inner``, ``n_positions``, ``layer_norm_epsilon``, ``activation_function``),
  ``'llama'`` / ``'qwen2'`` (``hidden_size``, ``num_hidden_layers``,
  ``num_attention_heads``, ``num_key_value_heads``, ``head_dim``,
  ``intermediate_size``, ``max_position_embeddings``, ``rms_norm_eps``, RoPE from
  ``rope_parameters`` or ``rope_theta``/``rope_scaling``, Llama's ``attention_bias``
  and ``mlp_bias``), each with ``vocab_size``, ``tie_word_embeddings`` and the special
  token ids. Keys that only change training (dropouts, initialisation) are ignored.

  Args:
    hf: the parsed ``config.json``.
    dtype: computation dtype.
    param_dtype: parameter dtype; default ``dtype``.

  Returns:
    The config.

  Raises:
    UserError: an unsupported ``model_type``, a missing size, or an option this
      decoder does not implement (sliding-window attention, another activation, ...).

  >>> config_from_hf({'model_type': 'gpt2', 'vocab_size': 100, 'n_embd': 32, 'n_layer': 2,
  ...                 'n_head': 4, 'n_positions': 64}).mlp
  'gelu'
  """
  kind = hf.get('model_type')
  if kind not in HF_MODEL_TYPES:
    raise UserError(f'model_type {kind!r} is not a decoder kdjax reads (supported: '
                    f'{", ".join(HF_MODEL_TYPES)}).')
  common = dict(bos_token_id=hf.get('bos_token_id'), eos_token_id=hf.get('eos_token_id'),
                pad_token_id=hf.get('pad_token_id'), dtype=dtype,
                param_dtype=dtype if param_dtype is None else param_dtype)
  if kind == 'gpt2':
    vocab, width, layers, heads, context = _require(
        hf, 'vocab_size', 'n_embd', 'n_layer', 'n_head', 'n_positions')
    act = hf.get('activation_function', 'gelu_new')
    unsupported = [(act not in _GELU_TANH, f'activation_function {act!r}'),
                   (hf.get('scale_attn_by_inverse_layer_idx'), 'scale_attn_by_inverse_layer_idx'),
                   (hf.get('scale_attn_weights') is False, 'scale_attn_weights=false'),
                   (hf.get('add_cross_attention'), 'add_cross_attention')]
    for bad, what in unsupported:
      if bad:
        raise UserError(f'GPT-2 option {what} is not supported; kdjax reads GPT-2 with '
                        'gelu_new, scaled attention and no cross-attention.')
    return DecoderConfig.gpt2(
        vocab_size=vocab, hidden_size=width, num_layers=layers, num_heads=heads,
        intermediate_size=hf.get('n_inner'), max_positions=context,
        norm_eps=hf.get('layer_norm_epsilon', 1e-5),
        tie_embeddings=hf.get('tie_word_embeddings', True), **common)
  vocab, width, layers, heads, inner = _require(
      hf, 'vocab_size', 'hidden_size', 'num_hidden_layers', 'num_attention_heads',
      'intermediate_size')
  act = hf.get('hidden_act', 'silu')
  if act != 'silu':
    raise UserError(f'hidden_act {act!r} is not supported for {kind}; kdjax reads SwiGLU '
                    '(silu) MLPs.')
  if kind == 'qwen2' and hf.get('use_sliding_window'):
    raise UserError('Qwen2 sliding-window attention (use_sliding_window) is not supported; '
                    'use a checkpoint with full attention.')
  theta, scaling = _rope_from_hf(hf)
  if kind == 'llama':
    bias = dict(qkv_bias=bool(hf.get('attention_bias', False)),
                attn_out_bias=bool(hf.get('attention_bias', False)),
                mlp_bias=bool(hf.get('mlp_bias', False)))
  else:
    bias = dict(qkv_bias=True, attn_out_bias=False, mlp_bias=False)
  return DecoderConfig.llama(
      vocab_size=vocab, hidden_size=width, num_layers=layers, num_heads=heads,
      num_kv_heads=hf.get('num_key_value_heads'), head_dim=hf.get('head_dim'),
      intermediate_size=inner, max_positions=hf.get('max_position_embeddings', 2048),
      norm_eps=hf.get('rms_norm_eps', 1e-6), rope_theta=theta, rope_scaling=scaling,
      tie_embeddings=hf.get('tie_word_embeddings', False), **bias, **common)


def hf_model_type(config: DecoderConfig) -> str:
  """The Hugging Face ``model_type`` whose architecture ``config`` is.

  Raises:
    UserError: when it is none of GPT-2, Llama and Qwen2.

  >>> hf_model_type(DecoderConfig.qwen2(vocab_size=2, hidden_size=8, num_layers=1, num_heads=2))
  'qwen2'
  """
  c = config
  if (c.norm, c.mlp, c.positions) == ('layernorm', 'gelu', 'learned'):
    if c.fused_qkv and c.qkv_bias and c.attn_out_bias and c.mlp_bias and (
        c.head_dim * c.num_heads == c.hidden_size):
      return 'gpt2'
  elif (c.norm, c.mlp, c.positions) == ('rmsnorm', 'swiglu', 'rope') and not c.fused_qkv:
    if c.qkv_bias and not c.attn_out_bias and not c.mlp_bias:
      return 'qwen2'
    if c.qkv_bias == c.attn_out_bias:
      return 'llama'
  raise UserError('this DecoderConfig is none of the GPT-2, Llama and Qwen2 architectures, '
                  'so it has no Hugging Face format; build it with DecoderConfig.gpt2/llama/'
                  'qwen2.')


def config_to_hf(config: DecoderConfig) -> dict[str, Any]:
  """The Hugging Face ``config.json`` dict (with ``architectures`` and ``model_type``) of
  ``config``; :func:`config_from_hf` inverts it.

  Besides the keys :func:`config_from_hf` reads, it writes the fixed options of the
  family (GPT-2's activation and attention scaling, Qwen2's disabled sliding window)
  and RoPE both as ``rope_parameters`` (transformers >= 5) and as the older top-level
  ``rope_theta`` (and ``rope_scaling``).

  >>> d = config_to_hf(DecoderConfig.llama(vocab_size=10, hidden_size=8, num_layers=1,
  ...                                      num_heads=2))
  >>> d['architectures'], d['num_key_value_heads'], d['rope_parameters']['rope_theta']
  (['LlamaForCausalLM'], 2, 10000.0)
  """
  c = config
  kind = hf_model_type(c)
  out: dict[str, Any] = {'architectures': [_ARCHITECTURES[kind]], 'model_type': kind,
                         'vocab_size': c.vocab_size, 'tie_word_embeddings': c.tie_embeddings,
                         'bos_token_id': c.bos_token_id,
                         'eos_token_id': (list(c.eos_token_id) if isinstance(c.eos_token_id, tuple)
                                          else c.eos_token_id),
                         'pad_token_id': c.pad_token_id}
  if kind == 'gpt2':
    out.update(n_embd=c.hidden_size, n_layer=c.num_layers, n_head=c.num_heads,
               n_inner=c.intermediate_size, n_positions=c.max_positions,
               layer_norm_epsilon=c.norm_eps, activation_function='gelu_new',
               scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False,
               reorder_and_upcast_attn=False, add_cross_attention=False)
    return out
  rope: dict[str, Any] = {'rope_type': 'default', 'rope_theta': float(c.rope_theta)}
  if c.rope_scaling is not None:
    s = c.rope_scaling
    rope.update(rope_type='llama3', factor=s.factor, low_freq_factor=s.low_freq_factor,
                high_freq_factor=s.high_freq_factor,
                original_max_position_embeddings=s.original_max_positions)
  out.update(hidden_size=c.hidden_size, num_hidden_layers=c.num_layers,
             num_attention_heads=c.num_heads, num_key_value_heads=c.num_kv_heads,
             head_dim=c.head_dim, intermediate_size=c.intermediate_size,
             max_position_embeddings=c.max_positions, rms_norm_eps=c.norm_eps,
             hidden_act='silu', rope_parameters=rope, rope_theta=float(c.rope_theta))
  if c.rope_scaling is not None:   # the key transformers < 5 reads
    out['rope_scaling'] = {k: v for k, v in rope.items() if k != 'rope_theta'}
  if kind == 'llama':
    out.update(attention_bias=c.qkv_bias, mlp_bias=c.mlp_bias)
  else:
    out.update(use_sliding_window=False, sliding_window=None)
  return out


def _same(x):
  return x


def _transpose(x):
  return x.T


def hf_tensors(module: Decoder) -> dict[str, HFTensor]:
  """Parameter path -> :class:`~kdjax.models.hf.HFTensor` (the checkpoint name, as
  ``transformers``' ``*ForCausalLM.save_pretrained`` writes it, and the layout
  converters) for every parameter of ``module``.

  GPT-2's ``Conv1D`` weights are ``[in, out]`` (reshaped to the head axes here);
  Llama/Qwen2 ``Linear`` weights are ``[out, in]`` (transposed, then reshaped).

  >>> m = nnx.eval_shape(lambda: Decoder(DecoderConfig.llama(
  ...     vocab_size=10, hidden_size=8, num_layers=1, num_heads=2), rngs=nnx.Rngs(0)))
  >>> t = hf_tensors(m)['layers/0/attn/q/kernel']
  >>> t.name, t.to_kdjax(jnp.zeros((8, 8))).shape, t.to_hf(jnp.zeros((8, 2, 4))).shape
  ('model.layers.0.self_attn.q_proj.weight', (8, 2, 4), (8, 8))
  """
  c = module.config
  kind = hf_model_type(c)
  d, h, k, hd = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim
  out: dict[str, HFTensor] = {}

  def add(path, name, to_kdjax=_same, to_hf=_same):
    out[path] = HFTensor(name, to_kdjax, to_hf)

  def norm(path, name):
    add(f'{path}/scale', f'{name}.weight')
    if c.norm == 'layernorm':
      add(f'{path}/bias', f'{name}.bias')

  if kind == 'gpt2':
    add('embed/embedding', 'transformer.wte.weight')
    add('pos_embed/embedding', 'transformer.wpe.weight')
    for i in range(c.num_layers):
      p, n = f'layers/{i}', f'transformer.h.{i}'
      norm(f'{p}/attn_norm', f'{n}.ln_1')
      add(f'{p}/attn/qkv/kernel', f'{n}.attn.c_attn.weight',
          lambda x: x.reshape(d, 3, h, hd), lambda x: x.reshape(d, 3 * h * hd))
      add(f'{p}/attn/qkv/bias', f'{n}.attn.c_attn.bias',
          lambda x: x.reshape(3, h, hd), lambda x: x.reshape(3 * h * hd))
      add(f'{p}/attn/o/kernel', f'{n}.attn.c_proj.weight',
          lambda x: x.reshape(h, hd, d), lambda x: x.reshape(h * hd, d))
      add(f'{p}/attn/o/bias', f'{n}.attn.c_proj.bias')
      norm(f'{p}/mlp_norm', f'{n}.ln_2')
      add(f'{p}/mlp/up/kernel', f'{n}.mlp.c_fc.weight')
      add(f'{p}/mlp/up/bias', f'{n}.mlp.c_fc.bias')
      add(f'{p}/mlp/down/kernel', f'{n}.mlp.c_proj.weight')
      add(f'{p}/mlp/down/bias', f'{n}.mlp.c_proj.bias')
    norm('final_norm', 'transformer.ln_f')
  else:
    add('embed/embedding', 'model.embed_tokens.weight')
    for i in range(c.num_layers):
      p, n = f'layers/{i}', f'model.layers.{i}'
      norm(f'{p}/attn_norm', f'{n}.input_layernorm')
      for proj, heads in (('q', h), ('k', k), ('v', k)):
        add(f'{p}/attn/{proj}/kernel', f'{n}.self_attn.{proj}_proj.weight',
            lambda x, heads=heads: x.T.reshape(d, heads, hd),
            lambda x, heads=heads: x.reshape(d, heads * hd).T)
        if c.qkv_bias:
          add(f'{p}/attn/{proj}/bias', f'{n}.self_attn.{proj}_proj.bias',
              lambda x, heads=heads: x.reshape(heads, hd),
              lambda x, heads=heads: x.reshape(heads * hd))
      add(f'{p}/attn/o/kernel', f'{n}.self_attn.o_proj.weight',
          lambda x: x.T.reshape(h, hd, d), lambda x: x.reshape(h * hd, d).T)
      if c.attn_out_bias:
        add(f'{p}/attn/o/bias', f'{n}.self_attn.o_proj.bias')
      norm(f'{p}/mlp_norm', f'{n}.post_attention_layernorm')
      for proj in ('gate', 'up', 'down'):
        add(f'{p}/mlp/{proj}/kernel', f'{n}.mlp.{proj}_proj.weight', _transpose, _transpose)
        if c.mlp_bias:
          add(f'{p}/mlp/{proj}/bias', f'{n}.mlp.{proj}_proj.bias')
    norm('final_norm', 'model.norm')
  if not c.tie_embeddings:
    add('lm_head/kernel', 'lm_head.weight', _transpose, _transpose)
  return out


def _hf_build(hf: dict, dtype: Any, rngs: nnx.Rngs) -> Decoder:
  return Decoder(config_from_hf(hf, dtype=dtype), rngs=rngs)


def _hf_config(module: Decoder) -> dict:
  return config_to_hf(module.config)


HF_FAMILY = Family(
    model_types=HF_MODEL_TYPES,
    build=_hf_build,
    hf_config=_hf_config,
    tensors=hf_tensors,
    partition_rules=PARTITION_RULES,
    # Base-model checkpoints (GPT2Model, LlamaModel) store the names without the prefix.
    prefixes=('transformer.', 'model.'),
    # Buffers older checkpoints saved (GPT-2's causal-mask 'attn.bias'/'attn.masked_bias',
    # RoPE's inv_freq) and the head a tied checkpoint may still carry.
    ignored=(r'.*\.attn\.(masked_)?bias', r'.*\.rotary_emb\.inv_freq', r'lm_head\.weight'),
)


# ----------------------------------------------------------------------------- registry


def _builder(preset: str | None):
  def build(*, num_classes, input_shape, rngs, dtype, **kwargs) -> Decoder:
    input_shape = tuple(input_shape)
    if len(input_shape) != 1:
      raise ValueError(f'a decoder takes input_shape (tokens,), got {input_shape}')
    kwargs.setdefault('max_positions', input_shape[0])
    make = DecoderConfig if preset is None else getattr(DecoderConfig, preset)
    config = make(vocab_size=num_classes, dtype=dtype, **kwargs)
    if config.max_positions < input_shape[0]:
      raise ValueError(f'max_positions ({config.max_positions}) is shorter than the '
                       f'sequences ({input_shape[0]} tokens)')
    return Decoder(config, rngs=rngs)

  build.__doc__ = (f'A randomly initialised {preset or "generic"} :class:`Decoder`: '
                   '``num_classes`` is the vocabulary size, ``input_shape`` ``(tokens,)``, '
                   'the other options are :class:`DecoderConfig` fields (sizes required).')
  return build


register('decoder', _builder(None))
register('gpt2', _builder('gpt2'))
register('llama', _builder('llama'))
register('qwen2', _builder('qwen2'))
