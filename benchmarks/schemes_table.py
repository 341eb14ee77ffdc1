"""Every distillation scheme against plain KD and the student from labels, on MNIST-1D and
UCI digits: one table of test accuracy (last and best evaluation) and wall time over seeds.

Per data set and seed ``s`` it trains, into ``WORKDIR/<dataset>/<cell>/seed<s>``:

* ``teacher`` (``configs/<ds>/teacher.py``), ``student_baseline`` (the student from
  labels) and ``kd`` (plain Hinton KD from that teacher): the references;
* ``teacher_mlp_half`` (the teacher file with an MLP on the first half of the train
  split), only when ``multi_teacher`` is in the list: its second teacher;
* the teachers a scheme trains on its own terms (:data:`OWN_TEACHERS`: MST-Distill's
  multimodal and spectrogram CNNs), one cell each, when that scheme is in the list;
* every scheme of :data:`SCHEMES` whose ``configs/<ds>/<name>.py`` exists, seeded ``s``
  and wired to that seed's teacher (:func:`wiring`): a config whose loss reads a
  teacher gets ``teacher.workdir``; a TAKD-like stages run gets the teacher as
  ``scheme.teacher_workdir`` for its ``teacher_stage``; a born-again run gets the
  student-from-labels run as its generation 0 (the same config and seed), so neither
  teacher is trained twice; ``multi_teacher`` gets both teachers.

Every run goes through ``kdjax.cli.main`` in this process (one JAX import for all). A
cell whose ``summary.json`` exists is not run again, so the table is built over several
invocations (an interrupted cell resumes from its last checkpoint); a kept cell of
another config file (a ``--quick`` table's cell under a full table) is refused, not read. "last" is the
summary's ``eval_accuracy`` (the test split at the last step); "best" is the highest
eval-split accuracy in the run's ``metrics.jsonl`` (the final stage's, for a stages
run): the evaluation cadence is overridden to :data:`EVAL_EVERY` steps so every run
evaluates about ten times or more (``--quick`` keeps the tiny configs' cadence). "best"
is picked on the test split itself: an oracle, an upper bound, not a model selection.
Wall seconds are the cell's own run (a scheme's shared teacher is its own cell); the
one-minute load average is recorded at the start and end of every cell, since the
machine may be shared.

    python benchmarks/schemes_table.py --datasets digits --json /tmp/t.json \
        --markdown /tmp/t.md --workdir workdirs/schemes_table
    python benchmarks/schemes_table.py --quick --json /tmp/q.json   # tiny configs, seconds
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import io
import json
import os
import sys
import time

import numpy as np

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench_common import machine_info  # noqa: E402  (benchmarks/bench_common.py)
from bench_common import write_json  # noqa: E402

# The schemes, by config file name (configs/<dataset>/<name>.py; a name without a file
# for a data set is listed as missing there). Add a new scheme's name here.
SCHEMES = ['dml', 'kdcl', 'one', 'multi_teacher', 'takd', 'born_again', 'cross_modal',
           'cross_task', 'byot', 'mean_teacher', 'snapshot', 'tf_kd_self', 'tf_kd_reg',
           'gt_guided', 'function_matching', 'dkd',
           'curriculum', 'layerwise', 'bdkd_online', 'mst_distill']
REFERENCES = ['teacher', 'student_baseline', 'kd']
DATASETS = ['digits', 'mnist1d']
QUICK_SCHEMES = ['dml', 'born_again']
# Evaluation cadence of the full runs (steps): 10 evaluations of the 1500-step digits
# student, 10 of the 3000-step MNIST-1D student.
EVAL_EVERY = {'digits': 150, 'mnist1d': 300}
# Schemes whose teachers are runs of their own, not the shared teacher: the config files
# (configs/<ds>/<file>[:variant]) of those runs, in the order config.scheme.teachers
# lists their workdirs. Each is a cell of its own, trained once per data set and seed.
OWN_TEACHERS = {'mst_distill': ['mst_distill:multimodal_teacher', 'cross_modal:baseline']}
# What a scheme's number means when it is not the MLP student's 10-class accuracy.
NOTES = {'byot': "the teacher's CNN (deepest head), not the MLP student",
         'cross_task': '5 classes (digit pairs): not comparable',
         'cross_modal': 'the student reads a coarser view of the input'}


def config_path(dataset: str, name: str) -> str:
  return os.path.join(ROOT, 'configs', dataset, name + '.py')


def cell_dir(workdir: str, dataset: str, name: str, seed: int) -> str:
  return os.path.join(workdir, dataset, name, f'seed{seed}')


def own_cell(spec: str) -> str:
  """An own-teacher run's cell name: ``'cross_modal:baseline'`` -> ``'cross_modal_baseline'``."""
  return spec.replace(':', '_').replace(',', '_')


