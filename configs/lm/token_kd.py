"""Token-level logit distillation of the student LM from the teacher LM (plus CE).

    kdjax distill --config configs/lm/token_kd.py --workdir workdirs/lm_kd \
        --config.teacher.workdir=workdirs/lm_teacher
    # any registered logit loss per token, e.g. reverse KL (MiniLLM) or skew KL (DistiLLM):
    kdjax distill --config configs/lm/token_kd.py:reverse_kl ...

Every logit loss takes ``[batch, tokens, vocab]`` logits with the token mask (padding and
each document's last token carry no target). The ``chunked`` variant computes the loss in
chunks of tokens (rematerialized), for large vocabularies. Variants (comma-separated):
'' (forward KL, Hinton), 'reverse_kl', 'skew_kl', 'gjsd', 'chunked', and a size: 'tiny',
'large'.
"""

from kdjax.config import sibling

student = sibling(__file__, 'student')

LOSSES = {
    'kd': {'kd': {'weight': 0.5, 'temperature': 1.0}},
    'reverse_kl': {'reverse_kl': {'weight': 0.5, 'temperature': 1.0}},
    'skew_kl': {'skew_kl': {'weight': 0.5, 'alpha': 0.1}},
    'gjsd': {'generalized_jsd': {'weight': 0.5, 'beta': 0.5}},
    'chunked': {'chunked_kd': {'weight': 0.5, 'temperature': 1.0, 'chunk_size': 256}},
}


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  size = student.teacher.size_variant(arg, others=LOSSES)
  losses = variants & set(LOSSES)
  if len(losses) > 1:
    raise ValueError(f'pick one loss variant, got {sorted(losses)}')
  c = student.get_config(size)
  c.loss.terms = {**LOSSES[losses.pop() if losses else 'kd'], 'ce': {'weight': 0.5}}
  return c
