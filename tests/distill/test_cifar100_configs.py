"""The CIFAR-100 benchmark configs (configs/cifar100/): mdistiller's recipes and weights.

Every method builds and validates; its loss weights are mdistiller's (transcribed below
from megvii-research/mdistiller at a08d46f, each cited) times the factor
docs/cifar_benchmark.md gives; RKD's and SP's weighted kdjax terms reproduce a numpy
transcription of mdistiller's formulas; KD, DKD, CRD and FitNet run ``:tiny`` steps on
TFDS mock data through ``tfds.data_source('cifar100')`` (as tests/distill/test_cifar_mock.py
does for CIFAR-10).
"""

import contextlib
import json
import os

import jax
import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax.config import load_config
from kdjax.config import sibling
from kdjax.distill.train import train_and_evaluate
from kdjax.engine.config import validate
from kdjax.errors import UserError
from kdjax.losses import build_objective

BATCH = 64   # mdistiller's SOLVER.BATCH_SIZE in every configs/cifar100/*.yaml

# mdistiller's loss options, megvii-research/mdistiller@a08d46f, ``mdistiller/engine/cfg.py``
# (the per-method yaml files, ``configs/cifar100/<method>.yaml`` and
# ``configs/cifar100/dkd/res32x4_res8x4.yaml``, set only the solver). Keys: the kdjax term
# that carries the weight -> (mdistiller's weight, its cfg.py name).
MDISTILLER = {
    'vanilla': {'ce': (1.0, 'vanilla: plain cross-entropy (DISTILLER.TYPE NONE)')},
    'kd': {'ce': (0.1, 'KD.LOSS.CE_WEIGHT'), 'kd': (0.9, 'KD.LOSS.KD_WEIGHT')},
    'dkd': {'ce': (1.0, 'DKD.CE_WEIGHT')},   # DKD's weight is the warm-up ramp, below
    'fitnet': {'ce': (1.0, 'FITNET.LOSS.CE_WEIGHT'), 'fitnet': (100.0, 'FITNET.LOSS.FEAT_WEIGHT')},
    'at': {'ce': (1.0, 'AT.LOSS.CE_WEIGHT'),
           'attention_transfer': (1000.0, 'AT.LOSS.FEAT_WEIGHT')},
    'sp': {'ce': (1.0, 'SP.LOSS.CE_WEIGHT'),
           'similarity_preserving': (3000.0, 'SP.LOSS.FEAT_WEIGHT')},
    # RKD.LOSS.FEAT_WEIGHT (1.0) times RKD.DISTANCE_WEIGHT / RKD.ANGLE_WEIGHT
    'rkd': {'ce': (1.0, 'RKD.LOSS.CE_WEIGHT'), 'rkd_distance': (25.0, 'RKD.DISTANCE_WEIGHT'),
            'rkd_angle': (50.0, 'RKD.ANGLE_WEIGHT')},
    'pkt': {'ce': (1.0, 'PKT.LOSS.CE_WEIGHT'), 'pkt': (30000.0, 'PKT.LOSS.FEAT_WEIGHT')},
    'crd': {'ce': (1.0, 'CRD.LOSS.CE_WEIGHT'), 'crd': (0.8, 'CRD.LOSS.FEAT_WEIGHT')},
}
# kdjax's weight per unit of mdistiller's (docs/losses.md; docs/cifar_benchmark.md): 1 but
# RKD's, whose means run over distinct pairs / triplets instead of all n^2 / n^3 tuples.
FACTORS = {'rkd_distance': (BATCH - 1) / BATCH,
           'rkd_angle': (BATCH - 1) * (BATCH - 2) / BATCH ** 2}
# The other options, cfg.py: KD.TEMPERATURE 4; DKD.ALPHA 1, BETA 8, T 4, WARMUP 20;
# FITNET.HINT_LAYER 2; AT.P 2; CRD.FEAT.DIM 128, NCE.K 16384, NCE.MOMENTUM 0.5,
# NCE.TEMPERATURE 0.07; the features of each distiller's forward_train
# (mdistiller/distillers/<NAME>.py): feats[2] FitNet, feats[1:] AT, feats[-1] SP,
# pooled_feat RKD / PKT / CRD.
OPTIONS = {
    'kd': {'kd': {'temperature': 4.0}},
    'dkd': {'dkd': {'alpha': 1.0, 'beta': 8.0, 'temperature': 4.0}},
    'fitnet': {'fitnet': {'student': 'stage2', 'teacher': 'stage2'}},
    'at': {'attention_transfer': {'p': 2.0}},
    'sp': {'similarity_preserving': {'student': 'stage3', 'teacher': 'stage3'}},
    'crd': {'crd': {'objective': 'nce', 'dim': 128, 'n_data': 50_000, 'nce_k': 16384,
                    'momentum': 0.5, 'temperature': 0.07}},
}
METHODS = tuple(MDISTILLER)
STEPS_PER_EPOCH = 50_000 // BATCH


