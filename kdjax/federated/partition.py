"""Non-IID partitioners: which examples each simulated client holds.

Every partitioner is a pure function of the labels and a seed (numpy only) and
returns a :class:`Partition`: one index array per client for local training and
one for the client's local test split (personalized accuracy). Every example of
the input is assigned exactly once, to one client's train or test split.

The local test split is carved out of each client's own examples (LEAF-style):
``floor(test_fraction * n_i)`` of them, always leaving at least one training
example. ``min_size`` counts a client's examples before that split.

Natural clients (:func:`natural`, LEAF's Shakespeare speaking roles) come
from a per-example client id instead of the labels.

Feature skew (:func:`feature_skew`) is a transform spec layered on any label
partition; :func:`apply_feature_skew` applies it to one client's inputs.

References:
  McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", AISTATS 2017 (shards, pathological non-IID).
  Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution for
  Federated Visual Classification", arXiv:1909.06335, 2019 (Dirichlet label skew).
  Li, Diao, Chen & He, "Federated Learning on Non-IID Data Silos: An Experimental
  Study", ICDE 2022 (quantity and feature skew).
"""

from __future__ import annotations

import dataclasses
import inspect
import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from kdjax import storage
from kdjax.errors import UserError
from kdjax.errors import check_number


@dataclasses.dataclass(frozen=True)
class Partition:
  """Which examples each client holds.

  Attributes:
    train: one int64 index array per client (its local training examples).
    test: one int64 index array per client (its local test split; may be empty).
    num_classes: the number of classes of the labels partitioned.
    method: the partitioner's name.
    options: the options it ran with (for the stats table and manifests).
    client_names: optional name of every client (Shakespeare roles); empty
      when clients are anonymous.
  """

  train: tuple[np.ndarray, ...]
  test: tuple[np.ndarray, ...]
  num_classes: int
  method: str
  options: Mapping[str, Any] = dataclasses.field(default_factory=dict)
  client_names: tuple[str, ...] = ()

  @property
  def num_clients(self) -> int:
    return len(self.train)

  def train_sizes(self) -> np.ndarray:
    return np.array([len(i) for i in self.train], np.int64)

  def test_sizes(self) -> np.ndarray:
    return np.array([len(i) for i in self.test], np.int64)


# --------------------------------------------------------------------------- checks

def _finite_nonnegative(v: float) -> bool:
  return 0 <= v < float('inf')


def _check_common(labels, num_clients: int, min_size: int = 1) -> np.ndarray:
  labels = np.asarray(labels)
  if labels.ndim != 1:
    raise UserError(f'labels must be one-dimensional, got shape {labels.shape}.')
  n = len(labels)
  if int(num_clients) < 1:
    raise UserError(f'num_clients must be at least 1, got {num_clients}.')
  if num_clients > n:
    raise UserError(
        f'{num_clients} clients but only {n} examples: use at most {n} clients.')
  if min_size < 1:
    raise UserError(f'min_size must be at least 1, got {min_size}.')
  if num_clients * min_size > n:
    raise UserError(
        f'cannot give {num_clients} clients at least {min_size} examples each from '
        f'{n} examples: lower min_size to at most {n // num_clients} or use fewer clients.')
  return labels


def _num_classes(labels: np.ndarray, num_classes: int | None) -> int:
  found = int(labels.max()) + 1 if len(labels) else 0
  if num_classes is None:
    return found
  if found > num_classes:
    raise UserError(f'labels go up to {found - 1} but num_classes is {num_classes}.')
  return int(num_classes)


def _finish(assign: list[np.ndarray], labels, rng: np.random.Generator,
            test_fraction: float, num_classes, method: str, options) -> Partition:
  if not 0.0 <= test_fraction < 1.0:
    raise UserError(f'test_fraction must be in [0, 1), got {test_fraction}.')
  train, test = [], []
  for idx in assign:
    idx = rng.permutation(np.asarray(idx, np.int64))
    n_test = min(int(math.floor(test_fraction * len(idx))), max(len(idx) - 1, 0))
    test.append(np.sort(idx[:n_test]))
    train.append(np.sort(idx[n_test:]))
  return Partition(tuple(train), tuple(test), _num_classes(np.asarray(labels), num_classes),
                   method, dict(options))


