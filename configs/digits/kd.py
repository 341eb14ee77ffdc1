"""UCI digits distillation: the small MLP from the 2-D CNN teacher (KD + CE).

    kdjax distill --config configs/digits/kd.py --workdir workdirs/digits_kd \
        --config.teacher.workdir=workdirs/digits_teacher
"""

from kdjax.config import sibling

student_baseline = sibling(__file__, 'student_baseline')  # same student, same recipe


def get_config(arg=None):
  c = student_baseline.get_config(arg)
  c.loss.terms = {'kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1}}
  return c
