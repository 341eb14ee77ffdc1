"""Two JAX processes (jax.distributed on localhost, 2 CPU devices each) build one cache."""

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
    env.pop('XLA_FLAGS', None)
    procs.append(subprocess.Popen([sys.executable, '-m', 'kdjax', *args], cwd=root, env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
  outs = [p.communicate(timeout=300) for p in procs]
  for p, (_, err) in zip(procs, outs):
    assert p.returncode == 0, err[-3000:]
  assert cli(['cache', 'verify', out_dir]).returncode == 0
  info = json.loads(cli(['cache', 'inspect', '--json', out_dir]).stdout)
  assert info['coverage'] == 1.0 and info['chunks'] == 16
  # 4 devices over 2 processes compute the same bytes as 1 device in 1 process.
  ref = json.load(open(os.path.join(cache_dir, 'manifest.json')))
  assert info['content_checksum'] == ref['content_checksum']
