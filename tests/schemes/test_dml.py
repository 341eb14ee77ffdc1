"""Deep mutual learning (``kdjax.schemes.dml``): the mimicry loss against numpy from the
paper's formula, the cohort step against K separate per-student computations (stacked
and vmapped, or listed and looped), bad configs, and a run end to end through the CLI
that resumes after ``kill -9`` to the uninterrupted run's result."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.schemes import make_cohort
from kdjax.schemes import make_dml_init
from kdjax.schemes import make_dml_step
from kdjax.schemes import mutual_kl
from kdjax.schemes import scheme_options
from kdjax.schemes import dml_scheme

D, C, B = 5, 4, 6
LABELS = np.array([0, 1, 2, 3, -1, 1], np.int32)      # one unlabeled example
MASK = np.array([1, 1, 1, 1, 1, 0], bool)             # one padded example


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


# --------------------------------------------------------------------------- numpy reference

def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_mutual(logits, T, where):
  """Zhang et al. 2018, a cohort of K: (1 / (K - 1)) sum_{j != k} KL(p_j || p_k), each
  pair at temperature T times T^2; per student and example, masked examples 0."""
  k = logits.shape[0]
  logp = np_log_softmax(logits.astype(np.float64) / T)
  out = np.zeros(logits.shape[:-1])
  for s in range(k):
    for j in range(k):
      if j != s:
        out[s] += T * T * (np.exp(logp[j]) * (logp[j] - logp[s])).sum(-1)
  return out / (k - 1) * where


def np_losses(logits, labels, where, T, w):
  """Each student's DML loss: CE over labeled unmasked examples + w * the masked mean of
  its mimicry loss."""
  logits = logits.astype(np.float64)
  valid = where & (labels >= 0)
  logp = np_log_softmax(logits)
  ce = np.array([-(logp[s, valid, labels[valid]]).mean() for s in range(len(logits))])
  mutual = np_mutual(logits, T, where).sum(-1) / where.sum()
  return ce + w * mutual, mutual


# --------------------------------------------------------------------------- the loss

@pytest.mark.parametrize('k,temperature', [(2, 1.0), (4, 2.5)])
def test_mutual_kl_matches_the_papers_formula(k, temperature):
  rng = np.random.default_rng(k)
  z = rng.normal(size=(k, B, C)).astype(np.float32) * 2
  got = mutual_kl(jnp.asarray(z), temperature=temperature, where=jnp.asarray(MASK))
  np.testing.assert_allclose(np.asarray(got), np_mutual(z, temperature, MASK), rtol=1e-5,
                             atol=1e-6)
  assert np.all(np.asarray(got)[:, ~MASK] == 0)


def test_mutual_kl_trains_each_student_toward_the_others_only():
  """d(sum_k l_k)/dz_k = T (q_k - mean_{j != k} p_j) per example: the targets are under
  stop_gradient, so no student's loss moves another student."""
  k, T = 3, 2.0
  rng = np.random.default_rng(1)
  z = rng.normal(size=(k, B, C)).astype(np.float32)
  grad = jax.grad(lambda z: jnp.sum(mutual_kl(z, temperature=T, where=jnp.asarray(MASK))))(
      jnp.asarray(z))
  p = np.exp(np_log_softmax(z.astype(np.float64) / T))
  others = (p.sum(0, keepdims=True) - p) / (k - 1)
  want = T * (p - others) * MASK[None, :, None]
  np.testing.assert_allclose(np.asarray(grad), want, rtol=1e-4, atol=1e-6)


def test_mutual_kl_needs_two_students():
  with pytest.raises(ValueError, match='at least two'):
    mutual_kl(jnp.zeros((1, B, C)))


# --------------------------------------------------------------------------- the step

MLP = {'name': 'mlp', 'kwargs': {'hidden': (8,)}}
MIXED = [MLP, {'name': 'mlp', 'kwargs': {'hidden': (6, 5)}},
         {'name': 'mlp', 'kwargs': {'hidden': (7,)}}]


def _batch():
  x = np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)
  return {'x': jnp.asarray(x), 'label': jnp.asarray(LABELS), 'mask': jnp.asarray(MASK)}


