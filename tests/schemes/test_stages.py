"""Multi-stage distillation (``kdjax.schemes.stages``): stage lists that do not chain are
refused through the CLI before anything is written; a tiny TAKD chain distills each stage
from the one before it; the born-again ensemble equals a numpy recomputation from the
generations' saved logits; and both resume after ``kill -9`` mid-stage to the result of
an uninterrupted run."""

import json
import os

import jax
import numpy as np
import pytest

from kdjax.errors import UserError
from kdjax.schemes import check_stages
from kdjax.schemes import expand_stages
from kdjax.schemes import plan_stages
from kdjax.schemes.stages import DEFAULTS

# Every stage of the runs below: 30 steps, checkpoints at 15 and 30.
STEPS = 30
TINY = {'num_steps': STEPS, 'checkpoint_every': 15, 'eval_every': STEPS, 'log_every': 10,
        'steps_per_call': 5, 'batch_size': 64}


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _args(paths, data_dir, config):
  return ['distill', '--config', f'{paths["configs"]}/mnist1d/{config}.py:tiny',
          f'--config.data.name={paths["small"]}', f'--config.data.data_dir={data_dir}',
          '--config.progress=false', f'--config.scheme.overrides={TINY!r}']


def _stage(name, teacher=None, config='mnist1d/kd.py:tiny'):
  return {'name': name, 'config': config, 'teacher': teacher}


# --------------------------------------------------------------------------- the list

@pytest.mark.parametrize('stages,message', [
    ([], 'config.scheme.stages is empty'),
    ([_stage('a', config='mnist1d/teacher.py:tiny'), _stage('b', 'c'), _stage('c', 'a')],
     "stage 'b' learns from 'c', which comes after it"),
    ([_stage('a', config='mnist1d/teacher.py:tiny'), _stage('b', 'nope')],
     "stage 'b' learns from 'nope', which names no stage"),
    ([_stage('a', config='mnist1d/teacher.py:tiny'), _stage('a', 'a')],
     "stage name 'a' is used twice"),
    ([_stage('a', 'a')], "stage 'a' names itself as its teacher"),
    ([_stage('b', 'external')], "stage 'b' learns from 'external'; set"),
    ([_stage('../x', config='mnist1d/teacher.py:tiny')], 'must be a folder name'),
    ([{'name': 'a', 'config': 'mnist1d/teacher.py', 'teachr': None}], "unknown key 'teachr'"),
])
def test_check_stages_refuses_lists_that_do_not_chain(stages, message):
  with pytest.raises(UserError, match=message):
    check_stages(stages)


def test_born_again_expands_into_a_chain_of_generations():
  stages = expand_stages({**DEFAULTS, 'method': 'born_again', 'num_generations': 3,
                          'generation': 'mnist1d/student_baseline.py'})
  check_stages(stages)
  assert [(s['name'], s['teacher']) for s in stages] == [
      ('gen0', None), ('gen1', 'gen0'), ('gen2', 'gen1')]
  assert [s['overrides']['seed_offset'] for s in stages] == [0, 1, 2]
  assert 'loss' not in stages[0]['overrides']
  assert stages[2]['overrides']['loss'] == {'terms': {'kd': {'weight': 1.0,
                                                              'temperature': 1.0}}}


