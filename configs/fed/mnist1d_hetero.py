"""Heterogeneous client models on MNIST-1D: two MLP architectures, federated distillation.

    kdjax fed run --config configs/fed/mnist1d_hetero.py --workdir workdirs/fed_hetero
    kdjax fed run --config configs/fed/mnist1d_hetero.py:tiny --workdir /tmp/fedh \
        --config.algorithm=fedmd

``client_models`` (each a model group: ``name``, ``kwargs``, and a ``fraction`` of
the clients) assigns each client an architecture (a seeded permutation of
the clients cut by ``fraction``); clients are grouped by architecture and
vmapped within a group (``kdjax.federated.groups``). Only the distillation
algorithms accept it: fd, fedmd, dsfl, feddf, edgefd, knfu, fedd2s (those with
public/proxy data need ``proxy_size`` > 0, set here).
"""

import ml_collections

from kdjax.config import sibling

fedavg = sibling(__file__, 'mnist1d_fedavg')


def get_config(arg=None):
  c = fedavg.get_config(arg)
  c.algorithm = 'fedd2s'
  c.proxy_size = 500 if arg != 'tiny' else 200
  c.client_models = [
      ml_collections.ConfigDict({'name': 'mlp', 'kwargs': {'hidden': (32,)}, 'fraction': 0.5}),
      ml_collections.ConfigDict({'name': 'mlp', 'kwargs': {'hidden': (64, 32)},
                                 'fraction': 0.5}),
  ]
  return c