def wiring(config, dataset: str, workdir: str, seed: int, name: str = '') -> list[str]:
  """The ``--config.*`` overrides that seed a scheme config and give it the shared runs.

  Args:
    config: the loaded scheme config (``kdjax.config.load_config_file``).
    dataset: ``'digits'`` or ``'mnist1d'``.
    workdir: the table's root folder.
    seed: the seed.
    name: the scheme's name in :data:`SCHEMES` (for :data:`OWN_TEACHERS`).

  Returns:
    The override arguments (teacher, seed; not the evaluation cadence).
  """
  from kdjax.engine.setup import TEACHER_NEEDS
  from kdjax.losses import build_objective
  teacher = cell_dir(workdir, dataset, 'teacher', seed)
  out = [f'--config.seed={seed}']
  scheme = config.get('scheme')
  kind = scheme.get('name') if scheme is not None else None
  if kind == 'stages':
    if scheme.get('method') == 'born_again':   # generation 0 is the student from labels
      out += [f'--config.scheme.teacher_workdir='
              f'{cell_dir(workdir, dataset, "student_baseline", seed)}',
              '--config.scheme.teacher_stage=gen0']
    elif scheme.get('teacher_stage'):
      out.append(f'--config.scheme.teacher_workdir={teacher}')
    return out
  own = OWN_TEACHERS.get(name)
  if own:
    dirs = [cell_dir(workdir, dataset, own_cell(spec), seed) for spec in own]
    out.append(f'--config.scheme.teachers={dirs!r}')
    return out
  if kind == 'multi_teacher':
    half = cell_dir(workdir, dataset, 'teacher_mlp_half', seed)
    out.append('--config.scheme.teachers=' + repr(
        [{'workdir': teacher, 'label_map': None}, {'workdir': half, 'label_map': None}]))
    return out
  terms = config.get('loss', {}).get('terms')
  if terms and build_objective(terms.to_dict()).needs & TEACHER_NEEDS:
    out.append(f'--config.teacher.workdir={teacher}')
  return out


def eval_overrides(config, dataset: str) -> list[str]:
  """The evaluation cadence override (a stages run: every stage, through its overrides)."""
  every = EVAL_EVERY[dataset]
  scheme = config.get('scheme')
  if scheme is not None and scheme.get('name') == 'stages':
    overrides = dict(scheme.get('overrides') or {})
    return ['--config.scheme.overrides=' + repr({**overrides, 'eval_every': every})]
  return [f'--config.eval_every={every}']


def plan(datasets, seeds, names, workdir: str, quick: bool):
  """The cells to run, in order: ``(dataset, name, seed, config_spec, args)``, and the
  ``(dataset, name)`` pairs without a config file."""
  from kdjax.config import load_config_file
  cells, missing = [], []
  for ds in datasets:
    present = [n for n in names if os.path.isfile(config_path(ds, n))]
    missing += [(ds, n) for n in names if n not in present]
    for seed in seeds:
      runs = list(REFERENCES)
      if 'multi_teacher' in present:
        runs.append('teacher_mlp_half')
      own = {own_cell(t): t for n in present for t in OWN_TEACHERS.get(n, [])}
      runs += list(own)
      runs += [n for n in present if n not in REFERENCES]
      for name in runs:
        file, _, variant = own.get(name, 'teacher' if name == 'teacher_mlp_half'
                                   else name).partition(':')
        variants = ','.join(filter(None, [variant, 'tiny' if quick else '']))
        spec = config_path(ds, file) + (f':{variants}' if variants else '')
        config = load_config_file(spec)
        if name == 'teacher_mlp_half':
          args = [f'--config.seed={seed}', '--config.model.name=mlp', '--config.model.kwargs={}',
                  '--config.data.train_split=train[:50%]']
        elif name in own:
          args = [f'--config.seed={seed}']
        else:
          args = wiring(config, ds, workdir, seed, name)
        if not quick:
          args += eval_overrides(config, ds)
        cells.append((ds, name, seed, spec, args))
  return cells, missing


