"""MNIST-1D born-again networks (BAN): generations of the MLP student, generation 0 from
labels, generation g+1 from generation g's softmax output only, and the born-again
ensemble of the generations (kdjax.schemes.stages).

    kdjax distill --config configs/mnist1d/born_again.py --workdir workdirs/born_again
    kdjax distill --config configs/mnist1d/born_again.py:tiny --workdir /tmp/ban   # seconds
    kdjax distill --config configs/mnist1d/born_again.py --workdir workdirs/born_again \
        --config.scheme.num_generations=5

Every generation is configs/mnist1d/student_baseline.py (generation 0 is that run, with
seed config.seed); generation g is seeded config.seed + g. The summary reports each
generation's accuracy, the ensemble of the born-again generations 1.. (ban_ensemble_*)
and of all of them (ensemble_all_*); WORKDIR/predictions.npz keeps the logits.

Variants: '' and 'tiny' (seconds: 60 steps a generation).

Reference: Furlanello et al., Born Again Neural Networks, ICML 2018, arXiv:1805.04770.
"""

from kdjax.schemes import stages_config

TINY = {'num_steps': 60, 'log_every': 20, 'eval_every': 60, 'checkpoint_every': 20,
        'steps_per_call': 10}


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  v = ':tiny' if arg == 'tiny' else ''
  return stages_config(
      method='born_again',
      generation=f'mnist1d/student_baseline.py{v}',
      num_generations=3,
      born_again_loss={'kd': {'weight': 1.0, 'temperature': 1.0}},
      teacher_stage='gen0',
      overrides=TINY if v else {})
