"""MNIST-1D snapshot self-distillation: the MLP trained over 4 cosine learning-rate cycles;
the weights at the end of each cycle are kept (the last 2), and from the second cycle on
the student is distilled from the ensemble of the kept snapshots (kdjax.schemes.self_distill).

    kdjax train --config configs/mnist1d/snapshot.py --workdir workdirs/snapshot
    kdjax train --config configs/mnist1d/snapshot.py:tiny --workdir /tmp/snap   # seconds

Same data, optimizer, rate and step count as configs/mnist1d/student_baseline.py (its one
cosine decay becomes 4 cycles of 750 steps). The summary reports the student and the
snapshot ensemble (ensemble_accuracy: the mean softmax of the last 2 snapshots, the
final weights among them). T = 3, weight 1.

References: Huang et al., Snapshot Ensembles, ICLR 2017, arXiv:1704.00109; Yang et al.,
Snapshot Distillation, CVPR 2019, arXiv:1812.00123.
"""

from kdjax.config import sibling
from kdjax.schemes import self_scheme

student_baseline = sibling(__file__, 'student_baseline')


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = student_baseline.get_config('tiny' if arg == 'tiny' else None)
  c.loss.terms = {'ce': {'weight': 1.0}}
  c.scheme = self_scheme('snapshot', num_cycles=4, ensemble_size=2, temperature=3.0,
                         weight=1.0)
  return c
