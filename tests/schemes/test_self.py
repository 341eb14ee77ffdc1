"""Self-distillation (``kdjax.schemes.self_distill``: BYOT, the EMA mean teacher, snapshot
distillation; the Tf-KD and ground-truth-guided configs on the stages scheme): the
losses and the EMA update against numpy, one step of each scheme against a numpy
recomputation, bad configs refused in one line with nothing written, and runs through
the CLI (the mean teacher's resumed from a checkpoint to the uninterrupted parameters
and EMA weights)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from kdjax.config import load_config_file
from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.models import from_config
from kdjax.schemes import byot_loss
from kdjax.schemes import cyclic_cosine
from kdjax.schemes import ema_update
from kdjax.schemes import make_self_init
from kdjax.schemes import make_self_step
from kdjax.schemes import plan_stages
from kdjax.schemes import rampup
from kdjax.schemes import self_options
from kdjax.schemes import self_scheme
from kdjax.schemes.self_distill import make_method

D, C, B = 6, 4, 5
LABELS = np.array([0, 1, 2, 3, -1], np.int32)     # one unlabeled example
MASK = np.array([1, 1, 1, 1, 0], bool)            # ... and it is padding
MLP = {'name': 'mlp', 'kwargs': {'hidden': (8, 7)}}


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def np_ce(z, y):
  return -np_log_softmax(z)[np.arange(len(y)), np.maximum(y, 0)]


def np_kl(t, s, T):
  lp, lq = np_log_softmax(t / T), np_log_softmax(s / T)
  return (np.exp(lp) * (lp - lq)).sum(-1)


# --------------------------------------------------------------------------- formulas

def test_byot_loss_matches_numpy():
  rng = np.random.default_rng(0)
  z, zn = rng.normal(size=(B, C)), rng.normal(size=(B, C)) * 2
  h, f = rng.normal(size=(B, 3)), rng.normal(size=(B, 3))
  got = byot_loss(jnp.asarray(z), jnp.asarray(zn), jnp.asarray(h), jnp.asarray(f),
                  jnp.asarray(LABELS), alpha=0.3, temperature=3.0, feature_weight=0.03)
  want = (0.7 * np.where(LABELS >= 0, np_ce(z, LABELS), 0.0) + 0.3 * np_kl(zn, z, 3.0)
          + 0.03 * ((h - f) ** 2).sum(-1))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # the deepest classifier and features are targets: no gradient reaches them
  g = jax.grad(lambda a, b: byot_loss(a, b, jnp.asarray(h), jnp.asarray(f), jnp.asarray(LABELS),
                                      alpha=0.3, temperature=3.0, feature_weight=0.03).sum(),
               argnums=(0, 1))(jnp.asarray(z), jnp.asarray(zn))
  assert np.abs(g[0]).sum() > 0 and np.abs(g[1]).sum() == 0


def test_ema_update_rampup_and_cyclic_rate_match_numpy():
  teacher, t = {'w': jnp.zeros(3), 'n': jnp.int32(0)}, np.zeros(3)
  for step in range(1, 6):
    student = {'w': jnp.full(3, float(step)), 'n': jnp.int32(step)}
    teacher = ema_update(teacher, student, jnp.int32(step), 0.6)
    d = min(0.6, 1 - 1 / (step + 1))
    t = d * t + (1 - d) * step
    np.testing.assert_allclose(teacher['w'], t, rtol=1e-6)
    assert int(teacher['n']) == step          # counters follow the student
  assert float(rampup(jnp.int32(5), 10)) == pytest.approx(np.exp(-5 * 0.25))
  f = cyclic_cosine(5)
  np.testing.assert_allclose([float(f(jnp.int32(s))) for s in range(11)],
                             [0.5 * (1 + np.cos(np.pi * (s % 5) / 5)) for s in range(11)],
                             rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- one step

def _setup(name, lr=0.1, **options):
  apply, init_params, _ = from_config(MLP, num_classes=C, input_shape=(D,))
  objective = build_objective({'ce': {'weight': 1.0}})
  tx = optax.sgd(lr)
  opts = self_options(ml_collections.ConfigDict({'num_steps': 4,
                                                 'scheme': self_scheme(name, **options)}))
  if name == 'snapshot':
    opts['cycle_steps'] = 2
  method = make_method(name, opts, apply)
  init = make_self_init(init_params, apply, objective, tx, method, input_shape=(D,))
  step = jax.jit(make_self_step(apply, objective, tx, method))
  return apply, init(0), step


def _batch(seed=0):
  x = np.random.default_rng(seed).normal(size=(B, D)).astype(np.float32)
  return {'x': x, 'label': LABELS, 'mask': MASK}


def _np_mlp(p, x):
  h1 = np.maximum(x @ p['hidden'][0]['kernel'] + p['hidden'][0]['bias'], 0)
  h2 = np.maximum(h1 @ p['hidden'][1]['kernel'] + p['hidden'][1]['bias'], 0)
  return h2 @ p['head']['kernel'] + p['head']['bias'], h1, h2


def test_byot_step_loss_is_deepest_ce_plus_every_heads_loss():
  apply, state, step = _setup('byot', heads=[1])
  batch = _batch()
  p = jax.tree.map(np.asarray, jax.device_get(state.params))
  z, h1, h2 = _np_mlp(p['student'], batch['x'])
  head = p['heads']['stage1']
  hb = np.maximum(h1 @ head['bottleneck']['w'] + head['bottleneck']['b'], 0)
  zh = hb @ head['fc']['w'] + head['fc']['b']
  real = MASK & (LABELS >= 0)
  ce = np_ce(z, LABELS)[real].mean()
  per = (0.7 * np.where(LABELS >= 0, np_ce(zh, LABELS), 0) + 0.3 * np_kl(z, zh, 3.0)
         + 0.03 * ((hb - h2) ** 2).sum(-1))
  want = ce + per[MASK].mean()
  _, metrics = step(state, batch)
  total, n = map(float, metrics['loss'])
  assert total / n == pytest.approx(want, rel=1e-5)


def test_mean_teacher_step_keeps_the_ema_of_the_students_weights():
  apply, state, step = _setup('mean_teacher', lr=1.0, decay=0.5, temperature=2.0, weight=0.7)
  ema = jax.tree.map(np.asarray, state.params['student'])
  # the first step's KD term: the teacher (the initial weights) is the student itself
  _, m = step(state, _batch(0))
  assert float(m['loss/self'][0]) == pytest.approx(0.0, abs=1e-6)
  for k in range(3):
    state, _ = step(state, _batch(k))
    d = min(0.5, 1 - 1 / (k + 2))
    ema = jax.tree.map(lambda e, s: d * e + (1 - d) * np.asarray(s), ema,
                       state.params['student'])
    got = state.loss_state['teacher']['params']
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
                 got, ema)
  # the KD term against the EMA teacher, recomputed
  batch = _batch(5)
  zs = _np_mlp(jax.tree.map(np.asarray, state.params['student']), batch['x'])[0]
  zt = _np_mlp(ema, batch['x'])[0]
  _, m = step(state, batch)
  want = 0.7 * 4.0 * np_kl(zt, zs, 2.0)[MASK].mean()
  # a small KL of near-equal float32 distributions: relative error ~1e-4
  assert float(m['loss/self'][0]) / float(m['loss/self'][1]) == pytest.approx(want, rel=1e-3)


def test_snapshot_step_keeps_the_cycle_end_weights_and_distills_from_them():
  apply, state, step = _setup('snapshot', lr=1.0, num_cycles=2, ensemble_size=2, temperature=2.0)
  kept = []
  for k in range(4):
    state, m = step(state, _batch(k))
    if k < 2:
      assert float(m['loss/self'][0]) == 0.0        # no snapshot yet: no teacher
    if (k + 1) % 2 == 0:
      kept.append(jax.tree.map(np.asarray, state.params['student']))
  assert int(state.loss_state['teacher']['taken']) == 2
  for slot, want in enumerate(kept):
    got = jax.tree.map(lambda a, s=slot: np.asarray(a[s]),
                       state.loss_state['teacher']['params'])
    jax.tree.map(np.testing.assert_array_equal, got, want)
  batch = _batch(9)
  zs = _np_mlp(jax.tree.map(np.asarray, state.params['student']), batch['x'])[0]
  probs = np.mean([np.exp(np_log_softmax(_np_mlp(p, batch['x'])[0] / 2.0)) for p in kept], 0)
  kl = (probs * (np.log(probs) - np_log_softmax(zs / 2.0))).sum(-1)
  _, m = step(state, batch)
  want = 4.0 * kl[MASK].mean()
  assert float(m['loss/self'][0]) / float(m['loss/self'][1]) == pytest.approx(want, rel=1e-3)


# --------------------------------------------------------------------------- bad input

@pytest.mark.parametrize('scheme, message', [
    ({'name': 'mean_teacher', 'decay': 1.0}, 'config.scheme.decay must be in [0, 1)'),
    ({'name': 'mean_teacher', 'decay': -0.1}, 'config.scheme.decay must be in [0, 1)'),
    ({'name': 'byot', 'heads': []}, 'config.scheme.heads must list the blocks'),
    ({'name': 'byot', 'heads': [1], 'alpha': 2.0}, 'config.scheme.alpha'),
    ({'name': 'snapshot', 'num_cycles': 3}, 'must be a multiple of config.scheme.num_cycles'),
    ({'name': 'snapshot', 'decay': 0.5}, 'config.scheme.decay is not an option of snapshot'),
])
def test_bad_scheme_options(scheme, message):
  with pytest.raises(UserError, match=message.replace('[', r'\[').replace(')', r'\)')):
    self_options(ml_collections.ConfigDict({'num_steps': 100, 'scheme': scheme}))


@pytest.mark.parametrize('config, override, message', [
    ('mean_teacher', '--config.scheme.decay=1.0', 'config.scheme.decay must be in [0, 1)'),
    ('byot', '--config.scheme.heads=[]', 'config.scheme.heads must list the blocks'),
    ('byot', '--config.scheme.heads=[3]', 'has 3 blocks'),
    ('mean_teacher', "--config.loss.terms={'kd': {}}", 'use label losses'),
])
def test_cli_refuses_a_bad_scheme_and_writes_nothing(paths, tmp_path, kdjax_main, config,
                                                     override, message):
  wd = tmp_path / 'run'
  out = kdjax_main(['train', '--config', f'{paths["configs"]}/mnist1d/{config}.py:tiny',
                    '--workdir', str(wd), override], check=False)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('kdjax: error: ') and message in lines[0]
  assert not wd.exists()


@pytest.mark.parametrize('name, generations, terms', [
    ('tf_kd_self', 2, {'ce': {'weight': pytest.approx(0.05)},
                       'kd': {'weight': pytest.approx(4.75), 'temperature': 6.0}}),
    ('gt_guided', 3, {'ce': {'weight': 0.5}, 'kd': {'weight': 0.5, 'temperature': 1.0}}),
])
def test_stage_configs_plan_their_generations(paths, tmp_path, name, generations, terms):
  config = load_config_file(f'{paths["configs"]}/mnist1d/{name}.py:tiny')
  plan = plan_stages(config, str(tmp_path / 'run'))
  assert [s.name for s in plan] == [f'gen{g}' for g in range(generations)]
  assert plan[0].config.loss.terms.to_dict() == {'ce': {'weight': 1.0}}
  assert all(s.config.loss.terms.to_dict() == terms and s.teacher == f'gen{g}'
             for g, s in enumerate(plan[1:]))
  assert not (tmp_path / 'run').exists()


# --------------------------------------------------------------------------- the CLI

STEPS = 20


def _args(paths, data_dir, config):
  name, _, variant = config.partition(':')
  return ['train', '--config', f'{paths["configs"]}/mnist1d/{name}.py:{variant or "tiny"}',
          f'--config.data.name={paths["small"]}', f'--config.data.data_dir={data_dir}',
          '--config.progress=false', f'--config.num_steps={STEPS}',
          '--config.checkpoint_every=10', '--config.log_every=10', '--config.eval_every=20',
          '--config.steps_per_call=10']


def _leaves(wd, *groups):
  from kdjax.workdir import restore_subtree
  return [leaf for g in groups for leaf in jax.tree.leaves(restore_subtree(wd, STEPS, (g,)))]


def test_mean_teacher_end_to_end_and_resume(paths, data_dir, tmp_path, kdjax_main):
  ref = str(tmp_path / 'ref')
  kdjax_main([*_args(paths, data_dir, 'mean_teacher'), '--workdir', ref])
  summary = json.load(open(os.path.join(ref, 'summary.json')))
  assert summary['step'] == STEPS and summary['scheme'] == 'mean_teacher'
  assert 0.12 < summary['eval_accuracy'] <= 1 and 0.12 < summary['teacher_accuracy'] <= 1
  assert summary['teacher_accuracy'] != summary['eval_accuracy'] or (
      summary['teacher_loss'] != summary['eval_loss'])
  # resume: the run cut back to its step-10 checkpoint ends with the same weights and EMA
  cut = str(tmp_path / 'cut')
  shutil.copytree(ref, cut)
  shutil.rmtree(os.path.join(cut, 'checkpoints', str(STEPS)))
  os.remove(os.path.join(cut, 'summary.json'))
  out = kdjax_main([*_args(paths, data_dir, 'mean_teacher'), '--workdir', cut])
  assert 'resuming from step 10' in out.stdout
  a, b = _leaves(ref, 'params', 'loss_state'), _leaves(cut, 'params', 'loss_state')
  assert len(a) == len(b) > 6 and all(np.array_equal(x, y) for x, y in zip(a, b))
  again = json.load(open(os.path.join(cut, 'summary.json')))
  assert again['teacher_accuracy'] == summary['teacher_accuracy']
  assert again['eval_accuracy'] == summary['eval_accuracy']


def test_byot_and_snapshot_end_to_end(paths, data_dir, tmp_path, kdjax_main):
  byot = str(tmp_path / 'byot')
  kdjax_main([*_args(paths, data_dir, 'byot:mlp_tiny'), '--workdir', byot])
  s = json.load(open(os.path.join(byot, 'summary.json')))
  assert s['scheme'] == 'byot' and s['step'] == STEPS and list(s['head_accuracies']) == ['1']
  assert all(0.12 < a <= 1 for a in (s['eval_accuracy'], s['head_accuracies']['1'],
                                     s['ensemble_accuracy']))
  snap = str(tmp_path / 'snap')
  kdjax_main([*_args(paths, data_dir, 'snapshot'), '--workdir', snap])
  s = json.load(open(os.path.join(snap, 'summary.json')))
  assert s['scheme'] == 'snapshot' and s['step'] == STEPS
  assert 0.12 < s['ensemble_accuracy'] <= 1 and s['ensemble_loss'] > 0
  taken = _leaves(snap, 'loss_state')
  assert 4 in [int(x) for x in taken if np.ndim(x) == 0]   # one snapshot per cycle