# --------------------------------------------------------------------------- partitioners

def iid(labels, num_clients: int, *, seed: int = 0, test_fraction: float = 0.2,
        num_classes: int | None = None) -> Partition:
  """Shuffles the examples and deals them into ``num_clients`` near-equal parts.

  Args:
    labels: ``[n]`` integer labels.
    num_clients: how many clients.
    seed: the partition seed.
    test_fraction: share of each client's examples kept for its local test split.
    num_classes: the class count (default: ``max(labels) + 1``).

  Returns:
    A :class:`Partition`.

  >>> p = iid(np.arange(10) % 2, 3, seed=0, test_fraction=0.0)
  >>> [len(i) for i in p.train]
  [4, 3, 3]
  """
  labels = _check_common(labels, num_clients)
  rng = np.random.default_rng(seed)
  parts = np.array_split(rng.permutation(len(labels)), num_clients)
  return _finish(parts, labels, rng, test_fraction, num_classes, 'iid', {})


def dirichlet(labels, num_clients: int, alpha: float, *, min_size: int = 10, seed: int = 0,
              test_fraction: float = 0.2, max_retries: int = 10,
              num_classes: int | None = None) -> Partition:
  r"""Label skew: each class is split over the clients by a Dirichlet(α) draw.

  For every class :math:`c`, proportions :math:`p_c \sim \mathrm{Dir}(\alpha
  \mathbf{1}_K)` over the :math:`K` clients decide how its examples are dealt
  out. Small α gives each client few classes; α → ∞ approaches IID
  (``alpha=float('inf')`` is accepted and means IID).

  The usual recipe redraws until every client has ``min_size`` examples, which
  can loop for a very long time at small α. Here at most ``max_retries`` draws
  are tried (the one with the fewest missing examples is kept) and then a
  deterministic fix-up moves examples from the largest clients to the short
  ones, one at a time, taking from the donor's most frequent class (so the
  skew is disturbed as little as possible). The fix-up always succeeds when
  ``num_clients * min_size <= n`` (checked up front).

  Args:
    labels: ``[n]`` integer labels.
    num_clients: how many clients.
    alpha: the Dirichlet concentration, > 0.
    min_size: the fewest examples (train + local test) a client may hold.
    seed: the partition seed.
    test_fraction: share of each client's examples kept for its local test split.
    max_retries: Dirichlet redraws before the fix-up.
    num_classes: the class count (default: ``max(labels) + 1``).

  Returns:
    A :class:`Partition`.

  Raises:
    UserError: α ≤ 0, more clients than examples, or an impossible ``min_size``.

  References:
    Hsu, Qi & Brown, arXiv:1909.06335, 2019.

  >>> labels = np.repeat(np.arange(10), 50)
  >>> p = dirichlet(labels, 10, 0.1, min_size=5, seed=0)
  >>> int((p.train_sizes() + p.test_sizes()).min()) >= 5
  True
  """
  if not alpha > 0:
    raise UserError(f'partition alpha must be > 0 (got {alpha}); for IID use the iid '
                    'method (or alpha=inf).')
  labels = _check_common(labels, num_clients, min_size)
  if math.isinf(alpha):
    p = iid(labels, num_clients, seed=seed, test_fraction=test_fraction,
            num_classes=num_classes)
    return dataclasses.replace(p, method='dirichlet', options={'alpha': alpha,
                                                               'min_size': min_size})
  rng = np.random.default_rng(seed)
  classes = np.unique(labels)
  by_class = {c: np.flatnonzero(labels == c) for c in classes}
  best, best_short = None, None
  for _ in range(max(1, int(max_retries))):
    owner = np.empty(len(labels), np.int64)
    for c in classes:
      idx = rng.permutation(by_class[c])
      props = rng.dirichlet(np.full(num_clients, float(alpha)))
      cuts = (np.cumsum(props)[:-1] * len(idx)).astype(np.int64)
      for k, part in enumerate(np.split(idx, cuts)):
        owner[part] = k
    sizes = np.bincount(owner, minlength=num_clients)
    short = int(np.maximum(min_size - sizes, 0).sum())
    if best is None or short < best_short:
      best, best_short = owner, short
    if short == 0:
      break
  owner = _fix_min_size(best, labels, num_clients, min_size)
  assign = [np.flatnonzero(owner == k) for k in range(num_clients)]
  return _finish(assign, labels, rng, test_fraction, num_classes, 'dirichlet',
                 {'alpha': alpha, 'min_size': min_size})