def _one_step(models, *, stack=None, lr=0.1, T=1.0, w=1.0, nonfinite='stop', edit=None):
  key = (repr(models), stack, lr, T, w, nonfinite)
  if edit is None and key in _STEPS:
    return _STEPS[key]
  cohort = make_cohort(models, num_classes=C, input_shape=(D,), stack=stack)
  objective = build_objective({'ce': {}})
  tx = optax.sgd(lr)
  state = jax.jit(make_dml_init(cohort, objective, tx, input_shape=(D,)))(np.int32(0))
  if edit is not None:
    state = edit(cohort, state)
  step = jax.jit(make_dml_step(cohort, objective, tx, temperature=T, weight=w,
                               nonfinite=nonfinite))
  new, metrics = step(state, _batch())
  out = cohort, state, new, jax.device_get(metrics)
  if edit is None:
    _STEPS[key] = out
  return out


_STEPS = {}   # one step per setting, shared by the tests that read it


def _reference(cohort, state, *, lr, T, w):
  """K separate computations: each student's logits, then each student's own loss with
  the others' predictions as numpy constants, its gradient and one SGD step."""
  x = _batch()['x']
  params = [cohort.take(state.params['student'], k) for k in range(cohort.size)]
  apply = [cohort.student(k).apply for k in range(cohort.size)]
  model_state = [cohort.take(state.model_state, k) for k in range(cohort.size)]
  logits = np.stack([np.asarray(apply[k](params[k], model_state[k], x, train=True)[0].logits)
                     for k in range(cohort.size)])
  probs = np.exp(np_log_softmax(logits.astype(np.float64) / T))
  valid = MASK & (LABELS >= 0)
  new = []
  for k in range(cohort.size):
    others = [probs[j] for j in range(cohort.size) if j != k]

    def loss(p, k=k, others=others):
      z = apply[k](p, model_state[k], x, train=True)[0].logits
      logq = jax.nn.log_softmax(z)
      ce = -jnp.sum(jnp.where(valid, jnp.take_along_axis(
          logq, jnp.maximum(jnp.asarray(LABELS), 0)[:, None], 1)[:, 0], 0)) / valid.sum()
      logq_t = jax.nn.log_softmax(z / T)
      kl = sum(T * T * jnp.sum(o * (np.log(o) - logq_t), -1) for o in others) / len(others)
      return ce + w * jnp.sum(jnp.where(MASK, kl, 0)) / MASK.sum()

    grads = jax.grad(loss)(params[k])
    new.append(jax.tree.map(lambda a, g: a - lr * g, params[k], grads))
  return logits, new


@pytest.mark.parametrize('models,stack,T,w', [
    ([MLP] * 3, None, 2.0, 0.5),       # one architecture: stacked, vmapped
    ([MLP] * 3, False, 2.0, 0.5),      # the same students listed: a loop
    (MIXED, None, 1.0, 1.0),           # different architectures: a loop
], ids=['stacked', 'listed', 'mixed'])
def test_step_equals_separate_student_steps(models, stack, T, w):
  lr = 0.1
  cohort, state, new, metrics = _one_step(models, stack=stack, lr=lr, T=T, w=w)
  assert cohort.stacked == (stack is None and models[0] == models[-1])
  logits, want = _reference(cohort, state, lr=lr, T=T, w=w)
  losses, mutual = np_losses(logits, LABELS, MASK, T, w)
  for k in range(cohort.size):
    got = cohort.take(new.params['student'], k)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-5, atol=1e-6), got, want[k])
    s, c = metrics[f'student_{k}/loss']
    assert float(s) / float(c) == pytest.approx(losses[k], rel=1e-5)
    s, c = metrics[f'student_{k}/loss/mutual']
    assert float(s) / float(c) == pytest.approx(mutual[k], rel=1e-5, abs=1e-7)
    s, c = metrics[f'student_{k}/accuracy']
    valid = MASK & (LABELS >= 0)
    assert (float(s), float(c)) == ((logits[k].argmax(-1) == LABELS)[valid].sum(), valid.sum())
  s, c = metrics['loss']
  assert float(s) / float(c) == pytest.approx(losses.mean(), rel=1e-5)
  assert int(new.step) == 1 and float(metrics['nonfinite'][0]) == 0.0


