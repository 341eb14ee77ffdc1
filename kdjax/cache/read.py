"""Reading a teacher cache into a distill run: checks, then rows joined to batches.

``kdjax.cache.run.open_for_run`` opens a cache for a run; its ``check`` refuses one that
does not match the run (another teacher, data set, augmentation policy or seed, or a
``k`` too small for the loss) with a one-line ``UserError``. ``RunCache.columns`` are
the cache arrays ``[E, N, ...]`` that the device-fed loop keeps on device next to the
data; ``gather_rows`` joins a batch of example indices with cached epoch ``epoch mod E``
(jittable); ``host_rows`` does the same in numpy for the streaming feed.

The streaming feed joins each grain batch by ``(example id, epoch mod E)``, from the
columns in host memory when the cache is small, or with ``ChunkReader`` (rows read per
batch from the chunk files) when it is larger than ``config.teacher.cache_memory_max_bytes``
(default 1 GiB; ``choose_reader``, overridden by ``config.teacher.cache_reader``). Both
give the same bits. Before training it hashes the split in pieces
(``check_stream_dataset``) and refuses a cache built from other data, as the device feed
does with the split in memory.

Language-model caches (``manifest['kind']``, :func:`cache_kind`) open as their own
classes, built on the pieces here: per-token top-k rows in a codec
(:class:`kdjax.cache.tokens.TokenCache`) and teacher generations for sequence-level KD
(:class:`kdjax.cache.sequences.SequenceCache`).

Batch keys produced by a classifier cache (see ``kdjax.losses.registry``):
``teacher_topk_logits`` (float, dequantized), ``teacher_topk_indices`` (int32),
``teacher_logsumexp``, and, when the loss needs them, dense ``teacher_logits`` (only from
a cache with ``k`` = all classes) and ``teacher_features``.
"""

from __future__ import annotations

import collections
import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import data as kdata
from kdjax import storage
from kdjax.cache import store
from kdjax.cache.fingerprint import dataset_fingerprint
from kdjax.cache.fingerprint import stream_dataset_fingerprint
from kdjax.errors import UserError

_QUANT = ('teacher_topk_scale', 'teacher_topk_offset')


def open_cache(cache_dir: str) -> dict:
  """The manifest of a finished cache (``UserError`` if there is none or it is unfinished)."""
  manifest = store.read_json(storage.join(cache_dir, store.MANIFEST))
  if manifest is None:
    if store.read_json(storage.join(cache_dir, store.PLAN)) is not None:
      raise UserError(f'the teacher cache {cache_dir} is unfinished; run the same '
                      '`kdjax cache build` command again to complete it')
    raise UserError(f'{cache_dir} is not a teacher cache (no {store.MANIFEST}); '
                    'build one with `kdjax cache build`')
  if manifest.get('format') != store.FORMAT or manifest.get('version') != store.VERSION:
    raise UserError(f'{cache_dir} holds a cache of another format or version; rebuild it')
  return manifest


def check_source(manifest: dict, config, *, num_classes: int, cache_dir: str,
                 teacher_fingerprint: str | None = None) -> None:
  """Raises a one-line ``UserError`` when the cache was not built from this run's teacher,
  data set, classes and augmentation (what every kind of cache must match)."""
  where = f'the teacher cache {cache_dir}'
  if teacher_fingerprint is not None and teacher_fingerprint != manifest['teacher']['fingerprint']:
    raise UserError(f'{where} was built from another teacher (fingerprint '
                    f"{manifest['teacher']['fingerprint'][:12]}, not {teacher_fingerprint[:12]} of "
                    f'{config.teacher.workdir or config.teacher.get("hf_path")}); rebuild it '
                    'with `kdjax cache build`')
  ds = manifest['dataset']
  if (ds['name'], ds['split']) != (config.data.name, config.data.train_split):
    raise UserError(f"{where} covers {ds['name']}:{ds['split']}, but the run trains on "
                    f'{config.data.name}:{config.data.train_split}; build a cache for this data')
  if manifest['num_classes'] != num_classes:
    raise UserError(f"{where} has {manifest['num_classes']} classes, the data set {num_classes}")
  augment = config.data.augment
  augment = kdata.normalize_spec(augment.to_dict() if hasattr(augment, 'to_dict') else augment)
  if augment != manifest['augment']:
    raise UserError(f"{where} was built with augmentation {manifest['augment']}, the run uses "
                    f'{augment}; rebuild the cache with the run config')
  # The seed keys the augmentation only: without augmentation any seed reads the same rows.
  if augment['kind'] != 'none' and int(config.seed) != manifest['seed']:
    raise UserError(f"{where} was built with seed {manifest['seed']} (augmentation keys), the "
                    f'run uses seed {config.seed}; rebuild it or use the same seed')


