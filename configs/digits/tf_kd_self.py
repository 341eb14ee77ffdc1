"""UCI digits Tf-KD self-training: the digits MLP from labels teaches a fresh one with the
Tf-KD authors' self-training loss (configs/mnist1d/tf_kd_self.py's two generations on
the digits student; 10 classes, so the same weights).

    kdjax distill --config configs/digits/tf_kd_self.py --workdir workdirs/digits_tfself
    kdjax distill --config configs/digits/tf_kd_self.py:tiny --workdir /tmp/digits_tfself

Reference: Yuan et al., Revisiting Knowledge Distillation via Label Smoothing
Regularization, CVPR 2020, arXiv:1909.11723.
"""

from kdjax.config import sibling

twin = sibling(__file__, '_twin')


def get_config(arg=None):
  return twin.stages_on_digits('tf_kd_self', arg)
