"""Grain pipelines: an endless shuffled training stream and a one-pass eval stream.

**Sharding.** ``batch_size`` is the *global* batch. Both pipelines first decide
the global batch (which record indices, in which order); process
``shard_index`` of ``shard_count`` then reads only its contiguous slice
``[shard_index * b, (shard_index + 1) * b)`` of it, with ``b = batch_size //
shard_count``. The concatenation of the per-process batches in process order is
the global batch, which is what ``jax.make_array_from_process_local_data``
expects, and the global batch sequence does not depend on the number of
processes.

**Training stream.** Epoch ``e`` visits the records in a permutation drawn from
``(seed, e)`` (grain's ``shuffle`` reseeded by ``repeat``); the stream repeats
forever. With ``drop_remainder=True`` every epoch is cut to ``(n // batch_size)
* batch_size`` examples (a different tail is dropped each epoch) so no batch
mixes epochs; with ``False`` the whole permutation is used and a batch may
straddle two epochs. Each example carries the ``epoch`` it belongs to, so a
seeded augmentation of ``(seed, id, epoch)`` is known from the batch.

**Eval stream.** One pass in record order; the last global batch is padded, and
padded rows carry ``mask=False``, ``label=-1``, ``id=-1`` and zero ``x``.

Every batch is a dict of numpy arrays with a static per-process shape:
``x`` float32 ``[b, ...]``, ``label`` int32 ``[b]`` (-1: unlabeled), ``id`` int32
``[b]`` (record index in the split), ``epoch`` int32 ``[b]``, ``mask`` bool
``[b]``. The iterators are grain ``DatasetIterator``s: ``get_state()`` /
``set_state()`` resume exactly (rebuild the iterator with the same arguments,
then set the state); see ``kdjax.data.iterator_save_args`` for orbax.
"""

from __future__ import annotations

import os
from typing import Any, Sequence

import grain
import numpy as np

from kdjax.data import sources as sources_lib
from kdjax.data.errors import DataError
from kdjax.data.preprocessing import preprocess

_DEFAULT_READ = dict(num_threads=2, prefetch_buffer_size=4)


