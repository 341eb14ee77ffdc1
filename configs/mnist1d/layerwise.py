"""MNIST-1D layer-wise distillation: the MLP student of configs/mnist1d/kd.py trained
block by block on the CNN teacher's features (FitNets hints through a linear projector;
the deeper blocks and the classifier frozen), then with that config's KD + CE over the
whole network (kdjax.schemes.layerwise).

    kdjax train --config configs/mnist1d/teacher.py --workdir workdirs/teacher
    kdjax distill --config configs/mnist1d/layerwise.py --workdir workdirs/layerwise \
        --config.teacher.workdir=workdirs/teacher
    # one block at a time, the blocks below kept (progressive blockwise KD):
    #   --config.scheme.train=block

Stages (each an ordinary run in WORKDIR/<name>/, a rerun skips finished ones and resumes
an interrupted one): 'hint1' (the MLP's hidden layer 1 <- the teacher's conv stage 1,
its positions averaged), 'hint2' (hidden layer 2 <- conv stage 2), then 'final'
(configs/mnist1d/kd.py as it is, warm-started from 'hint2').

Variants: '' and 'tiny' (seconds).
"""

from kdjax.config import sibling
from kdjax.schemes import layerwise_scheme

kd = sibling(__file__, 'kd')  # the final stage: plain KD's student, loss and steps


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = kd.get_config('tiny' if arg == 'tiny' else None)
  c.scheme = layerwise_scheme(hints=[{'student': 1, 'teacher': 1},
                                     {'student': 2, 'teacher': 2}],
                              hint_steps=20 if arg == 'tiny' else 500, hint_weight=1.0,
                              regressor='linear', train='prefix')
  return c
