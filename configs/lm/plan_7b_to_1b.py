"""A Llama-2-7B-shaped teacher distilled into a 1.1B Llama student: a run to plan, not to
run on this machine (no 7B weights here).

    kdjax plan --config configs/lm/plan_7b_to_1b.py --topology v5e:16x16
    kdjax plan --config configs/lm/plan_7b_to_1b.py:nofit --topology v5e:16x16   # exit 2
    kdjax plan --config configs/lm/plan_7b_to_1b.py --devices 8 --gpu h100

Teacher: hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32000 (Llama 2 7B's
shape), bfloat16 weights and computation, frozen (``config.plan.teacher``; a real run
names it with ``config.teacher.hf_path``). Student: TinyLlama-1.1B's shape (hidden 2048,
22 layers, 32 query and 4 key/value heads, MLP 5632, untied head: 1.10B parameters),
float32 master weights, bfloat16 computation, each block rematerialized
(``config.model.remat='full'``). Rows of 2048 tokens, a global batch of 512 rows
(1M tokens per step), token-level KD (forward KL, Hinton; ``chunked_kd``, 512 tokens of
each row at a time) plus CE, AdamW. Per chip the logits are 2 rows x 2048 tokens x 32000.

Mesh ``data x fsdp`` (16 x 16 on a v5e pod): the batch splits over both axes, the
student's and the teacher's weights over ``fsdp`` by
:data:`kdjax.models.transformer.PARTITION_RULES`, the optimizer state with them; the
decoders keep their residual stream split over the batch axes (the step is traced
under the mesh), so FSDP gathers weights, not activations.

Variants (comma-separated): '' (the plan above), 'nofit' (no FSDP: every weight and the
optimizer state replicated on every chip; refused on a v5e pod), 'tiny' (the same run
with a 2-layer teacher and a 1-layer student on 32-token rows of a 300-token vocabulary,
a batch of 8, KD chunks of 8 tokens, ``fsdp`` 2: tests, ``--topology v5e:2x2`` or
``--devices 2``).
"""

import ml_collections

from kdjax.config import sibling
from kdjax.models.transformer import PARTITION_RULES

teacher = sibling(__file__, 'teacher')

TEACHER_7B = dict(hidden_size=4096, num_layers=32, num_heads=32, num_kv_heads=32,
                  intermediate_size=11008, tie_embeddings=False, max_positions=4096)
STUDENT_1B = dict(hidden_size=2048, num_layers=22, num_heads=32, num_kv_heads=4,
                  intermediate_size=5632, tie_embeddings=False)
SEQ_LEN, VOCAB = 2048, 32000
TINY_TEACHER = dict(teacher.TINY_TEACHER, tie_embeddings=False)
TINY_STUDENT = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    intermediate_size=32, tie_embeddings=False)
VARIANTS = ('nofit', 'tiny')


def state_rules() -> list:
  """The model's rules for any tree holding its parameters: a train state
  (``params/student/layers/0/...``, ``opt_state/.../mu/student/...``) or a teacher's
  ``(params, state)`` (``0/layers/0/...``): each regex may follow any path prefix."""
  return [(regex if regex == '.*' else f'(.*/)?{regex}', rule)
          for regex, rule in PARTITION_RULES]


def get_config(arg=None):
  variants = set(filter(None, (arg or '').split(',')))
  if variants - set(VARIANTS):
    raise ValueError(f'unknown variant {sorted(variants - set(VARIANTS))}; use '
                     f'{" and/or ".join(VARIANTS)}')
  tiny = 'tiny' in variants
  c = teacher.lm_config(TINY_STUDENT if tiny else STUDENT_1B)
  c.model.dtype = 'bfloat16'              # computation; parameters stay float32
  c.model.remat = 'full'                  # each block recomputed in the backward pass
  c.batch_size = 512
  c.num_steps = 10_000
  c.optimizer.learning_rate = 3e-4
  c.optimizer.warmup_steps = 1000
  # The KD term in chunks of 512 tokens of each row: per chip 2 rows x 512 tokens of
  # float32 vocabulary intermediates at a time instead of 2 x 2048 (the batch axis stays
  # split over data x fsdp; see kdjax.losses.chunked).
  c.loss.terms = {'chunked_kd': {'weight': 0.5, 'temperature': 1.0,
                                 'chunk_size': 8 if tiny else 512},
                  'ce': {'weight': 0.5}}
  c.mesh = [('data', -1), ('fsdp', 2 if tiny else 16)]
  c.partition_rules = state_rules()
  c.teacher.partition_rules = state_rules()
  c.plan = ml_collections.ConfigDict({
      'seq_len': 32 if tiny else SEQ_LEN, 'vocab_size': 300 if tiny else VOCAB,
      'teacher': {'name': 'llama', 'kwargs': dict(TINY_TEACHER if tiny else TEACHER_7B),
                  'dtype': 'bfloat16'}})
  if tiny:
    c.batch_size = 8
  if 'nofit' in variants:
    c.mesh = [('data', -1)]
    c.partition_rules = [('.*', None)]
    c.teacher.partition_rules = [('.*', None)]
  return c
