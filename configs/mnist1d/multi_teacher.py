"""MNIST-1D multi-teacher distillation: the MLP student from two frozen teachers of
different architectures trained on different data, combined per example
(kdjax.schemes.multi_teacher).

The teachers (a 1-D CNN on the whole train split; an MLP on its first half):

    kdjax train --config configs/mnist1d/teacher.py --workdir workdirs/teacher
    kdjax train --config configs/mnist1d/teacher.py --workdir workdirs/teacher_mlp_half \
        --config.model.name=mlp --config.data.train_split='train[:50%]'

The student:

    kdjax distill --config configs/mnist1d/multi_teacher.py --workdir workdirs/multi_teacher
    kdjax distill --config configs/mnist1d/multi_teacher.py:confidence ...   # CA-MKD weights
    kdjax distill --config configs/mnist1d/multi_teacher.py:gate ...         # learned gate
    kdjax distill --config configs/mnist1d/multi_teacher.py:tiny ... \
        --config.scheme.teachers="[{'workdir': T1}, {'workdir': T2, 'label_map': None}]"

Variants: '' (average of the tempered probabilities), 'confidence', 'gate', and 'tiny'
with any of them. A teacher of other classes takes a ``label_map`` (one student class,
or -1 to drop, per teacher class). Same student and recipe as ``configs/mnist1d/kd.py``
(T = 4, KD weight 0.9, CE weight 0.1).
"""

from kdjax.config import sibling
from kdjax.schemes import multi_teacher_scheme

student_baseline = sibling(__file__, 'student_baseline')  # same student, same recipe

TEACHERS = [{'workdir': 'workdirs/teacher', 'label_map': None},
            {'workdir': 'workdirs/teacher_mlp_half', 'label_map': None}]


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  rules = variants & {'confidence', 'gate'}
  unknown = variants - {'confidence', 'gate', 'tiny'}
  if unknown or len(rules) > 1:
    raise ValueError(f'unknown variant {arg!r}; use one of confidence, gate, and/or tiny')
  c = student_baseline.get_config('tiny' if 'tiny' in variants else None)
  c.loss.terms = {'ce': {'weight': 0.1}}
  c.scheme = multi_teacher_scheme(TEACHERS, combine=rules.pop() if rules else 'average',
                                  temperature=4.0, weight=0.9, gate_hidden=0)
  return c
