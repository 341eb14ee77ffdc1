"""Metrics: ``(sum, count)`` accumulation and the writers (JSONL, TensorBoard, PNG).

Every run writes ``WORKDIR/metrics.jsonl`` (one strict-JSON object per line: a
non-finite value is ``null`` and the row names it in ``nonfinite``) and TensorBoard
events under ``WORKDIR/tensorboard``, through one :class:`MetricsWriter`.

A workdir in a bucket (``gs://...``, :mod:`kdjax.storage`) has no append: the writer
keeps the file's lines and rewrites ``metrics.jsonl`` whole (one object upload) at every
row, so the object always holds every row logged so far, as the local file does after a
kill. tensorboardX cannot write to a bucket without TensorFlow: its events go to a local
temporary directory, uploaded to ``WORKDIR/tensorboard`` at most every
:data:`TB_UPLOAD_SECONDS` while rows come and at :meth:`MetricsWriter.close`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Mapping

import jax
import numpy as np

from kdjax import storage
from kdjax import workdir as workdir_lib

TB_UPLOAD_SECONDS = 60.0


class Accumulator:
  """Sums ``(sum, count)`` pairs; ``means()`` gives ``sum / count``.

  >>> acc = Accumulator()
  >>> acc.add({'loss': (3.0, 2.0)}); acc.add({'loss': (1.0, 2.0)})
  >>> acc.means()
  {'loss': 1.0}
  """

  def __init__(self, totals: Mapping[str, list] | None = None):
    self.totals: dict[str, list[float]] = {k: list(v) for k, v in (totals or {}).items()}

  def add(self, metrics: Mapping[str, tuple]) -> None:
    metrics = jax.device_get(metrics)
    for name, (s, c) in metrics.items():
      acc = self.totals.setdefault(name, [0.0, 0.0])
      acc[0] += float(s)
      acc[1] += float(c)

  def means(self) -> dict[str, float]:
    return {k: s / c for k, (s, c) in self.totals.items() if c > 0}

  def reset(self) -> None:
    self.totals.clear()


def _summary_writer():
  """tensorboardX's ``SummaryWriter``, imported without PyTorch when PyTorch is not loaded
  yet: tensorboardX treats it as optional (kdjax writes scalars only), and importing it
  costs every run about a second."""
  if 'torch' in sys.modules:
    from tensorboardX import SummaryWriter
    return SummaryWriter
  sys.modules['torch'] = None   # `import torch` raises ImportError while this is set
  try:
    from tensorboardX import SummaryWriter
  finally:
    del sys.modules['torch']
  return SummaryWriter


class MetricsWriter:
  """Writes ``metrics.jsonl`` and TensorBoard events under the workdir (process 0 only).

  Args:
    workdir: the run's directory.
    resume_step: the step (or round) a resumed run restarts from: rows logged after it
      by the killed run are dropped, so the file ends as an uninterrupted run's would;
      None: a new run (the file is started afresh).
    step_key: the name of the row's step field (``'step'``, or ``'round'`` for
      federated runs).
  """

  def __init__(self, workdir: str, *, resume_step: int | None = None, step_key: str = 'step'):
    self.workdir = workdir
    self.path = storage.join(workdir, workdir_lib.METRICS)
    self.step_key = step_key
    self.enabled = jax.process_index() == 0
    self._tb = None
    self._remote = storage.is_remote(workdir)
    self._lines: list[str] = []        # a bucket's metrics.jsonl: rewritten whole per row
    self._tb_local = None              # a bucket's events: written here, then uploaded
    self._tb_uploaded = 0.0
    if not self.enabled:
      return
    storage.makedirs(workdir)
    if storage.exists(self.path):
      keep = [row for row in read_jsonl(self.path)
              if resume_step is not None and row.get(step_key, 0) <= resume_step]
      self._lines = [json.dumps(row) + '\n' for row in keep]
      storage.write_text(self.path, ''.join(self._lines))
    try:
      SummaryWriter = _summary_writer()
      if self._remote:
        self._tb_local = tempfile.mkdtemp(prefix='kdjax-tensorboard-')
        self._tb_uploaded = time.monotonic()
      self._tb = SummaryWriter(self._tb_local or os.path.join(workdir, 'tensorboard'))
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      self._tb = None

  def write(self, step: int, values: Mapping[str, float], *, split: str | None = None) -> None:
    """One row: ``{step_key: step, 'split': split, **values}`` (``split`` omitted if None)."""
    if not self.enabled:
      return
    row = {self.step_key: int(step)}
    if split is not None:
      row['split'] = split
    row.update(values)
    line = workdir_lib.dumps(row) + '\n'
    if self._remote:
      self._lines.append(line)
      storage.write_text(self.path, ''.join(self._lines))
    else:
      with open(self.path, 'a') as f:
        f.write(line)
    if self._tb is not None:
      for k, v in values.items():
        if isinstance(v, (int, float, np.number)) and not isinstance(v, bool) \
            and math.isfinite(float(v)):
          self._tb.add_scalar(f'{split}/{k}' if split else k, float(v), int(step))
      if self._tb_local and time.monotonic() - self._tb_uploaded > TB_UPLOAD_SECONDS:
        self._upload_events()

  def _upload_events(self) -> None:
    self._tb.flush()
    storage.sync_up(self._tb_local, storage.join(self.workdir, 'tensorboard'))
    self._tb_uploaded = time.monotonic()

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()
      if self._tb_local:
        storage.sync_up(self._tb_local, storage.join(self.workdir, 'tensorboard'))
        shutil.rmtree(self._tb_local, ignore_errors=True)
        self._tb_local = None
      self._tb = None


def read_jsonl(path: str) -> list[dict]:
  """The rows of a ``metrics.jsonl``; a line cut by a kill ends the file there."""
  out = []
  with storage.open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          break
  return out


def logged(path: str, split: str, step: int) -> dict[str, float]:
  """What ``metrics.jsonl`` at ``path`` holds for ``split`` at ``step`` (``{}``: nothing, or no
  file: only process 0 writes it)."""
  if not storage.exists(path):
    return {}
  rows = [r for r in read_jsonl(path) if r.get('split') == split and r.get('step') == step]
  return {k: v for k, v in rows[-1].items() if k not in ('step', 'split')} if rows else {}


def plot_learning_curves(workdir: str, title: str = '') -> str | None:
  """Draws train loss and eval accuracy against the step into ``learning_curves.png``."""
  path = storage.join(workdir, workdir_lib.METRICS)
  if jax.process_index() != 0 or not storage.exists(path):
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  records = read_jsonl(path)
  train = [(r['step'], r['loss']) for r in records
           if r.get('split') == 'train' and r.get('loss') is not None]
  evals = [(r['step'], r['accuracy']) for r in records
           if r.get('split') == 'eval' and r.get('accuracy') is not None]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
  if train:
    ax1.plot(*np.asarray(train).T)
    if all(v > 0 for _, v in train):
      ax1.set_yscale('log')
  ax1.set_xlabel('step'); ax1.set_ylabel('train loss')
  if evals:
    ax2.plot(*np.asarray(evals).T, marker='o')
  ax2.set_xlabel('step'); ax2.set_ylabel('eval accuracy')
  fig.suptitle(title or storage.basename(storage.abspath(workdir)))
  fig.tight_layout()
  out = storage.join(workdir, 'learning_curves.png')
  storage.savefig(fig, out, dpi=100)
  plt.close(fig)
  return out
