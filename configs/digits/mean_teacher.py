"""UCI digits mean teacher: the digits MLP distilled from the exponential moving average of
its own weights, with cross-entropy (kdjax.schemes.self_distill; see
configs/mnist1d/mean_teacher.py).

    kdjax train --config configs/digits/mean_teacher.py --workdir workdirs/digits_mt
    kdjax train --config configs/digits/mean_teacher.py:tiny --workdir /tmp/dmt   # seconds

Reference: Tarvainen & Valpola, Mean teachers are better role models, NeurIPS 2017,
arXiv:1703.01780.
"""

from kdjax.config import sibling
from kdjax.schemes import self_scheme

student_baseline = sibling(__file__, 'student_baseline')


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  tiny = arg == 'tiny'
  c = student_baseline.get_config('tiny' if tiny else None)
  c.loss.terms = {'ce': {'weight': 1.0}}
  c.scheme = self_scheme('mean_teacher', decay=0.9 if tiny else 0.99, temperature=1.0,
                         weight=1.0, rampup_steps=10 if tiny else 300)
  return c
