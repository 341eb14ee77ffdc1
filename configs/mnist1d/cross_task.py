"""MNIST-1D cross-task distillation: a 10-digit teacher teaches a student of a coarser
task, 5 classes of digit pairs {0,1}, {2,3}, ... (kdjax.schemes.cross): the data's
labels go through ``student_labels`` and the teacher's probabilities through its
``label_map`` (summed per pair).

    kdjax train --config configs/mnist1d/teacher.py --workdir workdirs/teacher
    kdjax distill --config configs/mnist1d/cross_task.py --workdir workdirs/cross_task \
        --config.teacher.workdir=workdirs/teacher
    kdjax train --config configs/mnist1d/cross_task.py:baseline --workdir workdirs/coarse_ce

Variants: '' (KD + CE), 'baseline' (CE only, no teacher), 'tiny' with either.
"""

from kdjax.config import sibling
from kdjax.schemes import COARSE5
from kdjax.schemes import cross_scheme

student_baseline = sibling(__file__, 'student_baseline')  # same student, same recipe


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  unknown = variants - {'baseline', 'tiny'}
  if unknown:
    raise ValueError(f'unknown variant {sorted(unknown)}; use baseline and/or tiny')
  c = student_baseline.get_config('tiny' if 'tiny' in variants else None)
  if 'baseline' in variants:
    c.scheme = cross_scheme(student_labels=list(COARSE5))
    c.loss.terms = {'ce': {'weight': 1.0}}
  else:
    c.scheme = cross_scheme(student_labels=list(COARSE5), label_map=list(COARSE5))
    c.loss.terms = {'kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1}}
  return c
