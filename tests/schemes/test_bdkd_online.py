"""Online BD-KD (``kdjax.schemes.bdkd_online``): the two-member step against each
member's own loss differentiated alone, the loss values against numpy written from the
formula, a one-member config refused (exit 2, nothing written), and a tiny run that
resumes after ``kill -9`` to the uninterrupted run's result."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.losses import bdkd
from kdjax.losses import build_objective
from kdjax.losses import kd
from kdjax.schemes import bdkd_online_losses
from kdjax.schemes import make_bdkd_online_step
from kdjax.schemes import make_cohort
from kdjax.schemes import make_dml_init

D, C, B = 5, 4, 6
LABELS = np.array([0, 1, 2, 3, -1, 1], np.int32)      # one unlabeled example
MASK = np.array([1, 1, 1, 1, 1, 0], bool)             # one padded example
STUDENT = {'name': 'mlp', 'kwargs': {'hidden': (8,)}}
TEACHER = {'name': 'mlp', 'kwargs': {'hidden': (12, 10)}}


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_terms(s, t, T, teacher_loss, eps=1e-6):
  """Per example: the student's balanced term T^2 [w KL(p||q) + (1 - w) KL(q||p)],
  w = (H(p) + eps) / (H(p) + H(q) + 2 eps) (p teacher, q student, tempered;
  kdjax.losses.bdkd's rule), and the teacher's T^2 KL(q||p) ('kl': the paper's reverse
  KL as the teacher's regularizer) or the same balanced value ('bdkd')."""
  lp, lq = np_log_softmax(t.astype(np.float64) / T), np_log_softmax(s.astype(np.float64) / T)
  p, q = np.exp(lp), np.exp(lq)
  hp, hq = -(p * lp).sum(-1), -(q * lq).sum(-1)
  w = (hp + eps) / (hp + hq + 2 * eps)
  fwd, rev = (p * (lp - lq)).sum(-1), (q * (lq - lp)).sum(-1)
  student = T * T * (w * fwd + (1 - w) * rev)
  teacher = T * T * rev if teacher_loss == 'kl' else student
  return student, teacher


@pytest.mark.parametrize('teacher_loss', ['kl', 'bdkd'])
def test_terms_match_numpy(teacher_loss):
  rng = np.random.default_rng(0)
  s, t = rng.normal(size=(2, B, C)).astype(np.float32) * 2
  got = bdkd_online_losses(jnp.asarray(s), jnp.asarray(t), temperature=2.0,
                           teacher_loss=teacher_loss, where=jnp.asarray(MASK))
  want = np_terms(s, t, 2.0, teacher_loss)
  for g, w in zip(got, want):
    np.testing.assert_allclose(np.asarray(g), w * MASK, rtol=1e-5, atol=1e-6)


def test_each_term_moves_one_side_only():
  rng = np.random.default_rng(1)
  s, t = (jnp.asarray(a) for a in rng.normal(size=(2, B, C)).astype(np.float32))
  for k, who in ((0, 'student'), (1, 'teacher')):
    gs, gt = jax.grad(lambda s, t: jnp.sum(bdkd_online_losses(s, t)[k]), (0, 1))(s, t)
    moved, still = (gs, gt) if who == 'student' else (gt, gs)
    assert np.any(np.asarray(moved) != 0) and np.all(np.asarray(still) == 0)


# --------------------------------------------------------------------------- the step

def _batch():
  x = np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)
  return {'x': jnp.asarray(x), 'label': jnp.asarray(LABELS), 'mask': jnp.asarray(MASK)}


def test_step_equals_each_members_own_gradient():
  """One step of the cohort == for each member, jax.grad of its own loss (CE + its
  weighted term, the other member's logits a constant), then one SGD step. (The 'bdkd'
  teacher term is the same code path; its values are checked in test_terms_match_numpy.)"""
  lr, T, w, wt, teacher_loss = 0.1, 2.0, 0.7, 0.4, 'kl'
  cohort = make_cohort([STUDENT, TEACHER], num_classes=C, input_shape=(D,), stack=False)
  objective = build_objective({'ce': {}})
  tx = optax.sgd(lr)
  state = jax.jit(make_dml_init(cohort, objective, tx, input_shape=(D,)))(np.int32(0))
  step = jax.jit(make_bdkd_online_step(cohort, objective, tx, temperature=T, weight=w,
                                       teacher_weight=wt, teacher_loss=teacher_loss))
  new, metrics = step(state, _batch())
  metrics = jax.device_get(metrics)

  x = _batch()['x']
  apply = [cohort.student(k).apply for k in range(2)]
  params, mstate = state.params['student'], state.model_state
  z = [apply[k](params[k], mstate[k], x, train=True)[0].logits for k in range(2)]
  valid = MASK & (LABELS >= 0)

  def ce(logits):
    logq = jax.nn.log_softmax(logits)
    picked = jnp.take_along_axis(logq, jnp.maximum(jnp.asarray(LABELS), 0)[:, None], 1)[:, 0]
    return -jnp.sum(jnp.where(valid, picked, 0)) / valid.sum()

  def student_loss(p):
    s = apply[0](p, mstate[0], x, train=True)[0].logits
    return ce(s) + w * jnp.sum(bdkd(s, z[1], temperature=T, where=MASK)) / MASK.sum()

  def teacher_loss_fn(p):
    t = apply[1](p, mstate[1], x, train=True)[0].logits
    term = (kd(t, z[0], temperature=T, where=MASK) if teacher_loss == 'kl'
            else bdkd(z[0], t, temperature=T, side='teacher', where=MASK))
    return ce(t) + wt * jnp.sum(term) / MASK.sum()

  for k, fn in enumerate((student_loss, teacher_loss_fn)):
    want = jax.tree.map(lambda a, g: a - lr * g, params[k], jax.grad(fn)(params[k]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                         rtol=1e-5, atol=1e-6),
                 new.params['student'][k], want)

  # the loss values against numpy from the formula
  s_np, t_np = (np.asarray(a) for a in z)
  s_term, t_term = np_terms(s_np, t_np, T, teacher_loss)
  logq = [np_log_softmax(a.astype(np.float64)) for a in (s_np, t_np)]
  ce_np = [-(l[valid, LABELS[valid]]).mean() for l in logq]
  for prefix, ce_k, term, weight in (('', ce_np[0], s_term, w),
                                     ('teacher/', ce_np[1], t_term, wt)):
    distill = (term * MASK).sum() / MASK.sum()
    got = metrics[f'{prefix}loss/distill']
    assert float(got[0]) / float(got[1]) == pytest.approx(distill, rel=1e-5)
    got = metrics[f'{prefix}loss']
    assert float(got[0]) / float(got[1]) == pytest.approx(ce_k + weight * distill, rel=1e-5)
  assert int(new.step) == 1 and tuple(float(v) for v in metrics['nonfinite']) == (0.0, 2.0)


# --------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize('teacher,message', [
    ("{'name': 'mlp'}", "the student's own architecture"),      # one architecture
    ('{}', 'config.scheme.teacher must be a model config'),      # no teacher at all
])
def test_one_member_is_refused_and_nothing_written(paths, tmp_path, kdjax_main, teacher,
                                                   message):
  wd = tmp_path / 'run'
  out = kdjax_main(['train', '--config', f'{paths["configs"]}/mnist1d/bdkd_online.py:tiny',
                    '--workdir', str(wd), f'--config.scheme.teacher={teacher}'], check=False)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('kdjax: error: ') and message in lines[0]
  assert not wd.exists()


