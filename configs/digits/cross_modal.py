"""UCI digits cross-modal distillation: the 2-D CNN teacher reads the 8x8 image, the
digits MLP reads a coarser view, the image with row pairs averaged (4x8; the
``downsample2`` view of kdjax.schemes.cross), distilled by KD + CE on the logits.

    kdjax distill --config configs/digits/cross_modal.py --workdir workdirs/digits_xmodal \
        --config.teacher.workdir=workdirs/digits_teacher
    kdjax train --config configs/digits/cross_modal.py:baseline --workdir workdirs/digits_half

The MNIST-1D file's view (a spectrogram of a 1-D signal) and its FitNet hint (CNN stage
to CNN stage) have no counterpart for an image and an MLP, so this twin keeps its
scheme's idea (a student that sees another view of the input) with the digits KD loss.
Variants: '' (KD + CE), 'baseline' (CE only on the coarse view, no teacher), 'tiny'.
"""

from kdjax.config import sibling
from kdjax.schemes import cross_scheme

kd = sibling(__file__, 'kd')


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  unknown = variants - {'baseline', 'tiny'}
  if unknown:
    raise ValueError(f'unknown variant {sorted(unknown)}; use baseline and/or tiny')
  c = kd.get_config('tiny' if 'tiny' in variants else None)
  c.scheme = cross_scheme(student_view='downsample2', teacher_view='identity')
  if 'baseline' in variants:
    c.loss.terms = {'ce': {'weight': 1.0}}
  return c
