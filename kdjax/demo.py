"""``kdjax demo``: the main job on MNIST-1D, offline, end to end.

Trains the 1-D CNN teacher, the MLP student from labels (baseline), and distills the
MLP student from the teacher on the labeled split and with the unlabeled transfer
split, for several seeds each. Prints a table (accuracy mean ± std, wall time,
examples/s) and writes ``WORKDIR/results.json`` and ``WORKDIR/results.png``.
"""

from __future__ import annotations

import json
import os
import time

import numpy as np

from kdjax import storage
from kdjax import workdir as workdir_lib
from kdjax.config import load_config
from kdjax.errors import UserError

RUNS = (
    # (result key, config file, variant, needs teacher)
    ('teacher', 'mnist1d/teacher.py', '', False),
    ('student_baseline', 'mnist1d/student_baseline.py', '', False),
    ('student_kd', 'mnist1d/kd.py', '', True),
    ('student_kd_transfer', 'mnist1d/kd.py', 'transfer', True),
)


def configs_dir() -> str:
  here = os.path.dirname(os.path.abspath(__file__))
  path = os.path.join(os.path.dirname(here), 'configs')
  if not os.path.isdir(path):
    raise UserError(f'the configs/ folder is not next to the kdjax package ({path}); '
                    'run the demo from a kdjax checkout (pip install -e .)')
  return path


# What the demo sets in every run itself; an override of them would be silently lost.
DEMO_SETS = ('seed', 'progress', 'teacher.workdir')


def run_demo(workdir: str, *, seeds: int = 3, variant: str = '', overrides=()) -> dict:
  """Runs the demo's four kinds of run for ``seeds`` seeds each under ``workdir``.

  Args:
    workdir: one subdirectory per run (``teacher/seed0``, ...); a rerun resumes each run
      from its checkpoints, so a finished one is only evaluated again. A local path or a
      bucket URL (``gs://bucket/demo``, ``docs/object_storage.md``).
    seeds: seeds per kind of run.
    variant: a config variant added to every run's (``'tiny'``).
    overrides: ``(dotted key, value)`` pairs applied to every run's config
      (``data.data_dir``, for example); not the keys in :data:`DEMO_SETS`.
  """
  from kdjax.distill.train import train_and_evaluate
  if seeds < 1:
    raise UserError('--seeds must be at least 1')
  fixed = sorted({key for key, _ in overrides} & set(DEMO_SETS))
  if fixed:
    raise UserError(f'the demo sets {", ".join(fixed)} in every run itself; '
                    f'drop --config.{fixed[0]}')
  workdir = workdir_lib.create(workdir_lib.resolve(workdir))
  results: dict[str, dict] = {}
  t_demo = time.time()
  for key, file, run_variant, needs_teacher in RUNS:
    runs = []
    for seed in range(seeds):
      spec = os.path.join(configs_dir(), file)
      v = ','.join(filter(None, (run_variant, variant)))
      config = load_config(f'{spec}:{v}' if v else spec, list(overrides))
      config.seed = seed
      config.progress = False
      if needs_teacher:
        config.teacher.workdir = storage.join(workdir, 'teacher', f'seed{seed}')
      run_dir = storage.join(workdir, key, f'seed{seed}')
      print(f'[demo] {key} seed {seed} -> {run_dir}', flush=True)
      summary = train_and_evaluate(config, run_dir)
      runs.append(summary)
    acc = np.asarray([r['eval_accuracy'] for r in runs], np.float64)
    eps = [r['examples_per_sec'] for r in runs if r['examples_per_sec']]
    results[key] = {
        'accuracy_mean': float(acc.mean()),
        'accuracy_std': float(acc.std(ddof=1)) if len(acc) > 1 else 0.0,
        'accuracies': acc.tolist(),
        'wall_seconds_mean': float(np.mean([r['wall_seconds'] for r in runs])),
        'examples_per_sec_mean': float(np.mean(eps)) if eps else None,
        'train_split': config.data.train_split,
        'model': config.model.name,
        'num_steps': int(config.num_steps),
    }
  results['_meta'] = {'seeds': seeds, 'variant': variant, 'total_seconds': time.time() - t_demo}
  return write_results(workdir, results, format_table, _plot)


def write_results(workdir: str, results: dict, table, plot) -> dict:
  """Writes ``results.json`` and the plot ``results.png`` (``plot(results, path)``) into
  ``workdir`` (a local path or a URL) and prints ``table(results)``; returns ``results``."""
  path = storage.join(workdir, 'results.json')
  storage.write_text(path, json.dumps(results, indent=2))
  print(table(results))
  plot(results, storage.join(workdir, 'results.png'))
  print(f'[demo] results: {path}, plot: {storage.join(workdir, "results.png")}')
  return results


def format_table(results: dict) -> str:
  lines = [f"{'run':<22} {'model':<6} {'train split':<15} {'accuracy (mean ± std)':<24} "
           f"{'wall s/run':>10} {'examples/s':>11}"]
  for key, _, _, _ in RUNS:
    r = results[key]
    eps = f"{r['examples_per_sec_mean']:,.0f}" if r['examples_per_sec_mean'] else '-'
    lines.append(f"{key:<22} {r['model']:<6} {r['train_split']:<15} "
                 f"{100 * r['accuracy_mean']:6.2f} ± {100 * r['accuracy_std']:5.2f} %       "
                 f"{r['wall_seconds_mean']:>10.1f} {eps:>11}")
  base, tr = results['student_baseline'], results['student_kd_transfer']
  lines.append(f"KD with the transfer split vs. baseline: "
               f"{100 * (tr['accuracy_mean'] - base['accuracy_mean']):+.2f} points "
               f"({results['_meta']['seeds']} seeds); total {results['_meta']['total_seconds']:.0f} s")
  return '\n'.join(lines)


def _plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  keys = [k for k, *_ in RUNS]
  means = [100 * results[k]['accuracy_mean'] for k in keys]
  stds = [100 * results[k]['accuracy_std'] for k in keys]
  fig, ax = plt.subplots(figsize=(7, 3.5))
  ax.bar(range(len(keys)), means, yerr=stds, capsize=4, color=['#555', '#999', '#4a7', '#27a'])
  for i, k in enumerate(keys):
    for a in results[k]['accuracies']:
      ax.plot(i, 100 * a, 'k.', ms=4)
  ax.set_xticks(range(len(keys)), [k.replace('_', '\n') for k in keys])
  ax.set_ylabel('MNIST-1D test accuracy (%)')
  ax.set_ylim(min(means) - 15, 100)
  ax.set_title(f"kdjax demo ({results['_meta']['seeds']} seeds)")
  fig.tight_layout()
  storage.savefig(fig, path, dpi=100)
  plt.close(fig)
