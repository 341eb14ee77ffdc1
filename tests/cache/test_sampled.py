"""The sampled teacher cache (Random-Sampling KD, Anshumann et al. 2025, arXiv:2503.16870).

One tiny teacher LM (``tests/conftest.py``) and one sampled cache of 16 draws per token in
chunks of 64 rows, built once per module; it is rebuilt (and resumed) to the same bits,
refused when stale, inspected, fed to the device feed and distilled from.
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.cache import build
from kdjax.cache import codec as codec_lib
from kdjax.cache import read
from kdjax.cache import sampled
from kdjax.config import load_config
from kdjax.config import split_overrides
from kdjax.errors import UserError

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
RS = f'{ROOT}/configs/lm/cached_kd.py:sampled,tiny'
TOPK = f'{ROOT}/configs/lm/cached_kd.py:tiny'
VOCAB, SEQ_LEN, N, CHUNK = 300, 32, 16, 64
SAMPLES = [f'--config.cache.samples={N}', '--config.cache.seed=5']


def _args(spec, data_dir, teacher_dir, *extra):
  return ['--config', spec, f'--config.data.data_dir={data_dir}',
          f'--config.teacher.workdir={teacher_dir}', '--config.progress=false', *extra]


def _config(*args):
  rest, pairs = split_overrides(list(args))
  return load_config(rest[1], pairs)


def _errors(stderr):
  return [line for line in stderr.splitlines() if line.startswith('kdjax:')]


@pytest.fixture(scope='module', autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture(scope='module')
def rs_cache(tmp_path_factory, lm_teacher_dir, data_dir):
  """16 draws per token from the teacher (seed 5), 64 rows a chunk."""
  path = str(tmp_path_factory.mktemp('rs') / 'rs16')
  build.build_cache(_config(*_args(RS, data_dir, lm_teacher_dir, *SAMPLES)), path,
                    chunk_size=CHUNK)
  return path


def test_draws_follow_the_proposal_and_are_keyed_by_sequence_and_position():
  """Inverse-CDF draws: frequencies within 5 standard errors of softmax(z / tau); the
  draws of a token do not depend on what else is in the batch."""
  z = jnp.asarray(np.random.default_rng(0).normal(0, 1.5, (2, 9)), jnp.float32)
  draws = 2000
  for tau in (1.0, 0.6):
    x, log_w = sampled.sample_tokens(z, sampled.token_keys(1, jnp.arange(2), 1)[:, 0],
                                     samples=draws, proposal_temperature=tau)
    q = np.asarray(jax.nn.softmax(z / tau, -1), np.float64)
    freq = np.stack([np.bincount(np.asarray(r), minlength=9) for r in x]) / draws
    assert np.all(np.abs(freq - q) <= 5 * np.sqrt(q * (1 - q) / draws) + 1e-9)
    want_w = (1 - 1 / tau) * np.take_along_axis(np.asarray(z), np.asarray(x), -1)
    np.testing.assert_allclose(log_w, want_w, rtol=1e-6, atol=1e-6)
  logits = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4, 9)), jnp.float32)
  both, _ = sampled.sample_tokens(logits, sampled.token_keys(7, jnp.array([10, 11, 12]), 4),
                                  samples=5)
  alone, _ = sampled.sample_tokens(logits[1:2], sampled.token_keys(7, jnp.array([11]), 4),
                                   samples=5)
  np.testing.assert_array_equal(both[1:2], alone)
  other, _ = sampled.sample_tokens(logits[1:2], sampled.token_keys(8, jnp.array([11]), 4),
                                   samples=5)
  assert np.any(np.asarray(other) != np.asarray(alone))      # another seed, other draws


def test_inspect_reports_the_exact_bytes_per_token(rs_cache, kdjax_main):
  info = json.loads(kdjax_main(['cache', 'inspect', '--json', rs_cache]).stdout)
  nbytes = codec_lib.sample_bytes_per_token(N, VOCAB)
  # Elias-Fano of the N sorted draws: N low parts of l bits, N + ((V - 1) >> l) unary bits.
  bits = min(N * l + N + ((VOCAB - 1) >> l) for l in range(10))
  assert nbytes == -(-bits // 8) == 13.0
  assert info['kind'] == 'sampled' and info['format'] == 'rs16' and info['k'] == N
  assert info['bytes_per_token'] == nbytes and info['bytes_per_example'] == SEQ_LEN * nbytes
  manifest = read.open_cache(rs_cache)
  assert manifest['bytes_per_token'] == nbytes
  assert manifest['arrays'] == {'indices': {'dtype': 'uint8', 'shape': [SEQ_LEN, 13]}}
  assert info['stored_tokens'] > 1000 and 1 < info['unique_per_token']['mean'] < N
  assert kdjax_main(['cache', 'verify', rs_cache]).returncode == 0


def test_a_rebuilt_or_resumed_cache_is_bit_identical(rs_cache, lm_teacher_dir, data_dir,
                                                     tmp_path):
  config = _config(*_args(RS, data_dir, lm_teacher_dir, *SAMPLES))
  again = str(tmp_path / 'again')
  manifest = build.build_cache(config, again, chunk_size=CHUNK)
  first = read.open_cache(rs_cache)
  assert manifest['content_checksum'] == first['content_checksum']
  assert len(first['chunks']) > 2
  # Resume: drop the manifest and two chunks, build again; the same bytes come back.
  os.remove(os.path.join(again, 'manifest.json'))
  for name in sorted(manifest['chunks'])[1:3]:
    shutil.rmtree(os.path.join(again, 'chunks', name))
  resumed = build.build_cache(config, again, chunk_size=CHUNK)
  assert resumed['content_checksum'] == first['content_checksum']


def test_the_cached_draws_are_the_live_teachers_and_a_run_distills_from_them(
    rs_cache, lm_teacher_dir, data_dir, tmp_path, kdjax_main):
  from kdjax import data as kdata
  from kdjax import teacher as teacher_lib
  from kdjax.cache import open_for_run
  from kdjax.models import model_kwargs
  from kdjax.parallel import make_mesh
  config = _config(*_args(RS, data_dir, lm_teacher_dir, *SAMPLES,
                          f'--config.teacher.cache={rs_cache}'))
  cache = open_for_run(config)
  arrays = kdata.load_arrays('shakespeare_lm/tiny', 'train', data_dir=data_dir)
  ids = np.array([3, 70, 130, 131, 200, 7, 64, 65])      # across chunks of 64 rows
  rows = {reader: cache.host_rows(reader, set())(np.zeros_like(ids), ids)
          for reader in ('memory', 'chunks')}
  np.testing.assert_array_equal(rows['memory']['teacher_sample_indices'],
                                rows['chunks']['teacher_sample_indices'])
  got = rows['memory']
  m = arrays['mask'][ids]
  assert m.sum() > 100 and got['teacher_sample_indices'].shape == m.shape + (N,)
  np.testing.assert_allclose(got['teacher_sample_weights'][m], 1.0 / N)
  # The same draws from the live teacher on those rows, keyed by (seed 5, row id, t).
  teacher = teacher_lib.load_teacher(lm_teacher_dir, make_mesh([('data', -1)]))
  batch = {key: arrays[key][ids] for key in ('x', 'segment_ids', 'positions') if key in arrays}
  logits = teacher_lib.outputs(teacher.apply, teacher.variables, batch['x'],
                               ('teacher_logits',), **model_kwargs(batch))['teacher_logits']
  logits = jnp.where(m[..., None], logits.astype(jnp.float32), 0.0)
  live, _ = sampled.sample_tokens(logits, sampled.token_keys(5, ids, SEQ_LEN), samples=N)
  live = np.sort(np.asarray(live), -1)
  # Float rounding between two programs may move a draw across a CDF edge: rarely.
  assert np.mean(live[m] == got['teacher_sample_indices'][m]) > 0.995
  # A distill run reads the cache (device feed) and trains with sampled_kd.
  work = str(tmp_path / 'student')
  kdjax_main(['distill', *_args(RS, data_dir, lm_teacher_dir, *SAMPLES,
                                f'--config.teacher.cache={rs_cache}', '--config.num_steps=4',
                                '--config.steps_per_call=4', '--config.log_every=4',
                                '--config.eval_every=4', '--config.checkpoint_every=4'),
              '--workdir', work])
  summary = json.load(open(os.path.join(work, 'summary.json')))
  assert summary['step'] == 4 and np.isfinite(summary['eval_perplexity'])
  assert summary['feed'] == 'device'


def test_stale_or_mismatched_sampled_caches_are_refused(rs_cache, lm_teacher_dir, data_dir,
                                                        tmp_path, kdjax_main):
  sparse = "--config.loss.terms={'kd': {'loss': 'sparse_kd', 'weight': 1.0}}"
  cases = [
      (RS, ['--config.cache.samples=8', '--config.cache.seed=5'], 'samples 16 (config: 8)'),
      (RS, [*SAMPLES, '--config.cache.proposal_temperature=0.5'],
       'proposal_temperature 1.0 (config: 0.5)'),
      (RS, [*SAMPLES[:1], '--config.cache.seed=0'], 'seed 5 (config: 0)'),
      (RS, [*SAMPLES, sparse], 'use sampled_kd'),
      (TOPK, [], "mode 'sampled' (config: 'topk')"),
  ]
  for i, (spec, extra, words) in enumerate(cases):
    out = kdjax_main(['distill', *_args(spec, data_dir, lm_teacher_dir, *extra,
                                        f'--config.teacher.cache={rs_cache}'),
                      '--workdir', str(tmp_path / f'w{i}')], check=False)
    lines = _errors(out.stderr)
    assert out.returncode == 2 and len(lines) == 1 and words in lines[0], (words, out.stderr)
    assert not os.path.exists(str(tmp_path / f'w{i}'))
  # A build into the cache's folder with other settings is refused before any work.
  with pytest.raises(UserError, match='other settings'):
    build.build_cache(_config(*_args(RS, data_dir, lm_teacher_dir, '--config.cache.samples=8',
                                     '--config.cache.seed=5')), rs_cache, chunk_size=CHUNK)
