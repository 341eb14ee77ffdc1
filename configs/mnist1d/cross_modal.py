"""MNIST-1D cross-modal distillation: the CNN teacher reads the raw 40-sample signal, the
student (a 1-D CNN over time frames) reads its magnitude spectrogram (9 frames x 5
frequencies; kdjax.schemes.cross), distilled by KD on the logits plus a FitNet hint from
the teacher's last conv stage through a linear projector (positions pooled to the
teacher's 5).

    kdjax train --config configs/mnist1d/teacher.py --workdir workdirs/teacher
    kdjax distill --config configs/mnist1d/cross_modal.py --workdir workdirs/cross_modal \
        --config.teacher.workdir=workdirs/teacher
    # the student on its view without a teacher (the baseline of the same view):
    kdjax train --config configs/mnist1d/cross_modal.py:baseline --workdir workdirs/spec_ce

Variants: '' (KD + hint), 'baseline' (CE only, no teacher), 'downsample' (the student
on the 2x downsampled signal instead), 'tiny' with any of them (seconds).
"""

from kdjax.config import sibling
from kdjax.schemes import cross_scheme

student_baseline = sibling(__file__, 'student_baseline')  # same recipe as plain KD


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  unknown = variants - {'baseline', 'downsample', 'tiny'}
  if unknown:
    raise ValueError(f'unknown variant {sorted(unknown)}; use baseline, downsample, tiny')
  c = student_baseline.get_config('tiny' if 'tiny' in variants else None)
  view = 'downsample2' if 'downsample' in variants else 'spectrogram'
  c.model.name = 'cnn1d'
  c.model.kwargs = {'channels': (32, 32), 'kernel_size': 3, 'strides': 1}
  c.scheme = cross_scheme(student_view=view, teacher_view='identity')
  if 'baseline' in variants:
    c.loss.terms = {'ce': {'weight': 1.0}}
  else:
    c.loss.terms = {'kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1},
                    'hint': {'loss': 'fitnet', 'weight': 0.5, 'student': 'stage2',
                             'teacher': 'stage3', 'regressor': 'linear'}}
  return c
