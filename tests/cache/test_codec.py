"""Tests of ``kdjax.cache.codec``: bit packing, round trips, error bounds, sizes, errors.

References are written here from the definitions: a bit string built character by
character for the packing, dense float64 teacher distributions (the top-k classes and
kdjax's ``'uniform'`` tail) for the KL, and the bounds derived in the module docstring.
"""

import functools
import math

import jax
import numpy as np
import pytest

from kdjax.cache import codec as C
from kdjax.errors import UserError
from kdjax.losses import sparse_kd

VOCAB = 2048
K = 24


def _reference_pack(values, width, offset=0):
  """Bytes of ``values`` at ``width`` bits after ``offset`` one-bits, from a bit string."""
  bits = '1' * offset + ''.join(format(int(v), f'0{width}b')[::-1] for v in values)
  bits += '0' * (-len(bits) % 8)
  return np.array([int(bits[i:i + 8][::-1], 2) for i in range(0, len(bits), 8)], np.uint8)


def test_pack_bits_matches_a_bit_string_and_round_trips_every_width():
  rng = np.random.default_rng(0)
  cases = []
  for width in range(1, 18):
    for n in (1, 13):
      v = rng.integers(0, 1 << width, size=(2, 3, n))
      v[0, 0, 0], v[1, 2, -1] = 0, (1 << width) - 1       # both ends of the range
      packed = C.pack_bits(v, width)
      assert packed.shape == (2, 3, math.ceil(n * width / 8)) and packed.dtype == np.uint8
      np.testing.assert_array_equal(packed[1, 2], _reference_pack(v[1, 2], width))
      cases.append((width, n, v, packed))
  unpack = jax.jit(lambda ps: [C.unpack_bits(p, w, n) for (w, n, _, _), p in zip(cases, ps)])
  for (width, n, v, _), back in zip(cases, unpack([c[3] for c in cases])):
    assert back.dtype == np.int32
    np.testing.assert_array_equal(np.asarray(back), v, err_msg=f'width {width}, {n} values')


def test_unpack_bits_reads_from_a_bit_offset():
  v = np.array([3, 0, 5, 7, 1])
  packed = _reference_pack(v, 3, offset=5)
  np.testing.assert_array_equal(np.asarray(C.unpack_bits(packed, 3, 5, offset=5)), v)


def _random_rows(shape, k, vocab, seed):
  rng = np.random.default_rng(seed)
  z = rng.normal(20.0, 4.0, shape + (k,)).astype(np.float32)
  idx = np.argsort(rng.random(shape + (vocab,)), axis=-1)[..., :k]    # distinct per row
  lse = (z.max(-1) + rng.uniform(0.1, 3.0, shape)).astype(np.float32)
  return z, idx, lse


def test_f32_i32_is_the_identity_and_keeps_the_leading_shape():
  z, idx, lse = _random_rows((2, 3), 5, 50, seed=1)
  enc = C.encode(z, idx, lse, codec='f32+i32', vocab_size=50)
  assert {key: a.shape for key, a in enc.items()} == {
      'values': (2, 3, 20), 'indices': (2, 3, 20), 'stats': (2, 3, 4)}
  dz, didx, dlse = (np.asarray(a) for a in C.decode(enc, codec='f32+i32', k=5, vocab_size=50))
  assert dz.dtype == np.float32 and didx.dtype == np.int32 and dlse.dtype == np.float32
  np.testing.assert_array_equal(dz, z)
  np.testing.assert_array_equal(didx, idx)
  np.testing.assert_array_equal(dlse, lse)


@pytest.mark.parametrize('indices', ['i16', 'packed', 'ef'])
def test_f32_values_survive_every_index_format(indices):
  z, idx, lse = _random_rows((7,), 9, 3001, seed=2)
  name = f'f32+{indices}'
  dz, didx, dlse = (np.asarray(a) for a in C.decode(
      C.encode(z, idx, lse, codec=name, vocab_size=3001), codec=name, k=9, vocab_size=3001))
  order = np.argsort(idx, axis=-1) if indices == 'ef' else np.arange(9)[None]
  np.testing.assert_array_equal(didx, np.take_along_axis(idx, order, -1))
  np.testing.assert_array_equal(dz, np.take_along_axis(z, order, -1))
  np.testing.assert_array_equal(dlse, lse)
  if indices == 'ef':
    assert np.all(np.diff(didx, axis=-1) > 0)


@pytest.mark.parametrize('vocab,k', [(300, 300), (1000, 700), (7, 3), (1, 1)])
def test_ef_indices_round_trip_when_k_is_near_the_vocabulary(vocab, k):
  _, idx, _ = _random_rows((4,), k, vocab, seed=3)
  enc = C.encode(np.zeros(idx.shape, np.float32), idx, np.zeros(4, np.float32), codec='f32+ef',
                 vocab_size=vocab)
  _, didx, _ = C.decode(enc, codec='f32+ef', k=k, vocab_size=vocab)
  np.testing.assert_array_equal(np.asarray(didx), np.sort(idx, axis=-1))


