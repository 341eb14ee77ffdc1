"""Teacher-cache accuracy: the distilled student for each cached top-k and dtype.

For each task, one run:

  1. trains the teacher once (or reuses ``--teacher-workdir``);
  2. distills the student from the live teacher (``kd`` + ``ce``, the recipe of the
     task's KD config): the reference;
  3. builds a cache for every ``k`` in ``--ks`` and dtype in ``--dtypes`` with
     ``kdjax.cache.build_cache`` and distills the same student from each with the same
     recipe, fed from the cache: for ``k`` < classes the ``kd`` term is replaced by
     ``sparse_kd`` (same weight and temperature; missing mass ``--missing-mass``,
     default ``renormalize``); for ``k`` = all classes the run keeps the dense ``kd``
     term, fed the dense logits scattered back from the cache (``--all-loss sparse_kd``
     uses ``sparse_kd`` there too). So the float32, k = all row must equal the live
     reference exactly; ``sparse_kd`` at k = all is the same loss up to float32 rounding,
     which over thousands of Adam steps moves the final accuracy by a few tenths.

Every distillation runs for ``--seeds`` student seeds (the cache serves all of them: the
runs use no augmentation, so the seed does not change the teacher's outputs). Printed
and written to ``--json``: bytes per cached example, the mean top-k probability mass
(temperature 1), and the student's test accuracy mean ± std over seeds, next to the
live-teacher reference.

Tasks: ``mnist1d`` (the demo's ``cnn1d`` teacher and ``mlp`` student, configs
``configs/mnist1d/teacher.py`` and ``kd.py``: 10 classes) and ``shakespeare`` (the next
character after 20 on ``shakespeare/tiny``, 76 classes; ``char_lstm`` teacher and student
on the same recipes, see ``TASKS``).

    python benchmarks/cache_accuracy.py --json /tmp/cache_accuracy.json
    python benchmarks/cache_accuracy.py --task mnist1d --teacher-workdir workdirs/teacher
    python benchmarks/cache_accuracy.py --quick            # seconds, figures meaningless
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench_common import write_json  # noqa: E402  (benchmarks/bench_common.py)

DTYPES = ('float32', 'bfloat16', 'float16', 'int8')

# Per task: teacher config, KD config (the student recipe), overrides of both, and the
# overrides that make a run take seconds (--quick).
TASKS: dict[str, dict[str, Any]] = {
    'mnist1d': {
        'teacher': 'mnist1d/teacher.py', 'kd': 'mnist1d/kd.py',
        'teacher_overrides': [], 'kd_overrides': [],
        'quick_teacher': ['--config.num_steps=40'],
        'quick_kd': ['--config.num_steps=30', '--config.eval_every=30',
                     '--config.checkpoint_every=30', '--config.log_every=10',
                     '--config.steps_per_call=10'],
    },
        # Next character on shakespeare/tiny (2 plays, windows of 20 characters, 76 classes),
    # the MNIST-1D recipes (AdamW, batch 128; kd 0.9 at T = 4 + ce 0.1) with char models:
    # teacher char_lstm 128 x 1, student char_lstm 32 x 1 (sized to run here in minutes).
    'shakespeare': {
        'teacher': 'mnist1d/teacher.py', 'kd': 'mnist1d/kd.py',
        'teacher_overrides': [
            '--config.data.name=shakespeare/tiny', '--config.model.name=char_lstm',
            "--config.model.kwargs={'hidden': 128, 'layers': 1}",
            '--config.num_steps=1500', '--config.optimizer.warmup_steps=50',
            '--config.eval_every=500', '--config.checkpoint_every=1500'],
        'kd_overrides': [
            '--config.data.name=shakespeare/tiny', '--config.model.name=char_lstm',
            "--config.model.kwargs={'hidden': 32, 'layers': 1}",
            '--config.num_steps=1000', '--config.eval_every=500',
            '--config.checkpoint_every=1000'],
        'quick_teacher': ['--config.num_steps=20', '--config.eval_every=20',
                          '--config.checkpoint_every=20', '--config.log_every=10',
                          '--config.steps_per_call=10', '--config.optimizer.warmup_steps=0'],
        'quick_kd': ['--config.num_steps=20', '--config.eval_every=20',
                     '--config.checkpoint_every=20', '--config.log_every=10',
                     '--config.steps_per_call=10'],
    },
}


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--json', help='write every figure to this JSON file')
  p.add_argument('--quick', action='store_true', help='a seconds-long smoke run (tiny settings)')
  p.add_argument('--task', default='mnist1d', help='comma list of tasks: mnist1d, shakespeare')
  p.add_argument('--teacher-workdir', default='',
                 help='a finished teacher workdir to reuse (one task only)')
  p.add_argument('--workdir', default='', help='where runs go (default: a temporary folder)')
  p.add_argument('--seeds', type=int, default=3, help='student seeds per configuration')
  p.add_argument('--ks', default='1,3,5,all', help="comma list of k ('all' = every class)")
  p.add_argument('--dtypes', default=','.join(DTYPES), help='comma list of cache dtypes')
  p.add_argument('--missing-mass', default='renormalize',
                 choices=('renormalize', 'uniform', 'zero'), help='sparse_kd tail treatment')
  p.add_argument('--all-loss', default='kd', choices=('kd', 'sparse_kd'),
                 help='the KD term of k = all-classes caches (kd: dense logits from the cache)')
  p.add_argument('--data-dir', default='', help='data directory (default: kdjax default)')
  p.add_argument('--set', action='append', default=[], metavar='--config.KEY=VALUE',
                 help='extra override for the teacher and student configs (repeatable)')
  args = p.parse_args(argv)
  if args.quick:
    args.seeds = 1
    args.ks = '1,all'
    args.dtypes = 'float32,int8'
  bad = set(args.dtypes.split(',')) - set(DTYPES)
  if bad:
    p.error(f'unknown dtypes {sorted(bad)}')
  if args.teacher_workdir and ',' in args.task:
    p.error('--teacher-workdir goes with one --task')
  return args


def _config(file: str, overrides: list[str]):
  from kdjax.config import load_config, split_overrides
  rest, pairs = split_overrides(list(overrides))
  if rest:
    raise SystemExit(f'not config overrides: {rest}')
  return load_config(os.path.join(ROOT, 'configs', file), pairs)


def _task_overrides(task: dict, args, which: str) -> list[str]:
  out = list(task[f'{which}_overrides']) + list(args.set)
  if args.quick:
    out += task[f'quick_{which}']
  if args.data_dir:
    out.append(f'--config.data.data_dir={args.data_dir}')
  return out + ['--config.progress=false']


def _sparse_terms(terms: dict, missing_mass: str) -> dict:
  """The KD recipe's terms with ``kd`` replaced by ``sparse_kd`` (same weight, T)."""
  terms = {name: dict(t) for name, t in terms.items()}
  kd = terms['kd']
  kd['loss'] = 'sparse_kd'
  kd['missing_mass'] = missing_mass
  return terms


