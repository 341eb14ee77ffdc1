r"""The sampled teacher cache of a language model: per token, ``N`` draws from the teacher.

Random-Sampling KD (Anshumann et al. 2025): instead of the teacher's top-k classes, the
cache keeps, for every position with a target, ``N`` class ids drawn i.i.d. from a
proposal :math:`q \propto p^{1/\tau}` (:math:`p` the teacher's next-token distribution,
:math:`\tau` ``config.cache.proposal_temperature``, 1 by default: the teacher itself),
stored as the unique ids with their counts (:func:`kdjax.cache.codec.encode_samples`: the
sorted draws with Elias-Fano, a count being the run length of an id). The run's loss
(:func:`kdjax.losses.sampled_kd`) is the student's cross-entropy on the normalized
importance weights

.. math::

  \hat p_i = \frac{c_i\, p_i / q_i}{\sum_j c_j\, p_j / q_j}
  \qquad (\tau = 1:\ \hat p_i = c_i / N),

an unbiased estimate of the teacher (:math:`E[c_i/N] = p_i`) at :math:`\tau = 1`, so its
gradient is the full forward-KL gradient in expectation; a tempered proposal stores each
draw's log weight :math:`\log p - \log q` (up to a per-row constant) in
``kdjax.cache.codec.WEIGHT_BITS`` bits, and the self-normalized estimate is then only
consistent (biased at finite :math:`N`).

**Keys.** The uniforms of token ``t`` of sequence (row) ``n`` come from
``fold_in(fold_in(key(config.cache.seed), n), t)`` inside the jitted teacher inference
(inverse-CDF sampling of the proposal): a pure function of the seed, the sequence id and
the position, so a rebuilt or resumed cache holds the same bits whatever was computed
before.

**Layout.** A chunk of rows ``[s, t)`` holds ``indices`` (and, tempered, ``weights``),
``uint8 [t - s, T, nbytes]``; one token costs exactly
:func:`kdjax.cache.codec.sample_bytes_per_token` bytes (``kdjax cache inspect`` reports
it). Padding positions are zero bytes, as in :mod:`kdjax.cache.tokens`; every loss masks
them. The batch gets ``teacher_sample_indices [B, T, N]`` (sorted, repeats kept) and
``teacher_sample_weights [B, T, N]`` (they sum to one per token; ``1/N`` each at
:math:`\tau = 1`).

Built, checked, resumed and read with the code of :mod:`kdjax.cache.tokens` and
:mod:`kdjax.cache.build`: the same manifest, plan, chunk checksums and refusals (another
teacher, data, or ``config.cache`` settings: mode, samples, proposal temperature, seed).

References:
  Anshumann, Zaidi, Kedia, Ahn, Kwon, Lee, Lee, Lee. Sparse Logit Sampling: Accelerating
  Knowledge Distillation in LLMs. ACL 2025. arXiv:2503.16870 (Random-Sampling KD; no
  code of the authors was public to transcribe from: github.com/akhilkedia/RandomSamplingKD
  holds the poster and a README only).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import teacher as teacher_lib
from kdjax.cache import codec as codec_lib
from kdjax.cache import read
from kdjax.cache.settings import check_config_settings
from kdjax.cache.tokens import TokenCache
from kdjax.errors import UserError

KIND = 'sampled'
SETTINGS = ('mode', 'samples', 'proposal_temperature', 'seed')
NEEDS = ('teacher_sample_indices', 'teacher_sample_weights')


def token_keys(seed, ids, length: int):
  """Per-token PRNG keys ``[b, length]``: ``fold_in(fold_in(key(seed), id), position)``.

  >>> k = token_keys(0, jnp.array([3, 5]), 4)
  >>> k.shape, bool(jnp.all(jax.random.key_data(k[1, 2]) ==
  ...                        jax.random.key_data(token_keys(0, jnp.array([5]), 3)[0, 2])))
  ((2, 4), True)
  """
  base = jax.random.key(seed)
  positions = jnp.arange(length, dtype=jnp.uint32)
  row = jax.vmap(lambda i: jax.random.fold_in(base, i))(jnp.asarray(ids).astype(jnp.uint32))
  return jax.vmap(lambda k: jax.vmap(lambda t: jax.random.fold_in(k, t))(positions))(row)


def sample_tokens(logits, keys, *, samples: int, proposal_temperature: float = 1.0):
  r"""``samples`` i.i.d. draws per token from ``softmax(logits / proposal_temperature)``.

  Inverse-CDF sampling: ``samples`` uniforms of each token's key against the proposal's
  cumulative sum (a binary search; no ``[..., samples, vocab]`` array).

  Args:
    logits: ``[..., vocab]`` teacher logits (float32).
    keys: ``[...]`` PRNG keys, one per token (:func:`token_keys`).
    samples: draws per token.
    proposal_temperature: :math:`\tau > 0`.

  Returns:
    ``(draws int32 [..., samples], log_weights float32 [..., samples])``: the log
    importance weights :math:`\log p - \log q` of the draws up to a per-token constant,
    :math:`(1 - 1/\tau) z` (zeros at :math:`\tau = 1`).

  >>> z = jnp.array([[0.0, -1e9, 0.0]])
  >>> x, _ = sample_tokens(z, token_keys(0, jnp.arange(1), 1)[0], samples=64)
  >>> sorted(set(x.ravel().tolist()))
  [0, 2]
  """
  t = float(proposal_temperature)
  log_q = jax.nn.log_softmax(logits / t, axis=-1)
  cdf = jnp.cumsum(jnp.exp(log_q), axis=-1)
  lead = logits.shape[:-1]
  flat_keys = keys.reshape(-1)
  u = jax.vmap(lambda k: jax.random.uniform(k, (samples,), jnp.float32))(flat_keys)
  cdf = cdf.reshape(-1, cdf.shape[-1])
  u = u * cdf[:, -1:]                      # within the rounded total mass
  draws = jax.vmap(lambda c, v: jnp.searchsorted(c, v, side='right'))(cdf, u)
  draws = jnp.minimum(draws, logits.shape[-1] - 1).astype(jnp.int32).reshape(lead + (samples,))
  if t == 1.0:
    return draws, jnp.zeros(draws.shape, jnp.float32)
  log_w = (1.0 - 1.0 / t) * jnp.take_along_axis(logits, draws, axis=-1)
  return draws, log_w


def make_sample_infer(apply, *, samples: int, proposal_temperature: float, seed: int):
  """``infer(variables, x, mask, ids, model_inputs) -> (draws, log_weights)`` (pure; jit it).

  ``x`` ``[b, T]`` ids, ``mask`` ``[b, T]``, ``ids`` ``[b]`` the rows' sequence ids in the
  split (they key the draws), ``model_inputs`` the model's other inputs (``segment_ids``,
  ``positions``). Positions with ``mask`` 0 are drawn from zero logits (never stored).
  """

  def infer(variables, x, mask, ids, model_inputs):
    out = teacher_lib.outputs(apply, variables, x, needs=('teacher_logits',), **model_inputs)
    logits = out['teacher_logits'].astype(jnp.float32)
    logits = jnp.where(mask[..., None], logits, 0.0)
    keys = token_keys(seed, ids, x.shape[1])
    return sample_tokens(logits, keys, samples=samples, proposal_temperature=proposal_temperature)

  return infer


def encode_rows(draws, log_weights, mask, *, vocab_size: int, weighted: bool
                ) -> dict[str, np.ndarray]:
  """Draws ``[b, T, N]`` -> the sampled arrays ``uint8 [b, T, nbytes]``, zero bytes where
  ``mask`` is 0 (numpy)."""
  enc = codec_lib.encode_samples(draws, vocab_size=vocab_size,
                                 log_weights=log_weights if weighted else None)
  keep = np.asarray(mask, bool)[..., None]
  return {key: np.where(keep, a, np.uint8(0)) for key, a in enc.items()}


def decode_rows(encoded: dict, *, samples: int, vocab_size: int, weighted: bool) -> dict:
  """The sampled arrays ``[..., nbytes]`` -> ``teacher_sample_indices`` and
  ``teacher_sample_weights`` ``[..., N]`` (jittable).

  >>> enc = encode_rows(np.array([[[2, 0, 2]]]), None, [[True]], vocab_size=4, weighted=False)
  >>> out = decode_rows(enc, samples=3, vocab_size=4, weighted=False)
  >>> out['teacher_sample_indices'].tolist()
  [[[0, 2, 2]]]
  """
  idx, w = codec_lib.decode_samples(encoded, samples=samples, vocab_size=vocab_size,
                                    weighted=weighted)
  return {'teacher_sample_indices': idx, 'teacher_sample_weights': w}


class SampledCache(TokenCache):
  """A finished sampled cache opened for a run: :class:`~kdjax.cache.tokens.TokenCache`'s
  columns, join, readers and dataset checks, with this kind's rows and checks."""

  @property
  def dense(self) -> bool:
    return False

  @property
  def weighted(self) -> bool:
    return 'weights' in self.manifest['arrays']

  def check(self, config, *, num_classes: int, needs) -> None:
    """Raises a one-line ``UserError`` when the cache cannot feed this run."""
    m, where = self.manifest, f'the teacher cache {self.cache_dir}'
    read.check_source(m, config, num_classes=num_classes, cache_dir=self.cache_dir,
                      teacher_fingerprint=self.teacher_fingerprint)
    check_config_settings(m, config, self.cache_dir, SETTINGS)
    other = sorted(set(needs) - set(NEEDS) - {'student_logits', 'student_features',
                                              'student_attentions', 'labels'})
    other = [key for key in other if key.startswith('teacher_')]
    if other:
      raise UserError(f"{where} stores {m['samples']} sampled classes per token, but the loss "
                      f'needs {", ".join(other)}; use sampled_kd (or build a top-k cache for '
                      'the sparse losses, or use the live teacher)')

  def decode(self, encoded: dict, *, dense: bool | None = None) -> dict:
    del dense
    m = self.manifest
    return decode_rows(encoded, samples=m['samples'], vocab_size=m['num_classes'],
                       weighted=self.weighted)
