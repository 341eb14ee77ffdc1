"""Online ensembles (``kdjax.schemes.online``: KDCL-Naive, ONE): the ensemble and the gate
against numpy, one step of the branches and the gate against separate per-branch
computations from the papers' losses (with a gradient check of the gate's loss), bad
configs, and a run through the CLI that resumes from a checkpoint to the same
parameters as the uninterrupted run."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.test_util import check_grads

from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.schemes import ensemble_logits
from kdjax.schemes import gate_apply
from kdjax.schemes import init_gate
from kdjax.schemes import make_cohort
from kdjax.schemes import make_online_init
from kdjax.schemes import make_online_step
from kdjax.schemes import online_options
from kdjax.schemes import online_scheme
from kdjax.schemes.online import masked_ce

D, C, B, K = 5, 4, 6, 3
LABELS = np.array([0, 1, 2, 3, -1, 1], np.int32)      # one unlabeled example
MASK = np.array([1, 1, 1, 1, 1, 0], bool)             # one padded example
MLP = {'name': 'mlp', 'kwargs': {'hidden': (8,)}}


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def np_log_softmax(z):
  z = z - z.max(-1, keepdims=True)
  return z - np.log(np.exp(z).sum(-1, keepdims=True))


def _x():
  return np.random.default_rng(0).normal(size=(B, D)).astype(np.float32)


# --------------------------------------------------------------------------- the ensemble

def test_ensemble_and_gate_match_numpy():
  rng = np.random.default_rng(1)
  z = rng.normal(size=(K, B, C)).astype(np.float32)
  np.testing.assert_allclose(ensemble_logits(jnp.asarray(z)), z.mean(0), rtol=1e-6)
  params = init_gate(jax.random.key(0), D, K, hidden=7)
  params['out'] = {'w': jnp.asarray(rng.normal(size=(7, K)), jnp.float32),
                   'b': jnp.asarray(rng.normal(size=K), jnp.float32)}
  x = _x()
  h = np.maximum(x @ np.asarray(params['hidden']['w']) + np.asarray(params['hidden']['b']), 0)
  g = np.exp(np_log_softmax(h @ np.asarray(params['out']['w']) + np.asarray(params['out']['b'])))
  got = gate_apply(params, jnp.asarray(x))
  np.testing.assert_allclose(got, g, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(ensemble_logits(jnp.asarray(z), got),
                             np.einsum('kbc,bk->bc', z, g), rtol=1e-5, atol=1e-6)
  # the gate starts uniform: the ONE teacher starts as the KDCL-Naive one
  fresh = gate_apply(init_gate(jax.random.key(0), D, K, hidden=7), jnp.asarray(x))
  np.testing.assert_allclose(fresh, np.full((B, K), 1 / K), rtol=1e-6)


def test_gate_loss_gradient():
  z = jnp.asarray(np.random.default_rng(2).normal(size=(K, B, C)), jnp.float32)
  params = init_gate(jax.random.key(3), D, K, hidden=4)
  params['out']['w'] = params['out']['w'] + 0.3
  x = jnp.asarray(_x())

  def loss(p):
    return masked_ce(ensemble_logits(z, gate_apply(p, x)), jnp.asarray(LABELS), jnp.asarray(MASK))

  check_grads(jax.jit(loss), (params,), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


# --------------------------------------------------------------------------- the step

def _batch():
  return {'x': jnp.asarray(_x()), 'label': jnp.asarray(LABELS), 'mask': jnp.asarray(MASK)}


def _one_step(gated, *, lr=0.1, T=3.0, w=0.7):
  cohort = make_cohort([MLP] * K, num_classes=C, input_shape=(D,))
  objective = build_objective({'ce': {}})
  tx = optax.sgd(lr)
  init = make_online_init(cohort, objective, tx, input_shape=(D,), gated=gated, gate_hidden=4)
  state = jax.jit(init)(np.int32(0))
  if gated:   # a gate that is not uniform, so the weights matter
    gate = dict(state.params['gate'], out={'w': state.params['gate']['out']['w'] + 0.5,
                                           'b': jnp.arange(K, dtype=jnp.float32)})
    state = state.replace(params=dict(state.params, gate=gate))
  step = jax.jit(make_online_step(cohort, objective, tx, gated=gated, temperature=T, weight=w))
  new, metrics = step(state, _batch())
  return cohort, state, new, jax.device_get(metrics)


def _reference(cohort, state, gated, *, lr, T, w):
  """Each branch separately: its logits, the ensemble from all branches' logits as numpy
  constants (mean, or gate-weighted), its CE + w T^2 KL(ensemble_T || branch_T), its
  gradient and one SGD step; and the gate's CE of the ensemble, its gradient, one step."""
  x = _batch()['x']
  apply = cohort.student(0).apply
  params = [cohort.take(state.params['student'], k) for k in range(K)]
  ms = [cohort.take(state.model_state, k) for k in range(K)]
  z = np.stack([np.asarray(apply(params[k], ms[k], x, train=True)[0].logits) for k in range(K)])
  if gated:
    g = np.asarray(gate_apply(state.params['gate'], x))
    ze = np.einsum('kbc,bk->bc', z, g)
  else:
    ze = z.mean(0)
  pe = np.exp(np_log_softmax(ze.astype(np.float64) / T))
  valid = MASK & (LABELS >= 0)
  new, losses = [], []
  for k in range(K):
    def loss(p, k=k):
      zk = apply(p, ms[k], x, train=True)[0].logits
      logq = jax.nn.log_softmax(zk)
      ce = -jnp.sum(jnp.where(valid, jnp.take_along_axis(
          logq, jnp.maximum(jnp.asarray(LABELS), 0)[:, None], 1)[:, 0], 0)) / valid.sum()
      kl = T * T * jnp.sum(pe * (np.log(pe) - jax.nn.log_softmax(zk / T)), -1)
      return ce + w * jnp.sum(jnp.where(MASK, kl, 0)) / MASK.sum()
    value, grads = jax.jit(jax.value_and_grad(loss))(params[k])
    losses.append(float(value))
    new.append(jax.tree.map(lambda a, g_: a - lr * g_, params[k], grads))
  gate = None
  if gated:
    def gate_loss(p):
      return masked_ce(jnp.einsum('kbc,bk->bc', z, gate_apply(p, x)), jnp.asarray(LABELS),
                       jnp.asarray(MASK))
    gate = jax.tree.map(lambda a, g_: a - lr * g_, state.params['gate'],
                        jax.grad(gate_loss)(state.params['gate']))
  return ze, new, losses, gate


