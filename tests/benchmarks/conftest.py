"""Shared by the benchmark smoke tests: run a script under benchmarks/ as a user would."""

import os
import subprocess
import sys

import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))


@pytest.fixture
def run_benchmark():
  """``run_benchmark(script, *args, timeout=300)``: the finished process (exit code 0 asserted)."""
  def run(script, *args, timeout=300):
    env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'PYTHONPATH': ROOT}
    proc = subprocess.run([sys.executable, os.path.join(ROOT, 'benchmarks', script), *args],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc
  return run
