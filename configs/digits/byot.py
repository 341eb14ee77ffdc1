"""UCI digits Be Your Own Teacher: the 2-D CNN (the digits teacher's network and recipe)
with a classifier head after block 1, trained from the labels, from the deepest
classifier and toward its features (configs/mnist1d/byot.py's scheme; the digits CNN
has two blocks, so one shallow head; kdjax.schemes.self_distill).

    kdjax train --config configs/digits/byot.py --workdir workdirs/digits_byot
    kdjax train --config configs/digits/byot.py:tiny --workdir /tmp/digits_byot   # seconds

The network is the teacher's, not the MLP student's: compare its accuracy with the
teacher's (configs/digits/teacher.py).
"""

from kdjax.config import sibling

twin = sibling(__file__, '_twin')


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = twin.on_digits('byot', arg, base='teacher')
  c.scheme.heads = [1]
  return c