@pytest.mark.parametrize('gated', [False, True], ids=['kdcl', 'one'])
def test_step_equals_separate_branch_steps(gated):
  lr, T, w = 0.1, 3.0, 0.7
  cohort, state, new, metrics = _one_step(gated, lr=lr, T=T, w=w)
  ze, want, losses, gate = _reference(cohort, state, gated, lr=lr, T=T, w=w)
  close = lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                                                  atol=1e-6)
  for k in range(K):
    jax.tree.map(close, cohort.take(new.params['student'], k), want[k])
    s, c = metrics[f'student_{k}/loss']
    assert float(s) / float(c) == pytest.approx(losses[k], rel=1e-5)
  valid = MASK & (LABELS >= 0)
  s, c = metrics['ensemble/accuracy']
  assert (float(s), float(c)) == ((ze.argmax(-1) == LABELS)[valid].sum(), valid.sum())
  if gated:
    jax.tree.map(close, new.params['gate'], gate)
    assert {'gate/loss', 'gate/weight_0', 'gate/grad_norm'} <= set(metrics)
  else:
    assert new.params['gate'] == {} and 'gate/loss' not in metrics
  assert int(new.step) == 1 and float(metrics['nonfinite'][0]) == 0.0


# --------------------------------------------------------------------------- config checks

def _config(**scheme):
  import ml_collections
  return ml_collections.ConfigDict({'scheme': scheme})


