"""Seeded JAX augmentation: determinism, independence from batching, correctness."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import data as kd

SIGNAL = dict(kind='signal', shift=3, scale=0.2, noise=0.1)
IMAGE = dict(kind='image', crop_padding=2, flip=True)


def _batch(shape, n=16, seed=0):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(n,) + shape).astype(np.float32)
  return jnp.asarray(x), jnp.arange(100, 100 + n), jnp.full((n,), 3, jnp.int32)


@pytest.mark.parametrize('spec,shape', [(SIGNAL, (40, 1)), (IMAGE, (8, 8, 3))])
def test_same_key_same_view_whatever_the_batch(spec, shape):
  aug = kd.make_augment(spec)
  x, ids, epochs = _batch(shape)
  out = aug(x, ids, epochs, seed=11)
  assert out.shape == x.shape and out.dtype == x.dtype
  np.testing.assert_array_equal(out, aug(x, ids, epochs, seed=11))
  perm = np.random.default_rng(1).permutation(len(ids))
  np.testing.assert_array_equal(aug(x[perm], ids[perm], epochs[perm], seed=11),
                                out[perm])
  # Another batch of other examples that holds example 5 in row 0.
  y, other_ids, other_epochs = _batch(shape, seed=2)
  mixed = aug(y.at[0].set(x[5]), (other_ids + 50).at[0].set(ids[5]),
              other_epochs.at[0].set(epochs[5]), seed=11)
  np.testing.assert_array_equal(mixed[0], out[5])
  assert not np.array_equal(mixed[1], out[1])
  jitted = jax.jit(aug)(x, ids, epochs, seed=11)  # seed traced
  np.testing.assert_allclose(jitted, out, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize('spec,shape', [(SIGNAL, (40, 1)), (IMAGE, (8, 8, 3))])
def test_epochs_and_seeds_change_the_view(spec, shape):
  aug = kd.make_augment(spec)
  x, ids, epochs = _batch(shape)
  base = np.asarray(aug(x, ids, epochs, seed=0))
  other_epoch = np.asarray(aug(x, ids, epochs + 1, seed=0))
  other_seed = np.asarray(aug(x, ids, epochs, seed=1))
  differs = lambda a, b: np.mean([not np.array_equal(p, q)
                                  for p, q in zip(a, b)])
  assert differs(base, other_epoch) > 0.5
  assert differs(base, other_seed) > 0.5


@pytest.mark.parametrize('spec', [None, 'none', {'kind': 'none'}])
def test_identity_is_exact(spec):
  x, ids, epochs = _batch((5, 2))
  assert kd.make_augment(spec)(x, ids, epochs, seed=0) is x


def _numpy_shift(x, s, mode):
  if mode == 'roll':
    return np.roll(x, s, axis=0)
  out = np.zeros_like(x)
  if s >= 0:
    out[s:] = x[:len(x) - s]
  else:
    out[:s] = x[-s:]
  return out


@pytest.mark.parametrize('mode', ['roll', 'pad'])
def test_signal_shift_matches_numpy(mode):
  aug = kd.make_augment(dict(kind='signal', shift=3, mode=mode))
  x, ids, epochs = _batch((20, 2), n=64)
  out, x = np.asarray(aug(x, ids, epochs, seed=4)), np.asarray(x)
  used = []
  for xi, oi in zip(x, out):
    hits = [s for s in range(-3, 4) if np.array_equal(_numpy_shift(xi, s, mode),
                                                      oi)]
    assert len(hits) == 1
    used.append(hits[0])
  assert set(used) == set(range(-3, 4))  # every shift occurs in 64 draws


def test_signal_scale_and_noise():
  x, ids, epochs = _batch((40,), n=200)
  scaled = kd.make_augment(dict(kind='signal', scale=0.25))(x, ids, epochs,
                                                            seed=0)
  factors = np.asarray(scaled) / np.asarray(x)
  np.testing.assert_allclose(factors, factors[:, :1].repeat(40, 1), rtol=1e-5)
  assert factors.min() >= 0.75 - 1e-6 and factors.max() <= 1.25 + 1e-6
  assert factors[:, 0].std() > 0.1  # uniform on width 0.5: std 0.144
  noisy = kd.make_augment(dict(kind='signal', noise=0.3))(x, ids, epochs,
                                                          seed=0)
  resid = np.asarray(noisy) - np.asarray(x)
  assert abs(resid.std() - 0.3) < 0.01 and abs(resid.mean()) < 0.01


def test_image_crop_and_flip_match_numpy():
  p = 2
  aug = kd.make_augment(dict(kind='image', crop_padding=p, flip=True))
  x, ids, epochs = _batch((6, 5, 3), n=400)
  out, x = np.asarray(aug(x, ids, epochs, seed=9)), np.asarray(x)
  offsets, flips = set(), []
  for xi, oi in zip(x, out):
    padded = np.pad(xi, ((p, p), (p, p), (0, 0)))
    hits = [(dy, dx, f) for dy in range(2 * p + 1) for dx in range(2 * p + 1)
            for f in (False, True)
            if np.array_equal(oi, (lambda c: c[:, ::-1] if f else c)(
                padded[dy:dy + 6, dx:dx + 5]))]
    assert len(hits) == 1
    offsets.add(hits[0][:2])
    flips.append(hits[0][2])
  assert len(offsets) == (2 * p + 1) ** 2
  assert 0.3 < np.mean(flips) < 0.7


def test_example_keys_are_fold_ins():
  keys = kd.example_keys(5, jnp.array([2, 9]), jnp.array([1, 0]))
  want = jax.random.fold_in(jax.random.fold_in(jax.random.key(5), 9), 0)
  np.testing.assert_array_equal(jax.random.key_data(keys[1]),
                                jax.random.key_data(want))


def test_bad_specs_raise_data_error():
  with pytest.raises(kd.DataError, match='Unknown augmentation kind'):
    kd.make_augment(dict(kind='rotate'))
  with pytest.raises(kd.DataError, match='crop_size'):
    kd.make_augment(dict(kind='image', crop_size=3))
  with pytest.raises(kd.DataError, match="'roll' or 'pad'"):
    kd.make_augment(dict(kind='signal', mode='wrap'))
  with pytest.raises(kd.DataError, match='non-negative'):
    kd.make_augment(dict(kind='signal', noise=-0.1))
  with pytest.raises(kd.DataError, match='scale < 1'):
    kd.make_augment(dict(kind='signal', scale=1.5))
  assert kd.normalize_spec(SIGNAL) == dict(SIGNAL, mode='roll')
  # Config values arrive as floats; shifts and paddings become ints.
  assert kd.normalize_spec(dict(kind='image', crop_padding=4.0)) == dict(
      kind='image', crop_padding=4, flip=True)
  assert type(kd.normalize_spec(dict(kind='signal', shift=2.0))['shift']) is int