def _fix_min_size(owner: np.ndarray, labels: np.ndarray, num_clients: int,
                  min_size: int) -> np.ndarray:
  """Moves examples from the largest clients to those under ``min_size`` (deterministic)."""
  owner = owner.copy()
  sizes = np.bincount(owner, minlength=num_clients)
  for k in np.flatnonzero(sizes < min_size):
    while sizes[k] < min_size:
      donor = int(np.argmax(sizes))            # lowest id among the largest
      held = np.flatnonzero(owner == donor)
      counts = np.bincount(labels[held])
      take = held[labels[held] == int(np.argmax(counts))][-1]
      owner[take] = k
      sizes[donor] -= 1
      sizes[k] += 1
  return owner


def pathological(labels, num_clients: int, classes_per_client: int, *, seed: int = 0,
                 test_fraction: float = 0.2, num_classes: int | None = None) -> Partition:
  """Each client holds examples of exactly ``classes_per_client`` classes (at most).

  Client ``i`` is given the classes ``perm[(i * k + j) mod C]`` for ``j < k``
  (``perm`` a seeded permutation of the ``C`` classes present), so the classes
  are spread as evenly as possible; each class's examples are then dealt
  equally, in random order, to the clients that hold it.

  Args:
    labels: ``[n]`` integer labels.
    num_clients: how many clients.
    classes_per_client: ``k``, between 1 and the number of classes present.
    seed: the partition seed.
    test_fraction: share of each client's examples kept for its local test split.
    num_classes: the class count (default: ``max(labels) + 1``).

  Returns:
    A :class:`Partition`.

  Raises:
    UserError: ``k`` out of range, or too few clients to cover every class
      (some examples would be left unassigned), or a client left empty.

  References:
    McMahan et al., AISTATS 2017.

  >>> p = pathological(np.repeat(np.arange(4), 6), 4, 2, seed=0, test_fraction=0.0)
  >>> sorted({len(set((np.repeat(np.arange(4), 6))[i])) for i in p.train})
  [2]
  """
  labels = _check_common(labels, num_clients)
  classes = np.unique(labels)
  k = int(classes_per_client)
  if not 1 <= k <= len(classes):
    raise UserError(
        f'classes_per_client must be between 1 and {len(classes)}, got {classes_per_client}.')
  if num_clients * k < len(classes):
    raise UserError(
        f'{num_clients} clients with {k} classes each cannot cover {len(classes)} classes: '
        f'use at least {-(-len(classes) // k)} clients or more classes per client.')
  rng = np.random.default_rng(seed)
  perm = rng.permutation(classes)
  holders: dict[int, list[int]] = {int(c): [] for c in classes}
  for i in range(num_clients):
    for j in range(k):
      holders[int(perm[(i * k + j) % len(classes)])].append(i)
  assign: list[list[np.ndarray]] = [[] for _ in range(num_clients)]
  for c, who in holders.items():
    parts = np.array_split(rng.permutation(np.flatnonzero(labels == c)), len(who))
    for i, part in zip(who, parts):
      assign[i].append(part)
  assign = [np.concatenate(a) for a in assign]
  empty = [i for i, a in enumerate(assign) if len(a) == 0]
  if empty:
    raise UserError(
        f'pathological partition left {len(empty)} clients without examples: '
        'use fewer clients or more classes per client.')
  return _finish(assign, labels, rng, test_fraction, num_classes, 'pathological',
                 {'classes_per_client': k})