@pytest.mark.parametrize('scheme,message', [
    (dict(name='kdcl', num_branches=1), 'num_branches must be an integer >= 2'),
    (dict(name='one', num_branches=0), 'num_branches must be an integer >= 2'),
    (dict(name='one', temperature=-1.0), 'temperature must be positive'),
    (dict(name='one', weight=-1.0), 'weight must be >= 0'),
    (dict(name='one', gate_hidden=-1), 'gate_hidden must be an integer >= 0'),
    (dict(name='kdcl', students=[MLP]), 'lists 1 models but config.scheme.num_branches is 3'),
    (dict(name='kdcl', num_students=3), 'config.scheme.num_students is not an option'),
])
def test_bad_scheme_options(scheme, message):
  with pytest.raises(UserError, match=message):
    online_options(_config(**scheme))


def test_scheme_defaults():
  options = online_options(_config(name='one'))
  assert options['ensemble'] == 'gate' and options['num_branches'] == 3
  assert online_options(_config(name='kdcl'))['ensemble'] == 'average'
  assert online_scheme('one').temperature == 3.0


@pytest.mark.parametrize('override,message', [
    ('--config.scheme.num_branches=1', 'config.scheme.num_branches must be an integer >= 2'),
    ("--config.loss.terms={'kd': {}}", 'use label losses in config.loss.terms'),
])
def test_cli_refuses_a_bad_scheme_and_writes_nothing(paths, tmp_path, kdjax_main, override,
                                                     message):
  wd = tmp_path / 'run'
  out = kdjax_main(['train', '--config', f'{paths["configs"]}/mnist1d/one.py:tiny',
                    '--workdir', str(wd), override], check=False)
  assert out.returncode == 2
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('kdjax: error: ') and message in lines[0]
  assert not wd.exists()


# --------------------------------------------------------------------------- the CLI

STEPS = 40


def _args(paths, data_dir, name):
  return ['train', '--config', f'{paths["configs"]}/mnist1d/{name}.py:tiny',
          f'--config.data.name={paths["small"]}', f'--config.data.data_dir={data_dir}',
          '--config.progress=false', f'--config.num_steps={STEPS}',
          '--config.checkpoint_every=20', '--config.log_every=20', '--config.eval_every=40',
          '--config.steps_per_call=10']


def _params(wd):
  from kdjax.workdir import restore_subtree
  return jax.tree.leaves(restore_subtree(wd, STEPS, ('params',)))


def test_end_to_end_and_resume(paths, data_dir, tmp_path, kdjax_main):
  """ONE through the CLI (KDCL's run differs only in the step, checked above)."""
  name = 'one'
  ref = str(tmp_path / 'ref')
  kdjax_main([*_args(paths, data_dir, name), '--workdir', ref])
  summary = json.load(open(os.path.join(ref, 'summary.json')))
  assert summary['step'] == STEPS and summary['scheme'] == name and summary['stacked']
  assert summary['ensemble'] == 'gate'
  accs = summary['student_accuracies']
  assert len(accs) == 3 and all(0.15 < a <= 1.0 for a in accs)   # 10 classes: chance 0.1
  assert summary['eval_accuracy'] == pytest.approx(np.mean(accs))
  assert 0.15 < summary['ensemble_accuracy'] <= 1.0 and summary['ensemble_loss'] > 0
  # resume: the run cut back to its step-20 checkpoint ends with the same parameters
  cut = str(tmp_path / 'cut')
  shutil.copytree(ref, cut)
  shutil.rmtree(os.path.join(cut, 'checkpoints', str(STEPS)))
  os.remove(os.path.join(cut, 'summary.json'))
  out = kdjax_main([*_args(paths, data_dir, name), '--workdir', cut])
  assert 'resuming from step 20' in out.stdout
  a, b = _params(ref), _params(cut)
  assert len(a) == len(b) and all(np.array_equal(x, y) for x, y in zip(a, b))
  assert json.load(open(os.path.join(cut, 'summary.json')))['student_accuracies'] == accs
