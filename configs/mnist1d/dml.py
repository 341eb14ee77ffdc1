"""MNIST-1D deep mutual learning: four MLP students (the baseline's) trained together,
each from the labels and from the other three (kdjax.schemes.dml).

    kdjax train --config configs/mnist1d/dml.py --workdir workdirs/dml
    kdjax train --config configs/mnist1d/dml.py:tiny --workdir /tmp/dml     # seconds
    kdjax train --config configs/mnist1d/dml.py:mixed --workdir workdirs/dml_mixed

Variants: '' (4 baseline MLPs, stacked and vmapped), 'mixed' (4 MLPs of different
widths and depths, looped in the step), 'tiny' (seconds), 'mixed,tiny'. Same data,
optimizer and schedule as the student baseline, so its summary compares with
``configs/mnist1d/student_baseline.py``'s.
"""

from kdjax.config import sibling
from kdjax.schemes import dml_scheme

student_baseline = sibling(__file__, 'student_baseline')  # same students, same recipe

MIXED = [{'name': 'mlp', 'kwargs': {'hidden': (100, 100)}},
         {'name': 'mlp', 'kwargs': {'hidden': (256,)}},
         {'name': 'mlp', 'kwargs': {'hidden': (64, 64, 64)}},
         {'name': 'mlp', 'kwargs': {'hidden': (32,)}}]


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  unknown = variants - {'mixed', 'tiny'}
  if unknown:
    raise ValueError(f'unknown variant {sorted(unknown)}; use mixed and/or tiny')
  c = student_baseline.get_config('tiny' if 'tiny' in variants else None)
  c.loss.terms = {'ce': {'weight': 1.0}}
  c.scheme = dml_scheme(num_students=4, temperature=1.0, weight=1.0,
                        students=MIXED if 'mixed' in variants else [])
  return c
