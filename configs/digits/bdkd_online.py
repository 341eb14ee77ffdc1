"""UCI digits online BD-KD: the 2-D CNN of ``teacher.py`` and the small MLP of
``student_baseline.py`` trained together from scratch, the student with the balanced
divergence (kdjax.schemes.bdkd_online).

    kdjax train --config configs/digits/bdkd_online.py --workdir workdirs/digits_bdkd
    kdjax train --config configs/digits/bdkd_online.py:tiny --workdir /tmp/digits_bdkd
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
