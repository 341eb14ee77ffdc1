"""The ``kdjax`` command: thin; parses, loads a config, calls the library.

    kdjax train   --config configs/mnist1d/teacher.py:tiny --workdir DIR [--config.key=value ...]
    kdjax train   --config configs/mnist1d/dml.py:tiny --workdir DIR   (config.scheme: kdjax.schemes)
    kdjax distill --config configs/mnist1d/kd.py --workdir DIR --config.teacher.workdir=TEACHER
    kdjax eval    --workdir DIR [--split test]
    kdjax demo    [--task mnist1d|lm] [--workdir DIR] [--seeds 3] [--variant tiny] [--config.k=v ...]
    kdjax losses  list
    kdjax cache   build --config configs/mnist1d/kd.py --workdir CACHE [--epochs E --k K --dtype D]
    kdjax cache   build --config configs/lm/cached_kd.py --cache-dir CACHE [--k K --codec int4+ef]
    kdjax cache   build --config configs/lm/seq_kd.py --cache-dir CACHE [--mode generate]
    kdjax cache   inspect [--json] CACHE  |  kdjax cache verify CACHE
    kdjax fed     run --config configs/fed/mnist1d_fedavg.py:tiny --workdir DIR [--config.key=value ...]
    kdjax fed     sweep --config configs/fed/mnist1d_sweep.py:tiny --workdir DIR [--config.key=value ...]
    kdjax plan    --config configs/lm/plan_7b_to_1b.py --topology v5e:16x16 [--mesh data=16,fsdp=16] [--json F]
    kdjax plan    --config configs/lm/plan_7b_to_1b.py --devices 8 [--gpu h100] [--json F]

Mistakes a user can make end in one line on stderr and exit code 2; a run stopped at a
non-finite loss ends in one line and exit code 3. ``kdjax --no-compilation-cache ...``
turns off the persistent compilation cache (``kdjax.parallel.compile_cache``).
"""

from __future__ import annotations

import argparse
import json
import sys

from kdjax.errors import Diverged
from kdjax.errors import UserError


def _parser() -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(prog='kdjax', description='JAX-native knowledge distillation.')
  p.add_argument('--no-compilation-cache', action='store_true',
                 help='do not read or write the persistent JAX compilation cache')
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
  d = sub.add_parser('demo', help='the main job: teacher, baseline and distilled students '
                     '(MNIST-1D classifiers, or with --task lm Shakespeare language models)')
  d.add_argument('--task', default='mnist1d', choices=('mnist1d', 'lm'),
                 help='mnist1d (default): 1-D CNN -> MLP; lm: a teacher LM -> a student LM '
                 'five ways (data, token KD, sequence KD, on-policy GKD, cached KD)')
  d.add_argument('--workdir', default=None,
                 help='default: workdirs/demo (mnist1d) or workdirs/demo_lm (lm)')
  d.add_argument('--seeds', type=int, default=3)
  d.add_argument('--variant', default='', help="config variant for every run (e.g. 'tiny'; "
                 "lm also 'large' for a GPU or TPU); --config.key=value overrides also apply "
                 'to every run')
  l = sub.add_parser('losses', help='the loss catalog')
  l.add_argument('action', choices=['list'])
  l.add_argument('--json', action='store_true')
  _cache_parser(sub)
  _fed_parser(sub)
  _plan_parser(sub)
  _search_parser(sub)
  return p


def _search_parser(sub) -> None:
  s = sub.add_parser('search-student', help="rank candidate students for a teacher without "
                     'training them (DisWOT)')
  s.add_argument('--config', required=True, help='path/to/config.py[:variant]: the data set')
  s.add_argument('--teacher', required=True, help='a trained teacher workdir')
  s.add_argument('--candidates', nargs='+', default=None,
                 help='e.g. mlp:64x64 cnn1d:16x16x16 (default: a family of 12)')
  s.add_argument('--json', default=None, help='also write the ranking to this file')


