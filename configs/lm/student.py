"""The small student language model trained from the data alone (the baseline of the KD runs).

    kdjax train --config configs/lm/student.py --workdir workdirs/lm_student
    kdjax train --config configs/lm/student.py:tiny --workdir /tmp/s     # seconds

Same data, optimizer and steps as the teacher (``configs/lm/teacher.py``); about 8x fewer
parameters. The distillation configs (``token_kd.py``, ...) change only the loss.
"""

from kdjax.config import sibling

teacher = sibling(__file__, 'teacher')

STUDENT = dict(hidden_size=96, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=256, tie_embeddings=True)
TINY_STUDENT = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    intermediate_size=32, tie_embeddings=True)


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  tiny = arg == 'tiny'
  c = teacher.get_config(arg)
  c.model.kwargs = dict(TINY_STUDENT if tiny else STUDENT)
  return c
