"""UCI digits cross-task distillation: the 10-digit 2-D CNN teacher teaches the digits MLP
a coarser task, 5 classes of digit pairs (configs/mnist1d/cross_task.py's scheme on the
digits student; kdjax.schemes.cross).

    kdjax distill --config configs/digits/cross_task.py --workdir workdirs/digits_cross_task \
        --config.teacher.workdir=workdirs/digits_teacher
    kdjax train --config configs/digits/cross_task.py:baseline --workdir workdirs/digits_coarse

Variants: '' (KD + CE), 'baseline' (CE only, no teacher), 'tiny' with either. Its
accuracy is over 5 classes: it does not compare with the 10-class runs'.
"""

from kdjax.config import sibling

twin = sibling(__file__, '_twin')


def get_config(arg=None):
  return twin.on_digits('cross_task', arg)
