"""Sequence-level KD (Kim & Rush 2016): the student LM trained on the teacher's continuations.

    kdjax cache build --config configs/lm/seq_kd.py --cache-dir workdirs/lm_seq_cache \
        --config.teacher.workdir=workdirs/lm_teacher
    kdjax distill --config configs/lm/seq_kd.py --workdir workdirs/lm_seq_kd \
        --config.teacher.cache=workdirs/lm_seq_cache

The teacher continues every prompt of ``prompts_train`` once (``kdjax cache build`` in
``generate`` mode: greedy by default; the ``sample`` variant draws with temperature 1
and nucleus 0.95 from ``config.cache.generate.seed``), and the student is trained by
cross-entropy on prompt + teacher continuation (the cache's rows replace the split's own
continuations; ``data.prompt_loss``: the loss covers the prompt's own tokens too, text of
the corpus, besides the teacher's continuation). The loss reads no teacher output: the
teacher's knowledge is in the data (``kdjax train`` runs it as well).

The ``word`` variant is Kim and Rush's Seq-KD + Word-KD (their Section 3 and Table 1):
on the same cached rows, 0.5 cross-entropy + 0.5 word-level KD (``kd``, T = 1) to the
teacher's distribution at every position, the live teacher scoring the cached rows
(``--config.teacher.workdir``, the teacher that generated them; its fingerprint must be
the cache's). Measured on ``kdjax demo --task lm``'s data (seed 0, warm-started from the
data-only student's halfway checkpoint, held-out perplexity; data-only student 115.1):
cross-entropy on the continuation only 136.3, with the prompt's tokens 118.0; see
``kdjax demo --task lm`` for the word variant.

Evaluation is on the held-out plays' packed rows, as for the other LM configs. Variants
(comma-separated): '' (greedy), 'sample', 'word', and a size: 'tiny', 'large'.
"""

from kdjax.cache import cache_config
from kdjax.config import sibling

student = sibling(__file__, 'student')

SAMPLE = dict(temperature=1.0, top_p=0.95)


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  c = student.get_config(student.teacher.size_variant(arg, others=('sample', 'word')))
  c.data.train_split = 'prompts_train'
  c.cache = cache_config(mode='generate', **(SAMPLE if 'sample' in variants else {}))
  c.data.prompt_loss = True
  c.loss.terms = {'ce': {'weight': 1.0}}
  if 'word' in variants:
    c.loss.terms = {'kd': {'weight': 0.5, 'temperature': 1.0}, 'ce': {'weight': 0.5}}
  return c
