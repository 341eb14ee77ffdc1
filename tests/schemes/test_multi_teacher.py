"""Multi-teacher distillation (``kdjax.schemes.multi_teacher``): label-space maps,
CA-MKD confidence weights, the combined target and its KD loss against numpy from the
formulas (with gradient checks), one step per combination rule against a separate
computation, the label-map and config checks (one line, exit 2, nothing written), and a
run through ``kdjax distill`` from a CNN and an MLP teacher (trained on half the split,
read through a label map) that resumes from a checkpoint to the same parameters."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.models import from_config
from kdjax.schemes import check_label_maps
from kdjax.schemes import combine_teachers
from kdjax.schemes import confidence_weights
from kdjax.schemes import gate_apply
from kdjax.schemes import label_map_matrix
from kdjax.schemes import make_multi_teacher_init
from kdjax.schemes import make_multi_teacher_step
from kdjax.schemes import map_probabilities
from kdjax.schemes import multi_teacher_options
from kdjax.schemes.multi_teacher import kd_from_probs

D, C, B = 5, 4, 6
LABELS = np.array([0, 1, 2, 3, -1, 1], np.int32)      # one unlabeled example
MASK = np.array([1, 1, 1, 1, 1, 0], bool)             # one padded example
MAP6 = [0, 2, -1, 2, 1, -1]                           # a 6-class teacher -> 4 classes


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def np_map(p, label_map, c):
  """Sum each kept teacher class's probability into its student class, renormalise."""
  out = np.zeros((*p.shape[:-1], c))
  for j, t in enumerate(label_map):
    if t >= 0:
      out[..., t] += p[..., j]
  return out / out.sum(-1, keepdims=True)


def np_ca_mkd(probs, labels):
  """CA-MKD (Zhang et al. 2022, Eq. 2): w_m = (1 - softmax_m(CE_m)) / (M - 1),
  CE_m = -log p_m[y] (p clipped at 1e-30: a teacher whose label map gives the label no
  mass has CE 69); uniform where unlabeled."""
  m = probs.shape[0]
  out = np.zeros((probs.shape[1], m))
  for b, y in enumerate(labels):
    if y < 0:
      out[b] = 1 / m
      continue
    ce = -np.log(np.maximum(probs[:, b, y], 1e-30))
    e = np.exp(ce - ce.max())
    out[b] = (1 - e / e.sum()) / (m - 1)
  return out


def np_kd(s, target, T):
  logq = np.log(np_softmax(s / T))
  return T * T * np.sum(np.where(target > 0, target * (np.log(np.where(target > 0, target, 1))
                                                      - logq), 0), -1)


def _teacher_logits(seed=1):
  rng = np.random.default_rng(seed)
  return (rng.normal(size=(B, C)).astype(np.float32) * 2,
          rng.normal(size=(B, 6)).astype(np.float32) * 2)


# --------------------------------------------------------------------------- the formulas

def test_label_map_sums_match_numpy():
  p = np_softmax(np.random.default_rng(0).normal(size=(B, 6)))
  got = map_probabilities(jnp.asarray(p, jnp.float32), label_map_matrix(MAP6, 6, C))
  np.testing.assert_allclose(got, np_map(p, MAP6, C), rtol=1e-5, atol=1e-7)
  assert np.all(np.asarray(got)[:, 3] == 0)        # no teacher class goes to student class 3
  np.testing.assert_allclose(map_probabilities(jnp.asarray(p[:, :C], jnp.float32),
                                               label_map_matrix(None, C, C)),
                             p[:, :C] / p[:, :C].sum(-1, keepdims=True), rtol=1e-5)


