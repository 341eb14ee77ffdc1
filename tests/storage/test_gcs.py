"""Runs whose workdir, checkpoints, metrics and teacher cache are in a bucket (``gs://``)
against a real GCS API emulator (``conftest.py``) end exactly where the same runs on
local disk end: train killed with SIGKILL and resumed, distill from a cache built into
the bucket, a federated run; and :mod:`kdjax.storage` itself."""

import json
import os
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from kdjax import storage
from kdjax import workdir as workdir_lib

pytestmark = pytest.mark.slow

# The session's teacher (tests/conftest.py: teacher.py:tiny, 100 steps, calls of 25 steps,
# checkpoints at 50 and 100) is the local run; the bucket run checkpoints every 25 steps
# (the calls are the same 25 steps, so the numbers are too) to be killed after one.
KILLED = ['--config.checkpoint_every=25']


def _main(args):
  from kdjax.cli import main
  with jax.default_matmul_precision('highest'):
    assert main(list(args)) == 0, args


def _rows(workdir, drop=('examples_per_sec',)):
  return [{k: v for k, v in r.items() if k not in drop}
          for r in (json.loads(line) for line in storage.read_text(
              storage.join(workdir, 'metrics.jsonl')).splitlines())]


def _summary(workdir):
  return json.loads(storage.read_text(storage.join(workdir, 'summary.json')))


@pytest.fixture(scope='module')
def trained(gcs, data_dir, teacher_dir, paths):
  """``(local, gs)``: the session's tiny teacher (local disk), and the same run in the
  bucket, killed with SIGKILL after a checkpoint, then resumed."""
  args = ['train', '--config', f"{paths['configs']}/mnist1d/teacher.py:tiny",
          f"--config.data.name={paths['small']}", f'--config.data.data_dir={data_dir}',
          '--config.num_steps=100', '--config.progress=false', *KILLED]
  gs = 'gs://kdjax-test/train'
  log = open(os.path.join(os.path.dirname(teacher_dir), 'gcs-killed.log'), 'w+')
  proc = subprocess.Popen([sys.executable, '-m', 'kdjax', *args, '--workdir', gs],
                          cwd=paths['root'], env={**os.environ, 'JAX_PLATFORMS': 'cpu'},
                          stdout=subprocess.DEVNULL, stderr=log)
  killed_at, deadline = None, time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    steps = workdir_lib.all_steps(gs)           # finished checkpoints, read from the bucket
    if steps:
      proc.send_signal(signal.SIGKILL)
      killed_at = steps[-1]
      break
    time.sleep(0.05)
  proc.wait()
  log.seek(0)
  assert killed_at is not None and killed_at < 100, (
      f'the run was not killed mid-way (exit {proc.returncode}): {log.read()[-2000:]}')
  log.close()
  _main([*args, '--workdir', gs])
  return teacher_dir, gs


def test_train_killed_and_resumed_in_a_bucket_equals_local(trained):
  local, gs = trained
  a, b = _summary(local), _summary(gs)
  assert b['resumed_from'] is not None and 25 <= b['resumed_from'] < 100
  for key in ('step', 'eval_accuracy', 'eval_loss', 'train_loss', 'train_accuracy'):
    assert a[key] == b[key], key
  assert _rows(local) == _rows(gs)                  # the killed run's extra rows dropped
  pa = workdir_lib.restore_subtree(local, 100, ('params', 'student'))
  pb = workdir_lib.restore_subtree(gs, 100, ('params', 'student'))
  jax.tree.map(np.testing.assert_array_equal, pa, pb)
  names = set(storage.listdir(gs))
  assert {'config.json', 'summary.json', 'metrics.jsonl', 'learning_curves.png',
          'checkpoints', 'tensorboard'} <= names, names
  assert storage.read_bytes(storage.join(gs, 'learning_curves.png'))[:4] == b'\x89PNG'
  assert storage.listdir(storage.join(gs, 'tensorboard'))
  assert workdir_lib.all_steps(gs) == [50, 75, 100]   # keep_checkpoints=3 of 25, 50, 75, 100


def test_distill_from_a_cache_built_in_the_bucket_equals_local(trained, data_dir, paths,
                                                              tmp_path):
  local_teacher, gs_teacher = trained
  common = ['--config', f"{paths['configs']}/mnist1d/kd.py:tiny",
            f"--config.data.name={paths['small']}", f'--config.data.data_dir={data_dir}',
            '--config.progress=false', '--config.num_steps=50', '--config.eval_every=50',
            '--config.checkpoint_every=50', '--config.log_every=25']
  out = {}
  for where, teacher, root in (('local', local_teacher, str(tmp_path)),
                               ('gs', gs_teacher, 'gs://kdjax-test/kd')):
    cache = storage.join(root, 'cache')
    _main(['cache', 'build', *common, f'--config.teacher.workdir={teacher}', '--workdir', cache,
           '--chunk-size', '1024'])
    run = storage.join(root, 'run')
    _main(['distill', *common, f'--config.teacher.workdir={teacher}',
           f'--config.teacher.cache={cache}', '--workdir', run])
    out[where] = cache, run
  (lc, lr), (gc, gr) = out['local'], out['gs']
  ml = json.loads(storage.read_text(storage.join(lc, 'manifest.json')))
  mg = json.loads(storage.read_text(storage.join(gc, 'manifest.json')))
  assert len(mg['chunks']) > 1 and mg['content_checksum'] == ml['content_checksum']
  assert storage.exists(storage.join(gc, 'chunks', sorted(mg['chunks'])[0] + '.done'))
  a, b = _summary(lr), _summary(gr)
  for key in ('step', 'eval_accuracy', 'eval_loss', 'train_loss'):
    assert a[key] == b[key], key
  assert _rows(lr) == _rows(gr)


