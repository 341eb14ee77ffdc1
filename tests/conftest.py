"""Session-wide test settings and fixtures.

* Tests run on the CPU with one device unless a test starts a subprocess with more.
* One persistent JAX compilation cache for the whole session, in-process and in every
  subprocess (``kdjax`` CLI runs, multi-process tests): the same tiny programs compile
  once, not once per process. ``KDJAX_TEST_COMPILATION_CACHE`` moves it.
* Fixtures shared by the run tests: the data directory (prepared once, file-locked),
  the ``kdjax`` command in a subprocess, and one tiny trained teacher per session,
  shared by the xdist workers (the first to ask trains it, the others wait for it).
"""

import fcntl
import os
import signal
import subprocess
import sys
import tempfile
import time

os.environ.setdefault('JAX_PLATFORMS', 'cpu')
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
_CACHE = os.environ.setdefault(
    'KDJAX_TEST_COMPILATION_CACHE',
    os.path.join(tempfile.gettempdir(), f'kdjax-test-compilation-cache-{os.getuid()}'))
os.environ.setdefault('JAX_COMPILATION_CACHE_DIR', _CACHE)
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')

import jax  # noqa: E402  (after the environment it reads)
import pytest  # noqa: E402

jax.config.update('jax_compilation_cache_dir', os.environ['JAX_COMPILATION_CACHE_DIR'])
jax.config.update('jax_persistent_cache_min_compile_time_secs', 0.0)

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
CONFIGS = os.path.join(ROOT, 'configs')
SMALL = 'mnist1d/small'   # the MNIST-1D builder config with a small transfer split


def kdjax_cli(args, *, env=None, timeout=600, check=True):
  """Runs ``python -m kdjax ARGS`` in a subprocess; returns the CompletedProcess."""
  full_env = {**os.environ, 'JAX_PLATFORMS': 'cpu', **(env or {})}
  out = subprocess.run([sys.executable, '-m', 'kdjax', *args], capture_output=True, text=True,
                       env=full_env, timeout=timeout, cwd=ROOT)
  if check and out.returncode != 0:
    raise AssertionError(f'kdjax {" ".join(args)} failed ({out.returncode}):\n{out.stderr[-3000:]}')
  return out


def kill_at_first_checkpoint(args, checkpoints: str, *, timeout: float = 180,
                             poll: float = 0.005) -> int | None:
  """Runs ``python -m kdjax ARGS`` in a subprocess and kills it (SIGKILL) as soon as a
  complete checkpoint appears under ``checkpoints``; returns that checkpoint's step (None
  if the run ended or ``timeout`` passed first)."""
  proc = subprocess.Popen([sys.executable, '-m', 'kdjax', *args], cwd=ROOT,
                          env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  deadline, killed_at = time.time() + timeout, None
  while time.time() < deadline and proc.poll() is None:
    done = ([int(d) for d in os.listdir(checkpoints) if d.isdigit()]
            if os.path.isdir(checkpoints) else [])
    done = [d for d in done
            if os.path.exists(os.path.join(checkpoints, str(d), '_CHECKPOINT_METADATA'))]
    if done:
      proc.send_signal(signal.SIGKILL)
      killed_at = max(done)
      break
    time.sleep(poll)
  if proc.poll() is None and killed_at is None:
    proc.kill()
  proc.wait()
  return killed_at


@pytest.fixture(scope='session')
def kill9():
  """:func:`kill_at_first_checkpoint`: a kdjax run killed at its first checkpoint."""
  return kill_at_first_checkpoint


def _shared_root(tmp_path_factory):
  """The session's temporary root, shared by every xdist worker."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get('PYTEST_XDIST_WORKER') else root


def _once(path: str, make) -> str:
  """``make(path)`` once per session whatever the worker; the others wait for it."""
  with open(path + '.lock', 'w') as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)
    if not os.path.exists(path + '.done'):
      make(path)
      open(path + '.done', 'w').close()
  return path


@pytest.fixture(scope='session')
def data_dir(tmp_path_factory):
  """One TFDS data dir for the run tests, with MNIST-1D (small) prepared once (the
  builders file-lock), so no test sees TFDS's preparation progress on its stderr."""
  path = os.environ.get('KDJAX_TEST_DATA_DIR') or str(_shared_root(tmp_path_factory) / 'kdjax_data')
  os.makedirs(path, exist_ok=True)
  from kdjax.data import dataset_spec
  dataset_spec(SMALL, data_dir=path)
  return path


@pytest.fixture(scope='session')
def cli():
  """``cli(args, env=None, check=True)``: the kdjax command in a subprocess."""
  return kdjax_cli


@pytest.fixture(scope='session')
def paths():
  return {'root': ROOT, 'configs': CONFIGS, 'small': SMALL}


@pytest.fixture(scope='session')
def root():
  return ROOT


def train_teacher(path: str, data_dir: str, steps: int) -> str:
  kdjax_cli(['train', '--config', f'{CONFIGS}/mnist1d/teacher.py:tiny', '--workdir', path,
             f'--config.data.name={SMALL}', f'--config.data.data_dir={data_dir}',
             f'--config.num_steps={steps}', '--config.progress=false'])
  return path


@pytest.fixture(scope='session')
def teacher_dir(tmp_path_factory, data_dir):
  """A tiny trained MNIST-1D teacher workdir (100 steps), one per session."""
  return _once(str(_shared_root(tmp_path_factory) / 'teacher'),
               lambda p: train_teacher(p, data_dir, 100))


@pytest.fixture(scope='session')
def other_teacher_dir(tmp_path_factory, data_dir):
  """Another tiny teacher (50 steps: other parameters), one per session."""
  return _once(str(_shared_root(tmp_path_factory) / 'other_teacher'),
               lambda p: train_teacher(p, data_dir, 50))


LM_TINY = 'shakespeare_lm/tiny'


@pytest.fixture(scope='session')
def lm_teacher_dir(tmp_path_factory, data_dir):
  """A tiny trained teacher language model (``configs/lm/teacher.py:tiny`` on
  ``shakespeare_lm/tiny``, 40 steps), one per session, in the session's data dir."""
  def make(path):
    kdjax_cli(['train', '--config', f'{CONFIGS}/lm/teacher.py:tiny', '--workdir', path,
               f'--config.data.data_dir={data_dir}', '--config.progress=false'])
  return _once(str(_shared_root(tmp_path_factory) / 'lm_teacher'), make)


@pytest.fixture
def kdjax_main(capsys):
  """``kdjax_main(args, check=True)``: the kdjax command in this process (``kdjax.cli.main``),
  for the runs that need no process of their own (no signal, device count or second
  process); returns a ``subprocess.CompletedProcess`` like the subprocess runner."""
  from kdjax.cli import main

  def run(args, *, check=True):
    capsys.readouterr()
    code = main(list(args))
    out = capsys.readouterr()
    if check and code != 0:
      raise AssertionError(f'kdjax {" ".join(args)} failed ({code}):\n{out.err[-3000:]}')
    return subprocess.CompletedProcess(list(args), code, out.out, out.err)

  return run


def pytest_collection_modifyitems(config, items):
  """The slow and multi-process tests first (stable order otherwise): with -n 2 the long
  ones then run while the quick ones fill the other worker, not at the end alone."""
  def slow(item):
    return any(item.get_closest_marker(m) is not None for m in ('slow', 'multiprocess'))
  items[:] = [i for i in items if slow(i)] + [i for i in items if not slow(i)]
