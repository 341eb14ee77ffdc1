"""MNIST-1D distillation: the MLP student from the CNN teacher (Hinton KD + CE).

    kdjax distill --config configs/mnist1d/kd.py --workdir workdirs/kd \
        --config.teacher.workdir=workdirs/teacher
    # with the unlabeled transfer split (teacher labels only there):
    kdjax distill --config configs/mnist1d/kd.py:transfer ... 

Variants: '' (labeled train split), 'transfer' (train + unlabeled transfer split),
'tiny' and 'transfer,tiny' (seconds).
"""

from kdjax.distill.defaults import base_config


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  unknown = variants - {'transfer', 'tiny'}
  if unknown:
    raise ValueError(f'unknown variant {sorted(unknown)}; use transfer and/or tiny')
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
  c.loss.terms = {'kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1}}
  if 'transfer' in variants:
    c.data.train_split = 'train+transfer'
    c.num_steps = 6000
  if 'tiny' in variants:
    c.num_steps = 100
    c.eval_every = c.checkpoint_every = c.log_every = 50
    c.steps_per_call = 25
  return c
