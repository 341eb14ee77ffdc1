"""The ``kdjax`` command: thin; parses, loads a config, calls the library.

    kdjax train   --config configs/mnist1d/teacher.py:tiny --workdir DIR [--config.key=value ...]
    kdjax distill --config configs/mnist1d/kd.py --workdir DIR --config.teacher.workdir=TEACHER
    kdjax eval    --workdir DIR [--split test]
    kdjax demo    [--workdir DIR] [--seeds 3]
    kdjax losses  list

Mistakes a user can make end in one line on stderr and exit code 2.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from kdjax.errors import UserError


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='kdjax', description='JAX-native knowledge distillation.')
  sub = p.add_subparsers(dest='command', required=True)
  for name, help_ in (('train', 'train a model from labels (teacher or baseline)'),
                      ('distill', 'distill a student from a trained teacher')):
    s = sub.add_parser(name, help=help_,
                       epilog='Any config field can be overridden: --config.num_steps=400')
    s.add_argument('--config', required=True, help='path/to/config.py[:variant]')
    s.add_argument('--workdir', required=True)
  e = sub.add_parser('eval', help="evaluate a workdir's latest checkpoint")
  e.add_argument('--workdir', required=True)
  e.add_argument('--split', default=None, help='split to evaluate (default: the config eval split)')
  d = sub.add_parser('demo', help='the main job: teacher, baseline and distilled students on MNIST-1D')
  d.add_argument('--workdir', default='workdirs/demo')
  d.add_argument('--seeds', type=int, default=3)
  d.add_argument('--variant', default='', help="config variant for every run (e.g. 'tiny')")
  l = sub.add_parser('losses', help='the loss catalog')
  l.add_argument('action', choices=['list'])
  l.add_argument('--json', action='store_true')
  return p


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return _main(argv)
  except UserError as e:
    print(f'kdjax: error: {e}', file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print('kdjax: interrupted', file=sys.stderr)
    return 130


def _main(argv) -> int:
  from kdjax.config import load_config, split_overrides
  rest, overrides = split_overrides(argv)
  args = _parser().parse_args(rest)
  if overrides and args.command not in ('train', 'distill'):
    raise UserError(f'--config.* overrides go with train or distill, not {args.command}')

  if args.command in ('train', 'distill'):
    config = load_config(args.config, overrides)
    from kdjax.distill.loop import train_and_evaluate
    summary = _guard_data(lambda: train_and_evaluate(
        config, args.workdir, require_teacher=args.command == 'distill'))
    print(json.dumps({k: summary[k] for k in ('step', 'eval_accuracy', 'train_loss',
                                               'examples_per_sec')}))
    return 0
  if args.command == 'eval':
    from kdjax.distill.evaluate import evaluate_workdir
    result = _guard_data(lambda: evaluate_workdir(args.workdir, split=args.split))
    print(json.dumps(result))
    return 0
  if args.command == 'demo':
    from kdjax.demo import run_demo
    _guard_data(lambda: run_demo(args.workdir, seeds=args.seeds, variant=args.variant))
    return 0
  if args.command == 'losses':
    from kdjax.losses import catalog
    rows = [dict(name=s.name, family=s.family, batch_level=s.batch_level, reference=s.reference,
                 summary=s.summary) for s in catalog()]
    if args.json:
      print(json.dumps(rows, indent=2))
    else:
      width = max(len(r['name']) for r in rows)
      for r in rows:
        print(f"{r['name']:<{width}}  {r['family']:<12} {r['reference']}")
      print(f'{len(rows)} losses')
    return 0
  raise AssertionError(args.command)


def _guard_data(fn):
  """Turns data-layer errors a user can cause into UserError."""
  from kdjax.data import DataError
  try:
    return fn()
  except DataError as e:
    raise UserError(str(e)) from None


if __name__ == '__main__':
  sys.exit(main())
