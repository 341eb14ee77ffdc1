"""Partitioner properties, packing, stats and error messages."""

import numpy as np
import pytest

from kdjax.errors import UserError
from kdjax.federated import packing
from kdjax.federated import partition as P

LABELS = np.repeat(np.arange(10), 60)  # 600 examples, 10 balanced classes


def _all(p):
  return np.concatenate(list(p.train) + list(p.test))


CASES = {
    'iid': lambda s: P.iid(LABELS, 20, seed=s),
    'dirichlet': lambda s: P.dirichlet(LABELS, 20, 0.3, min_size=8, seed=s),
    'dirichlet_tiny_alpha': lambda s: P.dirichlet(LABELS, 50, 0.01, min_size=10, seed=s),
    'pathological': lambda s: P.pathological(LABELS, 20, 2, seed=s),
    'shards': lambda s: P.shards(LABELS, 20, 3, seed=s),
    'quantity_lognormal': lambda s: P.quantity_skew(LABELS, 20, sigma=1.5, min_size=5, seed=s),
    'quantity_powerlaw': lambda s: P.quantity_skew(LABELS, 20, distribution='powerlaw',
                                                   min_size=5, seed=s),
}


@pytest.mark.parametrize('name', sorted(CASES))
def test_every_example_assigned_exactly_once_and_deterministic(name):
  p = CASES[name](0)
  got = np.sort(_all(p))
  np.testing.assert_array_equal(got, np.arange(len(LABELS)))
  again = CASES[name](0)
  for a, b in zip(p.train + p.test, again.train + again.test):
    np.testing.assert_array_equal(a, b)
  other = CASES[name](1)
  assert any(len(a) != len(b) or (a != b).any() for a, b in zip(p.train, other.train))
  # Every client keeps at least one training example; test split about 20%.
  assert p.train_sizes().min() >= 1
  frac = p.test_sizes().sum() / len(LABELS)
  assert 0.1 < frac <= 0.2


def test_dirichlet_min_size_respected_even_at_tiny_alpha():
  for alpha in (0.001, 0.01, 0.1):
    p = P.dirichlet(LABELS, 50, alpha, min_size=11, seed=0)
    assert (p.train_sizes() + p.test_sizes()).min() >= 11


def test_dirichlet_small_alpha_is_skewed_large_alpha_is_not():
  small = P.partition_stats(P.dirichlet(LABELS, 20, 0.05, min_size=5, seed=0), LABELS)
  large = P.partition_stats(P.dirichlet(LABELS, 20, 1000.0, min_size=5, seed=0), LABELS)
  iid = P.partition_stats(P.dirichlet(LABELS, 20, float('inf'), min_size=5, seed=0), LABELS)
  assert small['classes_per_client_mean'] < 4
  assert large['classes_per_client_mean'] > 9
  assert small['label_tv_mean'] > 0.6
  assert large['label_tv_mean'] < 0.25 and iid['label_tv_mean'] < 0.25


def test_pathological_at_most_k_classes():
  for k in (1, 2, 3):
    p = P.pathological(LABELS, 20, k, seed=0)
    counts = P.class_counts(p, LABELS, split='all')
    assert ((counts > 0).sum(axis=1) <= k).all()
    assert ((counts > 0).sum(axis=1) == k).all()  # enough examples for every holder


def test_shards_few_classes_equal_sizes():
  p = P.shards(LABELS, 20, 2, seed=0)
  sizes = p.train_sizes() + p.test_sizes()
  assert (sizes == 30).all()
  assert ((P.class_counts(p, LABELS, split='all') > 0).sum(axis=1) <= 4).all()


def test_quantity_skew_sizes_unequal_labels_iid():
  p = P.quantity_skew(LABELS, 20, sigma=2.0, min_size=5, seed=0)
  sizes = p.train_sizes() + p.test_sizes()
  assert sizes.min() >= 5 and sizes.max() > 4 * sizes.min()
  assert sizes.sum() == len(LABELS)


def test_feature_skew_transform():
  spec = P.feature_skew(4, kind='shift', strength=1.0, seed=0)
  x = np.zeros((3, 5, 1), np.float32)
  np.testing.assert_allclose(P.apply_feature_skew(spec, 2, x), spec.shift[2])
  rot = P.FeatureSkew(np.zeros(1), np.ones(1), np.zeros(1), np.array([2]))
  sig = np.arange(5, dtype=np.float32).reshape(1, 5, 1)
  np.testing.assert_array_equal(P.apply_feature_skew(rot, 0, sig)[0, :, 0], [3, 4, 0, 1, 2])
  noisy = P.feature_skew(4, kind='noise', strength=0.5)
  a = P.apply_feature_skew(noisy, 3, np.zeros((200, 5, 1)))
  assert abs(a.std() - 0.5) < 0.05
  np.testing.assert_array_equal(a, P.apply_feature_skew(noisy, 3, np.zeros((200, 5, 1))))
  assert (P.apply_feature_skew(noisy, 0, np.zeros((2, 5, 1))) == 0).all()


