"""MNIST-1D Be Your Own Teacher (BYOT): the 1-D CNN with a classifier head after blocks 1
and 2, each trained from the labels, from the deepest classifier's softened output and
toward its features (kdjax.schemes.self_distill).

    kdjax train --config configs/mnist1d/byot.py --workdir workdirs/byot
    kdjax train --config configs/mnist1d/byot.py:tiny --workdir /tmp/byot     # seconds
    kdjax train --config configs/mnist1d/byot.py:mlp --workdir workdirs/byot_mlp

Same data, optimizer and schedule as configs/mnist1d/teacher.py (the CNN from labels),
so the deepest classifier's accuracy compares with that run's. T = 3, alpha = 0.3 and
the feature weight 0.03 are the BYOT authors' code defaults. The summary reports the
deepest classifier (eval_accuracy), every head (head_accuracies) and the heads'
ensemble. Variant 'mlp': the MLP baseline's network (two hidden layers; a head after
the first).

Reference: Zhang et al., Be Your Own Teacher, ICCV 2019, arXiv:1905.08094.
"""

from kdjax.config import sibling
from kdjax.schemes import self_scheme

teacher = sibling(__file__, 'teacher')
student_baseline = sibling(__file__, 'student_baseline')


def get_config(arg=None):
  if arg not in (None, '', 'tiny', 'mlp', 'mlp_tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny, mlp, mlp_tiny or nothing')
  tiny = arg in ('tiny', 'mlp_tiny')
  base = student_baseline if arg in ('mlp', 'mlp_tiny') else teacher
  c = base.get_config('tiny' if tiny else None)
  c.loss.terms = {'ce': {'weight': 1.0}}
  c.scheme = self_scheme('byot', heads=[1] if base is student_baseline else [1, 2],
                         alpha=0.3, temperature=3.0, feature_weight=0.03)
  return c
