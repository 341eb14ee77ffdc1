"""`kdjax fed sweep`: a tiny grid end to end, resume, the table against the cells, errors."""

import csv
import json
import math
import os

import numpy as np
import pytest

from kdjax import cli
from kdjax.errors import UserError
from kdjax.federated import sweep

CONFIG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'fed',
                      'mnist1d_sweep.py')
TINY = CONFIG + ':tiny'
CELLS = [(a, g, s) for a in ('a0.5', 'iid') for g in ('fedavg', 'fedprox') for s in (0, 1)]


def _summary(workdir, name):
  with open(os.path.join(workdir, 'cells', name, 'summary.json')) as f:
    return json.load(f)


@pytest.fixture(scope='module')
def swept(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp('sweep'))
  code = cli.main(['fed', 'sweep', '--config', TINY, '--workdir', workdir, '--no-progress'])
  assert code == 0
  return workdir


def test_tiny_sweep_writes_every_cell_and_the_report(swept):
  names = sorted(os.listdir(os.path.join(swept, 'cells')))
  assert names == sorted(f'{a}_{g}_s{s}' for a, g, s in CELLS)
  for name in names:
    for f in ('summary.json', 'metrics.jsonl', 'clients.json'):
      assert os.path.exists(os.path.join(swept, 'cells', name, f)), (name, f)
  for f in ('results.csv', 'results.json', 'summary.csv', 'summary.md',
            'accuracy_vs_alpha.png', 'client_accuracy.png'):
    assert os.path.getsize(os.path.join(swept, f)) > 0, f
  with open(os.path.join(swept, 'results.json')) as f:
    rows = json.load(f)
  assert len(rows) == 8
  assert [(r['algorithm'], r['seed']) for r in rows[:4]] == [
      ('fedavg', 0), ('fedavg', 1), ('fedprox', 0), ('fedprox', 1)]
  # Strict JSON: the IID cells' infinite alpha is null, and the row says so.
  assert rows[0]['alpha'] == 0.5 and rows[-1]['alpha'] is None
  assert rows[-1]['nonfinite'] == ['alpha'] and 'nonfinite' not in rows[0]
  with open(os.path.join(swept, 'results.csv')) as f:
    csv_rows = list(csv.DictReader(f))
  assert len(csv_rows) == 8
  for r, c in zip(rows, csv_rows):
    alpha = math.inf if r['alpha'] is None else r['alpha']
    assert float(c['alpha']) == alpha
    name = sweep.cell_name(alpha, r['algorithm'], r['seed'])
    s = _summary(swept, name)
    for key in ('global_accuracy', 'personalized_accuracy_mean',
                'personalized_accuracy_worst10', 'bytes_total', 'wall_time_s'):
      assert r[key] == s[key], (name, key)
      assert float(c[key]) == pytest.approx(s[key], rel=1e-12)
    assert 0.0 <= r['global_accuracy'] <= 1.0
    assert r['bytes_total'] == r['bytes_up'] + r['bytes_down'] > 0
    assert r['rounds'] == 3
    # The per-client accuracies behind the box plot match the cell's personalized mean.
    with open(os.path.join(swept, 'cells', name, 'clients.json')) as f:
      cl = json.load(f)
    assert np.mean(cl['accuracy']) == pytest.approx(s['personalized_accuracy_mean'], abs=1e-9)
    # The partition the cell ran: Dirichlet at finite alpha, IID at inf.
    assert s['partition']['method'] == ('iid' if math.isinf(alpha) else 'dirichlet')


