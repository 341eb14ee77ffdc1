"""What the benchmarks record about the machine they ran on (imported by each script)."""

import json
import os
import platform


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