@pytest.mark.parametrize('m', [2, 3])
def test_confidence_weights_match_numpy(m):
  rng = np.random.default_rng(m)
  probs = np_softmax(rng.normal(size=(m, B, C)) * 2)
  got = np.asarray(confidence_weights(jnp.asarray(probs, jnp.float32), jnp.asarray(LABELS)))
  np.testing.assert_allclose(got, np_ca_mkd(probs, LABELS), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(got.sum(-1), 1.0, rtol=1e-6)
  best = np.argmax(probs[:, 0, LABELS[0]])           # the surest of the label weighs most
  assert np.argmax(got[0]) == best
  mx = np.asarray(confidence_weights(jnp.asarray(probs, jnp.float32), jnp.asarray(LABELS),
                                     'max_prob'))
  conf = probs.max(-1).T
  np.testing.assert_allclose(mx, conf / conf.sum(-1, keepdims=True), rtol=1e-5)


def test_combined_target_and_kd_match_numpy_with_gradients():
  rng = np.random.default_rng(4)
  probs = np_softmax(rng.normal(size=(3, B, C)))
  w = np_softmax(rng.normal(size=(B, 3)))
  target = np.einsum('mbc,bm->bc', probs, w)
  np.testing.assert_allclose(combine_teachers(jnp.asarray(probs), jnp.asarray(w)), target,
                             rtol=1e-6)
  np.testing.assert_allclose(combine_teachers(jnp.asarray(probs)), probs.mean(0), rtol=1e-6)
  target[0, 1] = 0.0                                  # a dropped class: 0 log 0 = 0
  target /= target.sum(-1, keepdims=True)
  s = rng.normal(size=(B, C)).astype(np.float32)
  got = kd_from_probs(jnp.asarray(s), jnp.asarray(target, jnp.float32), temperature=2.0)
  np.testing.assert_allclose(got, np_kd(s.astype(np.float64), target, 2.0), rtol=1e-5,
                             atol=1e-6)
  t = jnp.asarray(target, jnp.float32)
  check_grads(jax.jit(lambda z: jnp.sum(kd_from_probs(z, t, temperature=2.0))),
              (jnp.asarray(s),), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------- the step

MLP = {'name': 'mlp', 'kwargs': {'hidden': (8,)}}
MATRICES = (label_map_matrix(None, C, C), label_map_matrix(MAP6, 6, C))


def _batch():
  x = np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)
  return {'x': jnp.asarray(x), 'label': jnp.asarray(LABELS), 'mask': jnp.asarray(MASK),
          'teacher_logits': tuple(jnp.asarray(z) for z in _teacher_logits())}


@pytest.mark.parametrize('combine', ['average', 'confidence', 'gate'])
def test_step_matches_the_formula(combine):
  lr, T, w = 0.1, 2.0, 0.8
  apply, init_params, _ = from_config(MLP, num_classes=C, input_shape=(D,))
  objective = build_objective({'ce': {}})
  tx = optax.sgd(lr)
  init = make_multi_teacher_init(init_params, apply, objective, tx, input_shape=(D,),
                                 num_teachers=2, gated=combine == 'gate', gate_hidden=3)
  state = jax.jit(init)(np.int32(0))
  if combine == 'gate':   # a gate that is not uniform
    gate = dict(state.params['gate'], out={'w': state.params['gate']['out']['w'] + 0.5,
                                           'b': jnp.array([0.3, -0.2])})
    state = state.replace(params=dict(state.params, gate=gate))
  step = jax.jit(make_multi_teacher_step(apply, objective, tx, matrices=MATRICES,
                                         combine=combine, temperature=T, weight=w))
  new, metrics = step(state, _batch())

  # the reference: the formulas in numpy (teacher side), the student's gradient by jax
  batch = _batch()
  z0, z1 = (z.astype(np.float64) for z in _teacher_logits())
  tempered = np.stack([np_softmax(z0 / T), np_map(np_softmax(z1 / T), MAP6, C)])
  plain = np.stack([np_softmax(z0), np_map(np_softmax(z1), MAP6, C)])
  valid = MASK & (LABELS >= 0)

  def loss(params):
    if combine == 'gate':
      weights = gate_apply(params['gate'], batch['x'])
    elif combine == 'confidence':
      weights = np_ca_mkd(plain, LABELS)
    else:
      weights = np.full((B, 2), 0.5)
    target = jnp.einsum('mbc,bm->bc', tempered, weights)
    s = apply(params['student'], state.model_state, batch['x'], train=True)[0].logits
    logq = jax.nn.log_softmax(s)
    ce = -jnp.sum(jnp.where(valid, jnp.take_along_axis(
        logq, jnp.maximum(jnp.asarray(LABELS), 0)[:, None], 1)[:, 0], 0)) / valid.sum()
    kl = T * T * jnp.sum(jnp.where(target > 0, target * (
        jnp.log(jnp.where(target > 0, target, 1)) - jax.nn.log_softmax(s / T)), 0), -1)
    return ce + w * jnp.sum(jnp.where(MASK, kl, 0)) / MASK.sum()

  params = {'student': state.params['student'], 'gate': state.params['gate']}
  value, grads = jax.jit(jax.value_and_grad(loss))(params)
  want = jax.tree.map(lambda a, g: a - lr * g, params, grads)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                  atol=1e-6)
  jax.tree.map(close, new.params['student'], want['student'])
  s, c = metrics['loss']
  assert float(s) / float(c) == pytest.approx(float(value), rel=1e-5)
  if combine == 'gate':
    jax.tree.map(close, new.params['gate'], want['gate'])
    check_grads(jax.jit(lambda g: loss({'student': params['student'], 'gate': g})),
                (params['gate'],), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)
  else:
    assert new.params['gate'] == {}
  s0, n = metrics['teacher_0/weight']
  s1, _ = metrics['teacher_1/weight']
  assert float(s0 + s1) == pytest.approx(float(n), rel=1e-5)     # weights sum to 1
  if combine == 'average':
    assert float(s0) / float(n) == pytest.approx(0.5)