def test_summary_table_equals_the_cells_summary_json(swept):
  with open(os.path.join(swept, 'summary.csv')) as f:
    table = list(csv.DictReader(f))
  assert len(table) == 4
  for row in table:
    alpha = float(row['alpha'])
    accs = [_summary(swept, sweep.cell_name(alpha, row['algorithm'], s))['global_accuracy']
            for s in (0, 1)]
    worst = [_summary(swept, sweep.cell_name(alpha, row['algorithm'], s))
             ['personalized_accuracy_worst10'] for s in (0, 1)]
    assert float(row['global_accuracy_mean']) == pytest.approx((accs[0] + accs[1]) / 2)
    assert float(row['global_accuracy_std']) == pytest.approx(abs(accs[0] - accs[1]) / 2)
    assert float(row['personalized_accuracy_worst10_mean']) == pytest.approx(
        (worst[0] + worst[1]) / 2)
    assert int(row['num_seeds']) == 2
  md = open(os.path.join(swept, 'summary.md')).read()
  first = table[0]
  assert (f"{100 * float(first['global_accuracy_mean']):.1f} ± "
          f"{100 * float(first['global_accuracy_std']):.1f}") in md


def test_rerun_skips_finished_cells_and_redoes_a_missing_one(swept, capsys):
  redo = 'a0.5_fedprox_s1'
  before = _summary(swept, redo)
  kept = {n: os.path.getmtime(os.path.join(swept, 'cells', n, 'summary.json'))
          for n in os.listdir(os.path.join(swept, 'cells')) if n != redo}
  os.remove(os.path.join(swept, 'cells', redo, 'summary.json'))   # as if killed mid-cell
  assert cli.main(['fed', 'sweep', '--config', TINY, '--workdir', swept, '--no-progress']) == 0
  out = capsys.readouterr().out
  assert json.loads(out.strip().splitlines()[-1])['cells'] == 8
  for n, t in kept.items():
    assert os.path.getmtime(os.path.join(swept, 'cells', n, 'summary.json')) == t, n
  after = _summary(swept, redo)
  assert after['global_accuracy'] == pytest.approx(before['global_accuracy'], abs=1e-6)
  assert after['personalized_accuracy_mean'] == pytest.approx(
      before['personalized_accuracy_mean'], abs=1e-6)


def test_finished_cells_of_another_config_are_refused_not_reported(swept, tmp_path, capsys):
  import shutil
  workdir = str(tmp_path / 'copy')
  shutil.copytree(swept, workdir)
  before = {n: os.path.getmtime(os.path.join(workdir, 'cells', n, 'summary.json'))
            for n in os.listdir(os.path.join(workdir, 'cells'))}
  base = ['fed', 'sweep', '--config', TINY, '--workdir', workdir, '--no-progress']
  assert cli.main(base + ['--config.optimizer.learning_rate=0.3']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert 'holds results of another config' in err and 'optimizer.learning_rate: 0.1 here, 0.3 now' in err
  # A smaller grid of the same config reuses its finished cells untouched.
  assert cli.main(base + ["--config.grid.algorithm=['fedprox']", '--config.grid.alpha=[0.5]']) == 0
  assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])['cells'] == 2
  after = {n: os.path.getmtime(os.path.join(workdir, 'cells', n, 'summary.json'))
           for n in before}
  assert after == before


@pytest.mark.parametrize('override, message', [
    ('--config.grid.alpha=[0.5, 0.0]', 'alpha'),
    ('--config.grid.alpha=[-1]', 'alpha'),
    ("--config.grid.alpha=['lots']", 'alpha'),
    ("--config.grid.algorithm=['fedavg', 'nope']", 'unknown algorithm'),
    ('--config.grid.seeds=[0.5]', 'seeds'),
    ('--config.grid.seeds=[]', 'seeds'),
    ('--config.grid.seeds=[1, 1]', 'repeats'),
])
def test_bad_grid_values_exit_2_with_one_line(tmp_path, capsys, override, message):
  code = cli.main(['fed', 'sweep', '--config', TINY, '--workdir', str(tmp_path / 'w'),
                   '--no-progress', override])
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith('kdjax: error:') and message in err
  assert not os.path.exists(tmp_path / 'w' / 'cells')


