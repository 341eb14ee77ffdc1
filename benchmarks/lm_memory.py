"""Peak memory of the language-model distillation step: ``chunked_kd`` against plain ``kd``.

One full training step of token-level KD at a 32k vocabulary, built by the engine's own
pieces (``kdjax.engine.setup``, what ``kdjax distill`` runs; the teacher and random token
rows handed in memory): the teacher's forward (inside the step, as the engine's feed
runs it), the student's forward and backward, the loss, the AdamW update (the state
donated). Two variants differ only in the KD term, both with the loss terms of the
shipped configs:

* ``kd``: ``configs/lm/token_kd.py`` (``kd`` T = 1, weight 0.5, plus ``ce`` 0.5), the
  KL divergence over the whole ``[batch, seq, vocab]`` logits at once;
* ``chunked_kd``: ``configs/lm/token_kd.py:chunked`` (``chunked_kd``, the same KL
  computed ``chunk_size`` tokens at a time, each chunk rematerialized in the backward
  pass; same values and gradients).

``--no-ce`` drops the cross-entropy term from both (what is left is the KD term alone;
``ce`` keeps one ``[batch, seq, vocab]`` log-softmax of its own, the same in both).

Two measures per variant, each variant in a process of its own:

* **compiled**: XLA's ``memory_analysis()`` of the compiled step: ``temp`` (the
  intermediates XLA allocates), ``argument`` and ``output`` bytes, and the
  ``alias`` bytes (outputs written into donated arguments: the train state). ``compiled
  bytes`` = temp + argument + output - alias: what the executable holds at once at most.
* **measured**: on the CPU, the growth of the process's resident memory over one step:
  the high-water mark is reset (``/proc/self/clear_refs``) after compiling, the step
  runs once, and growth = ``VmHWM`` after - ``VmRSS`` before (without ``clear_refs``:
  ``ru_maxrss`` after - RSS before, which hides a step that peaks below the compiler).
  On a GPU (``--device gpu``): the device's ``peak_bytes_in_use`` after the step less
  its ``bytes_in_use`` before (``memory_stats()``), and the peak itself.

The first step's loss of both variants is recorded (the same weights and batch: they
agree to float32 rounding, so the comparison is of one computation done two ways).
``ratio_naive_over_chunked``: kd's bytes over chunked_kd's, for each measure.

    python benchmarks/lm_memory.py --json /tmp/lm_memory.json        # vocab 32768, seq 1024
    python benchmarks/lm_memory.py --tiny --json /tmp/lm_memory_tiny.json     # seconds
    python benchmarks/lm_memory.py --device gpu --batch-size 8 --json /tmp/lm_memory_gpu.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
  sys.path.insert(0, BENCH)

from bench_common import machine_info  # noqa: E402  (benchmarks/bench_common.py)
from bench_common import write_json  # noqa: E402

LM_CONFIGS = os.path.join(ROOT, 'configs', 'lm')
VARIANTS = ('kd', 'chunked_kd')
# Small Llama-style models: the memory at issue is the logits', [batch, seq, vocab].
TEACHER = dict(hidden_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=256, tie_embeddings=True)
STUDENT = dict(hidden_size=64, num_layers=2, num_heads=4, num_kv_heads=2,
               intermediate_size=128, tie_embeddings=True)
TINY_TEACHER = dict(hidden_size=16, num_layers=1, num_heads=2, num_kv_heads=1,
                    intermediate_size=32, tie_embeddings=True)
TINY_STUDENT = dict(hidden_size=8, num_layers=1, num_heads=2, num_kv_heads=1,
                    intermediate_size=16, tie_embeddings=True)
MiB = 2 ** 20


def settings(args) -> dict:
  """What both variants run (sizes, loss terms, device), from the flags."""
  from kdjax.config import load_config_file
  if args.tiny:
    sizes = dict(vocab=4096, seq_len=64, batch_size=2, chunk_size=32,
                 teacher=TINY_TEACHER, student=TINY_STUDENT)
  else:
    sizes = dict(vocab=32768, seq_len=1024, batch_size=2, chunk_size=None,
                 teacher=TEACHER, student=STUDENT)
  for key in ('vocab', 'seq_len', 'batch_size', 'chunk_size'):
    if getattr(args, key) is not None:
      sizes[key] = getattr(args, key)
  terms = {}
  for variant, arg in (('kd', None), ('chunked_kd', 'chunked')):
    config = load_config_file(os.path.join(LM_CONFIGS, 'token_kd.py') + (f':{arg}' if arg else ''))
    t = config.loss.terms.to_dict()
    if variant not in t:
      raise SystemExit(f'configs/lm/token_kd.py:{arg or ""} has no {variant} term ({t}); '
                       'update benchmarks/lm_memory.py')
    if args.no_ce:
      t.pop('ce', None)
    terms[variant] = t
  if sizes['chunk_size'] is None:
    sizes['chunk_size'] = int(terms['chunked_kd']['chunked_kd']['chunk_size'])
  terms['chunked_kd']['chunked_kd']['chunk_size'] = int(sizes['chunk_size'])
  return dict(sizes, terms=terms, device=args.device, dtype=args.dtype,
              tiny=bool(args.tiny), no_ce=bool(args.no_ce))


def engine_config(s: dict, variant: str):
  """``configs/lm/token_kd.py`` with this benchmark's sizes and the variant's loss terms."""
  from kdjax.config import load_config_file
  c = load_config_file(os.path.join(LM_CONFIGS, 'token_kd.py'))
  c.data.name = 'lm_memory'
  c.data.feed = 'device'
  c.model.name = 'llama'
  c.model.kwargs = dict(s['student'])
  c.model.dtype = s['dtype']
  c.loss.terms = s['terms'][variant]
  c.batch_size = s['batch_size']
  c.num_steps = 10 ** 9
  c.steps_per_call = c.log_every = 1
  c.eval_every = c.checkpoint_every = 10 ** 9
  c.progress = False
  c.mesh = [('data', 1)]
  c.teacher.devices = 0               # the teacher's forward inside the step's call
  return c


def rows(s: dict, seed: int = 0) -> dict:
  """Random token rows (``x``, next-token ``label``, ``mask``, ``id``), one batch's worth
  twice over; one row in two has its last quarter masked."""
  import numpy as np
  rng = np.random.default_rng(seed)
  n, length = 2 * s['batch_size'], s['seq_len']
  tokens = rng.integers(0, s['vocab'], (n, length + 1)).astype(np.int32)
  mask = np.ones((n, length), bool)
  mask[::2, length - length // 4:] = False
  return {'x': tokens[:, :-1].copy(), 'label': tokens[:, 1:].copy(), 'mask': mask,
          'id': np.arange(n, dtype=np.int32)}


# --------------------------------------------------------------------------- one variant

def _status_kib(field: str) -> int | None:
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith(field + ':'):
          return int(line.split()[1])
  except OSError:
    pass
  return None


def _reset_peak_rss() -> bool:
  """Resets the kernel's high-water mark of this process's RSS (Linux >= 4.0)."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def measure(s: dict, variant: str) -> dict:
  """Builds the step of ``variant``, compiles it, runs it once; its memory figures."""
  import jax
  import jax.numpy as jnp
  from kdjax import models
  from kdjax.data import DatasetSpec
  from kdjax.engine import Data
  from kdjax.engine import setup
  from kdjax.teacher import Teacher

  device = jax.devices(s['device'])[0]
  dtype = jnp.dtype(s['dtype'])
  with jax.default_device(device):
    kw = dict(num_classes=s['vocab'], input_shape=(s['seq_len'],), dtype=dtype)
    t_apply, t_params, t_state = models.functional(
        models.create('llama', seed=1, **kw, **s['teacher']))
    data = rows(s)
    spec = DatasetSpec('lm_memory', (s['seq_len'],), s['vocab'], {'train': len(data['x'])},
                       'int32')
    teacher = Teacher(t_apply, (t_params, t_state), s['vocab'], None, 0, '')
    evals = {k: v[:s['batch_size']] for k, v in data.items()}
    run = setup(engine_config(s, variant), teacher=teacher, data=Data(spec, data, evals),
                log=lambda msg: None)
    state = run.init()
    inputs = run.feed.inputs(0, 1)
    t0 = time.perf_counter()
    compiled = run.calls.jitted(1).lower(state, inputs).compile()
    compile_seconds = time.perf_counter() - t0
    analysis = compiled.memory_analysis()
    jax.block_until_ready((state, inputs))

    out = dict(variant=variant, compile_seconds=compile_seconds,
               terms=s['terms'][variant])
    fields = ('temp', 'argument', 'output', 'alias', 'generated_code')
    for name in fields:
      value = getattr(analysis, f'{name}_size_in_bytes', None) if analysis else None
      out[f'{name}_bytes'] = None if value is None else int(value)
    if analysis is not None:
      out['compiled_bytes'] = (out['temp_bytes'] + out['argument_bytes'] + out['output_bytes']
                               - (out['alias_bytes'] or 0))

    on_gpu = device.platform != 'cpu'
    if on_gpu:
      before = (device.memory_stats() or {}).get('bytes_in_use')
    else:
      reset = _reset_peak_rss()
      before = _status_kib('VmRSS')
      before = None if before is None else before * 1024
      maxrss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    t0 = time.perf_counter()
    state, metrics = compiled(state, inputs)
    jax.block_until_ready((state, metrics))
    out['step_seconds'] = time.perf_counter() - t0
    if on_gpu:
      stats = device.memory_stats() or {}
      peak = stats.get('peak_bytes_in_use')
      out.update(measure='device peak_bytes_in_use - bytes_in_use before the step',
                 device_bytes_in_use_before=before, device_peak_bytes_in_use=peak,
                 measured_bytes=None if peak is None or before is None else peak - before)
    else:
      hwm = _status_kib('VmHWM')
      if reset and hwm is not None and before is not None:
        out.update(measure='VmHWM after the step - VmRSS before (high-water mark reset)',
                   measured_bytes=hwm * 1024 - before)
      else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        out.update(measure='ru_maxrss after the step - RSS before (no reset: a lower bound)',
                   measured_bytes=max(0, peak - (before or maxrss_before)))
      out.update(rss_before_bytes=before,
                 peak_rss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    total, count = jax.device_get(metrics['loss'])      # (sum, count) per step
    out['first_step_loss'] = float(total.sum() / count.sum())
    out['device'] = str(device)
  return out


def children(s: dict, *, parallel: bool) -> dict:
  """``measure`` of each variant in a fresh process (its own allocator and high-water
  mark); with ``parallel`` the processes run at the same time (CPU only: each process's
  figures are its own, and two processes on one accelerator would share its memory)."""
  env = dict(os.environ)
  if s['device'] == 'cpu':
    env.setdefault('JAX_PLATFORMS', 'cpu')

  def start(variant):
    cmd = [sys.executable, os.path.abspath(__file__), '--child', variant,
           '--settings-json', json.dumps(s)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)

  def finish(variant, proc):
    out, err = proc.communicate()
    if proc.returncode != 0:
      raise SystemExit(f'the {variant} child failed ({proc.returncode}):\n{err[-3000:]}')
    return json.loads(out.strip().splitlines()[-1])

  if parallel and s['device'] == 'cpu':
    procs = {variant: start(variant) for variant in VARIANTS}
    return {variant: finish(variant, proc) for variant, proc in procs.items()}
  return {variant: finish(variant, start(variant)) for variant in VARIANTS}


def _ratio(a, b):
  return None if a is None or b is None or b <= 0 else a / b


def report(s: dict, results: dict, command: str) -> dict:
  import jax
  naive, chunked = results['kd'], results['chunked_kd']
  ratios = {key: _ratio(naive.get(key), chunked.get(key))
            for key in ('temp_bytes', 'compiled_bytes', 'measured_bytes')}
  loss_gap = abs(naive['first_step_loss'] - chunked['first_step_loss'])
  return dict(
      benchmark='lm_memory', date=datetime.date.today().isoformat(), command=command,
      machine=machine_info(), versions={'jax': jax.__version__},
      settings=s, rows=[naive, chunked], ratio_naive_over_chunked=ratios,
      first_step_loss_rel_diff=loss_gap / max(abs(naive['first_step_loss']), 1e-30))


def print_table(res: dict) -> None:
  s = res['settings']
  naive, chunked = res['rows']
  print(f"\n[token-level KD step, vocab {s['vocab']}, batch {s['batch_size']} x seq "
        f"{s['seq_len']}, {s['dtype']}, on {naive['device']}; chunk {s['chunk_size']} tokens; "
        f"terms {'kd only' if s['no_ce'] else 'kd + ce'}]")
  print(f'{"":30s}{"kd":>12s}{"chunked_kd":>12s}{"kd/chunked":>12s}')
  for key, label in (('temp_bytes', 'XLA temp (MiB)'), ('argument_bytes', 'XLA arguments (MiB)'),
                     ('output_bytes', 'XLA outputs (MiB)'), ('alias_bytes', 'XLA aliased (MiB)'),
                     ('compiled_bytes', 'compiled peak (MiB)'),
                     ('measured_bytes', 'measured growth (MiB)')):
    a, b = naive.get(key), chunked.get(key)
    if a is None or b is None:
      continue
    ratio = _ratio(a, b)
    print(f'{label:30s}{a / MiB:12.1f}{b / MiB:12.1f}'
          f'{"" if ratio is None else f"{ratio:12.2f}"}')
  print(f'{"first step loss":30s}{naive["first_step_loss"]:12.6f}'
        f'{chunked["first_step_loss"]:12.6f}')
  print(f'measured: {naive["measure"]}')


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument('--json', help='write the results to this file')
  parser.add_argument('--device', default='cpu', choices=['cpu', 'gpu', 'tpu'])
  parser.add_argument('--dtype', default='float32', choices=['float32', 'bfloat16'])
  parser.add_argument('--vocab', type=int)
  parser.add_argument('--seq-len', type=int)
  parser.add_argument('--batch-size', type=int)
  parser.add_argument('--chunk-size', type=int, help="default: token_kd.py:chunked's")
  parser.add_argument('--no-ce', action='store_true', help='the KD term alone')
  parser.add_argument('--tiny', action='store_true', help='vocab 4096, seq 64: seconds')
  parser.add_argument('--parallel', action='store_true',
                      help='run the two variants at the same time (CPU only)')
  parser.add_argument('--child', choices=VARIANTS, help=argparse.SUPPRESS)
  parser.add_argument('--settings-json', help=argparse.SUPPRESS)
  args = parser.parse_args(argv)

  if args.child:
    print(json.dumps(measure(json.loads(args.settings_json), args.child)))
    return
  s = settings(args)
  results = children(s, parallel=args.parallel)
  command = ' '.join(['python', 'benchmarks/lm_memory.py',
                      *(argv if argv is not None else sys.argv[1:])])
  res = report(s, results, command)
  print_table(res)
  ratios = res['ratio_naive_over_chunked']
  print('ratio_naive_over_chunked: ' + ', '.join(
      f'{k} {v:.2f}' for k, v in ratios.items() if v is not None))
  write_json(args.json, res)


if __name__ == '__main__':
  main()
