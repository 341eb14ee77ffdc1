"""FedProx: FedAvg with a proximal term that keeps local models near the global one.

Each client minimises ``F_k(w) + (μ/2)·‖w − w_t‖²`` from ``w_t``; the server
step is FedAvg's. (The paper also allows a variable amount of local work per
client; here local work is set by the trainer, and clients with fewer examples
take fewer steps.)
"""

from __future__ import annotations

import optax

from kdjax.federated import base
from kdjax.federated.fedavg import fedavg
from kdjax.federated.local import LocalTrainer


def fedprox(trainer: LocalTrainer, *, mu: float = 0.01,
            server_tx: optax.GradientTransformation | None = None) -> base.FedAlgorithm:
  """FedProx with proximal coefficient ``mu``.

  Args:
    trainer: the local trainer.
    mu: the proximal coefficient μ ≥ 0 (μ = 0 is FedAvg).
    server_tx: the server optimizer (default ``optax.sgd(1.0)``).

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm`.

  References:
    Li, Sahu, Zaheer, Sanjabi, Talwalkar & Smith, "Federated Optimization in
    Heterogeneous Networks", MLSys 2020.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=2, input_shape=(3,), hidden=(4,)))
  >>> fedprox(make_local_trainer(apply, batch_size=2), mu=0.1).name
  'fedprox'
  """
  mu = float(mu)

  def penalty(params, global_params):
    return 0.5 * mu * base.tree_sq_norm(base.tree_sub(params, global_params))

  return fedavg(trainer, server_tx=server_tx, penalty_fn=penalty, name='fedprox')
