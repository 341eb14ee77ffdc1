"""``inspect_cache`` and ``verify_cache``: what a cache holds, and whether it is intact."""

from __future__ import annotations

import numpy as np

from kdjax.cache import codec as codec_lib
from kdjax.cache import read
from kdjax.cache import store

# Tokens a token cache's top-k mass statistics are taken over (the first ones stored).
MASS_SAMPLE_TOKENS = 1 << 16


def inspect_cache(cache_dir: str) -> dict:
  """What a cache holds: entries, coverage, sizes, checksum, and per kind:

  * classifier caches: ``k``, dtypes, bytes per example and the top-k mass statistics;
  * token caches: ``k``, the codec, ``bytes_per_token`` (exact, from
    :func:`kdjax.cache.codec.layout`), the stored (non-padding) tokens and their top-k
    mass (over the first ``MASS_SAMPLE_TOKENS`` of them);
  * sampled caches: ``samples`` (draws per token; ``k`` is the same number, the most
    unique ids a token can hold), the proposal temperature, the ``format`` (``rs{N}``),
    ``bytes_per_token`` (exact, :func:`kdjax.cache.codec.sample_bytes_per_token`), the
    stored tokens and their unique ids per token (over the first ``MASS_SAMPLE_TOKENS``);
  * sequence caches: the decoding settings and the generated lengths.

  The top-k probability mass of an entry is :math:`\\sum_{j \\in topk} e^{z_j - \\log Z}`
  at temperature 1 (1.0 when ``k`` covers all classes).
  """
  manifest = read.open_cache(cache_dir)
  kind = read.cache_kind(manifest)
  n, epochs = manifest['dataset']['num_examples'], manifest['epochs']
  covered = sum(c['stop'] - c['start'] for c in manifest['chunks'].values())
  info = {
      'cache_dir': cache_dir,
      'kind': kind,
      'entries': covered,
      'examples': n,
      'epochs': epochs,
      'coverage': covered / (n * epochs),
      'chunks': len(manifest['chunks']),
      'num_classes': manifest['num_classes'],
      'arrays': manifest['arrays'],
      'bytes_per_example': manifest['bytes_per_entry'],
      'bytes_on_disk': read.cache_bytes(manifest),
      'teacher': manifest['teacher'],
      'dataset': manifest['dataset'],
      'augment': manifest['augment'],
      'seed': manifest['seed'],
      'content_checksum': manifest['content_checksum'],
  }
  cols = read.load_columns(cache_dir, manifest)
  if kind == 'tokens':
    info.update(_token_report(manifest, cols))
  elif kind == 'sampled':
    info.update(_sampled_report(manifest, cols))
  elif kind == 'sequences':
    lengths = cols['mask'].sum(-1)
    last = np.take_along_axis(cols['tokens'], np.maximum(lengths - 1, 0)[..., None], -1)[..., 0]
    stops = manifest['generate']['stop_tokens']
    info.update(generate=manifest['generate'], prompt_len=manifest['prompt_len'],
                continuation_len=manifest['continuation_len'],
                generated_tokens={'mean': float(lengths.mean()), 'min': int(lengths.min()),
                                  'max': int(lengths.max())},
                stopped=float(np.isin(last, stops).mean()) if stops else 0.0)
  else:
    logits = read.dequantize(cols).astype(np.float64)
    lse = cols['teacher_logsumexp'].astype(np.float64)
    info.update(k=manifest['k'], dtype=manifest['dtype'], features=manifest['features'],
                topk_mass=_mass_stats(np.exp(logits - lse[..., None]).sum(-1).ravel()))
  return info


def _token_report(manifest: dict, cols: dict) -> dict:
  """Codec, exact bytes per token, stored tokens and their top-k mass (decoded)."""
  codec, k, vocab = manifest['codec'], manifest['k'], manifest['num_classes']
  rows = {key: cols[key].reshape(-1, cols[key].shape[-1]) for key in codec_lib.PARTS}
  # Padding positions are stored as zero bytes (kdjax.cache.tokens): not tokens.
  stored = np.flatnonzero(np.any(np.concatenate(list(rows.values()), -1) != 0, -1))
  sample = stored[:MASS_SAMPLE_TOKENS]
  z, _, lse = codec_lib.decode({key: r[sample] for key, r in rows.items()}, codec=codec, k=k,
                               vocab_size=vocab)
  mass = np.exp(np.asarray(z, np.float64) - np.asarray(lse, np.float64)[:, None]).sum(-1)
  return {'k': k, 'codec': codec, 'bytes_per_token': codec_lib.bytes_per_token(codec, k, vocab),
          'tokens_per_row': manifest['tokens'], 'stored_tokens': int(stored.size),
          'topk_mass': _mass_stats(mass) if mass.size else None}


def _sampled_report(manifest: dict, cols: dict) -> dict:
  """Samples, format, exact bytes per token, stored tokens and unique ids per token."""
  n, vocab = manifest['samples'], manifest['num_classes']
  weighted = 'weights' in manifest['arrays']
  rows = {key: cols[key].reshape(-1, cols[key].shape[-1]) for key in manifest['arrays']}
  # Padding positions are stored as zero bytes; a stored token has n set unary bits.
  stored = np.flatnonzero(np.any(rows['indices'] != 0, -1))
  sample = stored[:MASS_SAMPLE_TOKENS]
  idx, _ = codec_lib.decode_samples({key: r[sample] for key, r in rows.items()}, samples=n,
                                    vocab_size=vocab, weighted=weighted)
  idx = np.asarray(idx)
  unique = 1 + np.sum(idx[:, 1:] != idx[:, :-1], axis=-1) if idx.size else np.zeros(0)
  return {'k': manifest['k'], 'samples': n,
          'proposal_temperature': manifest['proposal_temperature'],
          'format': manifest['sample_format'],
          'bytes_per_token': codec_lib.sample_bytes_per_token(n, vocab, weighted=weighted),
          'tokens_per_row': manifest['tokens'], 'stored_tokens': int(stored.size),
          'unique_per_token': ({'mean': float(unique.mean()), 'min': int(unique.min()),
                                'max': int(unique.max())} if unique.size else None)}


def _mass_stats(mass: np.ndarray) -> dict:
  return {'mean': float(mass.mean()), 'min': float(mass.min()),
          'p05': float(np.quantile(mass, 0.05)), 'median': float(np.median(mass))}


def verify_cache(cache_dir: str) -> list[str]:
  """One line per problem (missing or corrupt chunk); empty when the cache is intact."""
  return store.verify(cache_dir, read.open_cache(cache_dir))
