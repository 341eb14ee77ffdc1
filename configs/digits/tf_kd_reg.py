"""UCI digits Tf-KD_reg: the digits MLP with CE and the virtual-teacher ``tf_kd`` term
(configs/mnist1d/tf_kd_reg.py's loss on the digits student; no teacher network).

    kdjax train --config configs/digits/tf_kd_reg.py --workdir workdirs/digits_tf_kd_reg
    kdjax train --config configs/digits/tf_kd_reg.py:tiny --workdir /tmp/digits_tfreg  # seconds
"""

from kdjax.config import sibling

twin = sibling(__file__, '_twin')


def get_config(arg=None):
  return twin.on_digits('tf_kd_reg', arg)