def _search_main(args, overrides) -> int:
  from kdjax.config import load_config
  from kdjax.schemes.diswot import search_student
  config = load_config(args.config, overrides)
  rows = _guard_data(lambda: search_student(config, args.teacher, args.candidates))
  for r in rows:
    print(f"{r['rank']:>2}  {r['candidate']:<16} score {r['score']:+.4f}  semantic "
          f"{r['semantic']:+.4f}  relational {r['relational']:+.4f}  {r['params']} params")
  if args.json:
    from kdjax import storage
    storage.write_text(args.json, json.dumps(rows, indent=2))
  return 0


def _plan_parser(sub) -> None:
  p = sub.add_parser('plan', help="compile a config's step ahead of time for a TPU slice or N "
                     'GPUs: memory per chip, FLOPs, collectives, a roofline step time',
                     epilog='Any config field can be overridden: --config.batch_size=256')
  p.add_argument('--config', required=True, help='path/to/config.py[:variant]')
  target = p.add_mutually_exclusive_group(required=True)
  target.add_argument('--topology', help='a TPU slice, GENERATION:SHAPE (v5e:16x16, v5p:4x4x8); '
                      'needs libtpu in $KDJAX_LIBTPU_PATH or <venv>/libtpu (pip install '
                      '--target .venv/libtpu "libtpu==0.0.42.*")')
  target.add_argument('--devices', type=int, help='a number of GPUs (compiled for as many CPU '
                      'devices)')
  p.add_argument('--gpu', default='h100', help='the GPU of --devices (h100, h200, a100-80g, '
                 'a100-40g)')
  p.add_argument('--mesh', default=None, help='axes name=size instead of config.mesh, e.g. '
                 'data=16,fsdp=16')
  p.add_argument('--hbm-gib', type=float, default=None, help='plan against this much memory '
                 "per device instead of the chip's")
  p.add_argument('--json', default=None, help='also write the plan to this JSON file')


def _plan_main(args, overrides, argv) -> int:
  from kdjax import plan as plan_lib
  from kdjax.config import load_config
  config = load_config(args.config, overrides)
  if args.devices is not None and not plan_lib.ensure_cpu_devices(args.devices):
    return plan_lib.run_in_child(argv, args.devices)   # jax started with fewer devices
  if args.hbm_gib is not None and args.hbm_gib <= 0:
    raise UserError(f'--hbm-gib {args.hbm_gib}: give a positive size')
  hbm = int(args.hbm_gib * 2**30) if args.hbm_gib else None
  # No progress lines: a refused plan's stderr is its one line (compiling takes minutes
  # for a 7B teacher on a CPU).
  plan = _guard_data(lambda: plan_lib.plan(config, topology=args.topology, devices=args.devices,
                                           gpu=args.gpu, mesh=args.mesh, hbm_bytes=hbm))
  if args.json:
    plan_lib.write_json(plan, args.json)
  if not plan.fits:
    print(f'kdjax: plan does not fit: {plan_lib.verdict(plan)}', file=sys.stderr, flush=True)
  print(plan_lib.format_plan(plan))
  return 0 if plan.fits else 2


def _cache_parser(sub) -> None:
  c = sub.add_parser('cache', help='the teacher-inference cache: build, inspect, verify')
  csub = c.add_subparsers(dest='cache_command', required=True)
  b = csub.add_parser('build', help="run the teacher once over a distill config's training data",
                      epilog='Any config field can be overridden: --config.seed=1')
  b.add_argument('--config', required=True, help='the distill config, path/to/config.py[:variant]')
  b.add_argument('--workdir', '--cache-dir', dest='workdir', required=True,
                 help='the cache directory (an unfinished build resumes)')
  b.add_argument('--mode', choices=('topk', 'generate', 'sampled'), default=None,
                 help='token data: per-token top-k rows (topk), draws from the teacher per '
                 'token (sampled), or teacher continuations of the prompts for sequence-level '
                 'KD (generate); default: config.cache.mode or topk')
  b.add_argument('--epochs', type=int, default=1,
                 help='augmentation epochs to cache (generate: sampled continuations per prompt)')
  b.add_argument('--k', type=int, default=None,
                 help='top-k logits kept (default: config.cache.k, else all classes)')
  b.add_argument('--dtype', default=None,
                 help='classifier data: float32 (default) | bfloat16 | float16 | int8')
  b.add_argument('--codec', default=None, help='token data: a codec such as f32+i32, int4+ef, '
                 'log3+ef (default: config.cache.codec, else f32+i32)')
  b.add_argument('--features', nargs='*', default=[], help='NAME[:POOL[:DTYPE]] teacher features')
  b.add_argument('--chunk-size', type=int, default=None, help='examples (rows, prompts) per chunk')
  i = csub.add_parser('inspect', help='entries, coverage, k, dtypes, sizes, top-k mass, checksum')
  i.add_argument('dir')
  i.add_argument('--json', action='store_true')
  v = csub.add_parser('verify', help='check every chunk against the manifest checksums')
  v.add_argument('dir')


