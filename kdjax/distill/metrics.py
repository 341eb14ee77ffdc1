"""Metrics: ``(sum, count)`` accumulation and the writers (JSONL, TensorBoard, PNG)."""

from __future__ import annotations

import json
import os
from typing import Mapping

import jax
import numpy as np


class Accumulator:
  """Sums ``(sum, count)`` pairs over steps; ``means()`` gives ``sum / count``."""

  def __init__(self):
    self.totals: dict[str, list[float]] = {}

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


class MetricsWriter:
  """Writes ``metrics.jsonl`` and TensorBoard events under the workdir (process 0 only)."""

  def __init__(self, workdir: str, *, resume_step: int | None = None):
    self.workdir = workdir
    self.path = os.path.join(workdir, 'metrics.jsonl')
    self.enabled = jax.process_index() == 0
    self._tb = None
    if not self.enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    # A resumed run drops what the killed run logged after its last checkpoint, so the
    # file ends as an uninterrupted run's would.
    if os.path.exists(self.path):
      keep = [line for line in read_jsonl(self.path)
              if resume_step is not None and line.get('step', 0) <= resume_step]
      with open(self.path + '.tmp', 'w') as f:
        for line in keep:
          f.write(json.dumps(line) + '\n')
      os.replace(self.path + '.tmp', self.path)
    try:
      from tensorboardX import SummaryWriter
      self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    except ImportError:  # pragma: no cover - tensorboardX is a dependency
      self._tb = None

  def write(self, step: int, split: str, values: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    record = {'step': int(step), 'split': split, **{k: float(v) for k, v in values.items()}}
    with open(self.path, 'a') as f:
      f.write(json.dumps(record) + '\n')
    if self._tb is not None:
      for k, v in values.items():
        self._tb.add_scalar(f'{split}/{k}', float(v), int(step))

  def close(self) -> None:
    if self._tb is not None:
      self._tb.flush()
      self._tb.close()


def read_jsonl(path: str) -> list[dict]:
  out = []
  with open(path) as f:
    for line in f:
      line = line.strip()
      if line:
        try:
          out.append(json.loads(line))
        except json.JSONDecodeError:
          break  # a line cut by a kill: everything after it is dropped
  return out


def plot_learning_curves(workdir: str, title: str = '') -> str | None:
  """Draws train loss and eval accuracy against the step into ``learning_curves.png``."""
  path = os.path.join(workdir, 'metrics.jsonl')
  if not os.path.exists(path) or jax.process_index() != 0:
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  records = read_jsonl(path)
  train = [(r['step'], r['loss']) for r in records if r['split'] == 'train' and 'loss' in r]
  evals = [(r['step'], r['accuracy']) for r in records if r['split'] == 'eval' and 'accuracy' in r]
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
  if train:
    ax1.plot(*np.asarray(train).T)
  ax1.set_xlabel('step'); ax1.set_ylabel('train loss'); ax1.set_yscale('log')
  if evals:
    ax2.plot(*np.asarray(evals).T, marker='o')
  ax2.set_xlabel('step'); ax2.set_ylabel('eval accuracy')
  fig.suptitle(title or os.path.basename(os.path.abspath(workdir)))
  fig.tight_layout()
  out = os.path.join(workdir, 'learning_curves.png')
  fig.savefig(out, dpi=100)
  plt.close(fig)
  return out
