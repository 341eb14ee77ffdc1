"""Fingerprints of a data set split: what a teacher cache was built from.

A cache's manifest records the fingerprint of the split its rows belong to; a run
that reads the cache computes it again from its own data and refuses a mismatch.
"""

from __future__ import annotations

import hashlib

import numpy as np

from kdjax.data import preprocess
from kdjax.data import sources


def dataset_fingerprint(name: str, split: str, arrays: dict[str, np.ndarray]) -> dict:
  """Name, split, size and a sha256 over the split's preprocessed arrays (x, label, id)."""
  h = hashlib.sha256()
  for key in ('x', 'label', 'id'):
    a = np.ascontiguousarray(arrays[key])
    h.update(f'{key}:{a.dtype.str}:{a.shape}\n'.encode())
    h.update(a.tobytes())
  return {'name': name, 'split': split, 'num_examples': int(len(arrays['label'])),
          'sha256': h.hexdigest()}


def stream_dataset_fingerprint(name: str, split: str, *, data_dir=None,
                               read_chunk: int = 4096) -> dict:
  """``dataset_fingerprint`` of a split read in pieces (never the whole ``x`` in memory).

  The same bytes go into the same hash in the same order as when the split is loaded
  whole, so the two agree exactly; only ``label`` and ``id`` (one integer per example)
  are kept whole. Costs one pass over the split (the stream feed checks a cache with it).
  """
  source = sources.load_source(name, split, data_dir=data_dir)
  n = len(source)
  keys = sources.record_keys(name, source[0])
  h = hashlib.sha256()
  small: dict[str, list[np.ndarray]] = {'label': [], 'id': []}
  for start in range(0, n, read_chunk):
    ids = np.arange(start, min(n, start + read_chunk))
    part = preprocess(name, sources.stack_records(sources.read_records(source, ids), keys), ids)
    x = np.ascontiguousarray(part['x'])
    if start == 0:
      h.update(f"x:{x.dtype.str}:{(n, *x.shape[1:])}\n".encode())
    h.update(x.tobytes())
    for key in small:
      small[key].append(np.asarray(part[key]))
  for key in ('label', 'id'):
    a = np.ascontiguousarray(np.concatenate(small[key]))
    h.update(f'{key}:{a.dtype.str}:{a.shape}\n'.encode())
    h.update(a.tobytes())
  return {'name': name, 'split': split, 'num_examples': int(n), 'sha256': h.hexdigest()}