def _mean_std(values):
  import numpy as np
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def run_task(name: str, task: dict, args, workdir: str) -> dict:
  """Teacher, live reference and the k x dtype table for one task."""
  from kdjax.cache import build_cache, inspect_cache
  from kdjax.distill.train import train_and_evaluate

  t_task = time.time()
  out: dict[str, Any] = {'task': name}
  teacher_dir = args.teacher_workdir or os.path.join(workdir, 'teacher')
  if not args.teacher_workdir:
    print(f'[{name}] teacher -> {teacher_dir}', flush=True)
    t0 = time.time()
    tsum = train_and_evaluate(_config(task['teacher'], _task_overrides(task, args, 'teacher')),
                              teacher_dir)
    out['teacher'] = {'eval_accuracy': tsum['eval_accuracy'], 'seconds': time.time() - t0,
                      'workdir': teacher_dir}
  else:
    out['teacher'] = {'workdir': teacher_dir, 'reused': True}
    with open(os.path.join(teacher_dir, 'summary.json')) as f:
      out['teacher']['eval_accuracy'] = json.load(f).get('eval_accuracy')

  kd_overrides = _task_overrides(task, args, 'kd')
  base = _config(task['kd'], kd_overrides)
  base.teacher.workdir = teacher_dir
  from kdjax import data as kdata
  num_classes = kdata.dataset_spec(base.data.name, data_dir=base.data.data_dir or None).num_classes
  out['num_classes'] = num_classes
  out['student_recipe'] = {'config': task['kd'], 'overrides': kd_overrides,
                           'terms': base.loss.terms.to_dict(), 'num_steps': int(base.num_steps)}
  seeds = list(range(args.seeds))

  def distill(label, mutate):
    accs, secs = [], []
    for seed in seeds:
      config = _config(task['kd'], kd_overrides)
      config.teacher.workdir = teacher_dir
      config.seed = seed
      mutate(config)
      run_dir = os.path.join(workdir, label, f'seed{seed}')
      t0 = time.time()
      summary = train_and_evaluate(config, run_dir)
      secs.append(time.time() - t0)
      accs.append(summary['eval_accuracy'])
      print(f'[{name}] {label} seed {seed}: accuracy {summary["eval_accuracy"]:.4f} '
            f'({secs[-1]:.0f} s)', flush=True)
    mean, std = _mean_std(accs)
    return {'accuracy_mean': mean, 'accuracy_std': std, 'accuracy': accs,
            'seconds': sum(secs)}

  out['live'] = distill('live', lambda c: None)

  ks = [num_classes if k == 'all' else int(k) for k in args.ks.split(',')]
  rows = []
  for k in ks:
    for dtype in args.dtypes.split(','):
      cache_dir = os.path.join(workdir, 'caches', f'k{k}-{dtype}')
      t0 = time.time()
      manifest = build_cache(base, cache_dir, k=k, dtype=dtype, progress=False)
      build_s = time.time() - t0
      info = inspect_cache(cache_dir)
      terms = base.loss.terms.to_dict()
      if k < num_classes or args.all_loss == 'sparse_kd':
        terms = _sparse_terms(terms, args.missing_mass)

      def mutate(config, cache_dir=cache_dir, terms=terms):
        config.teacher.cache = cache_dir
        config.loss.terms = terms

      res = distill(f'cache-k{k}-{dtype}', mutate)
      res.update(k=k, k_label='all' if k == num_classes else str(k), dtype=dtype,
                 loss=terms['kd'].get('loss', 'kd'),
                 bytes_per_example=int(manifest['bytes_per_entry']),
                 topk_mass_mean=info['topk_mass']['mean'], build_seconds=build_s)
      rows.append(res)
  out['cached'] = rows
  out['seeds'] = len(seeds)
  out['seconds'] = time.time() - t_task
  return out


