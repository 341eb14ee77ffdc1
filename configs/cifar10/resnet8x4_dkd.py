"""CIFAR-10 distillation: ResNet32x4 teacher -> ResNet8x4 student with Decoupled KD.

mdistiller's DKD recipe (megvii-research/mdistiller, ``configs/cifar100/dkd/res32x4_res8x4.yaml``
and the ``DKD`` defaults of ``mdistiller/engine/cfg.py``): CE weight 1, DKD with
alpha 1, beta 8, T 4, and the DKD weight ramped over the first 20 epochs as
``min(epoch / 20, 1)`` with mdistiller's 1-based epochs (1/20 in the first epoch,
1 from the 20th on). The ramp is a ``piecewise`` schedule of the term's weight,
constant within an epoch like mdistiller's. Optimizer and schedule: the shared
CIFAR recipe (SGD 0.05, momentum 0.9, weight decay 5e-4, batch 64, 240 epochs). The
published alpha/beta are for CIFAR-100; kdjax's CIFAR data set is CIFAR-10.

    kdjax distill --config configs/cifar10/resnet8x4_dkd.py --workdir workdirs/cifar_dkd \
        --config.teacher.workdir=workdirs/cifar_r32x4
"""

from kdjax.config import sibling
from kdjax.losses.schedules import epoch_ramp

resnet32x4 = sibling(__file__, 'resnet32x4')  # the shared CIFAR-10 recipe

WARMUP_EPOCHS = 20


def dkd_warmup(steps_per_epoch: int, warmup_epochs: int = WARMUP_EPOCHS) -> dict:
  """The DKD weight ``min(epoch / warmup, 1)`` (1-based epochs) as a step schedule."""
  return epoch_ramp(steps_per_epoch, warmup_epochs)


def get_config(arg=None):
  c = resnet32x4.get_config(None)
  c.model.name = 'resnet8x4'
  warmup = dkd_warmup(resnet32x4.STEPS_PER_EPOCH)
  if arg == 'tiny':
    resnet32x4.tiny(c)
    c.model.kwargs = {'widths': (8, 8, 16, 16)}
    warmup = dkd_warmup(1, warmup_epochs=4)   # one-step "epochs": 1/4, 1/2, 3/4, 1
  elif arg:
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c.loss.terms = {'ce': {'weight': 1.0},
                  'dkd': {'weight': warmup, 'alpha': 1.0, 'beta': 8.0, 'temperature': 4.0}}
  return c
