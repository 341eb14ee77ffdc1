"""``kdjax fed sweep``: a grid of federated runs (α × algorithm × seed) and its report.

A sweep config is a federated config (``configs/fed/mnist1d_fedavg.py``) plus a
``grid`` group:

* ``grid.alpha``: Dirichlet label-skew concentrations; ``inf`` (write ``1e999``
  on the command line) means IID (``partition.method='iid'``);
* ``grid.algorithm``: algorithm names (:data:`kdjax.federated.ALGORITHMS`);
* ``grid.seeds``: integer seeds (each seeds the partition, the model and the
  simulation);
* ``grid.options``: per-algorithm ``algorithm_options`` (``{'fedprox': {'mu':
  0.01}}``), merged over the base ``algorithm_options``.

Every cell runs in its own directory ``WORKDIR/cells/<alpha>_<algorithm>_s<seed>``
through :func:`kdjax.federated.run.setup` and the simulator, and writes
``config.json`` (the cell's config), ``metrics.jsonl``, ``clients.json``
(per-client personalized accuracy) and, last, ``summary.json``. A cell whose
``summary.json`` exists is finished: a rerun of a killed sweep (or of a grid
grown by new values) skips it, provided its ``config.json`` is the cell's config
now; a finished cell of another config (other rounds, learning rate, ...) is
refused with a one-line error rather than reported as this sweep's.

The seeds of an (α, algorithm) pair run together as one simulation vmapped over
seeds (:func:`run_seed_group`: each seed's clients padded to the longest seed's,
which leaves every result unchanged; proxy-set algorithms get each seed's proxy
set as a vmapped argument) unless the clients have several architectures, the
cohort is sharded over a mesh, or ``grid.vmap_seeds`` is False; those cells run
one after another.

The sweep then writes ``results.csv`` / ``results.json`` (one row per cell),
``summary.csv`` / ``summary.md`` (mean ± std over seeds per α × algorithm,
also printed), ``accuracy_vs_alpha.png`` (global and personalized accuracy
against α per algorithm, log x axis, IID at the right) and
``client_accuracy.png`` (per-client personalized accuracy, one box per
algorithm at each α).
"""

from __future__ import annotations

import copy
import csv
import io
import json
import math
import time
from typing import Any, Iterable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import storage
from kdjax import workdir as workdir_lib
from kdjax.engine.metrics import MetricsWriter
from kdjax.engine.metrics import read_jsonl
from kdjax.errors import UserError
from kdjax.federated.config import validate
from kdjax.federated.run import as_dict

ROW_KEYS = ('alpha', 'algorithm', 'seed', 'rounds', 'global_accuracy',
            'personalized_accuracy_mean', 'personalized_accuracy_std',
            'personalized_accuracy_worst10', 'bytes_up', 'bytes_down', 'bytes_total',
            'wall_time_s', 'setup_time_s', 'rounds_per_sec')
METRICS = ('global_accuracy', 'personalized_accuracy_mean', 'personalized_accuracy_worst10',
           'bytes_total', 'wall_time_s')
# The baseline of the personalized comparison: each client trains alone, nothing is sent.
BASELINE = 'local_only'


# --------------------------------------------------------------------------- the grid

def validate_grid(grid) -> tuple[list[float], list[str], list[int]]:
  """Checks a sweep grid and returns ``(alphas, algorithms, seeds)``.

  Args:
    grid: a mapping with ``alpha``, ``algorithm`` and ``seeds`` sequences.

  Returns:
    The three lists (alphas as floats, ``inf`` for IID).

  Raises:
    UserError: a missing or empty axis, an α that is not a positive number,
      an unknown algorithm, a seed that is not an integer, a repeated value.

  >>> validate_grid({'alpha': [0.1, 'inf'], 'algorithm': ['fedavg'], 'seeds': [0, 1]})
  ([0.1, inf], ['fedavg'], [0, 1])
  """
  from kdjax.federated.algorithms import ALGORITHMS
  out = []
  for axis in ('alpha', 'algorithm', 'seeds'):
    values = grid.get(axis) if hasattr(grid, 'get') else None
    if isinstance(values, (str, bytes)) or not isinstance(values, Iterable) or not list(values):
      raise UserError(f'sweep grid.{axis} must be a non-empty list (got {values!r}).')
    values = list(values)
    if len(set(map(str, values))) != len(values):
      raise UserError(f'sweep grid.{axis} repeats a value: {values!r}.')
    out.append(values)
  alphas = []
  for a in out[0]:
    if isinstance(a, str) and a.lower() in ('inf', 'iid'):
      a = math.inf
    if isinstance(a, bool) or not isinstance(a, (int, float)) or math.isnan(a) or a <= 0:
      raise UserError(f'sweep grid.alpha values must be positive numbers or inf (IID), '
                      f'got {a!r}.')
    alphas.append(float(a))
  for name in out[1]:
    if name not in ALGORITHMS:
      raise UserError(f'sweep grid.algorithm: unknown algorithm {name!r}; use some of '
                      f'{", ".join(ALGORITHMS)}.')
  seeds = []
  for s in out[2]:
    if isinstance(s, bool) or not isinstance(s, int) or s < 0:
      raise UserError(f'sweep grid.seeds must be non-negative integers, got {s!r}.')
    seeds.append(int(s))
  return alphas, [str(n) for n in out[1]], seeds


