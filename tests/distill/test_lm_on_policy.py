"""On-policy distillation of language models on the engine: the feed's policy hook, GKD
(``configs/lm/gkd.py``), DistiLLM's replay buffer (``configs/lm/distillm.py``) and TAID's
carried coefficient (``configs/lm/taid.py``), all on ``shakespeare_lm/tiny``."""

import functools
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import workdir as workdir_lib
from kdjax.config import load_config
from kdjax.engine import policy as policy_lib
from kdjax.engine import setup
from kdjax.models.decoding import sample
from kdjax.models.transformer import init_cache

P = C = 16          # shakespeare_lm/tiny prompt records: 16 prompt + 16 continuation tokens
EOS, PAD = 1, 0


@pytest.fixture(scope='module', autouse=True)
def _configs(paths):
  global CONFIGS
  CONFIGS = paths['configs']


@pytest.fixture(scope='module', autouse=True)
def _highest_precision():
  """Float32 matmuls (no TF32 on GPUs) for the whole module: its runs share compiled
  programs (the in-process reference and the CLI runs of GKD) and compare tightly."""
  before = jax.config.jax_default_matmul_precision
  jax.config.update('jax_default_matmul_precision', 'highest')
  yield
  jax.config.update('jax_default_matmul_precision', before)


def _config(name, data_dir, teacher, **overrides):
  overrides = {'data.data_dir': data_dir, 'teacher.workdir': teacher, 'progress': False,
               **overrides}
  return load_config(f'{CONFIGS}/lm/{name}', [(k, str(v)) for k, v in overrides.items()])


def _args(name, data_dir, teacher, workdir, **overrides):
  overrides = {'data.data_dir': data_dir, 'teacher.workdir': teacher, 'progress': False,
               **overrides}
  return ['distill', '--config', f'{CONFIGS}/lm/{name}', '--workdir', workdir,
          *[f'--config.{k}={v}' for k, v in overrides.items()]]


def _steps(run, n, state=None):
  """``n`` steps of ``run`` in one call from ``state`` (default: the init)."""
  state = run.init() if state is None else state
  return run.calls(state, run.feed.inputs(0, n), n)


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def _train_rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  return [{k: v for k, v in r.items() if k != 'examples_per_sec'} for r in rows]


# --------------------------------------------------------------------------- the hook

def test_the_hook_leaves_a_feed_without_policy_compiling_the_same_call(data_dir, lm_teacher_dir):
  # The train call scans the step over feed.ready(i, state); without a policy that is the
  # program of a scan over feed.batches(i), op for op.
  run = setup(_config('token_kd.py:tiny', data_dir, lm_teacher_dir))
  n = 2
  state, inputs = run.abstract_state, run.feed.inputs(0, n)

  def call(state, inputs):
    batch_at = run.feed.batches(inputs, n)
    return jax.lax.scan(lambda st, i: run.step(st, batch_at(i)), state, jnp.arange(n))

  plain = jax.jit(call, in_shardings=(run.state_shardings, run.feed.shardings()),
                  out_shardings=(run.state_shardings, run.calls.repl), donate_argnums=0)
  hooked = run.calls.jitted(n).lower(state, inputs).as_text()
  with jax.set_mesh(run.mesh):   # the engine's calls lower under the student's mesh
    assert plain.lower(state, inputs).as_text() == hooked
  assert run.feed.policy is None and run.feed.evaluated(state, {'loss': 1.0}) is state


# --------------------------------------------------------------------------- GKD

def test_gkd_with_lambda_0_is_supervised_kd_on_the_data_continuations(data_dir, lm_teacher_dir):
  gkd = _config('gkd.py:tiny', data_dir, lm_teacher_dir, **{'on_policy.lmbda': 0.0})
  plain = _config('gkd.py:tiny', data_dir, lm_teacher_dir)
  del plain['on_policy']
  (a, ma), (b, mb) = _steps(setup(gkd), 2), _steps(setup(plain), 2)
  assert np.asarray(ma['on_policy/student'][0]).tolist() == [0.0, 0.0]
  np.testing.assert_array_equal(ma['loss'][0], mb['loss'][0])
  jax.tree.map(np.testing.assert_array_equal, a.params['student'], b.params['student'])


