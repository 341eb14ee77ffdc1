"""The one train step, sharded over 4 devices (data parallel and FSDP), equals it on one."""

import os
import subprocess
import sys
import textwrap

FOUR = {'JAX_NUM_CPU_DEVICES': '4', 'JAX_PLATFORMS': 'cpu'}

STEP_EQUALITY = textwrap.dedent('''
    import jax, jax.numpy as jnp, numpy as np, optax
    from kdjax import models
    from kdjax.data import make_augment
    from kdjax.engine import DeviceSource, Feed, TrainCalls, init_train_state, make_train_step
    from kdjax.losses import build_objective
    from kdjax.parallel import make_mesh, shardings_from_rules
    from kdjax.teacher import Teacher

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
    augment = make_augment({'kind': 'signal', 'shift': 3, 'scale': 0.1, 'noise': 0.05})
    step = make_train_step(s_apply, objective, tx)

    def run(mesh, rules, teacher_rules, steps=8):
      state = init_train_state(s_params, s_state, tx, rng=jax.random.key(0), loss_params=lp, loss_state=ls)
      state = jax.tree.map(jnp.copy, state)   # the calls donate it
      sh = shardings_from_rules(state, rules, mesh)
      state = jax.device_put(state, sh)
      tvars = jax.device_put((t_params, t_state), shardings_from_rules((t_params, t_state), teacher_rules, mesh))
      feed = Feed(DeviceSource(data, batch_size=batch, seed=0, mesh=mesh), augment=augment, seed=0,
                  teacher=Teacher(t_apply, tvars, 10, None, 0, ''), needs=objective.needs)
      calls = TrainCalls(step, feed, state_shardings=sh, mesh=mesh)
      state, metrics = calls(state, feed.inputs(0, steps), steps)
      state, metrics = calls(state, feed.inputs(steps, steps), steps)
      return jax.device_get(state.params), jax.device_get(metrics), state

    one = make_mesh([('data', -1)], devices=jax.devices()[:1])
    four = make_mesh([('data', -1)])
    p1, m1, _ = run(one, [('.*', None)], [('.*', None)])
    p4, m4, s4 = run(four, [('.*', None)], [('.*', None)])
    pf, mf, sf = run(four, [('.*kernel', 'fsdp'), ('.*', None)], [('.*kernel', 'fsdp'), ('.*', None)])
    # FSDP really sharded something, and the shardings survive the calls.
    specs = {str(l.sharding.spec) for l in jax.tree.leaves(sf.params)}
    assert any('data' in s for s in specs), specs
    for other in (p4, pf):
      for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(other)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(m1['loss'][0], m4['loss'][0], rtol=1e-5)
    np.testing.assert_allclose(m1['loss'][0], mf['loss'][0], rtol=1e-5)
    params = {'student': s_params, 'loss': lp}
    moved = max(float(np.max(np.abs(a - b))) for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(params)))
    assert moved > 1e-4, moved   # the steps did change the parameters
    print('ok')
''')


def test_sharded_steps_equal_single_device_steps():
  out = subprocess.run([sys.executable, '-c', STEP_EQUALITY], env={**os.environ, **FOUR},
                       capture_output=True, text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.strip().endswith('ok')
