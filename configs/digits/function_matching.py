"""UCI digits function matching: the digits MLP matches the 2-D CNN teacher on the same
mixed input (mixup, or cutmix) with the KD loss alone, for 320 epochs of the train split
(configs/mnist1d/function_matching.py's recipe on the digits student; 7185 steps of 64).

    kdjax distill --config configs/digits/function_matching.py --workdir workdirs/digits_fm \
        --config.teacher.workdir=workdirs/digits_teacher

Variants: '' (mixup), 'cutmix', 'tiny' with either.
"""

from kdjax.config import sibling

twin = sibling(__file__, '_twin')


def get_config(arg=None):
  c = twin.on_digits('function_matching', arg)
  fm = twin.mnist1d('function_matching').get_config(arg)
  c.data.augment = fm.data.augment
  c.num_steps = max(c.patience_epochs * twin.TRAIN_EXAMPLES // c.batch_size,
                    100 if twin.is_tiny(arg) else 0)
  if not twin.is_tiny(arg):
    c.eval_every, c.checkpoint_every = fm.eval_every, fm.checkpoint_every
  return c