def shards(labels, num_clients: int, shards_per_client: int = 2, *, seed: int = 0,
           test_fraction: float = 0.2, num_classes: int | None = None) -> Partition:
  """Sort by label, cut into ``num_clients * shards_per_client`` shards, deal them out.

  Args:
    labels: ``[n]`` integer labels.
    num_clients: how many clients.
    shards_per_client: shards each client receives.
    seed: the partition seed.
    test_fraction: share of each client's examples kept for its local test split.
    num_classes: the class count (default: ``max(labels) + 1``).

  Returns:
    A :class:`Partition`.

  References:
    McMahan et al., AISTATS 2017 (200 shards of 300 MNIST digits, 2 per client).

  >>> p = shards(np.repeat(np.arange(5), 4), 5, 2, seed=0, test_fraction=0.0)
  >>> [len(i) for i in p.train]
  [4, 4, 4, 4, 4]
  """
  labels = _check_common(labels, num_clients)
  if isinstance(shards_per_client, bool) or not isinstance(shards_per_client, (int, np.integer)) \
      or shards_per_client < 1:
    raise UserError(f'shards_per_client must be an integer >= 1, got {shards_per_client!r}.')
  total = num_clients * int(shards_per_client)
  if total > len(labels):
    raise UserError(
        f'{total} shards need at least {total} examples (have {len(labels)}); '
        'use fewer clients or shards per client.')
  rng = np.random.default_rng(seed)
  # Stable sort after a shuffle: ties (same label) are in random order.
  shuffled = rng.permutation(len(labels))
  order = shuffled[np.argsort(labels[shuffled], kind='stable')]
  pieces = np.array_split(order, total)
  deal = rng.permutation(total).reshape(num_clients, shards_per_client)
  assign = [np.concatenate([pieces[s] for s in row]) for row in deal]
  return _finish(assign, labels, rng, test_fraction, num_classes, 'shards',
                 {'shards_per_client': int(shards_per_client)})


def quantity_skew(labels, num_clients: int, *, distribution: str = 'lognormal',
                  sigma: float = 1.0, exponent: float = 1.5, min_size: int = 10,
                  seed: int = 0, test_fraction: float = 0.2,
                  num_classes: int | None = None) -> Partition:
  """Unequal client sizes, IID labels.

  Sizes are ``min_size`` plus a share of the remaining ``n - K * min_size``
  examples proportional to a draw per client: ``exp(N(0, sigma²))``
  (``'lognormal'``) or ``rank ** -exponent`` over a random ranking
  (``'powerlaw'``, Zipf-like). Shares are rounded by largest remainder so the
  sizes sum to ``n``.

  Args:
    labels: ``[n]`` integer labels.
    num_clients: how many clients.
    distribution: ``'lognormal'`` or ``'powerlaw'``.
    sigma: log-normal spread.
    exponent: power-law exponent.
    min_size: the fewest examples a client may hold.
    seed: the partition seed.
    test_fraction: share of each client's examples kept for its local test split.
    num_classes: the class count (default: ``max(labels) + 1``).

  Returns:
    A :class:`Partition`.

  >>> p = quantity_skew(np.zeros(100, int), 4, min_size=5, seed=0, test_fraction=0.0)
  >>> int(p.train_sizes().sum()), int(p.train_sizes().min()) >= 5
  (100, True)
  """
  labels = _check_common(labels, num_clients, min_size)
  for name, value in (('sigma', sigma), ('exponent', exponent)):
    check_number(value, _finite_nonnegative,
                 f'quantity_skew {name} must be a number >= 0, got {value!r}.')
  rng = np.random.default_rng(seed)
  if distribution == 'lognormal':
    w = rng.lognormal(0.0, float(sigma), num_clients)
  elif distribution == 'powerlaw':
    w = (1.0 + rng.permutation(num_clients)) ** -float(exponent)
  else:
    raise UserError(
        f"quantity_skew distribution must be 'lognormal' or 'powerlaw', got {distribution!r}.")
  spare = len(labels) - num_clients * min_size
  exact = w / w.sum() * spare
  extra = np.floor(exact).astype(np.int64)
  left = spare - int(extra.sum())
  extra[np.argsort(-(exact - extra), kind='stable')[:left]] += 1
  sizes = min_size + extra
  parts = np.split(rng.permutation(len(labels)), np.cumsum(sizes)[:-1])
  return _finish(parts, labels, rng, test_fraction, num_classes, 'quantity_skew',
                 {'distribution': distribution, 'sigma': sigma, 'exponent': exponent,
                  'min_size': min_size})


