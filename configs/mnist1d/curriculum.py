"""MNIST-1D curriculum distillation: the MLP student from the CNN teacher (KD + CE, the
recipe of configs/mnist1d/kd.py), its examples ordered easy to hard by the teacher's
confidence in the true label and fed as a growing prefix (kdjax.schemes.curriculum).

    kdjax train --config configs/mnist1d/teacher.py --workdir workdirs/teacher
    kdjax distill --config configs/mnist1d/curriculum.py --workdir workdirs/curriculum \
        --config.teacher.workdir=workdirs/teacher
    # the order by the teacher's loss, root pacing:
    #   --config.scheme.score=loss --config.scheme.pacing=root

Pacing: linear from the easiest 20% of the examples at step 0 to all of them at half
of training (Platanios et al. 2019's linear competence; Hacohen & Weinshall 2019's
transfer scoring by a pre-trained network's confidence).

Variants: '' and 'tiny' (seconds).
"""

from kdjax.config import sibling
from kdjax.schemes import curriculum_scheme

kd = sibling(__file__, 'kd')  # the same student, loss and steps as plain KD


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = kd.get_config('tiny' if arg == 'tiny' else None)
  c.scheme = curriculum_scheme(score='confidence', pacing='linear', start_fraction=0.2,
                               full_at=0.5)
  return c
