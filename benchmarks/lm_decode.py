"""Decoding throughput: kdjax's jitted key/value-cache ``generate`` against Hugging Face
``transformers`` ``generate`` on the same weights, side by side, with a parity check.

The model: the language-model demo's teacher (``configs/lm/teacher.py`` ``TEACHER``,
Llama-style: RMSNorm, SwiGLU, RoPE, grouped-query attention, tied embeddings;
``--model student`` for ``configs/lm/student.py`` ``STUDENT``), vocabulary 2048, its
context set to ``--prompt-len + --new-tokens`` (RoPE: no parameter depends on it).
Random weights (``--seed``) at fan-in scale (:func:`fan_in_init`: every matrix
``N(0, 1 / fan_in)``, the embedding ``N(0, 1 / hidden)``, the blocks' output
projections doubled, norm scales 1), so the next token depends on the prompt and the
logits spread over O(1): the model's own initializer (std 0.02) gives near-uniform
logits whose greedy continuation is one token repeated whatever the prompt, which
would make the parity check vacuous. ``--checkpoint DIR`` reads a
trained Hugging Face folder instead (e.g. one written by
``kdjax.models.save_pretrained``), on both sides.

* **kdjax**: a :func:`kdjax.models.generator` per length and settings (the weights read
  once, as the loaded ``transformers`` model holds them; :func:`kdjax.models.generate`
  reads them at every call), called on the prompts: prefill of the left-padded prompts,
  then a ``lax.while_loop`` of one-token steps with the key/value cache; jitted,
  compiled once per shape and settings. The first call of each shape is timed apart
  (``kdjax_first_call_seconds``: tracing, compiling, running) and excluded from the
  figures; the XLA compilations during the timed calls are counted
  (``kdjax_compiles_during_timing``, 0 when nothing recompiles).
* **transformers**: the same weights (kdjax's module written with
  ``kdjax.models.save_pretrained``, read by ``transformers.LlamaForCausalLM.
  from_pretrained``, float32, SDPA attention), ``model.generate(input_ids,
  attention_mask, max_new_tokens=N, do_sample=False, use_cache=True, pad_token_id=0)``
  under ``torch.inference_mode()``; timed at ``torch.set_num_threads(cores)`` and, on a
  machine with more than one core, at 1 thread too (``--torch-threads``): on a shared
  machine a multi-threaded torch step can be many times slower (a descheduled OpenMP
  thread stalls the others at every operator's barrier, and decoding is thousands of
  small operators); the faster variant is the reference.
* **torch compile** (``--torch-compile``): the same ``generate`` with a static cache
  and transformers' automatic compilation of the decoding step
  (``cache_implementation='static'``, ``compile_config=CompileConfig(fullgraph=True)``,
  as the ``CompileConfig`` documentation shows; on a CPU its ``_compile_all_devices``
  flag, which transformers provides to compile there). It runs in a child process
  driven over a pipe, compiled for every shape first; a compilation that fails or takes
  longer than ``--compile-timeout`` is reported and skipped.

Prompts: random tokens (ids 2 to vocabulary - 1: no padding or end-of-sequence id),
row lengths drawn from ``[prompt_len / 2, prompt_len]`` (row 0 full), left-padded to
``--prompt-len``; batch ``B`` takes the first ``B`` rows. No stop token: every row
decodes ``--new-tokens`` tokens on both sides. Greedy (``--sampling greedy``) or
``--sampling top_p`` (temperature 1, top-p 0.9; transformers' default top-k of 50
switched off with ``top_k=0``).

**Parity.** Greedy tokens of both sides on the same prompts and weights, per batch
size: the fraction of rows whose first ``--parity-tokens`` (16) tokens agree exactly,
of rows that agree on all tokens, and the mean length of the agreeing prefix (float32
noise can flip a near-tie late in a sequence, after which the rows diverge). Also the
fraction of distinct tokens among kdjax's (a degenerate model repeating one token would
agree trivially). The run fails (exit 1, after writing its JSON, and says so) when
fewer than ``--parity-min`` (90%) of all rows agree on their first tokens.

**Figures.** New tokens per second per side and batch size: ``batch x new_tokens``
per ``generate`` call over its wall time, prefill included (what a user waits for).
Each figure is the **best** of ``--repeats`` interleaved repeats (the least disturbed,
on a shared machine), the median beside it (``*_median``); a repeat is as many calls
as last ``--min-seconds``. ``ratio_vs_torch`` = kdjax / the fastest torch variant, per
batch. Prefill (``--prefill on``): both sides with ``max_new_tokens=1``, prompt tokens
per second = ``batch x prompt_len`` (padding columns included, both sides compute
them) per call; kdjax's ``while_loop`` also runs one decoding step after choosing that
token (the next token's logits, unused), transformers does not. The load average is
recorded at the start, after each round and at the end.

    python benchmarks/lm_decode.py --json /tmp/lm_decode.json          # this CPU, minutes
    python benchmarks/lm_decode.py --quick --json /tmp/lm_decode_q.json # seconds
    python benchmarks/lm_decode.py --sampling top_p --torch-compile --json F
    # On a GPU (JAX with CUDA and a CUDA torch in the environment):
    python benchmarks/lm_decode.py --device cuda --batches 1,8,32,128 --json F
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

_START = time.perf_counter()
ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)
BENCH = os.path.dirname(os.path.abspath(__file__))
if BENCH not in sys.path:
  sys.path.insert(0, BENCH)

from bench_common import PipeChild  # noqa: E402  (benchmarks/bench_common.py)
from bench_common import machine_info  # noqa: E402
from bench_common import write_json  # noqa: E402

LM_CONFIGS = os.path.join(ROOT, 'configs', 'lm')
PAD_ID = 0
TOP_P = 0.9
COMPILE_EVENT = 'backend_compile'       # jax.monitoring: /jax/core/compile/backend_compile_duration


# ------------------------------------------------------------------------- settings


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--json', help='write every figure to this JSON file')
  p.add_argument('--model', choices=('teacher', 'student'), default='teacher',
                 help="the LM demo's model whose sizes are used (configs/lm/)")
  p.add_argument('--checkpoint', help='a Hugging Face checkpoint folder (config.json, '
                 'model.safetensors) read by both sides instead of random weights')
  p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                 help='where both sides run (JAX on its default backend; torch on cuda)')
  p.add_argument('--batches', default=None, help='comma-separated batch sizes (default '
                 '1,8,32; --quick 1,2)')
  p.add_argument('--prompt-len', type=int, default=None,
                 help='prompt columns, left-padded (default 32; --quick 16)')
  p.add_argument('--new-tokens', type=int, default=None,
                 help='tokens generated per row (default 128; --quick 8)')
  p.add_argument('--sampling', choices=('greedy', 'top_p'), default='greedy',
                 help=f'timed decoding: greedy, or temperature 1 with top-p {TOP_P}')
  p.add_argument('--repeats', type=int, default=None,
                 help='timed repeats per runner, interleaved (default 5; --quick 1)')
  p.add_argument('--min-seconds', type=float, default=None,
                 help='the least duration of one repeat (default 1; --quick 0)')
  p.add_argument('--torch-threads', default=None,
                 help="torch thread counts timed, comma-separated ('cores' = the CPUs "
                      'this process may use; default cores,1 on a CPU, cores on cuda)')
  p.add_argument('--torch-compile', action='store_true',
                 help='also time transformers generate with a static cache and '
                      'torch.compile (in a child process)')
  p.add_argument('--compile-timeout', type=float, default=900.0,
                 help='seconds the torch.compile child may take to set up and compile')
  p.add_argument('--prefill', choices=('on', 'off'), default='on',
                 help='also time a 1-token generation (prompt tokens per second)')
  p.add_argument('--parity-tokens', type=int, default=16,
                 help='leading tokens every row should agree on (capped at --new-tokens)')
  p.add_argument('--parity-min', type=float, default=0.9,
                 help='fail the run when fewer rows than this fraction agree on them')
  p.add_argument('--seed', type=int, default=0, help='weights and prompts')
  p.add_argument('--quick', action='store_true',
                 help="the configs' tiny model, vocabulary 300, batches 1,2, 8 new tokens, "
                      '1 repeat (seconds; the test)')
  p.add_argument('--child', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.child:
    return args
  q = args.quick
  defaults = dict(batches='1,2' if q else '1,8,32', prompt_len=16 if q else 32,
                  new_tokens=8 if q else 128, repeats=1 if q else 5,
                  min_seconds=0.0 if q else 1.0)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  try:
    args.batches = [int(b) for b in args.batches.split(',')]
  except ValueError:
    p.error(f'--batches must be comma-separated integers, got {args.batches!r}')
  if not args.batches or min(args.batches) < 1:
    p.error('--batches must be positive integers')
  args.batches = sorted(set(args.batches))
  for name in ('prompt_len', 'new_tokens', 'repeats', 'parity_tokens'):
    if getattr(args, name) < 1:
      p.error(f'--{name.replace("_", "-")} must be >= 1')
  if args.min_seconds < 0 or not math.isfinite(args.min_seconds):
    p.error('--min-seconds must be a finite number >= 0')
  if not 0 <= args.parity_min <= 1:
    p.error('--parity-min must be in [0, 1]')
  if args.compile_timeout <= 0:
    p.error('--compile-timeout must be positive')
  cores = available_cores()
  spec = args.torch_threads or ('cores' if args.device == 'cuda' or cores == 1 else 'cores,1')
  try:
    threads = [cores if t.strip() == 'cores' else int(t) for t in spec.split(',')]
  except ValueError:
    p.error(f"--torch-threads must be comma-separated integers or 'cores', got {spec!r}")
  if min(threads) < 1:
    p.error('--torch-threads must be >= 1')
  args.torch_threads = list(dict.fromkeys(threads))
  if args.checkpoint and not os.path.isfile(os.path.join(args.checkpoint, 'config.json')):
    p.error(f'--checkpoint {args.checkpoint}: no config.json there; give a Hugging Face '
            'checkpoint folder')
  return args


def available_cores() -> int:
  return len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()


def model_sizes(model: str, quick: bool) -> tuple[dict, int]:
  """``(DecoderConfig sizes, vocabulary)`` of the demo's teacher or student."""
  from kdjax.config import sibling
  cfg = sibling(os.path.join(LM_CONFIGS, 'teacher.py'), model)
  name = ('TINY_' if quick else '') + model.upper()
  return dict(getattr(cfg, name)), 300 if quick else 2048


