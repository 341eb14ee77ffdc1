"""MNIST-1D distillation: the MLP student from the CNN teacher (Hinton KD + CE).

    kdjax distill --config configs/mnist1d/kd.py --workdir workdirs/kd \
        --config.teacher.workdir=workdirs/teacher
    # with the unlabeled transfer split (only the teacher labels it):
    kdjax distill --config configs/mnist1d/kd.py:transfer ...

Variants: '' (labeled train split), 'transfer' (train + unlabeled transfer split),
'tiny' and 'transfer,tiny' (seconds). Same student and recipe as the baseline.
"""

from kdjax.config import sibling

student_baseline = sibling(__file__, 'student_baseline')  # same student, same recipe


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  unknown = variants - {'transfer', 'tiny'}
  if unknown:
    raise ValueError(f'unknown variant {sorted(unknown)}; use transfer and/or tiny')
  c = student_baseline.get_config('tiny' if 'tiny' in variants else None)
  c.loss.terms = {'kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1}}
  if 'transfer' in variants:
    c.data.train_split = 'train+transfer'
    if 'tiny' not in variants:
      c.num_steps = 6000
  return c