# The GKD config of the lmbda=1 tests: every step samples; one call per step, so the
# in-process reference step and the CLI kill/resume run compile the same program.
PURE = {'on_policy.lmbda': 1.0, 'steps_per_call': 1, 'num_steps': 10, 'checkpoint_every': 5,
        'eval_every': 5, 'data.prompt_loss': False,
        'loss.terms.generalized_jsd.beta': 0.5}    # the JSD proper (the config's default: 0)


@pytest.fixture(scope='module')
def pure_on_policy(data_dir, lm_teacher_dir):
  """GKD with lmbda=1: its setup, initial state, first raw batch and the student's
  continuations of its prompts by ``decoding.sample``, keyed as the policy documents
  (``coin, draw = split(step_key(state))``)."""
  config = _config('gkd.py:tiny', data_dir, lm_teacher_dir, **PURE)
  run = setup(config)
  decoder = policy_lib.decoder_config(config.model, num_classes=run.spec.num_classes,
                                      input_shape=run.spec.input_shape)
  state = run.init()
  inputs = run.feed.inputs(0, 1)
  raw = jax.device_get(run.feed.source.batches(inputs['source'], 1)(0))
  _, draw = jax.random.split(policy_lib.step_key(state))
  go = jax.jit(functools.partial(sample, run.apply,
                                 init_cache=functools.partial(init_cache, decoder),
                                 max_new_tokens=C, temperature=1.0, stop_tokens=(EOS,),
                                 pad_id=PAD))
  gen = jax.device_get(go(state.params['student'], state.model_state, raw['prompt_ids'],
                          raw['prompt_mask'], draw))
  return run, state, raw, gen


def test_gkd_with_lambda_1_trains_on_the_students_samples(pure_on_policy):
  run, state, raw, gen = pure_on_policy
  batch, after, extra = jax.jit(lambda s, b: policy_lib.run(run.feed.policy, b, s))(state, raw)
  batch = jax.device_get(batch)
  assert float(extra['on_policy/student'][0]) == 1.0
  assert gen.mask.any(axis=1).all() and not gen.mask.all()     # some rows stop at <eos> early
  np.testing.assert_array_equal(batch['x'][:, :P], raw['prompt_ids'])
  np.testing.assert_array_equal(batch['x'][:, P:], gen.tokens)
  # the loss mask: exactly the generated tokens (their stop token included), as targets
  want_mask = np.zeros_like(batch['mask'])
  want_mask[:, P - 1:P - 1 + C] = gen.mask
  np.testing.assert_array_equal(batch['mask'], want_mask)
  np.testing.assert_array_equal(batch['label'][:, P - 1:P - 1 + C][gen.mask],
                                gen.tokens[gen.mask])
  stopped = np.cumsum(gen.tokens == EOS, axis=1) - (gen.tokens == EOS) > 0   # after an <eos>
  assert not (gen.mask & stopped).any() and (gen.tokens[~gen.mask] == PAD).all()
  assert jax.tree.structure(after) == jax.tree.structure(state)


def test_prompt_loss_supervises_the_prompts_targets_besides_the_samples(pure_on_policy, data_dir,
                                                                         lm_teacher_dir):
  run, state, raw, gen = pure_on_policy
  config = _config('gkd.py:tiny', data_dir, lm_teacher_dir, **{**PURE, 'data.prompt_loss': True})
  wide = setup(config)
  batch, _, _ = jax.jit(lambda s, i: wide.feed.ready(i, 1)(0, s))(state, wide.feed.inputs(0, 1))
  batch = jax.device_get(batch)
  np.testing.assert_array_equal(batch['x'][:, P:], gen.tokens)      # the same samples
  # the prompt's own next-token targets (both tokens real), then the generated tokens
  pm = raw['prompt_mask'].astype(bool)
  want = np.zeros_like(batch['mask'])
  want[:, :P - 1] = pm[:, :-1] & pm[:, 1:]
  want[:, P - 1:P - 1 + C] = gen.mask
  np.testing.assert_array_equal(batch['mask'], want)
  np.testing.assert_array_equal(batch['label'][:, :P - 1][want[:, :P - 1]],
                                raw['prompt_ids'][:, 1:][want[:, :P - 1]])