def fan_in_init(module, seed: int, residual_gain: float = 2.0) -> None:
  """Redraws ``module``'s weights in place: every matrix ``N(0, 1 / fan_in)`` (kernels
  are ``[in, out]``), the embedding ``N(0, 1 / hidden)``, the blocks' output projections
  (attention ``o``, MLP ``down``) times ``residual_gain``; vectors (norm scales) kept.

  The gain lets the blocks, not the last token's own (tied) embedding, decide the next
  token: without it the configs' tiny model mostly repeats one token.
  """
  import jax
  from flax import nnx
  key = jax.random.key(seed)
  for path, node in nnx.iter_graph(module):
    if isinstance(node, nnx.Param) and node[...].ndim == 2:
      key, sub = jax.random.split(key)
      names = set(map(str, path))
      shape, dtype = node[...].shape, node[...].dtype
      fan_in = shape[1] if 'embed' in names else shape[0]
      gain = residual_gain if names & {'o', 'down'} else 1.0
      node[...] = jax.random.normal(sub, shape, dtype) * (gain / math.sqrt(fan_in))


def make_prompts(rows: int, prompt_len: int, vocab: int, seed: int):
  """``(ids, mask)`` numpy ``[rows, prompt_len]``, left-padded random prompts (module doc)."""
  import numpy as np
  from kdjax.models import left_pad
  rng = np.random.default_rng(seed)
  lengths = rng.integers(max(1, prompt_len // 2), prompt_len + 1, rows)
  lengths[0] = prompt_len
  seqs = [rng.integers(2, vocab, n).tolist() for n in lengths]
  return left_pad(seqs, pad_id=PAD_ID, length=prompt_len)


def sampling_kwargs(sampling: str) -> tuple[dict, dict]:
  """``(kdjax generate kwargs, transformers generate kwargs)`` of a sampling mode."""
  if sampling == 'greedy':
    return {'temperature': 0.0}, {'do_sample': False}
  return ({'temperature': 1.0, 'top_p': TOP_P},
          {'do_sample': True, 'temperature': 1.0, 'top_p': TOP_P, 'top_k': 0})


# ------------------------------------------------------------------------- kdjax side


class KdjaxSide:
  """``kdjax.models.generator`` calls on device-resident prompts, counting XLA
  compilations."""

  compiles = 0

  def __init__(self, module, prompts, batches, sampling: str):
    import jax
    import jax.numpy as jnp
    self.jax, self.module = jax, module
    # Each batch size's prompts on the device beforehand (a slice there compiles too).
    self.prompts = {b: tuple(jnp.asarray(a[:b]) for a in prompts) for b in batches}
    self.sampling = sampling
    self.generators = {}
    jax.monitoring.register_event_duration_secs_listener(self._on_event)

  @classmethod
  def _on_event(cls, event: str, *_, **__) -> None:
    if COMPILE_EVENT in event:
      cls.compiles += 1

  def generate(self, batch: int, new: int, sampling: str | None = None):
    """One call on the first ``batch`` prompts; its tokens (waited for)."""
    from kdjax import models
    mode = sampling or self.sampling
    if (new, mode) not in self.generators:
      kw, _ = sampling_kwargs(mode)
      self.generators[new, mode] = models.generator(self.module, max_new_tokens=new,
                                                    pad_id=PAD_ID, **kw)
    ids, mask = self.prompts[batch]
    out = self.generators[new, mode](ids, mask, 0)
    return self.jax.block_until_ready(out.tokens)

  def calls(self, batch: int, new: int, n: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
      self.generate(batch, new)
    return time.perf_counter() - t0


# ------------------------------------------------------------------------- torch side


def load_hf(folder: str, device: str):
  """``transformers.LlamaForCausalLM`` from a local folder: float32, SDPA, eval mode."""
  import torch
  import transformers
  transformers.utils.logging.disable_progress_bar()
  model = transformers.LlamaForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation='sdpa', local_files_only=True)
  return model.to(device).eval()


class TorchSide:
  """``transformers`` ``generate`` on the same prompts; ``compile``: a static cache and
  transformers' automatic ``torch.compile`` of the decoding step (module doc)."""

  def __init__(self, folder: str, prompts, sampling: str, device: str, *, compile: bool):
    import torch
    self.torch, self.device, self.sampling = torch, device, sampling
    self.model = load_hf(folder, device)
    # No stop token on either side: every row decodes max_new_tokens (a checkpoint's
    # end-of-sequence id would end rows early on this side only).
    self.model.generation_config.eos_token_id = None
    self.ids, self.mask = (torch.from_numpy(a).long().to(device) for a in prompts)
    self.extra: dict[str, Any] = {}
    if compile:
      from transformers import CompileConfig
      cc = CompileConfig(fullgraph=True, mode='reduce-overhead' if device == 'cuda' else 'default')
      if device != 'cuda':
        cc._compile_all_devices = True   # transformers' flag to compile on a CPU too
      self.extra = {'cache_implementation': 'static', 'compile_config': cc}

  def generate(self, batch: int, new: int, sampling: str | None = None, threads: int = 0):
    """One call on the first ``batch`` prompts; its new tokens (a tensor, synced)."""
    torch = self.torch
    if threads:
      torch.set_num_threads(threads)
    _, kw = sampling_kwargs(sampling or self.sampling)
    with torch.inference_mode():
      out = self.model.generate(self.ids[:batch], attention_mask=self.mask[:batch],
                                max_new_tokens=new, use_cache=True,
                                pad_token_id=PAD_ID, **kw, **self.extra)
    if self.device == 'cuda':
      torch.cuda.synchronize()
    if out.shape[1] != self.ids.shape[1] + new:
      raise AssertionError(f'transformers generated {out.shape[1] - self.ids.shape[1]} tokens, '
                           f'not {new}')
    return out[:, self.ids.shape[1]:]

  def calls(self, batch: int, new: int, n: int, threads: int) -> float:
    t0 = time.perf_counter()
    for _ in range(n):
      self.generate(batch, new, threads=threads)
    return time.perf_counter() - t0


def child_main(path: str) -> None:
  """The torch-compile runner in its own process: compile every shape (greedy tokens of
  the timed length returned for the parity check), print ``{"ready": ...}``; then answer
  ``run B N T n`` lines (batch, new tokens, threads, calls) with ``{"seconds"}`` until
  ``quit``."""
  import numpy as np
  import torch
  with open(path) as f:
    job = json.load(f)
  torch.set_num_threads(job['threads'][0])
  data = np.load(job['prompts'])
  t0 = time.perf_counter()
  side = TorchSide(job['folder'], (data['ids'], data['mask']), job['sampling'], job['device'],
                   compile=True)
  greedy = {}
  for batch in job['batches']:
    for new in job['lengths']:
      side.generate(batch, new)                 # compiles this shape
      side.generate(batch, new)
    greedy[batch] = side.generate(batch, job['lengths'][0], sampling='greedy').cpu().tolist()
  print(json.dumps({'ready': True, 'setup_and_compile_seconds': time.perf_counter() - t0,
                    'greedy': greedy}), flush=True)
  for line in sys.stdin:
    words = line.split()
    if not words or words[0] == 'quit':
      break
    batch, new, threads, n = map(int, words[1:])
    print(json.dumps({'seconds': side.calls(batch, new, n, threads)}), flush=True)


class CompiledTorchChild(PipeChild):
  """The parent's handle on the torch-compile child (the pipe protocol of
  :func:`child_main`)."""

  def __init__(self, job: dict, workdir: str, timeout: float):
    super().__init__(__file__, job, workdir, timeout, root=ROOT, what='torch compile child')

  def calls(self, batch: int, new: int, n: int, threads: int) -> float:
    return self.ask(f'run {batch} {new} {threads} {n}')['seconds']



# ------------------------------------------------------------------------- parity


def parity(a, b, first: int) -> dict:
  """How two sides' greedy tokens ``[rows, new]`` agree (module doc)."""
  import numpy as np
  a, b = np.asarray(a), np.asarray(b)
  differ = a != b
  prefix = np.where(differ.any(-1), differ.argmax(-1), a.shape[1])
  return {'rows': int(a.shape[0]), 'tokens': int(a.shape[1]), 'first': first,
          'rows_agree_first': float(np.mean(prefix >= first)),
          'rows_agree_all': float(np.mean(prefix == a.shape[1])),
          'mean_agreeing_prefix': float(prefix.mean()),
          'token_agreement': float(1.0 - differ.mean()),
          'distinct_token_fraction': float(len(np.unique(a)) / a.size)}


# ------------------------------------------------------------------------- timing


def calls_for(seconds_per_call: float, min_seconds: float) -> int:
  """Calls in one repeat so that it lasts at least ``min_seconds``."""
  return max(1, math.ceil(min_seconds / max(seconds_per_call, 1e-9)))


def versions() -> dict:
  import importlib.metadata as md
  out = {}
  for pkg in ('jax', 'jaxlib', 'flax', 'numpy', 'torch', 'transformers'):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  return out


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.child:
    child_main(args.child)
    return {}
  if args.device == 'cpu':
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  else:
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')   # torch shares the GPU
  started = datetime.datetime.now(datetime.timezone.utc)
  load_start = os.getloadavg()

  def log(msg: str) -> None:
    print(f'[{time.perf_counter() - _START:6.1f} s] {msg}', flush=True)

  import jax
  import jax.numpy as jnp
  import numpy as np
  import torch
  from flax import nnx
  from kdjax import models
  from kdjax.models.decoding import check_context

  if args.device == 'cuda':
    if jax.default_backend() != 'gpu':
      raise SystemExit(f'--device cuda: JAX has no GPU backend here (it runs on '
                       f'{jax.default_backend()}); install jax[cuda12] or use --device cpu')
    if not torch.cuda.is_available():
      raise SystemExit('--device cuda: this torch build sees no CUDA device; install a CUDA '
                       'torch or use --device cpu')
  # float32 matmuls at full precision on both sides (JAX's GPU default would be TF32).
  jax.config.update('jax_default_matmul_precision', 'highest')
  torch.set_float32_matmul_precision('highest')
  cores = available_cores()
  torch.set_num_threads(args.torch_threads[0])
  plen, new, batches = args.prompt_len, args.new_tokens, args.batches
  first_n = min(args.parity_tokens, new)

  # ---- the model, its weights on both sides, the prompts
  scratch = tempfile.TemporaryDirectory(prefix='kdjax_lm_decode_')   # removed at exit, too
  if args.checkpoint:
    module = models.from_pretrained(args.checkpoint, dtype=jnp.float32)
    folder, weights = args.checkpoint, f'checkpoint {args.checkpoint}'
    sizes = {k: getattr(module.config, k) for k in ('hidden_size', 'num_layers', 'num_heads',
                                                    'num_kv_heads', 'intermediate_size')}
    vocab = module.config.vocab_size
  else:
    sizes, vocab = model_sizes(args.model, args.quick)
    module = models.create('llama', seed=args.seed, num_classes=vocab,
                           input_shape=(plen + new,), **sizes)
    fan_in_init(module, args.seed)
    folder, weights = os.path.join(scratch.name, 'model'), 'random, fan-in scale (module doc)'
    models.save_pretrained(module, folder)
  check_context(plen, new, module.config.max_positions)
  prompts = make_prompts(max(batches), plen, vocab, args.seed)
  prefill = args.prefill == 'on' and new > 1       # with 1 new token the run is the prefill
  lengths = [new, 1] if prefill else [new]

  out: dict[str, Any] = {
      'benchmark': 'lm_decode',
      'date': started.isoformat(timespec='seconds'),
      'command': ' '.join([sys.executable, os.path.relpath(__file__, ROOT),
                           *(sys.argv[1:] if argv is None else argv)]),
      'machine': machine_info(), 'versions': versions(),
      'jax_devices': [str(d) for d in jax.devices()],
      'settings': {'model': args.model, 'quick': args.quick, 'sizes': sizes, 'vocab': vocab,
                   'weights': weights, 'prompt_len': plen, 'new_tokens': new,
                   'batches': batches, 'sampling': args.sampling,
                   'top_p': TOP_P if args.sampling == 'top_p' else None,
                   'repeats': args.repeats, 'min_seconds': args.min_seconds,
                   'device': args.device, 'dtype': 'float32', 'matmul_precision': 'highest',
                   'cores': cores, 'torch_threads': args.torch_threads,
                   'prompt_lengths': prompts[1].sum(-1).tolist(), 'stop_tokens': [],
                   'prefill': prefill, 'parity_tokens': first_n,
                   'parity_min': args.parity_min},
  }
  log(f'kdjax generate vs transformers generate on {out["machine"]["cpu_model"]} ({cores} '
      f'cores), device {args.device} ({out["jax_devices"][0]}), jax {out["versions"]["jax"]}, '
      f'torch {out["versions"]["torch"]} (threads {args.torch_threads}), transformers '
      f'{out["versions"]["transformers"]}, load average {load_start[0]:.1f}')
  log(f'model: {args.model} {sizes}, vocab {vocab}, weights {weights}; prompts {plen} '
      f'columns, {new} new tokens, batches {batches}, {args.sampling}')

  kd = KdjaxSide(module, prompts, batches, args.sampling)
  hf = TorchSide(folder, prompts, args.sampling, args.device, compile=False)
  params = {'kdjax': models.count_params(nnx.state(module, nnx.Param)),
            'torch': sum(p.numel() for p in hf.model.parameters())}
  out['params'] = params
  if params['kdjax'] != params['torch']:
    raise AssertionError(f'parameter counts differ: {params}')

  # ---- first calls: kdjax compiles each shape (timed apart); greedy tokens for parity
  per_batch: dict[int, dict] = {b: {} for b in batches}
  for b in batches:
    first_calls = {}
    for n in lengths:
      c0, t0 = KdjaxSide.compiles, time.perf_counter()
      tokens = kd.generate(b, n)
      first_calls[n] = {'seconds': time.perf_counter() - t0, 'compiles': KdjaxSide.compiles - c0}
      if n == new and args.sampling == 'greedy':
        kd_greedy = np.asarray(tokens)
    if args.sampling != 'greedy':
      kd_greedy = np.asarray(kd.generate(b, new, sampling='greedy'))
    hf_greedy = hf.generate(b, new, sampling='greedy',          # untimed: the fewest threads
                            threads=min(args.torch_threads)).cpu().numpy()
    per_batch[b]['kdjax_first_call_seconds'] = first_calls[new]['seconds']
    per_batch[b]['kdjax_first_call_compiles'] = first_calls[new]['compiles']
    if prefill:
      per_batch[b]['prefill'] = {'kdjax_first_call_seconds': first_calls[1]['seconds']}
    per_batch[b]['parity'] = parity(kd_greedy, hf_greedy, first_n)
    per_batch[b]['_greedy'] = (kd_greedy, hf_greedy)
    pb = per_batch[b]['parity']
    log(f'batch {b}: kdjax first call {first_calls[new]["seconds"]:.2f} s '
        f'({first_calls[new]["compiles"]} compilations); greedy parity: '
        f'{100 * pb["rows_agree_first"]:.0f}% of rows agree on the first {first_n} tokens, '
        f'{100 * pb["rows_agree_all"]:.0f}% on all {new}, mean agreeing prefix '
        f'{pb["mean_agreeing_prefix"]:.1f}, distinct tokens {pb["distinct_token_fraction"]:.2f}')

  # ---- torch compile in a child (optional)
  compiled = None
  compile_info: dict[str, Any] = {'status': 'off (no --torch-compile)'}
  if args.torch_compile:
    log(f'torch compile: compiling in a child process (at most {args.compile_timeout:.0f} s) ...')
    np.savez(os.path.join(scratch.name, 'prompts.npz'), ids=prompts[0], mask=prompts[1])
    job = {'folder': folder, 'prompts': os.path.join(scratch.name, 'prompts.npz'),
           'batches': batches, 'lengths': lengths, 'sampling': args.sampling,
           'device': args.device, 'threads': args.torch_threads}
    child = CompiledTorchChild(job, scratch.name, args.compile_timeout)
    if child.ready is None:
      compile_info = {'status': f'skipped: {child.failure}'}
    else:
      compiled = child
      compile_info = {'status': 'ok',
                      'setup_and_compile_seconds': child.ready['setup_and_compile_seconds']}
      for b in batches:
        ref = per_batch[b]['_greedy'][0]
        per_batch[b]['parity_torch_compile'] = parity(ref, child.ready['greedy'][str(b)], first_n)
    log(f'torch compile: {compile_info["status"]}'
        + (f' ({compile_info["setup_and_compile_seconds"]:.0f} s)' if compiled else ''))
  out['torch_compile'] = compile_info

  # ---- timing: every runner of every batch size interleaved; best repeat and median
  runners: dict[tuple[int, int, str], Callable[[int], float]] = {}
  for b in batches:
    for n in lengths:
      runners[b, n, 'kdjax'] = lambda k, b=b, n=n: kd.calls(b, n, k)
      for t in args.torch_threads:
        runners[b, n, f'torch_t{t}'] = lambda k, b=b, n=n, t=t: hf.calls(b, n, k, t)
        if compiled is not None:
          runners[b, n, f'torch_compile_t{t}'] = (
              lambda k, b=b, n=n, t=t: compiled.calls(b, n, k, t))
  units = {}
  for key, fn in runners.items():            # a warm-up call each, timed: the probe
    units[key] = calls_for(fn(1), args.min_seconds)
  samples: dict[tuple, list[float]] = {k: [] for k in runners}
  loads = []
  timed_compiles = {b: 0 for b in batches}
  try:
    for r in range(args.repeats):
      for key, fn in runners.items():
        b, n, name = key
        c0 = KdjaxSide.compiles
        seconds = fn(units[key])
        if name == 'kdjax':
          timed_compiles[b] += KdjaxSide.compiles - c0
        tokens = b * (n if n == new else plen)     # decode: new tokens; prefill: prompt tokens
        samples[key].append(units[key] * tokens / seconds)
      loads.append(os.getloadavg()[0])
      log(f'repeat {r + 1}/{args.repeats} (load {loads[-1]:.1f}): ' + '; '.join(
          f'b{b} ' + ', '.join(f'{name} {v[-1]:,.0f}' for (bb, n, name), v in samples.items()
                               if bb == b and n == new) for b in batches) + ' new tokens/s')
  finally:
    if compiled is not None:
      compiled.close()

  # ---- figures
  ratios, ratios_median = {}, {}
  for b in batches:
    res = per_batch[b]
    del res['_greedy']
    for n in lengths:
      keyed = {name: v for (bb, nn, name), v in samples.items() if bb == b and nn == n}
      best = {k: max(v) for k, v in keyed.items()}
      med = {k: statistics.median(v) for k, v in keyed.items()}
      torch_names = [k for k in best if k.startswith('torch')]
      best_torch = max(torch_names, key=best.get)
      best_torch_med = max(torch_names, key=med.get)
      figures = {
          'best_torch_variant': best_torch,
          'ratio_vs_torch': best['kdjax'] / best[best_torch],
          'best_torch_variant_median': best_torch_med,
          'ratio_vs_torch_median': med['kdjax'] / med[best_torch_med],
          'samples': keyed,
          'calls_per_repeat': {name: units[b, n, name] for name in keyed},
      }
      if n == new:
        res.update({'new_tokens_per_sec_best': best, 'new_tokens_per_sec_median': med,
                    **figures, 'kdjax_compiles_during_timing': timed_compiles[b]})
        ratios[str(b)], ratios_median[str(b)] = figures['ratio_vs_torch'], figures[
            'ratio_vs_torch_median']
      else:
        res['prefill'].update({'prompt_tokens_per_sec_best': best,
                               'prompt_tokens_per_sec_median': med, **figures})
  rows = sum(per_batch[b]['parity']['rows'] for b in batches)
  agree = sum(per_batch[b]['parity']['rows_agree_first'] * per_batch[b]['parity']['rows']
              for b in batches) / rows
  passed = agree >= args.parity_min
  out.update({
      'statistic': 'best repeat (the least disturbed); medians under *_median',
      'per_batch': {str(b): per_batch[b] for b in batches},
      'ratio_vs_torch': ratios,
      'ratio_vs_torch_median': ratios_median,
      'kdjax_new_tokens_per_sec': {str(b): per_batch[b]['new_tokens_per_sec_best']['kdjax']
                                   for b in batches},
      'torch_new_tokens_per_sec': {str(b): per_batch[b]['new_tokens_per_sec_best'][
          per_batch[b]['best_torch_variant']] for b in batches},
      'kdjax_first_call_seconds': {str(b): per_batch[b]['kdjax_first_call_seconds']
                                   for b in batches},
      'parity': {'first_tokens': first_n, 'rows': rows, 'rows_agree_first': agree,
                 'min': args.parity_min, 'passed': passed},
      'load_average_start': load_start,
      'load_average_per_repeat': loads,
      'load_average_end': os.getloadavg(),
      'wall_seconds': (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds(),
  })
  for b in batches:
    res = per_batch[b]
    line = (f'batch {b}: new tokens/s, best of {args.repeats}: ' + ', '.join(
        f'{k} {v:,.0f}' for k, v in res['new_tokens_per_sec_best'].items())
        + f'; ratio_vs_torch {res["ratio_vs_torch"]:.2f} (vs {res["best_torch_variant"]}; '
        f'medians {res["ratio_vs_torch_median"]:.2f})')
    if prefill:
      pf = res['prefill']
      line += ('; prefill prompt tokens/s: ' + ', '.join(
          f'{k} {v:,.0f}' for k, v in pf['prompt_tokens_per_sec_best'].items())
          + f' (ratio {pf["ratio_vs_torch"]:.2f})')
    log(line)
  log(f'parity: {100 * agree:.1f}% of {rows} rows agree on their first {first_n} greedy '
      f'tokens (at least {100 * args.parity_min:.0f}% required)')
  scratch.cleanup()
  write_json(args.json, out)
  if args.json:
    log(f'wrote {args.json}')
  if not passed:
    log(f'FAILED: fewer than {100 * args.parity_min:.0f}% of rows agree on their first '
        f'{first_n} greedy tokens; the two sides do not decode the same way')
    sys.exit(1)
  return out


if __name__ == '__main__':
  from kdjax.errors import UserError
  try:
    main()
  except UserError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
