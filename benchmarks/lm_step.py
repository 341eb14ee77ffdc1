"""kdjax's token-level KD train step against the same step in PyTorch with ``transformers``.

The language-model demo's pair (``configs/lm/teacher.py`` ``TEACHER``, 4 x 256, and
``configs/lm/student.py`` ``STUDENT``, 2 x 96; Llama-style: RMSNorm, SwiGLU, RoPE,
grouped-query attention, tied embeddings), vocabulary 2048, rows of ``--seq-len``
tokens (256), random initial weights shared by both sides, one training step timed
side by side in one run:

* teacher forward (no gradient) + student forward, loss
  ``0.5 * KL(teacher || student) + 0.5 * CE`` per token (forward KL at T = 1; each a
  mean over the tokens with a target), backward, AdamW update (the demo's optimizer:
  lr 3e-3, weight decay 0.01, gradient clipping at global norm 1.0; the learning rate
  held constant, no warm-up, on both sides).
* **kdjax**: the engine's own run (``kdjax.engine.setup``, what ``kdjax distill`` runs)
  from the demo's distillation config (``configs/lm/token_kd.py``: its loss terms and
  optimizer), the teacher handed in memory and run inside the jitted call as the
  engine's feed does, the data on the device, ``steps_per_call`` steps per jitted call
  (``lax.scan``), the state donated. Attention by ``DecoderConfig.attention_impl``
  (``--attention``: ``auto``, blocked causal attention at this length; ``dense`` for the
  one-matrix path), the tied head's hand-written gradient
  (``kdjax.models.transformer.tied_logits``), and no per-step train accuracy
  (``--train-accuracy off``: the torch step computes none; it takes effect where the
  engine's setup passes ``config.train_accuracy`` to ``make_train_step``).
* **torch eager**: the same weights (kdjax's modules written with
  ``kdjax.models.save_pretrained`` and read by ``transformers.LlamaForCausalLM.
  from_pretrained``, float32, SDPA attention), the loss written in torch
  (``F.kl_div(log_softmax(s), log_softmax(t), log_target=True)`` summed over the
  vocabulary, masked mean, plus masked-mean ``F.cross_entropy``), teacher in ``eval()``
  under ``torch.no_grad()``, ``torch.nn.utils.clip_grad_norm_`` and
  ``torch.optim.AdamW`` (``--torch-adamw``: ``fused`` by default).
* **torch compile**: the same step with the forward and the loss under
  ``torch.compile`` (its backward compiled by AOTAutograd); it runs in a child process
  driven over a pipe, so a compilation that fails, or that takes longer than
  ``--compile-timeout``, is reported and skipped, and its repeats still interleave
  with the others.

Data: random token rows (``x`` = ``r[:, :-1]``, ``label`` = ``r[:, 1:]``), one row in
four with a masked tail (its last quarter or so carries no target: the masked mean
is exercised); no packing (a full causal mask on both sides). Tokens per second
count every position of a row (``batch x seq_len`` per step).

**Fairness check.** The first call's batches (the kdjax feed's positions) are given to
the torch runs too, so every side's first step sees the same batch at the same
weights: the loss each reports for it is printed and must agree to ``--check-tol``
(1e-4 relative in float32), else the run says so and exits 1 after writing its JSON.
The losses of the following steps of that call are recorded too (the same batches and
hyper-parameters: they should stay close).

Threads: ``torch.set_num_threads(cores)`` in every torch process (cores = the CPUs this
process may run on); XLA:CPU uses every core by default. Same dtype on both sides;
float32 matmuls at full precision on both (``--tf32`` allows TF32 on both on a GPU).

Timing (as ``benchmarks/step_throughput.py``): every runner warmed up; the work of one
repeat fixed from a timed probe so that it lasts ``--min-seconds``; repeats of the
runners interleaved. Each runner's figure is its **best** repeat of ``--repeats``, its
median recorded beside it (``*_median``): on a machine shared with other jobs a repeat
can take several times its idle duration, and far more so for torch's OpenMP threads
than for XLA's (a descheduled thread stalls the others at each barrier), so the median
measures the neighbours' load more than either side; the best repeat estimates the
idle machine, from below, for every runner alike. ``ratio_vs_torch`` = kdjax's
tokens/s / the fastest torch variant's (``ratio_vs_torch_median``: the same from the
medians). The load average after each round of repeats is recorded.

FLOPs: MaxText's count (``MaxText/maxtext_utils.py``,
``calculate_tflops_training_per_device``): per token, 2 x every matmul weight (q, k,
v, o, the SwiGLU's three, the LM head) plus causal attention ``2 * seq * heads *
head_dim`` per layer (QK^T and PV, halved for the causal mask), forward; the step is
3 x the student's forward (forward + backward) + 1 x the teacher's. Model FLOPs
utilization (MFU) = those FLOP/s over a matmul peak measured in the run, in its dtype
(``--matmul-n``: the best of ``jnp.dot`` and ``torch.mm``, probed first and after each
round of repeats); on a GPU that peak is the bfloat16 one whatever ``--dtype`` (a
float32 run's MFU is then against the bf16 peak).

    python benchmarks/lm_step.py --json /tmp/lm_step.json            # this CPU, seq 256
    python benchmarks/lm_step.py --tiny --json /tmp/lm_tiny.json     # seconds
    # On a GPU (JAX with CUDA and a CUDA torch in the environment):
    python benchmarks/lm_step.py --device cuda --dtype bfloat16 --json /tmp/lm_gpu.json
    python benchmarks/lm_step.py --device cuda --dtype bfloat16 --large --json /tmp/lm_large.json

``--teacher-sizes`` / ``--student-sizes`` (JSON) override the preset's model sizes, e.g.
the first published run's pair (4 x 256 and 2 x 96)::

    python benchmarks/lm_step.py --json F \
      --teacher-sizes '{"hidden_size": 256, "num_heads": 8, "num_kv_heads": 4, "intermediate_size": 688}' \
      --student-sizes '{"hidden_size": 96, "num_heads": 4, "num_kv_heads": 2, "intermediate_size": 256}'

``--large``: a 144M-parameter student (12 x 1024, 16 heads / 8 key-value heads,
SwiGLU 2816) and a 406M-parameter teacher (16 x 1536, 12 / 4 heads, SwiGLU 4096) at
sequence 1024, for the MFU goal on an accelerator (not run on this CPU).
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import sys
import tempfile
import time
from typing import Any, Callable

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
# --large (MFU on an accelerator): a 100M+ student and a ~3x teacher, Llama-style.
LARGE_STUDENT = dict(hidden_size=1024, num_layers=12, num_heads=16, num_kv_heads=8,
                     intermediate_size=2816, tie_embeddings=True)
LARGE_TEACHER = dict(hidden_size=1536, num_layers=16, num_heads=12, num_kv_heads=4,
                     intermediate_size=4096, tie_embeddings=True)
CHECK_TOL = {'float32': 1e-4, 'bfloat16': 2e-2}


# ------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Setting:
  """What both sides run: sizes, data, optimizer and loss (from the demo's configs)."""

  preset: str                 # 'demo', 'tiny' or 'large'
  vocab: int
  seq_len: int
  batch_size: int
  num_rows: int
  steps_per_call: int
  dtype: str                  # computation dtype: 'float32' or 'bfloat16'
  device: str                 # 'cpu' or 'cuda'
  teacher: dict
  student: dict
  optimizer: dict             # name, learning_rate, weight_decay, grad_clip_norm
  loss_terms: dict            # kdjax loss terms: {'kd': {...}, 'ce': {...}}
  student_seed: int = 0
  teacher_seed: int = 1
  attention_impl: str = 'auto'  # kdjax's DecoderConfig.attention_impl, both models
  train_accuracy: bool = False  # the engine's per-step accuracy (torch computes none)

  @property
  def tokens_per_step(self) -> int:
    return self.batch_size * self.seq_len


def _config_module(name: str):
  from kdjax.config import sibling
  return sibling(os.path.join(LM_CONFIGS, 'teacher.py'), name)


def make_setting(args) -> Setting:
  """The setting of a run from its flags (``--tiny``, ``--large`` or the demo's)."""
  from kdjax.config import load_config_file
  teacher_cfg, student_cfg = _config_module('teacher'), _config_module('student')
  preset = 'tiny' if args.tiny else 'large' if args.large else 'demo'
  sizes = {
      'demo': (teacher_cfg.TEACHER, student_cfg.STUDENT, 2048, 256, 16, 5),
      'tiny': (teacher_cfg.TINY_TEACHER, student_cfg.TINY_STUDENT, 300, 32, 4, 2),
      'large': (LARGE_TEACHER, LARGE_STUDENT, 2048, 1024, 16, 10),
  }[preset]
  teacher, student, vocab, seq_len, batch, spc = sizes
  teacher = {**teacher, **json.loads(args.teacher_sizes or '{}')}
  student = {**student, **json.loads(args.student_sizes or '{}')}
  # The demo's distillation config: its loss terms and its optimizer.
  kd = load_config_file(os.path.join(LM_CONFIGS, 'token_kd.py'))
  terms = kd.loss.terms.to_dict()
  if set(terms) != {'kd', 'ce'} or terms['kd'].get('temperature', 1.0) != 1.0:
    raise SystemExit(f'configs/lm/token_kd.py no longer says kd (T = 1) + ce: {terms}; '
                     'update benchmarks/lm_step.py')
  opt = kd.optimizer
  optimizer = dict(name=opt.name, learning_rate=float(opt.learning_rate),
                   weight_decay=float(opt.weight_decay),
                   grad_clip_norm=float(opt.grad_clip_norm))
  if optimizer['name'] != 'adamw':
    raise SystemExit(f'configs/lm/token_kd.py uses {opt.name}, not adamw; update '
                     'benchmarks/lm_step.py')
  batch = args.batch_size or batch
  spc = args.steps_per_call or spc
  return Setting(preset=preset, vocab=args.vocab or vocab, seq_len=args.seq_len or seq_len,
                 batch_size=batch, num_rows=max(8 * batch, batch * spc), steps_per_call=spc,
                 dtype=args.dtype, device=args.device, teacher=dict(teacher),
                 student=dict(student), optimizer=optimizer, loss_terms=terms,
                 attention_impl=args.attention, train_accuracy=args.train_accuracy == 'on')


def make_rows(setting: Setting, seed: int = 0) -> dict:
  """Random token rows: ``x``, ``label`` (the next tokens), ``mask``, ``id`` (numpy).

  One row in four has a masked tail (about its last quarter has no target).
  """
  import numpy as np
  rng = np.random.default_rng(seed)
  n, length = setting.num_rows, setting.seq_len
  tokens = rng.integers(0, setting.vocab, (n, length + 1)).astype(np.int32)
  mask = np.ones((n, length), bool)
  for row in range(0, n, 4):
    mask[row, length - 1 - rng.integers(0, max(1, length // 2)):] = False
  return {'x': tokens[:, :-1].copy(), 'label': tokens[:, 1:].copy(), 'mask': mask,
          'id': np.arange(n, dtype=np.int32)}


def model_flops_per_token(sizes: dict, vocab: int, seq_len: int) -> float:
  """Forward FLOPs per token of a Llama-style decoder (MaxText's count, module doc)."""
  d, layers, heads = sizes['hidden_size'], sizes['num_layers'], sizes['num_heads']
  kv = sizes.get('num_kv_heads') or heads
  hd = sizes.get('head_dim') or d // heads
  inter = sizes.get('intermediate_size') or 4 * d
  qkv = 2 * d * (heads + 2 * kv) * hd
  out = 2 * heads * hd * d
  mlp = 2 * 3 * d * inter                 # SwiGLU: gate, up, down
  attention = 2 * seq_len * heads * hd    # 4 * seq * heads * hd, halved (causal)
  return float(layers * (qkv + out + mlp + attention) + 2 * d * vocab)


def step_flops_per_token(setting: Setting) -> dict:
  """``{'student_forward', 'teacher_forward', 'step'}``: step = 3 x student + teacher."""
  s = model_flops_per_token(setting.student, setting.vocab, setting.seq_len)
  t = model_flops_per_token(setting.teacher, setting.vocab, setting.seq_len)
  return {'student_forward': s, 'teacher_forward': t, 'step': 3 * s + t}


# ------------------------------------------------------------------------- kdjax side


def jax_dtype(name: str):
  import jax.numpy as jnp
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


def kdjax_config(setting: Setting):
  """The distill config: ``configs/lm/token_kd.py``'s, with this benchmark's sizes."""
  from kdjax.config import load_config_file
  c = load_config_file(os.path.join(LM_CONFIGS, 'token_kd.py'))
  c.seed = setting.student_seed
  c.data.name = 'lm_step'
  c.data.feed = 'device'
  c.model.name = 'llama'
  c.model.kwargs = dict(setting.student, attention_impl=setting.attention_impl)
  c.model.dtype = setting.dtype
  c.batch_size = setting.batch_size
  c.num_steps = 10 ** 9                 # never reached: the benchmark times calls
  c.steps_per_call = c.log_every = setting.steps_per_call
  c.eval_every = c.checkpoint_every = 10 ** 9
  c.progress = False
  c.mesh = [('data', 1)]
  c.optimizer.schedule = 'constant'     # torch's AdamW keeps its rate too
  c.optimizer.warmup_steps = 0
  c.teacher.devices = 0                 # the teacher inside the student's call
  if 'train_accuracy' in c:             # the torch step counts no accuracy either
    c.train_accuracy = setting.train_accuracy
  return c


@dataclasses.dataclass
class KdjaxRun:
  """The engine's run and its compiled call of ``steps_per_call`` steps."""

  run: Any                    # kdjax.engine.Setup
  state: Any
  compiled: Any
  steps_per_call: int
  compile_seconds: float
  step: int = 0

  def call(self):
    """One call; returns its per-step metrics (not waited for)."""
    self.state, metrics = self.compiled(self.state,
                                        self.run.feed.inputs(self.step, self.steps_per_call))
    self.step += self.steps_per_call
    return metrics

  def calls(self, n: int) -> None:
    import jax
    for _ in range(n):
      self.call()
    jax.block_until_ready(self.state)


def kdjax_modules(setting: Setting):
  """``(teacher, student)`` nnx modules: the teacher with random weights, the student
  abstract (``nnx.eval_shape``; it gets the weights the engine's ``init`` makes)."""
  from flax import nnx
  from kdjax import models
  kw = dict(num_classes=setting.vocab, input_shape=(setting.seq_len,),
            dtype=jax_dtype(setting.dtype), attention_impl=setting.attention_impl)
  teacher = models.create('llama', seed=setting.teacher_seed, **kw, **setting.teacher)
  student = nnx.eval_shape(lambda: models.create('llama', seed=setting.student_seed, **kw,
                                                 **setting.student))
  return teacher, student


def kdjax_setup(setting: Setting, rows: dict, teacher_module, log) -> tuple[KdjaxRun, Any]:
  """kdjax's run, built by the engine's own setup with the teacher and the rows in
  memory, its call of ``steps_per_call`` steps compiled. Returns ``(run, positions)``:
  the rows of the first call's batches ``[steps_per_call, batch]`` (the torch runs
  take the same)."""
  import jax
  import jax.numpy as jnp
  from kdjax import models
  from kdjax.data import DatasetSpec
  from kdjax.engine import Data
  from kdjax.engine import setup
  from kdjax.teacher import Teacher

  t_apply, t_params, t_state = models.functional(teacher_module)
  spec = DatasetSpec('lm_step', (setting.seq_len,), setting.vocab, {'train': setting.num_rows},
                     'int32')
  teacher = Teacher(t_apply, (t_params, t_state), setting.vocab, None, 0, '')
  evals = {k: v[:setting.batch_size] for k, v in rows.items()}
  run = setup(kdjax_config(setting), teacher=teacher, data=Data(spec, rows, evals),
              log=lambda msg: log(f'kdjax setup: {msg}'))
  state = run.init()
  k = setting.steps_per_call
  inputs = run.feed.inputs(0, k)
  source = run.feed.source
  positions = jax.jit(lambda src: jnp.stack(
      [source.batches(src, k)(i)['position'] for i in range(k)]))(inputs['source'])
  t0 = time.perf_counter()
  compiled = run.calls.jitted(k).lower(state, inputs).compile()
  compile_seconds = time.perf_counter() - t0
  return KdjaxRun(run, state, compiled, k, compile_seconds), jax.device_get(positions)


def matmul_peak_jax(n: int, dtype: str) -> Callable[[int], float]:
  """``probe(reps)``: the best FLOP/s of ``reps`` jitted ``jnp.dot`` of two ``n x n``
  matrices of ``dtype`` (compiled and warmed up here)."""
  import jax
  a = jax.random.normal(jax.random.key(0), (n, n), jax_dtype(dtype))
  b = jax.random.normal(jax.random.key(1), (n, n), jax_dtype(dtype))
  dot = jax.jit(lambda a, b: a @ b)
  jax.block_until_ready(dot(a, b))

  def probe(reps: int) -> float:
    best = math.inf
    for _ in range(reps):
      t0 = time.perf_counter()
      jax.block_until_ready(dot(a, b))
      best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best

  return probe


# ------------------------------------------------------------------------- torch side


def torch_dtype(name: str):
  import torch
  return {'float32': torch.float32, 'bfloat16': torch.bfloat16}[name]


def torch_sync(device: str) -> None:
  import torch
  if device == 'cuda':
    torch.cuda.synchronize()


def kd_ce_loss(student_logits, teacher_logits, labels, mask, *, kd_weight: float,
               ce_weight: float, temperature: float = 1.0):
  """The objective in torch: ``kd_weight * mean KL(t || s) * T^2 + ce_weight * mean CE``,
  each a mean over the tokens where ``mask`` is True."""
  import torch.nn.functional as F
  s, t = student_logits.float(), teacher_logits.float()
  log_q = F.log_softmax(s / temperature, dim=-1)
  log_p = F.log_softmax(t / temperature, dim=-1)
  kl = F.kl_div(log_q, log_p, reduction='none', log_target=True).sum(-1) * temperature ** 2
  ce = F.cross_entropy(s.flatten(0, 1), labels.flatten(), reduction='none').view_as(kl)
  w = mask.to(kl.dtype)
  n = w.sum().clamp_min(1.0)
  return kd_weight * (kl * w).sum() / n + ce_weight * (ce * w).sum() / n


def load_hf(folder: str, device: str):
  """A ``transformers.LlamaForCausalLM`` from a local folder, float32 weights."""
  import torch
  import transformers
  transformers.utils.logging.disable_progress_bar()
  model = transformers.LlamaForCausalLM.from_pretrained(
      folder, dtype=torch.float32, attn_implementation='sdpa', local_files_only=True)
  return model.to(device)


class TorchRun:
  """The training step a PyTorch user writes for this distillation, on tensors kept on
  the device; ``compile``: the forward and the loss under ``torch.compile``."""

  def __init__(self, setting: Setting, folders: dict, rows: dict, *, compile: bool,
               adamw: str):
    import numpy as np
    import torch
    self.torch, self.setting, self.device = torch, setting, setting.device
    self.teacher = load_hf(folders['teacher'], self.device).eval().requires_grad_(False)
    self.student = load_hf(folders['student'], self.device).train()
    to = lambda a: torch.from_numpy(np.asarray(a)).to(self.device)
    self.x, self.y, self.mask = to(rows['x']).long(), to(rows['label']).long(), to(rows['mask'])
    opt = setting.optimizer
    kw = {'fused': True} if adamw == 'fused' else {'foreach': True} if adamw == 'foreach' else {}
    self.opt = torch.optim.AdamW(self.student.parameters(), lr=opt['learning_rate'],
                                 betas=(0.9, 0.999), eps=1e-8,
                                 weight_decay=opt['weight_decay'], **kw)
    self.clip = opt['grad_clip_norm']
    terms = setting.loss_terms
    self.weights = dict(kd_weight=float(terms['kd'].get('weight', 1.0)),
                        ce_weight=float(terms['ce'].get('weight', 1.0)),
                        temperature=float(terms['kd'].get('temperature', 1.0)))
    self.autocast = setting.dtype != 'float32'
    self.loss_fn = torch.compile(self._loss) if compile else self._loss
    self.generator = torch.Generator().manual_seed(0)
    self._order, self._at = None, 0

  def _loss(self, ids, labels, mask):
    with self.torch.no_grad():
      t = self.teacher(input_ids=ids, use_cache=False).logits
    s = self.student(input_ids=ids, use_cache=False).logits
    return kd_ce_loss(s, t, labels, mask, **self.weights)

  def step(self, idx):
    """One training step on rows ``idx``; returns the loss (a tensor, not synced)."""
    torch = self.torch
    with torch.autocast(self.device, dtype=torch_dtype(self.setting.dtype),
                        enabled=self.autocast):
      loss = self.loss_fn(self.x[idx], self.y[idx], self.mask[idx])
    loss.backward()
    if self.clip:
      torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.clip)
    self.opt.step()
    self.opt.zero_grad(set_to_none=True)
    return loss.detach()

  def next_rows(self):
    """Rows of the next batch: a fresh random permutation each epoch."""
    b, n = self.setting.batch_size, self.setting.num_rows
    if self._order is None or self._at + b > n:
      self._order, self._at = self.torch.randperm(n, generator=self.generator), 0
    idx = self._order[self._at:self._at + b].to(self.device)
    self._at += b
    return idx

  def steps(self, n: int) -> None:
    for _ in range(n):
      self.step(self.next_rows())
    torch_sync(self.device)

  def first_steps(self, positions) -> list[float]:
    """The steps of kdjax's first call, on its batches; their losses."""
    torch = self.torch
    losses = [self.step(torch.tensor(p, dtype=torch.long).to(self.device))
              for p in positions]
    return [float(v) for v in losses]


def matmul_peak_torch(n: int, dtype: str, device: str) -> Callable[[int], float]:
  """``probe(reps)``: the best FLOP/s of ``reps`` ``torch.mm`` of two ``n x n`` matrices."""
  import torch
  a = torch.randn(n, n, device=device).to(torch_dtype(dtype))
  b = torch.randn(n, n, device=device).to(torch_dtype(dtype))
  torch.mm(a, b)
  torch_sync(device)

  def probe(reps: int) -> float:
    best = math.inf
    for _ in range(reps):
      t0 = time.perf_counter()
      torch.mm(a, b)
      torch_sync(device)
      best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best

  return probe


def count_torch_params(module) -> int:
  return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------- torch.compile child


def child_main(path: str) -> None:
  """The ``torch compile`` runner in its own process: set up, run kdjax's first call's
  steps (compiling), print ``{"ready": ...}``; then answer ``steps N`` lines with
  ``{"seconds", "cpu_seconds"}`` until ``quit``."""
  import numpy as np
  import torch
  with open(path) as f:
    job = json.load(f)
  setting = Setting(**job['setting'])
  torch.set_num_threads(job['threads'])
  if job.get('tf32'):
    torch.set_float32_matmul_precision('high')
  data = np.load(job['rows'])
  rows = {k: data[k] for k in data.files}
  t0 = time.perf_counter()
  run = TorchRun(setting, job['folders'], rows, compile=True, adamw=job['adamw'])
  losses = run.first_steps(data['positions'])
  torch_sync(setting.device)
  reply = {'ready': True, 'setup_and_compile_seconds': time.perf_counter() - t0,
           'losses': losses, 'threads': torch.get_num_threads()}
  print(json.dumps(reply), flush=True)
  for line in sys.stdin:
    words = line.split()
    if not words or words[0] == 'quit':
      break
    n = int(words[1])
    c0, t0 = time.process_time(), time.perf_counter()
    run.steps(n)
    print(json.dumps({'seconds': time.perf_counter() - t0,
                      'cpu_seconds': time.process_time() - c0}), flush=True)


class CompiledTorchChild(PipeChild):
  """The parent's handle on the ``torch compile`` child (a pipe protocol, see
  :func:`child_main`)."""

  def __init__(self, job: dict, workdir: str, timeout: float):
    super().__init__(__file__, job, workdir, timeout, root=ROOT, what='torch compile child')

  def steps(self, n: int) -> dict:
    return self.ask(f'steps {n}')



# ------------------------------------------------------------------------- timing


def steps_for(seconds_per_unit: float, min_seconds: float) -> int:
  """Units (calls or steps) so that one repeat lasts at least ``min_seconds``."""
  return max(1, math.ceil(min_seconds / max(seconds_per_unit, 1e-9)))


def versions() -> dict:
  import importlib.metadata as md
  out = {}
  for pkg in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch', 'transformers'):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--json', help='write every figure to this JSON file')
  p.add_argument('--device', choices=('cpu', 'cuda'), default='cpu',
                 help='where both sides run (JAX on its GPU backend; torch on cuda)')
  p.add_argument('--dtype', choices=('float32', 'bfloat16'), default='float32',
                 help='computation dtype on both sides (parameters stay float32; torch: '
                      'autocast)')
  size = p.add_mutually_exclusive_group()
  size.add_argument('--tiny', action='store_true',
                    help="the configs' tiny models, vocabulary 300, 32 tokens (seconds)")
  size.add_argument('--large', action='store_true',
                    help='a 144M student and a 406M teacher at 1024 tokens (accelerators)')
  p.add_argument('--seq-len', type=int, help='tokens per row (default 256; --tiny 32, '
                 '--large 1024)')
  p.add_argument('--vocab', type=int, help='vocabulary size (default 2048; --tiny 300)')
  p.add_argument('--batch-size', type=int, help='rows per step (default 16; --tiny 4)')
  p.add_argument('--steps-per-call', type=int,
                 help="kdjax's steps per jitted call (default 5; --tiny 2, --large 10)")
  p.add_argument('--repeats', type=int, default=12, help='timed repeats per runner')
  p.add_argument('--min-seconds', type=float, default=None,
                 help='the least duration of one repeat (default 3; --tiny 0.2)')
  p.add_argument('--compile', choices=('on', 'off'), default='on',
                 help='also time the torch.compile variant (in a child process)')
  p.add_argument('--compile-timeout', type=float, default=900.0,
                 help='seconds the torch.compile child may take to set up and compile')
  p.add_argument('--torch-adamw', choices=('fused', 'foreach', 'default'), default='fused',
                 help="torch.optim.AdamW's implementation ('default': torch's choice)")
  p.add_argument('--tf32', action='store_true',
                 help='float32 matmuls in TF32 on both sides (GPU; default: full float32)')
  p.add_argument('--check-tol', type=float, default=None,
                 help='relative tolerance of the first-step loss check (default 1e-4 in '
                      'float32, 2e-2 in bfloat16)')
  p.add_argument('--attention', choices=('auto', 'dense', 'blocked'), default='auto',
                 help="kdjax's attention (DecoderConfig.attention_impl) in both models")
  p.add_argument('--train-accuracy', choices=('on', 'off'), default='off',
                 help="the engine's per-step train accuracy (config.train_accuracy); the "
                      'torch step computes none')
  p.add_argument('--teacher-sizes', help='JSON of DecoderConfig sizes overriding the '
                 "preset teacher's, e.g. '{\"hidden_size\": 256, \"intermediate_size\": 688}'")
  p.add_argument('--student-sizes', help="JSON overriding the preset student's sizes")
  p.add_argument('--matmul-n', type=int, default=None,
                 help='size of the peak matmul (default 2048 on a CPU, 8192 on a GPU)')
  p.add_argument('--child', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  for name in ('seq_len', 'vocab', 'batch_size', 'steps_per_call', 'repeats'):
    value = getattr(args, name)
    if value is not None and value < 1:
      p.error(f'--{name.replace("_", "-")} must be >= 1')
  if args.min_seconds is None:
    args.min_seconds = 0.2 if args.tiny else 3.0
  if args.matmul_n is None:
    args.matmul_n = 8192 if args.device == 'cuda' else (256 if args.tiny else 2048)
  return args


def main(argv=None) -> dict:
  args = parse_args(argv)
  if args.child:
    child_main(args.child)
    return {}
  if args.device == 'cpu':
    os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  else:
    # JAX takes its GPU memory as it needs it: torch shares the device (and the child).
    os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
  started = datetime.datetime.now(datetime.timezone.utc)
  load_start = os.getloadavg()

  def log(msg: str) -> None:
    print(msg, flush=True)

  import jax
  import numpy as np
  import torch
  from flax import nnx
  from kdjax import models

  if args.device == 'cuda':
    if jax.default_backend() != 'gpu':
      raise SystemExit(f'--device cuda: JAX has no GPU backend here (it runs on '
                       f'{jax.default_backend()}); install jax[cuda12] or use --device cpu')
    if not torch.cuda.is_available():
      raise SystemExit('--device cuda: this torch build sees no CUDA device; install a CUDA '
                       'torch or use --device cpu')
  # float32 matmuls: full precision on both sides (JAX's GPU default would be TF32,
  # torch's is full), or TF32 on both with --tf32. bfloat16 matmuls are left as they are.
  precision = 'default'
  if args.dtype == 'float32':
    precision = 'tensorfloat32' if args.tf32 else 'highest'
    jax.config.update('jax_default_matmul_precision', precision)
  torch.set_float32_matmul_precision('high' if args.tf32 else 'highest')
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  torch.set_num_threads(cores)
  setting = make_setting(args)
  tol = args.check_tol if args.check_tol is not None else CHECK_TOL[setting.dtype]
  tok = setting.tokens_per_step

  out: dict[str, Any] = {
      'benchmark': 'lm_step',
      'date': started.isoformat(timespec='seconds'),
      'command': ' '.join([sys.executable, os.path.relpath(__file__, ROOT),
                           *(sys.argv[1:] if argv is None else argv)]),
      'machine': machine_info(), 'versions': versions(),
      'jax_devices': [str(d) for d in jax.devices()],
      'torch_threads': torch.get_num_threads(),
      'settings': {**dataclasses.asdict(setting), 'tokens_per_step': tok,
                   'matmul_precision': precision, 'torch_adamw': args.torch_adamw,
                   'repeats': args.repeats, 'min_seconds': args.min_seconds,
                   'check_tol': tol, 'data': 'random tokens, 1 row in 4 with a masked tail'},
  }
  log(f'kdjax vs PyTorch token-KD LM step on {out["machine"]["cpu_model"]} ({cores} cores), '
      f'device {args.device} ({out["jax_devices"][0]}), jax {out["versions"]["jax"]}, torch '
      f'{out["versions"]["torch"]} ({torch.get_num_threads()} threads), transformers '
      f'{out["versions"]["transformers"]}, load average {load_start[0]:.1f}')
  log(f'setting: {setting.preset}, vocab {setting.vocab}, seq {setting.seq_len}, batch '
      f'{setting.batch_size} ({tok:,} tokens/step), {setting.dtype}, kdjax '
      f'{setting.steps_per_call} steps per call; loss {setting.loss_terms}; '
      f'optimizer {setting.optimizer}')

  # ---- the measured matmul peak (bfloat16 on a GPU, the run's dtype on a CPU): probed
  # here and again after each round of repeats, the best kept (a busy moment lowers it)
  peak_dtype = 'bfloat16' if args.device == 'cuda' else setting.dtype
  probes = {'jax': matmul_peak_jax(args.matmul_n, peak_dtype),
            'torch': matmul_peak_torch(args.matmul_n, peak_dtype, args.device)}
  peaks = {k: probe(10) for k, probe in probes.items()}
  log(f'matmul peak ({args.matmul_n}^2 {peak_dtype}): jnp.dot {peaks["jax"] / 1e9:,.1f} '
      f'GFLOP/s, torch.mm {peaks["torch"] / 1e9:,.1f} GFLOP/s (probed again after each round)')

  # ---- the same random weights on both sides
  rows = make_rows(setting)
  scratch = tempfile.TemporaryDirectory(prefix='kdjax_lm_step_')   # removed at exit, too
  workdir = scratch.name
  t_module, s_module = kdjax_modules(setting)
  log('kdjax: setting up the engine and compiling its call ...')
  kd_run, positions = kdjax_setup(setting, rows, t_module, log)
  # The engine made the student from config.seed; write those very weights.
  nnx.update(s_module, jax.device_get(kd_run.state.params['student']))
  folders = {'teacher': os.path.join(workdir, 'teacher'),
             'student': os.path.join(workdir, 'student')}
  models.save_pretrained(t_module, folders['teacher'])
  models.save_pretrained(s_module, folders['student'])
  log(f'kdjax: compiled in {kd_run.compile_seconds:.1f} s')

  t0 = time.perf_counter()
  eager = TorchRun(setting, folders, rows, compile=False, adamw=args.torch_adamw)
  params = {'teacher_kdjax': models.count_params(nnx.state(t_module, nnx.Param)),
            'student_kdjax': models.count_params(nnx.state(s_module, nnx.Param)),
            'teacher_torch': count_torch_params(eager.teacher),
            'student_torch': count_torch_params(eager.student)}
  out['params'] = params
  if (params['teacher_kdjax'] != params['teacher_torch']
      or params['student_kdjax'] != params['student_torch']):
    raise AssertionError(f'parameter counts differ: {params}')
  log(f'parameters: teacher {params["teacher_kdjax"]:,}, student {params["student_kdjax"]:,} '
      f'(kdjax = transformers); torch set up in {time.perf_counter() - t0:.1f} s')

  # ---- the first call: warm-up and the fairness check (same batches, same weights)
  t0 = time.perf_counter()
  metrics = jax.device_get(kd_run.call())
  kd_first = time.perf_counter() - t0
  # What the engine did (it counts the accuracy unless its setup passes the config's field).
  out['settings']['kdjax_train_accuracy_computed'] = 'accuracy' in metrics
  s, c = metrics['loss']
  losses = {'kdjax': [float(a) / max(float(b), 1.0) for a, b in zip(s, c)]}
  losses['torch_eager'] = eager.first_steps(positions)
  compiled = None
  compile_info: dict[str, Any] = {'status': 'off (--compile off)'}
  if args.compile == 'on':
    log(f'torch compile: compiling in a child process (at most {args.compile_timeout:.0f} s) ...')
    np.savez(os.path.join(workdir, 'rows.npz'), positions=positions, **rows)
    job = {'setting': dataclasses.asdict(setting), 'folders': folders, 'threads': cores,
           'rows': os.path.join(workdir, 'rows.npz'), 'adamw': args.torch_adamw,
           'tf32': args.tf32}
    child = CompiledTorchChild(job, workdir, args.compile_timeout)
    if child.ready is None:
      compile_info = {'status': f'skipped: {child.failure}'}
      log(f'torch compile: {compile_info["status"]}')
    else:
      compiled = child
      losses['torch_compile'] = child.ready['losses']
      compile_info = {'status': 'ok', 'setup_and_compile_seconds':
                      child.ready['setup_and_compile_seconds'],
                      'child_threads': child.ready['threads']}
      log(f'torch compile: set up and compiled in '
          f'{child.ready["setup_and_compile_seconds"]:.1f} s')
  out['torch_compile'] = compile_info

  first = {k: v[0] for k, v in losses.items()}
  ref = first['torch_eager']
  rel = {k: abs(v - ref) / max(abs(ref), 1e-12) for k, v in first.items() if k != 'torch_eager'}
  rel['kdjax_vs_torch_eager'] = rel.pop('kdjax')
  if 'torch_compile' in rel:
    rel['torch_compile_vs_torch_eager'] = rel.pop('torch_compile')
    rel['kdjax_vs_torch_compile'] = (abs(first['kdjax'] - first['torch_compile'])
                                     / max(abs(first['torch_compile']), 1e-12))
  passed = all(v < tol for v in rel.values())
  out['loss_check'] = {'first_step_loss': first, 'rel_diff': rel, 'tol': tol, 'passed': passed,
                       'first_call_losses': losses}
  log('first step, same batch and weights: loss ' + ', '.join(
      f'{k} {v:.7f}' for k, v in first.items()) + '; relative difference ' + ', '.join(
      f'{k} {v:.1e}' for k, v in rel.items()) + f' ({"within" if passed else "NOT within"} '
      f'{tol:g})')
  log('first call, step by step: ' + '; '.join(
      f'{k} ' + ' '.join(f'{v:.5f}' for v in vals) for k, vals in losses.items()))

  # ---- timing: runners interleaved; each runner's fastest repeat and its median
  runners: dict[str, tuple[Callable[[int], float], int]] = {}

  def timed_local(fn):
    def run(n):
      t0 = time.perf_counter()
      fn(n)
      return time.perf_counter() - t0
    return run

  runners['kdjax'] = (timed_local(kd_run.calls), setting.steps_per_call * tok)
  runners['torch_eager'] = (timed_local(eager.steps), tok)
  if compiled is not None:
    runners['torch_compile'] = (lambda n: compiled.steps(n)['seconds'], tok)
  samples: dict[str, list[float]] = {k: [] for k in runners}
  loads = []
  units = {}
  for name, (fn, per_unit) in runners.items():
    fn(1)                                        # one more warm-up unit
    probe = fn(1)
    units[name] = steps_for(probe, args.min_seconds)
    log(f'{name}: {probe:.2f} s per {"call" if name == "kdjax" else "step"} '
        f'-> {units[name]} per repeat')
  try:
    for r in range(args.repeats):
      for name, (fn, per_unit) in runners.items():
        samples[name].append(units[name] * per_unit / fn(units[name]))
      loads.append(os.getloadavg()[0])
      peaks = {k: max(peaks[k], probe(3)) for k, probe in probes.items()}
      log(f'repeat {r + 1}/{args.repeats}: ' + ', '.join(
          f'{k} {v[-1]:,.0f}' for k, v in samples.items()) + f' tokens/s (load {loads[-1]:.1f})')
  finally:
    if compiled is not None:
      compiled.close()

  peak = max(peaks.values())
  out['matmul_peak'] = {'dtype': peak_dtype, 'n': args.matmul_n, 'flops': peak,
                        'jax_flops': peaks['jax'], 'torch_flops': peaks['torch']}
  best = {k: max(v) for k, v in samples.items()}
  med = {k: statistics.median(v) for k, v in samples.items()}
  torch_names = [k for k in best if k.startswith('torch')]
  best_torch = max(torch_names, key=best.get)
  best_torch_median = max(torch_names, key=med.get)
  flops = step_flops_per_token(setting)
  out.update({
      'statistic': 'best repeat (the least disturbed); medians under *_median',
      'kdjax_tokens_per_sec': best['kdjax'],
      'torch_eager_tokens_per_sec': best['torch_eager'],
      'torch_compile_tokens_per_sec': best.get('torch_compile'),
      'best_torch_variant': best_torch,
      'ratio_vs_torch': best['kdjax'] / best[best_torch],
      'ratio_vs_torch_eager': best['kdjax'] / best['torch_eager'],
      'tokens_per_sec_best': best,
      'tokens_per_sec_median': med,
      'best_torch_variant_median': best_torch_median,
      'ratio_vs_torch_median': med['kdjax'] / med[best_torch_median],
      'tokens_per_sec_samples': samples,
      'load_average_per_repeat': loads,
      'units_per_repeat': units,
      'kdjax_compile_seconds': kd_run.compile_seconds,
      'kdjax_first_call_seconds': kd_first,
      'flops_per_token': flops,
      'mfu': {k: v * flops['step'] / peak for k, v in best.items()},
      'mfu_median': {k: v * flops['step'] / peak for k, v in med.items()},
  })
  out['mfu_against'] = f'{peak_dtype} matmul peak {peak / 1e12:.3f} TFLOP/s (measured)'
  log(f'tokens/s, best of {args.repeats}: ' + ', '.join(f'{k} {v:,.0f}' for k, v in best.items())
      + '; median: ' + ', '.join(f'{k} {v:,.0f}' for k, v in med.items()))
  log(f'ratio_vs_torch = kdjax / {best_torch} = {out["ratio_vs_torch"]:.2f} (vs torch eager '
      f'{out["ratio_vs_torch_eager"]:.2f}; medians: {out["ratio_vs_torch_median"]:.2f} vs '
      f'{best_torch_median}); goal >= 2')
  log(f'model FLOPs/token: student fwd {flops["student_forward"] / 1e6:.2f} M, teacher fwd '
      f'{flops["teacher_forward"] / 1e6:.2f} M, step {flops["step"] / 1e6:.2f} M; MFU vs '
      f'{out["mfu_against"]}: ' + ', '.join(f'{k} {100 * v:.1f}%' for k, v in out['mfu'].items()))
  out['load_average_start'] = load_start
  out['load_average_end'] = os.getloadavg()
  out['wall_seconds'] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
  scratch.cleanup()
  write_json(args.json, out)
  if args.json:
    log(f'wrote {args.json}')
  if not passed:
    log('FAILED: the two sides do not compute the same loss on the first batch; the '
        'comparison is not fair')
    sys.exit(1)
  return out


if __name__ == '__main__':
  main()
