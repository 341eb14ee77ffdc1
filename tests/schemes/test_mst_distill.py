"""MST-Distill (``kdjax.schemes.mst_distill``): the router's top-k weights, the student's
routed target and losses against numpy recomputed from the experts' logits and the
router's weights, teachers of another label space refused without a map (exit 2, nothing
written), and a tiny run that resumes after ``kill -9`` to the uninterrupted result."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.losses import build_objective
from kdjax.models import from_config
from kdjax.schemes import load_balance
from kdjax.schemes import make_mst_init
from kdjax.schemes import make_mst_step
from kdjax.schemes import router_probs
from kdjax.schemes import top_k_weights
from kdjax.schemes.mst_distill import Expert
from kdjax.schemes.mst_distill import init_router
from kdjax.schemes.multi_teacher import label_map_matrix
from kdjax.schemes.cross import spectrogram

L, C, B = 40, 4, 6
LABELS = np.array([0, 1, 2, 3, -1, 1], np.int32)      # one unlabeled example
MASK = np.array([1, 1, 1, 1, 1, 0], bool)             # one padded example
MAP6 = [0, 1, 2, 3, 3, -1]                             # a 6-class teacher into 4 classes


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def np_softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


@pytest.mark.parametrize('k', [1, 2, 3])
def test_routing_weights_sum_to_one_with_only_top_k_nonzero(k):
  rng = np.random.default_rng(k)
  router = init_router(jax.random.key(k), C, 5)
  probs = router_probs(router, jnp.asarray(rng.normal(size=(7, C)), jnp.float32))
  np.testing.assert_allclose(np.asarray(probs).sum(-1), 1.0, rtol=1e-6)
  w = np.asarray(top_k_weights(probs, k))
  np.testing.assert_allclose(w.sum(-1), 1.0, rtol=1e-6)
  assert ((w > 0).sum(-1) == k).all()
  top = np.argsort(-np.asarray(probs), axis=-1)[:, :k]
  for b in range(7):
    assert set(np.flatnonzero(w[b])) == set(top[b]) and np.allclose(w[b, top[b]], 1 / k)


def test_load_balance_against_numpy():
  p = np_softmax(np.random.default_rng(0).normal(size=(B, 3)))
  mean = p[MASK].mean(0)
  want = (1 / 3 * (np.log(1 / 3) - np.log(mean))).sum() / 3
  got = load_balance(jnp.asarray(p, jnp.float32), jnp.asarray(MASK))
  assert float(got) == pytest.approx(want, rel=1e-5)


# --------------------------------------------------------------------------- the step

def _teachers():
  """Two frozen MLP teachers: one on the raw signal in the student's 4 classes, one on
  the spectrogram with 6 classes mapped by MAP6."""
  out = []
  for view, classes, seed in (('identity', C, 1), ('spectrogram', 6, 2)):
    shape = (L, 1) if view == 'identity' else (9, 5)
    apply, init, _ = from_config({'name': 'mlp', 'kwargs': {'hidden': (8,)}},
                                 num_classes=classes, input_shape=shape)
    variables = init(seed)
    matrix = None if classes == C else label_map_matrix(MAP6, classes, C)
    out.append(Expert(apply, variables, view, matrix))
  return out


def _np_expert_logits(t, x, mask=None):
  v = x if t.view == 'identity' else np.asarray(spectrogram(jnp.asarray(x)))
  if mask is not None:
    flat = v.reshape(len(v), -1)
    h = np.maximum(flat @ np.asarray(mask['w1']) + np.asarray(mask['b1']), 0)
    flat = flat / (1 + np.exp(-(h @ np.asarray(mask['w2']) + np.asarray(mask['b2']))))
    v = flat.reshape(v.shape)
  z = np.asarray(t.apply(t.variables[0], t.variables[1], jnp.asarray(v, jnp.float32),
                         train=False)[0].logits, np.float64)
  if t.matrix is None:
    return z
  return np.log(np.maximum(np_softmax(z) @ np.asarray(t.matrix, np.float64), 1e-30))


@pytest.mark.parametrize('k', [1, 2])
def test_student_target_and_losses_match_numpy(k):
  T, w, wlb, wm = 4.0, 0.8, 0.5, 0.3
  teachers = _teachers()
  apply, init_params, _ = from_config({'name': 'mlp', 'kwargs': {'hidden': (8,)}},
                                      num_classes=C, input_shape=(L, 1))
  objective = build_objective({'ce': {}})
  tx = optax.sgd(0.1)
  init = make_mst_init(init_params, apply, objective, tx, input_shape=(L, 1),
                       num_classes=C, mask_sizes=[L, 45], num_experts=4, mask_hidden=6)
  state = jax.jit(init)(np.int32(0))
  # random mask output layers, so the masked experts differ from the unmasked ones
  masks = tuple(dict(m, w2=jax.random.normal(jax.random.key(i), m['w2'].shape))
                for i, m in enumerate(state.params['masks']))
  state = state.replace(params=dict(state.params, masks=masks))
  step = jax.jit(make_mst_step(apply, objective, tx, teachers=teachers, top_k=k,
                               temperature=T, weight=w, balance_weight=wlb, mask_weight=wm))
  x = np.random.default_rng(0).normal(size=(B, L, 1)).astype(np.float32)
  batch = {'x': jnp.asarray(x), 'label': jnp.asarray(LABELS), 'mask': jnp.asarray(MASK)}
  new, metrics = step(state, batch)
  metrics = jax.device_get(metrics)

  s = np.asarray(apply(state.params['student'], state.model_state, batch['x'],
                       train=True)[0].logits, np.float64)
  z = np.stack([_np_expert_logits(t, x) for t in teachers]
               + [_np_expert_logits(t, x, m) for t, m in zip(teachers, masks)])   # [E, B, C]
  r = state.params['router']
  h = s @ np.asarray(r['fc1']['w']) + np.asarray(r['fc1']['b'])
  probs = np_softmax(h @ np.asarray(r['fc2']['w']) + np.asarray(r['fc2']['b']))
  weights = np.zeros_like(probs)
  for b, top in enumerate(np.argsort(-probs, axis=-1)[:, :k]):
    weights[b, top] = 1 / k
  target = np.einsum('ebc,be->bc', np_softmax(z / T), weights)          # the routed target
  log_q = np.log(np_softmax(s / T))
  kd = T * T * (target * (np.log(target) - log_q)).sum(-1)
  kd_mean = kd[MASK].mean()
  got = metrics['loss/kd']
  assert float(got[0]) / float(got[1]) == pytest.approx(kd_mean, rel=1e-4)
  valid = MASK & (LABELS >= 0)
  ce = -np.log(np_softmax(s))[valid, LABELS[valid]].mean()
  got = metrics['loss']
  assert float(got[0]) / float(got[1]) == pytest.approx(ce + w * kd_mean, rel=1e-4)
  # the masks: T^2 KL(p_s^T || p_masked^T), summed over the teachers
  p_s = np_softmax(s / T)
  mask_kl = sum((T * T * (p_s * (np.log(p_s) - np.log(np_softmax(z[e] / T)))).sum(-1)[MASK]
                 ).mean() for e in (2, 3))
  assert float(metrics['mask/loss'][0]) == pytest.approx(mask_kl, rel=1e-4)
  mean = probs[MASK].mean(0)
  assert float(metrics['router/balance'][0]) == pytest.approx(
      (0.25 * (np.log(0.25) - np.log(mean))).sum() / 4, rel=1e-4)
  for e in range(4):
    got = metrics[f'route/expert_{e}']
    assert float(got[0]) == pytest.approx(weights[MASK, e].sum(), abs=1e-6)
  # the student's update is the gradient of its own loss (CE + w KD) alone
  def student_loss(p):
    z_s = apply(p, state.model_state, batch['x'], train=True)[0].logits
    lq = jax.nn.log_softmax(z_s)
    picked = jnp.take_along_axis(lq, jnp.maximum(batch['label'], 0)[:, None], 1)[:, 0]
    ce = -jnp.sum(jnp.where(valid, picked, 0)) / valid.sum()
    kl = jnp.sum(jnp.asarray(target, jnp.float32) * (
        jnp.log(jnp.asarray(target, jnp.float32)) - jax.nn.log_softmax(z_s / T)), -1)
    return ce + w * T * T * jnp.sum(jnp.where(MASK, kl, 0)) / MASK.sum()

  g = jax.grad(student_loss)(state.params['student'])
  jax.tree.map(lambda a, gg, b: np.testing.assert_allclose(
      np.asarray(a) - 0.1 * np.asarray(gg), np.asarray(b), rtol=1e-4, atol=1e-6),
      state.params['student'], g, new.params['student'])


# --------------------------------------------------------------------------- the CLI

def _args(paths, data_dir, teachers, *extra):
  return ['train', '--config', f'{paths["configs"]}/mnist1d/mst_distill.py:tiny',
          f'--config.data.name={paths["small"]}', f'--config.data.data_dir={data_dir}',
          '--config.progress=false', f'--config.scheme.teachers={teachers!r}', *extra]


def test_teachers_of_another_label_space_refused_without_a_map(paths, data_dir, teacher_dir,
                                                              tmp_path, kdjax_main):
  """A copy of the session teacher whose config.json says it predicts 5 coarse classes
  (a cross-task run): refused from its config.json, before any weights or workdir."""
  coarse = str(tmp_path / 'coarse')
  shutil.copytree(teacher_dir, coarse)
  config = json.load(open(os.path.join(coarse, 'config.json')))
  config['scheme'] = {'name': 'cross', 'student_view': 'identity', 'teacher_view': 'identity',
                      'student_labels': [0, 0, 1, 1, 2, 2, 3, 3, 4, 4], 'label_map': None}
  json.dump(config, open(os.path.join(coarse, 'config.json'), 'w'))
  wd = tmp_path / 'run'
  out = kdjax_main([*_args(paths, data_dir, [teacher_dir, coarse]), '--workdir', str(wd)],
                   check=False)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('kdjax: error: '), out.stderr
  assert 'predict 10, 5 classes' in lines[0] and 'teachers[1] a label_map' in lines[0]
  assert not wd.exists()


STEPS = 20


def _run_args(paths, data_dir, teachers):
  return _args(paths, data_dir, teachers, f'--config.num_steps={STEPS}',
               '--config.checkpoint_every=10', '--config.log_every=10',
               '--config.eval_every=20', '--config.steps_per_call=10',
               '--config.batch_size=32')


def _rows(wd):
  return [{k: v for k, v in json.loads(l).items() if k != 'examples_per_sec'}
          for l in open(os.path.join(wd, 'metrics.jsonl'))]


def _params(wd):
  from kdjax.workdir import restore_subtree
  return jax.tree.leaves(restore_subtree(wd, STEPS, ('params',)))


def test_kill9_resume_matches_uninterrupted(paths, data_dir, teacher_dir, other_teacher_dir,
                                            tmp_path, kdjax_main, kill9):
  teachers = [teacher_dir, other_teacher_dir]
  ref = str(tmp_path / 'ref')
  kdjax_main([*_run_args(paths, data_dir, teachers), '--workdir', ref])
  summary = json.load(open(os.path.join(ref, 'summary.json')))
  assert summary['step'] == STEPS and summary['scheme'] == 'mst_distill'
  assert len(summary['experts']) == 4 and len(summary['expert_accuracies']) == 4
  assert sum(summary['routing']) == pytest.approx(1.0)
  assert all(0.0 <= a <= 1.0 for a in summary['expert_accuracies'])

  wd = str(tmp_path / 'killed')
  killed_at = kill9([*_run_args(paths, data_dir, teachers), '--workdir', wd],
                    os.path.join(wd, 'checkpoints'), timeout=180)
  assert killed_at is not None and killed_at < STEPS, 'the run ended before it could be killed'
  out = kdjax_main([*_run_args(paths, data_dir, teachers), '--workdir', wd])
  assert 'resuming from step' in out.stdout
  resumed = json.load(open(os.path.join(wd, 'summary.json')))
  assert resumed['resumed_from'] is not None and resumed['resumed_from'] < STEPS
  for key in ('train_loss', 'eval_accuracy', 'eval_loss', 'expert_accuracies', 'routing'):
    assert summary[key] == resumed[key], key
  assert _rows(ref) == _rows(wd)
  assert all(np.array_equal(a, b) for a, b in zip(_params(ref), _params(wd)))