def natural(client_ids, *, labels=None, test_mask=None, test_fraction: float = 0.2,
            min_size: int = 2, max_clients: int | None = None, max_size: int | None = None,
            seed: int = 0, num_classes: int | None = None, names=None) -> Partition:
  """Natural clients: each example names its client (LEAF's Shakespeare roles).

  Client ``k`` of the result holds the examples whose ``client_ids`` equal the
  ``k``-th kept id (kept ids in increasing order). Rules, in order:

  1. Local test split: with ``test_mask`` (True marks an example of the data
     set's own test split, e.g. a role's last 20% of windows), those examples;
     otherwise the last ``floor(test_fraction * n)`` of a client's examples in
     index order (by position, as LEAF splits a role's text), always leaving
     one for training.
  2. Ids with fewer than ``min_size`` examples (train + test) are dropped, as
     LEAF drops tiny roles, and so are ids left without a training example.
  3. ``max_clients``: a seeded subsample of that many of the remaining ids
     (all of them when there are fewer).
  4. ``max_size``: a client with more training examples keeps a seeded random
     subset of ``max_size`` (its test split is kept whole). The simulator pads
     every client to the largest one, so this caps the cost of a round.

  Args:
    client_ids: ``[n]`` integer client id of every example.
    labels: ``[n]`` labels (for ``num_classes`` and the stats; optional).
    test_mask: optional ``[n]`` bool, True for local test examples.
    test_fraction: the positional test share when ``test_mask`` is None.
    min_size: the fewest examples a kept client has.
    max_clients: keep at most this many clients (seeded), or None for all.
    max_size: cap on a client's training examples, or None.
    seed: the subsampling seed.
    num_classes: the class count (default: ``max(labels) + 1``).
    names: optional name per client id (indexable by id), stored in
      ``client_names``.

  Returns:
    A :class:`Partition` with ``method='natural'``.

  Raises:
    UserError: bad shapes, ``min_size < 1``, or no client left.

  References:
    Caldas et al., "LEAF: A Benchmark for Federated Settings", arXiv:1812.01097.

  >>> ids = np.array([0, 0, 0, 1, 2, 2, 2, 2, 2])
  >>> p = natural(ids, min_size=2, test_fraction=0.2)
  >>> [i.tolist() for i in p.train], [i.tolist() for i in p.test]
  ([[0, 1, 2], [4, 5, 6, 7]], [[], [8]])
  """
  client_ids = np.asarray(client_ids)
  if client_ids.ndim != 1 or not np.issubdtype(client_ids.dtype, np.integer):
    raise UserError(f'client_ids must be a 1-D integer array, got {client_ids.dtype} '
                    f'{client_ids.shape}.')
  n = len(client_ids)
  labels = np.zeros(n, np.int64) if labels is None else np.asarray(labels)
  if labels.shape != (n,):
    raise UserError(f'labels {labels.shape} and client_ids ({n},) differ in length.')
  if test_mask is not None:
    test_mask = np.asarray(test_mask, bool)
    if test_mask.shape != (n,):
      raise UserError(f'test_mask {test_mask.shape} and client_ids ({n},) differ in length.')
  if min_size < 1:
    raise UserError(f'min_size must be at least 1, got {min_size}.')
  if not 0.0 <= test_fraction < 1.0:
    raise UserError(f'test_fraction must be in [0, 1), got {test_fraction}.')
  order = np.argsort(client_ids, kind='stable')
  ids, starts = np.unique(client_ids[order], return_index=True)
  groups = np.split(order, starts[1:]) if n else []
  kept = []
  for cid, idx in zip(ids, groups):
    if test_mask is None:
      n_test = min(int(math.floor(test_fraction * len(idx))), len(idx) - 1)
      tr, te = idx[:len(idx) - n_test], idx[len(idx) - n_test:]
    else:
      tr, te = idx[~test_mask[idx]], idx[test_mask[idx]]
    if len(idx) >= min_size and len(tr):
      kept.append((int(cid), tr, te))
  if not kept:
    raise UserError(f'no client has at least {min_size} examples (and one for training): '
                    'lower min_size.')
  rng = np.random.default_rng(seed)
  if max_clients is not None and 0 < int(max_clients) < len(kept):
    pick = np.sort(rng.choice(len(kept), int(max_clients), replace=False))
    kept = [kept[i] for i in pick]
  train, test = [], []
  for _, tr, te in kept:
    if max_size is not None and len(tr) > int(max_size):
      tr = np.sort(rng.choice(tr, int(max_size), replace=False))
    train.append(np.asarray(tr, np.int64))
    test.append(np.asarray(te, np.int64))
  client_names = tuple(str(names[c]) for c, _, _ in kept) if names is not None else ()
  options = {'min_size': int(min_size), 'max_clients': max_clients, 'max_size': max_size}
  return Partition(tuple(train), tuple(test), _num_classes(labels, num_classes), 'natural',
                   options, client_names)


