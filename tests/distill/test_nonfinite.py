"""A run whose loss goes non-finite stops at once, in one line that names the step and the
last good checkpoint; it saves nothing after it, its files stay strict JSON, and a
rerun resumes from that checkpoint. ``nonfinite='skip'`` skips such steps instead."""

import json
import os

import pytest

from kdjax.cli import main as kdjax_main

# An absurd learning rate from step 20 on: the step schedule multiplies 1e-3 by 1e30.
SPIKE = ['--config.optimizer.schedule=step', '--config.optimizer.decay_steps=[20]',
         '--config.optimizer.decay_factor=1e30', '--config.checkpoint_every=10',
         '--config.eval_every=10', '--config.log_every=5', '--config.steps_per_call=10',
         '--config.progress=false']


def _strict(text):
  def refuse(name):
    raise ValueError(f'not strict JSON: {name}')
  return json.loads(text, parse_constant=refuse)


@pytest.fixture
def run(paths, data_dir, tmp_path):
  def go(*extra, workdir='w'):
    wd = str(tmp_path / workdir)
    code = kdjax_main(['train', '--config', f"{paths['configs']}/mnist1d/teacher.py:tiny",
                       '--workdir', wd, f"--config.data.name={paths['small']}",
                       f'--config.data.data_dir={data_dir}', *SPIKE, *extra])
    return code, wd
  return go


def test_absurd_learning_rate_stops_names_the_checkpoint_and_resumes_from_it(run, capsys):
  code, wd = run()
  out = capsys.readouterr()
  assert code == 3
  lines = out.err.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('kdjax: diverged: ')
  ckpt = os.path.join(wd, 'checkpoints', '20')
  assert 'the loss is not finite at step 2' in lines[0] and f'checkpoint is {ckpt}' in lines[0]
  step = int(lines[0].split('at step ')[1].split()[0])
  assert 20 < step <= 30
  # Nothing after the last good checkpoint was saved.
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['10', '20']
  # Every file it wrote is strict JSON; the non-finite figures are null and named.
  rows = [_strict(line) for line in open(os.path.join(wd, 'metrics.jsonl'))]
  last = rows[-1]
  assert last['step'] == step and last['split'] == 'train'
  assert last['loss'] is None and 'loss' in last['nonfinite']
  assert all(r['loss'] is not None for r in rows[:-1] if r['split'] == 'train')
  summary = _strict(open(os.path.join(wd, 'summary.json')).read())
  assert summary['diverged'] is True and summary['step'] == step
  assert summary['last_checkpoint'] == ckpt
  _strict(open(os.path.join(wd, 'config.json')).read())

  # The same command again: it resumes from step 20 and stops at the same step.
  code, _ = run()
  out = capsys.readouterr()
  assert code == 3
  assert 'resuming from step 20' in out.out
  assert f'at step {step} ' in out.err and len(out.err.strip().splitlines()) == 1
  assert sorted(os.listdir(os.path.join(wd, 'checkpoints'))) == ['10', '20']

  # With nonfinite=skip the run resumes from step 20 and skips the non-finite steps.
  code, _ = run('--config.nonfinite=skip')
  assert code == 0, capsys.readouterr().err
  summary = _strict(open(os.path.join(wd, 'summary.json')).read())
  assert summary['step'] == 100 and summary['skipped_steps'] >= 1
  assert summary['resumed_from'] == 20
  for line in open(os.path.join(wd, 'metrics.jsonl')):
    _strict(line)


def test_a_run_that_diverges_before_any_checkpoint_says_so(run, capsys):
  code, wd = run('--config.optimizer.decay_steps=[0]', workdir='early')
  err = capsys.readouterr().err
  assert code == 3 and len(err.strip().splitlines()) == 1
  assert 'no checkpoint was saved before it' in err
  assert not os.path.exists(os.path.join(wd, 'checkpoints')) or not os.listdir(
      os.path.join(wd, 'checkpoints'))
