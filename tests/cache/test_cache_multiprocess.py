"""Two JAX processes (jax.distributed on localhost, 2 CPU devices each) build one cache."""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from kdjax.cache.read import load_columns

pytestmark = [pytest.mark.slow, pytest.mark.multiprocess]


def _free_port():
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def test_two_processes_build_the_same_cache_as_one(tmp_path, teacher_dir, cache_dir, distill_args,
                                                   cli, root):
  out_dir = str(tmp_path / 'mp')
  args = ['cache', 'build', *distill_args, f'--config.teacher.workdir={teacher_dir}',
          '--epochs', '4', '--chunk-size', '1024', '--workdir', out_dir]
  port = _free_port()
  procs = []
  for pid in range(2):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'JAX_NUM_CPU_DEVICES': '2',
           'KDJAX_COORDINATOR': f'localhost:{port}', 'KDJAX_NUM_PROCESSES': '2',
           'KDJAX_PROCESS_ID': str(pid)}
    procs.append(subprocess.Popen([sys.executable, '-m', 'kdjax', *args], cwd=root, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert cli(['cache', 'verify', out_dir]).returncode == 0
  info = json.loads(cli(['cache', 'inspect', '--json', out_dir]).stdout)
  assert info['coverage'] == 1.0 and info['chunks'] == 16
  # 4 devices over 2 processes compute the same cache as 1 device in 1 process: the same
  # top-k indices, and values equal to float32 rounding. (Not always the same bytes: each
  # device's teacher forward sees a quarter of the chunk, and XLA:CPU's kernels may
  # block a 256-row matmul differently from a 1024-row one; seen on an AVX2-only CPU.)
  ref = json.load(open(os.path.join(cache_dir, 'manifest.json')))
  got = json.load(open(os.path.join(out_dir, 'manifest.json')))
  assert got['arrays'] == ref['arrays'] and got['epochs'] == ref['epochs']
  ours, theirs = load_columns(out_dir, got), load_columns(cache_dir, ref)
  assert set(ours) == set(theirs) == set(ref['arrays'])
  for name in ours:
    if np.issubdtype(ours[name].dtype, np.integer):
      np.testing.assert_array_equal(ours[name], theirs[name], err_msg=name)
    else:
      np.testing.assert_allclose(ours[name], theirs[name], rtol=1e-5, atol=1e-5, err_msg=name)
