"""`kdjax fed run` with two client architectures: FedMD and DS-FL (public-data knowledge)."""

import json
import os

import pytest

from kdjax.config import load_config
from kdjax.config import split_overrides
from kdjax.federated import run

CONFIG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'fed',
                      'mnist1d_hetero.py')
TINY = ['--config.num_clients=8', '--config.clients_per_round=4', '--config.num_rounds=2',
        '--config.eval_every=2', '--config.checkpoint_every=0', '--config.plots=False',
        '--config.proxy_size=40', '--config.local.epochs=1']
C = 10   # MNIST-1D classes
P = 40   # proxy examples


@pytest.mark.parametrize('name,up,down', [
    ('fedmd', 4 * P * C, 4 * P * C),
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
