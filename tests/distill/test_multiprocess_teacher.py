"""The teacher on devices of its own across processes: 2 processes x 2 CPU devices with
``config.teacher.devices=2`` (one device of each process for the teacher, one for the
student) train the same student as 1 process x 4 devices with ``teacher.devices=2``."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from kdjax import workdir as workdir_lib
from kdjax.errors import UserError
from kdjax.parallel import split_devices


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _student(workdir):
  step = workdir_lib.latest_step(workdir)
  return step, workdir_lib.restore_subtree(workdir, step, ('params', 'student'))


class _Device:
  def __init__(self, id, process_index):
    self.id, self.process_index = id, process_index


def test_teacher_devices_are_the_last_of_each_process():
  devices = [_Device(i + 100 * p, p) for p in range(2) for i in range(4)]
  rest, apart = split_devices(devices, 4)
  assert [d.id for d in apart] == [2, 3, 102, 103]
  assert [d.id for d in rest] == [0, 1, 100, 101]
  one = [_Device(i, 0) for i in range(4)]   # one process: the last k, as before
  assert [d.id for d in split_devices(one, 2)[1]] == [2, 3]
  with pytest.raises(UserError, match='multiple of the 2 processes'):
    split_devices(devices, 3)
  with pytest.raises(UserError, match='leaves process 0 no device'):
    split_devices(devices, 8)


@pytest.mark.slow
@pytest.mark.multiprocess
def test_teacher_devices_across_two_processes_equal_one_process(paths, data_dir, teacher_dir,
                                                                tmp_path, root):
  args = ['distill', '--config', f"{paths['configs']}/mnist1d/kd.py:tiny",
          f'--config.teacher.workdir={teacher_dir}', f"--config.data.name={paths['small']}",
          f'--config.data.data_dir={data_dir}', '--config.progress=false',
          '--config.teacher.devices=2', '--config.data.feed=device', '--config.num_steps=40',
          '--config.eval_every=40', '--config.checkpoint_every=40', '--config.log_every=20',
          '--config.steps_per_call=20']
  mp, sp = str(tmp_path / 'mp'), str(tmp_path / 'sp')
  port = _free_port()
  common = {**os.environ, 'JAX_PLATFORMS': 'cpu',
            # TF32-free matmuls wherever this runs; the CPU is exact already
            'JAX_DEFAULT_MATMUL_PRECISION': 'highest'}
  procs = []
  for pid in range(2):   # the two processes and the one-process run start together
    env = {**common, 'JAX_NUM_CPU_DEVICES': '2', 'KDJAX_COORDINATOR': f'localhost:{port}',
           'KDJAX_NUM_PROCESSES': '2', 'KDJAX_PROCESS_ID': str(pid)}
    procs.append(subprocess.Popen([sys.executable, '-m', 'kdjax', *args, '--workdir', mp],
                                  cwd=root, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True))
  procs.append(subprocess.Popen([sys.executable, '-m', 'kdjax', *args, '--workdir', sp],
                                cwd=root, env={**common, 'JAX_NUM_CPU_DEVICES': '4'},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  a = json.load(open(os.path.join(mp, 'summary.json')))
  b = json.load(open(os.path.join(sp, 'summary.json')))
  assert a['num_devices'] == b['num_devices'] == 4 and a['step'] == b['step'] == 40
  # Each student and teacher device sees the same half batch in both layouts; only the
  # cross-process (gloo) and in-process all-reduces may sum in another order.
  assert a['eval_accuracy'] == b['eval_accuracy']
  assert abs(a['eval_loss'] - b['eval_loss']) < 1e-5
  assert abs(a['train_loss'] - b['train_loss']) < 1e-5
  (step_a, ours), (step_b, theirs) = _student(mp), _student(sp)
  assert step_a == step_b == 40
  flat_a, flat_b = jax.tree.leaves(ours), jax.tree.leaves(theirs)
  assert len(flat_a) == len(flat_b) > 0
  for x, y in zip(flat_a, flat_b):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
