"""``kdjax demo --task lm``: language-model distillation on Shakespeare, offline, end to end.

Trains one teacher LM (``configs/lm/teacher.py``), builds its two caches once (per-token
top-k logits, and sampled continuations of the training prompts), then trains the
student LM (``configs/lm/student.py``, about 7x fewer parameters) five ways, for several
seeds each:

========================  ========================================================
``student_data``          from the data alone (cross-entropy): the baseline
``student_token_kd``      token-level KD from the live teacher (``token_kd.py``)
``student_seq_kd``        sequence-level KD with word-level KD (Kim and Rush's Seq-KD
                          + Word-KD): the teacher's sampled continuations from the
                          cache, the live teacher's distribution at each of their
                          positions (``seq_kd.py:sample,word``)
``student_gkd``           on-policy GKD, the student sampling inside the step
                          (``gkd.py``)
``student_cached_kd``     token KD from the top-k cache, no teacher at run time
                          (``cached_kd.py``)
``student_data_restart``  the control of the two warm-started runs (below)
========================  ========================================================

As in the GKD and MiniLLM papers, sequence-level and on-policy distillation start from
a supervised student: the data-only run's halfway checkpoint (``config.init``), then
the other half of its steps with a fresh optimizer and learning-rate schedule. The
restart alone changes the result, so ``student_data_restart`` makes the same restart
on the data alone, and the table compares the two with it as well as with
``student_data``.

Every model is then scored the same way on the held-out plays' packed rows (whatever
split it trained on): perplexity (``exp`` of the mean per-token cross-entropy), bits per
character of the held-out text, and top-1 agreement with the teacher (the fraction of
target positions where the student's most likely next token is the teacher's). Prints
a table, writes ``WORKDIR/results.json`` (each run's ``perplexity_mean``,
``perplexity_std``, ``agreement_mean``, per-seed values, wall time) and
``WORKDIR/results.png``. A rerun resumes: finished runs and caches are only read.
"""

from __future__ import annotations

import json
import math
import os
import time

import numpy as np

from kdjax import storage
from kdjax.config import load_config
from kdjax.demo import DEMO_SETS
from kdjax.demo import configs_dir
from kdjax.demo import write_results
from kdjax.errors import UserError

# (result key, config file, how it meets the teacher: None, 'live', or a cache name)
STUDENTS = (
    ('student_data', 'lm/student.py', None),
    ('student_token_kd', 'lm/token_kd.py', 'live'),
    ('student_seq_kd', 'lm/seq_kd.py', 'seq'),
    ('student_gkd', 'lm/gkd.py', 'live'),
    ('student_cached_kd', 'lm/cached_kd.py', 'topk'),
    # The control of the warm-started runs: the same restart, on the data alone.
    ('student_data_restart', 'lm/student.py', None),
)
RUN_KEYS = ('teacher',) + tuple(key for key, *_ in STUDENTS)
# Runs that read a cache of sequences and add this variant: a loss on the live teacher's
# outputs at the cached rows (Seq-KD + Word-KD).
SCORED = {'student_seq_kd': 'word'}
# The runs that start from the data-only student's halfway checkpoint.
WARM_STARTED = ('student_seq_kd', 'student_gkd', 'student_data_restart')
# The caches: name -> the config (and variant) that builds and reads it.
CACHES = {'seq': ('lm/seq_kd.py', 'sample'), 'topk': ('lm/cached_kd.py', '')}
VARIANTS = ('', 'tiny', 'large')
CACHE_BATCH_FACTOR = 16
LM_DEMO_SETS = DEMO_SETS + ('teacher.cache', 'init.workdir', 'init.step')


def _config(file: str, variant: str, overrides, seed: int):
  spec = os.path.join(configs_dir(), file)
  config = load_config(f'{spec}:{variant}' if variant else spec, list(overrides))
  config.seed = seed
  config.progress = False
  return config


