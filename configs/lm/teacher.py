"""A Llama-style teacher language model on Shakespeare (byte-level BPE, held-out plays).

    kdjax train --config configs/lm/teacher.py --workdir workdirs/lm_teacher
    kdjax train --config configs/lm/teacher.py:tiny --workdir /tmp/t     # seconds

The data set is ``shakespeare_lm``: whole plays held out for evaluation, packed rows of
``seq_len`` tokens with segment ids, so no token attends across a speech boundary.
Evaluation reports the per-token cross-entropy on the held-out plays (``exp`` of it is
the perplexity). Variants: '' (this CPU's demo size), 'tiny' (tests).
"""

from kdjax.engine.config import base_config

# Llama-style (RoPE, RMSNorm, SwiGLU, grouped-query attention): DecoderConfig fields.
TEACHER = dict(hidden_size=256, num_layers=4, num_heads=8, num_kv_heads=4,
               intermediate_size=688, tie_embeddings=True)
TINY_TEACHER = dict(hidden_size=32, num_layers=2, num_heads=4, num_kv_heads=2,
                    intermediate_size=64, tie_embeddings=True)


def lm_config(data: str, model: dict, *, tiny: bool):
  """The fields every language-model config here shares."""
  c = base_config()
  c.data.name = data
  c.data.eval_split = 'test'
  c.data.eval_batch_size = 64
  c.model.name = 'llama'
  c.model.kwargs = dict(model)
  c.batch_size = 16
  c.num_steps = 1500
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
  if tiny:
    c.data.name = 'shakespeare_lm/tiny'
    c.batch_size = 8
    c.num_steps = 40
    c.eval_every = c.checkpoint_every = 20
    c.log_every = c.steps_per_call = 10
    c.optimizer.warmup_steps = 0
    c.data.eval_batch_size = 256
  return c


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  tiny = arg == 'tiny'
  return lm_config('shakespeare_lm/bpe2048_128', TINY_TEACHER if tiny else TEACHER, tiny=tiny)
