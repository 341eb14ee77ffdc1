"""The teacher cache under the grain stream feed: the join, exact equality, refusals."""

import json
import os
import shutil

import numpy as np
import pytest

SMALL = 'mnist1d/small'   # as in conftest.py

STREAM_STEPS = 40          # 31 steps per epoch: the run crosses into epoch 1


def _errors(stderr):
  return [line for line in stderr.splitlines() if line.startswith('kdjax:')]


def _config(distill_args, *extra):
  """The distill config that ``kdjax distill DISTILL_ARGS EXTRA`` would run (in process)."""
  from kdjax.config import load_config, split_overrides
  rest, pairs = split_overrides([*distill_args, *extra])
  assert rest[0] == '--config'
  return load_config(rest[1], pairs)


def test_stream_batches_join_the_rows_the_live_teacher_computes(teacher_dir, cache_dir, data_dir):
  """Stream batches joined by (id, epoch mod E) through the three read paths.

  The chunk reader (stream feed, large caches), ``host_rows`` (stream feed, small
  caches) and ``gather_rows`` (device feed) must give the same bits, and those bits must
  be the live teacher's logits on the input augmented for epoch ``e mod E``.
  """
  import jax
  import jax.numpy as jnp
  from kdjax import data as kdata
  from kdjax.cache import read
  from kdjax.teacher import load_teacher
  from kdjax.parallel import make_mesh

  manifest = read.open_cache(cache_dir)
  assert manifest['epochs'] == 4 and manifest['k'] == manifest['num_classes'] == 10
  needs = {'teacher_logits'}
  columns = read.batch_columns(read.load_columns(cache_dir, manifest), needs)
  reader = read.ChunkReader(cache_dir, manifest, needs)
  mesh = make_mesh([('data', -1)])
  teacher = load_teacher(teacher_dir, mesh, [('.*', None)])
  augment = kdata.make_augment(manifest['augment'])

  @jax.jit
  def live_logits(variables, x, ids, epochs):
    params, state = variables
    out, _ = teacher.apply(params, state, augment(x, ids, epochs, seed=0), train=False)
    return out.logits

  it = kdata.make_train_iterator(SMALL, split='train', batch_size=128, seed=0, data_dir=data_dir,
                                 shard_index=0, shard_count=1)
  for shift in (0, 5):                 # epoch 0, and epoch 5 -> cached epoch 1
    batch = next(it)
    epochs = batch['epoch'] + shift
    want_epoch = epochs % 4
    chunk_rows = reader.rows(epochs, batch['id'])
    mem_rows = read.host_rows(columns, epochs, batch['id'])
    dev_rows = read.gather_rows(jax.device_put(columns), int(epochs[0]), jnp.asarray(batch['id']))
    for key in mem_rows:
      np.testing.assert_array_equal(chunk_rows[key], mem_rows[key])
      np.testing.assert_array_equal(np.asarray(dev_rows[key]), mem_rows[key])
    live = np.asarray(live_logits(teacher.variables, batch['x'], batch['id'], want_epoch))
    np.testing.assert_array_equal(chunk_rows['teacher_logits'], live)
    if shift:   # the augmentation really depends on the epoch: the true epoch 5 differs
      other = np.asarray(live_logits(teacher.variables, batch['x'], batch['id'], epochs))
      assert not np.array_equal(other, live)
  reader.close()