def test_gkd_seq_kd_trains_off_policy_on_the_teachers_samples(data_dir, lm_teacher_dir):
  # lmbda=0 with seq_kd: every step trains on the teacher's greedy continuations, which
  # the teacher then scores: each sampled token is the argmax of the teacher's logits
  # one position before it.
  run = setup(_config('gkd.py:tiny', data_dir, lm_teacher_dir, **{
      'on_policy.lmbda': 0.0, 'on_policy.seq_kd': True, 'on_policy.temperature': 0.0,
      'data.prompt_loss': False}))
  inputs = run.feed.inputs(0, 1)
  raw = jax.device_get(run.feed.source.batches(inputs['source'], 1)(0))
  batch, _, extra = jax.jit(lambda s, i: run.feed.ready(i, 1)(0, s))(run.init(), inputs)
  batch = jax.device_get(batch)
  assert float(extra['on_policy/student'][0]) == 0.0
  np.testing.assert_array_equal(batch['x'][:, :P], raw['prompt_ids'])
  mask = batch['mask'][:, P - 1:P - 1 + C]
  assert mask[:, 0].all() and not batch['mask'][:, :P - 1].any()
  assert not batch['mask'][:, -1].any()
  assert (np.diff(mask.astype(int), axis=1) <= 0).all()           # a prefix of each row
  greedy = batch['teacher_logits'][:, P - 1:P - 1 + C].argmax(-1)
  np.testing.assert_array_equal(greedy[mask], batch['x'][:, P:][mask])
  assert (batch['x'][:, P:] != raw['x'][:, P:]).any()             # not the data's


def _numpy_rows(prompt_ids, prompt_mask, tokens, mask):
  """x, label, loss mask, segment ids and positions of prompts + samples, written from the
  layout of the prompt records (kdjax.data.text) in plain numpy."""
  b = len(prompt_ids)
  x = np.zeros((b, P + C), np.int32)
  label = np.zeros_like(x)
  loss_mask = np.zeros(x.shape, bool)
  segment_ids, positions = np.zeros_like(x), np.zeros_like(x)
  for r in range(b):
    seq = [int(t) for t, m in zip(prompt_ids[r], prompt_mask[r]) if m]
    new = [int(t) for t, m in zip(tokens[r], mask[r]) if m]
    first = P - len(seq)
    x[r, first:P + len(new)] = seq + new
    segment_ids[r, first:P + len(new)] = 1
    positions[r, first:P + len(new)] = np.arange(len(seq) + len(new))
    label[r, first:P + len(new) - 1] = (seq + new)[1:]
    loss_mask[r, P - 1:P - 1 + len(new)] = True
  return x, label, loss_mask, segment_ids, positions


def _gjsd(student_logits, teacher_logits, beta):
  """GKD's generalized JSD per token from its formula (Agarwal et al. 2024, eq. 2):
  beta KL(p || m) + (1 - beta) KL(q || m), m = beta p + (1 - beta) q."""
  p = jax.nn.softmax(teacher_logits, -1)
  q = jax.nn.softmax(student_logits, -1)
  m = beta * p + (1 - beta) * q
  return beta * jnp.sum(p * (jnp.log(p) - jnp.log(m)), -1) + (1 - beta) * jnp.sum(
      q * (jnp.log(q) - jnp.log(m)), -1)