STEPS = 20


def _args(paths, data_dir):
  return ['train', '--config', f'{paths["configs"]}/mnist1d/bdkd_online.py:tiny',
          f'--config.data.name={paths["small"]}', f'--config.data.data_dir={data_dir}',
          '--config.progress=false', f'--config.num_steps={STEPS}',
          '--config.checkpoint_every=10', '--config.log_every=10', '--config.eval_every=20',
          '--config.steps_per_call=10', '--config.batch_size=32',
          # a small MLP teacher: another architecture, cheaper to compile than the CNN
          "--config.scheme.teacher={'name': 'mlp', 'kwargs': {'hidden': (48, 48)}}"]


def _rows(wd):
  return [{k: v for k, v in json.loads(l).items() if k != 'examples_per_sec'}
          for l in open(os.path.join(wd, 'metrics.jsonl'))]


def _params(wd):
  from kdjax.workdir import restore_subtree
  return jax.tree.leaves(restore_subtree(wd, STEPS, ('params', 'student')))


def test_kill9_resume_matches_uninterrupted(paths, data_dir, tmp_path, kdjax_main, kill9):
  ref = str(tmp_path / 'ref')
  kdjax_main([*_args(paths, data_dir), '--workdir', ref])
  summary = json.load(open(os.path.join(ref, 'summary.json')))
  assert summary['step'] == STEPS and summary['scheme'] == 'bdkd_online'
  assert 0.0 < summary['eval_accuracy'] <= 1.0 and 0.0 < summary['teacher_accuracy'] <= 1.0
  assert {'teacher/accuracy', 'loss/distill', 'teacher/loss/distill'} <= set(_rows(ref)[0])

  wd = str(tmp_path / 'killed')
  killed_at = kill9([*_args(paths, data_dir), '--workdir', wd],
                    os.path.join(wd, 'checkpoints'), timeout=120)
  assert killed_at is not None and killed_at < STEPS, 'the run ended before it could be killed'
  out = kdjax_main([*_args(paths, data_dir), '--workdir', wd])
  assert 'resuming from step' in out.stdout
  resumed = json.load(open(os.path.join(wd, 'summary.json')))
  assert resumed['resumed_from'] is not None and resumed['resumed_from'] < STEPS
  for key in ('train_loss', 'eval_accuracy', 'eval_loss', 'teacher_accuracy',
              'teacher_eval_loss'):
    assert summary[key] == resumed[key], key
  assert _rows(ref) == _rows(wd)
  assert all(np.array_equal(a, b) for a, b in zip(_params(ref), _params(wd)))
