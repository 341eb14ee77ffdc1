"""The teacher cache end to end: build -> distill equals the live teacher; refusals; CLI tools."""

import json
import os
import shutil

import pytest


SPARSE_TERMS = "{'kd': {'loss': 'sparse_kd', 'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1}}"


def _errors(stderr):
  """kdjax's own error lines (library warnings such as absl's are not ours)."""
  return [line for line in stderr.splitlines() if line.startswith('kdjax:')]


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def test_distill_from_cache_equals_live_teacher(tmp_path, teacher_dir, cache_dir, distill_args, cli, kdjax_main):
  # With augmentation on, 4 training epochs and a 4-epoch float32 cache with k = classes,
  # the cached run must end bit-for-bit where the live run ends.
  live = str(tmp_path / 'live')
  kdjax_main(['distill', *distill_args, '--workdir', live, f'--config.teacher.workdir={teacher_dir}'])
  sparse = str(tmp_path / 'sparse')
  kdjax_main(['distill', *distill_args, '--workdir', sparse, f'--config.teacher.cache={cache_dir}',
           f'--config.teacher.workdir={teacher_dir}', f'--config.loss.terms={SPARSE_TERMS}'])
  dense = str(tmp_path / 'dense')   # the dense kd loss fed from the k = classes cache
  kdjax_main(['distill', *distill_args, '--workdir', dense, f'--config.teacher.cache={cache_dir}'])
  a, b, c = _summary(live), _summary(sparse), _summary(dense)
  assert a['step'] == b['step'] == c['step'] == 100
  # The cached teacher logits are bit-identical to the live ones: the dense loss fed from
  # the cache ends exactly where the live run ends.
  assert a['eval_accuracy'] == c['eval_accuracy'] and a['train_loss'] == c['train_loss']
  # sparse_kd at k = classes is the dense kd up to float32 rounding of its own arithmetic
  # (log-sum-exp vs log-softmax), so it may differ in the last bits of the loss.
  assert a['eval_accuracy'] == b['eval_accuracy']
  assert b['train_loss'] == pytest.approx(a['train_loss'], rel=1e-6)
  assert a['teacher_fingerprint'] is not None and b['teacher_fingerprint'] is None  # no live teacher


def test_cache_from_another_teacher_is_refused(tmp_path, other_teacher_dir, cache_dir, distill_args, cli, kdjax_main):
  out = kdjax_main(['distill', *distill_args, '--workdir', str(tmp_path / 'w'),
                 f'--config.teacher.cache={cache_dir}', f'--config.teacher.workdir={other_teacher_dir}'],
                check=False)
  assert out.returncode == 2
  lines = _errors(out.stderr)
  assert len(lines) == 1 and 'another teacher' in lines[0], out.stderr


def test_stale_seed_is_refused_by_the_cli(tmp_path, cache_dir, distill_args, cli, kdjax_main):
  out = kdjax_main(['distill', *distill_args, '--workdir', str(tmp_path / 'w'), '--config.seed=1',
                 f'--config.teacher.cache={cache_dir}'], check=False)
  assert out.returncode == 2
  lines = _errors(out.stderr)
  assert len(lines) == 1 and 'seed' in lines[0], out.stderr


def test_inspect_and_verify(cache_dir, cli, kdjax_main):
  info = json.loads(kdjax_main(['cache', 'inspect', '--json', cache_dir]).stdout)
  assert info['entries'] == 4 * 4000 and info['coverage'] == 1.0 and info['k'] == 10
  assert info['bytes_per_example'] == 10 * 4 + 10 * 2 + 4   # f32 logits, int16 indices, f32 lse
  assert info['topk_mass']['min'] == pytest.approx(1.0, abs=1e-5)    # k = all classes
  manifest = json.load(open(os.path.join(cache_dir, 'manifest.json')))
  assert info['content_checksum'] == manifest['content_checksum']
  assert kdjax_main(['cache', 'verify', cache_dir]).returncode == 0


def test_verify_names_a_corrupt_chunk(tmp_path, cache_dir, cli, kdjax_main):
  bad = str(tmp_path / 'bad')
  shutil.copytree(cache_dir, bad)
  victim = os.path.join(bad, 'chunks', 'e0002-c00001', 'teacher_logsumexp.npy')
  data = bytearray(open(victim, 'rb').read())
  data[-3] ^= 0xFF
  open(victim, 'wb').write(bytes(data))
  out = kdjax_main(['cache', 'verify', bad], check=False)
  assert out.returncode != 0
  assert 'e0002-c00001' in out.stderr and 'corrupt' in out.stderr
  assert 'e0002-c00000' not in out.stderr


def test_killed_build_resumes_to_the_same_cache(tmp_path, teacher_dir, distill_args, cli, root, kdjax_main):
  import signal
  import subprocess
  import sys
  import time
  args = ['cache', 'build', *distill_args, f'--config.teacher.workdir={teacher_dir}',
          '--epochs', '2', '--chunk-size', '256']
  ref = str(tmp_path / 'ref')
  kdjax_main([*args, '--workdir', ref])
  killed = str(tmp_path / 'killed')
  env = {**os.environ, 'JAX_PLATFORMS': 'cpu', 'KDJAX_CACHE_CHUNK_DELAY': '0.3'}
  proc = subprocess.Popen([sys.executable, '-m', 'kdjax', *args, '--workdir', killed], cwd=root,
                          env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
  chunks = os.path.join(killed, 'chunks')
  deadline = time.time() + 120
  while time.time() < deadline:
    done = [c for c in os.listdir(chunks) if not c.startswith('.')] if os.path.isdir(chunks) else []
    if len(done) >= 3:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  done = [c for c in os.listdir(chunks) if not c.startswith('.')]
  assert 3 <= len(done) < 32 and not os.path.exists(os.path.join(killed, 'manifest.json'))
  out = cli(['cache', 'inspect', killed], check=False)   # unfinished: refused, one line
  assert out.returncode == 2 and 'unfinished' in out.stderr
  kdjax_main([*args, '--workdir', killed])
  assert kdjax_main(['cache', 'verify', killed]).returncode == 0
  a = open(os.path.join(ref, 'manifest.json'), 'rb').read()
  b = open(os.path.join(killed, 'manifest.json'), 'rb').read()
  assert json.loads(a)['content_checksum'] == json.loads(b)['content_checksum']
  assert a == b
  assert not [c for c in os.listdir(chunks) if c.startswith('.')]   # no temporaries left
