"""all-MiniLM-L6-v2 distilled into a 3-layer BERT: the student's sentence vectors against the
teacher's on held-out lines of Shakespeare, with distillation and without.

One run (``configs/lm/encoder_kd.py``, the real all-MiniLM-L6-v2 as the teacher):

  1. the teacher's sentence vectors of the training and held-out lines, once
     (``kdjax.distill.encoder_cache.build_embedding_cache``; reused from ``--workdir``);
  2. students without distillation (evaluated as initialised, no training): random
     init, the teacher's embeddings with random layers, and DistilBERT's init (the
     teacher's embeddings and layers ``--teacher-layers``);
  3. the same students distilled (``sentence_cosine`` on the cached vectors, the
     config's steps): from random init and from the teacher's layers; with
     ``--relations`` also from the teacher's layers with MiniLMv2's relations added (the
     teacher live in every step: about twice the time).

Figures on the held-out lines (``kdjax.distill.sentence.embedding_metrics``):
``mean_cosine`` (student vector against the teacher's vector of the same line),
``nn_top1`` (the student's nearest other line is the teacher's nearest), ``nn_top5``
(the teacher's nearest is among the student's 5 nearest), ``nn_overlap5`` (shared
lines among the 5 nearest, divided by 5). Written to ``--json``: ``students`` (one
entry each: the figures, ``distilled``, ``init``, ``steps``, ``seconds``), the cache
build's seconds, the sizes, the machine; the printed table ends with the distilled
students' ``nn_top1`` over the same student's without distillation. A bar chart goes
next to the JSON (``--plot`` moves it).

    python benchmarks/encoder_kd.py --json /tmp/encoder_kd.json     # minutes on 2 CPUs
    python benchmarks/encoder_kd.py --json /tmp/encoder_kd_tiny.json --variant tiny
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import tempfile
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench_common import machine_info  # noqa: E402  (benchmarks/bench_common.py)
from bench_common import write_json  # noqa: E402

CONFIG = os.path.join(ROOT, 'configs', 'lm', 'encoder_kd.py')
FIGURES = ('mean_cosine', 'nn_top1', 'nn_top5', 'nn_overlap5')


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--json', help='write every figure to this JSON file (the plot goes next to it)')
  p.add_argument('--plot', default='', help='the PNG chart (default: the --json path, .png)')
  p.add_argument('--variant', default='', choices=('', 'tiny'),
                 help="config variant ('tiny': 256 lines of two plays, a 2 x 32 student)")
  p.add_argument('--workdir', default='', help='where the cache and runs go (default: a temp '
                 'folder; an existing cache there is reused)')
  p.add_argument('--steps', type=int, default=0, help="student steps (default: the config's)")
  p.add_argument('--teacher-layers', default='', help="DistilBERT init's teacher layers, e.g. "
                 "0,2,4 (default: the config's)")
  p.add_argument('--relations', action='store_true',
                 help='also distill with MiniLMv2 relations (live teacher)')
  return p.parse_args(argv)


def _config(args, variant: str, workdir: str, **encoder):
  from kdjax.config import load_config
  c = load_config(f'{CONFIG}:{variant}' if variant else CONFIG)
  c.progress = False
  c.encoder.cache = os.path.join(workdir, 'cache')
  if args.steps:
    c.num_steps = args.steps
    c.eval_every = c.checkpoint_every = args.steps
  if args.teacher_layers:
    c.encoder.teacher_layers = [int(i) for i in args.teacher_layers.split(',')]
  for key, value in encoder.items():
    c.encoder[key] = value
  return c


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax
  from kdjax.distill import encoder
  from kdjax.distill import encoder_cache
  from kdjax.models import count_params
  from kdjax.models import from_config

  workdir = args.workdir or tempfile.mkdtemp(prefix='encoder_kd_')
  base = _config(args, args.variant, workdir)
  out = {'date': datetime.datetime.now().isoformat(timespec='seconds'),
         'command': 'python benchmarks/encoder_kd.py ' + ' '.join(sys.argv[1:] if argv is None
                                                                  else argv),
         'machine': machine_info(), 'jax': jax.__version__, 'variant': args.variant,
         'data': base.data.name, 'train_split': base.data.train_split,
         'eval_split': base.data.eval_split, 'student': dict(base.model.kwargs),
         'steps': int(base.num_steps), 'batch_size': int(base.batch_size),
         'teacher_layers': list(base.encoder.teacher_layers)}
  teacher = encoder_cache.load_hf_teacher(encoder_cache.teacher_path(base))
  out['teacher_path'] = str(teacher.config.hf_path)
  out['teacher_params'] = count_params(teacher.variables[0])
  _, _, (abstract, _) = from_config(base.model, num_classes=teacher.num_classes,
                                    input_shape=(int(base.model.kwargs['max_positions']),))
  out['student_params'] = count_params(abstract)

  t0 = time.time()
  manifests = encoder_cache.build_embedding_cache(base, base.encoder.cache, teacher=teacher)
  out['cache'] = {'seconds': time.time() - t0,
                  'lines': {s: m['dataset']['num_examples'] for s, m in manifests.items()}}
  print(f"teacher vectors: {out['cache']['lines']} lines in {out['cache']['seconds']:.0f}s",
        flush=True)

  # The teacher's embeddings and layers fit only a student of the teacher's width (the
  # tiny variant's is narrower: it is distilled from random init, through a projection).
  copies = int(base.model.kwargs['hidden_size']) == encoder_cache.teacher_width(teacher)
  inits = ('random', 'layers') if copies else ('random',)
  students = {}
  if copies:
    t0 = time.time()
    students['embeddings, no KD'] = dict(
        encoder.evaluate_initial(_config(args, args.variant, workdir, init='embeddings')),
        distilled=False, init='embeddings', steps=0, seconds=time.time() - t0)
  runs = [(init, {'init': init}) for init in inits]
  if args.relations:
    runs.append((f'{inits[-1]} + relations', {'init': inits[-1]}))
  for name, fields in runs:
    variant = ('tiny_relations' if args.variant else 'relations') if 'relations' in name \
        else args.variant
    config = _config(args, variant, workdir, **fields)
    t0 = time.time()
    summary = encoder.distill_encoder(config, os.path.join(workdir, name.replace(' ', '_')))
    seconds = time.time() - t0
    if 'relations' not in name:
      students[f'{name}, no KD'] = dict(summary['initial'], distilled=False,
                                        init=fields['init'], steps=0, seconds=None)
    students[f'{name}, KD'] = dict({k: summary[k] for k in FIGURES}, distilled=True,
                                   init=fields['init'], steps=summary['step'], seconds=seconds,
                                   examples_per_sec=summary['examples_per_sec'],
                                   teacher=summary['teacher'])
  out['students'] = students
  out['nn_top1_kd_over_no_kd'] = {
      init: students[f'{init}, KD']['nn_top1'] / max(students[f'{init}, no KD']['nn_top1'], 1e-9)
      for init in inits}

  width = max(len(n) for n in students)
  print(f"{'student':<{width}}  " + '  '.join(f'{f:>11}' for f in FIGURES) + '  seconds')
  for name, row in students.items():
    secs = f"{row['seconds']:.0f}" if row['seconds'] is not None else '-'
    print(f'{name:<{width}}  ' + '  '.join(f'{row[f]:>11.4f}' for f in FIGURES) + f'  {secs}')
  for init, ratio in out['nn_top1_kd_over_no_kd'].items():
    print(f'nn_top1 with KD / without, {init} init: {ratio:.2f}x')
  write_json(args.json, out)
  plot = args.plot or (os.path.splitext(args.json)[0] + '.png' if args.json else '')
  if plot:
    _plot(students, plot, title=f"{out['data']}: {out['eval_split']} "
          f"({out['cache']['lines'][base.data.eval_split]} lines)")
  return out


def _plot(students: dict, path: str, *, title: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import numpy as np
  names = list(students)
  x = np.arange(len(FIGURES))
  width = 0.8 / len(names)
  fig, ax = plt.subplots(figsize=(9, 4))
  for i, name in enumerate(names):
    ax.bar(x + i * width, [students[name][f] for f in FIGURES], width, label=name,
           hatch='' if students[name]['distilled'] else '//')
  ax.set_xticks(x + 0.4 - width / 2, FIGURES)
  ax.set_ylim(0, 1)
  ax.set_ylabel('held-out lines')
  ax.set_title(title, fontsize=9)
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


if __name__ == '__main__':
  main()
