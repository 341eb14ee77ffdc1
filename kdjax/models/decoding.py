r"""Jitted decoding for the decoder family: greedy, temperature, top-k and top-p sampling.

:func:`sample` is a pure function of the decoder's ``apply`` and parameters, so it runs
inside a jitted train step (on-policy distillation samples the student there) as well as
on its own (:func:`generate` wraps a module). One call:

1. **Prefill.** The prompts ``[batch, P]`` are *left*-padded (``prompt_mask`` 0 on the
   padding), so every row's last prompt token sits in column ``P - 1`` and one forward
   pass over the prompts fills the key/value cache (``max_length = P + max_new_tokens``
   slots) and gives every row's next-token logits.
2. **Decode.** A ``lax.while_loop`` feeds one token per row per step. A row that has
   emitted a stop token is *done*: its later tokens are ``pad_id`` and are written to the
   cache as padding (``attention_mask`` 0), so they change nothing. The loop ends after
   ``max_new_tokens`` steps or when every row is done.

Sampling from logits :math:`z` (the processing order of Hugging Face's and vLLM's
samplers): :math:`z / T`; then top-k keeps the :math:`k` largest (ties with the
:math:`k`-th kept); then top-p keeps the smallest set of most probable tokens whose
probability reaches :math:`p` (the most probable token always); then a categorical draw.
``temperature=0`` is greedy (argmax; top-k/top-p do not change it).

The returned ``logprobs`` are those of the sampled tokens under the *processed*
distribution (what was sampled from), ``0`` after a row is done.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from kdjax.errors import UserError

Array = jax.Array
_NEG = -1e30


class Generation(NamedTuple):
  """What :func:`sample` returns.

  Attributes:
    tokens: ``[batch, max_new_tokens]`` int32; ``pad_id`` after a row's stop token.
    mask: ``[batch, max_new_tokens]`` bool: the generated tokens, the stop token included.
    logprobs: ``[batch, max_new_tokens]`` float32 log-probabilities of ``tokens`` under the
      processed sampling distribution (``0`` where ``mask`` is False).
    lengths: ``[batch]`` int32, ``mask.sum(-1)``.
  """

  tokens: Array
  mask: Array
  logprobs: Array
  lengths: Array


def process_logits(logits: Array, *, temperature: float = 1.0, top_k: int | None = None,
                   top_p: float | None = None) -> Array:
  r"""The logits a sampler draws from: tempered, then cut to the top-k, then to the top-p.

  Removed entries are set to a large negative number (not ``-inf``, so a softmax over
  them stays finite). ``temperature`` must be positive here (greedy is handled by the
  caller).

  Args:
    logits: ``[..., vocab]``.
    temperature: divides the logits.
    top_k: keep the ``top_k`` largest (entries equal to the ``top_k``-th are kept too).
    top_p: keep the most probable entries whose total probability first reaches ``top_p``.

  Returns:
    ``[..., vocab]`` float32.

  >>> z = jnp.log(jnp.array([0.5, 0.3, 0.15, 0.05]))
  >>> (process_logits(z, top_p=0.8) > -1e29).tolist()
  [True, True, False, False]
  >>> (process_logits(z, top_k=3) > -1e29).tolist()
  [True, True, True, False]
  """
  z = logits.astype(jnp.float32) / temperature
  if top_k is not None and top_k < z.shape[-1]:
    kth = jax.lax.top_k(z, top_k)[0][..., -1:]
    z = jnp.where(z >= kth, z, _NEG)
  if top_p is not None and top_p < 1.0:
    z = jnp.where(_nucleus(z, top_p), z, _NEG)
  return z


def _nucleus(z: Array, top_p: float) -> Array:
  """``[..., vocab]`` bool: the entries whose strictly larger entries hold less than
  ``top_p`` of the probability (the nucleus, its smallest logit's ties included).

  No sort (slow on CPUs, a large part of a decoding step there): the smallest kept
  logit is found by bisection over the float32 values' order-preserving integer keys,
  32 masked sums over the vocabulary, exact.
  """
  probs = jax.nn.softmax(z, axis=-1)
  bits = jax.lax.bitcast_convert_type(jnp.where(z == 0, 0.0, z), jnp.uint32)   # -0 is 0
  sign = bits >> 31
  keys = jnp.where(sign == 1, ~bits, bits | jnp.uint32(0x80000000))   # monotone in z
  above = lambda key: jnp.sum(jnp.where(keys > key, probs, 0.0), axis=-1, keepdims=True)
  lo = jnp.zeros(z.shape[:-1] + (1,), jnp.uint32)        # everything above: mass 1
  hi = jnp.max(keys, axis=-1, keepdims=True)              # nothing above: mass 0

  def halve(_, bounds):
    lo, hi = bounds
    mid = lo + (hi - lo) // 2
    small = above(mid) < top_p
    return jnp.where(small, lo, mid), jnp.where(small, mid, hi)

  _, hi = jax.lax.fori_loop(0, 32, halve, (lo, hi))
  return keys >= hi


def _choose(logits: Array, rng: Array, temperature: float, top_k, top_p):
  """``(token [B], logprob [B])`` drawn from ``logits`` ``[B, V]``."""
  if temperature == 0:
    token = jnp.argmax(logits, axis=-1)
    return token.astype(jnp.int32), jnp.zeros(token.shape, jnp.float32)
  z = process_logits(logits, temperature=temperature, top_k=top_k, top_p=top_p)
  token = jax.random.categorical(rng, z, axis=-1)
  logprob = jnp.take_along_axis(jax.nn.log_softmax(z, axis=-1), token[:, None], axis=-1)[:, 0]
  return token.astype(jnp.int32), logprob


def check_sampling(*, max_new_tokens: int, temperature: float, top_k: int | None,
                   top_p: float | None) -> None:
  """Raises ``UserError`` for sampling settings that mean nothing."""
  if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, (int, np.integer)) \
      or max_new_tokens < 1:
    raise UserError(f'max_new_tokens must be a positive integer, got {max_new_tokens!r}.')
  if not (isinstance(temperature, (int, float)) and temperature >= 0 and np.isfinite(temperature)):
    raise UserError(f'temperature must be a finite number >= 0 (0: greedy), got {temperature!r}.')
  if top_k is not None and (not isinstance(top_k, (int, np.integer)) or top_k < 1):
    raise UserError(f'top_k must be a positive integer or None, got {top_k!r}.')
  if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
    raise UserError(f'top_p must be in (0, 1] or None, got {top_p!r}.')


def check_context(prompt_len: int, max_new_tokens: int, max_positions: int, *,
                  who: str = 'the model', fix: str = 'shorten the prompt or generate fewer '
                  'tokens') -> None:
  """Raises ``UserError`` when a prompt plus its continuation do not fit the context.

  A decoder sees at most ``max_positions`` tokens (:class:`~kdjax.models.DecoderConfig`'s
  ``max_positions``: the learned position table's size, or for rotary positions the
  context its config declares, by default the rows it was trained on). Decoding
  ``max_new_tokens`` after a left-padded prompt of ``prompt_len`` columns writes
  ``prompt_len + max_new_tokens`` cache slots, and a row whose prompt fills its columns
  reaches position ``prompt_len + max_new_tokens - 1``, so that sum must be at most
  ``max_positions``.

  Args:
    prompt_len: the prompts' columns ``P`` (padding included).
    max_new_tokens: tokens to generate.
    max_positions: the model's context.
    who: names the model in the message (``"the teacher's"``).
    fix: what the user should change, the end of the message.

  Raises:
    UserError: ``prompt_len + max_new_tokens > max_positions``.

  >>> check_context(24, 8, 32)      # fits: returns None
  >>> try:                         # doctest: +NORMALIZE_WHITESPACE
  ...   check_context(24, 9, 32, fix='lower max_new_tokens')
  ... except UserError as e:
  ...   print(e)
  a prompt of 24 tokens plus 9 new tokens exceeds the model context of 32 positions;
  lower max_new_tokens.
  """
  prompt_len, max_new_tokens, max_positions = (int(prompt_len), int(max_new_tokens),
                                               int(max_positions))
  if prompt_len + max_new_tokens > max_positions:
    raise UserError(f'a prompt of {prompt_len} tokens plus {max_new_tokens} new tokens exceeds '
                    f'{who} context of {max_positions} positions; {fix}.')


def sample(apply: Callable[..., Any], params: Any, state: Any, prompt_ids: Array,
           prompt_mask: Array, rng: Array, *, init_cache: Callable[[int, int], Any],
           max_new_tokens: int, temperature: float = 1.0, top_k: int | None = None,
           top_p: float | None = None, stop_tokens: Sequence[int] = (),
           pad_id: int = 0, max_positions: int | None = None) -> Generation:
  """Continues left-padded prompts with a key/value cache; pure and jittable.

  Args:
    apply: the decoder's pure ``apply(params, state, input_ids, *, attention_mask,
      cache, logits_to_keep) -> (ModelOutput, state)`` (:func:`kdjax.models.functional`).
    params: its parameters.
    state: its non-parameter state.
    prompt_ids: ``[batch, P]`` int32, left-padded; every row needs at least one token.
    prompt_mask: ``[batch, P]``, 1 on the prompt tokens.
    rng: a PRNG key (unused when greedy).
    init_cache: ``init_cache(batch, max_length)`` -> an empty
      :class:`~kdjax.models.transformer.KVCache` for the decoder (the prompt is read
      into one of length ``P``, then it grows).
    max_new_tokens: tokens to generate per row (static).
    temperature: 0 for greedy decoding (static).
    top_k: optional top-k cut (static).
    top_p: optional nucleus cut (static).
    stop_tokens: ids that end a row (the stop token itself is kept in ``mask``).
    pad_id: the id written after a row has stopped.
    max_positions: the decoder's context (``DecoderConfig.max_positions``); when given,
      a prompt plus ``max_new_tokens`` beyond it raises (the shapes are static, so this
      happens when the call is traced, before anything runs). None: not checked.

  Returns:
    A :class:`Generation`.

  Raises:
    UserError: ``P + max_new_tokens > max_positions`` (:func:`check_context`).
  """
  batch, plen = prompt_ids.shape
  if max_positions is not None:
    check_context(plen, max_new_tokens, max_positions)
  prompt_mask = prompt_mask.astype(jnp.int32)
  # The prompt is read into a cache of its own length (its attention spans its P slots,
  # and only its last token's logits are made), then the cache grows by the new tokens.
  out, _ = apply(params, state, prompt_ids.astype(jnp.int32), attention_mask=prompt_mask,
                 cache=init_cache(batch, plen), logits_to_keep=1)
  out = out._replace(cache=out.cache.grow(max_new_tokens))
  stops = jnp.asarray(tuple(stop_tokens) or (-1,), jnp.int32)

  def pick(carry):
    """Chooses token ``i`` from the logits in ``carry`` and writes it."""
    i, logits, cache, done, tokens, mask, logprobs, key = carry
    key, sub = jax.random.split(key)
    token, logprob = _choose(logits, sub, temperature, top_k, top_p)
    live = jnp.logical_not(done)
    token = jnp.where(live, token, pad_id)
    tokens = tokens.at[:, i].set(token)
    mask = mask.at[:, i].set(live)
    logprobs = logprobs.at[:, i].set(jnp.where(live, logprob, 0.0))
    done = jnp.logical_or(done, jnp.isin(token, stops))
    return token, live, (i, logits, cache, done, tokens, mask, logprobs, key)

  def cond(carry):
    i, _, _, done, *_ = carry
    return jnp.logical_and(i < max_new_tokens - 1, jnp.logical_not(jnp.all(done)))

  def body(carry):
    token, live, (i, _, cache, done, tokens, mask, logprobs, key) = pick(carry)
    out, _ = apply(params, state, token[:, None], attention_mask=live[:, None].astype(jnp.int32),
                   cache=cache)
    return i + 1, out.logits[:, -1], out.cache, done, tokens, mask, logprobs, key

  carry = (jnp.zeros((), jnp.int32), out.logits[:, -1], out.cache,
           jnp.zeros((batch,), bool), jnp.full((batch, max_new_tokens), pad_id, jnp.int32),
           jnp.zeros((batch, max_new_tokens), bool),
           jnp.zeros((batch, max_new_tokens), jnp.float32), rng)
  # The loop feeds tokens 0..n-2 back through the decoder; the last token is only
  # chosen (its forward pass would make logits nothing reads). When every row stopped
  # early, this last pick writes padding at a position already past every row's end.
  carry = jax.lax.while_loop(cond, body, carry)
  _, _, (_, _, _, _, tokens, mask, logprobs, _) = pick(carry)
  return Generation(tokens, mask, logprobs, jnp.sum(mask, axis=-1, dtype=jnp.int32))


def left_pad(sequences: Sequence[Sequence[int]], *, pad_id: int = 0,
             length: int | None = None) -> tuple[np.ndarray, np.ndarray]:
  """Token lists -> ``(ids [batch, length], mask [batch, length])``, padded on the left.

  >>> ids, mask = left_pad([[5, 6, 7], [8]])
  >>> ids.tolist(), mask.tolist()
  ([[5, 6, 7], [0, 0, 8]], [[1, 1, 1], [0, 0, 1]])
  """
  if not sequences or any(len(s) == 0 for s in sequences):
    raise UserError('every prompt needs at least one token.')
  width = max(len(s) for s in sequences) if length is None else length
  if max(len(s) for s in sequences) > width:
    raise UserError(f'a prompt has {max(len(s) for s in sequences)} tokens, more than the '
                    f'{width} allowed; shorten it or raise the prompt length.')
  ids = np.full((len(sequences), width), pad_id, np.int32)
  mask = np.zeros((len(sequences), width), np.int32)
  for row, seq in enumerate(sequences):
    ids[row, width - len(seq):] = seq
    mask[row, width - len(seq):] = 1
  return ids, mask


def generate(module: nnx.Module, prompt_ids, prompt_mask=None, *, max_new_tokens: int,
             rng: Array | int = 0, temperature: float = 0.0, top_k: int | None = None,
             top_p: float | None = None, stop_tokens: Sequence[int] = (),
             pad_id: int = 0) -> Generation:
  """:func:`sample` for a decoder module (jitted; compiled once per shape and settings).

  Each call reads the module's current weights (a few milliseconds in Python); to
  generate many times from the same weights, make a :func:`generator` once.

  Args:
    module: a :class:`kdjax.models.transformer.Decoder`.
    prompt_ids: ``[batch, P]`` left-padded ids (see :func:`left_pad`).
    prompt_mask: ``[batch, P]``; default: all ones.
    max_new_tokens: tokens to generate per row.
    rng: a PRNG key or an integer seed.
    temperature: 0 (default) for greedy decoding.
    top_k: optional top-k cut.
    top_p: optional nucleus cut.
    stop_tokens: ids that end a row.
    pad_id: the id after a row has stopped.

  Raises:
    UserError: a prompt plus ``max_new_tokens`` longer than the model's context, or
      meaningless sampling settings.
  """
  return generator(module, max_new_tokens=max_new_tokens, temperature=temperature,
                   top_k=top_k, top_p=top_p, stop_tokens=stop_tokens,
                   pad_id=pad_id)(prompt_ids, prompt_mask, rng)


def generator(module: nnx.Module, *, max_new_tokens: int, temperature: float = 0.0,
              top_k: int | None = None, top_p: float | None = None,
              stop_tokens: Sequence[int] = (), pad_id: int = 0
              ) -> Callable[..., Generation]:
  """``gen(prompt_ids, prompt_mask=None, rng=0) -> Generation``: :func:`generate` with
  the module's weights read once, now (a snapshot: after training the module, make a
  new generator). The settings are :func:`generate`'s.

  >>> from kdjax.models import create
  >>> m = create('llama', num_classes=11, input_shape=(8,), hidden_size=16, num_layers=1,
  ...            num_heads=2, num_kv_heads=1)
  >>> gen = generator(m, max_new_tokens=3)
  >>> ids, mask = left_pad([[5, 6], [7]])
  >>> g = gen(ids, mask)
  >>> g.tokens.shape, bool((g.tokens == generate(m, ids, mask, max_new_tokens=3).tokens).all())
  ((2, 3), True)

  Raises:
    UserError: meaningless sampling settings; when called, a prompt plus
      ``max_new_tokens`` longer than the model's context.
  """
  check_sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                 top_p=top_p)
  config = module.config
  view = nnx.view(module, deterministic=True, raise_if_not_found=False)
  graphdef, params, state = nnx.split(view, nnx.Param, ...)
  run = _compiled(graphdef, config, max_new_tokens, float(temperature), top_k,
                  None if top_p is None else float(top_p), tuple(int(t) for t in stop_tokens),
                  int(pad_id))

  def gen(prompt_ids, prompt_mask=None, rng: Array | int = 0) -> Generation:
    prompt_ids = jnp.asarray(prompt_ids, jnp.int32)
    if prompt_ids.ndim != 2:
      raise UserError(f'prompt_ids must be [batch, tokens], got shape {prompt_ids.shape}.')
    prompt_mask = (jnp.ones_like(prompt_ids) if prompt_mask is None
                   else jnp.asarray(prompt_mask, jnp.int32))
    check_context(prompt_ids.shape[1], max_new_tokens, config.max_positions)
    if isinstance(rng, (int, np.integer)):
      rng = jax.random.key(int(rng))
    return run(params, state, prompt_ids, prompt_mask, rng)

  return gen


@functools.lru_cache(maxsize=16)
def _compiled(graphdef, config, max_new_tokens, temperature, top_k, top_p, stop_tokens, pad_id):
  from kdjax.models import transformer

  def apply(params, state, x, **kwargs):
    return nnx.merge(graphdef, params, state)(x, **kwargs), state

  def init_cache(batch, length):
    return transformer.init_cache(config, batch, length)

  return jax.jit(functools.partial(
      sample, apply, init_cache=init_cache, max_new_tokens=max_new_tokens,
      temperature=temperature, top_k=top_k, top_p=top_p, stop_tokens=stop_tokens,
      pad_id=pad_id))