def read_evals(run_dir: str, summary: dict) -> list[tuple[int, float]]:
  """``(step, accuracy)`` of every eval-split row of the run's ``metrics.jsonl`` (a stages
  run: its final stage's)."""
  path = os.path.join(run_dir, 'metrics.jsonl')
  if not os.path.isfile(path):
    path = os.path.join(run_dir, str(summary.get('final_stage')), 'metrics.jsonl')
  if not os.path.isfile(path):
    return []
  rows = []
  with open(path) as f:
    for line in f:
      row = json.loads(line)
      if row.get('split') == 'eval' and row.get('accuracy') is not None:
        rows.append((int(row['step']), float(row['accuracy'])))
  return rows


def run_cell(ds: str, name: str, seed: int, spec: str, args: list[str], workdir: str,
             *, verbose: bool) -> dict:
  """Runs one cell (unless its ``summary.json`` exists) and returns its record."""
  from kdjax import cli
  out = cell_dir(workdir, ds, name, seed)
  summary_path = os.path.join(out, 'summary.json')
  record_path = os.path.join(out, 'cell.json')
  record = {'dataset': ds, 'scheme': name, 'seed': seed, 'config': os.path.relpath(spec, ROOT),
            'overrides': args, 'workdir': out}
  if os.path.isfile(summary_path):
    record['ran'] = False
    if os.path.isfile(record_path):
      with open(record_path) as f:
        previous = json.load(f)
      if previous.get('config', record['config']) != record['config']:
        record['status'] = 'failed'
        record['error'] = (f"{out} holds a run of {previous['config']}, not {record['config']}; "
                           'use another --workdir (--quick and full tables apart)')
        return record
      for key in ('wall_s', 'load_avg_start', 'load_avg_end', 'finished_at'):
        record[key] = previous.get(key)
  else:
    command = 'distill' if any(a.startswith(('--config.teacher.workdir',
                                             '--config.scheme.teacher')) for a in args) \
        else 'train'
    argv = [command, '--config', spec, '--workdir', out, *args, '--config.progress=False']
    if verbose:
      print('  kdjax', ' '.join(argv), flush=True)
    record['load_avg_start'] = os.getloadavg()[0]
    t0 = time.perf_counter()
    sink = io.StringIO()
    try:
      with contextlib.redirect_stdout(sink):
        rc = cli.main(argv)
    except Exception as e:   # an internal error of one scheme must not stop the table
      rc, record['error'] = 1, f'{type(e).__name__}: {e}'
    record['wall_s'] = time.perf_counter() - t0
    record['load_avg_end'] = os.getloadavg()[0]
    record['finished_at'] = datetime.datetime.now(datetime.timezone.utc).isoformat(
        timespec='seconds')
    record['ran'] = True
    if rc != 0 or not os.path.isfile(summary_path):
      record.setdefault('error', f'kdjax exited {rc}')
      record['status'] = 'failed'
      return record
    with open(record_path, 'w') as f:
      json.dump({k: record[k] for k in ('config', 'wall_s', 'load_avg_start', 'load_avg_end',
                                        'finished_at', 'overrides')}, f, indent=2)
  with open(summary_path) as f:
    summary = json.load(f)
  evals = read_evals(out, summary)
  record['status'] = 'done'
  record['last'] = summary.get('eval_accuracy')
  record['evals'] = len(evals)
  if evals:
    step, acc = max(evals, key=lambda r: (r[1], -r[0]))
    record['best'], record['best_step'] = acc, step
  else:
    record['best'], record['best_step'] = record['last'], None
  record['resumed_from'] = summary.get('resumed_from')
  extra = {k: v for k, v in summary.items()
           if isinstance(v, (int, float)) and (k.startswith(('ensemble', 'ban_ensemble'))
                                              or k in ('teacher_accuracy',))}
  if extra:
    record['extra'] = extra
  return record


