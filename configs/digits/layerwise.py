"""UCI digits layer-wise distillation: the small MLP of configs/digits/kd.py (one hidden
layer) first trained on the 2-D CNN teacher's last conv stage (a FitNets hint through a
linear projector, the teacher's positions averaged; the classifier frozen), then with
that config's KD + CE over the whole network (kdjax.schemes.layerwise).

    kdjax train --config configs/digits/teacher.py --workdir workdirs/digits_teacher
    kdjax distill --config configs/digits/layerwise.py --workdir workdirs/digits_layerwise \
        --config.teacher.workdir=workdirs/digits_teacher

Stages: 'hint1', then 'final' (configs/digits/kd.py as it is, warm-started from 'hint1').

Variants: '' and 'tiny' (seconds).
"""

from kdjax.config import sibling
from kdjax.schemes import layerwise_scheme

kd = sibling(__file__, 'kd')  # the final stage: plain KD's student, loss and steps


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = kd.get_config('tiny' if arg == 'tiny' else None)
  c.scheme = layerwise_scheme(hints=[{'student': 1, 'teacher': 2}],
                              hint_steps=20 if arg == 'tiny' else 300, hint_weight=1.0,
                              regressor='linear', train='prefix')
  return c
