"""``open_for_run``: a finished teacher cache opened for a distill run, by its kind."""

from __future__ import annotations

from kdjax import storage
from kdjax import teacher as teacher_lib
from kdjax.cache.read import RunCache
from kdjax.cache.read import cache_kind
from kdjax.cache.read import open_cache
from kdjax.cache.sampled import SampledCache
from kdjax.cache.sequences import SequenceCache
from kdjax.cache.tokens import TokenCache


def open_for_run(config):
  """Opens ``config.teacher.cache`` for a run: a :class:`RunCache`, a
  :class:`~kdjax.cache.tokens.TokenCache`, a :class:`~kdjax.cache.sampled.SampledCache` or a
  :class:`~kdjax.cache.sequences.SequenceCache`
  by the cache's kind (its ``check`` checks it against the run). When
  ``config.teacher.workdir`` (or ``hf_path``) is set, its teacher's fingerprint is read
  (parameters only, on the host) and must equal the cache's."""
  cache_dir = storage.abspath(config.teacher.cache)
  manifest = open_cache(cache_dir)
  fingerprint = teacher_lib.config_fingerprint(config.teacher)
  kind = cache_kind(manifest)
  if kind == 'tokens':
    return TokenCache(cache_dir, manifest, fingerprint)
  if kind == 'sampled':
    return SampledCache(cache_dir, manifest, fingerprint)
  if kind == 'sequences':
    return SequenceCache(cache_dir, manifest, fingerprint)
  return RunCache(cache_dir, manifest, fingerprint)