def test_validate_grid_and_cell_config():
  assert sweep.validate_grid({'alpha': [1e999, 2], 'algorithm': ['scaffold'], 'seeds': [3]}) == (
      [math.inf, 2.0], ['scaffold'], [3])
  with pytest.raises(UserError):
    sweep.validate_grid({'alpha': [0.1], 'algorithm': ['fedavg']})
  from kdjax.config import load_config
  config = load_config(TINY)
  c = sweep.cell_config(config, math.inf, 'fedprox', 1)
  assert 'grid' not in c and c.partition.method == 'iid' and c.seed == 1
  assert c.algorithm == 'fedprox' and c.algorithm_options.mu == 0.01
  c = sweep.cell_config(config, 0.1, 'fedavg', 0)
  assert c.partition.method == 'dirichlet' and c.partition.alpha == 0.1
  assert dict(c.algorithm_options) == {}
  assert 'grid' in config   # the sweep config itself is left as it was


def test_a_config_without_grid_is_refused(tmp_path, capsys):
  fed_run_config = os.path.join(os.path.dirname(CONFIG), 'mnist1d_fedavg.py')
  code = cli.main(['fed', 'sweep', '--config', fed_run_config + ':tiny', '--workdir',
                   str(tmp_path / 'w'), '--no-progress'])
  assert code == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'grid' in err


@pytest.mark.parametrize('algorithms, sequential_k',
                         [(('scaffold', 'fedd2s', 'feddf', 'fedavg_ft'), 2)])
def test_seeds_vmapped_equal_seeds_run_one_by_one(tmp_path, algorithms, sequential_k):
  """One vmapped simulation over 2 seeds (different padded shapes) = 2 sequential runs:
  client state (SCAFFOLD), a personalized message (FedD2S), and a proxy set drawn per
  seed, a vmapped argument (FedDF), fine-tuning on the padded training split (fedavg_ft).
  The vmapped run does its 3 rounds in one call, the
  sequential one in calls of ``sequential_k`` rounds (2 then 1)."""
  from kdjax.config import load_config
  from kdjax.federated import run as run_lib
  grid = ["--config.grid.alpha=[0.3]", f'--config.grid.algorithm={list(algorithms)}',
          '--config.grid.seeds=[0, 1]', '--config.num_rounds=3', '--config.eval_every=3']
  base = load_config(TINY, [tuple(o[len('--config.'):].split('=', 1)) for o in grid])
  lengths = {run_lib.setup(sweep.cell_config(base, 0.3, 'fedavg', s))['train'].mask.shape[1]
             for s in (0, 1)}
  assert len(lengths) > 1, lengths      # the seeds' packed shapes differ: padding is exercised
  dirs = {}
  for vmap in (True, False):
    dirs[vmap] = str(tmp_path / f'v{vmap}')
    assert cli.main(['fed', 'sweep', '--config', TINY, '--workdir', dirs[vmap], '--no-progress',
                     *grid, f'--config.grid.vmap_seeds={vmap}',
                     f'--config.rounds_per_call={3 if vmap else sequential_k}']) == 0
  for g in algorithms:
    for s in (0, 1):
      name = f'a0.3_{g}_s{s}'
      a, b = _summary(dirs[True], name), _summary(dirs[False], name)
      assert a.get('seeds_vmapped') == 2 and 'seeds_vmapped' not in b
      for key in ('global_accuracy', 'personalized_accuracy_mean', 'personalized_accuracy_worst10',
                  'bytes_total'):
        assert a[key] == pytest.approx(b[key], abs=1e-6), (name, key)
      rows = [[json.loads(l) for l in open(os.path.join(d, 'cells', name, 'metrics.jsonl'))]
              for d in (dirs[True], dirs[False])]
      np.testing.assert_allclose([r['train_loss'] for r in rows[0]],
                                 [r['train_loss'] for r in rows[1]], rtol=1e-5)
      ca, cb = (json.load(open(os.path.join(d, 'cells', name, 'clients.json')))
                for d in (dirs[True], dirs[False]))
      assert ca['count'] == cb['count']
      np.testing.assert_allclose(ca['correct'], cb['correct'])
