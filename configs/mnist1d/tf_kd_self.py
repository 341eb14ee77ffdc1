"""MNIST-1D Tf-KD self-training (Tf-KD_self): the MLP trained from labels becomes the
teacher of a fresh MLP of the same architecture (kdjax.schemes.stages, method born_again,
two generations), with the Tf-KD authors' self-training loss.

    kdjax distill --config configs/mnist1d/tf_kd_self.py --workdir workdirs/tf_kd_self
    kdjax distill --config configs/mnist1d/tf_kd_self.py:tiny --workdir /tmp/tfself  # seconds

The loss of generation 1 is the authors' ``loss_kd_self``,
(1 - alpha) CE + alpha * T^2 * multiplier * KLDivLoss(mean), with their ResNet-18
CIFAR-100 self-teacher settings alpha = 0.95, T = 6, multiplier = 50. ``nn.KLDivLoss``'s
element-wise mean divides the per-example KL by the class count C, so here (C = 10) the
``kd`` term (T^2 KL) gets the weight alpha * multiplier / C = 4.75 and ``ce`` 0.05.
Generation 0 is configs/mnist1d/student_baseline.py (seed config.seed), generation 1 is
seeded config.seed + 1. The summary has both generations' accuracies and, as every
born-again run, their ensemble.

Reference: Yuan et al., Revisiting Knowledge Distillation via Label Smoothing
Regularization, CVPR 2020, arXiv:1909.11723; code yuanli2333/Teacher-free-Knowledge-
Distillation (my_loss_function.py ``loss_kd_self``; experiments/kd_experiments/
resnet18_distill/resnet18_self_teacher/params.json).
"""

from kdjax.schemes import stages_config

ALPHA, TEMPERATURE, MULTIPLIER, NUM_CLASSES = 0.95, 6.0, 50.0, 10
TINY = {'num_steps': 60, 'log_every': 20, 'eval_every': 60, 'checkpoint_every': 20,
        'steps_per_call': 10}


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  v = ':tiny' if arg == 'tiny' else ''
  return stages_config(
      method='born_again',
      generation=f'mnist1d/student_baseline.py{v}',
      num_generations=2,
      born_again_loss={
          'ce': {'weight': 1.0 - ALPHA},
          'kd': {'weight': ALPHA * MULTIPLIER / NUM_CLASSES, 'temperature': TEMPERATURE}},
      overrides=TINY if v else {})
