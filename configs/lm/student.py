"""The small student language model trained from the data alone (the baseline of the KD runs).

    kdjax train --config configs/lm/student.py --workdir workdirs/lm_student
    kdjax train --config configs/lm/student.py:tiny --workdir /tmp/s     # seconds

Same data and optimizer as the teacher (``configs/lm/teacher.py``), 600 steps (checkpoints
at 300 and 600: the on-policy and sequence-level runs of ``kdjax demo --task lm`` start
from the halfway one); about 7x fewer parameters. The distillation configs
(``token_kd.py``, ...) change only the loss. Variants: '', 'tiny', 'large' (116M).
"""

from kdjax.config import sibling

teacher = sibling(__file__, 'teacher')

STUDENT = dict(hidden_size=48, num_layers=2, num_heads=3, num_kv_heads=1,
               intermediate_size=128, tie_embeddings=True)
STEPS = 600
# 'large': 116M parameters (7x fewer than the large teacher).
LARGE_STUDENT = dict(hidden_size=768, num_layers=12, num_heads=12, num_kv_heads=4,
                     intermediate_size=3072, tie_embeddings=False)
TINY_STUDENT = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    intermediate_size=32, tie_embeddings=True)


def get_config(arg=None):
  size = teacher.size_variant(arg)
  c = teacher.get_config(size)
  c.model.kwargs = dict({'': STUDENT, 'tiny': TINY_STUDENT, 'large': LARGE_STUDENT}[size])
  if size != 'tiny':
    c.num_steps = STEPS
    c.eval_every = c.checkpoint_every = STEPS // 2
  return c
