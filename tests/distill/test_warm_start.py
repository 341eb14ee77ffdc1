"""``config.init``: a run's student starts from another run's checkpoint."""

import os

import jax
import numpy as np
import pytest

from kdjax import workdir as workdir_lib
from kdjax.config import load_config
from kdjax.distill.train import train_and_evaluate
from kdjax.distill.train import warm_start
from kdjax.engine.setup import setup

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), 'configs')


def _config(file, data_dir, **fields):
  c = load_config(f'{CONFIGS}/lm/{file}:tiny', [('data.data_dir', data_dir),
                                                 ('progress', False)])
  for k, v in fields.items():
    sub, _, name = k.rpartition('.')
    (c[sub] if sub else c)[name] = v
  return c


def test_the_student_starts_from_the_checkpoint_with_a_fresh_optimizer(lm_teacher_dir, data_dir,
                                                                       tmp_path):
  # The tiny teacher's own config as the student: the same model, a fresh run.
  config = _config('teacher.py', data_dir, **{'init.workdir': lm_teacher_dir, 'init.step': 20,
                                             'num_steps': 10})
  run = setup(config, log=lambda _: None)
  fresh = run.init()
  state = warm_start(fresh, lm_teacher_dir, 20)
  saved = workdir_lib.restore_subtree(lm_teacher_dir, 20, ('params', 'student'))
  for a, b in zip(jax.tree.leaves(state.params['student']), jax.tree.leaves(saved)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert int(state.step) == 0
  for a, b in zip(jax.tree.leaves(state.opt_state), jax.tree.leaves(fresh.opt_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # step 0: the latest checkpoint
  latest = workdir_lib.latest_step(lm_teacher_dir)
  newest = warm_start(fresh, lm_teacher_dir, 0)
  saved = workdir_lib.restore_subtree(lm_teacher_dir, latest, ('params', 'student'))
  np.testing.assert_array_equal(np.asarray(jax.tree.leaves(newest.params['student'])[0]),
                                np.asarray(jax.tree.leaves(saved)[0]))

  # a run from it: its first logged loss is the checkpoint's loss level, not a fresh model's
  summary = train_and_evaluate(config, str(tmp_path / 'run'))
  scratch = train_and_evaluate(_config('teacher.py', data_dir, num_steps=10),
                               str(tmp_path / 'scratch'))
  assert summary['eval_loss'] < scratch['eval_loss']


@pytest.mark.parametrize('fields, fragment', [
    ({'init.workdir': '/nonexistent/run'}, 'has no checkpoint to start the student from'),
    ({'init.step': 7}, 'has no checkpoint at step 7'),
    ({'init.step': -1}, 'config.init.step must be'),
])
def test_bad_init_is_one_line_and_exit_2(cli, lm_teacher_dir, data_dir, tmp_path, fields,
                                         fragment):
  wd = str(tmp_path / 'run')
  fields = {'init.workdir': lm_teacher_dir, **fields}
  out = cli(['train', '--config', f'{CONFIGS}/lm/teacher.py:tiny', '--workdir', wd,
             f'--config.data.data_dir={data_dir}',
             *[f'--config.{k}={v}' for k, v in fields.items()]], check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and fragment in lines[0], lines


def test_another_model_is_refused(cli, lm_teacher_dir, data_dir, tmp_path):
  out = cli(['train', '--config', f'{CONFIGS}/lm/student.py:tiny', '--workdir',
             str(tmp_path / 'run'), f'--config.data.data_dir={data_dir}',
             f'--config.init.workdir={lm_teacher_dir}'], check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  assert 'holds another model' in out.stderr.strip().splitlines()[-1]


def test_a_workdir_written_before_a_field_existed_still_resumes(lm_teacher_dir, data_dir,
                                                                 tmp_path):
  """A config.json without a field the engine added later (an older kdjax's) resumes when
  the run keeps that field's default, and is refused when it sets another value."""
  import json
  import shutil
  from kdjax.errors import UserError
  wd = str(tmp_path / 'old')
  shutil.copytree(lm_teacher_dir, wd)
  path = os.path.join(wd, 'config.json')
  config = json.load(open(path))
  del config['teacher']['vocab_method'], config['teacher']['hf_path']   # identity fields
  json.dump(config, open(path, 'w'))
  c = _config('teacher.py', data_dir)
  assert train_and_evaluate(c, wd)['step'] == workdir_lib.latest_step(lm_teacher_dir)
  c.teacher.vocab_method = 'uld'
  with pytest.raises(UserError, match='teacher.vocab_method'):
    workdir_lib.prepare(wd, c, has_results=True, identity=('teacher',),
                        defaults=load_config(f'{CONFIGS}/lm/teacher.py:tiny'))
