"""UCI digits online ensemble, KDCL-Naive: three digits MLP branches trained together,
each from the labels and from the mean of the branches' logits (configs/mnist1d/kdcl.py's
scheme on the digits student; kdjax.schemes.online).

    kdjax train --config configs/digits/kdcl.py --workdir workdirs/digits_kdcl
    kdjax train --config configs/digits/kdcl.py:tiny --workdir /tmp/digits_kdcl   # seconds
"""

from kdjax.config import sibling

twin = sibling(__file__, '_twin')


def get_config(arg=None):
  return twin.on_digits('kdcl', arg)
