"""End to end through the CLI: train, distill, eval, resume after kill -9, errors."""

import json
import os
import signal
import subprocess
import sys
import time

import pytest


@pytest.fixture(autouse=True)
def _names(cli, paths):
  global kdjax_cli, CONFIGS, ROOT, SMALL
  kdjax_cli, CONFIGS, ROOT, SMALL = cli, paths['configs'], paths['root'], paths['small']

pytestmark = pytest.mark.slow


def _common(data_dir):
  return [f'--config.data.name={SMALL}', f'--config.data.data_dir={data_dir}',
          '--config.progress=false']


def test_train_writes_everything(teacher_dir):
  summary = json.load(open(os.path.join(teacher_dir, 'summary.json')))
  for key in ('step', 'eval_accuracy', 'train_loss', 'examples_per_sec'):
    assert summary[key] is not None, key
  assert summary['step'] == 100
  assert summary['eval_accuracy'] > 0.2          # 10 classes: chance is 0.1
  assert sorted(os.listdir(os.path.join(teacher_dir, 'checkpoints'))) == ['100', '50']
  lines = [json.loads(l) for l in open(os.path.join(teacher_dir, 'metrics.jsonl'))]
  assert {l['split'] for l in lines} == {'train', 'eval'}
  assert os.path.exists(os.path.join(teacher_dir, 'learning_curves.png'))
  assert os.listdir(os.path.join(teacher_dir, 'tensorboard'))


def test_rerun_of_a_finished_run_reports_it_and_trains_nothing(teacher_dir, data_dir, tmp_path, kdjax_main):
  import shutil
  wd = str(tmp_path / 'again')
  shutil.copytree(teacher_dir, wd)
  before = json.load(open(os.path.join(wd, 'summary.json')))
  metrics = open(os.path.join(wd, 'metrics.jsonl')).read()
  kdjax_main(['train', '--config', f'{CONFIGS}/mnist1d/teacher.py:tiny', '--workdir', wd,
             '--config.num_steps=100', *_common(data_dir)])
  after = json.load(open(os.path.join(wd, 'summary.json')))
  assert after['resumed_from'] == after['step'] == 100
  # the evaluation is run again on the restored state and gives the same figures
  for key in ('eval_accuracy', 'eval_loss', 'train_loss', 'train_accuracy', 'examples_per_sec'):
    assert after[key] is not None and after[key] == pytest.approx(before[key], rel=1e-6), key
  assert open(os.path.join(wd, 'metrics.jsonl')).read() == metrics


def test_distill_and_eval(teacher_dir, data_dir, tmp_path, kdjax_main):
  wd = str(tmp_path / 'kd')
  out = kdjax_main(['distill', '--config', f'{CONFIGS}/mnist1d/kd.py:tiny', '--workdir', wd,
                   f'--config.teacher.workdir={teacher_dir}', *_common(data_dir)])
  result = json.loads(out.stdout.strip().splitlines()[-1])
  assert result['step'] == 100 and 0.0 <= result['eval_accuracy'] <= 1.0
  summary = json.load(open(os.path.join(wd, 'summary.json')))
  assert summary['teacher_step'] == 100
  ev = json.loads(kdjax_main(['eval', '--workdir', wd]).stdout.strip().splitlines()[-1])
  assert ev['step'] == 100
  assert abs(ev['accuracy'] - summary['eval_accuracy']) < 1e-6


def test_transfer_split_distillation(teacher_dir, data_dir, tmp_path, kdjax_main):
  wd = str(tmp_path / 'kdt')
  kdjax_main(['distill', '--config', f'{CONFIGS}/mnist1d/kd.py:transfer,tiny', '--workdir', wd,
             f'--config.teacher.workdir={teacher_dir}', *_common(data_dir)])
  summary = json.load(open(os.path.join(wd, 'summary.json')))
  assert summary['step'] == 100


def test_kill9_resume_matches_uninterrupted(teacher_dir, data_dir, tmp_path, kdjax_main):
  args = ['distill', '--config', f'{CONFIGS}/mnist1d/kd.py:tiny',
          f'--config.teacher.workdir={teacher_dir}', *_common(data_dir),
          '--config.num_steps=400', '--config.checkpoint_every=50', '--config.seed=0',
          '--config.steps_per_call=25']
  ref = str(tmp_path / 'ref')
  kdjax_main([*args, '--workdir', ref])
  wd = str(tmp_path / 'killed')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen([sys.executable, '-m', 'kdjax', *args, '--workdir', wd], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  ckpt = os.path.join(wd, 'checkpoints')
  deadline = time.time() + 300
  killed_at = None
  while time.time() < deadline and proc.poll() is None:
    done = [int(d) for d in os.listdir(ckpt) if d.isdigit()] if os.path.isdir(ckpt) else []
    done = [d for d in done if d >= 100 and os.path.exists(os.path.join(ckpt, str(d), '_CHECKPOINT_METADATA'))]
    if done:
      proc.send_signal(signal.SIGKILL)
      killed_at = max(done)
      break
    time.sleep(0.05)
  proc.wait()
  assert killed_at is not None and killed_at < 400, 'the run ended before it could be killed'
  out = kdjax_cli([*args, '--workdir', wd])
  assert 'resuming from step' in out.stdout
  a = json.load(open(os.path.join(ref, 'summary.json')))
  b = json.load(open(os.path.join(wd, 'summary.json')))
  assert b['resumed_from'] is not None and b['resumed_from'] >= 100
  assert a['train_loss'] == b['train_loss']
  assert a['eval_accuracy'] == b['eval_accuracy']


def test_sigterm_checkpoints_and_resumes(teacher_dir, data_dir, tmp_path, kdjax_main):
  args = ['train', '--config', f'{CONFIGS}/mnist1d/student_baseline.py:tiny', *_common(data_dir),
          '--config.num_steps=3000', '--config.checkpoint_every=1000', '--config.log_every=100',
          '--config.eval_every=1000', '--config.steps_per_call=25']
  wd = str(tmp_path / 'preempted')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.Popen([sys.executable, '-m', 'kdjax', *args, '--workdir', wd], cwd=ROOT, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  metrics = os.path.join(wd, 'metrics.jsonl')
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if os.path.exists(metrics) and os.path.getsize(metrics) > 0:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGTERM)
  out, err = proc.communicate(timeout=120)
  assert proc.returncode == 143, err[-2000:]
  assert 'preempted: saved step' in out
  saved = int(out.split('preempted: saved step ')[1].split(';')[0])
  assert 0 < saved < 3000 and saved % 25 == 0
  resumed = kdjax_cli([*args, '--workdir', wd])
  assert f'resuming from step {saved}' in resumed.stdout
  ref = str(tmp_path / 'ref')
  kdjax_main([*args, '--workdir', ref])
  a = json.load(open(os.path.join(ref, 'summary.json')))
  b = json.load(open(os.path.join(wd, 'summary.json')))
  assert (a['train_loss'], a['eval_accuracy']) == (b['train_loss'], b['eval_accuracy'])
  # Every logged window, the one the preemption cut included (the open window is saved
  # with the checkpoint), equals the uninterrupted run's.
  def train_lines(d):
    lines = [json.loads(l) for l in open(os.path.join(d, 'metrics.jsonl'))]
    return [{k: v for k, v in l.items() if k != 'examples_per_sec'}
            for l in lines if l['split'] == 'train']
  assert train_lines(ref) == train_lines(wd)
