"""UCI digits online ensemble, ONE: three digits MLP branches and a gate weighting their
logits (configs/mnist1d/one.py's scheme on the digits student; kdjax.schemes.online).

    kdjax train --config configs/digits/one.py --workdir workdirs/digits_one
    kdjax train --config configs/digits/one.py:tiny --workdir /tmp/digits_one   # seconds
"""

from kdjax.config import sibling

twin = sibling(__file__, '_twin')


def get_config(arg=None):
  return twin.on_digits('one', arg)
