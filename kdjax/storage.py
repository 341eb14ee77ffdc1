"""Paths that are local files or objects in a bucket (``gs://``), through one set of calls.

Every file kdjax reads or writes (a run's ``config.json``, ``metrics.jsonl``,
``summary.json``, plots and TensorBoard events, the teacher cache, federated and sweep
outputs) goes through these functions. A local path behaves as plain ``os`` calls do;
a URL (``gs://bucket/dir``, or any ``scheme://`` that ``fsspec`` knows) goes through
:mod:`etils.epath` / ``fsspec`` (``gcsfs`` for ``gs://``). Orbax writes checkpoint arrays
itself, through tensorstore's ``gcs`` kvstore. ``docs/object_storage.md`` says what each
output uses and how to point every library at a GCS emulator.

What differs on object storage, and how these calls hide it:

* There are no directories, only name prefixes: :func:`makedirs` does nothing there, and
  a "directory" exists when an object's name starts with it.
* A write is one object upload, which is atomic (a reader sees the old object or the new
  one, never half of one): :func:`write_bytes` writes locally to a temporary file and
  renames it, remotely it uploads once.
* There is no append and no rename of a directory (see :mod:`kdjax.engine.metrics` and
  :mod:`kdjax.cache.store` for what they do instead).
* Listings are read fresh (``fsspec``'s listing cache is dropped first): another process
  (a killed run, another host) may have written since.

>>> import tempfile
>>> d = tempfile.mkdtemp()
>>> p = join(d, 'a', 'b.txt')
>>> makedirs(join(d, 'a')); write_text(p, 'hello\\n')
>>> read_text(p), listdir(join(d, 'a')), exists(p), is_remote(p)
('hello\\n', ['b.txt'], True, False)
>>> is_remote('gs://bucket/run'), abspath('gs://bucket/run'), join('gs://bucket', 'run', 'x')
(True, 'gs://bucket/run', 'gs://bucket/run/x')
"""

from __future__ import annotations

import builtins
import contextlib
import io
import os
import posixpath
import shutil
import tempfile
from typing import IO, Iterator

from etils import epath


def is_remote(path) -> bool:
  """True for a URL (``gs://...``, ``s3://...``); False for a local path (or ``file://``)."""
  text = os.fspath(path) if not isinstance(path, str) else path
  return '://' in text and not text.startswith('file://')


def as_path(path) -> epath.Path:
  """``path`` as an :class:`etils.epath.Path` (what orbax takes; ``gs://`` kept)."""
  return epath.Path(path)


def abspath(path) -> str:
  """The absolute local path, or the URL unchanged."""
  path = os.fspath(path)
  return path.rstrip('/') if is_remote(path) else os.path.abspath(path)


def join(path, *parts: str) -> str:
  """``os.path.join`` for local paths; ``/``-joined for URLs."""
  path = os.fspath(path)
  if is_remote(path):
    return posixpath.join(path, *parts)
  return os.path.join(path, *parts)


def dirname(path) -> str:
  path = os.fspath(path)
  return posixpath.dirname(path.rstrip('/')) if is_remote(path) else os.path.dirname(path)


def basename(path) -> str:
  path = os.fspath(path)
  return posixpath.basename(path.rstrip('/')) if is_remote(path) else os.path.basename(path)


def _fs(path: str):
  """The fsspec file system of a URL and the URL's path in it, listing cache dropped."""
  import fsspec
  try:
    fs, inner = fsspec.core.url_to_fs(path)
  except ImportError as e:
    from kdjax.errors import UserError
    raise UserError(f'{path} needs a file system package that is not installed ({e}); for '
                    "gs:// install gcsfs (pip install 'kdjax[gcs]')") from None
  fs.invalidate_cache()
  return fs, inner


def exists(path) -> bool:
  """Whether a file, an object, a directory or an object prefix is there."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.exists(path)
  fs, inner = _fs(path)
  return fs.exists(inner)


def isdir(path) -> bool:
  """A local directory, or a URL prefix with at least one object under it."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.path.isdir(path)
  fs, inner = _fs(path)
  return fs.isdir(inner)


def bucket_exists(path) -> bool:
  """Whether the bucket of a URL exists (True for a local path)."""
  path = os.fspath(path)
  if not is_remote(path):
    return True
  scheme, rest = path.split('://', 1)
  fs, inner = _fs(f'{scheme}://{rest.split("/", 1)[0]}')
  try:
    return fs.exists(inner)
  except (OSError, ValueError):
    return False


def makedirs(path) -> None:
  """``os.makedirs(path, exist_ok=True)``; nothing for a URL (object stores have no
  directories: a prefix exists once an object is written under it)."""
  path = os.fspath(path)
  if not is_remote(path):
    os.makedirs(path, exist_ok=True)


