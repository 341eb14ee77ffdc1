"""MNIST-1D Tf-KD with the virtual teacher (Tf-KD_reg): the MLP student trained with
(1 - alpha) CE + alpha * tf_kd, the ``tf_kd`` loss at its reference defaults (the
authors' code: correct_prob 0.99, T = 20, multiplier 100; reg_alpha 0.1). One run, no
teacher network.

    kdjax train --config configs/mnist1d/tf_kd_reg.py --workdir workdirs/tf_kd_reg
    kdjax train --config configs/mnist1d/tf_kd_reg.py:tiny --workdir /tmp/tfreg   # seconds

Same data, optimizer and schedule as configs/mnist1d/student_baseline.py, so the two
summaries compare directly.

Reference: Yuan et al., Revisiting Knowledge Distillation via Label Smoothing
Regularization, CVPR 2020, arXiv:1909.11723 (kdjax.losses.tf_kd).
"""

from kdjax.config import sibling

student_baseline = sibling(__file__, 'student_baseline')
REG_ALPHA = 0.1


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = student_baseline.get_config('tiny' if arg == 'tiny' else None)
  c.loss.terms = {'ce': {'weight': 1.0 - REG_ALPHA}, 'tf_kd': {'weight': REG_ALPHA}}
  return c
