"""MNIST-1D online ensemble, ONE: three MLP branches (the baseline's) and a gate on the
input that weights their logits; each branch learns from the labels and from the gated
ensemble, the gate from the ensemble's cross-entropy (kdjax.schemes.online).

    kdjax train --config configs/mnist1d/one.py --workdir workdirs/one
    kdjax train --config configs/mnist1d/one.py:tiny --workdir /tmp/one     # seconds

T = 3 and KD weight 1 as in the paper (Lan et al. 2018); the gate has one hidden layer
of 32 units (the paper's gate is one FC layer on shared features, which independent
branches do not have). Same recipe as the student baseline.
"""

from kdjax.config import sibling
from kdjax.schemes import online_scheme

student_baseline = sibling(__file__, 'student_baseline')  # same branches, same recipe


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = student_baseline.get_config('tiny' if arg == 'tiny' else None)
  c.loss.terms = {'ce': {'weight': 1.0}}
  c.scheme = online_scheme('one', num_branches=3, temperature=3.0, weight=1.0, gate_hidden=32)
  return c
