"""A Llama-style teacher language model on Shakespeare (byte-level BPE, held-out plays).

    kdjax train --config configs/lm/teacher.py --workdir workdirs/lm_teacher
    kdjax train --config configs/lm/teacher.py:tiny --workdir /tmp/t     # seconds

The data set is ``shakespeare_lm``: whole plays held out for evaluation, packed rows of
``seq_len`` tokens with segment ids, so no token attends across a speech boundary.
Evaluation reports the per-token cross-entropy on the held-out plays (``exp`` of it is
the perplexity). Variants: '' (this CPU's demo size), 'tiny' (tests), 'large' (a GPU or
TPU; Shakespeare has 1.4M tokens, so at this size the variant shows scale, not quality).
"""

from kdjax.engine.config import base_config

# Llama-style (RoPE, RMSNorm, SwiGLU, grouped-query attention): DecoderConfig fields.
TEACHER = dict(hidden_size=128, num_layers=4, num_heads=4, num_kv_heads=2,
               intermediate_size=384, tie_embeddings=True)
TINY_TEACHER = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, tie_embeddings=True)
# 'large' (a GPU or TPU): 830M parameters, 1024-token rows of a 8192-token BPE.
LARGE_TEACHER = dict(hidden_size=1536, num_layers=24, num_heads=12, num_kv_heads=4,
                     intermediate_size=6144, tie_embeddings=False)
SIZES = ('tiny', 'large')
DATA = {'': 'shakespeare_lm/bpe2048_128', 'tiny': 'shakespeare_lm/tiny',
        'large': 'shakespeare_lm/bpe8192_1024'}


def size_variant(arg, others=()) -> str:
  """The size among comma-separated variants ``arg`` ('' | 'tiny' | 'large'); any other
  variant than ``others`` is refused.

  >>> size_variant('sample,large', others=('sample',))
  'large'
  """
  variants = set(filter(None, (arg or '').split(',')))
  unknown = variants - set(SIZES) - set(others)
  if unknown:
    raise ValueError(f'unknown variant {sorted(unknown)}; use {", ".join(sorted(others))}'
                     f'{" and/or " if others else ""}one of {", ".join(SIZES)}')
  sizes = variants & set(SIZES)
  if len(sizes) > 1:
    raise ValueError(f'pick one size variant, got {sorted(sizes)}')
  return sizes.pop() if sizes else ''


def lm_config(model: dict, *, size: str = ''):
  """The fields every language-model config here shares, for the size variant ``size``."""
  c = base_config()
  c.data.name = DATA[size]
  c.data.eval_split = 'test'
  c.data.eval_batch_size = 64
  c.model.name = 'llama'
  c.model.kwargs = dict(model)
  c.batch_size = 16
  c.num_steps = 1000
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 3e-3
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 100
  c.optimizer.grad_clip_norm = 1.0
  c.eval_every = 500
  c.checkpoint_every = 500
  c.log_every = 50
  c.steps_per_call = 25
  c.loss.terms = {'ce': {'weight': 1.0}}
  # No per-step train accuracy (an argmax over [batch, tokens, vocab]); evaluation keeps it.
  c.train_accuracy = False
  if size == 'large':
    c.batch_size = 32
    c.data.eval_batch_size = 16
    c.optimizer.learning_rate = 3e-4
    c.optimizer.warmup_steps = 200
    c.steps_per_call = 10
  if size == 'tiny':
    c.batch_size = 8
    c.num_steps = 40
    c.eval_every = c.checkpoint_every = 20
    c.log_every = c.steps_per_call = 10
    c.optimizer.warmup_steps = 0
    c.data.eval_batch_size = 256
  return c


def get_config(arg=None):
  size = size_variant(arg)
  model = {'': TEACHER, 'tiny': TINY_TEACHER, 'large': LARGE_TEACHER}[size]
  return lm_config(model, size=size)
