"""MNIST-1D teacher-assistant distillation (TAKD): the CNN teacher -> a smaller CNN
assistant -> the MLP student, each step Hinton KD + CE (kdjax.schemes.stages).

    kdjax distill --config configs/mnist1d/takd.py --workdir workdirs/takd
    kdjax distill --config configs/mnist1d/takd.py:tiny --workdir /tmp/takd        # seconds
    # from a teacher trained already (configs/mnist1d/teacher.py):
    kdjax distill --config configs/mnist1d/takd.py --workdir workdirs/takd \
        --config.scheme.teacher_workdir=workdirs/teacher

Stages (each an ordinary run in WORKDIR/<name>/; a rerun skips finished ones and
resumes an interrupted one): 'teacher' (configs/mnist1d/teacher.py, from labels; not
trained when scheme.teacher_workdir is set), 'assistant' (configs/mnist1d/kd.py with a
2-stage CNN of 16 channels: between the 3x32-channel CNN teacher and the MLP), 'student'
(configs/mnist1d/kd.py as it is, so its result compares with that config's).

Variants: '' and 'tiny' (seconds: 60 steps a stage).

Reference: Mirzadeh et al., Improved Knowledge Distillation via Teacher Assistant,
AAAI 2020, arXiv:1902.03393.
"""

from kdjax.schemes import stages_config

ASSISTANT = {'name': 'cnn1d', 'kwargs': {'channels': (16, 16), 'kernel_size': 5, 'strides': 2}}
TINY = {'num_steps': 60, 'log_every': 20, 'eval_every': 60, 'checkpoint_every': 20,
        'steps_per_call': 10}


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  v = ':tiny' if arg == 'tiny' else ''
  return stages_config(
      method='chain',
      stages=[
          {'name': 'teacher', 'config': f'mnist1d/teacher.py{v}', 'teacher': None},
          {'name': 'assistant', 'config': f'mnist1d/kd.py{v}', 'teacher': 'teacher',
           'overrides': {'model': ASSISTANT}},
          {'name': 'student', 'config': f'mnist1d/kd.py{v}', 'teacher': 'assistant'},
      ],
      teacher_stage='teacher',
      overrides=TINY if v else {})