# ----------------------------------------------------------------- lossy codecs


@pytest.fixture(scope='module')
def lm_rows():
  """LM-like rows: top-K logits, classes and the float32 log-sum-exp, and float64 truth."""
  z = C.lm_like_logits(40, VOCAB, seed=5)
  z[0, :] = z[0, 0]                      # a flat row: every gap 0
  z[1, 1:] -= 40.0                       # one dominant class: a tail of almost no mass
  z64 = z.astype(np.float64)
  lse64 = np.log(np.sum(np.exp(z64 - z64.max(1, keepdims=True)), 1)) + z64.max(1)
  idx = np.argsort(-z, axis=-1, kind='stable')[:, :K]
  return {'z': np.take_along_axis(z, idx, -1), 'idx': idx, 'lse': lse64.astype(np.float32)}


def _dense(log_p_topk, idx, log_tail_mass, vocab):
  """float64 ``[n, vocab]`` log-probs: the top-k ones, the tail mass spread evenly."""
  k = idx.shape[-1]
  out = np.broadcast_to((log_tail_mass - np.log(vocab - k))[:, None], (len(idx), vocab)).copy()
  np.put_along_axis(out, idx, log_p_topk, -1)
  return out


def _decoded(rows, name):
  enc = C.encode(rows['z'], rows['idx'], rows['lse'], codec=name, vocab_size=VOCAB)
  dz, didx, dlse = (np.asarray(a, np.float64) for a in C.decode(enc, codec=name, k=K,
                                                               vocab_size=VOCAB))
  # Both in class order (the codecs may store the classes in another).
  order, back = np.argsort(rows['idx'], -1), np.argsort(didx, -1)
  idx = np.take_along_axis(rows['idx'], order, -1)
  np.testing.assert_array_equal(np.take_along_axis(didx, back, -1), idx)
  dz = np.take_along_axis(dz, back, -1)
  z = np.take_along_axis(rows['z'], order, -1).astype(np.float64)
  lse = rows['lse'].astype(np.float64)
  lp, dlp = z - lse[:, None], dz - dlse[:, None]
  with np.errstate(divide='ignore'):
    tail = np.log(np.clip(1 - np.exp(lp).sum(-1), 0, None))
    dtail = np.log(np.clip(1 - np.exp(dlp).sum(-1), 0, None))
  p, q = _dense(lp, idx, tail, VOCAB), _dense(dlp, idx, dtail, VOCAB)
  with np.errstate(invalid='ignore'):
    kl = np.sum(np.where(np.isfinite(p), np.exp(p) * (p - q), 0.0), -1)
  gaps, dgaps = z.max(-1, keepdims=True) - z, dz.max(-1, keepdims=True) - dz
  return {'enc': enc, 'kl': kl, 'dlogp': np.abs(lp - dlp), 'gaps': gaps, 'dgaps': dgaps,
          'tail': tail, 'dtail': dtail}


def _f16_up(x):
  h = np.float16(x)
  return float(np.nextafter(h, np.float16(np.inf)) if float(h) < x else h)


@pytest.mark.parametrize('name', ['int2+ef', 'int3+packed', 'int4+ef', 'int5+i16', 'int6+ef',
                                  'int7+i32', 'int8+packed'])
def test_int_codecs_stay_within_their_bounds(lm_rows, name):
  bits = int(name[3])
  top = (1 << bits) - 1
  out = _decoded(lm_rows, name)
  step = out['enc']['stats'][:, :2].copy().view('<f2')[:, 0].astype(np.float64)
  tail_step = 2.0**-10                             # |rho' - rho| <= 2**-9 / 2
  saturated_rows = 0
  for row in range(len(step)):
    s, g, dg = step[row], out['gaps'][row], out['dgaps'][row]
    inside = g <= top * s
    # A gap within the row's range is rounded to the nearest multiple of the step; a gap
    # beyond it decodes at the range's end.
    assert np.all(np.abs(dg - g)[inside] <= s / 2 + 1e-6 * (1 + g[inside])), row
    np.testing.assert_allclose(dg[~inside], top * s, rtol=1e-6)
    # KL(p || p') <= (s0 + 2**-10)**2 / 8 with s0 the step that covers the largest gap.
    s0 = _f16_up(g.max() / top) if g.max() > 0 else 1.0
    assert out['kl'][row] <= (s0 + tail_step)**2 / 8 + 1e-9, (row, out['kl'][row], s0)
    if inside.all():
      assert out['dlogp'][row].max() <= s + tail_step + 1e-5, row
    else:
      saturated_rows += 1
  # The flat row: every gap exact, only the tail rounded (Delta <= 2**-10).
  assert out['kl'][0] <= tail_step**2 / 8 and out['dlogp'][0].max() <= tail_step + 1e-6
  if bits <= 3:
    assert saturated_rows > 0       # the step search did trade a far gap for a finer step


