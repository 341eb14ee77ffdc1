"""MNIST-1D MST-Distill: the MLP student on the raw signal, distilled from a routed
mixture of a cross-modal teacher (the spectrogram CNN of ``cross_modal.py:baseline``) and
a multimodal teacher (a 1-D CNN on the raw signal and its spectrogram together), each
also with a learned input mask (kdjax.schemes.mst_distill).

    # the teachers (each from labels, on its view):
    kdjax train --config configs/mnist1d/cross_modal.py:baseline --workdir workdirs/t_spec
    kdjax train --config configs/mnist1d/mst_distill.py:multimodal_teacher \
        --workdir workdirs/t_mm
    # the student:
    kdjax train --config configs/mnist1d/mst_distill.py --workdir workdirs/mst \
        --config.scheme.teachers="['workdirs/t_mm', 'workdirs/t_spec']"

Variants: '' (the student), 'multimodal_teacher' (the multimodal teacher's own run: a
``cross`` run without a teacher on the view ``identity+spectrogram``), 'tiny' with
either (seconds). The student's data, optimizer and schedule are the student baseline's.
"""

from kdjax.config import sibling
from kdjax.schemes.cross import cross_scheme
from kdjax.schemes.mst_distill import mst_distill_scheme

student_baseline = sibling(__file__, 'student_baseline')  # the student and its recipe
teacher = sibling(__file__, 'teacher')                    # the teachers' recipe


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  unknown = variants - {'multimodal_teacher', 'tiny'}
  if unknown:
    raise ValueError(f'unknown variant {sorted(unknown)}; use multimodal_teacher and/or tiny')
  tiny = 'tiny' if 'tiny' in variants else None
  if 'multimodal_teacher' in variants:
    c = teacher.get_config(tiny)    # the 1-D CNN from labels, on both modalities
    c.scheme = cross_scheme(student_view='identity+spectrogram', teacher_view='identity')
    return c
  c = student_baseline.get_config(tiny)
  c.loss.terms = {'ce': {'weight': 1.0}}
  c.scheme = mst_distill_scheme([], student_view='identity', top_k=1, temperature=4.0,
                                weight=1.0, balance_weight=1.0, mask_weight=1.0,
                                mask_hidden=32, masked_experts=True)
  return c
