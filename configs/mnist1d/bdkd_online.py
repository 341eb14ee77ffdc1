"""MNIST-1D online BD-KD: the CNN teacher of ``teacher.py`` and the MLP student of
``kd.py`` trained together from scratch, the student with the balanced divergence
(kdjax.schemes.bdkd_online).

    kdjax train --config configs/mnist1d/bdkd_online.py --workdir workdirs/bdkd_online
    kdjax train --config configs/mnist1d/bdkd_online.py:tiny --workdir /tmp/bdkd   # seconds

Variants: '' and 'tiny'. The student's data, optimizer and schedule are the student
baseline's (both members use them), so its summary compares with
``configs/mnist1d/student_baseline.py``'s and ``dml.py``'s.
"""

from kdjax.config import sibling
from kdjax.schemes.bdkd_online import bdkd_online_scheme

student_baseline = sibling(__file__, 'student_baseline')  # the student and its recipe
teacher = sibling(__file__, 'teacher')                    # the teacher's architecture


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = student_baseline.get_config(arg or None)
  c.loss.terms = {'ce': {'weight': 1.0}}
  c.scheme = bdkd_online_scheme(teacher=teacher.get_config().model.to_dict(),
                                temperature=1.0, weight=1.0, teacher_weight=1.0,
                                teacher_loss='kl')
  return c
