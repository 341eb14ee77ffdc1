"""FedAvgM, FedAdam, FedYogi: FedAvg with a server optimizer on the pseudo-gradient.

The cohort's averaged change ``Δ = mean_k(w_k) − w`` is treated as a negative
gradient and handed to an optax optimizer on the server (FedAvg is the special
case ``optax.sgd(1.0)``).
"""

from __future__ import annotations

from kdjax.federated import base
from kdjax.federated.fedavg import fedavg
from kdjax.federated.local import LocalTrainer


def fedavgm(trainer: LocalTrainer, *, server_lr: float = 1.0,
            server_momentum: float = 0.9) -> base.FedAlgorithm:
  """FedAvg with server momentum: ``v ← βv − Δ; w ← w − η v``.

  Args:
    trainer: the local trainer.
    server_lr: server learning rate η.
    server_momentum: β.

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm`.

  References:
    Hsu, Qi & Brown, "Measuring the Effects of Non-Identical Data Distribution
    for Federated Visual Classification", arXiv:1909.06335, 2019.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=2, input_shape=(3,), hidden=(4,)))
  >>> fedavgm(make_local_trainer(apply, batch_size=2)).name
  'fedavgm'
  """
  tx = base.server_optimizer('momentum', lr=server_lr, momentum=server_momentum)
  return fedavg(trainer, server_tx=tx, name='fedavgm')


def fedadam(trainer: LocalTrainer, *, server_lr: float = 0.01, b1: float = 0.9,
            b2: float = 0.99, tau: float = 1e-3) -> base.FedAlgorithm:
  """FedAvg with an Adam server optimizer (τ is Adam's ε; optax's bias correction kept).

  Args:
    trainer: the local trainer.
    server_lr: server learning rate.
    b1: first-moment decay.
    b2: second-moment decay.
    tau: adaptivity τ.

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm`.

  References:
    Reddi, Charles, Zaheer, Garrett, Rush, Konečný, Kumar & McMahan, "Adaptive
    Federated Optimization", ICLR 2021.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=2, input_shape=(3,), hidden=(4,)))
  >>> fedadam(make_local_trainer(apply, batch_size=2)).name
  'fedadam'
  """
  tx = base.server_optimizer('adam', lr=server_lr, b1=b1, b2=b2, eps=tau)
  return fedavg(trainer, server_tx=tx, name='fedadam')


def fedyogi(trainer: LocalTrainer, *, server_lr: float = 0.01, b1: float = 0.9,
            b2: float = 0.99, tau: float = 1e-3) -> base.FedAlgorithm:
  """FedAvg with a Yogi server optimizer.

  Args:
    trainer: the local trainer.
    server_lr: server learning rate.
    b1: first-moment decay.
    b2: second-moment decay.
    tau: adaptivity τ.

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm`.

  References:
    Reddi et al., "Adaptive Federated Optimization", ICLR 2021.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=2, input_shape=(3,), hidden=(4,)))
  >>> fedyogi(make_local_trainer(apply, batch_size=2)).name
  'fedyogi'
  """
  tx = base.server_optimizer('yogi', lr=server_lr, b1=b1, b2=b2, eps=tau)
  return fedavg(trainer, server_tx=tx, name='fedyogi')
