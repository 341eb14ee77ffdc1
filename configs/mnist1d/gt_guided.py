"""MNIST-1D ground-truth-guided iterative self-distillation (Borup & Andersen, "Even your
Teacher Needs Guidance", NeurIPS 2021): generation 0 is the MLP from labels; each next
generation, the same MLP, is fit to the mixed target alpha * y + (1 - alpha) * p_prev
(the previous generation's softmax output), as kdjax.schemes.stages' born_again method
with the loss alpha * CE + (1 - alpha) * KL(p_prev || p).

    kdjax distill --config configs/mnist1d/gt_guided.py --workdir workdirs/gt_guided
    kdjax distill --config configs/mnist1d/gt_guided.py:tiny --workdir /tmp/gtg   # seconds
    kdjax distill --config configs/mnist1d/gt_guided.py --workdir workdirs/gtg_a07 \\
        --config.scheme.born_again_loss="{'ce': {'weight': 0.7}, 'kd': {'weight': 0.3}}"

The cross-entropy to the mixed target equals alpha CE(y, p) + (1 - alpha) CE(p_prev, p),
which is this loss plus (1 - alpha) times the teacher's entropy, a constant: the same
gradient. The paper analyses the weighted squared error in kernel ridge regression and
derives the optimal alpha for each step there; that estimate is not implemented here:
alpha (0.5 by default, the same at every step) is a config choice. Three distillation
steps (four generations); the summary reports every generation and their ensembles.

Reference: Borup, Andersen. Even your Teacher Needs Guidance: Ground-Truth Targets
Dampen Regularization Imposed by Self-Distillation. NeurIPS 2021. arXiv:2102.13088.
"""

from kdjax.schemes import stages_config

ALPHA = 0.5
TINY = {'num_steps': 60, 'log_every': 20, 'eval_every': 60, 'checkpoint_every': 20,
        'steps_per_call': 10}


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  v = ':tiny' if arg == 'tiny' else ''
  return stages_config(
      method='born_again',
      generation=f'mnist1d/student_baseline.py{v}',
      num_generations=4 if not v else 3,
      born_again_loss={'ce': {'weight': ALPHA},
                       'kd': {'weight': 1.0 - ALPHA, 'temperature': 1.0}},
      overrides=TINY if v else {})