def steps_per_epoch(num_examples: int, batch_size: int,
                    drop_remainder: bool = True) -> int:
  """Global batches per pass over ``num_examples`` examples."""
  if drop_remainder:
    return num_examples // batch_size
  return -(-num_examples // batch_size)


def _resolve(source, split, data_dir, dataset):
  if isinstance(source, str):
    return sources_lib.load_source(source, split, data_dir=data_dir), source
  return source, dataset


def _shard(batch_size: int, shard_index, shard_count) -> tuple[int, int]:
  if shard_index is None or shard_count is None:
    import jax  # pylint: disable=g-import-not-at-top
    shard_index = jax.process_index() if shard_index is None else shard_index
    shard_count = jax.process_count() if shard_count is None else shard_count
  if not 0 <= shard_index < shard_count:
    raise DataError(
        f'shard_index must be in [0, {shard_count}), got {shard_index}.')
  if batch_size <= 0 or batch_size % shard_count:
    raise DataError(
        f'Global batch size {batch_size} must be a positive multiple of the '
        f'number of processes {shard_count}; change batch_size.')
  per_process = batch_size // shard_count
  return shard_index * per_process, (shard_index + 1) * per_process


class _WithEpoch:
  """Stream position ``k`` holding record ``i`` -> ``(i, k // epoch_len)``."""

  def __init__(self, epoch_len: int):
    self._epoch_len = epoch_len

  def __call__(self, position: int, record_index: int):
    return np.int64(record_index), np.int32(position // self._epoch_len)


class _Reader:
  """Reads and preprocesses records of one data set into a batch dict."""

  def __init__(self, source: Sequence[Any], name: str | None):
    self._source = source
    self._name = name
    self._keys = sources_lib.record_keys(name, source[0])
    first = self.read(np.zeros(1, np.int64))
    self._pad = {k: np.zeros_like(v[:1]) for k, v in first.items()}
    self._pad['label'][:] = -1
    self._pad['id'][:] = -1
    if 'mask' in self._pad:
      self._pad['mask'][:] = False

  def read(self, indices: np.ndarray) -> dict[str, np.ndarray]:
    records = sources_lib.read_records(self._source, indices)
    raw = sources_lib.stack_records(records, self._keys)
    return preprocess(self._name, raw, indices)

  def padding(self, count: int) -> dict[str, np.ndarray]:
    return {k: np.repeat(v, count, axis=0) for k, v in self._pad.items()}


class _TrainBatch:
  """Global ``(indices, epochs)`` -> this process's preprocessed slice."""

  def __init__(self, reader: _Reader, lo: int, hi: int):
    self._reader, self._lo, self._hi = reader, lo, hi

  def __call__(self, batch):
    indices, epochs = batch
    indices, epochs = indices[self._lo:self._hi], epochs[self._lo:self._hi]
    out = self._reader.read(indices)
    out['epoch'] = epochs.astype(np.int32)
    if 'mask' not in out:   # token data brings its own per-position mask
      out['mask'] = np.ones(len(indices), bool)
    return out


class _EvalBatch:
  """Global batch number -> this process's slice, padded past the end."""

  def __init__(self, reader: _Reader, n: int, batch_size: int, lo: int,
               hi: int):
    self._reader, self._n, self._batch_size = reader, n, batch_size
    self._lo, self._hi = lo, hi

  def __call__(self, k: int):
    positions = k * self._batch_size + np.arange(self._lo, self._hi)
    valid = positions[positions < self._n]
    parts = []
    if len(valid):
      parts.append(self._reader.read(valid))
    if len(valid) < len(positions):
      parts.append(self._reader.padding(len(positions) - len(valid)))
    out = {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}
    out['epoch'] = np.zeros(len(positions), np.int32)
    valid = positions < self._n
    out['mask'] = valid if 'mask' not in out else out['mask'] & valid.reshape(
        (-1,) + (1,) * (out['mask'].ndim - 1))
    return out


def _read_options(read_options):
  if read_options is None:
    return grain.ReadOptions(**_DEFAULT_READ)
  return read_options


def make_train_iterator(
    source: str | Sequence[Any],
    *,
    batch_size: int,
    seed: int,
    split: str = 'train',
    data_dir: str | os.PathLike | None = None,
    dataset: str | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    drop_remainder: bool = True,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
  """An endless, seeded, per-process-sharded stream of training batches.

  Args:
    source: a data set name (read with ``load_source(source, split)``) or a
      random-access sequence of records.
    batch_size: the global batch size (all processes together).
    seed: shuffling seed, an integer in ``[0, 2**32)``.
    split: split to read when ``source`` is a name.
    data_dir: TFDS data directory when ``source`` is a name.
    dataset: when ``source`` is a sequence, the data set whose preprocessing
      applies (e.g. ``'mnist1d'``); None means records already hold ``'x'``
      (and optionally ``'label'``).
    shard_index: this process's index; default ``jax.process_index()``.
    shard_count: number of processes; default ``jax.process_count()``.
    drop_remainder: cut every epoch to whole global batches (see module doc).
    read_options: grain read options (threads, prefetch buffer).

  Returns:
    A grain ``DatasetIterator`` of batch dicts (``x``, ``label``, ``id``,
    ``epoch``, ``mask``) with ``batch_size // shard_count`` rows.

  >>> import numpy as np
  >>> records = [{'x': np.full((2,), i, np.float32), 'label': i % 3}
  ...            for i in range(10)]
  >>> it = make_train_iterator(records, batch_size=4, seed=0,
  ...                          shard_index=0, shard_count=1)
  >>> batch = next(it)
  >>> sorted(batch), batch['x'].shape, batch['epoch'].tolist()
  (['epoch', 'id', 'label', 'mask', 'x'], (4, 2), [0, 0, 0, 0])
  >>> bool(np.all(batch['x'][:, 0] == batch['id']))
  True
  """
  source, name = _resolve(source, split, data_dir, dataset)
  lo, hi = _shard(batch_size, shard_index, shard_count)
  n = len(source)
  epoch_len = (n // batch_size) * batch_size if drop_remainder else n
  if epoch_len == 0:
    raise DataError(
        f'The split has {n} examples, fewer than one global batch of '
        f'{batch_size}; lower batch_size.')
  if not 0 <= seed < 2**32:
    raise DataError(f'seed must be in [0, 2**32), got {seed}.')
  reader = _Reader(source, name)
  order = grain.MapDataset.range(n).shuffle(seed=seed)
  if epoch_len < n:
    order = order[:epoch_len]
  ds = (order.repeat()
        .map_with_index(_WithEpoch(epoch_len))
        .batch(batch_size)
        .map(_TrainBatch(reader, lo, hi)))
  return iter(ds.to_iter_dataset(_read_options(read_options)))


def make_eval_iterator(
    source: str | Sequence[Any],
    *,
    batch_size: int,
    split: str = 'test',
    data_dir: str | os.PathLike | None = None,
    dataset: str | None = None,
    shard_index: int | None = None,
    shard_count: int | None = None,
    read_options: grain.ReadOptions | None = None,
) -> grain.DatasetIterator:
  """One pass over a split in record order, with static batch shapes.

  Args:
    source: as for ``make_train_iterator``.
    batch_size: the global batch size.
    split: split to read when ``source`` is a name.
    data_dir: TFDS data directory when ``source`` is a name.
    dataset: as for ``make_train_iterator``.
    shard_index: this process's index; default ``jax.process_index()``.
    shard_count: number of processes; default ``jax.process_count()``.
    read_options: grain read options.

  Returns:
    A grain ``DatasetIterator`` of ``ceil(n / batch_size)`` batch dicts; padded
    rows of the last batch have ``mask=False``.

  >>> import numpy as np
  >>> records = [{'x': np.ones((2,), np.float32), 'label': 1} for _ in range(5)]
  >>> batches = list(make_eval_iterator(records, batch_size=4,
  ...                                   shard_index=0, shard_count=1))
  >>> [b['mask'].tolist() for b in batches]
  [[True, True, True, True], [True, False, False, False]]
  >>> batches[1]['id'].tolist(), batches[1]['label'].tolist()
  ([4, -1, -1, -1], [1, -1, -1, -1])
  """
  source, name = _resolve(source, split, data_dir, dataset)
  lo, hi = _shard(batch_size, shard_index, shard_count)
  n = len(source)
  if n == 0:
    raise DataError('The split is empty; pick another split.')
  reader = _Reader(source, name)
  num_batches = steps_per_epoch(n, batch_size, drop_remainder=False)
  ds = grain.MapDataset.range(num_batches).map(
      _EvalBatch(reader, n, batch_size, lo, hi))
  return iter(ds.to_iter_dataset(_read_options(read_options)))