def test_stacked_and_listed_cohorts_agree():
  _, _, a, ma = _one_step([MLP] * 3, T=2.0, w=0.5)
  _, _, b, mb = _one_step([MLP] * 3, stack=False, T=2.0, w=0.5)
  for k in range(3):
    jax.tree.map(lambda x, y: np.testing.assert_allclose(x[k], y, rtol=1e-6, atol=1e-7),
                 a.params['student'], b.params['student'][k])
  assert ma.keys() == mb.keys()


@pytest.mark.parametrize('nonfinite', ['stop', 'skip'])
def test_a_nonfinite_student(nonfinite):
  """Student 1's parameters are NaN. Its loss is not finite: 'stop' flags the step,
  'skip' keeps that student as it was and updates the others (kd leaves non-finite
  targets out, so a diverged peer stops teaching instead of poisoning its peers)."""
  def poison(cohort, state):
    params = jax.tree.map(lambda a: a.at[1].set(jnp.nan), state.params['student'])
    return state.replace(params=dict(state.params, student=params))

  cohort, state, new, metrics = _one_step([MLP] * 3, nonfinite=nonfinite, edit=poison)
  assert int(new.step) == 1
  flag = 'nonfinite' if nonfinite == 'stop' else 'skipped'
  assert (float(metrics[flag][0]), float(metrics[flag][1])) == (1.0, 3.0)
  for k in (0, 2):
    assert np.isfinite(float(metrics[f'student_{k}/loss'][0]))
  if nonfinite == 'skip':
    same = lambda k: all(np.array_equal(a, b, equal_nan=True) for a, b in zip(
        jax.tree.leaves(cohort.take(state.params['student'], k)),
        jax.tree.leaves(cohort.take(new.params['student'], k))))
    assert same(1) and not same(0) and not same(2)
    assert float(metrics['student_1/loss'][0]) == 0.0


# --------------------------------------------------------------------------- config checks

def _config(**scheme):
  import ml_collections
  return ml_collections.ConfigDict({'scheme': scheme})


@pytest.mark.parametrize('scheme,message', [
    (dict(name='dml', num_students=1), 'num_students must be an integer >= 2'),
    (dict(name='dml', num_students=2.5), 'num_students must be an integer >= 2'),
    (dict(name='dml', temperature=0.0), 'temperature must be positive'),
    (dict(name='dml', weight=-1.0), 'weight must be >= 0'),
    (dict(name='dml', students=[MLP]), 'lists 1 models but config.scheme.num_students is 4'),
    (dict(name='dml', students=['mlp', 'mlp']), 'must be a list of model configs'),
    (dict(name='dml', peers=3), 'config.scheme.peers is not a DML option'),
])
def test_bad_scheme_options(scheme, message):
  with pytest.raises(UserError, match=message):
    scheme_options(_config(**scheme))


def test_scheme_defaults():
  options = scheme_options(_config(name='dml', num_students=2, students=[MLP, MLP]))
  assert options['num_students'] == 2 and options['temperature'] == 1.0
  assert dml_scheme().to_dict() == {'name': 'dml', 'num_students': 4, 'temperature': 1.0,
                                    'weight': 1.0, 'students': []}


# --------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize('override,message', [
    ('--config.scheme.num_students=1', 'config.scheme.num_students must be an integer >= 2'),
    ('--config.scheme.name=ensemble', "config.scheme.name 'ensemble' is not a scheme"),
])
def test_cli_refuses_a_bad_scheme_and_writes_nothing(paths, tmp_path, kdjax_main, override,
                                                     message):
  wd = tmp_path / 'run'
  out = kdjax_main(['train', '--config', f'{paths["configs"]}/mnist1d/dml.py:tiny',
                    '--workdir', str(wd), override], check=False)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('kdjax: error: ') and message in lines[0]
  assert not wd.exists()


# One run, uninterrupted: the end-to-end check and the reference of the resume test.
STEPS = 300


