"""FedAvg + local fine-tuning of the final global model: the personalized baseline.

The server runs plain FedAvg (:func:`kdjax.federated.fedavg.fedavg`, the same
updates and keys: the global model is FedAvg's, bit for bit). At evaluation,
*every* client fine-tunes the current global model ``w_R`` for
``finetune_epochs`` epochs of minibatch SGD on its own training split and
evaluates the result on its local test split:

.. math::

  v_k = \\mathrm{SGD}^{E_{ft}}_{D_k}(w_R).

This is the algorithm's ``finetune`` hook
(:attr:`kdjax.federated.base.FedAlgorithm.finetune`), which the personalized
evaluation calls for all clients, vmapped, with the packed training split
(:func:`kdjax.federated.simulator.make_personal_evaluate`). Nothing is kept:
the fine-tuned models exist only for the evaluation, and clients hold no
state. Global accuracy is FedAvg's global model.

Choices made: fine-tuning is plain SGD (with the trainer's momentum) at
``finetune_lr`` (default: the trainer's learning rate) in batches of the
trainer's size; its key is :func:`kdjax.federated.simulator.finetune_key`
(seed, round, client). It sends nothing, so the bytes are FedAvg's. (An
earlier kdjax version fine-tuned the global model a client received at its
last participation, about ``N / K`` rounds old; that is not the baseline
papers run and was removed.)
"""

from __future__ import annotations

from kdjax.errors import UserError
from kdjax.federated import base
from kdjax.federated.fedavg import fedavg
from kdjax.federated.local import LocalTrainer
from kdjax.federated.local import make_local_trainer


def fedavg_ft(trainer: LocalTrainer, *, finetune_epochs: int = 1,
              finetune_lr: float | None = None) -> base.FedAlgorithm:
  """FedAvg whose clients fine-tune the final global model before they evaluate.

  Args:
    trainer: the local trainer (FedAvg's local training).
    finetune_epochs: epochs of local fine-tuning (``>= 1``).
    finetune_lr: the fine-tuning SGD learning rate (default: the trainer's).

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm`: FedAvg with a ``finetune``
    hook (stateless clients).

  Raises:
    UserError: ``finetune_epochs < 1``.

  References:
    Wang, Mathews, Kiddon, Eichner, Beaufays & Ramage, "Federated Evaluation
    of On-device Personalization", arXiv:1910.10252, 2019; Yu, Bagdasaryan &
    Shmatikov, "Salvaging Federated Learning by Local Adaptation",
    arXiv:2002.04758, 2020.

  >>> from kdjax.models import create, functional
  >>> from kdjax.federated.local import make_local_trainer
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,), hidden=(8,)))
  >>> alg = fedavg_ft(make_local_trainer(apply, batch_size=2), finetune_epochs=2)
  >>> alg.name, alg.finetune is not None, alg.init(params, state, 5)[1]
  ('fedavg_ft', True, {})
  """
  if int(finetune_epochs) < 1:
    raise UserError(f'fedavg_ft needs finetune_epochs >= 1 (got {finetune_epochs}); set '
                    'algorithm_options.finetune_epochs to 1 or more.')
  avg = fedavg(trainer)
  finetuner = make_local_trainer(trainer.apply, batch_size=trainer.batch_size,
                                 epochs=int(finetune_epochs),
                                 lr=trainer.lr if finetune_lr is None else float(finetune_lr),
                                 momentum=trainer.momentum)

  def finetune(server, client_state, data, rng):
    del client_state
    ft = finetuner.train(server.params, server.model_state, data, rng)
    return ft.params, ft.model_state

  return avg._replace(name='fedavg_ft', finetune=finetune)
