"""Client-axis sharding: a round on 4 fake CPU devices equals the single-device round."""

import json
import os
import subprocess
import sys
import textwrap

import numpy as np

from kdjax import cli

SCRIPT = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from kdjax.federated import packing, partition, simulator as sim
    from kdjax.federated.algorithms import make_algorithm
    from kdjax.federated.local import make_local_trainer
    from kdjax.models import create, functional
    from kdjax.parallel import make_mesh

    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 80).astype(np.int32)
    x = (np.eye(3, 5)[y] * 2 + rng.normal(size=(80, 5))).astype(np.float32)
    part = partition.dirichlet(y, 8, 0.5, min_size=4, seed=0, test_fraction=0.0)
    data = jax.tree.map(jnp.asarray, packing.pack(x, y, part.train, multiple=4))
    apply, params, state = functional(create('mlp', num_classes=3, input_shape=(5,),
                                             hidden=(6,), seed=1))
    trainer = make_local_trainer(apply, batch_size=4, epochs=1, lr=0.2)
    mesh = make_mesh([('clients', -1)])
    out = {'devices': len(jax.devices())}
    for name in ('fedavg', 'fedd2s'):
      alg = make_algorithm(name, trainer, num_classes=3)
      results = []
      for m in (None, mesh):
        rf = sim.make_round(alg, num_clients=8, clients_per_round=4, seed=1, mesh=m)
        st = sim.init_state(alg, params, state, 8)
        if m is None:
          out[name + '_plain_hlo'] = 'all-reduce' in rf.lower(st, data).compile().as_text()
        if m is not None:
          hlo = rf.lower(st, data).compile().as_text()
          # SPMD-partitioned: one client per device, reductions across devices.
          out[name + '_sharded_hlo'] = 'all-reduce' in hlo
        st0 = st
        for _ in range(2):
          st, _ = rf(st, data)
        results.append(jax.tree.leaves((st.server.params, st.clients)))
        if m is not None:   # two rounds in one call (a lax.scan) on the mesh
          st2, _ = rf.rounds(st0, data, 2)
          out[name + '_rounds_maxdiff'] = max(
              float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
              for a, b in zip(results[-1], jax.tree.leaves((st2.server.params, st2.clients)))
              if np.asarray(a).dtype.kind == 'f')
      out[name + '_maxdiff'] = max(float(np.max(np.abs(np.asarray(a, np.float64) - np.asarray(b, np.float64))))
                                   for a, b in zip(*results) if np.asarray(a).dtype.kind == 'f')
    print(json.dumps(out))
''')


def test_client_axis_sharded_round_equals_single_device():
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='4', JAX_PLATFORMS='cpu')
  root = os.path.join(os.path.dirname(__file__), '..', '..')
  env['PYTHONPATH'] = os.path.abspath(root) + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run([sys.executable, '-c', SCRIPT], env=env, capture_output=True, text=True,
                        timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['devices'] == 4
  for name in ('fedavg', 'fedd2s'):
    assert out[name + '_sharded_hlo'] and not out[name + '_plain_hlo'], name
    assert out[name + '_maxdiff'] < 1e-5, out
    assert out[name + '_rounds_maxdiff'] < 1e-5, out


CLI_SCRIPT = textwrap.dedent('''
    import json, sys
    from kdjax import cli
    config, workdir, *extra = sys.argv[1:]
    code = cli.main(['fed', 'run', '--config', config, '--workdir', workdir, '--no-progress',
                     '--config.clients_per_round=4', '--config.checkpoint_every=0',
                     '--config.plots=False', *extra])
    assert code == 0, code
