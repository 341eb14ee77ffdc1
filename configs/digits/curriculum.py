"""UCI digits curriculum distillation: the small MLP from the 2-D CNN teacher (KD + CE,
the recipe of configs/digits/kd.py), its examples ordered easy to hard by the teacher's
confidence in the true label and fed as a growing prefix (kdjax.schemes.curriculum).

    kdjax train --config configs/digits/teacher.py --workdir workdirs/digits_teacher
    kdjax distill --config configs/digits/curriculum.py --workdir workdirs/digits_curriculum \
        --config.teacher.workdir=workdirs/digits_teacher

Pacing: root, from the easiest 20% to all of them at half of training.

Variants: '' and 'tiny' (seconds).
"""

from kdjax.config import sibling
from kdjax.schemes import curriculum_scheme

kd = sibling(__file__, 'kd')  # the same student, loss and steps as plain KD


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = kd.get_config('tiny' if arg == 'tiny' else None)
  c.scheme = curriculum_scheme(score='confidence', pacing='root', start_fraction=0.2,
                               full_at=0.5)
  return c
