"""``train_scheme(config, workdir)``: the run of the scheme ``config.scheme.name`` names.

``kdjax train`` (and ``kdjax distill``) hand a config with a ``scheme`` group here
instead of to :func:`kdjax.distill.train_and_evaluate`.
"""

from __future__ import annotations

from typing import Any, Callable

import ml_collections

from kdjax.errors import UserError
from kdjax.schemes import bdkd_online
from kdjax.schemes import cross
from kdjax.schemes import curriculum
from kdjax.schemes import dml
from kdjax.schemes import layerwise
from kdjax.schemes import mst_distill
from kdjax.schemes import multi_teacher
from kdjax.schemes import online
from kdjax.schemes import self_distill
from kdjax.schemes import stages

# name -> train_and_evaluate(config, workdir) -> summary
SCHEMES: dict[str, Callable[[ml_collections.ConfigDict, str], dict[str, Any]]] = {
    dml.NAME: dml.train_and_evaluate,
    **{name: online.train_and_evaluate for name in online.NAMES},
    multi_teacher.NAME: multi_teacher.train_and_evaluate,
    stages.NAME: stages.train_and_evaluate,
    cross.NAME: cross.train_and_evaluate,
    curriculum.NAME: curriculum.train_and_evaluate,
    layerwise.NAME: layerwise.train_and_evaluate,
    **{name: self_distill.train_and_evaluate for name in self_distill.NAMES},
    bdkd_online.NAME: bdkd_online.train_and_evaluate,
    mst_distill.NAME: mst_distill.train_and_evaluate,
}


def train_scheme(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs ``config.scheme.name``'s training into ``workdir`` and returns its summary.

  Raises:
    UserError: an unknown scheme (nothing written), or what the scheme's run raises.

  >>> train_scheme(ml_collections.ConfigDict({'scheme': {'name': 'nope'}}), '/tmp/x')
  Traceback (most recent call last):
  kdjax.errors.UserError: config.scheme.name 'nope' is not a scheme; use one of: dml, kdcl, one, multi_teacher, stages, cross, curriculum, layerwise, byot, mean_teacher, snapshot, bdkd_online, mst_distill
  """
  scheme = config.get('scheme')
  name = scheme.get('name') if hasattr(scheme, 'get') else None
  if name not in SCHEMES:
    raise UserError(f'config.scheme.name {name!r} is not a scheme; use one of: '
                    f'{", ".join(SCHEMES)}')
  return SCHEMES[name](config, workdir)
