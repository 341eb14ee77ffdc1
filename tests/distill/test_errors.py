"""Mistakes a user can make: one line on stderr, exit code 2, no traceback, nothing overwritten."""

import hashlib
import json
import os

import pytest


def _hash_tree(path):
  h = hashlib.sha256()
  for root, dirs, files in sorted(os.walk(path)):
    dirs.sort()
    for f in sorted(files):
      p = os.path.join(root, f)
      h.update(p.encode())
      h.update(open(p, 'rb').read())
  return h.hexdigest()


def _assert_user_error(out, *fragments):
  assert out.returncode == 2, (out.returncode, out.stderr[-2000:])
  assert 'Traceback' not in out.stderr, out.stderr[-2000:]
  last = out.stderr.strip().splitlines()[-1]
  assert last.startswith('kdjax: error: '), last
  for frag in fragments:
    assert frag in last, (frag, last)
  return last


@pytest.fixture
def base(paths, data_dir):
  return ['--config.progress=false', f'--config.data.data_dir={data_dir}',
          f"--config.data.name={paths['small']}"]


def test_unknown_key(cli, paths, base, tmp_path, kdjax_main):
  out = kdjax_main(['train', '--config', f"{paths['configs']}/mnist1d/teacher.py:tiny", '--workdir',
             str(tmp_path / 'w'), '--config.num_stepz=3', *base], check=False)
  _assert_user_error(out, "unknown config key 'num_stepz'")
  assert not os.path.exists(tmp_path / 'w')


def test_wrong_type(cli, paths, base, tmp_path, kdjax_main):
  out = kdjax_main(['train', '--config', f"{paths['configs']}/mnist1d/teacher.py:tiny", '--workdir',
             str(tmp_path / 'w'), '--config.num_steps=lots', *base], check=False)
  _assert_user_error(out, 'num_steps takes a int')


def test_missing_config_file(cli, tmp_path, kdjax_main):
  out = kdjax_main(['train', '--config', str(tmp_path / 'nope.py'), '--workdir', str(tmp_path / 'w')],
            check=False)
  _assert_user_error(out, 'not found')


def test_unknown_dataset(cli, paths, data_dir, tmp_path, kdjax_main):
  out = kdjax_main(['train', '--config', f"{paths['configs']}/mnist1d/teacher.py:tiny", '--workdir',
             str(tmp_path / 'w'), '--config.data.name=no_such_dataset',
             f'--config.data.data_dir={data_dir}'], check=False)
  _assert_user_error(out, 'no_such_dataset')
  assert not os.path.exists(tmp_path / 'w')


def test_teacher_without_checkpoint(cli, paths, base, tmp_path, kdjax_main):
  empty = tmp_path / 'empty_teacher'
  empty.mkdir()
  out = kdjax_main(['distill', '--config', f"{paths['configs']}/mnist1d/kd.py:tiny", '--workdir',
             str(tmp_path / 'w'), f'--config.teacher.workdir={empty}', *base], check=False)
  _assert_user_error(out, 'has no checkpoint', 'train the teacher first')


def test_distill_without_teacher(cli, paths, base, tmp_path, kdjax_main):
  out = kdjax_main(['distill', '--config', f"{paths['configs']}/mnist1d/kd.py:tiny", '--workdir',
             str(tmp_path / 'w'), *base], check=False)
  _assert_user_error(out, 'needs a teacher', '--config.teacher.workdir')


def test_workdir_of_another_config_is_refused(cli, paths, base, teacher_dir, kdjax_main):
  before = _hash_tree(teacher_dir)
  out = kdjax_main(['train', '--config', f"{paths['configs']}/mnist1d/student_baseline.py:tiny",
             '--workdir', teacher_dir, *base], check=False)
  _assert_user_error(out, 'holds results of another config', 'model.name')
  assert _hash_tree(teacher_dir) == before