def run_lm_demo(workdir: str, *, seeds: int = 3, variant: str = '', overrides=()) -> dict:
  """Runs the LM demo under ``workdir`` (see the module docstring).

  Args:
    workdir: ``teacher/``, ``cache_seq/``, ``cache_topk/`` and one folder per student run
      (``student_gkd/seed1``, ...); a rerun resumes each from its checkpoints.
    seeds: student seeds per kind of run (the teacher is one run, seed 0).
    variant: ``''`` (this CPU, about 20 minutes), ``'tiny'`` (tests, seconds) or
      ``'large'`` (a GPU or TPU: a 119M-parameter student).
    overrides: ``(dotted key, value)`` pairs for every run's config, not the keys the
      demo sets itself (:data:`LM_DEMO_SETS`).

  Returns:
    The results (also in ``workdir/results.json``).
  """
  from kdjax import workdir as workdir_lib
  from kdjax.cache import build_cache
  from kdjax.distill.train import train_and_evaluate
  if seeds < 1:
    raise UserError('--seeds must be at least 1')
  if variant not in VARIANTS:
    raise UserError(f'the LM demo has the variants {", ".join(repr(v) for v in VARIANTS)} '
                    f'(got --variant {variant!r})')
  fixed = sorted({key for key, _ in overrides} & set(LM_DEMO_SETS))
  if fixed:
    raise UserError(f'the demo sets {", ".join(fixed)} in every run itself; '
                    f'drop --config.{fixed[0]}')
  workdir = workdir_lib.create(workdir_lib.resolve(workdir))
  t_demo = time.time()
  summaries: dict[str, list[dict]] = {}
  run_dirs: dict[str, list[str]] = {}

  teacher_dir = storage.join(workdir, 'teacher')
  print(f'[demo] teacher -> {teacher_dir}', flush=True)
  teacher_config = _config('lm/teacher.py', variant, overrides, 0)
  summaries['teacher'] = [train_and_evaluate(teacher_config, teacher_dir)]
  run_dirs['teacher'] = [teacher_dir]

  cache_dirs, cache_seconds = {}, {}
  for name, (file, cache_variant) in CACHES.items():
    cache_dirs[name] = storage.join(workdir, f'cache_{name}')
    config = _config(file, ','.join(filter(None, (cache_variant, variant))), overrides, 0)
    config.teacher.workdir = teacher_dir
    # The teacher runs forward only: larger batches than training's (the runs reading a
    # cache do not depend on the batches that built it).
    config.batch_size = int(config.batch_size) * CACHE_BATCH_FACTOR
    print(f'[demo] cache {name} -> {cache_dirs[name]}', flush=True)
    t0 = time.time()
    build_cache(config, cache_dirs[name], progress=False)
    cache_seconds[name] = time.time() - t0

  for key, file, uses in STUDENTS:
    summaries[key], run_dirs[key] = [], []
    file, run_variant = (CACHES[uses] if uses in CACHES else (file, ''))
    for seed in range(seeds):
      config = _config(file, ','.join(filter(None, (run_variant, SCORED.get(key), variant))),
                       overrides, seed)
      if key in WARM_STARTED:
        # As in the GKD and MiniLLM papers, sequence-level and on-policy distillation start
        # from a supervised student: the data-only run's halfway checkpoint, then the
        # other half of its steps.
        data_config = _config('lm/student.py', variant, overrides, seed)
        half = int(data_config.num_steps) // 2
        if half not in workdir_lib.all_steps(run_dirs['student_data'][seed]):
          raise UserError(f'the data-only student has no checkpoint at step {half} to start '
                          f'{key} from; keep config.checkpoint_every at half its num_steps')
        config.init.workdir, config.init.step = run_dirs['student_data'][seed], half
        config.num_steps = int(data_config.num_steps) - half
      if uses == 'live':
        config.teacher.workdir = teacher_dir
      elif uses is not None:
        config.teacher.cache = cache_dirs[uses]
        if key in SCORED:     # the teacher that generated the rows scores them
          config.teacher.workdir = teacher_dir
      run_dir = storage.join(workdir, key, f'seed{seed}')
      print(f'[demo] {key} seed {seed} -> {run_dir}', flush=True)
      summaries[key].append(train_and_evaluate(config, run_dir))
      run_dirs[key].append(run_dir)

  print('[demo] scoring every model on the held-out plays', flush=True)
  scores = score_runs(teacher_dir, run_dirs)
  results: dict[str, dict] = {}
  for key in RUN_KEYS:
    s = scores[key]
    ppl = np.asarray([r['perplexity'] for r in s], np.float64)
    agree = np.asarray([r['agreement'] for r in s], np.float64)
    bpc = np.asarray([r['bits_per_char'] for r in s], np.float64)
    config = workdir_lib.read_config(run_dirs[key][0])
    results[key] = {
        'perplexity_mean': float(ppl.mean()),
        'perplexity_std': float(ppl.std(ddof=1)) if len(ppl) > 1 else 0.0,
        'perplexities': ppl.tolist(),
        'bits_per_char_mean': float(bpc.mean()),
        'agreement_mean': float(agree.mean()),
        'agreements': agree.tolist(),
        'parameters': s[0]['parameters'],
        'train_split': config['data']['train_split'],
        'num_steps': int(config['num_steps']),
        'init_from': (config.get('init') or {}).get('workdir') or None,
        'init_step': (config.get('init') or {}).get('step') or None,
        'wall_seconds_mean': float(np.mean([r['wall_seconds'] for r in summaries[key]])),
        'tokens_per_sec_mean': float(np.mean([r.get('tokens_per_sec') or 0.0
                                              for r in summaries[key]])),
    }
  results['_meta'] = {
      'seeds': seeds, 'variant': variant, 'data': teacher_config.data.name,
      'eval_split': 'test', 'eval_tokens': scores['teacher'][0]['tokens'],
      'cache_seconds': cache_seconds, 'total_seconds': time.time() - t_demo,
      'size_ratio': results['teacher']['parameters'] / results['student_data']['parameters'],
  }
  return write_results(workdir, results, format_table, _plot)


