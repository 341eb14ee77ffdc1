"""``kdjax fed run`` across processes: the cohort's client axis sharded over the devices of
2 processes x 2 CPU devices (``jax.distributed`` on localhost) ends where 1 process x 4
devices does."""

import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from kdjax import workdir as workdir_lib

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _result(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = json.load(f)
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    losses = [json.loads(line)['train_loss'] for line in f]
  step = workdir_lib.latest_step(workdir)
  return summary, losses, step, workdir_lib.restore_subtree(workdir, step, ('server',))


def test_client_axis_over_two_processes_equals_one_process(root, tmp_path):
  args = ['fed', 'run', '--config', os.path.join(root, 'configs', 'fed', 'mnist1d_fedavg.py:tiny'),
          '--no-progress', '--config.clients_per_round=8', '--config.plots=False',
          "--config.mesh=[('clients', -1)]", '--config.num_rounds=4', '--config.eval_every=4',
          '--config.checkpoint_every=4']
  mp, sp = str(tmp_path / 'mp'), str(tmp_path / 'sp')
  port = _free_port()
  common = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_DEFAULT_MATMUL_PRECISION': 'highest'}
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
  (a, loss_a, step_a, server_a), (b, loss_b, step_b, server_b) = _result(mp), _result(sp)
  # the cohort of 8 over 4 devices: two clients per device in both layouts
  assert a['client_mesh'] == b['client_mesh'] == {'clients': 4}
  assert a['round'] == b['round'] == step_a == step_b == 4
  # Each device trains the same clients in both layouts; only the all-reduce of the
  # weighted updates sums across processes (gloo) in one and in-process in the other.
  assert abs(a['global_accuracy'] - b['global_accuracy']) < 1e-6
  assert abs(a['personalized_accuracy_mean'] - b['personalized_accuracy_mean']) < 1e-6
  np.testing.assert_allclose(loss_a, loss_b, rtol=1e-5)
  leaves_a, leaves_b = jax.tree.leaves(server_a), jax.tree.leaves(server_b)
  assert len(leaves_a) == len(leaves_b) > 0
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)
