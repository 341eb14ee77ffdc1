"""UCI digits born-again networks (BAN): generations of the small MLP, generation 0 from
labels, generation g+1 from generation g's softmax output only, and their ensemble
(kdjax.schemes.stages).

    kdjax distill --config configs/digits/born_again.py --workdir workdirs/digits_ban
    kdjax distill --config configs/digits/born_again.py:tiny --workdir /tmp/digits_ban  # seconds

Every generation is configs/digits/student_baseline.py, generation g seeded
config.seed + g; the summary reports each generation, ban_ensemble_* (generations 1..)
and ensemble_all_* (every generation).

Reference: Furlanello et al., Born Again Neural Networks, ICML 2018, arXiv:1805.04770.
"""

from kdjax.schemes import stages_config


def get_config(arg=None):
  if arg not in (None, '', 'tiny'):
    raise ValueError(f'unknown variant {arg!r}; use tiny or nothing')
  return stages_config(
      method='born_again',
      generation='digits/student_baseline.py' + (':tiny' if arg == 'tiny' else ''),
      num_generations=3,
      born_again_loss={'kd': {'weight': 1.0, 'temperature': 1.0}},
      teacher_stage='gen0')