def _truncate_array_files(checkpoint):
  damaged = 0
  for root, _, files in os.walk(checkpoint):
    for f in files:
      if os.path.basename(root) == 'd':
        with open(os.path.join(root, f), 'r+b') as fh:
          fh.truncate(16)
        damaged += 1
  assert damaged


def test_damaged_checkpoint_is_refused_and_an_earlier_one_resumes(cli, paths, base, teacher_dir,
                                                                   tmp_path):
  import shutil
  wd = str(tmp_path / 'copy')
  shutil.copytree(teacher_dir, wd)
  _truncate_array_files(os.path.join(wd, 'checkpoints', '100'))
  args = ['train', '--config', f"{paths['configs']}/mnist1d/teacher.py:tiny", '--workdir', wd,
          '--config.num_steps=150', *base]
  before = _hash_tree(os.path.join(wd, 'checkpoints'))
  metrics = open(os.path.join(wd, 'metrics.jsonl')).read()
  out = cli(args, check=False)
  _assert_user_error(out, 'cannot read the checkpoint', os.path.join('checkpoints', '100'),
                     'delete that directory')
  assert len(out.stderr.strip().splitlines()) == 1, out.stderr[-2000:]
  assert _hash_tree(os.path.join(wd, 'checkpoints')) == before
  assert open(os.path.join(wd, 'metrics.jsonl')).read() == metrics
  # As the message says: without the damaged one, the run resumes from step 50.
  shutil.rmtree(os.path.join(wd, 'checkpoints', '100'))
  result = json.loads(cli(args).stdout.strip().splitlines()[-1])
  assert result['step'] == 150


def test_unknown_loss(cli, paths, base, tmp_path, kdjax_main):
  out = kdjax_main(['train', '--config', f"{paths['configs']}/mnist1d/teacher.py:tiny", '--workdir',
             str(tmp_path / 'w'), "--config.loss.terms={'kdd': {'weight': 1.0}}", *base], check=False)
  _assert_user_error(out, "unknown loss 'kdd'")


def test_class_count_mismatch(monkeypatch, paths, data_dir, teacher_dir, tmp_path):
  """A student data set with another label space than the teacher's is refused."""
  from kdjax.config import load_config
  from kdjax.distill.train import train_and_evaluate
  from kdjax.errors import UserError
  import sys
  import types
  setup_lib = sys.modules['kdjax.engine.setup']
  real = setup_lib.kdata

  def five_classes(name, *, data_dir=None):
    return real.dataset_spec(name, data_dir=data_dir)._replace(num_classes=5)

  # Only the student's view of the data set changes; the teacher keeps its own.
  fake = types.SimpleNamespace(**{k: getattr(real, k) for k in dir(real) if not k.startswith('__')})
  fake.dataset_spec = five_classes
  monkeypatch.setattr(setup_lib, 'kdata', fake)
  config = load_config(f"{paths['configs']}/mnist1d/kd.py:tiny", [
      ('teacher.workdir', teacher_dir), ('data.name', paths['small']), ('data.data_dir', data_dir)])
  with pytest.raises(UserError, match='the teacher predicts 10 classes but .* has 5'):
    train_and_evaluate(config, str(tmp_path / 'w'))
  assert not os.path.exists(tmp_path / 'w')


def test_quiet_orphaned_reads_drops_only_the_closed_loop_noise(monkeypatch):
  import sys
  import types
  from kdjax.errors import quiet_orphaned_reads
  seen = []
  monkeypatch.setattr(sys, 'unraisablehook', lambda u: seen.append(str(u.exc_value)))
  quiet_orphaned_reads()
  installed = sys.unraisablehook
  quiet_orphaned_reads()  # a second restore wraps nothing more
  assert sys.unraisablehook is installed
  for exc in (RuntimeError('Event loop is closed'), RuntimeError('other'), ValueError('x')):
    sys.unraisablehook(types.SimpleNamespace(exc_value=exc))
  assert seen == ['other', 'x']