def _args(paths, data_dir):
  return ['train', '--config', f'{paths["configs"]}/mnist1d/dml.py:tiny',
          f'--config.data.name={paths["small"]}', f'--config.data.data_dir={data_dir}',
          '--config.progress=false', f'--config.num_steps={STEPS}',
          '--config.checkpoint_every=100', '--config.log_every=50', '--config.eval_every=150',
          '--config.steps_per_call=25']


@pytest.fixture(scope='module')
def reference(paths, data_dir, tmp_path_factory):
  from kdjax.cli import main
  wd = str(tmp_path_factory.mktemp('dml') / 'ref')
  assert main([*_args(paths, data_dir), '--workdir', wd]) == 0
  return wd


def test_end_to_end_writes_each_students_accuracy(reference):
  summary = json.load(open(os.path.join(reference, 'summary.json')))
  assert summary['step'] == STEPS and summary['scheme'] == 'dml' and summary['stacked']
  accs = summary['student_accuracies']
  assert len(accs) == 4 and all(0.2 < a <= 1.0 for a in accs)   # 10 classes: chance 0.1
  assert summary['eval_accuracy'] == pytest.approx(np.mean(accs))
  assert 0.2 < summary['ensemble_accuracy'] <= 1.0
  assert len(summary['student_losses']) == 4 and summary['ensemble_loss'] > 0
  rows = [json.loads(l) for l in open(os.path.join(reference, 'metrics.jsonl'))]
  train = [r for r in rows if r['split'] == 'train']
  assert [r['step'] for r in train] == list(range(50, STEPS + 1, 50))
  assert {'loss/mutual', 'student_3/loss', 'student_0/accuracy'} <= set(train[-1])
  assert [r['step'] for r in rows if r['split'] == 'eval'] == [150, 300]
  assert sorted(os.listdir(os.path.join(reference, 'checkpoints'))) == ['100', '200', '300']
  assert os.path.exists(os.path.join(reference, 'learning_curves.png'))


def _train_rows(wd):
  return [{k: v for k, v in json.loads(l).items() if k != 'examples_per_sec'}
          for l in open(os.path.join(wd, 'metrics.jsonl'))]


def _params(wd):
  from kdjax.workdir import restore_subtree
  return jax.tree.leaves(restore_subtree(wd, STEPS, ('params', 'student')))


def test_kill9_resume_matches_uninterrupted(reference, paths, data_dir, tmp_path, kdjax_main,
                                            kill9):
  wd = str(tmp_path / 'killed')
  killed_at = kill9([*_args(paths, data_dir), '--workdir', wd],
                    os.path.join(wd, 'checkpoints'), timeout=120)
  assert killed_at is not None and killed_at < STEPS, 'the run ended before it could be killed'
  out = kdjax_main([*_args(paths, data_dir), '--workdir', wd])
  assert 'resuming from step' in out.stdout
  a = json.load(open(os.path.join(reference, 'summary.json')))
  b = json.load(open(os.path.join(wd, 'summary.json')))
  assert b['resumed_from'] is not None and b['resumed_from'] < STEPS
  for key in ('train_loss', 'eval_accuracy', 'student_accuracies', 'student_losses',
              'ensemble_accuracy', 'ensemble_loss'):
    assert a[key] == b[key], key
  assert _train_rows(reference) == _train_rows(wd)
  assert all(np.array_equal(x, y) for x, y in zip(_params(reference), _params(wd)))


def test_rerun_from_an_earlier_checkpoint_matches(reference, paths, data_dir, tmp_path,
                                                  kdjax_main):
  """The resume without a process to kill: the reference workdir cut back to step 100."""
  wd = str(tmp_path / 'cut')
  shutil.copytree(reference, wd)
  for step in ('200', '300'):
    shutil.rmtree(os.path.join(wd, 'checkpoints', step))
  os.remove(os.path.join(wd, 'summary.json'))
  out = kdjax_main([*_args(paths, data_dir), '--workdir', wd])
  assert 'resuming from step 100' in out.stdout
  assert _train_rows(reference) == _train_rows(wd)
  assert json.load(open(os.path.join(wd, 'summary.json')))['student_accuracies'] == \
      json.load(open(os.path.join(reference, 'summary.json')))['student_accuracies']
  assert all(np.array_equal(x, y) for x, y in zip(_params(reference), _params(wd)))
