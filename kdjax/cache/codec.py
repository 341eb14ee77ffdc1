r"""Compact codecs for top-k teacher rows: the cache's bytes per token, and what they cost.

A cache row (one example, or one token of a language model) is the teacher's top-k
logits ``[..., k]``, their classes ``[..., k]`` and the log-sum-exp of all its logits
``[...]`` (see ``kdjax.losses.sparse``). A codec turns rows into three ``uint8`` arrays
with the rows' leading shape and a byte axis last (``encode``, numpy, on the host) and
back (``decode``, ``jax.numpy``, jittable inside the train step).

**Names.** ``'VALUES+INDICES'``, e.g. ``'int4+ef'``, ``'f32+i32'``:

==============  =====================================================================
values          stored per row
==============  =====================================================================
``f32``         the raw logits as float32 (4 bytes each) + the log-sum-exp as float32
``bf16 f16``    the raw logits as bfloat16 / float16 (2 bytes each) + the float32 lse
``int2..int8``  gaps to the top-1 logit, b bits each, on a per-row uniform grid of step
                ``s`` (a float16, 2 bytes) + the tail (2 bytes, below)
``log2..log4``  gaps to the top-1 logit, b bits each, on one fixed non-uniform grid
                (no per-row scale) + the tail (2 bytes)
==============  =====================================================================

==========  =========================================================================
indices     stored per row
==========  =========================================================================
``i32``     int32, 4 bytes each
``i16``     uint16, 2 bytes each (vocabularies of at most 65536 classes)
``packed``  ``ceil(log2 vocab)`` bits each, packed across byte boundaries
``ef``      Elias-Fano: the classes sorted, ``l`` low bits each plus the high parts in
            unary, ``k·l + k + ((vocab - 1) >> l)`` bits (``l`` minimizes it): about
            ``2 + log2(vocab / k)`` bits per class, a fixed size per row
==========  =========================================================================

Every array is padded to whole bytes per row, so a row stays one fixed-size record
(``bytes_per_token`` counts it exactly; ``layout`` splits it per array).

**What is kept.** The sparse losses read a row only through the teacher's
log-probabilities :math:`\log p_i = z_i - \mathrm{lse}` of its top-k classes and the
tail mass :math:`r = 1 - \sum_i p_i` (spread over the other classes, or dropped, by
their ``missing_mass`` mode); both are invariant to adding one constant to a row's
logits and its log-sum-exp, at any temperature. The ``int`` and ``log`` codecs
therefore keep the gaps :math:`g_i = z_1 - z_i \ge 0` to the largest logit
:math:`z_1` (0 for the top class, not stored unless the indices are ``ef``) and the
log of the tail's mass relative to the top class,
:math:`\rho = \log \sum_{j \notin \mathrm{top}k} e^{z_j - z_1}`, as a 16-bit fixed-point
number of step :math:`2^{-9}` in :math:`[-64, 64)` (``-inf``, no tail, when ``k`` is
the vocabulary or the tail is below the float32 log-sum-exp's resolution). They
decode :math:`z'_i = -g'_i` and :math:`\mathrm{lse}' = \log(\sum_i e^{-g'_i} +
e^{\rho'})`: the logits come back shifted by :math:`-z_1` (losses that read raw logit
values, such as a logit MSE, need a float codec) and the tail is always a valid
mass. Storing :math:`\rho` rather than :math:`\mathrm{lse} - z_1` was measured: with
the latter, rounded gaps can make the top-k sum exceed the stored total, and a
small tail then decodes as none (mean KL 10-30x larger at the same bits).

**Error bounds** (:math:`d_i = \log p_i - \log p'_i`, over the top-k classes and the
tail). With :math:`\delta_i = g'_i - g_i` and :math:`\epsilon = \rho' - \rho`,
:math:`d_i = \delta_i + c` and :math:`d_\mathrm{tail} = -\epsilon + c` for one
per-row constant :math:`c` (the change of the normalizer). Both distributions sum to
one, so :math:`\min d \le 0 \le \max d` and, by Hoeffding's lemma applied to
:math:`\log E_p[e^{-d}] = 0`,

.. math::

  |d_i| \le \Delta, \qquad \mathrm{KL}(p\,\|\,p') = E_p[d] \le \Delta^2 / 8, \qquad
  \Delta = \max(\delta, -\epsilon) - \min(\delta, -\epsilon).

* ``intB``: a gap within the row's range :math:`(2^B - 1)s` is off by at most
  :math:`s/2`, and :math:`|\epsilon| \le 2^{-10}`, so a row none of whose gaps exceeds
  the range has :math:`\Delta \le s + 2^{-10}`. The encoder tries the steps
  :math:`s = f\,s_0`, :math:`f \in \{1, 0.9, \dots, 0.3\}` (each rounded up to a
  float16), where :math:`s_0` covers the largest gap, and keeps the one of least KL;
  larger gaps then decode at the range's end. Hence always
  :math:`\mathrm{KL} \le (s_0 + 2^{-10})^2 / 8`.
* ``logB``: codes are uniform in :math:`u = e^{-g/\gamma}` over
  :math:`[e^{-G/\gamma}, 1]` (``LOG_GAMMA``, ``LOG_RANGE``); a gap up to :math:`G` is
  off by at most :math:`h_B` (the widest half cell, in nats: 0.45, 0.62 and 1.37 for
  B = 4, 3, 2, at the far end of the grid), and larger gaps decode at :math:`G`. A row
  whose gaps all lie within :math:`G` has :math:`\Delta \le 2h_B + 2^{-10}`.
* ``bf16``/``f16`` round raw logits (relative error :math:`2^{-9}`, :math:`2^{-11}`):
  at logits of 16-32 up to 0.06 / 0.008 nats per class, more than ``int8`` loses. And
  as the rounded top-k probabilities are not checked against the stored log-sum-exp,
  they can sum past one; a small tail then reads as none and the ``'uniform'`` KL
  jumps (measured: max KL above 1 nat with ``bf16``). This holds for the cache's
  existing ``bfloat16`` dtype too.

**Measured** on LM-like logits (``lm_like_logits``: entropy 1-4 nats, Zipf tail; 256
rows; ``python -c 'import kdjax.cache as c; c.codec_report()'`` prints the whole
table). At k = 32 of 32000 classes the mean KL from the exact top-k row (``'uniform'``
tail) to the decoded one is 4.3e-2, 9.2e-3, 2.3e-3 and 1e-5 nats for ``int2``,
``int3``, ``int4``, ``int8`` (about 4x per bit); the classes left out cost far more:
the KL from the full teacher to its exact top-k row is 0.91, 0.32 and 0.11 nats at
k = 8, 32, 128. So at a fixed byte budget more classes with fewer bits win, and
``ef`` indices buy the most classes: within 64 bytes per token, 32000 classes,
``log3+ef`` keeps k = 33 (full KL 0.322), ``int3+ef`` k = 32 (0.325), ``int4+ef`` k = 29
(0.342), ``int4+packed`` only k = 25 (0.381); ``f32+i32`` needs 260 bytes for k = 32
(0.316). The raw float codecs lose more than ``int4`` once the tail matters
(``f16+packed``, k = 32: mean KL 2.9e-3, max 0.15; ``bf16``: 7e-2, max 2.3).

References:
  Elias. Efficient Storage and Retrieval by Content and Address of Static Files.
  J. ACM 21(2), 1974. Fano. On the Number of Bits Required to Implement an
  Associative Memory. MIT Project MAC Memo 61, 1971.
  Hoeffding. Probability Inequalities for Sums of Bounded Random Variables.
  JASA 58, 1963 (the lemma :math:`\log E e^{\lambda X} \le \lambda E X +
  \lambda^2 (b - a)^2 / 8`).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.errors import UserError

INDEX_FORMATS = ('i32', 'i16', 'packed', 'ef')
FLOAT_VALUES = ('f32', 'bf16', 'f16')
INT_BITS = range(2, 9)
LOG_BITS = (2, 3, 4)
VALUE_FORMATS = (FLOAT_VALUES + tuple(f'int{b}' for b in reversed(INT_BITS))
                 + tuple(f'log{b}' for b in reversed(LOG_BITS)))
PARTS = ('values', 'indices', 'stats')

# The fixed log-domain grid: codes uniform in u = exp(-gap / LOG_GAMMA) over
# [exp(-LOG_RANGE[b] / LOG_GAMMA), 1]. Chosen by the KL they give on LM-like logits
# (k = 16..64, vocabularies 2048 and 32000; G from 4..16, gamma from 2..inf tried).
LOG_GAMMA = 8.0
LOG_RANGE = {2: 6.0, 3: 6.0, 4: 8.0}

TAIL_STEP = 2.0**-9           # the fixed-point step of rho (|error| <= TAIL_STEP / 2)
_TAIL_NONE = -32768           # the code of rho = -inf (no tail)
_SCALE_FACTORS = (1.0, 0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3)
_MAX_WIDTH = 31               # values fit an int32
_F16_MAX = 65504.0
_EF_COUNT_MAX = 1 << 16      # ef rows with k * (unary bits) above it decode by a scatter


class CodecError(UserError, ValueError):
  """Rows or encoded arrays a codec cannot take (a ``UserError`` and a ``ValueError``)."""


class Codec(NamedTuple):
  """A codec: how the values and how the indices of a row are stored.

  Attributes:
    values: one of ``VALUE_FORMATS``.
    indices: one of ``INDEX_FORMATS``.
  """

  values: str
  indices: str

  @property
  def name(self) -> str:
    return f'{self.values}+{self.indices}'

  @property
  def kind(self) -> str:
    """``'float'`` (raw logits), ``'int'`` (per-row step) or ``'log'`` (fixed grid)."""
    return 'float' if self.values in FLOAT_VALUES else self.values[:3]

  @property
  def bits(self) -> int:
    """Bits per stored value."""
    if self.kind == 'float':
      return 32 if self.values == 'f32' else 16
    return int(self.values[3:])


def parse_codec(spec: str | Codec) -> Codec:
  """``'VALUES+INDICES'`` (or a ``Codec``) -> ``Codec``.

  >>> parse_codec('int4+ef')
  Codec(values='int4', indices='ef')
  """
  if isinstance(spec, Codec):
    values, indices = spec
  else:
    m = re.fullmatch(r'\s*([a-z0-9]+)\s*\+\s*([a-z0-9]+)\s*', str(spec))
    if m is None:
      raise CodecError(f"a codec is named 'VALUES+INDICES', e.g. 'int4+ef' (got {spec!r})")
    values, indices = m.groups()
  if values not in VALUE_FORMATS:
    raise CodecError(f'codec values must be one of {", ".join(VALUE_FORMATS)} (got {values!r})')
  if indices not in INDEX_FORMATS:
    raise CodecError(f'codec indices must be one of {", ".join(INDEX_FORMATS)} '
                     f'(got {indices!r})')
  return Codec(values, indices)


# --------------------------------------------------------------------------- bit packing


def _check_width(width: int) -> int:
  if isinstance(width, bool) or not isinstance(width, (int, np.integer)) or not (
      1 <= width <= _MAX_WIDTH):
    raise CodecError(f'bit width must be an integer in [1, {_MAX_WIDTH}] (got {width!r})')
  return int(width)


def _bits(values: np.ndarray, width: int) -> np.ndarray:
  """``[..., n]`` integers -> ``[..., n * width]`` 0/1 bits, least significant first."""
  v = values.astype(np.uint64)
  bits = (v[..., None] >> np.arange(width, dtype=np.uint64)) & np.uint64(1)
  return bits.astype(np.uint8).reshape(*v.shape[:-1], v.shape[-1] * width)


def _pack(bits: np.ndarray) -> np.ndarray:
  return np.packbits(bits, axis=-1, bitorder='little')


def pack_bits(values, width: int) -> np.ndarray:
  """Packs ``[..., n]`` integers in ``[0, 2**width)`` into ``[..., ceil(n*width/8)]`` bytes.

  Value ``i`` takes bits ``i*width .. i*width + width - 1`` of the row's bit string,
  least significant bit first; bit ``j`` is bit ``j % 8`` of byte ``j // 8``. Numpy,
  vectorized; ``unpack_bits`` is the inverse.

  Args:
    values: integer array ``[..., n]``.
    width: bits per value, 1 to 31.

  Returns:
    ``uint8 [..., ceil(n * width / 8)]``, the leading shape kept.

  >>> pack_bits([5, 3], 3)  # 101 then 110, low bit first: 0b011101
  array([29], dtype=uint8)
  """
  width = _check_width(width)
  v = np.asarray(values)
  if v.ndim == 0 or not np.issubdtype(v.dtype, np.integer):
    raise CodecError(f'pack_bits needs an integer array [..., n] (got {v.dtype} {v.shape})')
  if v.size and (v.min() < 0 or v.max() >= (1 << width)):
    raise CodecError(f'values to pack in {width} bits must be in [0, {1 << width}) '
                     f'(got [{v.min()}, {v.max()}])')
  return _pack(_bits(v, width))


def unpack_bits(packed, width: int, count: int, *, offset: int = 0) -> jax.Array:
  """``count`` values of ``width`` bits from bit ``offset`` of each row (``pack_bits``'s layout).

  ``jax.numpy`` with shifts, masks and static reshapes (no loop over values, no
  gather): jittable, and callable on numpy arrays.

  Args:
    packed: ``uint8 [..., nbytes]``.
    width: bits per value, 1 to 31.
    count: values to read.
    offset: the bit where the first value starts.

  Returns:
    ``int32 [..., count]``.

  >>> unpack_bits(pack_bits([5, 3], 3), 3, 2).tolist()
  [5, 3]
  """
  width = _check_width(width)
  packed = jnp.asarray(packed)
  if packed.ndim == 0 or packed.dtype != jnp.uint8:
    raise CodecError(f'unpack_bits needs uint8 bytes [..., nbytes] (got {packed.dtype} '
                     f'{packed.shape})')
  if packed.shape[-1] * 8 < offset + count * width:
    raise CodecError(f'{count} values of {width} bits from bit {offset} need '
                     f'{offset + count * width} bits; the rows have {packed.shape[-1] * 8}')
  if count == 0:
    return jnp.zeros(packed.shape[:-1] + (0,), jnp.int32)
  # Bits by shifts and static reshapes only (no gather): cheap to compile, elementwise on device.
  lead = packed.shape[:-1]
  bits = (packed[..., None] >> np.arange(8, dtype=np.uint8)) & np.uint8(1)
  bits = bits.reshape(lead + (-1,))[..., offset:offset + count * width]
  bits = bits.reshape(lead + (count, width)).astype(jnp.int32)
  return jnp.sum(bits << np.arange(width, dtype=np.int32), axis=-1, dtype=jnp.int32)


def _le_bytes(a: np.ndarray, dtype: str) -> np.ndarray:
  """``[..., n]`` -> ``uint8 [..., n * itemsize]``, little-endian ``dtype``."""
  a = np.ascontiguousarray(a.astype(dtype))
  return a.view(np.uint8).reshape(*a.shape[:-1], a.shape[-1] * a.dtype.itemsize)


def _from_le(b: jax.Array, dtype) -> jax.Array:
  """``uint8 [..., n * size]`` -> ``dtype [..., n]`` (little-endian, 2 or 4 bytes each)."""
  size = jnp.dtype(dtype).itemsize
  word_t = jnp.uint16 if size == 2 else jnp.uint32
  b = b.reshape(*b.shape[:-1], b.shape[-1] // size, size).astype(word_t)
  word = jnp.sum(b << (8 * np.arange(size)).astype(word_t), axis=-1, dtype=word_t)
  return jax.lax.bitcast_convert_type(word, dtype)


# --------------------------------------------------------------------------- sizes


def _index_width(vocab_size: int) -> int:
  return max(1, (int(vocab_size) - 1).bit_length())       # ceil(log2 vocab), at least 1


def _ef_params(k: int, vocab_size: int) -> tuple[int, int]:
  """``(l, upper bits)`` of Elias-Fano for ``k`` classes below ``vocab_size``."""
  best = min(range(_index_width(vocab_size) + 1),
             key=lambda l: (k * l + ((vocab_size - 1) >> l), l))
  return best, k + ((vocab_size - 1) >> best)


def _check_sizes(codec: Codec, k: int, vocab_size: int) -> None:
  for name, v in (('k', k), ('vocab_size', vocab_size)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise CodecError(f'{name} must be a positive integer (got {v!r})')
  if k > vocab_size:
    raise CodecError(f'k = {k} exceeds the vocabulary ({vocab_size} classes); use k <= '
                     f'{vocab_size}')
  if codec.indices == 'i16' and vocab_size > 1 << 16:
    raise CodecError(f"'i16' indices hold at most 65536 classes (got {vocab_size}); use "
                     "'packed' or 'ef'")
  if codec.indices == 'i32' and vocab_size > 2**31:
    raise CodecError(f"'i32' indices hold at most 2**31 classes (got {vocab_size})")
  if codec.indices in ('packed', 'ef') and vocab_size > 1 << _MAX_WIDTH:
    raise CodecError(f"'{codec.indices}' indices hold at most 2**{_MAX_WIDTH} classes "
                     f"(got {vocab_size}); use 'i32'")


def _stored_values(codec: Codec, k: int) -> int:
  """Values stored per row: the top-1 gap (0) is implicit unless rows are in index order."""
  return k if codec.kind == 'float' or codec.indices == 'ef' else k - 1


def layout(codec: str | Codec, k: int, vocab_size: int) -> dict[str, int]:
  """Bytes per row of each encoded array (``'values'``, ``'indices'``, ``'stats'``).

  >>> layout('int4+ef', 32, 32000)
  {'values': 16, 'indices': 48, 'stats': 4}
  """
  codec = parse_codec(codec)
  _check_sizes(codec, k, vocab_size)
  m = _stored_values(codec, k)
  values = m * codec.bits // 8 if codec.kind == 'float' else -(-m * codec.bits // 8)
  if codec.indices == 'i32':
    indices = 4 * k
  elif codec.indices == 'i16':
    indices = 2 * k
  elif codec.indices == 'packed':
    indices = -(-k * _index_width(vocab_size) // 8)
  else:
    l, upper = _ef_params(k, vocab_size)
    indices = -(-(k * l + upper) // 8)
  stats = {'float': 4, 'int': 4, 'log': 2}[codec.kind]
  return {'values': values, 'indices': indices, 'stats': stats}


def bytes_per_token(codec: str | Codec, k: int, vocab_size: int) -> float:
  """Every stored byte of one row (token): values, indices, scale, tail or log-sum-exp.

  >>> bytes_per_token('int4+ef', 32, 32000), bytes_per_token('f32+i32', 128, 32000)
  (68.0, 1028.0)
  """
  return float(sum(layout(codec, k, vocab_size).values()))


# --------------------------------------------------------------------------- encode


def _f16_up(x: np.ndarray) -> np.ndarray:
  """The smallest float16 >= ``x`` (>= 0), as float64; 0 -> 1, above the range -> max."""
  x = np.minimum(x, _F16_MAX)
  h = x.astype(np.float16)
  low = h.astype(np.float64) < x
  h[low] = np.nextafter(h[low], np.float16(np.inf))
  return np.where(h > 0, h.astype(np.float64), 1.0)


def log_levels(bits: int) -> np.ndarray:
  """The gaps (nats) the ``log{bits}`` codes 0..2**bits-1 decode to, increasing from 0.

  >>> log_levels(2).round(3).tolist()
  [0.0, 1.547, 3.468, 6.0]
  """
  top = (1 << bits) - 1
  u_min = math.exp(-LOG_RANGE[bits] / LOG_GAMMA)
  u = u_min + (top - np.arange(top + 1)) / top * (1.0 - u_min)
  return np.maximum(-LOG_GAMMA * np.log(u), 0.0)


def _log_codes(g: np.ndarray, bits: int) -> np.ndarray:
  top = (1 << bits) - 1
  u_min = math.exp(-LOG_RANGE[bits] / LOG_GAMMA)
  u = np.exp(-np.minimum(g, LOG_RANGE[bits]) / LOG_GAMMA)
  return top - np.clip(np.rint((u - u_min) / (1.0 - u_min) * top), 0, top).astype(np.int64)


def _tail_codes(rho: np.ndarray) -> np.ndarray:
  none = np.isneginf(rho)
  codes = np.clip(np.rint(np.where(none, 0.0, rho) / TAIL_STEP), -32767, 32767)
  return np.where(none, _TAIL_NONE, codes).astype(np.int16)


def _tail_values(codes: np.ndarray) -> np.ndarray:
  return np.where(codes == _TAIL_NONE, -np.inf, codes.astype(np.float64) * TAIL_STEP)


def _kl_rows(g, rho, g_hat, rho_hat) -> np.ndarray:
  """KL(exact || decoded) per row from gaps and tails (float64, 'uniform' tail)."""
  lam = np.logaddexp(np.log(np.sum(np.exp(-g), -1)), rho)
  lam_hat = np.logaddexp(np.log(np.sum(np.exp(-g_hat), -1)), rho_hat)
  d = (g_hat - g) + (lam_hat - lam)[:, None]
  kl = np.sum(np.exp(-g - lam[:, None]) * d, -1)
  has_tail = np.isfinite(rho)
  rho, rho_hat = np.where(has_tail, rho, 0.0), np.where(has_tail, rho_hat, 0.0)
  r = np.where(has_tail, np.exp(rho - lam), 0.0)
  d_tail = (rho - rho_hat) + (lam_hat - lam)
  return kl + r * d_tail


def _int_codes(g: np.ndarray, rho: np.ndarray, rho_hat: np.ndarray, bits: int):
  """Per-row step (float16 values, float64) and codes of least KL among the candidates."""
  top = (1 << bits) - 1
  g_max = g.max(-1)
  best_scale = best_codes = best_kl = None
  for f in _SCALE_FACTORS:
    scale = _f16_up(g_max * f / top)
    codes = np.clip(np.rint(g / scale[:, None]), 0, top)
    kl = _kl_rows(g, rho, codes * scale[:, None], rho_hat)
    if best_kl is None:
      best_scale, best_codes, best_kl = scale, codes, kl
    else:
      better = kl < best_kl
      best_scale = np.where(better, scale, best_scale)
      best_codes = np.where(better[:, None], codes, best_codes)
      best_kl = np.where(better, kl, best_kl)
  return best_scale, best_codes.astype(np.int64)


def _ef_encode(idx: np.ndarray, k: int, vocab_size: int) -> np.ndarray:
  l, upper = _ef_params(k, vocab_size)
  rows = idx.shape[0]
  high = (idx >> l) + np.arange(k)
  unary = np.zeros((rows, upper), np.uint8)
  np.put_along_axis(unary, high, 1, axis=-1)
  low = _bits(idx & ((1 << l) - 1), l) if l else np.zeros((rows, 0), np.uint8)
  return _pack(np.concatenate([low, unary], -1))


def _check_rows(z, idx, lse, codec: Codec, vocab_size: int) -> None:
  if z.ndim == 0 or z.shape != idx.shape or lse.shape != z.shape[:-1]:
    raise CodecError(f'top-k logits {z.shape} and indices {idx.shape} must be [..., k] and '
                     f'the log-sum-exp {lse.shape} their leading shape')
  _check_sizes(codec, z.shape[-1], vocab_size)
  if not np.issubdtype(idx.dtype, np.integer):
    raise CodecError(f'top-k indices must be integers (got {idx.dtype})')
  if idx.size and (idx.min() < 0 or idx.max() >= vocab_size):
    raise CodecError(f'top-k indices must lie in [0, {vocab_size}) (got [{idx.min()}, '
                     f'{idx.max()}]); pass the vocabulary size the teacher predicts')
  if np.isnan(z).any() or np.isnan(lse).any():
    raise CodecError('the teacher rows hold NaN; check the teacher outputs')
  if codec.kind != 'float' and not (np.isfinite(z).all() and np.isfinite(lse).all()):
    raise CodecError(f'{codec.values!r} stores gaps between finite logits, but the rows hold '
                     'infinite ones; use a float codec or a smaller k')


def encode(topk_logits, topk_indices, logsumexp, *, codec: str | Codec,
           vocab_size: int) -> dict[str, np.ndarray]:
  """Top-k rows -> ``{'values', 'indices', 'stats'}``, each ``uint8 [..., bytes]``.

  Numpy, vectorized over rows. The row order of the decoded entries: as given
  (float values, non-``ef`` indices), by decreasing value (``int``/``log`` values,
  non-``ef`` indices; the top-1 gap is then implicit) or by increasing class (``ef``).
  The sparse losses do not depend on it.

  Args:
    topk_logits: ``[..., k]`` teacher logits (any order).
    topk_indices: ``[..., k]`` their classes, in ``[0, vocab_size)``.
    logsumexp: ``[...]`` log-sum-exp of all the teacher's logits (T = 1).
    codec: ``'VALUES+INDICES'`` (see the module docstring) or a ``Codec``.
    vocab_size: classes the teacher predicts.

  Returns:
    The three byte arrays, with the rows' leading shape; ``layout`` gives their sizes.

  >>> enc = encode([[2.0, 0.5, -1.0]], [[7, 1, 4]], [2.3], codec='f32+i32', vocab_size=9)
  >>> {key: a.shape for key, a in enc.items()}
  {'values': (1, 12), 'indices': (1, 12), 'stats': (1, 4)}
  """
  codec = parse_codec(codec)
  z, idx, lse = np.asarray(topk_logits), np.asarray(topk_indices), np.asarray(logsumexp)
  _check_rows(z, idx, lse, codec, vocab_size)
  lead, k = z.shape[:-1], z.shape[-1]
  z = z.astype(np.float32).reshape(-1, k)
  idx = idx.astype(np.int64).reshape(-1, k)
  lse = lse.astype(np.float32).reshape(-1)
  if codec.indices == 'ef':
    order = np.argsort(idx, axis=-1, kind='stable')
  elif codec.kind != 'float':
    order = np.argsort(-z, axis=-1, kind='stable')
  else:
    order = None
  if order is not None:
    z, idx = np.take_along_axis(z, order, -1), np.take_along_axis(idx, order, -1)

  if codec.indices == 'i32':
    indices = _le_bytes(idx, '<i4')
  elif codec.indices == 'i16':
    indices = _le_bytes(idx, '<u2')
  elif codec.indices == 'packed':
    indices = _pack(_bits(idx, _index_width(vocab_size)))
  else:
    indices = _ef_encode(idx, k, vocab_size)

  if codec.kind == 'float':
    if codec.values == 'bf16':
      import ml_dtypes
      values = _le_bytes(z.astype(ml_dtypes.bfloat16).view(np.uint16), '<u2')
    else:
      values = _le_bytes(z, '<f4' if codec.values == 'f32' else '<f2')
    stats = _le_bytes(lse[:, None], '<f4')
  else:
    z64 = z.astype(np.float64)
    top = z64.max(-1, keepdims=True)
    g = top - z64
    if k == vocab_size:
      rho = np.full(len(g), -np.inf)
    else:
      with np.errstate(divide='ignore'):
        tail = np.exp(lse.astype(np.float64) - top[:, 0]) - np.sum(np.exp(-g), -1)
        rho = np.where(tail > 0, np.log(np.maximum(tail, 1e-300)), -np.inf)
    tail_codes = _tail_codes(rho)
    if codec.kind == 'int':
      scale, codes = _int_codes(g, rho, _tail_values(tail_codes), codec.bits)
      stats = np.concatenate([_le_bytes(scale[:, None].astype(np.float16), '<f2'),
                              _le_bytes(tail_codes[:, None], '<i2')], -1)
    else:
      codes = _log_codes(g, codec.bits)
      stats = _le_bytes(tail_codes[:, None], '<i2')
    if codec.indices != 'ef':
      codes = codes[:, 1:]
    values = _pack(_bits(codes, codec.bits))
  out = {'values': values, 'indices': indices, 'stats': stats}
  return {key: a.reshape(*lead, a.shape[-1]) for key, a in out.items()}


# --------------------------------------------------------------------------- decode


def _ef_decode(b: jax.Array, k: int, vocab_size: int) -> jax.Array:
  l, upper = _ef_params(k, vocab_size)
  lead = b.shape[:-1]
  low = unpack_bits(b, l, k) if l else jnp.zeros(lead + (k,), jnp.int32)
  unary = unpack_bits(b, 1, upper, offset=k * l)
  # The (i+1)-th set bit sits at high_i + i; the positions before it are those j whose
  # running count of set bits is at most i.
  if k * upper <= _EF_COUNT_MAX:
    # Count them (no scatter, no sort). The running count is a matmul with a triangle of
    # ones: exact at any matmul precision (0/1 inputs, counts below 2**24), and it
    # compiles faster than a cumsum on the CPU.
    triangle = np.triu(np.ones((upper, upper), np.float32))
    ones = jnp.matmul(unary.astype(jnp.float32), triangle,
                      precision=jax.lax.Precision.HIGHEST).astype(jnp.int32)
    pos = jnp.sum(ones[..., None, :] <= jnp.arange(k, dtype=jnp.int32)[:, None], axis=-1,
                  dtype=jnp.int32)
  else:
    # Long rows (k near the vocabulary): scatter each set bit's position to its rank.
    flat = unary.reshape(-1, upper)
    rank = jnp.where(flat == 1, jnp.cumsum(flat, axis=-1) - 1, k)
    rows = jnp.arange(flat.shape[0])[:, None]
    pos = jnp.zeros((flat.shape[0], k), jnp.int32).at[rows, rank].set(
        jnp.broadcast_to(jnp.arange(upper, dtype=jnp.int32), flat.shape), mode='drop')
    pos = pos.reshape(lead + (k,))
  high = pos - jnp.arange(k, dtype=jnp.int32)
  return (high << l) | low


def decode(encoded: dict[str, Any], *, codec: str | Codec, k: int,
           vocab_size: int) -> tuple[jax.Array, jax.Array, jax.Array]:
  """``encode``'s arrays -> ``(topk_logits float32, topk_indices int32, logsumexp float32)``.

  ``jax.numpy`` (bits unpacked by shifts, masks and static reshapes), jitted with
  ``codec``, ``k`` and ``vocab_size`` static: call it inside the train step (under an
  outer ``jax.jit`` it is inlined) or on numpy arrays. ``int``/``log`` codecs return
  logits shifted by minus the row's top-1 logit and a log-sum-exp consistent with them
  (see the module docstring).

  Args:
    encoded: ``{'values', 'indices', 'stats'}`` as ``encode`` returns them (any leading
      shape, the same for the three).
    codec: the codec they were encoded with.
    k: classes per row.
    vocab_size: the vocabulary they were encoded with.

  Returns:
    ``topk_logits [..., k]``, ``topk_indices [..., k]``, ``logsumexp [...]``.

  >>> enc = encode([[2.0, 0.5, -1.0]], [[7, 1, 4]], [2.3], codec='int8+ef', vocab_size=9)
  >>> z, idx, lse = decode(enc, codec='int8+ef', k=3, vocab_size=9)
  >>> idx.tolist(), np.asarray(z - lse[:, None], np.float64).round(2).tolist()
  ([[1, 4, 7]], [[-1.8, -3.3, -0.3]])
  """
  codec = parse_codec(codec)
  sizes = layout(codec, k, vocab_size)
  if not isinstance(encoded, Mapping) or not set(PARTS) <= set(encoded):
    raise CodecError(f'encoded rows must be a dict with {", ".join(PARTS)} (got '
                     f'{sorted(encoded) if isinstance(encoded, Mapping) else type(encoded)}); '
                     'pass what encode returned')
  parts = {key: jnp.asarray(encoded[key]) for key in PARTS}
  lead = parts['values'].shape[:-1]
  for key, a in parts.items():
    if a.dtype != jnp.uint8 or a.shape != lead + (sizes[key],):
      raise CodecError(f'encoded {key!r} is {a.dtype} {a.shape}, but {codec.name} with k = {k} '
                       f'and {vocab_size} classes stores uint8 [..., {sizes[key]}] with one '
                       'leading shape; decode with the codec, k and vocabulary of the encode')

  return _decode_parts(parts['values'], parts['indices'], parts['stats'], codec=codec, k=k,
                       vocab_size=vocab_size)


@functools.partial(jax.jit, static_argnames=('codec', 'k', 'vocab_size'))
def _decode_parts(v, b, s, *, codec: Codec, k: int, vocab_size: int):
  lead = v.shape[:-1]
  if codec.indices == 'i32':
    idx = _from_le(b, jnp.int32)
  elif codec.indices == 'i16':
    idx = _from_le(b, jnp.uint16).astype(jnp.int32)
  elif codec.indices == 'packed':
    idx = unpack_bits(b, _index_width(vocab_size), k)
  else:
    idx = _ef_decode(b, k, vocab_size)

  if codec.kind == 'float':
    dtype = {'f32': jnp.float32, 'bf16': jnp.bfloat16, 'f16': jnp.float16}[codec.values]
    return _from_le(v, dtype).astype(jnp.float32), idx, _from_le(s, jnp.float32)[..., 0]
  codes = unpack_bits(v, codec.bits, _stored_values(codec, k))
  if codec.kind == 'int':
    gaps = codes.astype(jnp.float32) * _from_le(s[..., :2], jnp.float16).astype(jnp.float32)
    tail = _from_le(s[..., 2:], jnp.int16)[..., 0]
  else:
    gaps = jnp.asarray(log_levels(codec.bits), jnp.float32)[codes]
    tail = _from_le(s, jnp.int16)[..., 0]
  if codec.indices != 'ef':
    gaps = jnp.concatenate([jnp.zeros(lead + (1,), jnp.float32), gaps], -1)
  rho = jnp.where(tail == _TAIL_NONE, -jnp.inf, tail.astype(jnp.float32) * TAIL_STEP)
  z = -gaps
  # max(z) = 0 (the top class's gap), so the sum neither overflows nor vanishes.
  return z, idx, jnp.log(jnp.sum(jnp.exp(z), axis=-1) + jnp.exp(rho))


# --------------------------------------------------------------------------- sampled rows
#
# A sampled row (``kdjax.cache.sampled``) is ``N`` class ids drawn i.i.d. from a proposal
# (the teacher, possibly tempered), kept as a multiset: the ids sorted, repeats kept, with
# Elias-Fano. That *is* the unique ids with their counts: a repeated id costs ``l + 1``
# bits (its low bits and one more unary bit), so the count of an id is its run length and
# needs no field of its own, no maximum of unique ids and no empty slots; every row takes
# exactly ``ceil((N l + N + ((vocab - 1) >> l)) / 8)`` bytes. With a tempered proposal
# each draw also carries its relative log importance weight in ``WEIGHT_BITS`` bits.

SAMPLE_PARTS = ('indices', 'weights')
WEIGHT_BITS = 8
WEIGHT_RANGE = 16.0          # nats: relative log weights in [0, 16], 2**8 - 1 steps
MAX_SAMPLES = 4096


def _check_samples(samples: int, vocab_size: int) -> None:
  for name, v in (('samples', samples), ('vocab_size', vocab_size)):
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
      raise CodecError(f'{name} must be a positive integer (got {v!r})')
  if samples > MAX_SAMPLES:
    raise CodecError(f'at most {MAX_SAMPLES} samples per token (got {samples})')
  if vocab_size > 1 << _MAX_WIDTH:
    raise CodecError(f'sampled rows hold at most 2**{_MAX_WIDTH} classes (got {vocab_size})')


def sample_format(samples: int, proposal_temperature: float = 1.0) -> str:
  """The name of a sampled row format: ``'rs{N}'``, or ``'rs{N}-t{temperature}'``.

  >>> sample_format(24), sample_format(24, 0.8)
  ('rs24', 'rs24-t0.8')
  """
  t = float(proposal_temperature)
  return f'rs{int(samples)}' + ('' if t == 1.0 else f'-t{t:g}')


def sample_layout(samples: int, vocab_size: int, *, weighted: bool = False) -> dict[str, int]:
  """Bytes per token of each array of a sampled row: ``'indices'`` (the Elias-Fano
  multiset of the ``samples`` draws) and, when ``weighted`` (a tempered proposal),
  ``'weights'`` (``WEIGHT_BITS`` per draw).

  >>> sample_layout(24, 2048), sample_layout(24, 2048, weighted=True)['weights']
  ({'indices': 25}, 24)
  """
  _check_samples(samples, vocab_size)
  l, upper = _ef_params(samples, vocab_size)
  out = {'indices': -(-(samples * l + upper) // 8)}
  if weighted:
    out['weights'] = -(-samples * WEIGHT_BITS // 8)
  return out


def sample_bytes_per_token(samples: int, vocab_size: int, *, weighted: bool = False) -> float:
  """Every stored byte of one token of a sampled cache (:func:`sample_layout`, summed).

  >>> sample_bytes_per_token(48, 2048), sample_bytes_per_token(64, 2048)
  (44.0, 56.0)
  """
  return float(sum(sample_layout(samples, vocab_size, weighted=weighted).values()))


def encode_samples(draws, *, vocab_size: int, log_weights=None) -> dict[str, np.ndarray]:
  """Draws ``[..., N]`` -> ``{'indices'[, 'weights']}``, each ``uint8 [..., bytes]`` (numpy).

  Args:
    draws: ``[..., N]`` class ids drawn from the proposal, in ``[0, vocab_size)``, any order.
    vocab_size: classes the teacher predicts.
    log_weights: ``[..., N]`` log importance weights ``log p(x_n) - log q(x_n)`` up to a
      per-row constant (a tempered proposal); None: equal weights (the proposal is the
      teacher), nothing stored for them.

  Returns:
    The byte arrays, with the rows' leading shape; :func:`sample_layout` gives their sizes.

  >>> enc = encode_samples([[5, 1, 5, 5]], vocab_size=8)
  >>> idx, w = decode_samples(enc, samples=4, vocab_size=8)
  >>> idx.tolist(), w.tolist()
  ([[1, 5, 5, 5]], [[0.25, 0.25, 0.25, 0.25]])
  """
  x = np.asarray(draws)
  if x.ndim == 0 or not np.issubdtype(x.dtype, np.integer):
    raise CodecError(f'draws must be an integer array [..., N] (got {x.dtype} {x.shape})')
  lead, n = x.shape[:-1], x.shape[-1]
  _check_samples(n, vocab_size)
  if x.size and (x.min() < 0 or x.max() >= vocab_size):
    raise CodecError(f'draws must lie in [0, {vocab_size}) (got [{x.min()}, {x.max()}])')
  x = x.astype(np.int64).reshape(-1, n)
  order = np.argsort(x, axis=-1, kind='stable')
  out = {'indices': _ef_encode(np.take_along_axis(x, order, -1), n, vocab_size)}
  if log_weights is not None:
    a = np.asarray(log_weights, np.float64)
    if a.shape != lead + (n,) or not np.isfinite(a).all():
      raise CodecError(f'log weights {a.shape} must be finite and shaped like the draws '
                       f'{lead + (n,)}')
    a = np.take_along_axis(a.reshape(-1, n), order, -1)
    top = (1 << WEIGHT_BITS) - 1
    gap = np.minimum(a.max(-1, keepdims=True) - a, WEIGHT_RANGE)
    out['weights'] = _pack(_bits(np.rint(gap / WEIGHT_RANGE * top).astype(np.int64),
                                 WEIGHT_BITS))
  return {key: v.reshape(*lead, v.shape[-1]) for key, v in out.items()}


def decode_samples(encoded: dict[str, Any], *, samples: int, vocab_size: int,
                   weighted: bool = False) -> tuple[jax.Array, jax.Array]:
  """:func:`encode_samples`'s arrays -> ``(indices int32 [..., N], weights float32 [..., N])``.

  The ids come sorted, repeats kept; the weights are the self-normalized importance
  weights (they sum to one per row; ``1/N`` each without ``'weights'``). ``jax.numpy``,
  jittable. All-zero rows (padding) decode to ids clipped into the vocabulary.
  """
  sizes = sample_layout(samples, vocab_size, weighted=weighted)
  if not isinstance(encoded, Mapping) or not set(sizes) <= set(encoded):
    raise CodecError(f'encoded sampled rows must be a dict with {", ".join(sizes)}')
  parts = {key: jnp.asarray(encoded[key]) for key in sizes}
  lead = parts['indices'].shape[:-1]
  for key, a in parts.items():
    if a.dtype != jnp.uint8 or a.shape != lead + (sizes[key],):
      raise CodecError(f'encoded {key!r} is {a.dtype} {a.shape}, but {samples} samples of '
                       f'{vocab_size} classes store uint8 [..., {sizes[key]}]')
  return _decode_samples(parts['indices'], parts.get('weights'), samples=samples,
                         vocab_size=vocab_size)


@functools.partial(jax.jit, static_argnames=('samples', 'vocab_size'))
def _decode_samples(b, w, *, samples: int, vocab_size: int):
  idx = jnp.minimum(_ef_decode(b, samples, vocab_size), vocab_size - 1)
  if w is None:
    return idx, jnp.full(idx.shape, 1.0 / samples, jnp.float32)
  codes = unpack_bits(w, WEIGHT_BITS, samples).astype(jnp.float32)
  # The largest weight has code 0: the sum is at least one, never zero.
  u = jnp.exp(-codes * (WEIGHT_RANGE / ((1 << WEIGHT_BITS) - 1)))
  return idx, u / jnp.sum(u, axis=-1, keepdims=True)


# --------------------------------------------------------------------------- error


def lm_like_logits(num_tokens: int, vocab_size: int, *, seed: int = 0,
                   entropy: tuple[float, float] = (1.0, 4.0), zipf: float = 1.1,
                   noise: float = 1.0, offset: tuple[float, float] = (20.0, 5.0)) -> np.ndarray:
  """Synthetic next-token logits ``float32 [num_tokens, vocab_size]`` that look like an LM's.

  Each row is ``beta * (noise * N(0, 1) - zipf * log(1 + rank))`` (a Zipf prior over the
  classes in a fixed random order, plus per-token noise), with ``beta`` found by
  bisection so that the row's entropy is a draw from ``uniform(*entropy)`` nats, then
  shifted so that its largest logit is a draw from ``N(*offset)`` (raw logit scale
  matters to the float codecs). Not real LM logits: a stand-in to compare codecs on.

  >>> z = lm_like_logits(4, 512, seed=1)
  >>> p = np.exp(z - z.max(1, keepdims=True)); p /= p.sum(1, keepdims=True)
  >>> bool(np.all((-(p * np.log(p)).sum(1) > 0.99) & (-(p * np.log(p)).sum(1) < 4.01)))
  True
  """
  rng = np.random.default_rng(seed)
  rank = rng.permutation(vocab_size)
  base = noise * rng.standard_normal((num_tokens, vocab_size)) - zipf * np.log1p(rank)
  target = rng.uniform(*entropy, num_tokens)
  lo, hi = np.full(num_tokens, np.log(1e-3)), np.full(num_tokens, np.log(1e2))
  for _ in range(30):
    beta = np.exp((lo + hi) / 2)
    x = beta[:, None] * base
    x -= x.max(1, keepdims=True)
    p = np.exp(x)
    total = p.sum(1)
    h = np.log(total) - (p * x).sum(1) / total
    too_flat = h > target
    lo, hi = np.where(too_flat, (lo + hi) / 2, lo), np.where(too_flat, hi, (lo + hi) / 2)
  z = np.exp((lo + hi) / 2)[:, None] * base
  z += rng.normal(*offset, num_tokens)[:, None] - z.max(1, keepdims=True)
  return z.astype(np.float32)


def _log_softmax64(z: np.ndarray) -> np.ndarray:
  z = z.astype(np.float64)
  top = z.max(-1, keepdims=True)
  return z - top - np.log(np.sum(np.exp(z - top), -1, keepdims=True))


def codec_error(logits, *, codec: str | Codec, k: int) -> dict[str, Any]:
  """What a codec loses on full teacher logits, per row (float64 references).

  The reference is the exact top-k row in kdjax's sparse ``'uniform'`` mode: the top-k
  probabilities and the rest of the mass spread evenly over the other classes.

  Args:
    logits: ``[..., vocab]`` teacher logits.
    codec: the codec.
    k: classes kept per row.

  Returns:
    ``{'bytes_per_token': float, 'kl', 'dlogp', 'dlogp_major', 'full_kl'}``, the four
    ``[...]`` per row: ``kl`` is KL(exact top-k row || decoded row), ``dlogp`` the
    largest ``|log p_i - log p'_i|`` over the row's top-k classes (``dlogp_major``: over
    those of probability at least 1e-3), ``full_kl`` KL(full teacher || decoded row)
    (what the truncation to k classes and the codec lose together). With a float32
    log-sum-exp a tail below about 1e-7 of the mass is lost, so ``kl`` can be -1e-6.

  >>> err = codec_error(lm_like_logits(8, 256), codec='f32+i32', k=16)
  >>> bool(err['kl'].max() < 1e-6 and err['dlogp'].max() < 1e-5)
  True
  """
  z = np.asarray(logits, np.float32)
  lead, vocab = z.shape[:-1], z.shape[-1]
  z = z.reshape(-1, vocab)
  log_p = _log_softmax64(z)
  order = np.argsort(-z, axis=-1, kind='stable')[:, :k]
  top_idx = np.sort(order, axis=-1)
  top_lp = np.take_along_axis(log_p, top_idx, -1)
  lse = (z.astype(np.float64) - log_p)[:, 0].astype(np.float32)
  enc = encode(np.take_along_axis(z, top_idx, -1), top_idx, lse, codec=codec, vocab_size=vocab)
  dz, didx, dlse = (np.asarray(a, np.float64) for a in decode(enc, codec=codec, k=k,
                                                               vocab_size=vocab))
  back = np.argsort(didx, axis=-1, kind='stable')
  dlp = np.take_along_axis(dz, back, -1) - dlse[:, None]
  if not np.array_equal(np.take_along_axis(didx, back, -1), top_idx):
    raise AssertionError(f'{codec}: the decoded classes differ from the encoded ones')
  with np.errstate(divide='ignore', invalid='ignore'):
    r = np.clip(1.0 - np.exp(top_lp).sum(-1), 0.0, None)
    r_hat = -np.expm1(np.minimum(np.log(np.sum(np.exp(dlp), -1)), 0.0))
    tail_count = max(vocab - k, 1)
    tail_lp = np.log(np.maximum(r_hat, np.finfo(np.float32).tiny) / tail_count)
    kl = np.sum(np.exp(top_lp) * (top_lp - dlp), -1)
    kl += np.where(r > 0, r * (np.log(r) - np.log(np.maximum(r_hat, np.finfo(np.float32).tiny))),
                   0.0)
    dense = np.broadcast_to(tail_lp[:, None], log_p.shape).copy()
    np.put_along_axis(dense, top_idx, dlp, -1)
    full_kl = np.sum(np.exp(log_p) * (log_p - dense), -1)
  dlogp = np.abs(top_lp - dlp)
  major = np.where(top_lp >= np.log(1e-3), dlogp, 0.0)
  return {'bytes_per_token': bytes_per_token(codec, k, vocab), 'kl': kl.reshape(lead),
          'dlogp': dlogp.max(-1).reshape(lead), 'dlogp_major': major.max(-1).reshape(lead),
          'full_kl': full_kl.reshape(lead)}


REPORT_CODECS = ('f32+i32', 'bf16+i16', 'f16+packed', 'int8+packed', 'int4+packed', 'int4+ef',
                 'int3+ef', 'int2+ef', 'log4+ef', 'log3+ef', 'log2+ef')
BUDGET_CODECS = ('int5+ef', 'int4+ef', 'int3+ef', 'int2+ef', 'log4+ef', 'log3+ef', 'log2+ef',
                 'int4+packed', 'int3+packed', 'int2+packed', 'log4+packed', 'log3+packed')


def _fmt(row: dict) -> str:
  return (f'{row["codec"]:12s} {row["k"]:4d} {row["vocab"]:7d} {row["bytes"]:8.1f} '
          f'{row["kl_mean"]:9.2e} {row["kl_max"]:9.2e} {row["dlogp_max"]:7.3f} '
          f'{row["dlogp_major"]:7.3f} {row["full_kl"]:8.4f}')


def _row(name, k, vocab, err) -> dict:
  return {'codec': str(name), 'k': k, 'vocab': vocab, 'bytes': err['bytes_per_token'],
          'kl_mean': float(err['kl'].mean()), 'kl_max': float(err['kl'].max()),
          'dlogp_max': float(err['dlogp'].max()), 'dlogp_major': float(err['dlogp_major'].max()),
          'full_kl': float(err['full_kl'].mean())}


def codec_report(*, vocabs=(2048, 32000), ks=(8, 32, 128), codecs=REPORT_CODECS,
                 tokens: int = 256, budget: float = 64.0, budget_vocabs=(32000, 151936),
                 budget_codecs=BUDGET_CODECS, seed: int = 0, out=print) -> list[dict]:
  """The codecs compared on ``lm_like_logits``: printed through ``out`` and returned.

  First every codec of ``codecs`` at every ``k`` and vocabulary; then, per vocabulary
  of ``budget_vocabs``, each codec of ``budget_codecs`` at the largest ``k`` that fits
  ``budget`` bytes per token, best full KL first. Columns: bytes per token, mean and
  max KL (exact top-k row -> decoded), max ``|dlogp|`` over the top-k classes and over
  those of probability >= 1e-3, mean full KL (full teacher -> decoded row). Takes
  minutes (the logits of 151936 classes are the slow part).

  Returns:
    One dict per printed row.
  """
  head = (f'{"codec":12s} {"k":>4s} {"vocab":>7s} {"B/token":>8s} {"mean KL":>9s} '
          f'{"max KL":>9s} {"|dlogp|":>7s} {"p>=1e-3":>7s} {"full KL":>8s}')
  rows, logits = [], {}
  out(head)
  for vocab in vocabs:
    logits[vocab] = lm_like_logits(tokens, vocab, seed=seed)
    for k in ks:
      for name in codecs:
        if k > vocab or (name.endswith('+i16') and vocab > 1 << 16):
          continue
        rows.append(_row(name, k, vocab, codec_error(logits[vocab], codec=name, k=k)))
        out(_fmt(rows[-1]))
  for vocab in budget_vocabs:
    if vocab not in logits:
      logits[vocab] = lm_like_logits(tokens // 2 if vocab > 65536 else tokens, vocab, seed=seed)
    out(f'\nat most {budget:g} bytes/token, {vocab} classes: the largest k of each codec')
    out(head)
    best = []
    for name in budget_codecs:
      fits = [k for k in range(1, min(vocab, 512) + 1) if bytes_per_token(name, k, vocab) <= budget]
      if fits:
        best.append(_row(name, max(fits), vocab,
                         codec_error(logits[vocab], codec=name, k=max(fits))))
    for row in sorted(best, key=lambda r: r['full_kl']):
      rows.append(dict(row, budget=budget))
      out(_fmt(row))
  return rows
