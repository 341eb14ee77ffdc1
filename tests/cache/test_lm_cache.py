"""The language-model teacher cache: per-token top-k rows in a codec, and teacher generations.

One tiny teacher LM (``tests/conftest.py``), three caches built once per module: float32
rows of the whole vocabulary, ``int4+ef`` rows of the top 16, and sampled continuations
of the prompts (sequence-level KD).
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import data as kdata
from kdjax.cache import build
from kdjax.cache import codec as codec_lib
from kdjax.cache import read
from kdjax.cache import sequences
from kdjax.config import load_config
from kdjax.config import split_overrides
from kdjax.errors import UserError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
CACHED = f'{ROOT}/configs/lm/cached_kd.py:tiny'
SEQ = f'{ROOT}/configs/lm/seq_kd.py:tiny'
TOKEN_KD = f'{ROOT}/configs/lm/token_kd.py:tiny'
LM = 'shakespeare_lm/tiny'
VOCAB, SEQ_LEN, PROMPT_LEN, BATCH = 300, 32, 16, 8
STEPS = ['--config.num_steps=20']            # two calls of 10 steps, one evaluation
FULL = ['--config.cache.k=300', '--config.cache.codec=f32+i32']
LOSSY = ['--config.cache.k=16', '--config.cache.codec=int4+ef']
SAMPLED = ['--config.cache.generate.temperature=1.0', '--config.cache.generate.seed=3']


def _args(spec, data_dir, teacher_dir, *extra):
  return ['--config', spec, f'--config.data.data_dir={data_dir}',
          f'--config.teacher.workdir={teacher_dir}', '--config.progress=false', *extra]


def _config(*args):
  rest, pairs = split_overrides(list(args))
  assert rest[0] == '--config'
  return load_config(rest[1], pairs)


def _errors(stderr):
  return [line for line in stderr.splitlines() if line.startswith('kdjax:')]


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def _first_batches(config, cache, n=2):
  """The device feed's first ``n`` ready batches of a run reading ``cache`` (numpy)."""
  from kdjax.engine import setup
  run = setup(config, cache=cache, log=lambda _: None)
  feed = run.feed
  batches = jax.jit(lambda inputs: [feed.batches(inputs, n)(i) for i in range(n)])(
      feed.inputs(0, n))
  return run, jax.tree.map(np.asarray, batches)


@pytest.fixture(scope='module', autouse=True)
def _highest_precision():
  """Numbers here are compared across programs (build, live teacher, sampler): no TF32."""
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture(scope='module')
def full_cache(tmp_path_factory, lm_teacher_dir, data_dir):
  """float32 logits + int32 indices of all 300 classes."""
  path = str(tmp_path_factory.mktemp('lm') / 'full')
  build.build_cache(_config(*_args(CACHED, data_dir, lm_teacher_dir, *FULL)), path)
  return path


@pytest.fixture(scope='module')
def lossy_cache(tmp_path_factory, lm_teacher_dir, data_dir):
  """int4 gaps + Elias-Fano indices of the top 16, in chunks of 64 rows."""
  path = str(tmp_path_factory.mktemp('lm') / 'lossy')
  build.build_cache(_config(*_args(CACHED, data_dir, lm_teacher_dir, *LOSSY)), path,
                    chunk_size=64)
  return path


@pytest.fixture(scope='module')
def seq_cache(tmp_path_factory, lm_teacher_dir, data_dir):
  """Sampled continuations (temperature 1, seed 3) of prompts_train, 16 prompts a chunk."""
  path = str(tmp_path_factory.mktemp('lm') / 'seq')
  build.build_cache(_config(*_args(SEQ, data_dir, lm_teacher_dir, *SAMPLED)), path, chunk_size=16)
  return path