''')


ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))


def _one_and_two_devices(tmp_path, config_name, *args):
  """The summaries (with per-round train losses) of `kdjax fed run` on 1 device and
  on 2 fake devices with the client axis sharded."""
  config = os.path.join(ROOT, 'configs', 'fed', config_name) + ':tiny'
  summaries = []
  for devices, extra in (('1', []), ('2', ["--config.mesh=[('clients', -1)]"])):
    workdir = str(tmp_path / f'd{devices}')
    if devices == '1':   # this process has one device
      assert cli.main(['fed', 'run', '--config', config, '--workdir', workdir, '--no-progress',
                       '--config.clients_per_round=4', '--config.checkpoint_every=0',
                       '--config.plots=False', *args, *extra]) == 0
    else:
      env = dict(os.environ, JAX_NUM_CPU_DEVICES=devices, JAX_PLATFORMS='cpu',
                 PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
      proc = subprocess.run([sys.executable, '-c', CLI_SCRIPT, config, workdir, *args, *extra],
                            env=env, capture_output=True, text=True, timeout=300)
      assert proc.returncode == 0, proc.stderr[-3000:]
    with open(os.path.join(workdir, 'summary.json')) as f:
      summary = json.load(f)
    with open(os.path.join(workdir, 'metrics.jsonl')) as f:
      summary['train_loss'] = [json.loads(l)['train_loss'] for l in f]
    summaries.append(summary)
  return summaries


def test_fed_run_with_config_mesh_matches_the_single_device_run(tmp_path):
  """`kdjax fed run --config.mesh=[('clients', -1)]` on 2 fake devices ends where one device does."""
  a, b = _one_and_two_devices(tmp_path, 'mnist1d_fedavg.py')
  assert a['round'] == b['round'] == 6
  assert a['client_mesh'] is None and b['client_mesh'] == {'clients': 2}
  assert abs(a['global_accuracy'] - b['global_accuracy']) < 1e-6
  assert abs(a['personalized_accuracy_mean'] - b['personalized_accuracy_mean']) < 1e-6
  np.testing.assert_allclose(a['train_loss'], b['train_loss'], rtol=1e-5)


BACK_TO_BACK = textwrap.dedent('''
    import json
    import jax, jax.numpy as jnp, numpy as np
    from kdjax.federated import packing, simulator as sim
    from kdjax.federated.fedavg import fedavg
    from kdjax.federated.local import make_local_trainer
    from kdjax.models import create, functional
    from kdjax.parallel import make_mesh

    rng = np.random.default_rng(0)
    x = rng.normal(size=(800, 40, 1)).astype(np.float32)
    y = rng.integers(0, 10, 800).astype(np.int32)
    idx = [np.arange(i * 40, (i + 1) * 40) for i in range(20)]
    data = jax.tree.map(jnp.asarray, packing.pack(x, y, idx, multiple=10))
    apply, params, state = functional(create('mlp', num_classes=10, input_shape=(40, 1),
                                             hidden=(32, 32)))
    alg = fedavg(make_local_trainer(apply, batch_size=10, epochs=2, lr=0.05))
    mesh = make_mesh([('clients', -1)])
    rf = sim.make_round(alg, num_clients=20, clients_per_round=20, seed=0, mesh=mesh)
    d = sim.replicate(data, mesh)
    finals = []
    for sync in (False, True):
      st = sim.replicate(sim.init_state(alg, params, state, 20), mesh)
      for _ in range(100):      # dispatched back to back, nothing read in between
        st, info = rf(st, d)
        if sync:
          float(info['loss'][0])
      finals.append(jax.tree.leaves(jax.device_get(st.server.params)))
    print(json.dumps({'devices': len(jax.devices()),
                      'maxdiff': max(float(np.max(np.abs(a - b))) for a, b in zip(*finals))}))
''')


def test_back_to_back_sharded_rounds_on_cpu_do_not_deadlock():
  """100 rounds dispatched without a sync on 2 CPU devices (2 cores here). Before
  make_round waited for the previous state on CPU, XLA's in-process all-reduce
  deadlocked in 2 of 3 such runs; the result equals a run read after every round."""
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', JAX_PLATFORMS='cpu')
  root = os.path.join(os.path.dirname(__file__), '..', '..')
  env['PYTHONPATH'] = os.path.abspath(root) + os.pathsep + env.get('PYTHONPATH', '')
  proc = subprocess.run([sys.executable, '-c', BACK_TO_BACK], env=env, capture_output=True,
                        text=True, timeout=240)
  assert proc.returncode == 0, proc.stderr[-3000:]
  out = json.loads(proc.stdout.strip().splitlines()[-1])
  assert out['devices'] == 2
  assert out['maxdiff'] == 0.0


HETERO_TINY = ['--config.num_clients=8', '--config.num_rounds=2', '--config.eval_every=2',
               '--config.proxy_size=40', '--config.local_epochs=1', '--config.algorithm=fedd2s']


def test_grouped_round_with_config_mesh_matches_the_single_device_run(tmp_path):
  """Two client architectures (FedD2S), each group's clients sharded over 2 fake devices:
  the same losses and accuracies as on one device."""
  a, b = _one_and_two_devices(tmp_path, 'mnist1d_hetero.py', *HETERO_TINY)
  assert a['client_mesh'] is None and b['client_mesh'] == {'clients': 2}
  for key in ('global_accuracy', 'personalized_accuracy_mean'):
    assert abs(a[key] - b[key]) < 1e-6, key
  np.testing.assert_allclose(a['train_loss'], b['train_loss'], rtol=1e-5)


def test_grouped_round_chunk_not_dividing_the_mesh_exits_2(tmp_path):
  config = os.path.join(ROOT, 'configs', 'fed', 'mnist1d_hetero.py') + ':tiny'
  env = dict(os.environ, JAX_NUM_CPU_DEVICES='2', JAX_PLATFORMS='cpu',
             PYTHONPATH=ROOT + os.pathsep + os.environ.get('PYTHONPATH', ''))
  proc = subprocess.run([sys.executable, '-m', 'kdjax.cli', 'fed', 'run', '--config', config,
                         '--workdir', str(tmp_path / 'w'), '--no-progress', *HETERO_TINY,
                         '--config.clients_per_round=3', "--config.mesh=[('clients', -1)]"],
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and 'must divide by the 2 devices' in lines[0], lines
