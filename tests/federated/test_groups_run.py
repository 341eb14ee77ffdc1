"""`kdjax fed run` with two client architectures: FD, FedD2S, FedMD, DS-FL; FedAvg refused."""

import json
import os

import pytest

from kdjax import cli
from kdjax.config import load_config
from kdjax.config import split_overrides
from kdjax.federated import run

CONFIG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'fed',
                      'mnist1d_hetero.py')
TINY = ['--config.num_clients=8', '--config.clients_per_round=4', '--config.num_rounds=2',
        '--config.eval_every=2', '--config.checkpoint_every=0', '--config.plots=False',
        '--config.proxy_size=40', '--config.local_epochs=1']
C = 10   # MNIST-1D classes
P = 40   # proxy examples


@pytest.mark.parametrize('name,up,down', [
    ('fd', 4 * (C * C + C), 4 * C * C),
    ('fedd2s', 4 * (C * C + C), 4 * C * C),
    ('fedmd', 4 * P * C, 4 * P * C),     # public-data knowledge: logits on the proxy set
    ('dsfl', 4 * P * C, 4 * P * C),
])
def test_two_architectures_in_one_run(tmp_path, name, up, down):
  args = TINY + [f'--config.algorithm={name}']
  config = load_config(CONFIG + ':tiny', split_overrides(args)[1])
  workdir = str(tmp_path / name)
  summary = run.run_simulation(config, workdir, progress=False)
  assert summary['round'] == 2
  for key in ('global_accuracy', 'personalized_accuracy_mean', 'personalized_accuracy_worst10'):
    assert 0.0 <= summary[key] <= 1.0
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(l) for l in f]
  for row in rows:   # logit-space knowledge: the same bytes per client in both groups
    assert row['bytes_up'] == row['num_reported'] * up
    assert row['bytes_down'] == 4 * down


def test_fedavg_with_client_models_exits_2_in_one_line(tmp_path, capsys):
  code = cli.main(['fed', 'run', '--config', CONFIG + ':tiny', '--workdir', str(tmp_path / 'w'),
                   '--no-progress', '--config.algorithm=fedavg'])
  err = capsys.readouterr().err.strip()
  assert code == 2
  assert 'cannot mix client architectures' in err and len(err.splitlines()) == 1
