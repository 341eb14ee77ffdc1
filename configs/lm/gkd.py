"""GKD: on-policy distillation of the student LM, the student writing its own continuations.

    kdjax distill --config configs/lm/gkd.py --workdir workdirs/lm_gkd \
        --config.teacher.workdir=workdirs/lm_teacher
    kdjax distill --config configs/lm/gkd.py:tiny ...            # seconds
    # pure on-policy, or supervised KD on the data's continuations, or teacher samples:
    ... --config.on_policy.lmbda=1.0 | 0.0 | --config.on_policy.seq_kd=true

Generalized Knowledge Distillation (Agarwal et al., ICLR 2024) on the ``prompts_train``
split (speech -> next speech): each step, with probability ``lmbda``, the student samples
a continuation of every prompt (``temperature``, ``top_k``, ``top_p``, up to
``max_new_tokens`` tokens, ending at ``<eos>``); the teacher scores prompt + sample and
the loss is the generalized Jensen-Shannon divergence ``generalized_jsd(beta)`` (``<eos>``
included). Otherwise the step trains on the data's own continuation (or, with
``seq_kd``, on the teacher's sample). ``lmbda`` and ``seq_kd`` are TRL's ``GKDTrainer``
fields with its defaults (0.5, false); the sampling temperature is the paper's 1 (TRL's
default is 0.9).

Two choices differ from TRL's defaults, both measured on this data (``kdjax demo --task
lm``, held-out perplexity, seed 0, warm-started as below; data-only student 115.1):
``beta = 0`` (forward KL, the divergence perplexity rewards; the paper finds the best
divergence task-dependent) and ``data.prompt_loss`` (the loss also covers the prompt's
own tokens, teacher-scored like the continuation: the prompt is text of the corpus, and
a continuation-only loss supervises half the tokens). Continuation-only with
``beta = 0.5`` (TRL) gave 117.1, ``beta = 0`` 110.2, ``beta = 0.5`` with the prompt
106.0, ``beta = 0`` with the prompt 98.7. TRL's setting:
``--config.loss.terms.generalized_jsd.beta=0.5 --config.data.prompt_loss=false``.

Add a cross-entropy term with ``--config.loss.terms.ce.weight=0.5`` (its labels are the
sampled tokens on on-policy steps). Evaluation: the student's cross-entropy on the
held-out plays' continuations (``prompts_test``). The paper starts from a supervised
student: ``--config.init.workdir=workdirs/lm_student`` (``kdjax demo --task lm`` starts it
from the data-only student's halfway checkpoint). Variants: '', 'tiny', 'large'.
"""

import ml_collections

from kdjax.config import sibling
from kdjax.data.text import EOS_ID

student = sibling(__file__, 'student')


def sampling(continuation_len: int) -> dict:
  """The sampling fields every on-policy config shares: the student samples a whole
  continuation at temperature 1, with no top-k or top-p cut, up to ``<eos>``."""
  return dict(max_new_tokens=continuation_len, temperature=1.0, top_k=0, top_p=1.0,
              stop_tokens=[EOS_ID])


def prompt_config(size: str = '') -> ml_collections.ConfigDict:
  """The student's config (size variant ``size``) on the prompt -> continuation splits
  (``P = C = L / 2``)."""
  tiny = size == 'tiny'
  c = student.get_config(size)
  c.data.train_split = 'prompts_train'
  c.data.eval_split = 'prompts_test'
  if tiny:
    c.num_steps = 20
    c.eval_every = c.checkpoint_every = 10
    c.log_every = c.steps_per_call = 5
  return c


def get_config(arg=None):
  size = student.teacher.size_variant(arg)
  tiny = size == 'tiny'
  c = prompt_config(size)
  c.loss.terms = {'generalized_jsd': {'weight': 1.0, 'beta': 0.0}}
  c.data.prompt_loss = True
  c.on_policy = ml_collections.ConfigDict(dict(
      method='gkd', lmbda=0.5, seq_kd=False, **sampling(16 if tiny else 64)))
  return c