# --------------------------------------------------------------------------- checks

@pytest.mark.parametrize('classes,maps,message', [
    ([10, 4], [None, None], 'the teachers predict 10, 4 classes and the student 10; give '
                            'config.scheme.teachers[1] a label_map'),
    ([10, 4], [None, [0, 1, 2]], 'teachers[1].label_map has 3 entries but teacher 1 predicts 4'),
    ([4], [[0, 1, 10, -1]], 'sends a class to 10, outside the student\'s classes 0..9'),
    ([4], [[0, -2, 1, 1]], 'sends a class to -2'),
    ([2], [[-1, -1]], 'drops every class'),
])
def test_bad_label_maps(classes, maps, message):
  with pytest.raises(UserError, match=message.replace('[', r'\[').replace(']', r'\]')):
    check_label_maps(classes, maps, 10)


@pytest.mark.parametrize('scheme,message', [
    (dict(teachers=[]), 'config.scheme.teachers is empty'),
    (dict(teachers=[{'path': '/t'}]), r'teachers\[0\] must be a mapping with a workdir'),
    (dict(teachers=['/t'], combine='max'), "combine 'max' is not a combination rule"),
    (dict(teachers=['/t'], confidence='entropy'), "confidence 'entropy' is not a confidence"),
    (dict(teachers=['/t'], temperature=0.0), 'temperature must be positive'),
    (dict(teachers=[{'workdir': '/t', 'label_map': 'abc'}]), 'must be None or a list'),
    (dict(teachers=['/t'], alpha=1.0), 'config.scheme.alpha is not a multi_teacher option'),
])
def test_bad_scheme_options(scheme, message):
  with pytest.raises(UserError, match=message):
    multi_teacher_options(ml_collections.ConfigDict({'scheme': {'name': 'multi_teacher',
                                                                **scheme}}))


def _teachers(*entries):
  return '--config.scheme.teachers=' + repr(list(entries))


