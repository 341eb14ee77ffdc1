"""The device feed's epoch shuffles: ``packed_permutation`` against numpy and for uniformity."""

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.engine import feed as step_mod
from kdjax.engine.feed import epoch_permutations, packed_permutation


# Rounds by hand: 3 * bits of randomness in all, 32 - bits random bits a round
# (n = 300: 9 bits, 23 a round, 27 / 23 -> 2; n = 4000: 12 bits, 20 a round -> 2;
# n = 5001: 13 bits, 39 / 19 -> 3; n = 2**20: 20 bits, 12 a round -> 5, and most
# positions tie within a round).
ROUNDS = {1: 1, 2: 1, 3: 1, 17: 1, 300: 2, 4000: 2, 5001: 3, 2**20: 5}


def _numpy_reference(key, n: int) -> np.ndarray:
  """The algorithm from its description, in numpy: rounds of sorting random high bits,
  ties broken by the previous round's order (a stable argsort, no packing)."""
  bits = max(1, (n - 1).bit_length())
  order = np.arange(n)
  for r in range(ROUNDS[n]):
    draws = np.asarray(jax.random.bits(jax.random.fold_in(key, r), (n,), jnp.uint32)) >> bits
    order = order[np.argsort(draws, kind='stable')]
  return order


@pytest.mark.parametrize('n', sorted(ROUNDS))
def test_packed_permutation_matches_numpy(n):
  key = jax.random.key(n)
  got = np.asarray(jax.jit(packed_permutation, static_argnums=1)(key, n))
  assert got.dtype == np.int32
  np.testing.assert_array_equal(np.sort(got), np.arange(n))
  np.testing.assert_array_equal(got, _numpy_reference(key, n))


def test_packed_permutation_is_uniform():
  # 24,000 shuffles of 4 items: each of the 24 orders ~1000 times (chi-square, 23 dof;
  # 60 is far beyond its 0.9999 quantile of ~52).
  keys = jax.random.split(jax.random.key(7), 24_000)
  perms = np.asarray(jax.jit(jax.vmap(lambda k: packed_permutation(k, 4)))(keys))
  index = {p: i for i, p in enumerate(itertools.permutations(range(4)))}
  counts = np.bincount([index[tuple(p)] for p in perms.tolist()], minlength=24)
  chi2 = float(np.sum((counts - 1000.0) ** 2 / 1000.0))
  assert chi2 < 60, counts
  # And positions of 1000 items over 400 shuffles: every item's mean position near 499.5.
  keys = jax.random.split(jax.random.key(8), 400)
  perms = np.asarray(jax.jit(jax.vmap(lambda k: packed_permutation(k, 1000)))(keys))
  where = np.argsort(perms, axis=1)            # position of each item in each shuffle
  mean_pos = where.mean(axis=0)
  sd = np.sqrt((1000**2 - 1) / 12 / 400)         # of a mean of 400 uniform positions
  assert np.max(np.abs(mean_pos - 499.5)) < 5 * sd


def test_large_n_falls_back_to_jax_permutation(monkeypatch):
  # Above 2**24 positions too few random bits are left per round; the fallback is
  # jax.random.permutation (forced here at small n by demanding more free bits).
  monkeypatch.setattr(step_mod, '_MIN_FREE_BITS', 31)
  key = jax.random.key(3)
  np.testing.assert_array_equal(np.asarray(packed_permutation(key, 100)),
                                np.asarray(jax.random.permutation(key, 100)))


def test_epoch_permutations_are_per_epoch_and_seeded():
  a = np.asarray(epoch_permutations(0, 5, 3, 300))
  b = np.asarray(epoch_permutations(0, 6, 2, 300))
  np.testing.assert_array_equal(a[1:], b)          # epoch 6 and 7 the same either way
  assert not np.array_equal(a[0], a[1])
  assert not np.array_equal(a, np.asarray(epoch_permutations(1, 5, 3, 300)))
  key = jax.random.fold_in(jax.random.key(0), 5)
  np.testing.assert_array_equal(a[0], _numpy_reference(key, 300))
