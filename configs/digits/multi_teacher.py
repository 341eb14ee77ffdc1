"""UCI digits multi-teacher distillation: the digits MLP from two frozen teachers, the
2-D CNN on the whole train split and an MLP on its first half (configs/mnist1d/
multi_teacher.py's scheme on the digits student; kdjax.schemes.multi_teacher).

    kdjax train --config configs/digits/teacher.py --workdir workdirs/digits_teacher
    kdjax train --config configs/digits/teacher.py --workdir workdirs/digits_teacher_mlp_half \
        --config.model.name=mlp --config.data.train_split='train[:50%]'
    kdjax distill --config configs/digits/multi_teacher.py --workdir workdirs/digits_mt

Variants as the MNIST-1D file's: '', 'confidence', 'gate', and 'tiny' with any of them.
"""

from kdjax.config import sibling

twin = sibling(__file__, '_twin')

TEACHERS = [{'workdir': 'workdirs/digits_teacher', 'label_map': None},
            {'workdir': 'workdirs/digits_teacher_mlp_half', 'label_map': None}]


def get_config(arg=None):
  c = twin.on_digits('multi_teacher', arg)
  c.scheme.teachers = TEACHERS
  return c
