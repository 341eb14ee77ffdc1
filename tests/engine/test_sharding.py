"""Sharded steps equal single-device steps; the same tiny distillation on 1 and 4 devices."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

FOUR = {'XLA_FLAGS': '--xla_force_host_platform_device_count=4', 'JAX_PLATFORMS': 'cpu'}

STEP_EQUALITY = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, optax
    from jax.sharding import NamedSharding, PartitionSpec as P
    from kdjax import models
    from kdjax.data import make_augment
    from kdjax.distill import TeacherFns, TrainState, make_fused_steps, make_train_step
    from kdjax.losses import build_objective
    from kdjax.parallel import make_mesh, shardings_from_rules

    assert jax.device_count() == 4
    n, batch = 512, 64
    rng = np.random.default_rng(0)
    data = {'x': rng.normal(size=(n, 40, 1)).astype(np.float32),
            'label': rng.integers(0, 10, n).astype(np.int32), 'id': np.arange(n, dtype=np.int32)}
    t_apply, t_params, t_state = models.functional(models.create('cnn1d', num_classes=10, input_shape=(40, 1), seed=1))
    s_apply, s_params, s_state = models.functional(models.create('mlp', num_classes=10, input_shape=(40, 1), seed=2))
    objective = build_objective({'kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1},
                                 'hint': {'loss': 'fitnet', 'student': 'stage2', 'teacher': 'stage3', 'weight': 0.5}})
    t_out, _ = t_apply(t_params, t_state, data['x'][:2])
    s_out, _ = s_apply(s_params, s_state, data['x'][:2])
    lp, ls = objective.init(jax.random.key(3), {'student_features': s_out.features, 'teacher_features': t_out.features,
                                                'student_logits': s_out.logits, 'teacher_logits': t_out.logits})
    # SGD with momentum: linear in the gradient, so float32 reduction-order differences
    # between layouts stay at rounding level. (Adam divides by sqrt(v): where a gradient
    # is ~0 its sign is rounding noise and becomes a full +-lr step.)
    tx = optax.sgd(0.05, momentum=0.9)
    params = {'student': s_params, 'loss': lp}

    def run(mesh, rules, teacher_rules, steps=8):
      state = TrainState(step=jnp.zeros((), jnp.int32), params=params, model_state=s_state, loss_state=ls,
                         opt_state=tx.init(params), rng=jax.random.key_data(jax.random.key(0)))
      sh = shardings_from_rules(state, rules, mesh)
      state = jax.device_put(state, sh)
      tvars = jax.device_put((t_params, t_state), shardings_from_rules((t_params, t_state), teacher_rules, mesh))
      step = make_train_step(student_apply=s_apply, objective=objective, tx=tx,
                             augment=make_augment({'kind': 'signal', 'shift': 3, 'scale': 0.1, 'noise': 0.05}),
                             augment_seed=0, teacher=TeacherFns(t_apply, 10))
      fused = make_fused_steps(step, num_examples=n, batch_size=batch, shuffle_seed=0, num_steps=steps,
                               batch_sharding=NamedSharding(mesh, P('data')))
      repl = NamedSharding(mesh, P())
      fn = jax.jit(fused, in_shardings=(sh, jax.tree.map(lambda _: repl, data), jax.tree.map(lambda a: a.sharding, tvars)),
                   out_shardings=(sh, repl))
      state, metrics = fn(state, jax.device_put(data, repl), tvars)
      state, metrics = fn(state, jax.device_put(data, repl), tvars)
      return jax.device_get(state.params), jax.device_get(metrics), state

    one = make_mesh([('data', -1)], devices=jax.devices()[:1])
    four = make_mesh([('data', -1)])
    p1, m1, _ = run(one, [('.*', None)], [('.*', None)])
    p4, m4, s4 = run(four, [('.*', None)], [('.*', None)])
    pf, mf, sf = run(four, [('.*kernel', 'fsdp'), ('.*', None)], [('.*kernel', 'fsdp'), ('.*', None)])
    # FSDP really sharded something.
    specs = {str(l.sharding.spec) for l in jax.tree.leaves(sf.params)}
    assert any('data' in s for s in specs), specs
    for other in (p4, pf):
      for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(other)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m1['loss'][0], m4['loss'][0], rtol=1e-5)
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    assert moved > 1e-4, moved   # the steps did change the parameters
    print('ok')
''')


def test_sharded_steps_equal_single_device_steps():
  out = subprocess.run([sys.executable, '-c', STEP_EQUALITY], env={**os.environ, **FOUR},
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith('ok')


@pytest.mark.slow
def test_tiny_distillation_same_accuracy_on_1_and_4_devices(cli, paths, teacher_dir, data_dir, tmp_path):
  args = ['distill', '--config', f"{paths['configs']}/mnist1d/kd.py:tiny",
          f'--config.teacher.workdir={teacher_dir}', f"--config.data.name={paths['small']}",
          f'--config.data.data_dir={data_dir}', '--config.progress=false']
  cli([*args, '--workdir', str(tmp_path / 'one')])
  cli([*args, '--workdir', str(tmp_path / 'four')], env=FOUR)
  one = json.load(open(tmp_path / 'one' / 'summary.json'))
  four = json.load(open(tmp_path / 'four' / 'summary.json'))
  assert one['num_devices'] == 1 and four['num_devices'] == 4
  assert one['eval_accuracy'] == four['eval_accuracy']
  assert abs(one['train_loss'] - four['train_loss']) < 1e-4


@pytest.mark.slow
def test_tiny_distillation_teacher_on_its_own_device(cli, paths, teacher_dir, data_dir, tmp_path):
  # 3 devices: the teacher on the last, the student's mesh on the other 2, one fused call
  # ahead; the run ends where the all-in-one-step run on 1 device does. steps_per_call=30
  # with log/eval/checkpoint boundaries at 50 gives calls of 30 and 20 steps, so the
  # look-ahead crosses unequal chunk sizes.
  args = ['distill', '--config', f"{paths['configs']}/mnist1d/kd.py:tiny",
          f'--config.teacher.workdir={teacher_dir}', f"--config.data.name={paths['small']}",
          f'--config.data.data_dir={data_dir}', '--config.progress=false',
          '--config.steps_per_call=30', '--config.data.feed=device',
          "--config.data.augment={'kind': 'signal', 'shift': 2, 'noise': 0.05}"]
  cli([*args, '--workdir', str(tmp_path / 'one')])
  three = {'XLA_FLAGS': '--xla_force_host_platform_device_count=3', 'JAX_PLATFORMS': 'cpu'}
  cli([*args, '--workdir', str(tmp_path / 'apart'), '--config.teacher.devices=1'], env=three)
  one = json.load(open(tmp_path / 'one' / 'summary.json'))
  apart = json.load(open(tmp_path / 'apart' / 'summary.json'))
  assert one['teacher_devices'] == 0 and apart['teacher_devices'] == 1
  assert apart['num_devices'] == 3
  assert one['eval_accuracy'] == apart['eval_accuracy']
  assert abs(one['train_loss'] - apart['train_loss']) < 1e-4
  # The per-log-step losses agree too (the teacher's outputs belong to their own steps).
  def losses(wd):
    rows = [json.loads(line) for line in open(wd / 'metrics.jsonl')]
    return [r['loss'] for r in rows if r['split'] == 'train']
  a, b = losses(tmp_path / 'one'), losses(tmp_path / 'apart')
  assert len(a) == len(b) >= 2
  assert max(abs(x - y) for x, y in zip(a, b)) < 1e-4


@pytest.mark.parametrize('extra, message', [
    (['--config.teacher.devices=3'], 'config.teacher.devices=3'),
    (['--config.teacher.devices=1', '--config.data.feed=stream'], 'needs a live teacher'),
    (['--config.teacher.devices=2', '--config.batch_size=33'], "teacher's 2 devices"),
])
def test_teacher_devices_refused_clearly(cli, paths, teacher_dir, data_dir, tmp_path, extra, message):
  env = {'XLA_FLAGS': '--xla_force_host_platform_device_count=3', 'JAX_PLATFORMS': 'cpu'}
  out = cli(['distill', '--config', f"{paths['configs']}/mnist1d/kd.py:tiny",
             f'--config.teacher.workdir={teacher_dir}', f"--config.data.name={paths['small']}",
             f'--config.data.data_dir={data_dir}', '--config.progress=false', *extra,
             '--workdir', str(tmp_path / 'wd')], env=env, check=False)
  assert out.returncode == 2
  assert message in out.stderr and len(out.stderr.strip().splitlines()) == 1
