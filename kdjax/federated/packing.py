"""Client packing: a partition becomes padded ``[clients, examples, ...]`` arrays.

The simulator vmaps over the leading client axis, so every client needs the
same shape: client ``k``'s examples fill rows ``0 .. count[k]-1`` and the rest
are padding (zeros, label ``-1``, ``mask`` False). Padding never contributes to
a loss, a gradient or a metric.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from kdjax.federated.partition import FeatureSkew
from kdjax.federated.partition import Partition
from kdjax.federated.partition import apply_feature_skew


class ClientData(NamedTuple):
  """Padded per-client arrays (a pytree; numpy or jax arrays).

  Attributes:
    x: ``[clients, examples, ...]`` inputs.
    label: ``[clients, examples]`` int32 labels, ``-1`` on padding.
    mask: ``[clients, examples]`` bool, True on real examples.
    count: ``[clients]`` int32 number of real examples.
  """

  x: np.ndarray
  label: np.ndarray
  mask: np.ndarray
  count: np.ndarray


def pad_length(max_count: int, multiple: int = 1) -> int:
  """``max_count`` rounded up to a multiple of ``multiple`` (at least one multiple).

  >>> pad_length(37, 10), pad_length(0, 8)
  (40, 8)
  """
  multiple = max(int(multiple), 1)
  return max(-(-int(max_count) // multiple), 1) * multiple


def pack(x, labels, index_lists, *, multiple: int = 1, length: int | None = None,
         skew: FeatureSkew | None = None) -> ClientData:
  """Packs ``x[index_lists[k]]`` for every client ``k`` into padded arrays.

  Args:
    x: ``[n, ...]`` inputs.
    labels: ``[n]`` labels.
    index_lists: one index array per client.
    multiple: pad the example axis to a multiple of this (the local batch size,
      so that local epochs are whole batches).
    length: the padded length (default: the largest client, rounded up).
    skew: an optional per-client feature transform.

  Returns:
    A :class:`ClientData` of numpy arrays.

  >>> d = pack(np.arange(5.0)[:, None], np.arange(5), [np.array([0, 1, 2]), np.array([4])], multiple=2)
  >>> d.x.shape, d.label.tolist(), d.count.tolist()
  ((2, 4, 1), [[0, 1, 2, -1], [4, -1, -1, -1]], [3, 1])
  """
  x = np.asarray(x)
  labels = np.asarray(labels)
  counts = np.array([len(i) for i in index_lists], np.int32)
  e = pad_length(counts.max(initial=0), multiple) if length is None else int(length)
  if counts.max(initial=0) > e:
    raise ValueError(f'a client holds {counts.max()} examples, more than length={e}')
  k = len(index_lists)
  # Integer inputs (character ids) stay integers; everything else is float32.
  xs = np.zeros((k, e, *x.shape[1:]),
                np.int32 if np.issubdtype(x.dtype, np.integer) and skew is None else np.float32)
  ys = np.full((k, e), -1, np.int32)
  mask = np.zeros((k, e), bool)
  for c, idx in enumerate(index_lists):
    idx = np.asarray(idx, np.int64)
    n = len(idx)
    xc = x[idx]
    if skew is not None and n:
      xc = apply_feature_skew(skew, c, xc)
    xs[c, :n] = xc
    ys[c, :n] = labels[idx]
    mask[c, :n] = True
  return ClientData(xs, ys, mask, counts)


def pad_to(data: ClientData, length: int) -> ClientData:
  """``data`` with its example axis padded to ``length`` (zeros, label -1, mask False).

  Local training does not see the difference: the shuffle puts real examples first
  in the same order (per-position random numbers), and all-padding batches are
  skipped, so a client trains the same on ``pad_to(data, L)`` as on ``data``.

  >>> d = pad_to(pack(np.ones((2, 1)), np.array([0, 1]), [np.array([0, 1])]), 4)
  >>> d.x.shape, d.label.tolist(), d.mask.tolist(), d.count.tolist()
  ((1, 4, 1), [[0, 1, -1, -1]], [[True, True, False, False]], [2])
  """
  e = data.mask.shape[1]
  if length < e:
    raise ValueError(f'cannot pad {e} examples per client down to {length}')
  pad = int(length) - e
  widths = lambda a: [(0, 0), (0, pad)] + [(0, 0)] * (np.ndim(a) - 2)
  return ClientData(np.pad(np.asarray(data.x), widths(data.x)),
                    np.pad(np.asarray(data.label), widths(data.label), constant_values=-1),
                    np.pad(np.asarray(data.mask), widths(data.mask)),
                    np.asarray(data.count))


def pack_partition(x, labels, partition: Partition, *, batch_size: int = 1,
                   skew: FeatureSkew | None = None) -> tuple[ClientData, ClientData]:
  """Packs a partition's train and local test splits.

  Args:
    x: ``[n, ...]`` inputs the partition indexes.
    labels: ``[n]`` labels.
    partition: the :class:`~kdjax.federated.partition.Partition`.
    batch_size: the train arrays are padded to a multiple of it.
    skew: an optional per-client feature transform (applied to both splits).

  Returns:
    ``(train, test)`` :class:`ClientData`.

  >>> from kdjax.federated.partition import iid
  >>> tr, te = pack_partition(np.zeros((20, 3)), np.arange(20) % 2, iid(np.arange(20) % 2, 4), batch_size=3)
  >>> tr.x.shape, te.x.shape, tr.count.tolist(), te.count.tolist()
  ((4, 6, 3), (4, 1, 3), [4, 4, 4, 4], [1, 1, 1, 1])
  """
  train = pack(x, labels, partition.train, multiple=batch_size, skew=skew)
  test = pack(x, labels, partition.test, skew=skew)
  return train, test


def nbytes(data: ClientData) -> int:
  """Total bytes of the packed arrays.

  >>> nbytes(ClientData(np.zeros((2, 3), np.float32), np.zeros((2,), np.int32), np.zeros(2, bool), np.zeros(2, np.int32)))
  42
  """
  return int(sum(np.asarray(a).nbytes for a in data))