def format_table(res: dict) -> str:
  live = res['live']
  lines = [f"{res['task']}: {res['num_classes']} classes; teacher accuracy "
           f"{100 * res['teacher']['eval_accuracy']:.2f}%; student from the live teacher "
           f"{100 * live['accuracy_mean']:.2f} ± {100 * live['accuracy_std']:.2f}% "
           f"({res['seeds']} seeds)",
           '| k | dtype | KD term | bytes / example | top-k mass | accuracy % (mean ± std) '
           '| vs live |',
           '|---:|---|---|---:|---:|---:|---:|']
  for r in res['cached']:
    lines.append(f"| {r['k_label']} | {r['dtype']} | {r['loss']} | {r['bytes_per_example']} | "
                 f"{r['topk_mass_mean']:.3f} | {100 * r['accuracy_mean']:.2f} ± "
                 f"{100 * r['accuracy_std']:.2f} | "
                 f"{100 * (r['accuracy_mean'] - live['accuracy_mean']):+.2f} |")
  return '\n'.join(lines)


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax
  tasks = dict(TASKS)
  names = args.task.split(',')
  unknown = [n for n in names if n not in tasks]
  if unknown:
    raise SystemExit(f'unknown task(s) {unknown}; use {sorted(tasks)}')
  workdir = args.workdir or tempfile.mkdtemp(prefix='kdjax_cache_accuracy_')
  os.makedirs(workdir, exist_ok=True)
  results = {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': {'platform': platform.platform(), 'processor': platform.processor(),
                  'cpu_count': os.cpu_count(), 'devices': [str(d) for d in jax.devices()]},
      'jax': jax.__version__, 'argv': sys.argv[1:] if argv is None else list(argv),
      'quick': args.quick, 'missing_mass': args.missing_mass, 'tasks': {}}
  for name in names:
    res = run_task(name, tasks[name], args, os.path.join(workdir, name))
    results['tasks'][name] = res
    print(format_table(res), flush=True)
    write_json(args.json, results)   # after every task, so a later task's failure keeps the earlier figures
  return results


if __name__ == '__main__':
  main()
