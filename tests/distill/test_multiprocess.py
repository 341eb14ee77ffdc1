"""Real multi-process JAX: two processes (2 CPU devices each) on localhost via jax.distributed."""

import json
import os
import socket
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_equal_one_process_with_four_devices(paths, data_dir, teacher_dir, cli, tmp_path):
  args = ['distill', '--config', f"{paths['configs']}/mnist1d/kd.py:tiny",
          f'--config.teacher.workdir={teacher_dir}', f"--config.data.name={paths['small']}",
          f'--config.data.data_dir={data_dir}', '--config.progress=false']
  mp = str(tmp_path / 'mp')
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '2',
           'KDJAX_COORDINATOR': f'localhost:{port}', 'KDJAX_NUM_PROCESSES': '2',
           'KDJAX_PROCESS_ID': str(pid)}
    procs.append(subprocess.Popen([sys.executable, '-m', 'kdjax', *args, '--workdir', mp],
                                  cwd=paths['root'], env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  sp = str(tmp_path / 'sp')
  cli([*args, '--workdir', sp], env={'JAX_NUM_CPU_DEVICES': '4'})
  a = json.load(open(os.path.join(mp, 'summary.json')))
  b = json.load(open(os.path.join(sp, 'summary.json')))
  assert a['num_devices'] == b['num_devices'] == 4
  assert a['eval_accuracy'] == b['eval_accuracy']
  assert abs(a['train_loss'] - b['train_loss']) < 1e-5
  assert sorted(os.listdir(os.path.join(mp, 'checkpoints'))) == ['100', '50']
