"""UCI digits Decoupled KD: the digits MLP from the 2-D CNN teacher with DKD + CE
(configs/mnist1d/dkd.py's loss on the digits student), the DKD weight ramped over
mdistiller's 20 epochs of this data set (1437 examples in batches of 64: 22 steps).

    kdjax distill --config configs/digits/dkd.py --workdir workdirs/digits_dkd \
        --config.teacher.workdir=workdirs/digits_teacher
"""

from kdjax.config import sibling

twin = sibling(__file__, '_twin')


def get_config(arg=None):
  c = twin.on_digits('dkd', arg)
  if not twin.is_tiny(arg):
    dkd = twin.mnist1d('dkd')
    c.loss.terms.dkd.weight = dkd.dkd_warmup(twin.TRAIN_EXAMPLES // c.batch_size)
  return c
