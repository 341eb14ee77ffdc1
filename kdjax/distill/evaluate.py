"""``kdjax eval``: the latest checkpoint of a workdir on an eval split."""

from __future__ import annotations

import jax

from kdjax import data as kdata
from kdjax import teacher as teacher_lib
from kdjax import workdir as workdir_lib
from kdjax.config import merge
from kdjax.engine.config import base_config
from kdjax.engine.evaluate import make_evaluator
from kdjax.errors import UserError
from kdjax.parallel import make_mesh


def evaluate_workdir(workdir: str, *, split: str | None = None) -> dict:
  """Accuracy and loss of a workdir's latest checkpoint on ``split`` (default: its eval split)."""
  if workdir_lib.latest_step(workdir) is None:
    raise UserError(f'{workdir} has no checkpoint to evaluate; train first with `kdjax train`')
  config = merge(base_config(), workdir_lib.read_config(workdir))
  split = split or config.data.eval_split
  mesh = make_mesh([tuple(a) for a in config.mesh])
  model = teacher_lib.load_teacher(workdir, mesh, config.partition_rules)
  arrays = kdata.load_arrays(config.data.name, split, data_dir=config.data.data_dir or None)
  evaluate = make_evaluator(model.apply, arrays, mesh, batch_size=int(config.data.eval_batch_size))
  result = evaluate(*model.variables)
  return {'step': model.step, 'split': split, 'accuracy': result.get('accuracy'),
          'loss': result.get('loss'), 'num_devices': jax.device_count()}