def test_pack_partition_masks_and_counts():
  x = np.arange(len(LABELS), dtype=np.float32)[:, None]
  p = P.dirichlet(LABELS, 10, 0.5, min_size=5, seed=0)
  tr, te = packing.pack_partition(x, LABELS, p, batch_size=8)
  assert tr.x.shape[1] % 8 == 0
  for k in range(10):
    n = tr.count[k]
    np.testing.assert_array_equal(tr.x[k, :n, 0], x[p.train[k], 0])
    np.testing.assert_array_equal(tr.label[k, :n], LABELS[p.train[k]])
    assert tr.mask[k, :n].all() and not tr.mask[k, n:].any()
    assert (tr.label[k, n:] == -1).all() and (tr.x[k, n:] == 0).all()
    assert te.count[k] == len(p.test[k])


def test_stats_table_and_heatmap(tmp_path):
  p = P.dirichlet(LABELS, 12, 0.1, min_size=5, seed=0)
  text = P.format_stats(p, LABELS, max_rows=5)
  assert 'client' in text and '(7 more clients)' in text
  counts = P.class_counts(p, LABELS, split='all')
  assert counts.sum() == len(LABELS)
  path = P.plot_heatmap(p, LABELS, str(tmp_path / 'heat.png'))
  with open(path, 'rb') as f:
    assert f.read(8) == b'\x89PNG\r\n\x1a\n'


@pytest.mark.parametrize('call,match', [
    (lambda: P.dirichlet(LABELS, 10, 0.0), 'alpha must be > 0'),
    (lambda: P.dirichlet(LABELS, 10, -1.0), 'alpha must be > 0'),
    (lambda: P.iid(LABELS[:5], 6), '6 clients but only 5 examples'),
    (lambda: P.dirichlet(LABELS, 100, 0.5, min_size=7), 'cannot give 100 clients at least 7'),
    (lambda: P.quantity_skew(LABELS, 100, min_size=7), 'cannot give 100 clients'),
    (lambda: P.pathological(LABELS, 3, 2), 'cannot cover 10 classes'),
    (lambda: P.pathological(LABELS, 20, 11), 'classes_per_client must be between'),
    (lambda: P.make_partition(LABELS, 5, 'banana'), 'unknown partition method'),
    (lambda: P.feature_skew(3, kind='blur'), 'feature skew kind'),
    (lambda: P.feature_skew(3, kind='noise', strength=-0.1), 'strength must be a number >= 0'),
    (lambda: P.feature_skew(3, kind='shift', strength=float('nan')), 'strength must be'),
    (lambda: P.feature_skew(3, kind='scale', strength=1.0), "'scale' needs strength < 1"),
    (lambda: P.feature_skew(3, kind='rotate', strength=0.5), 'whole number of steps'),
    (lambda: P.quantity_skew(LABELS, 10, sigma=-1.0), 'sigma must be a number >= 0'),
    (lambda: P.quantity_skew(LABELS, 10, distribution='powerlaw', exponent=float('inf')),
     'exponent must be'),
    (lambda: P.shards(LABELS, 10, 0), 'shards_per_client must be an integer >= 1'),
    (lambda: P.make_partition(LABELS, 10, 'dirichlet', alpah=0.5),
     "partition 'dirichlet' has no option 'alpah'"),
    (lambda: P.make_partition(LABELS, 10, 'pathological', classes_per_client=2, sigma=1.0,
                              bogus=1), "has no option 'bogus'; it takes classes_per_client"),
])
def test_user_errors_one_line(call, match):
  with pytest.raises(UserError, match=match) as e:
    call()
  assert '\n' not in str(e.value)


def test_make_partition_ignores_other_methods_options_but_not_typos():
  p = P.make_partition(LABELS, 10, 'iid', alpha=0.5, min_size=10, seed=0)
  np.testing.assert_array_equal(np.sort(_all(p)), np.arange(len(LABELS)))
  with pytest.raises(UserError, match="partition 'iid'"):
    P.make_partition(LABELS, 10, 'iid', alpah=0.5)