def teacher_cells() -> set[str]:
  """The cells that are teachers (and KD itself): no "beats KD?" for them."""
  return {'kd', 'teacher', 'teacher_mlp_half'} | {
      own_cell(t) for ts in OWN_TEACHERS.values() for t in ts}


def _stat(values):
  values = np.asarray(values, dtype=np.float64)
  if values.size == 0:
    return None, None
  std = float(values.std(ddof=1)) if values.size > 1 else 0.0
  return float(values.mean()), std


def aggregate(cells: list[dict]) -> list[dict]:
  """Per ``(dataset, scheme)``: seeds, last / best mean and std (ddof 1; 0 for one seed),
  wall mean, and ``beats_kd``: mean last above KD's mean last by more than KD's std."""
  groups: dict[tuple[str, str], list[dict]] = {}
  for c in cells:
    if c.get('status') == 'done':
      groups.setdefault((c['dataset'], c['scheme']), []).append(c)
  rows = []
  for (ds, name), group in groups.items():
    last_mean, last_std = _stat([c['last'] for c in group])
    best_mean, best_std = _stat([c['best'] for c in group])
    walls = [c['wall_s'] for c in group if c.get('wall_s') is not None]
    rows.append({'dataset': ds, 'scheme': name, 'seeds': sorted(c['seed'] for c in group),
                 'last_mean': last_mean, 'last_std': last_std,
                 'best_mean': best_mean, 'best_std': best_std,
                 'wall_s_mean': float(np.mean(walls)) if walls else None,
                 'note': NOTES.get(name, '')})
  kd = {r['dataset']: r for r in rows if r['scheme'] == 'kd'}
  for r in rows:
    ref = kd.get(r['dataset'])
    r['beats_kd'] = (None if ref is None or r['scheme'] in teacher_cells()
                     else bool(r['last_mean'] > ref['last_mean'] + ref['last_std']))
  return rows


def markdown(rows: list[dict], datasets) -> str:
  """The table: a row per scheme, per data set: last and best (mean +- std, %), wall s,
  beats KD?"""
  by = {(r['dataset'], r['scheme']): r for r in rows}
  names = []
  for name in ['teacher', 'student_baseline', 'kd', 'teacher_mlp_half', *SCHEMES]:
    if any((ds, name) in by for ds in datasets) and name not in names:
      names.append(name)
  names += sorted({r['scheme'] for r in rows} - set(names))
  head = '| scheme |' + ''.join(f' {ds} last | {ds} best | {ds} wall s | {ds} beats KD? |'
                                for ds in datasets) + ' note |'
  lines = [head, '|' + '---|' * (1 + 4 * len(datasets) + 1)]

  def pct(mean, std):
    return f'{100 * mean:.1f} +- {100 * std:.1f}'

  for name in names:
    cols = []
    for ds in datasets:
      r = by.get((ds, name))
      if r is None:
        cols += ['-'] * 4
        continue
      beats = {True: 'yes', False: 'no', None: ''}[r['beats_kd']]
      wall = f"{r['wall_s_mean']:.0f}" if r['wall_s_mean'] is not None else '?'
      cols += [pct(r['last_mean'], r['last_std']), pct(r['best_mean'], r['best_std']), wall,
               beats]
    note = NOTES.get(name, '')
    lines.append(f'| {name} | ' + ' | '.join(cols) + f' | {note} |')
  return '\n'.join(lines) + '\n'