_INSPECT_COMMON = ('entries', 'examples', 'epochs', 'coverage', 'chunks', 'num_classes')
_INSPECT_KEYS = {
    'examples': _INSPECT_COMMON + ('k', 'dtype', 'bytes_per_example', 'bytes_on_disk',
                                   'topk_mass', 'content_checksum'),
    'tokens': _INSPECT_COMMON + ('tokens_per_row', 'stored_tokens', 'k', 'codec',
                                 'bytes_per_token', 'bytes_per_example', 'bytes_on_disk',
                                 'topk_mass', 'content_checksum'),
    'sequences': _INSPECT_COMMON + ('prompt_len', 'continuation_len', 'generate',
                                    'generated_tokens', 'stopped', 'bytes_per_example',
                                    'bytes_on_disk', 'content_checksum'),
    'sampled': _INSPECT_COMMON + ('tokens_per_row', 'stored_tokens', 'k', 'samples',
                                  'proposal_temperature', 'format', 'bytes_per_token',
                                  'unique_per_token', 'bytes_per_example', 'bytes_on_disk',
                                  'content_checksum'),
}


def _cache_main(args, overrides) -> int:
  import kdjax.cache as kcache
  from kdjax import storage
  if args.cache_command == 'build':
    from kdjax.config import load_config
    config = load_config(args.config, overrides)
    manifest = _guard_data(lambda: kcache.build_cache(
        config, args.workdir, mode=args.mode, epochs=args.epochs, k=args.k, dtype=args.dtype,
        codec=args.codec, features=args.features, chunk_size=args.chunk_size))
    print(json.dumps({'cache': storage.abspath(args.workdir), 'chunks': len(manifest['chunks']),
                      'content_checksum': manifest['content_checksum']}))
    return 0
  if overrides:
    raise UserError(f'--config.* overrides go with cache build, not cache {args.cache_command}')
  if args.cache_command == 'inspect':
    info = kcache.inspect_cache(args.dir)
    if args.json:
      print(json.dumps(info, indent=2))
    else:
      for key in _INSPECT_KEYS[info['kind']]:
        print(f'{key:<18} {info[key]}')
    return 0
  problems = kcache.verify_cache(args.dir)
  for line in problems:
    print(f'kdjax: cache verify: {line}', file=sys.stderr)
  if problems:
    return 1
  print(f'ok: every chunk of {args.dir} matches its checksum')
  return 0


def _fed_parser(sub) -> None:
  f = sub.add_parser('fed', help='vmap-simulated federated learning')
  fsub = f.add_subparsers(dest='fed_command', required=True)
  r = fsub.add_parser('run', help='run a federated simulation from a config',
                      epilog='Any config field can be overridden: --config.partition.alpha=0.1')
  r.add_argument('--config', required=True, help='path/to/config.py[:variant]')
  r.add_argument('--workdir', required=True)
  r.add_argument('--no-progress', action='store_true', help='no progress bar')
  w = fsub.add_parser('sweep', help='run a grid of simulations (alpha x algorithm x seed)',
                      epilog='Any config field can be overridden: --config.grid.seeds=[0,1]')
  w.add_argument('--config', required=True, help='path/to/sweep_config.py[:variant]')
  w.add_argument('--workdir', required=True, help='sweep directory (a rerun skips finished cells)')
  w.add_argument('--no-progress', action='store_true', help='no progress bar')