def check_run(manifest: dict, config, *, num_classes: int, needs, cache_dir: str,
              teacher_fingerprint: str | None = None) -> None:
  """Raises a one-line ``UserError`` when the cache cannot feed this run."""
  check_source(manifest, config, num_classes=num_classes, cache_dir=cache_dir,
               teacher_fingerprint=teacher_fingerprint)
  where = f'the teacher cache {cache_dir}'
  if 'teacher_logits' in needs and manifest['k'] < num_classes:
    raise UserError(f"{where} keeps the top {manifest['k']} of {num_classes} logits, but the loss "
                    'needs dense teacher logits; use a sparse loss (e.g. sparse_kd) or rebuild '
                    f'with --k {num_classes}')
  if 'teacher_features' in needs and not manifest['features']:
    raise UserError(f'{where} stores no teacher features, but the loss needs them; rebuild '
                    'with --features NAME')
  if 'teacher_attentions' in needs:
    raise UserError(f'{where} cannot feed attention losses; use the live teacher')


def check_dataset(manifest: dict, arrays: dict[str, np.ndarray], cache_dir: str) -> None:
  ds = manifest['dataset']
  got = dataset_fingerprint(ds['name'], ds['split'], arrays)
  if got != ds:
    raise UserError(f'the teacher cache {cache_dir} was built from other data (the '
                    f"{ds['name']}:{ds['split']} arrays hash differently); rebuild it")


def check_stream_dataset(manifest: dict, name: str, split: str, *, data_dir=None,
                         cache_dir: str) -> None:
  """``check_dataset`` for the stream feed: the split is hashed in pieces, not loaded whole."""
  ds = manifest['dataset']
  if stream_dataset_fingerprint(name, split, data_dir=data_dir) != ds:
    raise UserError(f'the teacher cache {cache_dir} was built from other data (the '
                    f"{ds['name']}:{ds['split']} arrays hash differently); rebuild it")


def load_columns(cache_dir: str, manifest: dict, *, verify: bool = False
                 ) -> dict[str, np.ndarray]:
  """Every stored array as one ``[E, N, ...]`` column.

  With ``verify``, each chunk's files are first checked against the manifest's sha256
  (a one-line ``UserError`` names a corrupt or missing chunk): a run that loads the
  cache whole reads every byte anyway.
  """
  dtypes = {name: a['dtype'] for name, a in manifest['arrays'].items()}
  epochs, n = manifest['epochs'], manifest['dataset']['num_examples']
  cols = {name: np.empty((epochs, n, *a['shape']), _np_dtype(a['dtype']))
          for name, a in manifest['arrays'].items()}
  for name, entry in manifest['chunks'].items():
    problem = store.chunk_problem(cache_dir, name, entry) if verify else None
    if problem:
      raise UserError(f'the teacher cache {cache_dir}: {problem}; rebuild it with '
                      '`kdjax cache build`')
    rows = store.read_chunk(cache_dir, name, dtypes)
    for key, value in rows.items():
      cols[key][entry['epoch'], entry['start']:entry['stop']] = value
  return cols


def _np_dtype(name: str):
  if name == 'bfloat16':
    import ml_dtypes
    return ml_dtypes.bfloat16
  return np.dtype(name)


def dequantize(cols: dict) -> np.ndarray | jax.Array:
  """Top-k logits as float32 (int8 rows through their scale and offset)."""
  q = cols['teacher_topk_logits']
  if 'teacher_topk_scale' in cols:
    return cols['teacher_topk_offset'][..., None] + cols['teacher_topk_scale'][..., None] * q.astype(
        np.float32)
  return q.astype(np.float32) if isinstance(q, np.ndarray) else q.astype(jnp.float32)


def batch_columns(cols: dict[str, np.ndarray], needs) -> dict[str, Any]:
  """The columns a run needs, keyed as the batch keys (plus int8 scales)."""
  out = {key: cols[key] for key in ('teacher_topk_logits', 'teacher_topk_indices',
                                    'teacher_logsumexp', *_QUANT) if key in cols}
  if 'teacher_logits' in needs:                       # dense, from a k = classes cache
    values = dequantize(cols)
    idx = cols['teacher_topk_indices'].astype(np.int64)
    dense = np.zeros(values.shape, np.float32)
    np.put_along_axis(dense, idx, values, axis=-1)
    out['teacher_logits'] = dense
  feats = {key.split('.', 1)[1]: v for key, v in cols.items() if key.startswith('feature.')}
  if feats and 'teacher_features' in needs:
    out['teacher_features'] = feats
  return out


