"""Config names -> federated algorithms.

``make_algorithm('fedprox', trainer, mu=0.01)`` builds the algorithm a config's
``algorithm`` (and ``algorithm_options``) names.
"""

from __future__ import annotations

from typing import Any, Callable

from kdjax.errors import UserError
from kdjax.federated import base
from kdjax.federated.ditto import ditto
from kdjax.federated.dsfl import dsfl
from kdjax.federated.edgefd import edgefd
from kdjax.federated.fd import fd
from kdjax.federated.fedd2s import fedd2s
from kdjax.federated.fedavg import fedavg
from kdjax.federated.fedavg_ft import fedavg_ft
from kdjax.federated.fedbn import fedbn
from kdjax.federated.fedmd import fedmd
from kdjax.federated.feddf import feddf
from kdjax.federated.fednova import fednova
from kdjax.federated.fedopt import fedadam
from kdjax.federated.fedopt import fedavgm
from kdjax.federated.fedopt import fedyogi
from kdjax.federated.fedprox import fedprox
from kdjax.federated.knfu import knfu
from kdjax.federated.local import LocalTrainer
from kdjax.federated.local_only import local_only
from kdjax.federated.scaffold import scaffold

ALGORITHMS: dict[str, Callable[..., base.FedAlgorithm]] = {
    'fedavg': fedavg,
    'fedprox': fedprox,
    'scaffold': scaffold,
    'fednova': fednova,
    'fedavgm': fedavgm,
    'fedadam': fedadam,
    'fedyogi': fedyogi,
    'fedbn': fedbn,
    'ditto': ditto,
    'feddf': feddf,
    'fd': fd,
    'fedmd': fedmd,
    'dsfl': dsfl,
    'edgefd': edgefd,
    'knfu': knfu,
    'fedd2s': fedd2s,
    'local_only': local_only,
    'fedavg_ft': fedavg_ft,
}

# Algorithms whose factory takes the unlabeled proxy / public inputs as second argument.
NEEDS_PROXY = frozenset({'feddf', 'fedmd', 'dsfl', 'edgefd', 'knfu'})
# Algorithms that take ``num_classes``.
NEEDS_NUM_CLASSES = frozenset({'fd', 'knfu', 'fedd2s'})


def make_algorithm(name: str, trainer: LocalTrainer, *, proxy_x=None,
                   num_classes: int | None = None, **options: Any) -> base.FedAlgorithm:
  """Builds the algorithm ``name`` around ``trainer``.

  Args:
    name: one of :data:`ALGORITHMS`.
    trainer: the local trainer.
    proxy_x: unlabeled proxy inputs, for the algorithms in :data:`NEEDS_PROXY`.
    num_classes: the class count, for the algorithms in :data:`NEEDS_NUM_CLASSES`.
    **options: the algorithm's keyword options (``mu`` for FedProx, ...).

  Returns:
    A :class:`~kdjax.federated.base.FedAlgorithm`.

  Raises:
    UserError: an unknown name or option.

  >>> 'scaffold' in ALGORITHMS and 'edgefd' in NEEDS_PROXY
  True
  """
  if name not in ALGORITHMS:
    raise UserError(f'unknown federated algorithm {name!r}; use one of {", ".join(ALGORITHMS)}.')
  args = (trainer,)
  if name in NEEDS_PROXY:
    if proxy_x is None or len(proxy_x) == 0:
      raise UserError(f'{name} needs unlabeled proxy data: set proxy_size > 0 in the config '
                      '(e.g. --config.proxy_size=500).')
    args = (trainer, proxy_x)
  if name in NEEDS_NUM_CLASSES:
    options = dict(options, num_classes=num_classes)
  try:
    return ALGORITHMS[name](*args, **options)
  except TypeError as e:
    raise UserError(f'algorithm {name!r}: {e}.') from None