def alpha_name(alpha: float) -> str:
  """The directory / table name of an α: ``'a0.05'``, ``'iid'``.

  >>> alpha_name(0.05), alpha_name(1.0), alpha_name(float('inf'))
  ('a0.05', 'a1', 'iid')
  """
  return 'iid' if math.isinf(alpha) else f'a{alpha:g}'


def cell_name(alpha: float, algorithm: str, seed: int) -> str:
  return f'{alpha_name(alpha)}_{algorithm}_s{seed}'


def cell_config(config: ml_collections.ConfigDict, alpha: float, algorithm: str,
                seed: int) -> ml_collections.ConfigDict:
  """The federated config of one cell: the base config with α, algorithm and seed set."""
  c = copy.deepcopy(config)
  grid = c.grid
  with c.unlocked():
    del c['grid']
    c.seed = int(seed)
    c.algorithm = algorithm
    if math.isinf(alpha):
      c.partition.method = 'iid'
    else:
      c.partition.method = 'dirichlet'
      c.partition.alpha = float(alpha)
    opts = dict(as_dict(c.get('algorithm_options')))
    opts.update(as_dict(as_dict(grid.get('options')).get(algorithm)))
    c.algorithm_options = ml_collections.ConfigDict(opts)
    c.plots = False
    c.checkpoint_every = 0
  return c


# --------------------------------------------------------------------------- one cell

def _write_json(path: str, obj) -> None:
  workdir_lib.write_json(path, obj)


def _prepare(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], Any, int, int, float]:
  """``(parts, initial state, bytes per update, bytes per download, set-up seconds)``."""
  from kdjax.federated import run as run_lib
  from kdjax.federated import simulator as sim
  t_setup = time.perf_counter()
  parts = run_lib.setup(config)
  algorithm = parts['algorithm']
  state = sim.init_state(algorithm, parts['params'], parts['model_state'], config.num_clients)
  one = lambda t: jax.tree.map(lambda a: a[0], t)
  update_shape = jax.eval_shape(algorithm.client_update, state.server, one(state.clients),
                                one(parts['train']), jax.random.key(0)).update
  return (parts, state, sim.tree_bytes(update_shape),
          sim.tree_bytes(algorithm.download(state.server)), time.perf_counter() - t_setup)