def _finish(rows: dict, xp) -> dict:
  rows = dict(rows)
  if 'teacher_topk_scale' in rows:
    rows['teacher_topk_logits'] = dequantize(rows)
    for key in _QUANT:
      rows.pop(key)
  rows['teacher_topk_indices'] = rows['teacher_topk_indices'].astype(xp.int32)
  return rows


def gather_rows(columns: dict, epoch, idx) -> dict:
  """Rows ``idx`` of cached epoch ``epoch mod E`` as batch entries (jittable)."""
  num_epochs = jax.tree.leaves(columns)[0].shape[0]
  e = jnp.asarray(epoch) % num_epochs
  rows = jax.tree.map(lambda c: jnp.take(c[e], idx, axis=0), columns)
  return _finish(rows, jnp)


def host_rows(columns: dict, epochs: np.ndarray, ids: np.ndarray) -> dict:
  """``gather_rows`` in numpy for per-example ``epochs`` and ``ids`` (padding id -1 -> row 0)."""
  num_epochs = jax.tree.leaves(columns)[0].shape[0]
  e = np.asarray(epochs) % num_epochs
  i = np.maximum(np.asarray(ids), 0)
  rows = jax.tree.map(lambda c: c[e, i], columns)
  return _finish(rows, np)


class ChunkReader:
  """Cache rows read per batch from the chunk files, for caches larger than memory.

  Every row of a batch is read with one positioned read (``os.preadv``) per stored array,
  straight into the batch buffer (the reads spread over ``threads`` threads): nothing but
  the batch is held in the process, whatever the size of the cache (the OS page cache
  keeps hot chunk files, outside the process's memory). At most ``max_open_files`` chunk
  files stay open (least recently used first out; default a quarter of the process's
  file-descriptor limit, at most 4096); the ``.npy`` header of a file is parsed once when
  it is opened. A cache in a bucket (``gs://``) has no positioned reads here: each chunk
  file is downloaded whole into a local temporary directory the first time a batch needs
  it (kept until :meth:`close`), then read as above.

  ``rows(epochs, ids)`` returns what ``host_rows`` returns on the whole columns, bit for
  bit (same stored bytes, same dequantization and dense scatter).

  >>> import tempfile
  >>> from kdjax.cache import store
  >>> d = tempfile.mkdtemp()
  >>> z = np.arange(12, dtype=np.float32).reshape(6, 2)
  >>> for i, (s, t) in enumerate(store.chunk_ranges(6, 4)):
  ...   store.write_chunk(d, store.chunk_name(0, i), {
  ...       'teacher_topk_logits': z[s:t], 'teacher_logsumexp': z[s:t, 0],
  ...       'teacher_topk_indices': np.tile(np.int16([1, 0]), (t - s, 1))})
  >>> manifest = {'epochs': 1, 'chunk_size': 4, 'dataset': {'num_examples': 6},
  ...             'arrays': {'teacher_topk_logits': {'dtype': 'float32', 'shape': [2]},
  ...                        'teacher_logsumexp': {'dtype': 'float32', 'shape': []},
  ...                        'teacher_topk_indices': {'dtype': 'int16', 'shape': [2]}}}
  >>> reader = ChunkReader(d, manifest, needs=())
  >>> rows = reader.rows(np.array([3, 3]), np.array([5, 1]))   # epoch 3 mod 1 = 0
  >>> rows['teacher_topk_logits'].tolist(), rows['teacher_topk_indices'].dtype.name
  ([[10.0, 11.0], [2.0, 3.0]], 'int32')
  >>> reader.close()
  """

  def __init__(self, cache_dir: str, manifest: dict, needs, *, max_open_files: int | None = None,
               threads: int = 4):
    self._dir = cache_dir
    self._needs = frozenset(needs)
    self._epochs = int(manifest['epochs'])
    self._n = int(manifest['dataset']['num_examples'])
    self._chunk = int(manifest['chunk_size'])
    self._arrays = {name: (a['dtype'], tuple(a['shape'])) for name, a in manifest['arrays'].items()
                    if not name.startswith('feature.') or 'teacher_features' in self._needs}
    if max_open_files is None:
      import resource
      soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
      max_open_files = 4096 if soft == resource.RLIM_INFINITY else min(4096, soft // 4)
    self._max_open = max(1, int(max_open_files))
    self._files: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
    self._evicted: list[int] = []     # closed once the batch that evicted them is read
    self._threads = max(1, int(threads))
    self._pool = None
    self.files_opened = 0             # LRU misses (a file opened and its header parsed)
    self._local = None                # a bucket's cache: where its chunk files are copied

  def _file(self, epoch: int, index: int, key: str) -> tuple[int, int, int]:
    """``(fd, data offset, bytes per row)`` of one array file of one chunk."""
    name = (epoch, index, key)
    entry = self._files.get(name)
    if entry is not None:
      self._files.move_to_end(name)
      return entry
    path = storage.join(store.chunk_path(self._dir, store.chunk_name(epoch, index)), key + '.npy')
    if storage.is_remote(path):
      path = self._copied(path, f'{store.chunk_name(epoch, index)}-{key}.npy')
    with open(path, 'rb') as f:
      version = np.lib.format.read_magic(f)
      read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                     else np.lib.format.read_array_header_2_0)
      shape, fortran, dtype = read_header(f)
      offset = f.tell()
    if fortran:
      raise ValueError(f'{path} is stored in Fortran order; the cache writes C order')
    row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
    entry = (os.open(path, os.O_RDONLY), offset, row_bytes)
    self._files[name] = entry
    self.files_opened += 1
    while len(self._files) > self._max_open:
      self._evicted.append(self._files.popitem(last=False)[1][0])
    return entry

  def _copied(self, url: str, name: str) -> str:
    """The local copy of a bucket's chunk file (downloaded the first time)."""
    if self._local is None:
      import tempfile
      self._local = tempfile.mkdtemp(prefix='kdjax-cache-')
    local = os.path.join(self._local, name)
    if not os.path.exists(local):
      storage.download(url, local + '.part')
      os.replace(local + '.part', local)
    return local

  def raw_rows(self, epochs: np.ndarray, ids: np.ndarray) -> dict[str, np.ndarray]:
    """The stored arrays of rows ``(epochs mod E, ids)`` (ids -1 read row 0), as stored.

    The files are resolved in this thread; the reads (which release the GIL and mostly
    wait on the disk when the page cache is cold) are spread over ``threads`` threads.
    """
    e = (np.asarray(epochs, np.int64) % self._epochs).tolist()
    i = np.maximum(np.asarray(ids, np.int64), 0)
    if i.size and i.max() >= self._n:
      raise IndexError(f'example id {int(i.max())} is outside the cache ({self._n} examples)')
    chunk, local = (i // self._chunk).tolist(), (i % self._chunk).tolist()
    out, jobs = {}, []
    for key, (dtype, shape) in self._arrays.items():
      buf = np.empty((len(chunk), *shape), _disk_dtype(dtype))
      view = memoryview(buf.reshape(-1).view(np.uint8)) if buf.size else memoryview(b'')
      for j, (ep, ci, row) in enumerate(zip(e, chunk, local)):
        fd, offset, nbytes = self._file(ep, ci, key)
        jobs.append((fd, view[j * nbytes:(j + 1) * nbytes], offset + row * nbytes, ep, ci, key))
      out[key] = (buf, dtype)
    try:
      if self._threads > 1 and len(jobs) >= 8 * self._threads:
        if self._pool is None:
          from concurrent.futures import ThreadPoolExecutor
          self._pool = ThreadPoolExecutor(self._threads, thread_name_prefix='kdjax-cache-read')
        step = -(-len(jobs) // self._threads)
        list(self._pool.map(self._read, [jobs[s:s + step] for s in range(0, len(jobs), step)]))
      else:
        self._read(jobs)
    finally:
      while self._evicted:
        os.close(self._evicted.pop())
    return {key: store.from_disk(buf, dtype)
            for key, (buf, dtype) in out.items()}

  def _read(self, jobs) -> None:
    for fd, target, position, ep, ci, key in jobs:
      if os.preadv(fd, [target], position) != len(target):
        raise OSError(f'short read in {store.chunk_name(ep, ci)}/{key}.npy; run '
                      f'`kdjax cache verify {self._dir}`')

  def rows(self, epochs: np.ndarray, ids: np.ndarray) -> dict:
    """``host_rows`` of the whole columns, read from the chunk files."""
    return _finish(batch_columns(self.raw_rows(epochs, ids), self._needs), np)

  def close(self) -> None:
    if self._pool is not None:
      self._pool.shutdown()
      self._pool = None
    while self._files:
      os.close(self._files.popitem()[1][0])
    if self._local is not None:
      import shutil
      shutil.rmtree(self._local, ignore_errors=True)
      self._local = None

  def __del__(self):
    try:
      self.close()
    except Exception:  # pylint: disable=broad-except
      pass


def _disk_dtype(name: str) -> np.dtype:
  return np.dtype(np.uint16) if name == 'bfloat16' else np.dtype(name)


def cache_bytes(manifest: dict) -> int:
  """Bytes of every stored chunk (what loading the cache whole takes in memory)."""
  return int(sum(c['bytes'] for c in manifest['chunks'].values()))


READERS = ('auto', 'memory', 'chunks')


def choose_reader(manifest: dict, *, reader: str = 'auto', max_bytes: int = 1 << 30) -> str:
  """``'memory'`` (all rows loaded) or ``'chunks'`` (``ChunkReader``) for the stream feed.

  ``auto`` loads the cache whole when its chunks take at most ``max_bytes``
  (``config.teacher.cache_memory_max_bytes``, default 1 GiB) and reads rows per batch
  from the chunk files above that.

  >>> choose_reader({'chunks': {'a': {'bytes': 10}}}, max_bytes=9)
  'chunks'
  """
  if reader not in READERS:
    raise UserError(f"config.teacher.cache_reader must be one of {', '.join(READERS)} "
                    f'(got {reader!r})')
  if reader != 'auto':
    return reader
  return 'memory' if cache_bytes(manifest) <= int(max_bytes) else 'chunks'


class RunCache(NamedTuple):
  """A finished cache opened for a run: the checks, and its rows in the forms the
  feeds take (:class:`kdjax.engine.setup.CachedTeacher`)."""

  cache_dir: str
  manifest: dict
  teacher_fingerprint: str | None = None

  @property
  def epochs(self) -> int:
    return int(self.manifest['epochs'])

  @property
  def nbytes(self) -> int:
    return cache_bytes(self.manifest)

  def check(self, config, *, num_classes: int, needs) -> None:
    check_run(self.manifest, config, num_classes=num_classes, needs=needs,
              cache_dir=self.cache_dir, teacher_fingerprint=self.teacher_fingerprint)

  def check_arrays(self, arrays: dict) -> None:
    check_dataset(self.manifest, arrays, self.cache_dir)

  def check_stream(self, config) -> None:
    check_stream_dataset(self.manifest, config.data.name, config.data.train_split,
                         data_dir=config.data.data_dir or None, cache_dir=self.cache_dir)

  def columns(self, needs) -> dict[str, Any]:
    """The cache arrays ``[E, N, ...]`` the loss needs, keyed as batch entries."""
    return batch_columns(load_columns(self.cache_dir, self.manifest), needs)

  def join(self, columns, epoch, positions) -> dict:
    return gather_rows(columns, epoch, positions)

  def reader(self, config) -> str:
    """How the stream feed reads rows: ``'memory'`` (the columns loaded whole, when the
    cache takes at most ``config.teacher.cache_memory_max_bytes``) or ``'chunks'`` (read
    per batch from the chunk files); ``config.teacher.cache_reader`` may force one."""
    return choose_reader(self.manifest, reader=str(config.teacher.cache_reader),
                         max_bytes=int(config.teacher.cache_memory_max_bytes))

  def host_rows(self, reader: str, needs):
    """``rows(epochs, ids) -> entries`` (numpy) for the stream feed, read as ``reader``."""
    if reader == 'memory':
      columns = self.columns(needs)
      return lambda epochs, ids: host_rows(columns, epochs, ids)
    return self.chunk_reader(needs).rows

  def sample(self, needs, n: int = 2) -> dict:
    """The first ``n`` rows of epoch 0 as numpy entries (for loss initialization)."""
    return self.chunk_reader(needs, threads=1).rows(np.zeros(n, np.int64), np.arange(n))

  def chunk_reader(self, needs, **kwargs) -> ChunkReader:
    return ChunkReader(self.cache_dir, self.manifest, needs, **kwargs)


def cache_kind(manifest: dict) -> str:
  """``'examples'`` (a classifier cache), ``'tokens'`` (per-token top-k rows,
  :mod:`kdjax.cache.tokens`), ``'sampled'`` (per-token draws from the teacher,
  :mod:`kdjax.cache.sampled`) or ``'sequences'`` (teacher generations,
  :mod:`kdjax.cache.sequences`).

  >>> cache_kind({}), cache_kind({'kind': 'tokens'})
  ('examples', 'tokens')
  """
  return manifest.get('kind', 'examples')
