"""Distillation across tokenizers: Universal Logit Distillation (ULD) from a teacher that
cuts the text into other tokens.

    # a teacher on the same plays with its own tokenizer (BPE of 4096 instead of 2048)
    kdjax train --config configs/lm/teacher.py --workdir workdirs/lm_teacher_bpe4096 \
        --config.data.name=shakespeare_lm/bpe4096_128
    kdjax distill --config configs/lm/uld.py --workdir workdirs/lm_uld \
        --config.teacher.workdir=workdirs/lm_teacher_bpe4096

    # seconds: a character-level teacher for the BPE-300 tiny student
    kdjax train --config configs/lm/teacher.py:tiny --workdir /tmp/tc \
        --config.data.name=shakespeare_lm/tiny_char
    kdjax distill --config configs/lm/uld.py:tiny --workdir /tmp/u --config.teacher.workdir=/tmp/tc

The student (``configs/lm/student.py``) reads ``shakespeare_lm/bpe2048_128``. Its rows are
decoded to text and encoded again with the teacher's tokenizer, host side, once for the
whole split (``kdjax.engine.feed.Retokenizer``); the teacher runs on its own tokens, and the
``uld`` term (``kdjax.losses.uld``) compares the two sorted softmaxes position by position,
the valid positions of each side paired by rank. The loss is the paper's ``CE + λ·ULD``
with the authors' λ = 1.5 (``distil_factor`` in github.com/Nicolas-BZRD/llm-recipes,
``configs/distillation.py``) and temperatures 1.

Why BPE-4096 for the teacher: index alignment pairs the r-th student token with the r-th
teacher token, so it is meaningful only while both cut the text at nearly the same
places. Byte-level BPE trained on the same texts with more merges keeps most of the
smaller tokenizer's tokens and joins a few, so the two sequences stay close in length
and position. A character-level teacher (about 3-4 characters per BPE-2048 token) would
pair the student's tenth token with the teacher's tenth character, a word or two behind.
The tiny variant takes ``tiny_char`` anyway: against BPE-300 (41 merges above the bytes)
characters are nearly the same cut, it builds in a second, and its smaller vocabulary
exercises the zero padding of the sorted distributions.

What to expect: the paper distills into pretrained students, whose most likely tokens
already make sense. Sorting discards which token is likely, so from scratch the ``uld``
term sharpens whatever token a young student ranks first; the ``ce`` term has to fix the
choice. On the tiny variant (40 steps) the ``uld`` term falls (1.49 to 1.09) while the
held-out top-1 accuracy stays far below the CE-only student's (0.001 against 0.07) and
its loss a little above (4.84 against 4.77 nats).

Variants: '' and 'tiny'.
"""

from kdjax.config import sibling

student = sibling(__file__, 'student')

# The authors' weights: cross-entropy 1, ULD 1.5 (llm-recipes, configs/distillation.py).
TERMS = {'ce': {'weight': 1.0},
         'uld': {'weight': 1.5, 'student_temperature': 1.0, 'teacher_temperature': 1.0}}


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  c = student.get_config(arg)
  c.loss.terms = TERMS
  c.teacher.vocab_method = 'uld'
  return c
