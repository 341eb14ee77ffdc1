"""MNIST-1D online ensemble, KDCL-Naive: three MLP branches (the baseline's) trained
together, each from the labels and from the mean of the branches' logits
(kdjax.schemes.online).

    kdjax train --config configs/mnist1d/kdcl.py --workdir workdirs/kdcl
    kdjax train --config configs/mnist1d/kdcl.py:tiny --workdir /tmp/kdcl     # seconds

Same data, optimizer and schedule as the student baseline, so its summary (each
branch, and the ensemble) compares with ``configs/mnist1d/student_baseline.py``'s and
``configs/mnist1d/dml.py``'s. T = 3 as in ONE; KDCL's own temperature is not fixed by
the paper for every data set.
"""

from kdjax.config import sibling
from kdjax.schemes import online_scheme

student_baseline = sibling(__file__, 'student_baseline')  # same branches, same recipe


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = student_baseline.get_config('tiny' if arg == 'tiny' else None)
  c.loss.terms = {'ce': {'weight': 1.0}}
  c.scheme = online_scheme('kdcl', num_branches=3, temperature=3.0, weight=1.0)
  return c