def test_one_gkd_step_equals_its_objective_on_the_students_samples(pure_on_policy):
  run, state, raw, gen = pure_on_policy
  x, _, where, segment_ids, positions = _numpy_rows(raw['prompt_ids'], raw['prompt_mask'],
                                                    gen.tokens, gen.mask)
  kwargs = dict(segment_ids=segment_ids, positions=positions)

  @jax.jit
  def reference(state, teacher_variables):
    t_out, _ = run.teacher.apply(*teacher_variables, x, **kwargs)

    def objective(params):
      out, _ = run.apply(params['student'], state.model_state, x, train=True, **kwargs)
      per_token = _gjsd(out.logits, t_out.logits, 0.5)
      return jnp.sum(jnp.where(where, per_token, 0.0)) / where.sum()

    loss, grads = jax.value_and_grad(objective)(state.params)
    updates, _ = run.tx.update(grads, state.opt_state, state.params)
    return loss, jax.tree.map(jnp.add, state.params['student'], updates['student'])

  loss, want = reference(state, run.teacher.variables)
  new, metrics = _steps(run, 1, jax.tree.map(jnp.copy, state))
  s, c = metrics['loss']
  assert float(c[0]) == where.sum()
  np.testing.assert_allclose(float(s[0] / c[0]), float(loss), rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               new.params['student'], want)


def _resumed_equals_uninterrupted(kdjax_main, args, tmp_path):
  """Runs ``args(workdir)`` (10 steps, checkpoints at 5 and 10), then again from its
  checkpoint at 5 as a run killed after it would (the later checkpoint and the summary
  gone); both end alike. Returns the resumed workdir."""
  ref = str(tmp_path / 'ref')
  kdjax_main(args(ref))
  wd = str(tmp_path / 'killed')
  shutil.copytree(ref, wd)
  shutil.rmtree(os.path.join(wd, 'checkpoints', '10'))
  os.remove(os.path.join(wd, 'summary.json'))
  out = kdjax_main(args(wd))
  assert 'resuming from step 5' in out.stdout
  a, b = _summary(ref), _summary(wd)
  assert b['resumed_from'] == 5
  assert (a['train_loss'], a['eval_loss']) == (b['train_loss'], b['eval_loss'])
  assert _train_rows(ref) == _train_rows(wd)
  return wd


SHORT = {'num_steps': 10, 'checkpoint_every': 5, 'eval_every': 5, 'steps_per_call': 5,
         'log_every': 1}


def test_gkd_kill_and_resume_equals_an_uninterrupted_run(kdjax_main, data_dir, lm_teacher_dir,
                                                          tmp_path):
  # 10 on-policy steps, a checkpoint every 5, one step per call.
  args = lambda wd: _args('gkd.py:tiny', data_dir, lm_teacher_dir, wd, **PURE, log_every=1)
  wd = _resumed_equals_uninterrupted(kdjax_main, args, tmp_path)
  assert all(r['on_policy/student'] == 1.0 for r in _train_rows(wd) if r['split'] == 'train')


# --------------------------------------------------------------------------- DistiLLM

def test_distillm_buffer_is_checkpointed_and_resumed(kdjax_main, data_dir, lm_teacher_dir,
                                                     tmp_path):
  # psi = 1 from the start and a buffer of two batches: the first two steps sample and
  # fill it; then a step samples with probability 1 - n/N, else replays (surely at n = N).
  args = lambda wd: _args('distillm.py:tiny', data_dir, lm_teacher_dir, wd, **SHORT,
                          **{'on_policy.init_threshold': 1.0, 'on_policy.capacity': 16})
  wd = _resumed_equals_uninterrupted(kdjax_main, args, tmp_path)
  rows = _train_rows(wd)
  train = [r for r in rows if r['split'] == 'train']
  assert [r['on_policy/student'] for r in train[:2]] == [1.0, 1.0]
  assert train[-1]['on_policy/replay'] == 1.0
  assert all(r['on_policy/student'] + r['on_policy/replay'] == 1.0 for r in train)
  saved = workdir_lib.restore_subtree(wd, 5, ('loss_state', 'on_policy'))
  assert int(saved['filled']) == 16 and saved['buffer']['mask'].any(axis=1).all()
  # the evaluation at step 5 set the reference validation loss (DistiLLM's rule)
  eval5 = next(r['loss'] for r in rows if r['split'] == 'eval' and r['step'] == 5)
  np.testing.assert_allclose(float(saved['reference']), eval5, rtol=1e-6)
  assert float(saved['threshold']) == 1.0