PARTITIONERS = {
    'iid': iid,
    'dirichlet': dirichlet,
    'pathological': pathological,
    'shards': shards,
    'quantity_skew': quantity_skew,
    'natural': natural,
}


_KNOWN_OPTIONS = frozenset({'alpha', 'min_size', 'classes_per_client', 'shards_per_client',
                            'distribution', 'sigma', 'exponent', 'max_retries',
                            'client_ids', 'test_mask', 'max_size', 'names'})


def make_partition(labels, num_clients: int, method: str = 'dirichlet', **options) -> Partition:
  """Runs the partitioner named ``method`` (a config's ``partition.method``).

  Args:
    labels: ``[n]`` integer labels.
    num_clients: how many clients.
    method: one of ``iid``, ``dirichlet``, ``pathological``, ``shards``,
      ``quantity_skew``, ``natural``.
    **options: that partitioner's keyword options. ``natural`` needs
      ``client_ids`` (and takes ``test_mask``, ``names``, ...); its
      ``num_clients`` is the number of clients to keep (``max_clients``), and
      fewer clients than that meeting ``min_size`` is an error.

  Returns:
    A :class:`Partition`.

  >>> make_partition(np.arange(6) % 2, 2, 'iid', test_fraction=0.0, alpha=0.5).num_clients
  2
  """
  if method not in PARTITIONERS:
    raise UserError(f'unknown partition method {method!r}; use one of {", ".join(PARTITIONERS)}.')
  fn = PARTITIONERS[method]
  # A config carries the options of several methods (alpha, min_size, ...): drop the
  # known ones this method does not take; anything else unknown is an error below.
  accepted = set(inspect.signature(fn).parameters)
  options = {k: v for k, v in options.items() if k in accepted or k not in _KNOWN_OPTIONS}
  unknown = sorted(set(options) - accepted)
  if unknown:
    takes = sorted(accepted - {'labels', 'num_clients', 'client_ids', 'max_clients'})
    raise UserError(f'partition {method!r} has no option {", ".join(map(repr, unknown))}; '
                    f'it takes {", ".join(takes)}.')
  if method == 'dirichlet':
    return fn(labels, num_clients, options.pop('alpha', 0.5), **options)
  if method == 'pathological':
    return fn(labels, num_clients, options.pop('classes_per_client', 2), **options)
  if method != 'natural':
    return fn(labels, num_clients, **options)
  if options.get('client_ids') is None:
    raise UserError("partition 'natural' needs per-example client ids: use a data set "
                    'with natural clients (shakespeare).')
  part = fn(options.pop('client_ids'), labels=labels, max_clients=num_clients, **options)
  if part.num_clients != int(num_clients):
    raise UserError(
        f'natural partition: only {part.num_clients} clients have at least '
        f'{part.options["min_size"]} examples; set num_clients to at most '
        f'{part.num_clients} (or lower partition.min_size).')
  return part


# --------------------------------------------------------------------------- feature skew

@dataclasses.dataclass(frozen=True)
class FeatureSkew:
  """Per-client input transforms: ``x -> roll(x, roll) * scale + shift + noise``.

  Attributes:
    shift: ``[clients]`` additive offsets.
    scale: ``[clients]`` multiplicative gains.
    noise_std: ``[clients]`` standard deviations of added Gaussian noise.
    roll: ``[clients]`` integer rotations. For 1-D signals (``[length, ch]``)
      a rotation is a circular shift along the length (the signal seen from a
      rotated starting point); for images (``[h, w, ch]``) it is a number of
      quarter turns (``np.rot90``).
    seed: the noise seed (noise is a function of ``(seed, client)``).
  """

  shift: np.ndarray
  scale: np.ndarray
  noise_std: np.ndarray
  roll: np.ndarray
  seed: int = 0


