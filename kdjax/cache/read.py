"""Reading a teacher cache into a distill run: checks, then rows joined to batches.

``open_for_run`` refuses a cache that does not match the run (another teacher, data
set, augmentation policy or seed, or a ``k`` too small for the loss) with a one-line
``UserError``. ``RunCache.columns`` are the cache arrays ``[E, N, ...]`` that the
device-fed loop keeps on device next to the data; ``gather_rows`` joins a batch of
example indices with cached epoch ``epoch mod E`` (jittable); ``host_rows`` does the
same in numpy for the streaming feed.

Batch keys produced (see ``kdjax.losses.registry``): ``teacher_topk_logits`` (float,
dequantized), ``teacher_topk_indices`` (int32), ``teacher_logsumexp``, and, when the
loss needs them, dense ``teacher_logits`` (only from a cache with ``k`` = all classes)
and ``teacher_features``.

This module imports ``kdjax.distill`` only inside functions (the step imports it).
"""

from __future__ import annotations

import os
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.cache import store
from kdjax.errors import UserError

_QUANT = ('teacher_topk_scale', 'teacher_topk_offset')


def open_cache(cache_dir: str) -> dict:
  """The manifest of a finished cache (``UserError`` if there is none or it is unfinished)."""
  manifest = store.read_json(os.path.join(cache_dir, store.MANIFEST))
  if manifest is None:
    if store.read_json(os.path.join(cache_dir, store.PLAN)) is not None:
      raise UserError(f'the teacher cache {cache_dir} is unfinished; run the same '
                      '`kdjax cache build` command again to complete it')
    raise UserError(f'{cache_dir} is not a teacher cache (no {store.MANIFEST}); '
                    'build one with `kdjax cache build`')
  if manifest.get('format') != store.FORMAT or manifest.get('version') != store.VERSION:
    raise UserError(f'{cache_dir} holds a cache of another format or version; rebuild it')
  return manifest


def check_run(manifest: dict, config, *, num_classes: int, needs, cache_dir: str,
              teacher_fingerprint: str | None = None) -> None:
  """Raises a one-line ``UserError`` when the cache cannot feed this run."""
  from kdjax import data as kdata
  where = f'the teacher cache {cache_dir}'
  if teacher_fingerprint is not None and teacher_fingerprint != manifest['teacher']['fingerprint']:
    raise UserError(f'{where} was built from another teacher (fingerprint '
                    f"{manifest['teacher']['fingerprint'][:12]}, not {teacher_fingerprint[:12]} of "
                    f'{config.teacher.workdir}); rebuild it with `kdjax cache build`')
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
  if int(config.seed) != manifest['seed']:
    raise UserError(f"{where} was built with seed {manifest['seed']} (augmentation keys), the "
                    f'run uses seed {config.seed}; rebuild it or use the same seed')
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
  from kdjax.cache.build import dataset_fingerprint
  ds = manifest['dataset']
  got = dataset_fingerprint(ds['name'], ds['split'], arrays)
  if got != ds:
    raise UserError(f'the teacher cache {cache_dir} was built from other data (the '
                    f"{ds['name']}:{ds['split']} arrays hash differently); rebuild it")


def load_columns(cache_dir: str, manifest: dict) -> dict[str, np.ndarray]:
  """Every stored array as one ``[E, N, ...]`` column."""
  dtypes = {name: a['dtype'] for name, a in manifest['arrays'].items()}
  epochs, n = manifest['epochs'], manifest['dataset']['num_examples']
  cols = {name: np.empty((epochs, n, *a['shape']), _np_dtype(a['dtype']))
          for name, a in manifest['arrays'].items()}
  for name, entry in manifest['chunks'].items():
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


class RunCache(NamedTuple):
  cache_dir: str
  manifest: dict

  @property
  def epochs(self) -> int:
    return int(self.manifest['epochs'])

  def columns(self, needs) -> dict[str, Any]:
    return batch_columns(load_columns(self.cache_dir, self.manifest), needs)


def sample_rows(columns: dict, n: int = 2) -> dict:
  """The first ``n`` rows of epoch 0 as numpy batch entries (for loss initialization)."""
  return host_rows(columns, np.zeros(n, np.int64), np.arange(n))


def open_for_run(config, *, num_classes: int, needs, mesh=None) -> RunCache:
  """Opens ``config.teacher.cache`` and checks it against the run.

  When ``config.teacher.workdir`` is set, its teacher is restored (parameters only, no
  forward pass) and its fingerprint must equal the cache's.
  """
  cache_dir = os.path.abspath(config.teacher.cache)
  manifest = open_cache(cache_dir)
  fingerprint = None
  if config.teacher.workdir:
    from kdjax.distill.teacher import load_teacher
    fingerprint = load_teacher(config.teacher.workdir, mesh, config.teacher.partition_rules).fingerprint
  check_run(manifest, config, num_classes=num_classes, needs=needs, cache_dir=cache_dir,
            teacher_fingerprint=fingerprint)
  return RunCache(cache_dir, manifest)
