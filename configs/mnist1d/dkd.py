"""MNIST-1D distillation: the MLP student from the CNN teacher with Decoupled KD + CE.

DKD as mdistiller runs it (alpha 1, beta 8, T 4, CE weight 1, the DKD weight ramped
as ``min(epoch / warmup, 1)`` over 1-based epochs, constant within an epoch), with
this data set's epochs: 4000 training examples in batches of 128 are about 31 steps, and
the ramp lasts mdistiller's 20 epochs (620 of the 3000 steps). Same student and
recipe as ``configs/mnist1d/kd.py``.

    kdjax distill --config configs/mnist1d/dkd.py --workdir workdirs/dkd \
        --config.teacher.workdir=workdirs/teacher

Variants: '' and 'tiny' (seconds).
"""

from kdjax.config import sibling
from kdjax.losses.schedules import epoch_ramp

student_baseline = sibling(__file__, 'student_baseline')  # same student, same recipe

STEPS_PER_EPOCH = 4000 // 128   # 31
WARMUP_EPOCHS = 20


def dkd_warmup(steps_per_epoch: int, warmup_epochs: int = WARMUP_EPOCHS) -> dict:
  """The DKD weight ``min(epoch / warmup, 1)`` (1-based epochs) as a step schedule."""
  return epoch_ramp(steps_per_epoch, warmup_epochs)


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = student_baseline.get_config('tiny' if arg == 'tiny' else None)
  if arg == 'tiny':
    warmup = dkd_warmup(5, warmup_epochs=4)   # 100 steps: full weight from step 15
  else:
    warmup = dkd_warmup(STEPS_PER_EPOCH)
  c.loss.terms = {'ce': {'weight': 1.0},
                  'dkd': {'weight': warmup, 'alpha': 1.0, 'beta': 8.0, 'temperature': 4.0}}
  return c