def feature_skew(num_clients: int, *, kind: str = 'noise', strength: float = 0.1,
                 seed: int = 0) -> FeatureSkew:
  """Draws a :class:`FeatureSkew` spec.

  Args:
    num_clients: how many clients.
    kind: ``'shift'`` (offset ~ U(-strength, strength)), ``'noise'`` (noise
      std = strength * i / (K - 1), growing with the client id, as in Li et al.),
      ``'scale'`` (gain ~ U(1 - strength, 1 + strength)) or ``'rotate'``
      (rotation ~ U{0, .., strength}, integer steps; see :class:`FeatureSkew`).
    strength: the magnitude: >= 0; below 1 for ``'scale'`` (gains stay
      positive); a whole number for ``'rotate'``.
    seed: the spec seed.

  Returns:
    A :class:`FeatureSkew`.

  >>> s = feature_skew(3, kind='noise', strength=0.2)
  >>> [round(float(v), 2) for v in s.noise_std]
  [0.0, 0.1, 0.2]
  """
  kinds = ('shift', 'noise', 'scale', 'rotate')
  if kind not in kinds:
    raise UserError(
        f"feature skew kind must be 'shift', 'noise', 'scale' or 'rotate', got {kind!r}.")
  check_number(strength, _finite_nonnegative,
               f'feature skew strength must be a number >= 0, got {strength!r}.')
  if kind == 'scale' and strength >= 1:
    raise UserError(f"feature skew 'scale' needs strength < 1 (gains in (1 - s, 1 + s) "
                    f'stay positive), got {strength}.')
  if kind == 'rotate' and float(strength) != int(strength):
    raise UserError(f"feature skew 'rotate' takes a whole number of steps as strength, "
                    f'got {strength}.')
  rng = np.random.default_rng(seed)
  zeros, ones = np.zeros(num_clients), np.ones(num_clients)
  shift, scale, noise, roll = zeros, ones, zeros, np.zeros(num_clients, np.int64)
  if kind == 'shift':
    shift = rng.uniform(-strength, strength, num_clients)
  elif kind == 'noise':
    noise = strength * np.arange(num_clients) / max(num_clients - 1, 1)
  elif kind == 'scale':
    scale = rng.uniform(1 - strength, 1 + strength, num_clients)
  else:
    roll = rng.integers(0, int(strength) + 1, num_clients)
  return FeatureSkew(shift, scale, noise, roll, seed)


def apply_feature_skew(spec: FeatureSkew, client: int, x: np.ndarray) -> np.ndarray:
  """Transforms one client's inputs ``x`` (``[n, ...]``) by ``spec``; pure numpy.

  >>> spec = FeatureSkew(np.array([1.0]), np.array([2.0]), np.zeros(1), np.array([1]))
  >>> apply_feature_skew(spec, 0, np.array([[[1.0], [2.0], [3.0]]]))[0, :, 0].tolist()
  [7.0, 3.0, 5.0]
  """
  x = np.asarray(x, np.float32)
  r = int(spec.roll[client])
  if r:
    if x.ndim == 4:      # [n, h, w, c] images: quarter turns
      x = np.rot90(x, r, axes=(1, 2))
    else:                # [n, length, ...] signals: circular shift
      x = np.roll(x, r, axis=1)
  x = x * np.float32(spec.scale[client]) + np.float32(spec.shift[client])
  if spec.noise_std[client] > 0:
    rng = np.random.default_rng([spec.seed, client])
    x = x + rng.normal(0.0, spec.noise_std[client], x.shape).astype(np.float32)
  return x.astype(np.float32)


# --------------------------------------------------------------------------- stats

def class_counts(partition: Partition, labels, *, split: str = 'train') -> np.ndarray:
  """``[clients, classes]`` example counts of ``split`` (``'train'``, ``'test'``, ``'all'``).

  >>> p = iid(np.array([0, 0, 1, 1]), 2, seed=0, test_fraction=0.0)
  >>> class_counts(p, np.array([0, 0, 1, 1])).sum(axis=1).tolist()
  [2, 2]
  """
  labels = np.asarray(labels)
  parts = {'train': [partition.train], 'test': [partition.test],
           'all': [partition.train, partition.test]}[split]
  out = np.zeros((partition.num_clients, partition.num_classes), np.int64)
  for group in parts:
    for k, idx in enumerate(group):
      out[k] += np.bincount(labels[idx], minlength=partition.num_classes)
  return out


