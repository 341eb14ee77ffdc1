"""DistiLLM: skew KL with adaptive off-policy student outputs from a replay buffer.

    kdjax distill --config configs/lm/distillm.py --workdir workdirs/lm_distillm \
        --config.teacher.workdir=workdirs/lm_teacher
    kdjax distill --config configs/lm/distillm.py:tiny ...       # seconds
    kdjax distill --config configs/lm/distillm.py:srkl ...       # skew reverse KL

DistiLLM (Ko et al., ICML 2024; jongwooko/distillm) on the ``prompts_train`` split: the
loss is the skew KL ``KL(p || a p + (1 - a) q)`` with ``a = 0.1`` (``skew_kl``; ``srkl``:
``skew_reverse_kl``), alone as in its scripts (``kd_ratio`` 1). Student-generated
continuations are used adaptively: with probability ``psi`` a step trains on student
outputs (fresh ones, pushed to a replay buffer of ``capacity`` rows, until the buffer is
full and then with probability ``psi (1 - n / N)``; otherwise a batch replayed from the
buffer), and ``psi`` rises by ``threshold_step`` whenever the validation loss (the
cross-entropy on ``prompts_test`` at each evaluation) is ``loss_eps`` above the last
reference (``kdjax.engine.policy.distillm``). The defaults are the reference scripts':
``init_threshold`` 0, ``loss_eps`` 0.1, ``capacity`` 1000, ``replay_ratio`` 'decreasing',
sampling at temperature 1 with no top-k/top-p cut. Variants (comma-separated): '',
'srkl', 'tiny'.
"""

import ml_collections

from kdjax.config import sibling

gkd = sibling(__file__, 'gkd')

LOSSES = {
    'sfkl': {'skew_kl': {'weight': 1.0, 'alpha': 0.1}},
    'srkl': {'skew_reverse_kl': {'weight': 1.0, 'alpha': 0.1}},
}


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  unknown = variants - {'srkl', 'tiny'}
  if unknown:
    raise ValueError(f'unknown variant {sorted(unknown)}; use srkl and/or tiny')
  tiny = 'tiny' in variants
  c = gkd.prompt_config('tiny' if tiny else '')
  c.loss.terms = dict(LOSSES['srkl' if 'srkl' in variants else 'sfkl'])
  c.on_policy = ml_collections.ConfigDict(dict(
      method='distillm', init_threshold=0.0, threshold_step=0.1, loss_eps=0.1,
      capacity=32 if tiny else 1000, replay_ratio='decreasing',
      **gkd.sampling(16 if tiny else 64)))
  return c