def _path(paths, name):
  return f"{paths['configs']}/cifar100/{name}"


def _terms(config):
  return config.loss.terms.to_dict()


@pytest.mark.parametrize('tiny', ['', ',tiny'])
def test_every_method_builds_and_validates(paths, tiny):
  module = sibling(_path(paths, 'resnet8x4.py'), 'resnet8x4')
  assert set(module.METHODS) == set(METHODS)
  for method in METHODS:
    c = load_config(_path(paths, f'resnet8x4.py:{method}{tiny}'))
    validate(c)
    assert c.data.name == 'cifar100' and c.model.name == 'resnet8x4'
    build_objective(_terms(c))
  teacher = load_config(_path(paths, 'resnet32x4.py' + (':tiny' if tiny else '')))
  validate(teacher)
  assert teacher.data.name == 'cifar100' and teacher.model.name == 'resnet32x4'


def test_solver_is_mdistillers_and_shared_with_cifar10(paths):
  # SOLVER in configs/cifar100/*.yaml: SGD, LR 0.05, MOMENTUM 0.9, WEIGHT_DECAY 5e-4,
  # BATCH_SIZE 64, EPOCHS 240, LR_DECAY_STAGES [150, 180, 210], LR_DECAY_RATE 0.1.
  c = load_config(_path(paths, 'resnet8x4.py:kd'))
  o = c.optimizer
  assert (o.name, o.learning_rate, o.momentum, o.weight_decay) == ('sgd', 0.05, 0.9, 5e-4)
  assert (c.batch_size, c.num_steps) == (BATCH, 240 * STEPS_PER_EPOCH)
  assert list(o.decay_steps) == [e * STEPS_PER_EPOCH for e in (150, 180, 210)]
  assert o.decay_factor == 0.1
  c10 = load_config(f"{paths['configs']}/cifar10/resnet32x4.py").to_dict()
  c100 = load_config(_path(paths, 'resnet32x4.py')).to_dict()
  assert c10.pop('data').pop('name') == 'cifar10'
  assert c100.pop('data').pop('name') == 'cifar100'
  assert c10 == c100


@pytest.mark.parametrize('method', METHODS)
def test_weights_are_mdistillers_times_the_documented_factors(paths, method):
  terms = _terms(load_config(_path(paths, f'resnet8x4.py:{method}')))
  expected_terms = set(MDISTILLER[method]) | ({'dkd'} if method == 'dkd' else set())
  assert set(terms) == expected_terms
  for term, (weight, _) in MDISTILLER[method].items():
    assert terms[term]['weight'] == pytest.approx(weight * FACTORS.get(term, 1.0), rel=1e-12)
  for term, options in OPTIONS.get(method, {}).items():
    assert {k: terms[term][k] for k in options} == options
  if method == 'dkd':   # min(epoch / 20, 1) with 1-based epochs: 1/20 ... 1 from epoch 20 on
    ramp = terms['dkd']['weight']
    assert ramp['schedule'] == 'piecewise'
    assert ramp['boundaries'] == [e * STEPS_PER_EPOCH for e in range(1, 20)]
    assert ramp['values'] == [e / 20 for e in range(1, 21)]


def test_methods_without_a_kdjax_loss_are_refused_by_name(paths):
  for method in ('vid', 'cc', 'reviewkd', 'ofd', 'nst', 'dot'):
    with pytest.raises(UserError, match=f"no config for '{method}'.*cifar_benchmark.md"):
      load_config(_path(paths, f'resnet8x4.py:{method}'))
  with pytest.raises(UserError, match='unknown method'):
    load_config(_path(paths, 'resnet8x4.py:fitnets'))
  for arg in ('', ':tiny', ':kd,dkd'):
    with pytest.raises(UserError, match='name one method'):
      load_config(_path(paths, f'resnet8x4.py{arg}'))


# --- mdistiller's RKD and SP formulas (mdistiller/distillers/RKD.py ``rkd_loss`` with
# squared=False, SP.py ``similarity_loss``), written out in numpy from the code's math.

def _smooth_l1_mean(x):
  a = np.abs(x)
  return np.mean(np.where(a < 1, 0.5 * x * x, a - 0.5))


def _mdistiller_rkd(s, t, distance_weight, angle_weight):
  def dist(e):
    sq = np.sum(e * e, 1)
    d = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2 * e @ e.T, 1e-12))
    np.fill_diagonal(d, 0.0)
    return d / d[d > 0].mean()

  def angles(e):
    diff = e[None, :, :] - e[:, None, :]
    norm = np.linalg.norm(diff, axis=2, keepdims=True)
    unit = diff / np.maximum(norm, 1e-12)
    return np.einsum('ijd,ikd->ijk', unit, unit)

  return (distance_weight * _smooth_l1_mean(dist(s) - dist(t))
          + angle_weight * _smooth_l1_mean(angles(s) - angles(t)))


