"""TAID for language models: KL to an adaptive interpolation of student and teacher.

    kdjax distill --config configs/lm/taid.py --workdir workdirs/lm_taid \
        --config.teacher.workdir=workdirs/lm_teacher
    kdjax distill --config configs/lm/taid.py:tiny ...           # seconds

TAID (Shing et al., ICLR 2025; SakanaAI/TAID) per token on the packed ``train`` rows:
the target is ``softmax((1 - t) sg(s) + t z)``, its coefficient ``t`` carried in the
train state (``loss_state.taid``: checkpointed and resumed with it) and moved after every
step from ``t_start`` toward 1, faster while the loss falls (``kdjax.losses.taid``). The
defaults are the paper's (``t_start`` 0.4, ``t_end`` 1, ``alpha`` 5e-4, ``beta`` 0.99);
``total_steps`` is the run's ``num_steps``: set both when changing the length. Variants:
'' and 'tiny'.
"""

from kdjax.config import sibling

student = sibling(__file__, 'student')


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = student.get_config(arg)
  c.loss.terms = {'taid': {'weight': 1.0, 'total_steps': c.num_steps, 't_start': 0.4,
                           't_end': 1.0, 'alpha': 5e-4, 'beta': 0.99}}
  return c
