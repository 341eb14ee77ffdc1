"""JAX's persistent compilation cache, on by default for the ``kdjax`` command.

A CLI run compiles its train call, evaluator and init; with the cache, the second run of
the same programs (a rerun, the next seed of ``kdjax demo``, a test) loads them from
disk instead. The folder is ``$KDJAX_COMPILATION_CACHE``, else
``$XDG_CACHE_HOME/kdjax/jax_compilation_cache`` (``~/.cache/...``); ``kdjax
--no-compilation-cache`` (or ``KDJAX_COMPILATION_CACHE=off``) turns it off. A folder
already set in JAX's own ``JAX_COMPILATION_CACHE_DIR`` is kept.
"""

from __future__ import annotations

import os

import jax

ENV = 'KDJAX_COMPILATION_CACHE'
OFF = ('', '0', 'off', 'false', 'no')


def default_dir() -> str:
  base = os.environ.get('XDG_CACHE_HOME') or os.path.join(os.path.expanduser('~'), '.cache')
  return os.path.join(base, 'kdjax', 'jax_compilation_cache')


def enable_compilation_cache(path: str | None = None) -> str | None:
  """Turns the persistent compilation cache on (every program, however quick to compile).

  Args:
    path: the cache folder; default ``$KDJAX_COMPILATION_CACHE``, JAX's own setting, or
      :func:`default_dir`.

  Returns:
    The folder in use, or None when ``$KDJAX_COMPILATION_CACHE`` says off or the folder
    cannot be created (the run goes on without the cache).
  """
  env = os.environ.get(ENV)
  if path is None and env is not None and env.strip().lower() in OFF:
    return None
  path = path or env or jax.config.jax_compilation_cache_dir or default_dir()
  try:
    os.makedirs(path, exist_ok=True)
  except OSError:
    return None
  jax.config.update('jax_compilation_cache_dir', path)
  jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)
  jax.config.update('jax_persistent_cache_min_entry_size_bytes', 0)
  return path