def _log_half_cells(bits):
  """Half the widest cell (nats) of the log grid, from its definition."""
  top, gamma, g_max = (1 << bits) - 1, C.LOG_GAMMA, C.LOG_RANGE[bits]
  u_min = math.exp(-g_max / gamma)
  u = u_min + np.arange(top + 1) / top * (1 - u_min)
  lo, hi = np.maximum(u - (1 - u_min) / top / 2, u_min), np.minimum(u + (1 - u_min) / top / 2, 1)
  return float(np.max(np.maximum(np.log(u / lo), np.log(hi / u)) * gamma)), g_max


@pytest.mark.parametrize('name', ['log2+packed', 'log3+ef', 'log4+i16'])
def test_log_codecs_stay_within_their_bounds(lm_rows, name):
  h, g_max = _log_half_cells(int(name[3]))
  out = _decoded(lm_rows, name)
  inside = out['gaps'] <= g_max
  assert np.all(np.abs(out['dgaps'] - out['gaps'])[inside] <= h + 1e-5)
  np.testing.assert_allclose(out['dgaps'][~inside], g_max, rtol=1e-6)
  within = inside.all(-1)
  delta = 2 * h + 2.0**-10
  assert within.sum() >= 5
  assert np.all(out['dlogp'][within].max(-1) <= delta + 1e-5)
  assert np.all(out['kl'][within] <= delta**2 / 8 + 1e-9)


def test_a_tail_below_float32_resolution_decodes_as_none(lm_rows):
  out = _decoded(lm_rows, 'int4+ef')      # row 1: 2047 classes 40 nats below the top
  assert np.isneginf(out['dtail'][1]) and out['kl'][1] < 1e-12


def test_codec_error_kl_is_sparse_kd_in_uniform_mode(lm_rows):
  """``codec_error``'s KL equals kdjax's sparse forward KL ('uniform' tail) of the decoded
  row taken as the student."""
  z = C.lm_like_logits(12, 512, seed=7)
  err = C.codec_error(z, codec='int3+ef', k=16)
  assert err['kl'].shape == (12,) and err['bytes_per_token'] == C.bytes_per_token('int3+ef', 16,
                                                                                  512)
  idx = np.sort(np.argsort(-z, axis=-1, kind='stable')[:, :16], axis=-1)
  top = np.take_along_axis(z, idx, -1)
  lse = np.log(np.sum(np.exp(z.astype(np.float64)), -1)).astype(np.float32)
  enc = C.encode(top, idx, lse, codec='int3+ef', vocab_size=512)
  dz, didx, dlse = (np.asarray(a, np.float64) for a in C.decode(enc, codec='int3+ef', k=16,
                                                               vocab_size=512))
  dlp = dz - dlse[:, None]
  student = _dense(dlp, didx.astype(np.int64), np.log1p(-np.exp(dlp).sum(-1)), 512)
  with jax.default_matmul_precision('highest'):
    loss = jax.jit(functools.partial(sparse_kd, missing_mass='uniform'))(
        student.astype(np.float32), top, idx, teacher_logsumexp=lse)
  np.testing.assert_allclose(np.asarray(loss), err['kl'], atol=3e-5)
  assert err['kl'].mean() > 1e-4                      # a lossy codec: not a trivial match
  assert np.all(err['full_kl'] >= err['kl'] - 1e-6)   # truncation adds to the codec's loss


@pytest.mark.parametrize('missing_mass', ['uniform', 'renormalize'])
def test_decoded_rows_feed_the_sparse_losses_at_any_temperature(lm_rows, missing_mass):
  """The int codecs decode logits shifted by minus the top-1 logit (about -20 here); the
  sparse losses must not see the shift. At 8 bits the rows differ by about 1e-2 nats, so
  the losses agree to that; a shift that leaked would move them by O(1)."""
  rng = np.random.default_rng(8)
  student = rng.normal(0, 2, (len(lm_rows['z']), VOCAB)).astype(np.float32)
  enc = C.encode(lm_rows['z'], lm_rows['idx'], lm_rows['lse'], codec='int8+ef',
                 vocab_size=VOCAB)
  dz, didx, dlse = C.decode(enc, codec='int8+ef', k=K, vocab_size=VOCAB)
  assert float(np.abs(np.asarray(dz).max(-1)).max()) == 0.0
  loss = jax.jit(functools.partial(sparse_kd, missing_mass=missing_mass))
  for t in (1.0, 2.0):
    exact = loss(student, lm_rows['z'], lm_rows['idx'].astype(np.int32), temperature=t,
                 teacher_logsumexp=lm_rows['lse'])
    back = loss(student, dz, didx, temperature=t, teacher_logsumexp=dlse)
    np.testing.assert_allclose(np.asarray(back), np.asarray(exact), rtol=1e-2, atol=1e-2)


