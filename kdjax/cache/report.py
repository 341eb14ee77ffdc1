"""``inspect_cache`` and ``verify_cache``: what a cache holds, and whether it is intact."""

from __future__ import annotations

import numpy as np

from kdjax.cache import read
from kdjax.cache import store


def inspect_cache(cache_dir: str) -> dict:
  """Entries, coverage, k, dtypes, bytes per example, top-k mass statistics, checksum.

  The top-k probability mass of an entry is :math:`\\sum_{j \\in topk} e^{z_j - \\log Z}`
  at temperature 1 (1.0 when ``k`` covers all classes).
  """
  manifest = read.open_cache(cache_dir)
  cols = read.load_columns(cache_dir, manifest)
  logits = read.dequantize(cols).astype(np.float64)
  lse = cols['teacher_logsumexp'].astype(np.float64)
  mass = np.exp(logits - lse[..., None]).sum(-1).ravel()
  n, epochs = manifest['dataset']['num_examples'], manifest['epochs']
  covered = sum(c['stop'] - c['start'] for c in manifest['chunks'].values())
  stored = sum(c['bytes'] for c in manifest['chunks'].values())
  return {
      'cache_dir': cache_dir,
      'entries': covered,
      'examples': n,
      'epochs': epochs,
      'coverage': covered / (n * epochs),
      'chunks': len(manifest['chunks']),
      'k': manifest['k'],
      'num_classes': manifest['num_classes'],
      'dtype': manifest['dtype'],
      'arrays': manifest['arrays'],
      'features': manifest['features'],
      'bytes_per_example': manifest['bytes_per_entry'],
      'bytes_on_disk': stored,
      'topk_mass': {'mean': float(mass.mean()), 'min': float(mass.min()),
                    'p05': float(np.quantile(mass, 0.05)), 'median': float(np.median(mass))},
      'teacher': manifest['teacher'],
      'dataset': manifest['dataset'],
      'augment': manifest['augment'],
      'seed': manifest['seed'],
      'content_checksum': manifest['content_checksum'],
  }


def verify_cache(cache_dir: str) -> list[str]:
  """One line per problem (missing or corrupt chunk); empty when the cache is intact."""
  return store.verify(cache_dir, read.open_cache(cache_dir))