def test_distillm_threshold_rises_when_the_validation_loss_rises():
  threshold, reference, seen = 0.0, float('nan'), []
  for loss in (3.0, 3.05, 3.2, 3.25, 3.31, 2.0):
    threshold, reference = policy_lib.distillm_threshold(threshold, reference, loss)
    seen.append((round(float(threshold), 4), round(float(reference), 4)))
  # the first evaluation is the reference; 0.1 above it raises psi by 0.1 and moves it
  assert seen == [(0.0, 3.0), (0.0, 3.0), (0.1, 3.2), (0.1, 3.2), (0.2, 3.31), (0.2, 3.31)]
  capped, _ = policy_lib.distillm_threshold(0.95, 1.0, 2.0)
  assert float(capped) == 1.0


# --------------------------------------------------------------------------- TAID

def test_taid_coefficient_moves_and_survives_a_checkpoint(data_dir, lm_teacher_dir, tmp_path):
  run = setup(_config('taid.py:tiny', data_dir, lm_teacher_dir,
                      **{'num_steps': 10, 'loss.terms.taid.total_steps': 10}))
  t = lambda state: float(state.loss_state['taid'].interpolation)
  half, _ = _steps(run, 5)
  t5 = t(half)
  manager = workdir_lib.checkpoint_manager(str(tmp_path), keep=1)
  workdir_lib.save(manager, 5, half, {})
  manager.wait_until_finished()
  full, _ = run.calls(half, run.feed.inputs(5, 5), 5)                  # uninterrupted
  restored, _ = workdir_lib.restore(manager, 5, run.abstract_state)    # resumed at 5
  assert t(restored) == t5
  resumed, _ = run.calls(restored, run.feed.inputs(5, 5), 5)
  manager.close()
  # from 0.4 up at least the linear floor 0.4 + 0.6 n / 10 after step n (5 steps: n = 4)
  assert 0.4 + 0.6 * 4 / 10 - 1e-6 <= t5 < t(full) <= 1.0
  assert t(resumed) == t(full)
  jax.tree.map(np.testing.assert_array_equal, resumed.params['student'], full.params['student'])


# --------------------------------------------------------------------------- errors

@pytest.mark.parametrize('name, overrides, message', [
    ('gkd.py:tiny', {'on_policy.lmbda': 1.5}, 'config.on_policy.lmbda must be in [0, 1]'),
    ('gkd.py:tiny', {'on_policy.max_new_tokens': 0}, 'config.on_policy.max_new_tokens must be'),
    ('gkd.py:tiny', {'on_policy.top_p': 0.0}, 'config.on_policy.top_p must be in (0, 1]'),
    ('gkd.py:tiny', {'on_policy.max_new_tokens': 40}, "exceeds the student's context of 32"),
    ('gkd.py:tiny', {'on_policy.max_new_tokens': 20, 'model.kwargs.max_positions': 64},
     'more than the 16 continuation tokens'),
    ('gkd.py:tiny', {'data.train_split': 'train'}, 'use a prompt split'),
    ('distillm.py:tiny', {'on_policy.capacity': 4}, 'must hold at least one batch'),
    ('distillm.py:tiny', {'on_policy.replay_ratio': 'sometimes'},
     'config.on_policy.replay_ratio must be one of'),
])
def test_bad_on_policy_configs_exit_2_in_one_line(kdjax_main, data_dir, lm_teacher_dir, tmp_path,
                                                  name, overrides, message):
  wd = str(tmp_path / 'never')
  out = kdjax_main(_args(name, data_dir, lm_teacher_dir, wd, **overrides), check=False)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], out.stderr
  assert not os.path.exists(wd)


def test_lm_on_policy_configs_load(paths):
  for name in ('gkd', 'distillm', 'taid'):
    c = load_config(f'{paths["configs"]}/lm/{name}.py:tiny')
    assert c.data.name == 'shakespeare_lm/tiny'
  assert load_config(f'{paths["configs"]}/lm/distillm.py:srkl').loss.terms.to_dict() == {
      'skew_reverse_kl': {'weight': 1.0, 'alpha': 0.1}}
