"""MiniLMv2 self-attention relation distillation of the student LM, with token KD and CE.

    kdjax distill --config configs/lm/minilm.py --workdir workdirs/lm_minilm \
        --config.teacher.workdir=workdirs/lm_teacher

The student's last layer learns the query-query, key-key and value-value relations of the
teacher's layer ``TEACHER_LAYER`` (MiniLMv2 pairs the student's last layer with an
upper-middle teacher layer); both sides' projections are split into ``RELATION_HEADS``
relation heads, so the two may differ in width and head count (here 96 and 4 heads against
256 and 8). Both models return their per-layer projections (``outputs=['qkv']``: the
features ``query{i}``, ``key{i}``, ``value{i}``), in training only. Variants: '', 'tiny'.
"""

from kdjax.config import sibling

token_kd = sibling(__file__, 'token_kd')
student = sibling(__file__, 'student')
teacher = sibling(__file__, 'teacher')

RELATION_HEADS = 4
TEACHER_LAYER = 3      # of the teacher's 4 layers


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  tiny = arg == 'tiny'
  c = token_kd.get_config(arg)
  s_layers = (student.TINY_STUDENT if tiny else student.STUDENT)['num_layers']
  t_layers = (teacher.TINY_TEACHER if tiny else teacher.TEACHER)['num_layers']
  c.model.outputs = ['qkv']
  c.teacher.outputs = ['qkv']
  c.loss.terms = dict(c.loss.terms)
  c.loss.terms['minilm_relations'] = {
      'weight': 1.0, 'student_layer': s_layers,
      'teacher_layer': t_layers if tiny else TEACHER_LAYER,
      'relation_heads': 2 if tiny else RELATION_HEADS}
  return c
