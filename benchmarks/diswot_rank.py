"""Does the DisWOT score (at initialization) rank students as plain KD does after training?

Trains an MNIST-1D CNN teacher, scores the candidate family of
:data:`kdjax.schemes.diswot.CANDIDATES` with DisWOT on one batch, trains each candidate
with plain KD (``configs/mnist1d/kd.py``, a short schedule) and prints the Spearman and
Kendall rank correlations between the score and the KD test accuracy, side by side with
those of the parameter count (the naive proxy).

    python benchmarks/diswot_rank.py --workdir /tmp/diswot --teacher-steps 1000 --steps 500

Writes ``results.json`` in the workdir.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
sys.path.insert(0, ROOT)

from scipy import stats  # noqa: E402

from kdjax.config import load_config as _load  # noqa: E402
from kdjax.config import split_overrides  # noqa: E402
from kdjax.distill.train import train_and_evaluate  # noqa: E402
from kdjax.schemes.diswot import CANDIDATES  # noqa: E402
from kdjax.schemes.diswot import candidate_model  # noqa: E402
from kdjax.schemes.diswot import search_student  # noqa: E402


def load_config(path, flags):
  return _load(path, split_overrides(flags)[1])


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--workdir', default='/tmp/diswot_rank')
  p.add_argument('--teacher-steps', type=int, default=1000)
  p.add_argument('--steps', type=int, default=500)
  p.add_argument('--seed', type=int, default=0)
  args = p.parse_args()
  start = time.time()
  teacher = os.path.join(args.workdir, 'teacher')
  if not os.path.exists(os.path.join(teacher, 'summary.json')):
    t = load_config(os.path.join(ROOT, 'configs/mnist1d/teacher.py'),
                    [f'--config.num_steps={args.teacher_steps}', '--config.progress=false',
                     f'--config.seed={args.seed}'])
    print('teacher', train_and_evaluate(t, teacher)['eval_accuracy'], flush=True)
  kd = load_config(os.path.join(ROOT, 'configs/mnist1d/kd.py'),
                   [f'--config.seed={args.seed}', '--config.progress=false'])
  t0 = time.time()
  ranking = {r['candidate']: r for r in search_student(kd, teacher, CANDIDATES)}
  search_seconds = time.time() - t0
  rows = []
  for name in CANDIDATES:
    c = load_config(os.path.join(ROOT, 'configs/mnist1d/kd.py'),
                    [f'--config.seed={args.seed}', '--config.progress=false',
                     f'--config.num_steps={args.steps}', f'--config.eval_every={args.steps}',
                     f'--config.checkpoint_every={args.steps}', f'--config.teacher.workdir={teacher}'])
    model = candidate_model(name)
    c.model.name, c.model.kwargs = model['name'], model['kwargs']
    summary = train_and_evaluate(c, os.path.join(args.workdir, name.replace(':', '_')))
    rows.append({**ranking[name], 'kd_accuracy': summary['eval_accuracy']})
    print(f"{name:<16} score {ranking[name]['score']:+.4f}  KD acc {summary['eval_accuracy']:.3f}",
          flush=True)
  acc = [r['kd_accuracy'] for r in rows]
  out = {'seed': args.seed, 'teacher_steps': args.teacher_steps, 'kd_steps': args.steps,
         'search_seconds': search_seconds, 'total_seconds': time.time() - start, 'rows': rows}
  for key in ('score', 'semantic', 'relational', 'params'):
    proxy = [r[key] for r in rows]
    out[key] = {'spearman': float(stats.spearmanr(proxy, acc)[0]),
                'kendall': float(stats.kendalltau(proxy, acc)[0])}
    print(f"{key:<11} Spearman {out[key]['spearman']:+.3f}  Kendall {out[key]['kendall']:+.3f}")
  with open(os.path.join(args.workdir, 'results.json'), 'w') as f:
    json.dump(out, f, indent=2)


if __name__ == '__main__':
  main()