def score_runs(teacher_dir: str, run_dirs: dict[str, list[str]], *,
               batch_size: int = 64) -> dict[str, list[dict]]:
  """Scores each run's latest checkpoint on the teacher's held-out packed rows.

  Returns, per key, one dict per run: ``perplexity``, ``bits_per_char``, ``agreement``
  (top-1 with the teacher's latest checkpoint), ``loss`` (mean nats per target token),
  ``tokens`` (target positions scored) and ``parameters``.
  """
  import jax
  import jax.numpy as jnp

  from kdjax import data as kdata
  from kdjax import teacher as teacher_lib
  from kdjax.config import from_dict
  from kdjax import workdir as workdir_lib
  from kdjax.models import model_kwargs
  from kdjax.parallel import make_mesh

  mesh = make_mesh([('data', 1)], devices=jax.devices()[:1])
  tconfig = from_dict(workdir_lib.read_config(teacher_dir))
  name, data_dir = tconfig.data.name, tconfig.data.get('data_dir') or None
  arrays = kdata.load_arrays(name, 'test', data_dir=data_dir)
  info = kdata.load_source(name, 'test', data_dir=data_dir).dataset_info
  characters = int((info.metadata or {}).get('characters', {}).get('test') or 0)
  n = len(arrays['x'])
  keep = ('x', 'label', 'mask', 'segment_ids', 'positions')

  def batches():
    for i in range(0, n, batch_size):
      b = {k: arrays[k][i:i + batch_size] for k in keep if k in arrays}
      pad = batch_size - len(b['x'])
      if pad:
        b = {k: np.concatenate([v, np.zeros((pad, *v.shape[1:]), v.dtype)]) for k, v in b.items()}
      yield b

  def make_score(apply):
    @jax.jit
    def score(params, state, batch, teacher_top1):
      out, _ = apply(params, state, batch['x'], train=False, **model_kwargs(batch))
      logp = jax.nn.log_softmax(out.logits.astype(jnp.float32), axis=-1)
      nll = -jnp.take_along_axis(logp, batch['label'][..., None], axis=-1)[..., 0]
      m = batch['mask']
      top1 = jnp.argmax(out.logits, axis=-1)
      return (jnp.sum(jnp.where(m, nll, 0.0)), jnp.sum(m),
              jnp.sum(m & (top1 == teacher_top1)), top1)
    return score

  teacher = teacher_lib.load_teacher(teacher_dir, mesh)
  t_score = make_score(teacher.apply)
  teacher_top1 = []
  for b in batches():
    teacher_top1.append(np.asarray(t_score(*teacher.variables, b, np.zeros_like(b['label']))[3]))

  out: dict[str, list[dict]] = {}
  # One compiled scorer per architecture: runs of the same model config share it.
  scorers = {json.dumps(tconfig.model.to_dict(), sort_keys=True): t_score}
  for key, dirs in run_dirs.items():
    out[key] = []
    for run_dir in dirs:
      model = teacher if run_dir == teacher_dir else teacher_lib.load_teacher(run_dir, mesh)
      arch = json.dumps(workdir_lib.read_config(run_dir)['model'], sort_keys=True)
      if arch not in scorers:
        scorers[arch] = make_score(model.apply)
      score = scorers[arch]
      nats = count = agree = 0.0
      for b, t1 in zip(batches(), teacher_top1):
        s, c, a, _ = score(*model.variables, b, t1)
        nats, count, agree = nats + float(s), count + float(c), agree + float(a)
      params = sum(int(np.prod(np.shape(x))) for x in jax.tree.leaves(model.variables[0]))
      out[key].append({
          'loss': nats / count, 'perplexity': math.exp(nats / count),
          'bits_per_char': nats / math.log(2) / characters if characters else None,
          'agreement': agree / count, 'tokens': int(count), 'parameters': params})
  return out