def listdir(path) -> list[str]:
  """The names directly under ``path`` (files and sub-directories), unsorted for local
  paths as ``os.listdir``; empty for a URL prefix with nothing under it."""
  path = os.fspath(path)
  if not is_remote(path):
    return os.listdir(path)
  fs, inner = _fs(path)
  try:
    entries = fs.ls(inner, detail=False)
  except FileNotFoundError:
    return []
  here = inner.rstrip('/')
  return [posixpath.basename(e.rstrip('/')) for e in entries if e.rstrip('/') != here]


def open(path, mode: str = 'r') -> IO:  # pylint: disable=redefined-builtin
  """A file object of ``path`` (``'r'``, ``'rb'``, ``'w'``, ``'wb'``; URLs: a write is
  uploaded as one object on close)."""
  path = os.fspath(path)
  if not is_remote(path):
    return builtins.open(path, mode)
  return as_path(path).open(mode)


def read_bytes(path) -> bytes:
  with open(path, 'rb') as f:
    return f.read()


def read_text(path) -> str:
  with open(path, 'r') as f:
    return f.read()


def write_bytes(path, data: bytes, *, fsync: bool = False) -> None:
  """Writes ``data`` so that a reader sees the old contents or the new, never a part:
  locally a temporary file (``fsync`` ed if asked) renamed over ``path``; a URL is one
  object upload."""
  path = os.fspath(path)
  if is_remote(path):
    as_path(path).write_bytes(data)
    return
  tmp = f'{path}.tmp-{os.getpid()}'
  with builtins.open(tmp, 'wb') as f:
    f.write(data)
    if fsync:
      f.flush()
      os.fsync(f.fileno())
  os.replace(tmp, path)


def write_text(path, text: str, *, fsync: bool = False) -> None:
  """:func:`write_bytes` of ``text`` in UTF-8."""
  write_bytes(path, text.encode('utf-8'), fsync=fsync)


def remove(path) -> None:
  """Deletes one file or object; a missing one is not an error."""
  path = os.fspath(path)
  if not is_remote(path):
    with contextlib.suppress(FileNotFoundError):
      os.remove(path)
    return
  fs, inner = _fs(path)
  with contextlib.suppress(FileNotFoundError):
    fs.rm_file(inner)


def rmtree(path) -> None:
  """Deletes a directory (or every object under a prefix); a missing one is not an error."""
  path = os.fspath(path)
  if not is_remote(path):
    shutil.rmtree(path, ignore_errors=True)
    return
  fs, inner = _fs(path)
  with contextlib.suppress(FileNotFoundError):
    fs.rm(inner, recursive=True)


def upload(local: str, path) -> None:
  """Copies the local file ``local`` to ``path`` (a URL or a local path)."""
  path = os.fspath(path)
  if not is_remote(path):
    shutil.copyfile(local, path)
    return
  with builtins.open(local, 'rb') as f:
    as_path(path).write_bytes(f.read())


def download(path, local: str) -> str:
  """Copies ``path`` (a URL or a local path) to the local file ``local``; returns it."""
  with open(path, 'rb') as src, builtins.open(local, 'wb') as dst:
    shutil.copyfileobj(src, dst, 1 << 22)
  return local


def savefig(fig, path, **kwargs) -> str:
  """``fig.savefig`` to ``path`` (a local path or a URL; the format from its suffix)."""
  path = os.fspath(path)
  if not is_remote(path):
    fig.savefig(path, **kwargs)
    return path
  buf = io.BytesIO()
  kwargs.setdefault('format', posixpath.splitext(path)[1].lstrip('.') or 'png')
  fig.savefig(buf, **kwargs)
  write_bytes(path, buf.getvalue())
  return path


@contextlib.contextmanager
def local_dir(path) -> Iterator[str]:
  """A local directory whose files end up in ``path``: ``path`` itself when local;
  for a URL, a temporary directory whose files are uploaded under ``path`` on exit
  (then deleted)."""
  path = os.fspath(path)
  if not is_remote(path):
    makedirs(path)
    yield path
    return
  tmp = tempfile.mkdtemp(prefix='kdjax-upload-')
  try:
    yield tmp
    sync_up(tmp, path)
  finally:
    shutil.rmtree(tmp, ignore_errors=True)


def sync_up(local: str, path) -> None:
  """Uploads every file under the local directory ``local`` to the same names under
  ``path`` (an object is rewritten whole; nothing is deleted)."""
  for base, _, files in os.walk(local):
    for name in files:
      rel = os.path.relpath(os.path.join(base, name), local)
      upload(os.path.join(base, name), join(path, *rel.split(os.sep)))