def partition_stats(partition: Partition, labels) -> dict[str, Any]:
  """Summary numbers of a partition (sizes, classes per client, skew).

  ``label_tv_mean`` is the mean total-variation distance between a client's
  label distribution and the global one (0 for IID, near 1 for one class each).

  >>> labels = np.repeat(np.arange(2), 10)
  >>> s = partition_stats(iid(labels, 2, seed=0), labels)
  >>> s['num_clients'], s['num_examples']
  (2, 20)
  """
  counts = class_counts(partition, labels, split='all')
  sizes = counts.sum(axis=1)
  train = partition.train_sizes()
  glob = counts.sum(axis=0) / max(counts.sum(), 1)
  dist = counts / np.maximum(sizes[:, None], 1)
  tv = 0.5 * np.abs(dist - glob[None]).sum(axis=1)
  return {
      'method': partition.method,
      'options': dict(partition.options),
      'num_clients': partition.num_clients,
      'num_examples': int(sizes.sum()),
      'num_test_examples': int(partition.test_sizes().sum()),
      'size_min': int(sizes.min()),
      'size_mean': float(sizes.mean()),
      'size_max': int(sizes.max()),
      'size_std': float(sizes.std()),
      'train_size_min': int(train.min()),
      'classes_per_client_mean': float((counts > 0).sum(axis=1).mean()),
      'classes_per_client_min': int((counts > 0).sum(axis=1).min()),
      'label_tv_mean': float(tv.mean()),
  }


def format_stats(partition: Partition, labels, *, max_rows: int = 20) -> str:
  """A plain-text table: one row per client (size, test size, classes, counts).

  >>> print(format_stats(iid(np.array([0, 1, 0, 1]), 2, seed=0, test_fraction=0.0), np.array([0, 1, 0, 1])).splitlines()[0])
  client  train  test  classes  counts per class
  """
  counts = class_counts(partition, labels, split='all')
  lines = ['client  train  test  classes  counts per class']
  tr, te = partition.train_sizes(), partition.test_sizes()
  shown = range(min(partition.num_clients, max_rows))
  for k in shown:
    name = f'  ({partition.client_names[k]})' if partition.client_names else ''
    lines.append(f'{k:>6}  {tr[k]:>5}  {te[k]:>4}  {int((counts[k] > 0).sum()):>7}  '
                 + ' '.join(str(int(c)) for c in counts[k]) + name)
  if partition.num_clients > max_rows:
    lines.append(f'... ({partition.num_clients - max_rows} more clients)')
  s = partition_stats(partition, labels)
  lines.append(f'sizes min/mean/max {s["size_min"]}/{s["size_mean"]:.1f}/{s["size_max"]}, '
               f'classes per client {s["classes_per_client_mean"]:.2f}, '
               f'label TV to global {s["label_tv_mean"]:.3f}')
  return '\n'.join(lines)


def plot_heatmap(partition: Partition, labels, path: str, *, max_clients: int = 100) -> str:
  """Writes a clients × classes heatmap of example counts to ``path`` (PNG).

  Args:
    partition: the partition.
    labels: ``[n]`` labels it was built from.
    path: where to write the PNG.
    max_clients: plot at most this many clients (the first ones).

  Returns:
    ``path``.
  """
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  counts = class_counts(partition, labels, split='all')[:max_clients]
  fig, ax = plt.subplots(figsize=(max(4.0, 0.35 * partition.num_classes + 2),
                                  max(3.0, 0.12 * len(counts) + 1.5)))
  im = ax.imshow(counts, aspect='auto', cmap='viridis', interpolation='nearest')
  ax.set_xlabel('class')
  ax.set_ylabel('client')
  opts = ', '.join(f'{k}={v}' for k, v in partition.options.items())
  ax.set_title(f'{partition.method}({opts})' if opts else partition.method, fontsize=9)
  fig.colorbar(im, ax=ax, label='examples')
  fig.tight_layout()
  storage.savefig(fig, path, dpi=100)   # a local path or a gs:// URL
  plt.close(fig)
  return path