def run_cell(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs one federated config to the end and writes the cell files (module doc).

  Args:
    config: a federated config (no ``grid``).
    workdir: the cell directory.

  Returns:
    The cell's ``summary.json`` contents.
  """
  from kdjax.federated import run as run_lib
  from kdjax.federated import simulator as sim

  storage.makedirs(workdir)
  if config.get('client_models'):   # heterogeneous groups: run_simulation's own loop
    return _run_cell_via_run_simulation(config, workdir)
  parts, state, bytes_update, bytes_down, setup_time = _prepare(config)
  num_rounds = int(config.num_rounds)
  eval_every = max(int(config.get('eval_every', 0) or num_rounds), 1)
  t0 = time.perf_counter()
  rows, reported = [], []
  for first, count in sim.round_segments(0, num_rounds, config.get('rounds_per_call', 1),
                                         eval_every):
    state, infos = sim.run_rounds(parts['round_fn'], state, parts['train'], count)
    for r, info in enumerate(infos, first):
      reported.append(info['num_reported'])
      row = {'round': r + 1, 'train_loss': info['loss'], 'train_accuracy': info['accuracy']}
      if (r + 1) % eval_every == 0 or r + 1 == num_rounds:
        row.update(run_lib.evaluate_state(parts, state))
      rows.append(row)
  pc, pn = run_lib.personal_evaluate(parts, state)
  wall = time.perf_counter() - t0
  return _write_cell(config, workdir, rows, reported, pc, pn, bytes_update=bytes_update,
                     bytes_down=bytes_down, wall=wall, setup_time=setup_time)


def seeds_vmappable(config: ml_collections.ConfigDict) -> bool:
  """Whether a cell's seeds can run as one ``jax.vmap`` (:func:`run_seed_group`).

  They can unless the clients have several architectures (``client_models``) or
  the cohort is sharded (``mesh``). Proxy-set algorithms (FedDF, FedMD, DS-FL,
  KnFu, EdgeFD; their proxy set is drawn with the seed) get each seed's proxy set
  as a vmapped argument.
  """
  return not config.get('client_models') and not config.get('mesh')


def run_seed_group(configs: list[ml_collections.ConfigDict],
                   workdirs: list[str]) -> list[dict[str, Any]]:
  """Runs cells that differ only in their seed as one simulation vmapped over seeds.

  Each seed gets its own partition, model initialization and round keys; the
  clients' padded example axes are padded to the longest seed's (which does not
  change local training, see :func:`kdjax.federated.packing.pad_to`), the states
  are stacked, and every round is one ``jax.jit(jax.vmap(round_fn))`` call over
  the seeds. Each cell's files are those :func:`run_cell` writes, with the same
  numbers (tested); ``wall_time_s`` is the group's time split evenly.

  Args:
    configs: the cells' configs (:func:`seeds_vmappable`, equal but for ``seed``).
    workdirs: their directories.

  Returns:
    The cells' ``summary.json`` contents.
  """
  from kdjax.federated import packing
  from kdjax.federated import run as run_lib
  from kdjax.federated import simulator as sim

  preps = [_prepare(c) for c in configs]
  setup_time = sum(p[4] for p in preps) / len(preps)
  parts = [p[0] for p in preps]
  config = configs[0]
  pad = lambda key: [packing.pad_to(jax.tree.map(np.asarray, p[key]),
                                    max(q[key].mask.shape[1] for q in parts)) for p in parts]
  stack = lambda trees: jax.tree.map(lambda *a: jnp.stack([jnp.asarray(x) for x in a]), *trees)
  trains, tests = pad('train'), pad('test')
  train, states = stack(trains), stack([p[1] for p in preps])
  seeds = jnp.asarray([int(c.seed) for c in configs], jnp.int32)
  round_opts = dict(num_clients=config.num_clients, clients_per_round=config.clients_per_round,
                    sampling=config.get('sampling', 'uniform'),
                    dropout=config.get('dropout', 0.0),
                    clients_per_chunk=config.get('clients_per_chunk') or None)
  if parts[0].get('proxy_x') is None:
    seeded = sim.make_seeded_round(parts[0]['algorithm'], **round_opts)
    one_seed = lambda state, data, seed, proxy: seeded(state, data, seed)
    proxies = jnp.zeros(len(configs))
  else:
    # Each seed's algorithm holds its own proxy set (same shape): built inside the
    # vmap from that seed's proxy set and seed.
    build = parts[0]['build_algorithm']
    proxies = jnp.stack([jnp.asarray(p['proxy_x']) for p in parts])

    def one_seed(state, data, seed, proxy):
      return sim.make_seeded_round(build(proxy, seed), **round_opts)(state, data, seed)

  vmapped = jax.vmap(one_seed)
  round_fn = sim.jit_round(lambda st, inputs: vmapped(st, *inputs), None)
  inputs = (train, seeds, proxies)
  # Every seed's evaluation uses seed 0's jitted evaluators (the algorithm and model are
  # the same functions) on that seed's own data, so they compile once.
  # Fine-tuning algorithms (fedavg_ft) adapt on each seed's padded training split, which
  # trains as the unpadded one does (packing.pad_to) and keeps one compiled shape.
  evals = [dict(p, test=jax.tree.map(jnp.asarray, t),
                train=jax.tree.map(jnp.asarray, tr), evaluate=parts[0]['evaluate'],
                personal_evaluate=parts[0]['personal_evaluate'],
                clients_global_evaluate=parts[0]['clients_global_evaluate'])
           for p, t, tr in zip(parts, tests, trains)]
  num_rounds = int(config.num_rounds)
  eval_every = max(int(config.get('eval_every', 0) or num_rounds), 1)
  seed_state = lambda i: jax.tree.map(lambda a: a[i], states)
  t0 = time.perf_counter()
  rows = [[] for _ in configs]
  reported = [[] for _ in configs]
  for first, count in sim.round_segments(0, num_rounds, config.get('rounds_per_call', 1),
                                         eval_every):
    states, infos = sim.run_rounds(round_fn, states, inputs, count)
    for r, info in enumerate(infos, first):
      evaluate = (r + 1) % eval_every == 0 or r + 1 == num_rounds
      for i in range(len(configs)):
        one = jax.tree.map(lambda a: a[i], info)
        reported[i].append(one['num_reported'])
        row = {'round': r + 1, 'train_loss': one['loss'], 'train_accuracy': one['accuracy']}
        if evaluate:
          row.update(run_lib.evaluate_state(evals[i], seed_state(i)))
        rows[i].append(row)
  finals = [run_lib.personal_evaluate(evals[i], seed_state(i)) for i in range(len(configs))]
  wall = (time.perf_counter() - t0) / len(configs)
  out = []
  for i, (c, w) in enumerate(zip(configs, workdirs)):
    storage.makedirs(w)
    out.append(_write_cell(c, w, rows[i], reported[i], *finals[i], bytes_update=preps[i][2],
                           bytes_down=preps[i][3], wall=wall, setup_time=setup_time,
                           extra={'seeds_vmapped': len(configs)}))
  return out


def _write_cell(config, workdir: str, rows, reported, pc, pn, *, bytes_update: int,
                bytes_down: int, wall: float, setup_time: float,
                extra: dict | None = None) -> dict[str, Any]:
  """Writes a finished cell's ``metrics.jsonl``, ``clients.json`` and, last, ``summary.json``."""
  num_rounds = int(config.num_rounds)
  pc, pn = np.asarray(pc, np.float64), np.asarray(pn, np.float64)
  reported = [int(n) for n in reported]
  writer = MetricsWriter(workdir, step_key='round')
  for row, n in zip(rows, reported):
    (ls, ln), (acs, acn) = row['train_loss'], row['train_accuracy']
    writer.write(row['round'], {
        'train_loss': float(ls) / max(float(ln), 1.0),
        'train_accuracy': float(acs) / max(float(acn), 1.0), 'num_reported': n,
        'bytes_up': n * bytes_update, 'bytes_down': int(config.clients_per_round) * bytes_down,
        **{k: v for k, v in row.items() if k not in ('round', 'train_loss', 'train_accuracy')}})
  writer.close()
  final = rows[-1]
  has = pn > 0
  _write_json(storage.join(workdir, 'clients.json'),
              {'correct': pc.tolist(), 'count': pn.tolist(),
               'accuracy': (pc[has] / pn[has]).tolist()})
  bytes_up = sum(reported) * bytes_update
  bytes_dn = num_rounds * int(config.clients_per_round) * bytes_down
  summary = {
      'round': num_rounds, 'algorithm': config.algorithm, 'seed': int(config.seed),
      'partition': as_dict(config.partition),
      'global_accuracy': final['global_accuracy'],
      'personalized_accuracy_mean': final['personalized_accuracy_mean'],
      'personalized_accuracy_std': final['personalized_accuracy_std'],
      'personalized_accuracy_worst10': final['personalized_accuracy_worst10'],
      'bytes_up': bytes_up, 'bytes_down': bytes_dn, 'bytes_total': bytes_up + bytes_dn,
      'wall_time_s': wall, 'setup_time_s': setup_time,
      'rounds_per_sec': num_rounds / wall if wall > 0 else None,
      **(extra or {}),
  }
  _write_json(storage.join(workdir, 'summary.json'), summary)   # last: marks the cell done
  return summary


def _run_cell_via_run_simulation(config, workdir: str) -> dict[str, Any]:
  """A cell through :func:`kdjax.federated.run.run_simulation` (no per-client file)."""
  from kdjax.federated import run as run_lib
  t0 = time.perf_counter()
  out = run_lib.run_simulation(config, workdir, progress=False)
  wall = time.perf_counter() - t0
  rows = read_jsonl(storage.join(workdir, workdir_lib.METRICS))
  bytes_up = int(sum(r['bytes_up'] for r in rows))
  bytes_dn = int(sum(r['bytes_down'] for r in rows))
  summary = {
      'round': int(out['round']), 'algorithm': config.algorithm, 'seed': int(config.seed),
      'partition': as_dict(config.partition),
      **{k: out[k] for k in ('global_accuracy', 'personalized_accuracy_mean',
                             'personalized_accuracy_std', 'personalized_accuracy_worst10')},
      'bytes_up': bytes_up, 'bytes_down': bytes_dn, 'bytes_total': bytes_up + bytes_dn,
      'wall_time_s': wall, 'setup_time_s': None, 'rounds_per_sec': out.get('rounds_per_sec'),
  }
  _write_json(storage.join(workdir, 'summary.json'), summary)
  return summary


# --------------------------------------------------------------------------- the sweep

def run_sweep(config: ml_collections.ConfigDict, workdir: str, *,
              progress: bool = True, echo: bool = True) -> list[dict[str, Any]]:
  """Runs (or resumes) every cell of ``config.grid`` and writes the report (module doc).

  Args:
    config: a sweep config (a federated config with a ``grid`` group).
    workdir: the sweep directory.
    progress: show a progress bar over cells.
    echo: print the summary table.

  Returns:
    The result rows, one per cell, in grid order (α, algorithm, seed).

  Raises:
    UserError: a bad grid (see :func:`validate_grid`).
  """
  if 'grid' not in config:
    raise UserError('a sweep config needs a grid group (grid.alpha, grid.algorithm, '
                    'grid.seeds); see configs/fed/mnist1d_sweep.py.')
  alphas, algorithms, seeds = validate_grid(config.grid)
  base = copy.deepcopy(config)
  with base.unlocked():
    del base['grid']
  validate(base)                 # the base config, then every cell's, before anything is written
  cells = [(a, g, s) for a in alphas for g in algorithms for s in seeds]
  configs = {cell: cell_config(config, *cell) for cell in cells}
  for cfg in configs.values():
    validate(cfg)
  workdir_lib.check_creatable(workdir)
  workdir = storage.abspath(workdir)
  storage.makedirs(storage.join(workdir, 'cells'))
  bar = None
  if progress:
    from tqdm.auto import tqdm
    bar = tqdm(total=len(cells), desc='fed sweep', unit='cell')
  vmap_seeds = bool(config.grid.get('vmap_seeds', True))
  summaries: dict[tuple, dict] = {}
  for alpha in alphas:
    for algorithm in algorithms:
      todo = []
      for seed in seeds:
        cdir = storage.join(workdir, 'cells', cell_name(alpha, algorithm, seed))
        done = storage.join(cdir, 'summary.json')
        cfg = configs[alpha, algorithm, seed]
        if storage.exists(done):
          # A finished cell is reused only if it ran this cell's config (how many
          # rounds went in one call, and whether it showed progress, do not change it).
          workdir_lib.prepare(cdir, cfg, has_results=True, ignore=('rounds_per_call', 'progress'))
          summaries[alpha, algorithm, seed] = workdir_lib.read_json(done, what='cell summary')
          if bar is not None:
            bar.update(1)
        else:
          workdir_lib.prepare(cdir, cfg, has_results=False)
          todo.append((seed, cfg, cdir))
      if bar is not None and todo:
        bar.set_postfix_str(f'{alpha_name(alpha)}_{algorithm}')
      if vmap_seeds and len(todo) > 1 and seeds_vmappable(todo[0][1]):
        outs = run_seed_group([c for _, c, _ in todo], [d for _, _, d in todo])
        summaries.update({(alpha, algorithm, s): o for (s, _, _), o in zip(todo, outs)})
        if bar is not None:
          bar.update(len(todo))
        continue
      for seed, c, cdir in todo:
        summaries[alpha, algorithm, seed] = run_cell(c, cdir)
        if bar is not None:
          bar.update(1)
  if bar is not None:
    bar.close()
  rows = [result_row(a, g, s, summaries[a, g, s]) for a, g, s in cells]
  write_report(rows, workdir, cells_dir=storage.join(workdir, 'cells'), echo=echo)
  return rows


def result_row(alpha: float, algorithm: str, seed: int, summary: dict) -> dict[str, Any]:
  row = {'alpha': alpha, 'algorithm': algorithm, 'seed': seed, 'rounds': summary['round']}
  for key in ROW_KEYS[4:]:
    row[key] = summary.get(key)
  return row


def summarize(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
  """Mean and std (over seeds, population std) of :data:`METRICS` per α × algorithm.

  Where the rows hold :data:`BASELINE` (``local_only``) cells, every other
  algorithm's row also gets ``personalized_vs_local_mean`` / ``_min``: its
  personalized mean accuracy minus local_only's on the same α and seed (the same
  partition), averaged over seeds and at its worst seed (NaN where a seed lacks
  the baseline).

  >>> r = [{'alpha': 1.0, 'algorithm': 'fedavg', 'seed': s, 'global_accuracy': a,
  ...       'personalized_accuracy_mean': a, 'personalized_accuracy_worst10': a,
  ...       'bytes_total': 10, 'wall_time_s': 1.0} for s, a in ((0, 0.5), (1, 0.7))]
  >>> s = summarize(r)[0]
  >>> round(s['global_accuracy_mean'], 3), round(s['global_accuracy_std'], 3), s['num_seeds']
  (0.6, 0.1, 2)
  """
  groups: dict[tuple[float, str], list[dict]] = {}
  for r in rows:
    groups.setdefault((r['alpha'], r['algorithm']), []).append(r)
  local = {(r['alpha'], r['seed']): r['personalized_accuracy_mean'] for r in rows
           if r['algorithm'] == BASELINE and r['personalized_accuracy_mean'] is not None}
  out = []
  for (alpha, algorithm), rs in groups.items():
    s = {'alpha': alpha, 'algorithm': algorithm, 'num_seeds': len(rs)}
    for m in METRICS:
      v = np.array([np.nan if r[m] is None else float(r[m]) for r in rs], np.float64)
      s[f'{m}_mean'] = float(v.mean())
      s[f'{m}_std'] = float(v.std())
    if local and algorithm != BASELINE:
      d = np.array([float(r['personalized_accuracy_mean']) - local.get((alpha, r['seed']), np.nan)
                    if r['personalized_accuracy_mean'] is not None else np.nan for r in rs])
      s['personalized_vs_local_mean'] = float(d.mean())
      s['personalized_vs_local_min'] = float(d.min())
    out.append(s)
  return out


def format_table(summary: list[dict[str, Any]]) -> str:
  """A Markdown table of :func:`summarize`'s rows (accuracies in %, mean ± std).

  With a :data:`BASELINE` in the sweep, a last column gives each algorithm's
  personalized accuracy minus local_only's in percentage points (mean over seeds
  and the worst seed).
  """
  vs_local = any('personalized_vs_local_mean' in s for s in summary)
  head = ('| α | algorithm | seeds | global acc. % | personalized mean % | '
          'personalized worst-10% % | MB sent | wall s |')
  cols = 8
  if vs_local:
    head += f' personalized − {BASELINE} pp (mean, worst seed) |'
    cols += 1
  lines = [head, '|' + '---|' * cols]
  for s in summary:
    pct = lambda m: f"{100 * s[m + '_mean']:.1f} ± {100 * s[m + '_std']:.1f}"
    alpha = '∞ (IID)' if math.isinf(s['alpha']) else f"{s['alpha']:g}"
    line = (
        f"| {alpha} | {s['algorithm']} | "
        f"{s['num_seeds']} | {pct('global_accuracy')} | {pct('personalized_accuracy_mean')} | "
        f"{pct('personalized_accuracy_worst10')} | {s['bytes_total_mean'] / 1e6:.1f} | "
        f"{s['wall_time_s_mean']:.1f} ± {s['wall_time_s_std']:.1f} |")
    if vs_local:
      d = s.get('personalized_vs_local_mean')
      line += (' — |' if d is None else
               f" {100 * d:+.1f} ({100 * s['personalized_vs_local_min']:+.1f}) |")
    lines.append(line)
  return '\n'.join(lines)


def write_report(rows: list[dict[str, Any]], workdir: str, *, cells_dir: str | None = None,
                 echo: bool = True) -> list[dict[str, Any]]:
  """Writes results.csv/json, summary.csv/md and the plots; returns the summary rows."""
  storage.write_text(storage.join(workdir, 'results.csv'), _csv(rows, list(ROW_KEYS)))
  _write_json(storage.join(workdir, 'results.json'), rows)
  summary = summarize(rows)
  storage.write_text(storage.join(workdir, 'summary.csv'),
                     _csv(summary, list(dict.fromkeys(k for s in summary for k in s))))
  table = format_table(summary)
  storage.write_text(storage.join(workdir, 'summary.md'), table + '\n')
  if echo:
    print(table)
  plot_accuracy_vs_alpha(summary, storage.join(workdir, 'accuracy_vs_alpha.png'))
  if cells_dir is not None:
    plot_client_accuracy(rows, cells_dir, storage.join(workdir, 'client_accuracy.png'))
  return summary


def _csv(rows: list[dict[str, Any]], fieldnames: list[str]) -> str:
  """``rows`` as CSV text (what ``csv.DictWriter`` writes to a file)."""
  buf = io.StringIO(newline='')
  w = csv.DictWriter(buf, fieldnames=fieldnames)
  w.writeheader()
  w.writerows(rows)
  return buf.getvalue()


# --------------------------------------------------------------------------- plots

def _alpha_positions(alphas: list[float]) -> dict[float, float]:
  """x positions: finite α as is; IID one decade right of the largest finite α."""
  finite = [a for a in alphas if not math.isinf(a)]
  top = max(finite) if finite else 1.0
  return {a: (top * 10.0 if math.isinf(a) else a) for a in alphas}


def plot_accuracy_vs_alpha(summary: list[dict[str, Any]], path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  alphas = sorted({s['alpha'] for s in summary})
  pos = _alpha_positions(alphas)
  algorithms = list(dict.fromkeys(s['algorithm'] for s in summary))
  fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
  for ax, metric, title in ((axes[0], 'global_accuracy', 'global model'),
                            (axes[1], 'personalized_accuracy_mean', 'personalized (mean)')):
    for g in algorithms:
      ss = sorted((s for s in summary if s['algorithm'] == g), key=lambda s: s['alpha'])
      x = [pos[s['alpha']] for s in ss]
      y = [s[metric + '_mean'] for s in ss]
      e = [s[metric + '_std'] for s in ss]
      ax.errorbar(x, y, yerr=e, marker='o', capsize=3, label=g)
    ax.set_xscale('log')
    ax.set_xticks([pos[a] for a in alphas])
    ax.set_xticklabels(['IID' if math.isinf(a) else f'{a:g}' for a in alphas])
    ax.minorticks_off()
    ax.set_xlabel('Dirichlet α (label skew; IID at the right)')
    ax.set_title(title)
    ax.grid(alpha=0.3)
  axes[0].set_ylabel('test accuracy')
  axes[1].legend(fontsize=8)
  fig.tight_layout()
  storage.savefig(fig, path, dpi=100)
  plt.close(fig)


def plot_client_accuracy(rows: list[dict[str, Any]], cells_dir: str, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt

  alphas = sorted({r['alpha'] for r in rows})
  algorithms = list(dict.fromkeys(r['algorithm'] for r in rows))
  fig, axes = plt.subplots(1, len(alphas), figsize=(3.2 * len(alphas), 3.8), sharey=True,
                           squeeze=False)
  for ax, alpha in zip(axes[0], alphas):
    data = []
    for g in algorithms:
      acc = []
      for r in rows:
        if r['alpha'] == alpha and r['algorithm'] == g:
          f = storage.join(cells_dir, cell_name(alpha, g, r['seed']), 'clients.json')
          if storage.exists(f):
            acc.extend(json.loads(storage.read_text(f))['accuracy'])
      data.append(acc or [float('nan')])
    ax.boxplot(data, showfliers=False)
    ax.set_xticks(range(1, len(algorithms) + 1))
    ax.set_xticklabels(algorithms, rotation=60, fontsize=8)
    ax.set_title('IID' if math.isinf(alpha) else f'α = {alpha:g}')
    ax.grid(axis='y', alpha=0.3)
  axes[0][0].set_ylabel('client accuracy (local test split)')
  fig.tight_layout()
  storage.savefig(fig, path, dpi=100)
  plt.close(fig)