@pytest.mark.parametrize('override,message', [
    ('--config.scheme.stages=[]', 'config.scheme.stages is empty'),
    ("--config.scheme.stages=[{'name': 'a', 'config': 'mnist1d/teacher.py:tiny'}, "
     "{'name': 'b', 'config': 'mnist1d/kd.py:tiny', 'teacher': 'c'}, "
     "{'name': 'c', 'config': 'mnist1d/kd.py:tiny', 'teacher': 'a'}]",
     "stage 'b' learns from 'c', which comes after it"),
    ("--config.scheme.stages=[{'name': 'a', 'config': 'mnist1d/teacher.py:tiny'}, "
     "{'name': 'a', 'config': 'mnist1d/kd.py:tiny', 'teacher': 'a'}]",
     "stage name 'a' is used twice"),
    ("--config.scheme.stages=[{'name': 'a', 'config': 'mnist1d/kd.py:tiny'}]",
     "stage 'a' has no teacher but its loss reads one"),
    ("--config.scheme.stages=[{'name': 'a', 'config': 'mnist1d/teacher.py:tiny'}, "
     "{'name': 'b', 'config': 'mnist1d/teacher.py:tiny', 'teacher': 'a'}]",
     "stage 'b' learns from 'a' but its loss reads no teacher"),
    ("--config.scheme.stages=[{'name': 'a', 'config': 'mnist1d/nope.py'}]",
     "stage 'a': config file mnist1d/nope.py not found"),
    ("--config.scheme.overrides={'optimizer': {'learning_rate': -1.0}}",
     "stage 'teacher': config.optimizer.learning_rate must be positive"),
    ("--config.scheme.overrides={'optimiser': {'learning_rate': 1.0}}",
     "unknown config key 'optimiser'"),
    ('--config.scheme.teacher_workdir=/nonexistent/run', 'has no checkpoint'),
    ('--config.scheme.method=ladder', 'config.scheme.method must be one of chain, born_again'),
])
def test_cli_refuses_a_bad_stage_list_and_writes_nothing(paths, tmp_path, kdjax_main, override,
                                                          message):
  wd = tmp_path / 'run'
  out = kdjax_main(['distill', '--config', f'{paths["configs"]}/mnist1d/takd.py:tiny',
                    '--workdir', str(wd), override], check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('kdjax: error: ') and message in lines[0], lines
  assert not wd.exists()


def test_an_external_teacher_stands_in_for_the_teacher_stage(takd, tmp_path, paths):
  from kdjax.config import load_config_file
  teacher_dir = os.path.join(takd, 'teacher')   # a finished run
  config = load_config_file(f'{paths["configs"]}/mnist1d/takd.py:tiny')
  config.scheme.teacher_workdir = teacher_dir
  plan = plan_stages(config, str(tmp_path / 'w'))
  assert [(s.name, s.external, s.workdir) for s in plan] == [
      ('teacher', True, teacher_dir), ('assistant', False, str(tmp_path / 'w' / 'assistant')),
      ('student', False, str(tmp_path / 'w' / 'student'))]
  assert plan[1].config.teacher.workdir == teacher_dir
  assert plan[2].config.teacher.workdir == str(tmp_path / 'w' / 'assistant')
  assert not (tmp_path / 'w').exists()


# --------------------------------------------------------------------------- runs

def _run(paths, data_dir, config, wd):
  from kdjax.cli import main
  assert main([*_args(paths, data_dir, config), '--workdir', wd]) == 0
  return wd


@pytest.fixture(scope='module')
def takd(paths, data_dir, tmp_path_factory):
  return _run(paths, data_dir, 'takd', str(tmp_path_factory.mktemp('takd') / 'ref'))


@pytest.fixture(scope='module')
def ban(paths, data_dir, tmp_path_factory):
  return _run(paths, data_dir, 'born_again', str(tmp_path_factory.mktemp('ban') / 'ref'))


def _summary(wd):
  return json.load(open(os.path.join(wd, 'summary.json')))


def _config(wd):
  return json.load(open(os.path.join(wd, 'config.json')))


def test_takd_chain_distills_each_stage_from_the_one_before(takd, kdjax_main, paths, data_dir):
  from kdjax.teacher import read_fingerprint
  configs = {s: _config(os.path.join(takd, s)) for s in ('teacher', 'assistant', 'student')}
  assert configs['teacher']['teacher']['workdir'] == ''
  assert configs['assistant']['teacher']['workdir'] == os.path.join(takd, 'teacher')
  assert configs['student']['teacher']['workdir'] == os.path.join(takd, 'assistant')
  assert [configs[s]['model']['name'] for s in configs] == ['cnn1d', 'cnn1d', 'mlp']
  assert configs['assistant']['model']['kwargs']['channels'] == [16, 16]
  assert 'kd' in configs['student']['loss']['terms'] and configs['student']['num_steps'] == STEPS
  summary = _summary(takd)
  assert summary['method'] == 'chain' and summary['final_stage'] == 'student'
  assert [(r['name'], r['teacher'], r['skipped']) for r in summary['stages']] == [
      ('teacher', None, False), ('assistant', 'teacher', False), ('student', 'assistant', False)]
  student = _summary(os.path.join(takd, 'student'))
  assert summary['stages'][-1]['summary'] == student
  assert summary['eval_accuracy'] == student['eval_accuracy'] and summary['step'] == STEPS
  assert student['teacher_fingerprint'] == read_fingerprint(os.path.join(takd, 'assistant'))
  assert os.path.exists(os.path.join(takd, 'learning_curves.png'))
  # Run again: every stage is finished, so skipped, and the figures are the same.
  out = kdjax_main([*_args(paths, data_dir, 'takd'), '--workdir', takd])
  assert out.stdout.count('finished, skipped') == 3
  again = _summary(takd)
  assert [r['skipped'] for r in again['stages']] == [True, True, True]
  assert again['eval_accuracy'] == summary['eval_accuracy']


def _log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def test_born_again_ensemble_equals_numpy_on_the_saved_logits(ban, data_dir, paths):
  from kdjax.data import load_arrays
  summary = _summary(ban)
  saved = np.load(os.path.join(ban, 'predictions.npz'))
  logits, labels = saved['logits'], saved['label']
  assert list(saved['names']) == ['gen0', 'gen1', 'gen2'] == summary['generations']
  test = load_arrays(paths['small'], 'test', data_dir=data_dir)
  np.testing.assert_array_equal(labels, test['label'])
  assert logits.shape == (3, len(labels), 10)
  # Furlanello et al. (2018), Sec. 3.2: the average of the generations' predictions.
  for first, key in ((1, 'ban_ensemble'), (0, 'ensemble_all')):
    probs = np.exp(_log_softmax(logits[first:].astype(np.float64))).mean(0)
    assert summary[f'{key}_accuracy'] == np.mean(probs.argmax(-1) == labels)
    np.testing.assert_allclose(summary[f'{key}_loss'],
                               -np.mean(np.log(probs[np.arange(len(labels)), labels])),
                               rtol=1e-6)
  # Each generation's saved logits are that generation's network: its own accuracy.
  for g, row in enumerate(summary['stages']):
    assert row['summary']['eval_accuracy'] == pytest.approx(
        np.mean(logits[g].argmax(-1) == labels), abs=1e-6)
    assert summary['generation_accuracies'][g] == pytest.approx(row['summary']['eval_accuracy'],
                                                                abs=1e-6)
  configs = [_config(os.path.join(ban, f'gen{g}')) for g in range(3)]
  assert [c['seed'] for c in configs] == [0, 1, 2]
  assert [c['teacher']['workdir'] for c in configs] == [
      '', os.path.join(ban, 'gen0'), os.path.join(ban, 'gen1')]
  assert configs[0]['loss']['terms'] == {'ce': {'weight': 1.0}}
  assert configs[1]['loss']['terms'] == configs[2]['loss']['terms'] == {
      'kd': {'weight': 1.0, 'temperature': 1.0}}


# --------------------------------------------------------------------------- kill -9

def _params(wd):
  from kdjax.workdir import restore_subtree
  return jax.tree.leaves(restore_subtree(wd, STEPS, ('params', 'student')))


def _kill_mid_stage(kill9, paths, data_dir, config, wd, stage):
  """Starts the run in a subprocess and kills it (SIGKILL) once ``stage`` has written its
  first checkpoint (step 15 of 30); returns that checkpoint's step."""
  killed_at = kill9([*_args(paths, data_dir, config), '--workdir', wd],
                    os.path.join(wd, stage, 'checkpoints'), timeout=120)
  assert killed_at is not None and killed_at < STEPS, 'the stage ended before it was killed'
  assert not os.path.exists(os.path.join(wd, 'summary.json'))
  return killed_at


@pytest.mark.parametrize('config,stage,reference', [('takd', 'assistant', 'takd'),
                                                    ('born_again', 'gen1', 'ban')])
def test_kill9_mid_stage_resumes_to_the_uninterrupted_result(config, stage, reference, request,
                                                             paths, data_dir, tmp_path,
                                                             kdjax_main, kill9):
  ref = request.getfixturevalue(reference)
  wd = str(tmp_path / 'killed')
  killed_at = _kill_mid_stage(kill9, paths, data_dir, config, wd, stage)
  out = kdjax_main([*_args(paths, data_dir, config), '--workdir', wd])
  a, b = _summary(ref), _summary(wd)
  rows = {r['name']: r for r in b['stages']}
  assert f'resuming from step {killed_at}' in out.stdout
  assert rows[stage]['summary']['resumed_from'] == killed_at and not rows[stage]['skipped']
  names = [r['name'] for r in b['stages']]
  assert all(rows[n]['skipped'] for n in names[:names.index(stage)])   # finished before
  keys = ['step', 'eval_accuracy', 'eval_loss', 'train_loss', 'train_accuracy']
  if config == 'born_again':
    keys += ['generation_accuracies', 'ban_ensemble_accuracy', 'ban_ensemble_loss',
             'ensemble_all_accuracy', 'ensemble_all_loss']
  for key in keys:
    assert a[key] == b[key], key
  for name in names:
    assert a['stages'][names.index(name)]['summary']['eval_accuracy'] == \
        rows[name]['summary']['eval_accuracy'], name
    assert all(np.array_equal(x, y) for x, y in zip(_params(os.path.join(ref, name)),
                                                    _params(os.path.join(wd, name)))), name


def test_an_inline_model_starts_from_the_base_file_and_overrides_apply_in_order(
    tmp_path, paths):
  from kdjax.config import load_config_file
  config = load_config_file(f'{paths["configs"]}/mnist1d/takd.py:tiny')
  config.seed = 5
  config.scheme.base = 'mnist1d/kd.py:tiny'
  config.scheme.stages[2] = {'name': 'student', 'teacher': 'assistant',
                             'config': {'name': 'mlp', 'kwargs': {'hidden': (8,)}},
                             'overrides': {'seed_offset': 2, 'optimizer.learning_rate': 0.5}}
  plan = plan_stages(config, str(tmp_path / 'w'))
  student = plan[2].config
  assert student.model.name == 'mlp' and tuple(student.model.kwargs.hidden) == (8,)
  assert student.seed == 7 and plan[0].config.seed == 5
  assert student.optimizer.learning_rate == 0.5       # its own overrides come last
  assert student.num_steps == plan[0].config.num_steps == 60   # scheme.overrides (tiny)
  assert dict(student.loss.terms) == dict(load_config_file(
      f'{paths["configs"]}/mnist1d/kd.py:tiny').loss.terms)
  assert not (tmp_path / 'w').exists()
