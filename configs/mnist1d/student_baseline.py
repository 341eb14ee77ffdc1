"""MNIST-1D student baseline: the MLP trained from labels only.

    kdjax train --config configs/mnist1d/student_baseline.py --workdir workdirs/baseline
"""

from kdjax.engine.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.name = 'mnist1d'
  c.model.name = 'mlp'
  c.num_steps = 3000
  c.batch_size = 128
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 1e-4
  c.eval_every = 500
  c.checkpoint_every = 1000
  c.loss.terms = {'ce': {'weight': 1.0}}
  if arg == 'tiny':
    c.num_steps = 100
    c.eval_every = c.checkpoint_every = c.log_every = 50
    c.steps_per_call = 25
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  return c