def _mdistiller_sp(s, t):
  def gram(f):
    f = f.reshape(f.shape[0], -1)
    g = f @ f.T
    return g / np.maximum(np.linalg.norm(g, axis=1, keepdims=True), 1e-12)
  n = s.shape[0]
  return np.sum((gram(t) - gram(s)) ** 2) / (n * n)


@pytest.mark.parametrize('method', ['rkd', 'sp'])
def test_weighted_terms_equal_mdistillers_loss(paths, method):
  terms = _terms(load_config(_path(paths, f'resnet8x4.py:{method}')))
  del terms['ce']
  objective = build_objective(terms)
  rng = np.random.default_rng(0)
  if method == 'rkd':   # pooled_feat (256 wide in both models; the width does not matter)
    s, t = rng.standard_normal((BATCH, 8)), rng.standard_normal((BATCH, 16)) * 3
    feats = lambda x: {'penultimate': x}
    expected = _mdistiller_rkd(s, t, *(w for w, _ in list(MDISTILLER['rkd'].values())[1:]))
  else:                 # feats[-1], [B, 8, 8, 256] (smaller here: the Gram is what counts)
    s, t = rng.standard_normal((BATCH, 4, 4, 16)), rng.standard_normal((BATCH, 4, 4, 32))
    feats = lambda x: {'stage3': x}
    expected = MDISTILLER['sp']['similarity_preserving'][0] * _mdistiller_sp(s, t)
  inputs = {'student_features': feats(s), 'teacher_features': feats(t), 'step': 0}
  with jax.default_matmul_precision('highest'):
    params, state = objective.init(jax.random.key(0), inputs)
    loss, _, _ = jax.jit(objective.apply)(params, state, inputs)
  np.testing.assert_allclose(float(loss), expected, rtol=2e-5)


# --- :tiny runs on TFDS mock data

@contextlib.contextmanager
def _mock_cifar():
  # tfds 4.9.10's mock sets `__getitems__` on a MagicMock, where it is not a bound
  # method; read mocked records one by one instead (as test_cifar_mock.py).
  from tensorflow_datasets.core.data_sources import base
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(base.BaseDataSource, '__getitems__', lambda self, keys: [self[k] for k in keys])
    with tfds.testing.mock_data(num_examples=48):
      yield


def _tiny(paths, name, tmp_path, teacher=None):
  c = load_config(_path(paths, name), [('data.data_dir', str(tmp_path / 'data')),
                                       ('data.feed', 'stream'), ('progress', 'false')])
  if teacher:
    c.teacher.workdir = teacher
  return c


@pytest.fixture(scope='module')
def tiny_teacher(paths, tmp_path_factory):
  tmp = tmp_path_factory.mktemp('cifar100_teacher')
  with _mock_cifar():
    s = train_and_evaluate(_tiny(paths, 'resnet32x4.py:tiny', tmp), str(tmp / 'teacher'))
  assert s['step'] == 4
  return str(tmp / 'teacher')


TINY_RUN = ('kd', 'dkd', 'crd', 'fitnet')


@pytest.mark.slow
def test_tiny_students_run_on_mock_cifar100(paths, tmp_path, tiny_teacher):
  """KD's, DKD's, CRD's and FitNet's terms, each with its ``:tiny`` config's options, in one
  student run (one compilation instead of four: the CI budget); the four configs differ
  only in their terms and CRD's training split (its memory banks' rows), checked first."""
  configs = {m: _tiny(paths, f'resnet8x4.py:{m},tiny', tmp_path, tiny_teacher) for m in TINY_RUN}

  def rest(config):
    c = config.to_dict()
    del c['loss'], c['data']['train_split']
    return c

  union = {}
  for method, config in configs.items():
    assert rest(config) == rest(configs['crd']), method
    union.update({t: o for t, o in _terms(config).items() if t != 'ce'})
  assert set(union) == {'kd', 'dkd', 'crd', 'fitnet'}
  run = configs['crd']
  run.loss.terms = {'ce': {'weight': 1.0}, **union}
  workdir = str(tmp_path / 'student')
  with _mock_cifar():
    s = train_and_evaluate(run, workdir)
  assert s['step'] == 4 and s['teacher_step'] == 4
  assert 0 <= s['eval_accuracy'] <= 1 and np.isfinite(s['train_loss'])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  last = [r for r in rows if r['split'] == 'train'][-1]
  for term in union:    # every term was computed, finite and positive
    assert np.isfinite(last[f'loss/{term}']) and last[f'loss/{term}'] > 0, term