def format_table(results: dict) -> str:
  seeds = results['_meta']['seeds']
  lines = [f"{'run':<19} {'params':>8} {'train split':<14} {'steps':>6} "
           f"{'perplexity (mean ± std)':>24} {'bits/char':>9} {'agree %':>8} {'wall s/run':>10}"]
  for key in RUN_KEYS:
    r = results[key]
    lines.append(f"{key:<19} {r['parameters']:>8,} {r['train_split']:<14} {r['num_steps']:>6} "
                 f"{r['perplexity_mean']:>15.2f} ± {r['perplexity_std']:<6.2f} "
                 f"{r['bits_per_char_mean'] or float('nan'):>9.3f} "
                 f"{100 * r['agreement_mean']:>8.2f} {r['wall_seconds_mean']:>10.1f}")
  base = results['student_data']['perplexity_mean']
  for key, *_ in STUDENTS[1:-1]:
    p = results[key]['perplexity_mean']
    lines.append(f'{key} vs. student_data: perplexity {p:.2f} vs {base:.2f} '
                 f'({100 * (p / base - 1):+.2f} %)')
  restart = results['student_data_restart']['perplexity_mean']
  for key in WARM_STARTED[:-1]:
    p = results[key]['perplexity_mean']
    lines.append(f'{key} vs. student_data_restart (the same restart on data alone): '
                 f'{p:.2f} vs {restart:.2f} ({100 * (p / restart - 1):+.2f} %)')
  m = results['_meta']
  lines.append(f"held-out tokens scored: {m['eval_tokens']:,}; teacher / student parameters: "
               f"{m['size_ratio']:.1f}x; {seeds} student seeds; total {m['total_seconds']:.0f} s")
  return '\n'.join(lines)


def _plot(results: dict, path: str) -> None:
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  keys = list(RUN_KEYS)
  fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
  for ax, field, many, label in (
      (axes[0], 'perplexity_mean', 'perplexities', 'held-out perplexity (lower is better)'),
      (axes[1], 'agreement_mean', 'agreements', 'top-1 agreement with the teacher (%)')):
    scale = 100 if field == 'agreement_mean' else 1
    means = [scale * results[k][field] for k in keys]
    ax.bar(range(len(keys)), means,
           color=['#555', '#999', '#4a7', '#27a', '#a52', '#7a4', '#bbb'][:len(keys)])
    for i, k in enumerate(keys):
      for v in results[k][many]:
        ax.plot(i, scale * v, 'k.', ms=4)
    ax.set_xticks(range(len(keys)), [k.replace('student_', '').replace('_', '\n') for k in keys])
    ax.set_ylabel(label)
    lo = min(means)
    ax.set_ylim(lo * 0.9 if field == 'perplexity_mean' else 0, max(means) * 1.05)
  fig.suptitle(f"kdjax LM demo: {results['_meta']['data']}, {results['_meta']['seeds']} seeds")
  fig.tight_layout()
  storage.savefig(fig, path, dpi=100)
  plt.close(fig)
