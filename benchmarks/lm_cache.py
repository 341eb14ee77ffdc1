"""The language-model teacher cache: the student's perplexity against the bytes per token.

For the LM recipes (``configs/lm/``), one run:

  1. trains the teacher once (``configs/lm/teacher.py``) or reuses ``--teacher-workdir``;
  2. distills the student from the live teacher (``configs/lm/token_kd.py``: ``kd`` at
     T = 1, weight 0.5, + ``ce`` 0.5): the reference;
  3. for every ``k`` of ``--ks`` and codec of ``--codecs`` (``kdjax.cache.codec``), builds
     the per-token cache (``kdjax.cache.build_cache``, ``configs/lm/cached_kd.py`` with
     ``config.cache.k`` / ``config.cache.codec``) and distills the same student from it:
     ``sparse_kd`` with the tail mass spread uniformly or kept as one bin (``--missing-mass``,
     a comma list: one row per treatment, from the same cache), same weights,
     steps and seeds as the reference;
  4. for every ``N`` of ``--samples``, builds the sampled cache (Random-Sampling KD,
     ``kdjax.cache.sampled``: ``N`` classes per token drawn from the teacher,
     ``configs/lm/cached_kd.py:sampled`` with ``config.cache.samples``) and distills the
     same student from it with ``sampled_kd``: rows of format ``rs{N}`` with ``k`` = ``N``
     (the most unique ids a token can hold) and tail ``sampled``.

Both sides of each comparison run in this one process with the same seeds, steps and
batches; the figure of merit is the held-out perplexity ratio cached / live (mean over
``--seeds`` student seeds). Written to ``--json``: ``rows`` (one per k and codec:
``k``, ``format``, ``bytes_per_token`` (exact, ``kdjax.cache.codec.bytes_per_token``),
``perplexity_ratio_vs_live``, the perplexities, the top-k mass, build and run seconds),
``best_bytes_per_token_within_1pct`` (the fewest bytes per token whose ratio is at most
1.01, with its row) and the live reference; a PNG plot (bytes per token, log scale,
against the ratio, one series per codec) goes next to the JSON (``--plot`` moves it).

    python benchmarks/lm_cache.py --json /tmp/lm_cache.json \
        --teacher-workdir workdirs/lm_teacher --steps 1500 --seeds 3
    python benchmarks/lm_cache.py --json /tmp/lm_cache_tiny.json --variant tiny \
        --ks 8,32 --codecs f32+i32,int4+ef --steps 20       # a minute, figures meaningless
    python benchmarks/lm_cache.py --json /tmp/lm_rs.json --teacher-workdir W/teacher \
        --ks '' --samples 24,48,64,96                       # sampled rows only
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
import tempfile
import time
from typing import Any

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench_common import machine_info  # noqa: E402  (benchmarks/bench_common.py)
from bench_common import write_json  # noqa: E402

CODECS = ('f32+i32', 'bf16+i16', 'int8+packed', 'int4+ef', 'int3+ef', 'log3+ef', 'int2+ef')
WITHIN = 0.01          # "within 1%": a perplexity ratio at most 1 + WITHIN


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--json', help='write every figure to this JSON file (the plot goes next to it)')
  p.add_argument('--plot', default='', help='the PNG plot (default: the --json path, .png)')
  p.add_argument('--variant', default='', choices=('', 'tiny'),
                 help="config variant of every run ('tiny': shakespeare_lm/tiny, seconds)")
  p.add_argument('--teacher-workdir', default='', help='a finished teacher workdir to reuse')
  p.add_argument('--workdir', default='', help='where runs and caches go (default: a temp folder)')
  p.add_argument('--steps', type=int, default=0, help='student steps (default: the config\'s)')
  p.add_argument('--ks', default='8,16,32,64,128',
                 help="comma list of k (classes per token); '' for no top-k rows")
  p.add_argument('--samples', default='',
                 help='comma list of N: sampled-cache rows (Random-Sampling KD, N draws per '
                 "token; format rs{N}); '' for none")
  p.add_argument('--proposal-temperature', type=float, default=1.0,
                 help='the sampled caches\' proposal temperature (1: the teacher itself)')
  p.add_argument('--codecs', default=','.join(CODECS), help='comma list of codecs')
  p.add_argument('--seeds', type=int, default=1, help='student seeds per configuration (0..n-1)')
  p.add_argument('--missing-mass', default='uniform',
                 help='comma list of sparse_kd tail treatments (renormalize, uniform, zero, '
                 'bucket): one row per k, codec and treatment, from the same cache')
  p.add_argument('--data-dir', default='', help='data directory (default: kdjax default)')
  p.add_argument('--set', action='append', default=[], metavar='--config.KEY=VALUE',
                 help='extra override of every config (repeatable)')
  args = p.parse_args(argv)
  from kdjax.cache import parse_codec
  from kdjax.errors import UserError
  try:
    args.codec_list = [parse_codec(c).name for c in args.codecs.split(',')]
  except UserError as e:
    p.error(str(e))
  args.tails = args.missing_mass.split(',')
  bad = sorted(set(args.tails) - {'renormalize', 'uniform', 'zero', 'bucket'})
  if bad:
    p.error(f'--missing-mass takes renormalize, uniform, zero or bucket, got {bad}')
  try:
    args.k_list = [int(k) for k in args.ks.split(',') if k.strip()]
    args.sample_list = [int(n) for n in args.samples.split(',') if n.strip()]
  except ValueError:
    p.error(f'--ks and --samples take integers, got {args.ks!r}, {args.samples!r}')
  if args.seeds < 1 or args.steps < 0 or min(args.k_list + args.sample_list, default=1) < 1:
    p.error('--seeds, --ks and --samples must be positive, --steps >= 0')
  if not args.proposal_temperature > 0:
    p.error('--proposal-temperature must be positive')
  return args


def _overrides(args, *extra) -> list[str]:
  out = list(args.set) + ['--config.progress=false', *extra]
  if args.data_dir:
    out.append(f'--config.data.data_dir={args.data_dir}')
  return out


def _steps(config, steps: int) -> None:
  """``steps`` student steps, one evaluation and one checkpoint at the end."""
  if steps:
    config.num_steps = steps
    config.eval_every = config.checkpoint_every = steps
    config.log_every = min(int(config.log_every), steps)
    config.steps_per_call = min(int(config.steps_per_call), steps)


def _config(name: str, args, *extra, variant: str = ''):
  from kdjax.config import load_config, split_overrides
  rest, pairs = split_overrides(_overrides(args, *extra))
  if rest:
    raise SystemExit(f'not config overrides: {rest}')
  variant = ','.join(filter(None, (variant, args.variant)))
  spec = os.path.join(ROOT, 'configs', 'lm', name) + (f':{variant}' if variant else '')
  return load_config(spec, pairs)


def _mean_std(values):
  import numpy as np
  a = np.asarray(values, np.float64)
  return float(a.mean()), float(a.std(ddof=1)) if len(a) > 1 else 0.0


def _distill(label: str, config_of, args, workdir: str) -> dict:
  """``config_of(seed)`` distilled for every seed: held-out perplexities and seconds."""
  from kdjax.distill.train import train_and_evaluate
  ppl, secs = [], []
  for seed in range(args.seeds):
    config = config_of(seed)
    config.seed = seed
    _steps(config, args.steps)
    t0 = time.time()
    summary = train_and_evaluate(config, os.path.join(workdir, label, f'seed{seed}'),
                                 require_teacher=True)
    secs.append(time.time() - t0)
    ppl.append(summary['eval_perplexity'])
    print(f'{label} seed {seed}: perplexity {ppl[-1]:.3f} ({secs[-1]:.0f} s)', flush=True)
  mean, std = _mean_std(ppl)
  return {'perplexity_mean': mean, 'perplexity_std': std, 'perplexity': ppl,
          'seconds': sum(secs)}


def run(args, workdir: str) -> dict:
  """Teacher, live reference and the k x codec rows."""
  from kdjax import data as kdata
  from kdjax.cache import build_cache
  from kdjax.cache import bytes_per_token
  from kdjax.cache import inspect_cache
  from kdjax.cache import sample_bytes_per_token
  from kdjax.cache import sample_format
  from kdjax.cache.codec import CodecError
  from kdjax.distill.train import train_and_evaluate

  out: dict[str, Any] = {}
  teacher_dir = args.teacher_workdir or os.path.join(workdir, 'teacher')
  if args.teacher_workdir:
    with open(os.path.join(teacher_dir, 'summary.json')) as f:
      tsum = json.load(f)
  else:
    print(f'teacher -> {teacher_dir}', flush=True)
    tsum = train_and_evaluate(_config('teacher.py', args), teacher_dir)
  out['teacher'] = {'workdir': teacher_dir, 'reused': bool(args.teacher_workdir),
                    'eval_perplexity': tsum.get('eval_perplexity')}
  teacher = [f'--config.teacher.workdir={teacher_dir}']
  base = _config('cached_kd.py', args, *teacher)
  vocab = kdata.dataset_spec(base.data.name, data_dir=base.data.data_dir or None).num_classes
  out.update(data=base.data.name, vocab=vocab, seeds=args.seeds,
             steps=args.steps or int(base.num_steps), missing_mass=args.tails)

  out['live'] = _distill('live', lambda seed: _config('token_kd.py', args, *teacher), args,
                         workdir)
  live = out['live']['perplexity_mean']
  rows = []
  for k in args.k_list:
    for codec in args.codec_list:
      try:
        nbytes = bytes_per_token(codec, k, vocab)
      except CodecError as e:
        print(f'skip k={k} {codec}: {e}', flush=True)
        continue
      settings = [*teacher, f'--config.cache.k={k}', f'--config.cache.codec={codec}']
      cache_dir = os.path.join(workdir, 'caches', f'k{k}-{codec}')
      t0 = time.time()
      build_cache(_config('cached_kd.py', args, *settings), cache_dir, progress=False)
      build_s = time.time() - t0
      info = inspect_cache(cache_dir)

      for tail in args.tails:
        def config_of(seed, settings=settings, cache_dir=cache_dir, tail=tail):
          c = _config('cached_kd.py', args, *settings, f'--config.teacher.cache={cache_dir}')
          c.loss.terms.kd.missing_mass = tail
          return c

        # the first treatment keeps the original run folders (a rerun resumes them)
        label = f'k{k}-{codec}' + ('' if tail == 'uniform' else f'-{tail}')
        res = _distill(label, config_of, args, workdir)
        assert info['bytes_per_token'] == nbytes
        res.update(k=k, format=codec, missing_mass=tail, bytes_per_token=nbytes,
                   perplexity_ratio_vs_live=res['perplexity_mean'] / live,
                   topk_mass_mean=info['topk_mass']['mean'], build_seconds=build_s)
        rows.append(res)
        print(f'k={k} {codec} {tail}: {nbytes:g} bytes/token, perplexity ratio '
              f'{res["perplexity_ratio_vs_live"]:.4f}', flush=True)
  tau = args.proposal_temperature
  for n in args.sample_list:
    # Random-Sampling KD: n draws per token from the teacher, sampled_kd on their counts.
    fmt = sample_format(n, tau)
    nbytes = sample_bytes_per_token(n, vocab, weighted=tau != 1.0)
    settings = [*teacher, f'--config.cache.samples={n}',
                f'--config.cache.proposal_temperature={tau}']
    cache_dir = os.path.join(workdir, 'caches', fmt)
    t0 = time.time()
    build_cache(_config('cached_kd.py', args, *settings, variant='sampled'), cache_dir,
                progress=False)
    build_s = time.time() - t0
    info = inspect_cache(cache_dir)

    def config_of(seed, settings=settings, cache_dir=cache_dir):
      return _config('cached_kd.py', args, *settings, f'--config.teacher.cache={cache_dir}',
                     variant='sampled')

    res = _distill(fmt, config_of, args, workdir)
    assert info['bytes_per_token'] == nbytes
    res.update(k=n, format=fmt, missing_mass='sampled', bytes_per_token=nbytes,
               perplexity_ratio_vs_live=res['perplexity_mean'] / live, topk_mass_mean=None,
               unique_per_token_mean=info['unique_per_token']['mean'], build_seconds=build_s)
    rows.append(res)
    print(f'{fmt}: {nbytes:g} bytes/token, {res["unique_per_token_mean"]:.1f} unique ids per '
          f'token, perplexity ratio {res["perplexity_ratio_vs_live"]:.4f}', flush=True)
  out['rows'] = rows
  within = [r for r in rows if r['perplexity_ratio_vs_live'] <= 1 + WITHIN]
  best = min(within, key=lambda r: (r['bytes_per_token'], r['perplexity_ratio_vs_live']),
             default=None)
  out['best_bytes_per_token_within_1pct'] = best['bytes_per_token'] if best else None
  out['best_within_1pct'] = ({key: best[key] for key in (
      'k', 'format', 'missing_mass', 'bytes_per_token', 'perplexity_ratio_vs_live')}
                             if best else None)
  return out


def format_table(res: dict) -> str:
  live = res['live']
  lines = [f"{res['data']} ({res['vocab']} tokens), {res['steps']} steps, {res['seeds']} seed(s): "
           f"teacher perplexity {res['teacher']['eval_perplexity']:.3f}; student from the live "
           f"teacher {live['perplexity_mean']:.3f} ± {live['perplexity_std']:.3f}",
           '| k | format | tail | bytes / token | top-k mass (sampled: unique ids) | '
           'perplexity (mean ± std) | ratio vs live |',
           '|---:|---|---|---:|---:|---:|---:|']
  for r in res['rows']:
    mass = (f"{r['topk_mass_mean']:.3f}" if r.get('topk_mass_mean') is not None
            else f"{r.get('unique_per_token_mean', float('nan')):.1f} ids")
    lines.append(f"| {r['k']} | {r['format']} | {r['missing_mass']} | {r['bytes_per_token']:g} | "
                 f"{mass} | {r['perplexity_mean']:.3f} ± "
                 f"{r['perplexity_std']:.3f} | {r['perplexity_ratio_vs_live']:.4f} |")
  best = res['best_within_1pct']
  lines.append('fewest bytes per token within 1% of the live perplexity: ' + (
      f"{best['bytes_per_token']:g} ({best['format']}, k = {best['k']}, {best['missing_mass']}, ratio "
      f"{best['perplexity_ratio_vs_live']:.4f})" if best else 'none'))
  return '\n'.join(lines)


def plot(res: dict, path: str) -> None:
  """Bytes per token (log) against the perplexity ratio, one series per codec, k labelled."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  import matplotlib.ticker
  fig, ax = plt.subplots(figsize=(7, 4.5))
  def series_of(r):   # the sampled rows (rs{N}) form one series over N
    return ('rsN', 'sampled') if r['missing_mass'] == 'sampled' else (r['format'],
                                                                       r['missing_mass'])

  for series in dict.fromkeys(series_of(r) for r in res['rows']):
    rows = sorted((r for r in res['rows'] if series_of(r) == series), key=lambda r: r['k'])
    xs = [r['bytes_per_token'] for r in rows]
    ys = [r['perplexity_ratio_vs_live'] for r in rows]
    ax.plot(xs, ys, marker='o', label=f'{series[0]}, {series[1]} tail')
    for r, x, y in zip(rows, xs, ys):
      ax.annotate(f"k={r['k']}", (x, y), textcoords='offset points', xytext=(3, 3), fontsize=7)
  ax.axhline(1.0, color='k', lw=0.8)
  ax.axhline(1 + WITHIN, color='gray', lw=0.8, ls='--', label='live + 1%')
  ax.set_xscale('log')
  ax.set_xticks(sorted({r['bytes_per_token'] for r in res['rows']}))   # labelled at each row
  ax.xaxis.set_major_formatter(matplotlib.ticker.FormatStrFormatter('%g'))
  ax.xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
  ax.set_xlabel('bytes per token (cache)')
  ax.set_ylabel('held-out perplexity / live-teacher student')
  ax.set_title(f"{res['data']}: cached teacher vs live ({res['steps']} steps)")
  ax.legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=120)
  plt.close(fig)


def main(argv=None) -> dict:
  args = parse_args(argv)
  import jax
  workdir = args.workdir or tempfile.mkdtemp(prefix='kdjax_lm_cache_')
  os.makedirs(workdir, exist_ok=True)
  t0 = time.time()
  results = {
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': machine_info(), 'devices': [str(d) for d in jax.devices()],
      'jax': jax.__version__, 'argv': sys.argv[1:] if argv is None else list(argv)}
  results.update(run(args, workdir))
  results['seconds'] = time.time() - t0
  print(format_table(results), flush=True)
  write_json(args.json, results)
  png = args.plot or (os.path.splitext(args.json)[0] + '.png' if args.json else '')
  if png and results['rows']:
    plot(results, png)
    print(f'plot: {png}', flush=True)
  return results


if __name__ == '__main__':
  main()