def test_full_vocabulary_f32_rows_are_the_live_teachers_on_the_same_batches(
    full_cache, lm_teacher_dir, data_dir):
  from kdjax import teacher as teacher_lib
  from kdjax.cache import open_for_run
  from kdjax.losses.sparse import sparse_kd
  from kdjax.models import model_kwargs
  config = _config(*_args(CACHED, data_dir, lm_teacher_dir, *FULL,
                          f'--config.teacher.cache={full_cache}'))
  run, batches = _first_batches(config, open_for_run(config))
  teacher = teacher_lib.load_teacher(lm_teacher_dir, run.mesh)
  live_logits = jax.jit(lambda v, b: teacher_lib.outputs(
      teacher.apply, v, b['x'], ('teacher_logits',), **model_kwargs(b))['teacher_logits'])
  rng = np.random.default_rng(0)
  for batch in batches:
    m = batch['mask']
    assert m.sum() > 100
    live = np.asarray(live_logits(teacher.variables, batch), np.float32)
    np.testing.assert_array_equal(batch['teacher_topk_indices'][m],
                                  np.broadcast_to(np.arange(VOCAB), (m.sum(), VOCAB)))
    np.testing.assert_allclose(batch['teacher_topk_logits'][m], live[m], rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(batch['teacher_logsumexp'][m],
                               jax.nn.logsumexp(live, -1)[m], rtol=1e-6, atol=1e-6)
    # The sparse KD per token from the cached rows = from the live teacher's top-300.
    student = rng.normal(0, 2, live.shape).astype(np.float32)
    values, idx = jax.lax.top_k(live, VOCAB)
    want = sparse_kd(student, values, idx, missing_mass='uniform',
                     teacher_logsumexp=jax.nn.logsumexp(live, -1), where=m)
    got = sparse_kd(student, batch['teacher_topk_logits'], batch['teacher_topk_indices'],
                    missing_mass='uniform', teacher_logsumexp=batch['teacher_logsumexp'], where=m)
    np.testing.assert_allclose(np.asarray(got)[m], np.asarray(want)[m], rtol=1e-5, atol=1e-6)
    assert np.all(np.asarray(got)[~m] == 0)


def test_full_vocabulary_cached_run_ends_where_the_live_run_ends(
    full_cache, lm_teacher_dir, data_dir, tmp_path, kdjax_main):
  # sparse_kd ('uniform') at k = vocabulary from the cache vs the dense kd of the live
  # teacher, same weights, seed and batches (bit-equal on XLA:CPU; the tolerance is for
  # other backends, where the teacher's forward in two programs may round differently).
  cached = str(tmp_path / 'cached')
  kdjax_main(['distill', *_args(CACHED, data_dir, lm_teacher_dir, *FULL, *STEPS,
                                f'--config.teacher.cache={full_cache}'), '--workdir', cached])
  live = str(tmp_path / 'live')
  kdjax_main(['distill', *_args(TOKEN_KD, data_dir, lm_teacher_dir, *STEPS), '--workdir', live])
  a, b = _summary(cached), _summary(live)
  assert a['step'] == b['step'] == 20 and a['feed'] == b['feed'] == 'device'
  assert a['teacher_fingerprint'] is None and b['teacher_fingerprint'] is not None
  np.testing.assert_allclose(a['train_loss'], b['train_loss'], rtol=2e-5)
  np.testing.assert_allclose(a['eval_loss'], b['eval_loss'], rtol=2e-5)


def test_lossy_rows_decode_the_stored_bytes_in_both_feeds(lossy_cache, lm_teacher_dir, data_dir):
  from kdjax.cache import open_for_run
  config = _config(*_args(CACHED, data_dir, lm_teacher_dir, *LOSSY,
                          f'--config.teacher.cache={lossy_cache}'))
  cache = open_for_run(config)
  manifest = cache.manifest
  assert manifest['kind'] == 'tokens' and manifest['arrays']['values']['shape'] == [SEQ_LEN, 8]
  cols = read.load_columns(lossy_cache, manifest)
  arrays = kdata.load_arrays(LM, 'train', data_dir=data_dir)
  mask = arrays['mask']
  for key in codec_lib.PARTS:     # padding positions: zero bytes; target positions: a row
    assert cols[key].shape == (1, len(mask), SEQ_LEN, codec_lib.layout('int4+ef', 16, VOCAB)[key])
    assert not cols[key][0][~mask].any()
  assert np.all(np.any(np.concatenate([cols[k][0] for k in codec_lib.PARTS], -1) != 0, -1)[mask])
  _, batches = _first_batches(config, cache, n=1)
  batch = batches[0]
  ids = batch['id']
  z, idx, lse = codec_lib.decode({key: cols[key][0, ids] for key in codec_lib.PARTS},
                                 codec='int4+ef', k=16, vocab_size=VOCAB)
  want = {'teacher_topk_logits': z, 'teacher_topk_indices': idx, 'teacher_logsumexp': lse}
  for reader in ('device', 'memory', 'chunks'):
    got = batch if reader == 'device' else cache.host_rows(reader, set())(np.zeros_like(ids), ids)
    for key, value in want.items():
      np.testing.assert_array_equal(np.asarray(got[key]), np.asarray(value), err_msg=reader)


def test_a_lossy_cache_trains_the_student(lossy_cache, lm_teacher_dir, data_dir, tmp_path,
                                          kdjax_main):
  workdir = str(tmp_path / 's')
  kdjax_main(['distill', *_args(CACHED, data_dir, lm_teacher_dir, *LOSSY, *STEPS,
                                f'--config.teacher.cache={lossy_cache}'), '--workdir', workdir])
  s = _summary(workdir)
  assert s['step'] == 20 and np.isfinite(s['train_loss'])
  assert s['eval_perplexity'] < 0.9 * VOCAB           # below a uniform guess after 20 steps


def test_inspect_prints_the_codecs_bytes_per_token(lossy_cache, kdjax_main):
  info = json.loads(kdjax_main(['cache', 'inspect', '--json', lossy_cache]).stdout)
  want = codec_lib.bytes_per_token('int4+ef', 16, VOCAB)
  assert info['kind'] == 'tokens' and info['bytes_per_token'] == want
  assert info['bytes_per_example'] == SEQ_LEN * want and info['codec'] == 'int4+ef'
  assert 0 < info['topk_mass']['min'] <= info['topk_mass']['mean'] < 1
  text = kdjax_main(['cache', 'inspect', lossy_cache]).stdout
  assert f'bytes_per_token    {want}' in text.splitlines()
  assert kdjax_main(['cache', 'verify', lossy_cache]).returncode == 0


def test_killed_build_resumes_to_the_same_bytes(lossy_cache, lm_teacher_dir, data_dir, tmp_path,
                                                cli, kdjax_main):
  killed = str(tmp_path / 'killed')
  args = ['cache', 'build', *_args(CACHED, data_dir, lm_teacher_dir, *LOSSY),
          '--chunk-size', '64', '--cache-dir', killed]
  # The platform of this process (tests/conftest.py), the precision of this module.
  env = {**os.environ, 'KDJAX_CACHE_CHUNK_DELAY': '0.3', 'JAX_DEFAULT_MATMUL_PRECISION': 'highest'}
  proc = subprocess.Popen([sys.executable, '-m', 'kdjax', *args], cwd=ROOT, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
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
  assert 3 <= len(done) < 30 and not os.path.exists(os.path.join(killed, 'manifest.json'))
  out = kdjax_main(['cache', 'inspect', killed], check=False)   # unfinished: refused
  assert out.returncode == 2 and len(_errors(out.stderr)) == 1 and 'unfinished' in out.stderr
  kdjax_main(args)
  ref = open(os.path.join(lossy_cache, 'manifest.json'), 'rb').read()
  assert open(os.path.join(killed, 'manifest.json'), 'rb').read() == ref
  assert len(json.loads(ref)['chunks']) == 30
  assert not [c for c in os.listdir(chunks) if c.startswith('.')]
  assert kdjax_main(['cache', 'verify', killed]).returncode == 0


def test_stale_corrupt_or_mismatched_caches_are_refused(
    full_cache, lossy_cache, seq_cache, lm_teacher_dir, data_dir, tmp_path, kdjax_main):
  # Another teacher: the same workdir one checkpoint earlier (other parameters).
  other = str(tmp_path / 'other_teacher')
  shutil.copytree(lm_teacher_dir, other)
  steps = sorted(int(s) for s in os.listdir(os.path.join(other, 'checkpoints')) if s.isdigit())
  shutil.rmtree(os.path.join(other, 'checkpoints', str(steps[-1])))
  # Other data under the same name: a manifest whose split hashes differently.
  tampered = str(tmp_path / 'tampered')
  shutil.copytree(lossy_cache, tampered)
  manifest = json.load(open(os.path.join(tampered, 'manifest.json')))
  manifest['dataset']['sha256'] = '0' * 64
  json.dump(manifest, open(os.path.join(tampered, 'manifest.json'), 'w'))
  # A corrupt chunk (one byte flipped).
  corrupt = str(tmp_path / 'corrupt')
  shutil.copytree(lossy_cache, corrupt)
  victim = os.path.join(corrupt, 'chunks', 'e0000-c00007', 'values.npy')
  data = bytearray(open(victim, 'rb').read())
  data[-5] ^= 0xFF
  open(victim, 'wb').write(bytes(data))
  sparse = "--config.loss.terms={'kd': {'loss': 'sparse_kd', 'weight': 1.0}}"
  cases = [
      (lossy_cache, other, LOSSY, 'another teacher'),
      (lossy_cache, lm_teacher_dir, [*LOSSY, '--config.data.train_split=test'], 'but the run'),
      (tampered, lm_teacher_dir, LOSSY, 'other data'),
      (corrupt, lm_teacher_dir, LOSSY, 'chunk e0000-c00007 is corrupt'),
      (lossy_cache, lm_teacher_dir, [*LOSSY, "--config.loss.terms={'kd': {'weight': 1.0}}"],
       'shifted by the top-1'),
      (lossy_cache, lm_teacher_dir, [], 'k 16 (config: 32)'),
      (seq_cache, lm_teacher_dir, [*LOSSY, '--config.data.train_split=prompts_train', sparse],
       'generated sequences'),
      (full_cache, lm_teacher_dir, [*FULL, '--config.cache.mode=generate'], "mode 'topk'"),
  ]
  for i, (cache_dir, teacher_dir, extra, words) in enumerate(cases):
    out = kdjax_main(['distill', *_args(CACHED, data_dir, teacher_dir, *extra,
                                        f'--config.teacher.cache={cache_dir}'),
                      '--workdir', str(tmp_path / f'w{i}')], check=False)
    lines = _errors(out.stderr)
    assert out.returncode == 2 and len(lines) == 1 and words in lines[0], (words, out.stderr)
    assert not os.path.exists(str(tmp_path / f'w{i}'))


def test_generated_continuations_are_those_decoding_sample_draws(seq_cache, lm_teacher_dir,
                                                                data_dir):
  from kdjax import teacher as teacher_lib
  from kdjax.models import decoding
  from kdjax.models import init_cache
  from kdjax.parallel import make_mesh
  manifest = read.open_cache(seq_cache)
  assert manifest['kind'] == 'sequences' and manifest['generate']['temperature'] == 1.0
  cols = read.load_columns(seq_cache, manifest)
  arrays = kdata.load_arrays(LM, 'prompts_train', data_dir=data_dir)
  np.testing.assert_array_equal(cols['prompt_ids'][0], arrays['prompt_ids'])
  teacher = teacher_lib.load_teacher(lm_teacher_dir, make_mesh([('data', -1)]))
  dconfig = build.decoder_config(teacher, SEQ_LEN)
  params, state = teacher.variables
  draw = jax.jit(lambda p, s, ids, mask, key: decoding.sample(
      teacher.apply, p, s, ids, mask, key, init_cache=lambda b, n: init_cache(dconfig, b, n),
      max_new_tokens=SEQ_LEN - PROMPT_LEN, temperature=1.0, stop_tokens=(1,), pad_id=0))
  for j in (0, 5, len(arrays['id']) // BATCH):       # the last batch wraps around the split
    ids = np.arange(j * BATCH, (j + 1) * BATCH) % len(arrays['id'])
    g = draw(params, state, arrays['prompt_ids'][ids], arrays['prompt_mask'][ids],
             sequences.generation_key(3, 0, j))
    real = ids[ids >= j * BATCH]
    keep = len(real)
    np.testing.assert_array_equal(cols['tokens'][0, real], np.asarray(g.tokens)[:keep])
    np.testing.assert_array_equal(cols['mask'][0, real], np.asarray(g.mask)[:keep])
    np.testing.assert_allclose(cols['logprobs'][0, real], np.asarray(g.logprobs)[:keep],
                               rtol=1e-5, atol=1e-5)
  assert cols['mask'][0].sum() > 0 and cols['logprobs'][0][cols['mask'][0]].max() <= 0
  # Sampling is really on: another seed's draws differ.
  other = draw(params, state, arrays['prompt_ids'][:BATCH], arrays['prompt_mask'][:BATCH],
               sequences.generation_key(4, 0, 0))
  assert not np.array_equal(np.asarray(other.tokens), cols['tokens'][0, :BATCH])


def test_compose_lays_out_the_datasets_own_prompt_records():
  # The data set's continuations through compose give back its prompt records exactly.
  from kdjax.data.text import make_prompts
  rng = np.random.default_rng(0)
  docs = [[rng.integers(3, 50, rng.integers(1, 12)) for _ in range(6)] for _ in range(3)]
  rec = make_prompts(docs, 5, 7)
  out = sequences.compose(rec['prompt_ids'], rec['prompt_mask'], rec['continuation_ids'],
                          rec['continuation_mask'])
  np.testing.assert_array_equal(out['x'], rec['input_ids'])
  np.testing.assert_array_equal(out['label'], rec['targets'])
  np.testing.assert_array_equal(out['mask'], rec['loss_mask'].astype(bool))
  np.testing.assert_array_equal(out['segment_ids'], rec['segment_ids'])
  np.testing.assert_array_equal(out['positions'], rec['positions'])
  jout = sequences.compose(*(jnp.asarray(rec[k]) for k in (
      'prompt_ids', 'prompt_mask', 'continuation_ids', 'continuation_mask')))
  for key, value in out.items():
    np.testing.assert_array_equal(np.asarray(jout[key]), value)


def test_seq_kd_batches_are_prompt_plus_teacher_continuation(seq_cache, lm_teacher_dir, data_dir,
                                                             tmp_path, kdjax_main):
  from kdjax.cache import open_for_run
  # (the continuation's loss alone: data.prompt_loss, on by default, widens it to the
  # prompt's tokens in the feed, after these rows; tests/distill/test_lm_on_policy.py)
  config = _config(*_args(SEQ, data_dir, lm_teacher_dir, *SAMPLED,
                          f'--config.teacher.cache={seq_cache}', '--config.data.prompt_loss=false'))
  cache = open_for_run(config)
  cols = read.load_columns(seq_cache, cache.manifest)
  _, batches = _first_batches(config, cache)
  for batch in batches:
    ids = batch['id']
    prompt, pmask = cols['prompt_ids'][0, ids], cols['prompt_mask'][0, ids]
    tokens, tmask = cols['tokens'][0, ids], cols['mask'][0, ids]
    lengths = tmask.sum(1)
    assert lengths.min() >= 1
    for r in range(len(ids)):
      n = lengths[r]
      np.testing.assert_array_equal(batch['x'][r, :PROMPT_LEN][pmask[r]], prompt[r][pmask[r]])
      np.testing.assert_array_equal(batch['x'][r, PROMPT_LEN:PROMPT_LEN + n], tokens[r, :n])
      # The loss is exactly on the continuation: positions P-1 .. P+n-2 predict its tokens.
      want = np.zeros(SEQ_LEN, bool)
      want[PROMPT_LEN - 1:PROMPT_LEN - 1 + n] = True
      np.testing.assert_array_equal(batch['mask'][r], want)
      np.testing.assert_array_equal(batch['label'][r][want], tokens[r, :n])
    for reader in ('memory', 'chunks'):     # the stream feed's rows are the same
      rows = cache.host_rows(reader, set())(np.zeros_like(ids), ids)
      for key in sequences.BATCH_KEYS:
        np.testing.assert_array_equal(rows[key], batch[key], err_msg=f'{reader} {key}')
  workdir = str(tmp_path / 'seq_kd')
  kdjax_main(['distill', *_args(SEQ, data_dir, lm_teacher_dir, *SAMPLED, *STEPS,
                              f'--config.teacher.cache={seq_cache}'), '--workdir', workdir])
  s = _summary(workdir)
  assert s['step'] == 20 and np.isfinite(s['train_loss']) and s['eval_perplexity'] < VOCAB


def test_seq_kd_with_word_kd_has_the_live_teacher_score_the_cached_rows(
    seq_cache, lm_teacher_dir, data_dir):
  # Kim and Rush's Seq-KD + Word-KD: the cached continuations are the rows, and a loss
  # that reads the teacher's logits gets the live teacher's on exactly those rows.
  from kdjax import teacher as teacher_lib
  from kdjax.cache import open_for_run
  from kdjax.models import model_kwargs
  word = ["--config.loss.terms={'kd': {'weight': 0.5}, 'ce': {'weight': 0.5}}",
          f'--config.teacher.cache={seq_cache}']
  config = _config(*_args(SEQ, data_dir, lm_teacher_dir, *SAMPLED, *word))
  cache = open_for_run(config)
  run, batches = _first_batches(config, cache)
  teacher = teacher_lib.load_teacher(lm_teacher_dir, run.mesh)
  cols = read.load_columns(seq_cache, cache.manifest)
  for batch in batches:
    n = cols['mask'][0, batch['id']].sum(1)
    np.testing.assert_array_equal(batch['x'][0, PROMPT_LEN:PROMPT_LEN + n[0]],
                                  cols['tokens'][0, batch['id'][0], :n[0]])
    out, _ = teacher.apply(*teacher.variables, batch['x'], train=False,
                           **model_kwargs(batch))
    np.testing.assert_allclose(batch['teacher_logits'], np.asarray(out.logits), rtol=1e-5,
                               atol=1e-5)
  # Without the teacher that generated them, the logits have no source: refused.
  plain = _config('--config', SEQ, f'--config.data.data_dir={data_dir}', *SAMPLED, *word)
  with pytest.raises(UserError, match='scores them live'):
    open_for_run(plain).check(plain, num_classes=VOCAB, needs={'teacher_logits'})
