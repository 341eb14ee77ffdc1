"""A non-IID sweep on MNIST-1D: Dirichlet α × algorithm × seed, 100 clients.

    kdjax fed sweep --config configs/fed/mnist1d_sweep.py --workdir workdirs/fed_sweep
    kdjax fed sweep --config configs/fed/mnist1d_sweep.py:tiny --workdir /tmp/sweep   # seconds
    kdjax fed sweep --config configs/fed/mnist1d_sweep.py --workdir DIR \
        --config.grid.alpha="[0.1, 1e999]" --config.grid.algorithm="['fedavg', 'scaffold']"

The base fields are those of ``configs/fed/mnist1d_fedavg.py`` (any of them can
be overridden as in ``kdjax fed run``); ``grid`` adds the axes. ``inf`` in
``grid.alpha`` (``1e999`` on the command line) is the IID partition. A proxy set
of ``proxy_size`` unlabeled training examples is held out for every algorithm
(FedDF, KnFu and EdgeFD distill on it), so all cells train on the same data.
``local_only`` (no communication; a client trains only when sampled, the same
local budget as every other algorithm) and ``fedavg_ft`` (FedAvg whose clients
fine-tune the final global model for one epoch before evaluating) are the
baselines of the personalized columns; the table's last column is each
algorithm's personalized accuracy minus local_only's, seed by seed (docs/fed_baselines.md reads it). The default budget
(rounds, cohort, local epochs) is sized so the full grid (5 α × 9 algorithms ×
3 seeds, each α × algorithm's seeds vmapped) runs in a few minutes on a 2-core CPU.
"""

import os

import ml_collections

from kdjax.config import sibling


def get_config(arg=None):
  c = sibling(os.path.abspath(__file__), 'mnist1d_fedavg').get_config()
  c.num_clients = 100
  c.clients_per_round = 10
  c.num_rounds = 50
  c.eval_every = 25
  c.rounds_per_call = 25         # one call per evaluation period
  c.proxy_size = 500
  c.local_epochs = 2
  c.optimizer.learning_rate = 0.1
  c.checkpoint_every = 0
  c.grid = ml_collections.ConfigDict({
      'alpha': [0.05, 0.1, 0.5, 1.0, float('inf')],
      # local_only and fedavg_ft are the two baselines of personalized accuracy: a
      # personalized method earns its bytes only where it beats both.
      'algorithm': ['local_only', 'fedavg', 'fedavg_ft', 'fedprox', 'scaffold', 'feddf',
                    'fedd2s', 'knfu', 'edgefd'],
      'seeds': [0, 1, 2],
      # FedD2S in its paper's form (server-side heads; kdjax.federated.fedd2s)
      'options': {'fedprox': {'mu': 0.01}, 'fedd2s': {'knowledge': 'heads'}},
      'vmap_seeds': True,   # run a cell's seeds as one vmapped simulation where possible
  })
  if arg == 'tiny':
    c.num_clients = 20
    c.clients_per_round = 5
    c.num_rounds = 3
    c.eval_every = 3
    c.proxy_size = 100
    c.model.kwargs.hidden = (16,)
    c.local_epochs = 1
    c.grid.alpha = [0.5, float('inf')]
    c.grid.algorithm = ['fedavg', 'fedprox']
    c.grid.seeds = [0, 1]
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  return c
