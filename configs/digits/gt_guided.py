"""UCI digits ground-truth-guided self-distillation: configs/mnist1d/gt_guided.py's
generations (alpha CE + (1 - alpha) KL to the previous generation) of the digits MLP.

    kdjax distill --config configs/digits/gt_guided.py --workdir workdirs/digits_gtg
    kdjax distill --config configs/digits/gt_guided.py:tiny --workdir /tmp/digits_gtg  # seconds

Reference: Borup, Andersen. Even your Teacher Needs Guidance. NeurIPS 2021.
arXiv:2102.13088.
"""

from kdjax.config import sibling

twin = sibling(__file__, '_twin')


def get_config(arg=None):
  return twin.stages_on_digits('gt_guided', arg)