def test_stream_feed_from_cache_equals_live_teacher(tmp_path, teacher_dir, cache_dir,
                                                    distill_args, capsys):
  """float32, k = all classes: the stream-fed run from the cache ends bit-equal to the live one.

  Both runs draw the same grain batches (same seed); the cached logits are the live
  teacher's logits bit for bit (previous test), so the dense ``kd`` loss sees the same
  numbers. Once with the cache loaded whole, once read per batch from its chunk files
  (``auto`` with a 1-byte threshold).
  """
  from kdjax.distill.train import train_and_evaluate
  stream = [*distill_args, '--config.data.feed=stream', f'--config.num_steps={STREAM_STEPS}']
  a = train_and_evaluate(_config(stream, f'--config.teacher.workdir={teacher_dir}'),
                         str(tmp_path / 'live'))
  capsys.readouterr()
  b = train_and_evaluate(_config(stream, f'--config.teacher.cache={cache_dir}'),
                         str(tmp_path / 'memory'))
  assert 'loaded whole' in capsys.readouterr().out
  c = train_and_evaluate(_config(stream, f'--config.teacher.cache={cache_dir}',
                                 '--config.teacher.cache_memory_max_bytes=1'),
                         str(tmp_path / 'chunks'))
  assert 'rows read per batch from its chunk files' in capsys.readouterr().out
  assert a['feed'] == b['feed'] == c['feed'] == 'stream'
  assert a['step'] == b['step'] == c['step'] == STREAM_STEPS
  assert a['train_loss'] == b['train_loss'] == c['train_loss']
  assert a['eval_accuracy'] == b['eval_accuracy'] == c['eval_accuracy']
  assert a['teacher_fingerprint'] is not None and b['teacher_fingerprint'] is None


def test_stream_fingerprint_equals_the_whole_split_fingerprint(teacher_dir, data_dir):
  from kdjax import data as kdata
  from kdjax.cache import fingerprint as fp
  whole = fp.dataset_fingerprint(SMALL, 'train', kdata.load_arrays(SMALL, 'train',
                                                                    data_dir=data_dir))
  for piece in (1000, 4096, 777):
    assert fp.stream_dataset_fingerprint(SMALL, 'train', data_dir=data_dir,
                                            read_chunk=piece) == whole


@pytest.fixture
def other_data_cache(tmp_path, cache_dir):
  """A copy of the cache whose manifest says it was built from other arrays."""
  other = str(tmp_path / 'other')
  shutil.copytree(cache_dir, other)
  path = os.path.join(other, 'manifest.json')
  manifest = json.load(open(path))
  manifest['dataset']['sha256'] = '0' * 64           # same name and split, other arrays
  json.dump(manifest, open(path, 'w'))
  return other


def test_cache_of_other_data_is_refused_by_the_stream_feed(tmp_path, other_data_cache,
                                                           distill_args, kdjax_main):
  out = kdjax_main(['distill', *distill_args, '--config.data.feed=stream', '--workdir',
                    str(tmp_path / 'w'), f'--config.teacher.cache={other_data_cache}'],
                   check=False)
  assert out.returncode == 2, out.stderr
  lines = _errors(out.stderr)
  assert len(lines) == 1 and 'other data' in lines[0], out.stderr


def test_cache_of_other_data_is_refused_by_the_device_feed(tmp_path, other_data_cache,
                                                           distill_args):
  from kdjax.distill.train import train_and_evaluate
  from kdjax.errors import UserError
  config = _config(distill_args, '--config.data.feed=device',
                   f'--config.teacher.cache={other_data_cache}')
  with pytest.raises(UserError, match='other data'):
    train_and_evaluate(config, str(tmp_path / 'w'))


@pytest.mark.parametrize('override,message', [
    ("--config.data.augment={'kind': 'signal', 'shift': 3, 'noise': 0.05}", 'augmentation'),
    ('--config.data.train_split=test', 'covers'),
    ('--config.data.name=mnist1d', 'covers'),
])
def test_stream_feed_refuses_a_cache_of_another_split_or_augmentation(tmp_path, cache_dir,
                                                                     distill_args, override,
                                                                     message):
  from kdjax.distill.train import train_and_evaluate
  from kdjax.errors import UserError
  config = _config(distill_args, '--config.data.feed=stream', override,
                   f'--config.teacher.cache={cache_dir}')
  with pytest.raises(UserError, match=message) as e:
    train_and_evaluate(config, str(tmp_path / 'w'))
  assert '\n' not in str(e.value)


def test_chunk_reader_with_the_device_feed_is_refused(tmp_path, cache_dir, distill_args):
  from kdjax.distill.train import train_and_evaluate
  from kdjax.errors import UserError
  config = _config(distill_args, '--config.data.feed=device', f'--config.teacher.cache={cache_dir}',
                   '--config.teacher.cache_reader=chunks')
  with pytest.raises(UserError, match='stream feed'):
    train_and_evaluate(config, str(tmp_path / 'w'))
