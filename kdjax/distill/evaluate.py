"""``kdjax eval``: the latest checkpoint of a workdir on an eval split."""

from __future__ import annotations

import jax

from kdjax.distill import checkpoint as ckpt
from kdjax.distill.teacher import load_teacher
from kdjax.errors import UserError
from kdjax.parallel import make_mesh


def evaluate_workdir(workdir: str, *, split: str | None = None) -> dict:
  from kdjax.distill.loop import _make_evaluator
  if ckpt.latest_step(workdir) is None:
    raise UserError(f'{workdir} has no checkpoint to evaluate; train first with `kdjax train`')
  config = ckpt.load_config(workdir)
  if split:
    config.data.eval_split = split
  mesh = make_mesh([tuple(a) for a in config.mesh])
  frozen = load_teacher(workdir, mesh, config.partition_rules)
  from kdjax import data as kdata
  spec = kdata.dataset_spec(config.data.name, data_dir=config.data.data_dir or None)
  evaluate = _make_evaluator(config, frozen.fns.apply, spec, mesh, config.data.data_dir or None)

  class _View:  # the evaluator reads params['student'] and model_state
    params = {'student': frozen.variables[0]}
    model_state = frozen.variables[1]

  result = evaluate(_View)
  return {'step': frozen.step, 'split': config.data.eval_split,
          'accuracy': result.get('accuracy'), 'loss': result.get('loss'),
          'num_devices': jax.device_count()}