@pytest.mark.parametrize('name', ['int4+ef', 'log3+packed', 'bf16+i16'])
def test_decode_under_jit_equals_decode_on_numpy(name):
  z, idx, lse = _random_rows((2, 3), 8, 600, seed=9)
  enc = C.encode(z, idx, lse, codec=name, vocab_size=600)
  eager = C.decode(enc, codec=name, k=8, vocab_size=600)
  jitted = jax.jit(functools.partial(C.decode, codec=name, k=8, vocab_size=600))(
      jax.tree.map(jax.numpy.asarray, enc))
  for a, b in zip(eager, jitted):
    assert a.shape[:2] == (2, 3)
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------- sizes


@pytest.mark.parametrize('k,vocab', [(1, 1), (5, 9), (1, 70000), (24, 2048), (17, 70000),
                                     (64, 64)])
def test_bytes_per_token_is_what_encode_stores(k, vocab):
  shape = (3, 2)
  z, idx, lse = _random_rows(shape, k, vocab, seed=k)
  for values in C.VALUE_FORMATS:
    for indices in C.INDEX_FORMATS:
      if indices == 'i16' and vocab > 1 << 16:
        continue
      name = f'{values}+{indices}'
      enc = C.encode(z, idx, lse, codec=name, vocab_size=vocab)
      sizes = C.layout(name, k, vocab)
      assert {key: a.shape for key, a in enc.items()} == {
          key: shape + (n,) for key, n in sizes.items()}, name
      total = sum(a.nbytes for a in enc.values())
      assert C.bytes_per_token(name, k, vocab) == total / math.prod(shape), name


def test_sizes_by_hand():
  # int3 + packed, 32000 classes, k = 24: 23 stored gaps x 3 bits -> 9 bytes; 24 x 15 bits
  # -> 45 bytes; step (float16) + tail (int16) -> 4 bytes.
  assert C.layout('int3+packed', 24, 32000) == {'values': 9, 'indices': 45, 'stats': 4}
  # Elias-Fano, k = 32 of 32000: l = 9 low bits each (288) + 32 + (31999 >> 9) = 94 unary
  # bits = 382 bits -> 48 bytes.
  assert C.layout('log4+ef', 32, 32000) == {'values': 16, 'indices': 48, 'stats': 2}
  assert C.bytes_per_token('bf16+i16', 128, 50000) == 128 * 2 + 128 * 2 + 4


# ----------------------------------------------------------------- errors


@pytest.mark.parametrize('bad,message', [
    (dict(idx=2048), r'must lie in \[0, 2048\)'),
    (dict(idx=-1), r'must lie in \[0, 2048\)'),
    (dict(vocab=3), 'exceeds the vocabulary'),
    (dict(codec='int4+i16', vocab=70000), 'at most 65536'),
    (dict(codec='int4'), "'VALUES\\+INDICES'"),
    (dict(codec='int9+ef'), 'codec values must be one of'),
    (dict(codec='int4+delta'), 'codec indices must be one of'),
    (dict(logit=np.inf), 'infinite'),
    (dict(logit=np.nan), 'NaN'),
])
def test_bad_rows_raise_a_value_error_that_says_what_to_do(bad, message):
  z, idx, lse = _random_rows((3,), 4, 2048, seed=10)
  if 'idx' in bad:
    idx[1, 2] = bad['idx']
  if 'logit' in bad:
    z[0, 1] = bad['logit']
  with pytest.raises(ValueError, match=message) as info:
    C.encode(z, idx, lse, codec=bad.get('codec', 'int4+packed'),
             vocab_size=bad.get('vocab', 2048))
  assert isinstance(info.value, UserError)


def test_decode_refuses_arrays_of_another_codec_or_size():
  z, idx, lse = _random_rows((3,), 4, 100, seed=11)
  enc = C.encode(z, idx, lse, codec='int4+packed', vocab_size=100)
  with pytest.raises(ValueError, match='decode with the codec, k and vocabulary'):
    C.decode(enc, codec='int4+packed', k=5, vocab_size=100)
  with pytest.raises(ValueError, match='decode with the codec, k and vocabulary'):
    C.decode(enc, codec='int8+packed', k=4, vocab_size=100)
  with pytest.raises(ValueError, match='pass what encode returned'):
    C.decode({'values': enc['values']}, codec='int4+packed', k=4, vocab_size=100)
  with pytest.raises(ValueError, match=r'must be in \[0, 4\)'):
    C.pack_bits([4], 2)