def _fed_main(args, overrides) -> int:
  from kdjax.config import load_config
  from kdjax.federated.run import run_simulation
  config = load_config(args.config, overrides)
  if args.fed_command == 'sweep':
    from kdjax import storage
    from kdjax.federated.sweep import run_sweep
    rows = _guard_data(lambda: run_sweep(config, args.workdir, progress=not args.no_progress))
    print(json.dumps({'cells': len(rows), 'workdir': storage.abspath(args.workdir)}))
    return 0
  summary = _guard_data(lambda: run_simulation(config, args.workdir,
                                               progress=not args.no_progress))
  from kdjax.workdir import dumps
  print(dumps({k: summary[k] for k in (
      'round', 'global_accuracy', 'personalized_accuracy_mean', 'rounds_per_sec')}))
  return 0


def main(argv=None) -> int:
  argv = list(sys.argv[1:] if argv is None else argv)
  try:
    return _main(argv)
  except UserError as e:
    print(f'kdjax: error: {e}', file=sys.stderr)
    return 2
  except Diverged as e:
    print(f'kdjax: diverged: {e}', file=sys.stderr)
    return 3
  except KeyboardInterrupt:
    print('kdjax: interrupted', file=sys.stderr)
    return 130


def _quiet_libraries() -> None:
  """orbax and tfds log routine steps as absl warnings; keep the console for kdjax."""
  try:
    from absl import logging as absl_logging
    absl_logging.set_verbosity(absl_logging.ERROR)
  except ImportError:  # pragma: no cover
    pass


def _main(argv) -> int:
  from kdjax.config import load_config, split_overrides
  _quiet_libraries()
  rest, overrides = split_overrides(argv)
  # The flag may come before or after the command.
  no_cache = '--no-compilation-cache' in rest
  args = _parser().parse_args([a for a in rest if a != '--no-compilation-cache'])
  if not no_cache:
    from kdjax.parallel import enable_compilation_cache
    enable_compilation_cache()
  if overrides and args.command not in ('train', 'distill', 'demo', 'cache', 'fed', 'plan',
                                        'search-student'):
    raise UserError(f'--config.* overrides go with train, distill, demo, cache, fed, plan or '
                    f'search-student, not {args.command}')

  if args.command in ('train', 'distill'):
    config = load_config(args.config, overrides)
    if config.get('scheme') is not None:   # a scheme of its own (kdjax.schemes: dml)
      from kdjax.schemes import train_scheme
      summary = _guard_data(lambda: train_scheme(config, args.workdir))
    elif config.get('encoder') is not None:   # sentence encoders (configs/lm/encoder_kd.py)
      from kdjax.distill.encoder import distill_encoder
      summary = _guard_data(lambda: distill_encoder(config, args.workdir))
    else:
      from kdjax.distill.train import train_and_evaluate
      summary = _guard_data(lambda: train_and_evaluate(
          config, args.workdir, require_teacher=args.command == 'distill'))
    print(json.dumps({k: summary.get(k) for k in ('step', 'eval_accuracy', 'train_loss',
                                                   'examples_per_sec')}))
    return 0
  if args.command == 'eval':
    from kdjax.distill.evaluate import evaluate_workdir
    result = _guard_data(lambda: evaluate_workdir(args.workdir, split=args.split))
    print(json.dumps(result))
    return 0
  if args.command == 'demo':
    if args.task == 'lm':
      from kdjax.demo_lm import run_lm_demo as run_demo
    else:
      from kdjax.demo import run_demo
    workdir = args.workdir or ('workdirs/demo_lm' if args.task == 'lm' else 'workdirs/demo')
    _guard_data(lambda: run_demo(workdir, seeds=args.seeds, variant=args.variant,
                                 overrides=overrides))
    return 0
  if args.command == 'cache':
    return _cache_main(args, overrides)
  if args.command == 'fed':
    return _fed_main(args, overrides)
  if args.command == 'plan':
    return _plan_main(args, overrides, argv)
  if args.command == 'search-student':
    return _search_main(args, overrides)
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
