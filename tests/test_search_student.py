"""DisWOT (``kdjax.schemes.diswot``): Grad-CAM maps and the semantic / relational
scores against a numpy transcription of the paper's formulas on a tiny case, and
``kdjax search-student`` through the CLI (ranking, JSON, a bad candidate: one line,
exit 2)."""

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.schemes.diswot import candidate_model
from kdjax.schemes.diswot import class_activation_maps
from kdjax.schemes.diswot import diswot_score


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def np_cam(a, w):
  """G_c[b, l] = relu(sum_k alpha_kc A[b, l, k]), alpha_kc = mean_l dy_c / dA[l, k]."""
  b, l, k = a.shape
  if w.shape[0] == l * k:   # a flattening head: dy_c/dA[l, k] = W[l * K + k, c]
    alpha = np.stack([np.mean([w[p * k + kk] for p in range(l)], axis=0) for kk in range(k)])
  else:
    alpha = w
  g = np.maximum(np.einsum('blk,kc->cbl', a, alpha), 0)
  return g.reshape(g.shape[0], -1)


def np_score(t, s):
  def gram(g):
    m = g @ g.T
    return m / np.sqrt((m ** 2).sum())

  def rel(f):
    f = f.reshape(len(f), -1)
    r = f @ f.T
    return r / np.sqrt((r ** 2).sum(1, keepdims=True))

  (ft, wt), (fs, ws) = t, s
  ft3 = ft.reshape(len(ft), -1, ft.shape[-1])
  fs3 = fs.reshape(len(fs), -1, fs.shape[-1])
  sem = -np.sqrt(((gram(np_cam(ft3, wt)) - gram(np_cam(fs3, ws))) ** 2).sum())
  relational = -np.sqrt(((rel(ft) - rel(fs)) ** 2).sum())
  return sem, relational


def test_scores_against_numpy():
  rng = np.random.default_rng(0)
  ft = rng.normal(size=(6, 5, 4))             # a CNN teacher: B=6, L=5, K=4, flatten head
  wt = rng.normal(size=(20, 3))
  fs = np.abs(rng.normal(size=(6, 7)))        # an MLP student: K=7
  ws = rng.normal(size=(7, 3))
  got = diswot_score((jnp.asarray(ft), jnp.asarray(wt)), (jnp.asarray(fs), jnp.asarray(ws)))
  sem, rel = np_score((ft, wt), (fs, ws))
  np.testing.assert_allclose(float(got['semantic']), sem, rtol=1e-5)
  np.testing.assert_allclose(float(got['relational']), rel, rtol=1e-5)
  np.testing.assert_allclose(float(got['score']), sem + rel, rtol=1e-5)
  np.testing.assert_allclose(class_activation_maps(jnp.asarray(ft), jnp.asarray(wt)),
                             np_cam(ft, wt), rtol=1e-5, atol=1e-6)
  assert float(diswot_score((jnp.asarray(ft), jnp.asarray(wt)),
                            (jnp.asarray(ft), jnp.asarray(wt)))['score']) == pytest.approx(0, abs=1e-5)


def test_candidate_specs():
  assert candidate_model('mlp:8x4') == {'name': 'mlp', 'kwargs': {'hidden': (8, 4)}}


def test_search_student_cli(kdjax_main, paths, data_dir, teacher_dir, tmp_path):
  out_json = tmp_path / 'rank.json'
  common = ['search-student', '--config', f'{paths["configs"]}/mnist1d/kd.py:tiny',
            '--teacher', teacher_dir, f'--config.data.name={paths["small"]}',
            f'--config.data.data_dir={data_dir}', '--config.batch_size=32']
  out = kdjax_main([*common, '--candidates', 'mlp:16', 'cnn1d:8x8', 'mlp:32x32', '--json', str(out_json)])
  rows = json.load(open(out_json))
  assert [r['rank'] for r in rows] == [1, 2, 3]
  assert sorted(r['candidate'] for r in rows) == ['cnn1d:8x8', 'mlp:16', 'mlp:32x32']
  scores = [r['score'] for r in rows]
  assert scores == sorted(scores, reverse=True) and all(s <= 0 for s in scores)
  assert len(out.stdout.strip().splitlines()) == 3
  bad = kdjax_main([*common, '--candidates', 'rnn:4'], check=False)
  assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1
  assert 'is not of the form' in bad.stderr
