"""UCI digits teacher-assistant distillation (TAKD): the 2-D CNN teacher -> a smaller
2-D CNN assistant -> the small MLP student, each step KD + CE (kdjax.schemes.stages).

    kdjax distill --config configs/digits/takd.py --workdir workdirs/digits_takd
    kdjax distill --config configs/digits/takd.py:tiny --workdir /tmp/digits_takd   # seconds
    kdjax distill --config configs/digits/takd.py --workdir workdirs/digits_takd \
        --config.scheme.teacher_workdir=workdirs/digits_teacher

Stages: 'teacher' (configs/digits/teacher.py; not trained when scheme.teacher_workdir is
set), 'assistant' (configs/digits/kd.py with a CNN of 8 and 16 channels, a quarter of
the teacher's), 'student' (configs/digits/kd.py as it is).

Reference: Mirzadeh et al., Improved Knowledge Distillation via Teacher Assistant,
AAAI 2020, arXiv:1902.03393.
"""

from kdjax.schemes import stages_config

ASSISTANT = {'name': 'cnn2d', 'kwargs': {'channels': (8, 16)}}


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  v = ':tiny' if arg == 'tiny' else ''
  return stages_config(
      method='chain',
      stages=[
          {'name': 'teacher', 'config': f'digits/teacher.py{v}', 'teacher': None},
          {'name': 'assistant', 'config': f'digits/kd.py{v}', 'teacher': 'teacher',
           'overrides': {'model': ASSISTANT}},
          {'name': 'student', 'config': f'digits/kd.py{v}', 'teacher': 'assistant'},
      ],
      teacher_stage='teacher')
