"""`kdjax fed run` end to end on the tiny config: files, resume, errors; FedBN locality."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax import cli
from kdjax.federated import packing
from kdjax.federated import partition
from kdjax.federated import simulator as sim
from kdjax.federated.fedbn import fedbn
from kdjax.federated.local import make_local_trainer
from kdjax.models import create
from kdjax.models import functional

CONFIG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'fed',
                      'mnist1d_fedavg.py')


def _rows(workdir):
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(l) for l in f]


def test_fed_run_cli_writes_metrics_and_resumes_identically(tmp_path, capsys):
  straight = str(tmp_path / 'straight')
  assert cli.main(['fed', 'run', '--config', CONFIG + ':tiny', '--workdir', straight,
                   '--no-progress', '--config.algorithm=scaffold']) == 0
  printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert printed['round'] == 6
  rows = _rows(straight)
  assert [r['round'] for r in rows] == [1, 2, 3, 4, 5, 6]
  assert all(r['num_reported'] == 5 and r['bytes_up'] > 0 and r['bytes_down'] > 0
             for r in rows)
  evals = [r for r in rows if 'global_accuracy' in r]
  assert [r['round'] for r in evals] == [3, 6]
  with open(os.path.join(straight, 'summary.json')) as f:
    summary = json.load(f)
  for key in ('round', 'global_accuracy', 'personalized_accuracy_mean',
              'personalized_accuracy_std', 'personalized_accuracy_worst10'):
    assert key in summary
  assert 0.0 <= summary['global_accuracy'] <= 1.0
  for name in ('partition.png', 'partition.txt', 'accuracy.png', 'clients.png'):
    assert os.path.exists(os.path.join(straight, name))

  # Stop after 3 rounds (checkpoint at 3), then continue to 6 in the same workdir.
  resumed = str(tmp_path / 'resumed')
  base = ['fed', 'run', '--config', CONFIG + ':tiny', '--workdir', resumed, '--no-progress',
          '--config.algorithm=scaffold']
  assert cli.main(base + ['--config.num_rounds=3']) == 0
  assert cli.main(base) == 0
  a, b = _rows(straight), _rows(resumed)
  assert [r['round'] for r in b] == [1, 2, 3, 4, 5, 6]
  for ra, rb in zip(a, b):
    np.testing.assert_allclose(ra['train_loss'], rb['train_loss'], rtol=1e-6)
  with open(os.path.join(resumed, 'summary.json')) as f:
    assert json.load(f)['global_accuracy'] == summary['global_accuracy']


def test_rounds_per_call_changes_nothing_but_the_calls(tmp_path, capsys):
  """Rounds run K per call (a lax.scan, cut at evaluations and checkpoints) write the
  same metrics, evaluations and checkpoints as one round per call, and a run resumed
  with another rounds_per_call ends where the straight run does."""
  base = ['fed', 'run', '--config', CONFIG + ':tiny', '--no-progress', '--config.plots=False',
          '--config.algorithm=scaffold', '--config.dropout=0.2', '--config.num_rounds=9',
          '--config.checkpoint_every=4']
  runs = {}
  for k in (1, 4):
    workdir = str(tmp_path / f'k{k}')
    assert cli.main(base + ['--workdir', workdir, f'--config.rounds_per_call={k}']) == 0
    runs[k] = workdir
  # Segments with k=4 (evaluations after 3, 6, 9; checkpoints after 4, 8): 3, 1, 2, 2, 1.
  resumed = str(tmp_path / 'resumed')
  assert cli.main(base + ['--workdir', resumed, '--config.rounds_per_call=3',
                          '--config.num_rounds=5']) == 0
  assert cli.main(base + ['--workdir', resumed, '--config.rounds_per_call=2']) == 0
  capsys.readouterr()
  ref = _rows(runs[1])
  assert [r['round'] for r in ref] == list(range(1, 10))
  assert [r['round'] for r in ref if 'global_accuracy' in r] == [3, 6, 9]
  assert len({r['num_reported'] for r in ref}) > 1   # dropout: the rounds differ
  for other in (runs[4], resumed):
    rows = _rows(other)
    assert [sorted(r) for r in rows] == [sorted(r) for r in ref]
    for a, b in zip(ref, rows):
      for key, value in a.items():
        np.testing.assert_allclose(b[key], value, rtol=1e-5, atol=1e-6, err_msg=key)
  for workdir in runs.values():
    assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['4', '8']


def test_resume_refuses_another_config_and_restores_without_checkpointing(tmp_path, capsys):
  workdir = str(tmp_path / 'w')
  base = ['fed', 'run', '--config', CONFIG + ':tiny', '--workdir', workdir, '--no-progress']
  assert cli.main(base + ['--config.num_rounds=3']) == 0      # checkpoint at round 3
  kept = _rows(workdir)
  assert cli.main(base + ['--config.partition.alpha=0.1']) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert 'holds results of another config (it differs in partition.alpha: 0.5 here' in err
  assert _rows(workdir) == kept
  # Rounds, evaluation and checkpointing may change; with checkpoint_every=0 the run
  # still resumes from round 3 rather than starting over.
  assert cli.main(base + ['--config.checkpoint_every=0', '--config.eval_every=2']) == 0
  resumed = _rows(workdir)
  straight = str(tmp_path / 'straight')
  assert cli.main(['fed', 'run', '--config', CONFIG + ':tiny', '--workdir', straight,
                   '--no-progress']) == 0
  assert [r['round'] for r in resumed] == [1, 2, 3, 4, 5, 6]
  assert resumed[:3] == kept
  for ra, rb in zip(_rows(straight), resumed):
    np.testing.assert_allclose(ra['train_loss'], rb['train_loss'], rtol=1e-6)


def test_damaged_checkpoint_is_refused_in_one_line(tmp_path, capsys):
  workdir = str(tmp_path / 'w')
  base = ['fed', 'run', '--config', CONFIG + ':tiny', '--workdir', workdir, '--no-progress']
  assert cli.main(base + ['--config.num_rounds=3']) == 0
  damaged = 0
  for root, _, files in os.walk(os.path.join(workdir, 'checkpoints', '3')):
    if os.path.basename(root) == 'd':
      for f in files:
        with open(os.path.join(root, f), 'r+b') as fh:
          fh.truncate(16)
        damaged += 1
  assert damaged
  kept = _rows(workdir)
  capsys.readouterr()
  assert cli.main(base) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1
  assert 'cannot read the checkpoint' in err and os.path.join('checkpoints', '3') in err
  assert _rows(workdir) == kept


@pytest.mark.parametrize('override,match', [
    ('--config.clients_per_round=50', 'clients_per_round'),
    ('--config.partition.alpha=0', 'config.partition.alpha must be positive'),
    ('--config.num_clients=5000', '5000 clients but only'),
    ('--config.algorithm=fedsgd', 'config.algorithm must be one of'),
    ("--config.mesh=[('clients', 3)]", 'config.mesh'),
    ("--config.mesh=[('a', 1), ('b', 1)]", 'config.mesh must be one axis'),
    ('--config.batch_size=0', 'config.batch_size must be an integer >= 1'),
    ('--config.local_epochs=0', 'config.local_epochs must be an integer >= 1'),
    ('--config.optimizer.learning_rate=-0.1', 'config.optimizer.learning_rate must be positive'),
    ('--config.optimizer.momentum=1.0', 'config.optimizer.momentum must be in [0, 1)'),
    ('--config.num_rounds=-1', 'config.num_rounds must be an integer >= 0'),
    ('--config.checkpoint_every=-2', 'config.checkpoint_every must be'),
    ('--config.rounds_per_call=0', 'config.rounds_per_call must be an integer >= 1'),
    ('--config.model.name=mlpp', "Unknown model 'mlpp'"),
    ('--config.model.kwargs.widht=3', "model 'mlp'"),
    ('--config.partition.alpah=0.3', "partition 'dirichlet' has no option 'alpah'"),
    ('--config.feature_skew.kind=blur', 'feature skew kind'),
    ('--config.feature_skew.knid=noise', 'config.feature_skew'),
    ('--config.algorithm_options.mu=0.1', "fedavg has no option 'mu'"),
    # The names of older versions, refused with the new one.
    ('--config.local.lr=0.1', 'config.local.lr is now config.optimizer.learning_rate'),
    ('--config.dataset=mnist1d', 'config.dataset is now config.data.name'),
    ('--config.model_options.hidden=(8,)', 'config.model_options is now config.model.kwargs'),
])
def test_fed_run_user_errors_exit_2(tmp_path, capsys, override, match):
  code = cli.main(['fed', 'run', '--config', CONFIG + ':tiny', '--workdir',
                   str(tmp_path / 'w'), '--no-progress', override])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert match in err and len(err.splitlines()) == 1
  assert not os.path.exists(tmp_path / 'w')   # refused before anything is written


def test_option_groups_take_new_keys_from_the_command_line(tmp_path, capsys):
  """Partition, algorithm, model and feature-skew options the config file does not list."""
  def run(name, *overrides):
    workdir = str(tmp_path / name)
    assert cli.main(['fed', 'run', '--config', CONFIG + ':tiny', '--workdir', workdir,
                     '--no-progress', '--config.num_rounds=1', *overrides]) == 0
    with open(os.path.join(workdir, 'summary.json')) as f:
      return json.load(f)

  flag = run('flag', '--config.algorithm=fedprox', '--config.algorithm_options.mu=0.5')
  whole = run('whole', '--config.algorithm=fedprox', "--config.algorithm_options={'mu': 0.5}")
  plain = run('plain', '--config.algorithm=fedprox')
  assert flag['global_accuracy'] == whole['global_accuracy']
  assert flag['personalized_accuracy_mean'] == whole['personalized_accuracy_mean']
  assert flag['personalized_accuracy_mean'] != plain['personalized_accuracy_mean']
  path = run('path', '--config.partition.method=pathological',
             '--config.partition.classes_per_client=3')['partition']
  assert path['method'] == 'pathological' and path['options']['classes_per_client'] == 3
  # A model option that draws dropout masks: the model state carries a PRNG key.
  dropout = run('dropout', '--config.model.kwargs.dropout=0.2')
  assert 0.0 <= dropout['global_accuracy'] <= 1.0
  rot = run('rot', "--config.feature_skew.kind=rotate", '--config.feature_skew.strength=5')
  assert rot['personalized_accuracy_mean'] != run('flat')['personalized_accuracy_mean']


def test_no_local_test_split_writes_null_not_nan(tmp_path, capsys):
  workdir = str(tmp_path / 'w')
  assert cli.main(['fed', 'run', '--config', CONFIG + ':tiny', '--workdir', workdir,
                   '--no-progress', '--config.num_rounds=1',
                   '--config.partition.test_fraction=0']) == 0

  def strict(text):
    return json.loads(text, parse_constant=lambda c: pytest.fail(f'{c} in JSON output'))

  assert strict(capsys.readouterr().out.strip().splitlines()[-1])[
      'personalized_accuracy_mean'] is None
  with open(os.path.join(workdir, 'summary.json')) as f:
    summary = strict(f.read())
  assert summary['personalized_accuracy_mean'] is None and summary['global_accuracy'] > 0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    assert [strict(l)['personalized_accuracy_worst10'] for l in f] == [None]


def test_fedbn_keeps_norm_layers_local():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 40).astype(np.int32)
  x = rng.normal(size=(40, 5)).astype(np.float32)
  part = partition.iid(y, 4, seed=0, test_fraction=0.0)
  data = jax.tree.map(jnp.asarray, packing.pack(x, y, part.train, multiple=5))
  apply, params, state = functional(create('mlp', num_classes=3, input_shape=(5,),
                                           hidden=(6,), norm='batch'))
  alg = fedbn(make_local_trainer(apply, batch_size=5, epochs=1, lr=0.5))
  st = sim.init_state(alg, params, state, 4)
  round_fn = sim.make_round(alg, num_clients=4, clients_per_round=2, seed=0)
  st, info = round_fn(st, data)
  cohort = np.asarray(info['cohort'])
  # The server's normalization parameters and batch statistics never move ...
  np.testing.assert_array_equal(st.server.params['norms'][0]['scale'],
                                params['norms'][0]['scale'])
  np.testing.assert_array_equal(st.server.model_state['norms'][0]['mean'],
                                state['norms'][0]['mean'])
  # ... the shared layers do, and each cohort client has its own norm layer now.
  assert not np.allclose(st.server.params['head']['kernel'], params['head']['kernel'])
  scales = np.asarray(st.clients['params']['norms'][0]['scale'])
  assert not np.allclose(scales[cohort[0]], scales[cohort[1]])
  others = [k for k in range(4) if k not in cohort]
  for k in others:
    np.testing.assert_array_equal(scales[k], params['norms'][0]['scale'])
  means = np.asarray(st.clients['model_state']['norms'][0]['mean'])
  assert not np.allclose(means[cohort[0]], 0.0)


def test_every_registered_algorithm_traces_a_round_and_evaluation():
  from kdjax.federated.algorithms import ALGORITHMS
  from kdjax.federated.algorithms import make_algorithm
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 40).astype(np.int32)
  x = rng.normal(size=(40, 5)).astype(np.float32)
  part = partition.iid(y, 4, seed=0)
  tr, te = packing.pack_partition(x, y, part, batch_size=5)
  tr, te = jax.tree.map(jnp.asarray, tr), jax.tree.map(jnp.asarray, te)
  apply, params, state = functional(create('mlp', num_classes=3, input_shape=(5,),
                                           hidden=(6,), norm='batch'))
  trainer = make_local_trainer(apply, batch_size=5, epochs=1, lr=0.1)
  for name in ALGORITHMS:
    alg = make_algorithm(name, trainer, proxy_x=x[:8], num_classes=3)
    st = sim.init_state(alg, params, state, 4)
    round_fn = sim.make_round(alg, num_clients=4, clients_per_round=2, clients_per_chunk=1)
    new, info = jax.eval_shape(round_fn, st, tr)
    assert jax.tree.structure(new) == jax.tree.structure(st), name
    assert info['cohort'].shape == (2,)
    c, n = jax.eval_shape(sim.make_personal_evaluate(alg, apply), st, te, tr, 0)
    assert c.shape == (4,), name


def test_every_fed_config_has_the_documented_keys():
  """`--config.<key>` overrides work the same on every shipped federated config."""
  from kdjax.config import load_config
  folder = os.path.dirname(CONFIG)
  base = set(load_config(CONFIG).keys())
  names = sorted(f for f in os.listdir(folder) if f.endswith('.py'))
  assert len(names) >= 4
  for name in names:
    keys = set(load_config(os.path.join(folder, name)).keys())
    assert keys >= base, (name, sorted(base - keys))
