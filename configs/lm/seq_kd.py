"""Sequence-level KD (Kim & Rush 2016): the student LM trained on the teacher's continuations.

    kdjax cache build --config configs/lm/seq_kd.py --cache-dir workdirs/lm_seq_cache \
        --config.teacher.workdir=workdirs/lm_teacher
    kdjax distill --config configs/lm/seq_kd.py --workdir workdirs/lm_seq_kd \
        --config.teacher.cache=workdirs/lm_seq_cache

The teacher continues every prompt of ``prompts_train`` once (``kdjax cache build`` in
``generate`` mode: greedy by default; the ``sample`` variant draws with temperature 1
and nucleus 0.95 from ``config.cache.generate.seed``), and the student is trained by
cross-entropy on prompt + teacher continuation, the loss on the continuation only (the
cache's rows replace the split's own continuations): the loss reads no teacher output,
the teacher's knowledge is in the data (``kdjax train`` runs it as well). Evaluation is on
the held-out plays' packed rows, as for the other LM configs. Variants (comma-separated):
'' (greedy), 'sample', and a size: 'tiny', 'large'.
"""

from kdjax.cache import cache_config
from kdjax.config import sibling

student = sibling(__file__, 'student')

SAMPLE = dict(temperature=1.0, top_p=0.95)


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  c = student.get_config(student.teacher.size_variant(arg, others=('sample',)))
  c.data.train_split = 'prompts_train'
  c.cache = cache_config(mode='generate', **(SAMPLE if 'sample' in variants else {}))
  c.loss.terms = {'ce': {'weight': 1.0}}
  return c