def test_federated_run_in_a_bucket_equals_local(gcs, tmp_path):
  config = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'fed',
                        'mnist1d_fedavg.py') + ':tiny'
  base = ['fed', 'run', '--config', config, '--no-progress', '--config.num_rounds=3']
  local, gs = str(tmp_path / 'fed'), 'gs://kdjax-test/fed'
  _main([*base, '--workdir', local])
  _main([*base, '--workdir', gs])
  drop = ('rounds_per_sec', 'seconds', 'round_seconds')
  assert _rows(local, drop) == _rows(gs, drop)
  a, b = _summary(local), _summary(gs)
  for key in ('round', 'global_accuracy', 'personalized_accuracy_mean', 'partition'):
    assert a[key] == b[key], key
  for name in ('partition.png', 'accuracy.png', 'clients.png', 'config.json'):
    assert storage.exists(storage.join(gs, name)), name
  assert workdir_lib.all_steps(gs) == workdir_lib.all_steps(local)
  assert (storage.read_text(storage.join(gs, 'partition.txt'))
          == storage.read_text(os.path.join(local, 'partition.txt')))


def test_storage_calls_in_a_bucket(bucket):
  p = storage.join(bucket, 'a', 'b.json')
  assert storage.is_remote(p) and storage.abspath(bucket + '/') == bucket
  assert not storage.exists(p) and storage.listdir(bucket) == []
  storage.makedirs(storage.join(bucket, 'a'))
  storage.write_text(p, '{"x": 1}\n')
  storage.write_bytes(storage.join(bucket, 'a', 'c', 'd.bin'), b'\x00\x01')
  assert storage.read_text(p) == '{"x": 1}\n' and storage.exists(p)
  assert storage.isdir(storage.join(bucket, 'a')) and not storage.isdir(p)
  assert sorted(storage.listdir(storage.join(bucket, 'a'))) == ['b.json', 'c']
  assert storage.read_bytes(storage.join(bucket, 'a', 'c', 'd.bin')) == b'\x00\x01'
  storage.write_text(p, 'replaced')                  # an object is rewritten whole
  assert storage.read_text(p) == 'replaced'
  storage.remove(p)
  storage.remove(p)                                   # a missing object is no error
  assert storage.listdir(storage.join(bucket, 'a')) == ['c']
  storage.rmtree(storage.join(bucket, 'a'))
  assert not storage.exists(storage.join(bucket, 'a', 'c', 'd.bin'))
  assert storage.bucket_exists(bucket) and not storage.bucket_exists('gs://no-such-bucket/x')


def test_a_missing_bucket_is_a_user_error(gcs):
  from kdjax.errors import UserError
  with pytest.raises(UserError, match='bucket does not exist'):
    workdir_lib.check_creatable('gs://no-such-bucket/run')


def test_metrics_writer_in_a_bucket_keeps_rows_up_to_the_resume_step(bucket):
  from kdjax.engine.metrics import MetricsWriter
  from kdjax.engine.metrics import logged
  w = MetricsWriter(bucket)
  for step in (1, 2, 3):
    w.write(step, {'loss': float(step)}, split='train')
    assert len(_rows(bucket)) == step                 # every row is in the object at once
  w.close()
  assert storage.listdir(storage.join(bucket, 'tensorboard'))   # uploaded on close
  w = MetricsWriter(bucket, resume_step=2)
  w.write(3, {'loss': 30.0, 'bad': float('nan')}, split='train')
  w.close()
  assert _rows(bucket) == [{'step': 1, 'split': 'train', 'loss': 1.0},
                           {'step': 2, 'split': 'train', 'loss': 2.0},
                           {'step': 3, 'split': 'train', 'loss': 30.0, 'bad': None,
                            'nonfinite': ['bad']}]
  assert logged(storage.join(bucket, 'metrics.jsonl'), 'train', 3)['loss'] == 30.0


def test_chunk_reader_reads_a_bucket_cache_as_a_local_one(bucket, tmp_path):
  from kdjax.cache import store
  from kdjax.cache.read import ChunkReader
  z = np.arange(24, dtype=np.float32).reshape(12, 2)
  manifest = {'epochs': 1, 'chunk_size': 5, 'dataset': {'num_examples': 12},
              'arrays': {'teacher_topk_logits': {'dtype': 'float32', 'shape': [2]},
                         'teacher_logsumexp': {'dtype': 'float32', 'shape': []},
                         'teacher_topk_indices': {'dtype': 'int16', 'shape': [2]}}}
  rows = {}
  for root in (str(tmp_path), bucket):
    for i, (s, t) in enumerate(store.chunk_ranges(12, 5)):
      assert not store.chunk_exists(root, store.chunk_name(0, i))
      store.write_chunk(root, store.chunk_name(0, i), {
          'teacher_topk_logits': z[s:t], 'teacher_logsumexp': z[s:t, 0],
          'teacher_topk_indices': np.tile(np.int16([1, 0]), (t - s, 1))})
      assert store.chunk_exists(root, store.chunk_name(0, i))
    reader = ChunkReader(root, manifest, needs=())
    rows[root] = reader.rows(np.array([0, 0, 0]), np.array([11, 0, 7]))
    reader.close()
    got = store.read_chunk(root, store.chunk_name(0, 2), {'teacher_topk_logits': 'float32'})
    np.testing.assert_array_equal(got['teacher_topk_logits'], z[10:])
  jax.tree.map(np.testing.assert_array_equal, rows[str(tmp_path)], rows[bucket])
  np.testing.assert_array_equal(rows[bucket]['teacher_topk_logits'], z[[11, 0, 7]])
  for i in range(3):
    name = store.chunk_name(0, i)
    assert store.chunk_checksum(str(tmp_path), name) == store.chunk_checksum(bucket, name)
