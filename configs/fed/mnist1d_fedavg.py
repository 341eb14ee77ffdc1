"""FedAvg on MNIST-1D: 100 clients, Dirichlet(0.5) label skew, the paper's MLP.

    kdjax fed run --config configs/fed/mnist1d_fedavg.py --workdir workdirs/fed
    kdjax fed run --config configs/fed/mnist1d_fedavg.py:tiny --workdir /tmp/fed   # seconds
    kdjax fed run --config configs/fed/mnist1d_fedavg.py --workdir DIR \
        --config.algorithm=scaffold --config.partition.alpha=0.1

Option groups take keys the file does not list, checked by what they configure:
``--config.algorithm=fedprox --config.algorithm_options.mu=0.01``,
``--config.partition.method=pathological --config.partition.classes_per_client=3``
(the partitioners' options: ``alpha``, ``min_size``, ``classes_per_client``,
``shards_per_client``, ``distribution``, ``sigma``, ``exponent``, ``test_fraction``),
``--config.model.kwargs.dropout=0.1``, ``--config.feature_skew.kind=noise
--config.feature_skew.strength=0.2`` (``shift``, ``noise``, ``scale``, ``rotate``).
The clients' optimizer is ``config.optimizer`` (``sgd`` by default; ``adam`` and
``adamw`` for the algorithms that do not assume SGD), ``batch_size`` their minibatch
and ``local_epochs`` their passes per round.

``algorithm`` is one of fedavg, fedprox, scaffold, fednova, fedavgm, fedadam,
fedyogi, fedbn, ditto, and the federated distillation methods fd, fedmd, dsfl,
feddf, fedd2s, knfu, edgefd (those that distill on public data need ``proxy_size``),
and the baselines local_only (each client alone, nothing sent) and fedavg_ft (FedAvg,
then each client fine-tunes; ``finetune_epochs``);
its options go in ``algorithm_options`` (``mu`` for fedprox, ``lam`` for ditto,
``server_lr`` for the FedOpt family). For IID use ``--config.partition.method=iid``.
``client_models`` (see ``configs/fed/mnist1d_hetero.py``) gives the clients
different architectures; ``mesh`` shards the cohort's client axis over devices
(``--config.mesh="[('clients', -1)]"``: all of them).
"""

from kdjax.federated.config import base_config


def get_config(arg=None):
  c = base_config()               # the defaults: kdjax/federated/config.py
  c.data.name = 'mnist1d'
  c.model.name = 'mlp'
  c.model.kwargs = {'hidden': (100, 100)}
  c.seed = 0
  c.num_clients = 100
  c.clients_per_round = 10
  c.num_rounds = 200
  c.partition = {'method': 'dirichlet', 'alpha': 0.5, 'min_size': 10, 'test_fraction': 0.2}
  c.algorithm = 'fedavg'
  c.optimizer.name = 'sgd'        # each client's optimizer, reset every round
  c.optimizer.learning_rate = 0.05
  c.optimizer.momentum = 0.0
  c.batch_size = 10               # a client's minibatch
  c.local_epochs = 2
  c.eval_every = 10
  c.checkpoint_every = 50
  c.rounds_per_call = 10          # rounds per jitted call (lax.scan), cut at evaluations and
                                  # checkpoints; the same results, fewer dispatches
  if arg == 'tiny':
    c.num_clients = 20
    c.clients_per_round = 5
    c.num_rounds = 6
    c.eval_every = 3
    c.checkpoint_every = 3
    c.model.kwargs.hidden = (32,)
    c.local_epochs = 1
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  return c