def plot(rows: list[dict], datasets, path: str) -> None:
  """Last accuracy (mean, std bars) per scheme and data set, KD's mean as a line."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, axes = plt.subplots(1, len(datasets), figsize=(6 * len(datasets), 5), squeeze=False)
  for ax, ds in zip(axes[0], datasets):
    group = [r for r in rows if r['dataset'] == ds]
    ax.barh([r['scheme'] for r in group], [100 * r['last_mean'] for r in group],
            xerr=[100 * r['last_std'] for r in group], color='tab:blue')
    kd = [r for r in group if r['scheme'] == 'kd']
    if kd:
      ax.axvline(100 * kd[0]['last_mean'], color='tab:red', label='plain KD (mean)')
      ax.legend(loc='lower right')
    lows = [100 * r['last_mean'] for r in group if r['scheme'] != 'cross_task']
    ax.set_xlim(max(0.0, min(lows or [0.0]) - 5), 100)
    ax.set_xlabel('test accuracy at the last step (%)')
    ax.set_title(ds)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def main(argv=None) -> int:
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  p.add_argument('--datasets', default=','.join(DATASETS))
  p.add_argument('--seeds', default='0,1,2')
  p.add_argument('--only', default='', help='scheme names to run (default: all of SCHEMES)')
  p.add_argument('--workdir', default=None,
                 help='where the cells go (default workdirs/schemes_table, '
                      'workdirs/schemes_table_quick with --quick)')
  p.add_argument('--json', default=None, help='write every cell and the aggregates here')
  p.add_argument('--markdown', default=None, help='write the table here')
  p.add_argument('--quick', action='store_true',
                 help=f'the :tiny configs, seed 0, schemes {",".join(QUICK_SCHEMES)} on digits')
  args = p.parse_args(argv)
  datasets = [d for d in args.datasets.split(',') if d]
  unknown = sorted(set(datasets) - set(DATASETS))
  if unknown:
    p.error(f'unknown data set {unknown[0]!r}; use {",".join(DATASETS)}')
  seeds = [int(s) for s in args.seeds.split(',') if s]
  names = [n for n in args.only.split(',') if n] or list(SCHEMES)
  if args.quick:
    seeds = [0]
    names = [n for n in args.only.split(',') if n] or list(QUICK_SCHEMES)
    if args.datasets == ','.join(DATASETS):
      datasets = ['digits']
  typos = [n for n in names if n not in SCHEMES + REFERENCES
           and not any(os.path.isfile(config_path(ds, n)) for ds in datasets)]
  if typos:
    p.error(f'no config configs/<dataset>/{typos[0]}.py for --only; use names of SCHEMES '
            f'({",".join(SCHEMES)}) or of a config file')
  workdir = os.path.abspath(args.workdir or os.path.join(
      ROOT, 'workdirs', 'schemes_table_quick' if args.quick else 'schemes_table'))
  cells_to_run, missing = plan(datasets, seeds, names, workdir, args.quick)
  started = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds')
  cells = []
  for i, (ds, name, seed, spec, over) in enumerate(cells_to_run):
    record = run_cell(ds, name, seed, spec, over, workdir, verbose=not args.quick)
    cells.append(record)
    status = record['status'] + ('' if record['ran'] else ' (kept)')
    shown = (f"last {record['last']:.4f} best {record['best']:.4f} "
             f"wall {record.get('wall_s') or 0:.0f}s" if record['status'] == 'done'
             else record.get('error', ''))
    print(f'[{i + 1}/{len(cells_to_run)}] {ds} {name} seed{seed}: {status} {shown}',
          flush=True)
  rows = aggregate(cells)
  result = {'benchmark': 'schemes_table', 'started': started, 'quick': args.quick,
            'datasets': datasets, 'seeds': seeds, 'workdir': workdir,
            'eval_every': None if args.quick else EVAL_EVERY,
            'machine': machine_info(), 'cells': cells, 'aggregates': rows,
            'missing_configs': [{'dataset': d, 'scheme': n} for d, n in missing],
            'failed': [f"{c['dataset']}/{c['scheme']}/seed{c['seed']}" for c in cells
                       if c['status'] == 'failed']}
  write_json(args.json, result)
  if args.json and rows:
    plot(rows, datasets, os.path.splitext(args.json)[0] + '.png')
  table = markdown(rows, datasets)
  if args.markdown:
    with open(args.markdown, 'w') as f:
      f.write(table)
  print(table)
  if missing:
    print('no config for: ' + ', '.join(f'{d}/{n}' for d, n in missing))
  return 1 if result['failed'] else 0


if __name__ == '__main__':
  sys.exit(main())
