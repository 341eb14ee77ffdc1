"""UCI digits student baseline: a small MLP from labels.

    kdjax train --config configs/digits/student_baseline.py --workdir workdirs/digits_baseline
"""

from kdjax.engine.config import base_config


def get_config(arg=None):
  c = base_config()
  c.data.name = 'uci_digits'
  c.model.name = 'mlp'
  c.model.kwargs = {'hidden': (32,)}
  c.batch_size = 64
  c.num_steps = 1500
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 2e-3
  c.optimizer.weight_decay = 1e-4
  c.eval_every = c.checkpoint_every = 500
  c.loss.terms = {'ce': {'weight': 1.0}}
  if arg == 'tiny':
    c.num_steps = 40
    c.eval_every = c.checkpoint_every = c.log_every = 20
    c.steps_per_call = 10
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  return c
