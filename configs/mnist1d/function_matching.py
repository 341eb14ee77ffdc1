"""MNIST-1D function matching ("consistent and patient" teaching; Beyer et al., CVPR
2022, arXiv:2106.05237): teacher and student see the same mixed input, mixup or cutmix
of a batch with itself (kdjax.data.augment; the feed augments once and the teacher
runs on exactly that input), and the student matches the teacher's function with the
KD loss alone (no labels), for a long schedule.

    kdjax distill --config configs/mnist1d/function_matching.py --workdir workdirs/fm \
        --config.teacher.workdir=workdirs/teacher
    kdjax distill --config configs/mnist1d/function_matching.py:cutmix ...

Variants: '' (mixup), 'cutmix' (a spliced segment), 'tiny' with either.
``config.patience_epochs`` is the schedule's length in epochs of the train split
(``num_steps`` is derived from it); the paper's point is that it be long.
"""

from kdjax.config import sibling

student_baseline = sibling(__file__, 'student_baseline')  # same student

TRAIN_EXAMPLES = 4000   # MNIST-1D's train split


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  unknown = variants - {'cutmix', 'tiny'}
  if unknown:
    raise ValueError(f'unknown variant {sorted(unknown)}; use cutmix and/or tiny')
  tiny = 'tiny' in variants
  c = student_baseline.get_config('tiny' if tiny else None)
  c.data.augment = {'kind': 'cutmix' if 'cutmix' in variants else 'mixup', 'alpha': 1.0}
  c.loss.terms = {'kd': {'weight': 1.0, 'temperature': 1.0}}
  c.patience_epochs = 1 if tiny else 320   # 10,000 steps of 128: patient
  c.num_steps = max(c.patience_epochs * TRAIN_EXAMPLES // c.batch_size, 100 if tiny else 0)
  if not tiny:
    c.eval_every = 1000
    c.checkpoint_every = 2000
  return c