@pytest.mark.parametrize('case,message', [
    ('short_map', 'config.scheme.teachers[1].label_map has 5 entries but teacher 1 predicts '
                  '10 classes'),
    ('out_of_range', "sends a class to 10, outside the student's classes 0..9"),
    ('missing', 'has no checkpoint; train it first'),
    ('teacher_workdir', 'leave config.teacher.workdir and config.teacher.cache empty'),
])
def test_cli_refuses_bad_teachers_and_writes_nothing(case, message, paths, data_dir,
                                                     teacher_dir, tmp_path, kdjax_main):
  wd = tmp_path / 'run'
  t = {'workdir': teacher_dir, 'label_map': None}
  extra = {
      'short_map': [_teachers(t, {'workdir': teacher_dir, 'label_map': [0, 1, 2, 3, 4]})],
      'out_of_range': [_teachers(t, {'workdir': teacher_dir,
                                     'label_map': [10] + list(range(1, 10))})],
      'missing': [_teachers(t, {'workdir': str(tmp_path / 'nothing')})],
      'teacher_workdir': [_teachers(t), f'--config.teacher.workdir={teacher_dir}'],
  }[case]
  out = kdjax_main(['distill', '--config', f'{paths["configs"]}/mnist1d/multi_teacher.py:tiny',
                    '--workdir', str(wd), f'--config.data.name={paths["small"]}',
                    f'--config.data.data_dir={data_dir}', *extra], check=False)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('kdjax: error: ') and message in lines[0]
  assert not wd.exists()


# --------------------------------------------------------------------------- the CLI

STEPS = 40


@pytest.fixture(scope='module')
def mlp_teacher_dir(paths, data_dir, tmp_path_factory):
  """An MLP teacher trained on the first half of the train split (20 steps)."""
  from kdjax.cli import main
  wd = str(tmp_path_factory.mktemp('mt') / 'mlp_half')
  assert main(['train', '--config', f'{paths["configs"]}/mnist1d/teacher.py:tiny',
               '--workdir', wd, f'--config.data.name={paths["small"]}',
               f'--config.data.data_dir={data_dir}', '--config.progress=false',
               '--config.model.name=mlp', '--config.data.train_split=train[:50%]',
               '--config.num_steps=20', '--config.steps_per_call=10']) == 0
  return wd


def _args(paths, data_dir, teachers):
  return ['distill', '--config', f'{paths["configs"]}/mnist1d/multi_teacher.py:gate,tiny',
          f'--config.data.name={paths["small"]}', f'--config.data.data_dir={data_dir}',
          '--config.progress=false', f'--config.num_steps={STEPS}',
          '--config.checkpoint_every=20', '--config.log_every=20', '--config.eval_every=40',
          '--config.steps_per_call=10', _teachers(*teachers)]


def test_end_to_end_two_architectures_label_map_and_resume(paths, data_dir, teacher_dir,
                                                           mlp_teacher_dir, tmp_path,
                                                           kdjax_main):
  # the MLP teacher's class 9 is dropped (its mass renormalised over the other nine)
  teachers = [{'workdir': teacher_dir, 'label_map': None},
              {'workdir': mlp_teacher_dir, 'label_map': list(range(9)) + [-1]}]
  ref = str(tmp_path / 'ref')
  kdjax_main([*_args(paths, data_dir, teachers), '--workdir', ref])
  summary = json.load(open(os.path.join(ref, 'summary.json')))
  assert summary['step'] == STEPS and summary['scheme'] == 'multi_teacher'
  assert summary['combine'] == 'gate' and summary['num_teachers'] == 2
  assert 0.15 < summary['eval_accuracy'] <= 1.0                  # 10 classes: chance 0.1
  assert all(0.15 < a <= 1.0 for a in summary['teacher_accuracies'])
  assert sum(summary['teacher_weights']) == pytest.approx(1.0, rel=1e-5)
  train = [json.loads(l) for l in open(os.path.join(ref, 'metrics.jsonl'))]
  assert {'loss/kd', 'loss/ce', 'teachers/accuracy'} <= set(train[-2])
  cut = str(tmp_path / 'cut')
  shutil.copytree(ref, cut)
  shutil.rmtree(os.path.join(cut, 'checkpoints', str(STEPS)))
  os.remove(os.path.join(cut, 'summary.json'))
  out = kdjax_main([*_args(paths, data_dir, teachers), '--workdir', cut])
  assert 'resuming from step 20' in out.stdout
  from kdjax.workdir import restore_subtree
  a, b = (jax.tree.leaves(restore_subtree(wd, STEPS, ('params',))) for wd in (ref, cut))
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  assert json.load(open(os.path.join(cut, 'summary.json')))['eval_accuracy'] == \
      summary['eval_accuracy']
