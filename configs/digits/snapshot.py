"""UCI digits snapshot self-distillation: the digits MLP over 4 cosine cycles, distilled
from its last 2 snapshots (configs/mnist1d/snapshot.py's scheme on the digits student;
kdjax.schemes.self_distill).

    kdjax train --config configs/digits/snapshot.py --workdir workdirs/digits_snapshot
    kdjax train --config configs/digits/snapshot.py:tiny --workdir /tmp/digits_snap  # seconds
"""

from kdjax.config import sibling

twin = sibling(__file__, '_twin')


def get_config(arg=None):
  return twin.on_digits('snapshot', arg)
