"""benchmarks/schemes_table.py: the quick table (JSON + markdown), the resume that retrains
nothing, the aggregates against numpy, and the teacher wiring of each kind of scheme."""

import json
import os
import sys

import numpy as np
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
sys.path.insert(0, os.path.join(ROOT, 'benchmarks'))

import schemes_table  # noqa: E402  (benchmarks/schemes_table.py)


@pytest.fixture(scope='module')
def quick(tmp_path_factory):
  """One quick run (digits, tiny, seed 0, the references and Tf-KD_reg) and its outputs."""
  tmp = tmp_path_factory.mktemp('schemes_table')
  out = {'workdir': str(tmp / 'w'), 'json': str(tmp / 't.json'), 'md': str(tmp / 't.md')}
  argv = ['--quick', '--only', 'tf_kd_reg', '--workdir', out['workdir'], '--json', out['json'],
          '--markdown', out['md']]
  assert schemes_table.main(argv) == 0
  out['argv'] = argv
  return out


def test_quick_writes_every_cell_and_the_table(quick):
  result = json.load(open(quick['json']))
  cells = {(c['dataset'], c['scheme'], c['seed']): c for c in result['cells']}
  names = ('teacher', 'student_baseline', 'kd', 'tf_kd_reg')
  assert set(cells) == {('digits', n, 0) for n in names}
  for c in cells.values():
    assert c['status'] == 'done' and c['ran'], c
    assert 0.0 <= c['last'] <= c['best'] <= 1.0
    assert c['evals'] == 2 and c['wall_s'] > 0   # tiny: evaluated at steps 20 and 40
    assert {'load_avg_start', 'load_avg_end'} <= set(c)
    assert os.path.isfile(os.path.join(c['workdir'], 'summary.json'))
  assert '--config.teacher.workdir=' + cells['digits', 'teacher', 0]['workdir'] in \
      cells['digits', 'kd', 0]['overrides']
  assert not any(a.startswith('--config.teacher')
                 for a in cells['digits', 'tf_kd_reg', 0]['overrides'])
  table = open(quick['md']).read()
  assert table.splitlines()[0].startswith('| scheme | digits last | digits best | digits wall s '
                                          '| digits beats KD? |')
  assert {line.split('|')[1].strip() for line in table.splitlines()[2:]} == {
      'teacher', 'student_baseline', 'kd', 'tf_kd_reg'}


def test_rerun_trains_nothing(quick):
  first = json.load(open(quick['json']))
  mtimes = {c['workdir']: os.path.getmtime(os.path.join(c['workdir'], 'summary.json'))
            for c in first['cells']}
  assert schemes_table.main(quick['argv']) == 0
  second = json.load(open(quick['json']))
  assert [c['ran'] for c in second['cells']] == [False] * len(mtimes)
  for c in second['cells']:
    assert os.path.getmtime(os.path.join(c['workdir'], 'summary.json')) == mtimes[c['workdir']]
  strip = lambda cs: [{k: v for k, v in c.items() if k != 'ran'} for c in cs]  # noqa: E731
  assert strip(second['cells']) == strip(first['cells'])   # kept wall time, load, accuracy


def test_aggregates_match_numpy(quick):
  result = json.load(open(quick['json']))
  for row in result['aggregates']:
    cells = [c for c in result['cells']
             if (c['dataset'], c['scheme']) == (row['dataset'], row['scheme'])]
    np.testing.assert_allclose(row['last_mean'], np.mean([c['last'] for c in cells]))
    np.testing.assert_allclose(row['best_mean'], np.mean([c['best'] for c in cells]))
    np.testing.assert_allclose(row['wall_s_mean'], np.mean([c['wall_s'] for c in cells]))


def test_aggregate_of_three_seeds():
  rng = np.random.default_rng(0)
  cells = [{'dataset': 'd', 'scheme': s, 'seed': k, 'status': 'done', 'last': float(a),
            'best': float(a) + 0.01, 'wall_s': float(w)}
           for s in ('kd', 'x', 'y') for k, (a, w) in enumerate(zip(
               rng.uniform(0.5, 0.9, 3), rng.uniform(1, 9, 3)))]
  cells.append({'dataset': 'd', 'scheme': 'x', 'seed': 3, 'status': 'failed'})
  rows = {r['scheme']: r for r in schemes_table.aggregate(cells)}
  for s, row in rows.items():
    last = np.array([c['last'] for c in cells if c['scheme'] == s and c['status'] == 'done'])
    assert row['seeds'] == [0, 1, 2]
    np.testing.assert_allclose([row['last_mean'], row['last_std']], [last.mean(), last.std(ddof=1)])
    np.testing.assert_allclose(row['best_mean'], last.mean() + 0.01)
  kd = rows['kd']
  assert rows['kd']['beats_kd'] is None
  for s in ('x', 'y'):
    assert rows[s]['beats_kd'] == (rows[s]['last_mean'] > kd['last_mean'] + kd['last_std'])


@pytest.mark.parametrize('name, expected', [
    ('kd', ['--config.teacher.workdir=W/digits/teacher/seed1']),
    ('takd', ['--config.scheme.teacher_workdir=W/digits/teacher/seed1']),
    ('born_again', ['--config.scheme.teacher_workdir=W/digits/student_baseline/seed1',
                    '--config.scheme.teacher_stage=gen0']),
    ('multi_teacher', ["--config.scheme.teachers=[{'workdir': 'W/digits/teacher/seed1', "
                       "'label_map': None}, {'workdir': 'W/digits/teacher_mlp_half/seed1', "
                       "'label_map': None}]"]),
    ('mean_teacher', []),
])
def test_wiring_gives_each_scheme_the_shared_runs(name, expected):
  from kdjax.config import load_config_file
  config = load_config_file(schemes_table.config_path('digits', name) + ':tiny')
  assert schemes_table.wiring(config, 'digits', 'W', 1) == ['--config.seed=1', *expected]


def test_unknown_name_is_refused_before_anything_is_written(tmp_path):
  with pytest.raises(SystemExit) as e:
    schemes_table.main(['--only', 'no_such_scheme', '--workdir', str(tmp_path / 'w')])
  assert e.value.code == 2 and not (tmp_path / 'w').exists()


def test_full_table_refuses_the_quick_tables_cells(quick, tmp_path):
  """The full configs over a workdir of tiny runs: every cell refused, nothing trained."""
  out = tmp_path / 'full.json'
  argv = ['--datasets', 'digits', '--seeds', '0', '--only', 'tf_kd_reg', '--workdir',
          quick['workdir'], '--json', str(out)]
  assert schemes_table.main(argv) == 1
  cells = json.load(open(out))['cells']
  assert len(cells) == 4 and all(c['status'] == 'failed' and not c['ran'] for c in cells)
  assert all('holds a run of configs/digits/' in c['error'] for c in cells)
