"""MNIST-1D mean teacher: the MLP student distilled from the exponential moving average of
its own weights (decay 0.999), with cross-entropy (kdjax.schemes.self_distill).

    kdjax train --config configs/mnist1d/mean_teacher.py --workdir workdirs/mean_teacher
    kdjax train --config configs/mnist1d/mean_teacher.py:tiny --workdir /tmp/mt   # seconds
    kdjax train --config configs/mnist1d/mean_teacher.py --workdir workdirs/mt \\
        --config.scheme.decay=0.99

Same data, optimizer and schedule as configs/mnist1d/student_baseline.py. The KD term's
weight ramps up over the first 500 steps (Tarvainen & Valpola's sigmoid ramp-up), at
T = 1. The EMA weights are part of the checkpoint, so a resumed run ends with the same
teacher. The summary reports the student (eval_accuracy) and the EMA teacher
(teacher_accuracy).

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
  c.scheme = self_scheme('mean_teacher', decay=0.9 if tiny else 0.999, temperature=1.0,
                         weight=1.0, rampup_steps=20 if tiny else 500)
  return c
