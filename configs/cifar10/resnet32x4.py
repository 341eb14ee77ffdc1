"""CIFAR-10 teacher: ResNet32x4 from labels (the CRD / mdistiller recipe, 240 epochs).

Reads `tfds.data_source('cifar10')`: needs the data prepared or internet once.
`recipe(data_name, arg)` is the recipe for either CIFAR (configs/cifar100/resnet32x4.py
is `recipe('cifar100', arg)`); both have 50,000 training images.

    kdjax train --config configs/cifar10/resnet32x4.py --workdir workdirs/cifar_r32x4
    kdjax train --config configs/cifar10/resnet32x4.py:tiny ...   # a smoke run (tests use mock data)
"""

from kdjax.engine.config import base_config

STEPS_PER_EPOCH = 50_000 // 64   # 781


def get_config(arg=None):
  return recipe('cifar10', arg)


def recipe(data_name: str, arg=None):
  """The ResNet32x4 recipe on ``data_name`` (``'cifar10'`` or ``'cifar100'``)."""
  c = base_config()
  c.data.name = data_name
  c.data.eval_split = 'test'
  c.data.augment = {'kind': 'image', 'crop_padding': 4, 'flip': True}
  c.data.eval_batch_size = 500
  c.model.name = 'resnet32x4'
  c.batch_size = 64
  c.num_steps = 240 * STEPS_PER_EPOCH
  c.optimizer.name = 'sgd'
  c.optimizer.learning_rate = 0.05
  c.optimizer.momentum = 0.9
  c.optimizer.weight_decay = 5e-4
  c.optimizer.schedule = 'step'
  c.optimizer.decay_steps = [e * STEPS_PER_EPOCH for e in (150, 180, 210)]
  c.optimizer.decay_factor = 0.1
  c.eval_every = 5 * STEPS_PER_EPOCH
  c.checkpoint_every = 5 * STEPS_PER_EPOCH
  c.log_every = STEPS_PER_EPOCH
  c.steps_per_call = 11   # 781 steps per epoch = 11 * 71
  c.loss.terms = {'ce': {'weight': 1.0}}
  if arg == 'tiny':
    tiny(c)
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  return c


def tiny(c):
  c.model.kwargs = {'depth': 8, 'widths': (8, 8, 16, 16)}
  c.batch_size = 8
  c.num_steps = 4
  c.eval_every = c.checkpoint_every = c.log_every = 2
  c.steps_per_call = 2
  c.data.eval_batch_size = 8
  c.optimizer.decay_steps = [2]
