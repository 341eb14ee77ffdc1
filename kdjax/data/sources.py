"""Loading data sets as random-access sources, through one TFDS code path.

Every data set, kdjax's own builders (``mnist1d``, ``uci_digits``,
``shakespeare``) and TFDS
catalog data sets (``cifar10``, ``mnist``, ...), is read with
``tfds.data_source(..., builder_kwargs={'file_format': 'array_record'})``: the
first call prepares the array_record files (generating kdjax's data locally, or
downloading a catalog data set, which needs internet), later calls only open them.
No TensorFlow is needed.

Preparation runs under an exclusive ``fcntl.flock`` on
``DATA_DIR/.locks/NAME.lock``, so several processes (pytest-xdist workers, the
processes of a multi-host job sharing a file system) can ask for the same data
set at once: one prepares it, the others wait and then open it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
from typing import Any, NamedTuple, Sequence

import numpy as np
import tensorflow_datasets as tfds

from kdjax.data import builders
from kdjax.data import preprocessing as preprocess_lib
from kdjax.data.errors import DataError

DATA_DIR_ENV = 'KDJAX_DATA_DIR'
_READ_CHUNK = 4096


def default_data_dir() -> str:
  """``$KDJAX_DATA_DIR`` if set, else ``~/.cache/kdjax/tensorflow_datasets``."""
  env = os.environ.get(DATA_DIR_ENV)
  if env:
    return env
  return os.path.join(os.path.expanduser('~'), '.cache', 'kdjax',
                      'tensorflow_datasets')


@contextlib.contextmanager
def _prepare_lock(data_dir: str, name: str):
  """Exclusive inter-process lock for preparing data set ``name``."""
  lock_dir = os.path.join(data_dir, '.locks')
  os.makedirs(lock_dir, exist_ok=True)
  path = os.path.join(lock_dir, preprocess_lib.base_name(name) + '.lock')
  with open(path, 'a') as f:
    fcntl.flock(f.fileno(), fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f.fileno(), fcntl.LOCK_UN)


def load_source(name: str, split: str | None, *,
                data_dir: str | os.PathLike | None = None) -> Any:
  """Random-access source of one split (prepared on first use).

  Args:
    name: TFDS name, optionally with config and version: ``'mnist1d'``,
      ``'mnist1d/small'``, ``'uci_digits'``, ``'cifar10'``, ...
    split: split name (``'train'``, ``'test'``, ``'transfer'``; TFDS slicing
      such as ``'train[:10%]'`` works), or None for a dict of all splits.
    data_dir: where array_record files live; default ``default_data_dir()``.

  Returns:
    A sequence of records (dicts of numpy arrays / Python scalars) supporting
    ``len``, ``src[i]`` and ``src.__getitems__(indices)``.

  Raises:
    DataError: the data set or split does not exist.
  """
  data_dir = os.fspath(data_dir or default_data_dir())
  with _prepare_lock(data_dir, name):
    try:
      return tfds.data_source(
          name, split=split, data_dir=data_dir, download=True,
          builder_kwargs={'file_format': 'array_record'})
    except tfds.core.registered.DatasetNotFoundError:
      raise DataError(
          f'Unknown data set {name!r}: kdjax builds '
          f'{", ".join(builders.NAMES)} offline; other names must be TFDS '
          f'catalog data sets, which need internet the first time.') from None
    except ValueError as e:
      if split is not None and str(e).startswith('Unknown split'):
        choices = str(e).split('Should be one of ')[-1].rstrip('.')
        raise DataError(f'Data set {name!r} has no split {split!r}; use one '
                        f'of {choices}.') from None
      raise


class DatasetSpec(NamedTuple):
  """What a model and an engine need to know about a data set.

  Attributes:
    name: the TFDS name asked for.
    input_shape: shape of one standard example's ``'x'`` (channels last).
    num_classes: number of classes (the vocabulary size for token data).
    splits: split name -> number of examples.
    input_dtype: dtype of ``'x'``: ``'float32'``, or ``'int32'`` for token ids.
  """

  name: str
  input_shape: tuple[int, ...]
  num_classes: int
  splits: dict[str, int]
  input_dtype: str = 'float32'


def dataset_spec(name: str, *,
                 data_dir: str | os.PathLike | None = None) -> DatasetSpec:
  """Input shape, class count and split sizes of a data set (prepares it).

  Args:
    name: as for ``load_source``.
    data_dir: as for ``load_source``.

  Returns:
    A ``DatasetSpec``; for example ``mnist1d`` gives input shape ``(40, 1)`` and
    10 classes.
  """
  sources = load_source(name, None, data_dir=data_dir)
  if sources:
    info = next(iter(sources.values())).dataset_info
  else:
    # Metadata without split records (TFDS's mock data, for one): read the usual
    # splits one by one.
    for split in ('train', 'test'):
      try:
        sources[split] = load_source(name, split, data_dir=data_dir)
      except (DataError, ValueError, KeyError):
        pass
    if not sources:
      raise DataError(f'Data set {name!r} reports no splits; is it prepared?')
    info = next(iter(sources.values())).dataset_info
  features = info.features
  recipe = preprocess_lib.recipe_for(name, features.keys())
  shape = preprocess_lib.input_shape(
      name, tuple(features[recipe.input_key].shape))
  label = features['label'] if 'label' in features else None
  num_classes = int(getattr(label, 'num_classes', 0) or 0)
  if not num_classes and 'vocab_size' in (info.metadata or {}):
    num_classes = int(info.metadata['vocab_size'])   # token data: the vocabulary
  splits = {s: int(info.splits[s].num_examples) for s in info.splits.keys()}
  if not splits:
    splits = {s: len(src) for s, src in sources.items()}
  return DatasetSpec(name=name, input_shape=shape, num_classes=num_classes,
                     splits=splits, input_dtype=recipe.dtype)


def read_records(source: Sequence[Any], indices: Sequence[int]) -> list[Any]:
  """``[source[i] for i in indices]``, batched where the source supports it."""
  indices = [int(i) for i in indices]
  getitems = getattr(source, '__getitems__', None)
  if getitems is not None:
    return list(getitems(indices))
  return [source[i] for i in indices]


def stack_records(records: Sequence[dict], keys) -> dict[str, np.ndarray]:
  """Stacks the ``keys`` present in the records along a new batch axis."""
  keys = [k for k in keys if k in records[0]]
  return {k: np.stack([np.asarray(r[k]) for r in records]) for k in keys}


def record_keys(name: str | None, sample: dict) -> tuple[str, ...]:
  """The record features that preprocessing for ``name`` reads."""
  recipe = preprocess_lib.recipe_for(name, sample.keys())
  mask = (recipe.mask_key,) if recipe.mask_key else ()
  return (recipe.input_key, recipe.label_key, 'labeled', *mask, *recipe.extra_keys)


def load_arrays(name: str, split: str, *,
                data_dir: str | os.PathLike | None = None
                ) -> dict[str, np.ndarray]:
  """A whole split, preprocessed, as numpy arrays (for small data sets).

  Args:
    name: as for ``load_source``.
    split: as for ``load_source``.
    data_dir: as for ``load_source``.

  Returns:
    ``{'x': [n, ...] float32, 'label': [n] int32, 'id': [n] int32}`` with
    ``id == arange(n)`` (the record index in the split); ``x`` is int32 for
    token data (``shakespeare``), which also has ``'client'`` ``[n]`` int32. The arrays
    are read-only: the process keeps the last few splits it decoded and hands them out
    again while their files are unchanged.
  """
  source = load_source(name, split, data_dir=data_dir)
  key = (name, split, _files_signature(source.dataset_info.data_dir))
  if key in _LOADED:
    _LOADED[key] = _LOADED.pop(key)   # most recently used last
    return dict(_LOADED[key])
  n = len(source)
  if n == 0:
    raise DataError(f'Split {split!r} of {name!r} is empty; pick another.')
  keys = record_keys(name, source[0])
  parts = []
  for start in range(0, n, _READ_CHUNK):
    ids = np.arange(start, min(n, start + _READ_CHUNK))
    raw = stack_records(read_records(source, ids), keys)
    parts.append(preprocess_lib.preprocess(name, raw, ids))
  arrays = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
  for a in arrays.values():
    a.flags.writeable = False
  _LOADED[key] = arrays
  while len(_LOADED) > _LOADED_MAX:
    _LOADED.pop(next(iter(_LOADED)))
  return dict(arrays)


# Splits decoded in this process (a demo's runs, a sweep's cells read the same ones), keyed
# by the files they came from: rebuilt or replaced files are read again.
_LOADED: dict[tuple, dict[str, np.ndarray]] = {}
_LOADED_MAX = 4


def _files_signature(directory: str) -> tuple:
  """``(path, size, mtime)`` of every file under ``directory``."""
  out = []
  for root, _, files in os.walk(os.fspath(directory)):
    for f in sorted(files):
      st = os.stat(os.path.join(root, f))
      out.append((os.path.join(root, f), st.st_size, st.st_mtime_ns))
  return tuple(sorted(out))


def role_names(name: str = 'shakespeare', *,
               data_dir: str | os.PathLike | None = None) -> list[str]:
  """``'PLAY/SPEAKER'`` of every role, indexed by the ``client`` feature.

  Args:
    name: the data set name with its config (``'shakespeare/tiny'``).
    data_dir: as for :func:`kdjax.data.load_source`.

  Returns:
    The role names stored in the prepared data set's metadata.
  """
  src = load_source(name, 'train', data_dir=data_dir)
  return list(src.dataset_info.metadata['role_names'])


def load_tokenizer(name: str, *, data_dir: str | os.PathLike | None = None):
  """The ``tokenizers.Tokenizer`` a language-model data set was encoded with.

  Its builder (``shakespeare_lm``) stores ``tokenizer.json``'s text in the data set's
  metadata; the data set is prepared first if it is not yet.

  Args:
    name: the data set with its config, e.g. ``'shakespeare_lm/bpe2048_256'``.
    data_dir: as for :func:`load_source`.

  Raises:
    DataError: an unknown data set, or one that stores no tokenizer.
  """
  import tokenizers   # only token data needs it

  info = load_source(name, 'train', data_dir=data_dir).dataset_info
  text = (info.metadata or {}).get('tokenizer')
  if not text:
    raise DataError(f'{name!r} stores no tokenizer; use a language-model data set such as '
                    'shakespeare_lm/tiny.')
  return tokenizers.Tokenizer.from_str(text)
