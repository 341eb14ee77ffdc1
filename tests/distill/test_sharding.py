"""The same tiny distillation on 1 and 4 devices, and with the teacher on its own device."""

import json

import pytest

FOUR = {'JAX_NUM_CPU_DEVICES': '4', 'JAX_PLATFORMS': 'cpu'}

@pytest.mark.slow
def test_tiny_distillation_same_accuracy_on_1_and_4_devices(cli, paths, teacher_dir, data_dir, tmp_path, kdjax_main):
  args = ['distill', '--config', f"{paths['configs']}/mnist1d/kd.py:tiny",
          f'--config.teacher.workdir={teacher_dir}', f"--config.data.name={paths['small']}",
          f'--config.data.data_dir={data_dir}', '--config.progress=false']
  kdjax_main([*args, '--workdir', str(tmp_path / 'one')])
  cli([*args, '--workdir', str(tmp_path / 'four')], env=FOUR)
  one = json.load(open(tmp_path / 'one' / 'summary.json'))
  four = json.load(open(tmp_path / 'four' / 'summary.json'))
  assert one['num_devices'] == 1 and four['num_devices'] == 4
  assert one['eval_accuracy'] == four['eval_accuracy']
  assert abs(one['train_loss'] - four['train_loss']) < 1e-4


@pytest.mark.slow
def test_tiny_distillation_teacher_on_its_own_device(cli, paths, teacher_dir, data_dir, tmp_path, kdjax_main):
  # 3 devices: the teacher on the last, the student's mesh on the other 2, one call
  # ahead; the run ends where the all-in-one-step run on 1 device does. steps_per_call=30
  # with the eval/checkpoint boundary at 50 steps gives calls of 30 and 20 steps, so the
  # look-ahead crosses unequal chunk sizes.
  args = ['distill', '--config', f"{paths['configs']}/mnist1d/kd.py:tiny",
          f'--config.teacher.workdir={teacher_dir}', f"--config.data.name={paths['small']}",
          f'--config.data.data_dir={data_dir}', '--config.progress=false',
          '--config.steps_per_call=30', '--config.data.feed=device', '--config.num_steps=50',
          '--config.log_every=25',
          "--config.data.augment={'kind': 'signal', 'shift': 2, 'noise': 0.05}"]
  kdjax_main([*args, '--workdir', str(tmp_path / 'one')])
  three = {'JAX_NUM_CPU_DEVICES': '3', 'JAX_PLATFORMS': 'cpu'}
  cli([*args, '--workdir', str(tmp_path / 'apart'), '--config.teacher.devices=1'], env=three)
  one = json.load(open(tmp_path / 'one' / 'summary.json'))
  apart = json.load(open(tmp_path / 'apart' / 'summary.json'))
  assert one['teacher_devices'] == 0 and apart['teacher_devices'] == 1
  assert apart['num_devices'] == 3
  assert one['eval_accuracy'] == apart['eval_accuracy']
  assert abs(one['train_loss'] - apart['train_loss']) < 1e-4
  # The per-log-step losses agree too (the teacher's outputs belong to their own steps).
  def losses(wd):
    rows = [json.loads(line) for line in open(wd / 'metrics.jsonl')]
    return [r['loss'] for r in rows if r['split'] == 'train']
  a, b = losses(tmp_path / 'one'), losses(tmp_path / 'apart')
  assert len(a) == len(b) >= 2
  assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4


@pytest.mark.parametrize('extra, message', [
    (['--config.teacher.devices=3'], 'config.teacher.devices=3'),
    (['--config.teacher.devices=1', '--config.data.feed=stream'], 'needs a live teacher'),
    (['--config.teacher.devices=2', '--config.batch_size=33'], "teacher's 2 devices"),
])
def test_teacher_devices_refused_clearly(cli, paths, teacher_dir, data_dir, tmp_path, extra, message):
  env = {'JAX_NUM_CPU_DEVICES': '3', 'JAX_PLATFORMS': 'cpu'}
  out = cli(['distill', '--config', f"{paths['configs']}/mnist1d/kd.py:tiny",
             f'--config.teacher.workdir={teacher_dir}', f"--config.data.name={paths['small']}",
             f'--config.data.data_dir={data_dir}', '--config.progress=false', *extra,
             '--workdir', str(tmp_path / 'wd')], env=env, check=False)
  assert out.returncode == 2
  assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
