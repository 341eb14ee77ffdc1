"""What the benchmarks share (imported by each script): the machine they ran on, their
JSON output, and a child process driven over a pipe (a contender that may fail to start)."""

import json
import os
import platform
import queue
import subprocess
import sys
import threading
import time


def machine_info() -> dict:
  """CPU model, logical / available CPUs, platform and Python version."""
  model = platform.processor() or ''
  try:
    with open('/proc/cpuinfo') as f:
      for line in f:
        if line.startswith('model name'):
          model = line.split(':', 1)[1].strip()
          break
  except OSError:
    pass
  available = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else None
  return {'cpu_model': model, 'logical_cpus': os.cpu_count(), 'cpus_available': available,
          'platform': platform.platform(), 'python': platform.python_version()}


def write_json(path: str | None, obj) -> None:
  """Writes a benchmark's result to ``path`` (its ``--json`` argument), if one was given."""
  if path:
    with open(path, 'w') as f:
      json.dump(obj, f, indent=2, default=str)


class PipeChild:
  """A benchmark's contender in its own process, driven over a pipe.

  ``python SCRIPT --child JOB.json`` must print one JSON line when it is ready (its
  setup, compilations included), then answer each command line written to its stdin
  with one JSON line, until ``quit``. A child that exits, or that is not ready within
  ``timeout`` seconds, leaves ``ready`` None and says why in ``failure`` (the run then
  reports that contender as skipped); its stderr goes to ``WORKDIR/child.stderr``.
  """

  def __init__(self, script: str, job: dict, workdir: str, timeout: float | None, *,
               root: str, what: str = 'child'):
    path = os.path.join(workdir, 'child.json')
    with open(path, 'w') as f:
      json.dump(job, f)
    self.what = what
    self.failure = ''
    self.stderr_path = os.path.join(workdir, 'child.stderr')
    self._stderr = open(self.stderr_path, 'w')
    env = {**os.environ, 'PYTHONPATH': os.pathsep.join(
        p for p in (root, os.environ.get('PYTHONPATH', '')) if p)}
    self.proc = subprocess.Popen([sys.executable, os.path.abspath(script), '--child', path],
                                 stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                 stderr=self._stderr, text=True, env=env, cwd=root)
    self.lines: queue.Queue = queue.Queue()
    threading.Thread(target=self._read, daemon=True).start()
    t0 = time.perf_counter()
    self.ready = self._reply(timeout)
    self.wall_seconds_to_ready = time.perf_counter() - t0
    if self.ready is None:
      self.close(kill=True)

  def _read(self) -> None:
    for line in self.proc.stdout:
      self.lines.put(line)
    self.lines.put(None)

  def _reply(self, timeout: float | None) -> dict | None:
    deadline = None if timeout is None else time.perf_counter() + timeout
    while True:
      left = None if deadline is None else max(0.0, deadline - time.perf_counter())
      try:
        line = self.lines.get(timeout=left)
      except queue.Empty:
        self.failure = f'timed out after {timeout:.0f} s (--compile-timeout)'
        return None
      if line is None:
        self.proc.wait()
        self.failure = (f'the child exited with code {self.proc.returncode}: '
                        + self.stderr_tail(1500))
        return None
      line = line.strip()
      if line.startswith('{'):
        return json.loads(line)

  def stderr_tail(self, n: int) -> str:
    self._stderr.flush()
    with open(self.stderr_path) as f:
      return f.read()[-n:].strip()

  def ask(self, command: str) -> dict:
    """Writes one command line and returns the child's JSON reply."""
    self.proc.stdin.write(command + '\n')
    self.proc.stdin.flush()
    reply = self._reply(None)
    if reply is None:
      raise RuntimeError(f'{self.what}: {self.failure}')
    return reply

  def close(self, kill: bool = False) -> None:
    if self.proc.poll() is None and not kill:
      try:
        self.proc.stdin.write('quit\n')
        self.proc.stdin.flush()
        self.proc.wait(timeout=30)
      except (BrokenPipeError, OSError, subprocess.TimeoutExpired):
        pass
    if self.proc.poll() is None:
      self.proc.kill()            # our own child, by its handle
      self.proc.wait()
    self._stderr.close()
