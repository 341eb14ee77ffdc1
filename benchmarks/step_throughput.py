"""kdjax's distillation step against the same KD training loop in PyTorch, on this CPU.

Two teacher -> student pairs, each timed side by side in one process:

* ``mnist1d``: teacher ``cnn1d`` -> student ``mlp`` (kdjax's defaults), batch 256, Adam
  (lr 1e-3, constant), loss 0.9 KD(T=4) + 0.1 CE, the real MNIST-1D train split
  (4000 signals) kept in memory.
* ``resnet``: teacher ``resnet32x4`` -> student ``resnet8x4`` at 32x32x3, 10 classes,
  batch 32, SGD (lr 0.05, momentum 0.9, weight decay 5e-4), loss 1.0 CE + 0.9 KD(T=4)
  (kdjax's CIFAR-10 KD config), 2048 synthetic random images, no augmentation on
  either side.

kdjax side: what ``kdjax distill`` runs, built by kdjax's own setup
(``kdjax.engine.setup`` from the pair's config, the teacher's random weights and the
data handed in memory; device-fed, ``steps_per_call`` steps per jitted call as the
loop calls it), once per convolution lowering asked for (the models' ``conv_impl``
option: ``xla``, ``patches``, or ``T/S`` for teacher and student apart), each with the
student on one device and also with the teacher on a second device one call ahead
(``config.teacher.devices=1``: the engine's ``TeacherAhead`` feed; on a CPU the process
gets ``JAX_NUM_CPU_DEVICES=2``, one device per core, unless ``--no-teacher-apart``); the
fastest is reported, each is recorded.

PyTorch side: modules written to match kdjax's models layer by layer (parameter counts
checked equal; kdjax's initial weights are copied in and the logits and the loss of one
batch checked equal), teacher in ``eval()`` under ``torch.no_grad()``, torchdistill's
``KDLoss`` (``alpha`` = CE weight, ``beta`` = KD weight), ``torch.optim`` with the same
hyper-parameters, tensors in memory indexed by a fresh random permutation each epoch.
Torch runs with ``torch.set_num_threads(cores)`` and, also, 1 thread: on a machine shared
with other processes a multi-threaded torch step can be many times slower, so the
faster of the two is the reference (both are recorded).

Pair 1 is also timed with the teacher's logits precomputed on both sides (kdjax's step
reads them from the batch, the dense form of its teacher cache; exact here because
nothing is augmented), and with the teacher's forward alone over the same batches. Those
figures are reported apart from the headline ratio, in ``parts``: a live step does both
parts, so ``1 / (1/teacher + 1/student)`` (the serial bound) says how fast it could be if
the two parts ran one after the other with no other cost, and what ratio against torch
that would give.

Timing: everything is warmed up; the work of one repeat is fixed from a timed probe so
that a repeat lasts at least ``--min-seconds``; kdjax and torch repeats are interleaved
(a burst of load from other processes hits both) and the median of ``--repeats`` is
kept. A runner whose single call takes over ``--slow-seconds`` is timed once. CPU
seconds per step (``time.process_time``) are recorded next to the rates.

FLOPs per step: XLA's cost analysis of the compiled unfused step (XLA counts a
``lax.scan`` body once, so the fused call's figure is about one step, not
``steps_per_call`` steps; it is recorded too), cross-checked with an analytic count
(teacher forward + 3 x student forward, conv and linear layers, padding taps included,
which XLA leaves out). FLOP/s are given as a fraction of a float32 ``jnp.dot`` peak
(``--matmul-n``, best of 10) measured in the same run; torch's with the same count.

    python benchmarks/step_throughput.py --json /tmp/bench.json
    python benchmarks/step_throughput.py --quick --json /tmp/quick.json   # seconds
    python benchmarks/step_throughput.py --sweep --json /tmp/bench.json   # + engine options

``--sweep`` also times pair 1 (kdjax only) under other engine options, in child
processes: steps per call, no batch sharding constraint, no donation and the conv
lowering compiled side by side in one child; XLA CPU flags and a one-core affinity
(XLA sizes its thread pool to it) one child each, since XLA reads them once per process.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench_common import machine_info  # noqa: E402  (benchmarks/bench_common.py)
from bench_common import write_json  # noqa: E402


# ------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class Pair:
  """One teacher -> student benchmark setting, shared by both sides."""

  key: str
  teacher: str
  student: str
  teacher_kwargs: dict
  student_kwargs: dict
  input_shape: tuple[int, ...]
  num_classes: int
  batch_size: int
  num_examples: int
  data: str                 # 'real' (the MNIST-1D train split) or 'synthetic'
  optimizer: dict
  loss_terms: dict


MNIST1D_LOSS = {'kd': {'weight': 0.9, 'temperature': 4.0}, 'ce': {'weight': 0.1}}
CIFAR_LOSS = {'ce': {'weight': 1.0}, 'kd': {'weight': 0.9, 'temperature': 4.0}}
ADAM = dict(name='adam', learning_rate=1e-3, schedule='constant', warmup_steps=0,
            weight_decay=0.0, momentum=0.9, grad_clip_norm=0.0, decay_steps=[0],
            decay_factor=0.1)
SGD = dict(ADAM, name='sgd', learning_rate=0.05, weight_decay=5e-4)


def make_pairs(args) -> dict[str, Pair]:
  """The two settings, full size or (``--quick``) shrunk to seconds."""
  if args.quick:
    small_t = {'depth': 8, 'widths': (8, 8, 16, 16)}
    small_s = {'widths': (4, 4, 4, 4)}
    return {
        'mnist1d': Pair('mnist1d', 'cnn1d', 'mlp', {}, {}, (40, 1), 10, 64,
                        4000 if args.mnist1d_data == 'real' else 512, args.mnist1d_data,
                        ADAM, MNIST1D_LOSS),
        'resnet': Pair('resnet', 'resnet32x4', 'resnet8x4', small_t, small_s, (8, 8, 3), 10,
                       4, 32, 'synthetic', SGD, CIFAR_LOSS),
    }
  return {
      'mnist1d': Pair('mnist1d', 'cnn1d', 'mlp', {}, {}, (40, 1), 10, args.batch_size,
                      4000 if args.mnist1d_data == 'real' else 4000, args.mnist1d_data,
                      ADAM, MNIST1D_LOSS),
      'resnet': Pair('resnet', 'resnet32x4', 'resnet8x4', {}, {}, (32, 32, 3), 10,
                     args.resnet_batch_size, 2048, 'synthetic', SGD, CIFAR_LOSS),
  }


def load_data(pair: Pair, seed: int = 0) -> dict:
  """``{'x', 'label', 'id'}`` numpy arrays, channels last (kdjax's layout)."""
  import numpy as np
  if pair.data == 'real':
    from kdjax import data as kdata
    arrays = kdata.load_arrays('mnist1d', 'train')
    return {k: arrays[k][:pair.num_examples] for k in ('x', 'label', 'id')}
  rng = np.random.default_rng(seed)
  n = pair.num_examples
  return {'x': rng.standard_normal((n, *pair.input_shape), dtype=np.float32),
          'label': rng.integers(0, pair.num_classes, n).astype(np.int32),
          'id': np.arange(n, dtype=np.int32)}


# ------------------------------------------------------------------------- kdjax side


@dataclasses.dataclass
class KdjaxRun:
  """kdjax's own run (``kdjax.engine.setup``) and the state it trains, ``steps_per_call``
  steps per call, as ``kdjax distill``'s loop calls it."""

  run: Any                    # kdjax.engine.Setup
  state: Any
  steps_per_call: int
  batch_size: int
  fused_call_flops: float | None
  compile_seconds: float
  step: int = 0

  def calls(self, n: int) -> None:
    import jax
    run, state, k = self.run, self.state, self.steps_per_call
    for _ in range(n):
      state, _ = run.calls(state, run.feed.inputs(self.step, k), k)
      self.step += k
    jax.block_until_ready(state)
    self.state = state


class MemoryCache:
  """Precomputed dense teacher logits in memory, in the form the engine's device feed
  takes a teacher cache (``kdjax.engine.setup.CachedTeacher``): one cached epoch,
  gathered with each batch (the ``cached teacher`` runner)."""

  def __init__(self, logits):
    self.logits = logits
    self.epochs, self.nbytes = 1, int(logits.nbytes)

  def check(self, config, *, num_classes, needs):
    del config, num_classes, needs

  def check_arrays(self, arrays):
    assert len(arrays['label']) == len(self.logits)

  def columns(self, needs):
    del needs
    return {'teacher_logits': self.logits[None]}

  def join(self, columns, epoch, positions):
    import jax.numpy as jnp
    del epoch
    return {'teacher_logits': jnp.take(columns['teacher_logits'][0], positions, axis=0)}

  def sample(self, needs):
    del needs
    return {'teacher_logits': self.logits[:2]}


def _xla_flops(compiled) -> float | None:
  cost = compiled.cost_analysis()
  if isinstance(cost, (list, tuple)):
    cost = cost[0] if cost else None
  if not cost or 'flops' not in cost:
    return None
  return float(cost['flops'])


def split_conv_impl(conv_impl: str) -> tuple[str, str]:
  """``'xla'`` -> ``('xla', 'xla')``; ``'xla/patches'`` -> teacher xla, student patches."""
  teacher, _, student = conv_impl.partition('/')
  return teacher, student or teacher


def kdjax_models(pair: Pair, conv_impl: str):
  """``(teacher, student)`` as ``(apply, params, state)`` from kdjax's model zoo.

  ``conv_impl`` is kdjax's ``conv_impl`` model option, one for both models or
  ``'TEACHER/STUDENT'``; models without convolutions ignore it.
  """
  from kdjax import models
  t_impl, s_impl = split_conv_impl(conv_impl)
  extra = {} if pair.teacher in ('mlp',) else {'conv_impl': t_impl}
  teacher = models.functional(models.create(
      pair.teacher, num_classes=pair.num_classes, input_shape=pair.input_shape, seed=1,
      **{**pair.teacher_kwargs, **extra}))
  extra = {} if pair.student in ('mlp',) else {'conv_impl': s_impl}
  student = models.functional(models.create(
      pair.student, num_classes=pair.num_classes, input_shape=pair.input_shape, seed=0,
      **{**pair.student_kwargs, **extra}))
  return teacher, student


def kdjax_config(pair: Pair, *, steps_per_call: int, conv_impl: str, teacher_apart: bool):
  """The distill config of a pair, as a ``configs/`` file would write it."""
  from kdjax.engine.config import base_config
  _, s_impl = split_conv_impl(conv_impl)
  c = base_config()
  c.seed = 0                                  # the student's initialization
  c.num_steps = 10 ** 9                       # never reached: the benchmark times calls
  c.batch_size = pair.batch_size
  c.steps_per_call = c.log_every = steps_per_call
  c.eval_every = c.checkpoint_every = 10 ** 9
  c.progress = False
  c.mesh = [('data', 1)]                      # the student on one device (the CPU default)
  c.model.name = pair.student
  c.model.kwargs = {**pair.student_kwargs,
                    **({} if pair.student in ('mlp',) else {'conv_impl': s_impl})}
  c.optimizer = dict(pair.optimizer)
  c.loss.terms = dict(pair.loss_terms)
  c.data.feed = 'device'
  c.teacher.devices = 1 if teacher_apart else 0
  return c


def kdjax_setup(pair: Pair, arrays: dict, *, steps_per_call: int, conv_impl: str = 'xla',
                want_step_flops: bool = False, teacher_apart: bool = False,
                teacher_logits=None):
  """kdjax's run of a pair, built by kdjax's own setup (``kdjax.engine.setup``, what
  ``kdjax distill`` calls) from the pair's config, with the teacher (random weights) and
  the data in memory, and its call of ``steps_per_call`` steps compiled.

  ``teacher_apart``: the teacher on the last device, one call ahead
  (``config.teacher.devices=1``). ``teacher_logits``: the teacher's logits precomputed,
  fed as a dense teacher cache (the teacher does not run). Returns ``(KdjaxRun,
  xla_flops_per_step or None, objects)``; ``objects`` holds the models and objective for
  the equivalence check.
  """
  import jax
  from kdjax.data import DatasetSpec
  from kdjax.engine import Data
  from kdjax.engine import setup
  from kdjax.teacher import Teacher

  (t_apply, t_params, t_state), _ = kdjax_models(pair, conv_impl)
  config = kdjax_config(pair, steps_per_call=steps_per_call, conv_impl=conv_impl,
                        teacher_apart=teacher_apart)
  spec = DatasetSpec(pair.key, tuple(pair.input_shape), pair.num_classes,
                     {'train': len(arrays['label'])})
  evals = {k: v[:pair.batch_size] for k, v in arrays.items()}
  teacher = Teacher(t_apply, (t_params, t_state), pair.num_classes, None, 0, '')
  cache = None if teacher_logits is None else MemoryCache(teacher_logits)
  run = setup(config, teacher=teacher if cache is None else None, cache=cache,
              data=Data(spec, arrays, evals), log=lambda msg: None)
  state = run.init()
  inputs = run.feed.inputs(0, steps_per_call)
  t0 = time.perf_counter()
  compiled = run.calls.jitted(steps_per_call).lower(state, inputs).compile()
  compile_seconds = time.perf_counter() - t0
  step_flops = None
  if want_step_flops:
    # XLA's cost analysis counts a while loop's body once (not times its trip count),
    # so the call's figure is about one step; a call of one step gives it exactly.
    step_flops = _xla_flops(run.calls.jitted(1).lower(state, run.feed.inputs(0, 1)).compile())
  objects = dict(teacher=(t_apply, t_params, t_state),
                 student=(run.apply, jax.device_get(state.params['student']),
                          jax.device_get(state.model_state)),
                 objective=run.objective,
                 loss_vars=jax.device_get((state.params['loss'], state.loss_state)))
  if teacher_apart:
    run.feed.ahead._pending.clear()   # the lowering above asked the teacher for step 0
  bench = KdjaxRun(run, state, steps_per_call, pair.batch_size, _xla_flops(compiled),
                   compile_seconds)
  return bench, step_flops, objects


def matmul_peak_jax(n: int, reps: int) -> float:
  """Best FLOP/s of a jitted float32 ``jnp.dot`` of two ``n x n`` matrices."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.key(0), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.key(1), (n, n), jnp.float32)
  dot = jax.jit(jnp.dot)
  jax.block_until_ready(dot(a, b))
  best = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    jax.block_until_ready(dot(a, b))
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


# ------------------------------------------------------------------------- torch side


def torch_modules():
  """PyTorch mirrors of kdjax's ``mlp``, ``cnn1d`` and CIFAR ResNets (channels first).

  Attribute names follow kdjax's parameter paths (``hidden.0``, ``convs.1``,
  ``stages.0.0.conv1``, ``head``), so kdjax's weights can be copied in by name.
  """
  import torch
  from torch import nn

  class MLP(nn.Module):
    def __init__(self, in_dim, num_classes, hidden=(100, 100)):
      super().__init__()
      sizes = (in_dim, *hidden)
      self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
      self.head = nn.Linear(sizes[-1], num_classes)

    def forward(self, x):
      h = torch.flatten(x, 1)
      for lin in self.hidden:
        h = torch.relu(lin(h))
      return self.head(h)

  class CNN1d(nn.Module):
    """kdjax ``cnn1d``: 3 stride-2 convs (kernel 5, pad 2, bias), ReLU, flatten, linear."""

    def __init__(self, length, in_ch, num_classes, channels=(32, 32, 32), kernel=5, stride=2):
      super().__init__()
      convs, c = [], in_ch
      for c_out in channels:
        convs.append(nn.Conv1d(c, c_out, kernel, stride, kernel // 2))
        length = (length + 2 * (kernel // 2) - kernel) // stride + 1
        c = c_out
      self.convs = nn.ModuleList(convs)
      self.final_length, self.final_channels = length, c
      self.head = nn.Linear(c * length, num_classes)

    def forward(self, x):
      h = x
      for conv in self.convs:
        h = torch.relu(conv(h))
      return self.head(torch.flatten(h, 1))

  class BasicBlock(nn.Module):
    def __init__(self, c_in, c_out, stride):
      super().__init__()
      self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(c_out)
      self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
      self.bn2 = nn.BatchNorm2d(c_out)
      if stride != 1 or c_in != c_out:
        self.shortcut_conv = nn.Conv2d(c_in, c_out, 1, stride, 0, bias=False)
        self.shortcut_bn = nn.BatchNorm2d(c_out)
      else:
        self.shortcut_conv = self.shortcut_bn = None

    def forward(self, x):
      y = torch.relu(self.bn1(self.conv1(x)))
      y = self.bn2(self.conv2(y))
      if self.shortcut_conv is not None:
        x = self.shortcut_bn(self.shortcut_conv(x))
      return torch.relu(y + x)

  class ResNetCifar(nn.Module):
    def __init__(self, in_ch, num_classes, depth, widths):
      super().__init__()
      n = (depth - 2) // 6
      self.stem_conv = nn.Conv2d(in_ch, widths[0], 3, 1, 1, bias=False)
      self.stem_bn = nn.BatchNorm2d(widths[0])
      stages, c = [], widths[0]
      for s, c_out in enumerate(widths[1:]):
        blocks = []
        for b in range(n):
          blocks.append(BasicBlock(c, c_out, 2 if (s > 0 and b == 0) else 1))
          c = c_out
        stages.append(nn.ModuleList(blocks))
      self.stages = nn.ModuleList(stages)
      self.head = nn.Linear(c, num_classes)

    def forward(self, x):
      h = torch.relu(self.stem_bn(self.stem_conv(x)))
      for stage in self.stages:
        for block in stage:
          h = block(h)
      return self.head(h.mean((2, 3)))

  return MLP, CNN1d, ResNetCifar


_RESNETS = {'resnet8x4': (8, (32, 64, 128, 256)), 'resnet32x4': (32, (32, 64, 128, 256))}


def torch_model(name: str, pair: Pair, kwargs: dict):
  MLP, CNN1d, ResNetCifar = torch_modules()
  if name == 'mlp':
    return MLP(math.prod(pair.input_shape), pair.num_classes, **kwargs)
  if name == 'cnn1d':
    return CNN1d(pair.input_shape[0], pair.input_shape[1], pair.num_classes, **kwargs)
  if name in _RESNETS:
    depth, widths = _RESNETS[name]
    depth, widths = kwargs.get('depth', depth), kwargs.get('widths', widths)
    return ResNetCifar(pair.input_shape[-1], pair.num_classes, depth, tuple(widths))
  raise ValueError(f'no PyTorch mirror for {name!r}')


def copy_kdjax_weights(module, params, state) -> None:
  """Loads kdjax ``(params, state)`` into the mirror ``module``; every tensor must be set."""
  import jax
  import numpy as np
  import torch
  from kdjax.parallel import path_str

  leaf_names = {'kernel': 'weight', 'scale': 'weight', 'bias': 'bias', 'mean': 'running_mean',
                'var': 'running_var'}
  flat = {}
  for tree in (params, state):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
      name = path_str(path)
      parent, _, leaf_name = name.rpartition('/')
      if leaf_name in leaf_names and hasattr(leaf, 'shape') and leaf.dtype == np.float32:
        flat[parent.replace('/', '.') + '.' + leaf_names[leaf_name]] = np.array(leaf)
  targets = {k: v for k, v in module.state_dict().items() if not k.endswith('num_batches_tracked')}
  missing = sorted(set(targets) - set(flat))
  if missing:
    raise AssertionError(f'torch tensors with no kdjax counterpart: {missing}')
  for name, value in flat.items():
    if name not in targets:
      raise AssertionError(f'kdjax tensor {name} has no torch counterpart')
    if value.ndim == 2 and name.endswith('head.weight') and hasattr(module, 'final_length'):
      # kdjax flattens [B, L, C] (position-major), torch [B, C, L] (channel-major).
      length, channels = module.final_length, module.final_channels
      value = value.reshape(length, channels, -1).transpose(1, 0, 2).reshape(length * channels, -1)
    if value.ndim == 2:                       # Linear [in, out] -> [out, in]
      value = value.T
    elif value.ndim == 3:                     # Conv1d [k, in, out] -> [out, in, k]
      value = value.transpose(2, 1, 0)
    elif value.ndim == 4:                     # Conv2d [kh, kw, in, out] -> [out, in, kh, kw]
      value = value.transpose(3, 2, 0, 1)
    if tuple(value.shape) != tuple(targets[name].shape):
      raise AssertionError(f'{name}: kdjax {value.shape} vs torch {tuple(targets[name].shape)}')
    with torch.no_grad():
      targets[name].copy_(torch.from_numpy(np.ascontiguousarray(value)))


def to_torch_layout(x):
  """Channels last (kdjax) -> channels first (PyTorch) as a contiguous tensor."""
  import numpy as np
  import torch
  return torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))


class TorchRun:
  """The KD training loop a PyTorch user writes, on tensors kept in memory."""

  def __init__(self, pair: Pair, arrays: dict, teacher, student, *, cache_teacher: bool = False):
    import torch
    from torchdistill.losses.mid_level import KDLoss
    self.torch = torch
    self.x = to_torch_layout(arrays['x'])
    self.y = torch.from_numpy(arrays['label']).long()
    self.teacher, self.student = teacher.eval(), student.train()
    opt = pair.optimizer
    if opt['name'] == 'adam':
      self.opt = torch.optim.Adam(student.parameters(), lr=opt['learning_rate'])
    else:
      self.opt = torch.optim.SGD(student.parameters(), lr=opt['learning_rate'],
                                 momentum=opt['momentum'], weight_decay=opt['weight_decay'])
    terms = pair.loss_terms
    self.loss = KDLoss('head', 'output', 'head', 'output',
                       temperature=terms['kd']['temperature'], alpha=terms['ce']['weight'],
                       beta=terms['kd']['weight'])
    self.batch_size = pair.batch_size
    self.steps_per_epoch = len(self.y) // self.batch_size
    self._batches = self._iterate()
    self.cached_logits = None
    if cache_teacher:  # the teacher's logits for every example, computed once
      with torch.no_grad():
        self.cached_logits = torch.cat([teacher(xb) for xb in torch.split(self.x, 1024)])

  def _iterate(self):
    torch, b = self.torch, self.batch_size
    while True:
      perm = torch.randperm(len(self.y))
      for i in range(self.steps_per_epoch):
        yield perm[i * b:(i + 1) * b]

  def step(self):
    torch = self.torch
    idx = next(self._batches)
    x, y = self.x[idx], self.y[idx]
    if self.cached_logits is not None:
      teacher_logits = self.cached_logits[idx]
    else:
      with torch.no_grad():
        teacher_logits = self.teacher(x)
    student_logits = self.student(x)
    loss = self.loss({'head': {'output': student_logits}}, {'head': {'output': teacher_logits}}, y)
    self.opt.zero_grad(set_to_none=True)
    loss.backward()
    self.opt.step()
    return loss

  def steps(self, n: int) -> None:
    for _ in range(n):
      self.step()

  def teacher_steps(self, n: int) -> None:
    """The teacher's forward alone on ``n`` batches (the other part of a live step)."""
    with self.torch.no_grad():
      for _ in range(n):
        self.teacher(self.x[next(self._batches)])


def conv_linear_flops(module, x) -> float:
  """2 x multiply-adds of every Conv/Linear in one forward pass of ``module`` on ``x``."""
  import torch
  from torch import nn
  total = [0.0]

  def hook(mod, inputs, out):
    if isinstance(mod, (nn.Conv1d, nn.Conv2d)):
      total[0] += 2.0 * out.numel() * (mod.in_channels // mod.groups) * math.prod(mod.kernel_size)
    elif isinstance(mod, nn.Linear):
      total[0] += 2.0 * out.numel() * mod.in_features

  handles = [m.register_forward_hook(hook) for m in module.modules()
             if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.Linear))]
  was_training = module.training
  module.eval()
  with torch.no_grad():
    module(x)
  module.train(was_training)
  for h in handles:
    h.remove()
  return total[0]


def matmul_peak_torch(n: int, reps: int) -> float:
  import torch
  a, b = torch.randn(n, n), torch.randn(n, n)
  torch.mm(a, b)
  best = math.inf
  for _ in range(reps):
    t0 = time.perf_counter()
    torch.mm(a, b)
    best = min(best, time.perf_counter() - t0)
  return 2.0 * n**3 / best


# ------------------------------------------------------------------------- checks


def check_equivalence(pair: Pair, arrays: dict, objects: dict, teacher, student) -> dict:
  """kdjax and the torch mirrors on one batch, from the same weights: logits and loss."""
  import jax
  import numpy as np
  import torch
  from torchdistill.losses.mid_level import KDLoss

  n = min(8, pair.batch_size)
  x, y = arrays['x'][:n], arrays['label'][:n]
  t_apply, t_params, t_state = objects['teacher']
  s_apply, s_params, s_state = objects['student']
  t_logits = np.asarray(jax.jit(lambda p, s, x: t_apply(p, s, x, train=False)[0].logits)(
      t_params, t_state, x))
  s_logits = np.asarray(jax.jit(lambda p, s, x: s_apply(p, s, x, train=True)[0].logits)(
      s_params, s_state, x))
  loss_inputs = {'student_logits': s_logits, 'teacher_logits': t_logits, 'labels': y,
                 'where': np.ones((n,), bool), 'step': 0}
  kd_loss = float(objects['objective'].apply(*objects['loss_vars'], loss_inputs)[0])

  xt = to_torch_layout(x)
  teacher.eval()
  student.train()
  with torch.no_grad():
    tt = teacher(xt)
    st = student(xt)  # train mode: batch statistics, as kdjax's train=True
    terms = pair.loss_terms
    crit = KDLoss('head', 'output', 'head', 'output', temperature=terms['kd']['temperature'],
                  alpha=terms['ce']['weight'], beta=terms['kd']['weight'])
    torch_loss = float(crit({'head': {'output': st}}, {'head': {'output': tt}},
                            torch.from_numpy(y).long()))

  def rel(a, b):
    return float(np.max(np.abs(a - b)) / max(1e-6, float(np.max(np.abs(b)))))

  out = {'teacher_logits_rel_diff': rel(tt.numpy(), t_logits),
         'student_logits_rel_diff': rel(st.numpy(), s_logits),
         'loss_kdjax': kd_loss, 'loss_torch': torch_loss,
         'loss_rel_diff': abs(kd_loss - torch_loss) / max(1e-6, abs(torch_loss))}
  worst = max(out['teacher_logits_rel_diff'], out['student_logits_rel_diff'], out['loss_rel_diff'])
  if not worst < 1e-3:
    raise AssertionError(f'{pair.key}: the torch mirror does not compute what kdjax does: {out}')
  return out


def count_torch_params(module) -> int:
  return sum(p.numel() for p in module.parameters())


# ------------------------------------------------------------------------- timing


def steps_for(seconds_per_unit: float, min_seconds: float) -> int:
  """Units (calls or steps) so that one repeat lasts at least ``min_seconds``."""
  return max(1, math.ceil(min_seconds / max(seconds_per_unit, 1e-9)))


def time_once(fn: Callable[[int], None], n: int) -> float:
  t0 = time.perf_counter()
  fn(n)
  return time.perf_counter() - t0


def bench_pair(pair: Pair, args, *, impls: list[str], log) -> dict:
  """Times kdjax (one run per conv implementation) and torch on one pair, interleaved."""
  import torch

  arrays = load_data(pair)
  res: dict[str, Any] = {'pair': dataclasses.asdict(pair)}
  runs, objects, objects_by_impl = {}, None, {}
  # The FLOP count of the step is XLA's for the plain convolution lowering (the same
  # arithmetic as the other lowerings); it is used for every runner, torch included.
  flops_impl = 'xla' if 'xla' in impls else impls[0]
  res['compile_seconds'] = {}
  import jax
  for impl in impls:
    log(f'[{pair.key}] kdjax: compiling the fused call (conv_impl={impl}, '
        f'steps_per_call={args_spc(pair, args)}) ...')
    run, flops, objs = kdjax_setup(pair, arrays, steps_per_call=args_spc(pair, args),
                                   conv_impl=impl, want_step_flops=impl == flops_impl)
    objects = objects or objs
    objects_by_impl[impl] = objs
    if impl == flops_impl:
      res['xla_flops_per_step'] = flops
      res['xla_flops_per_fused_call'] = run.fused_call_flops
      res['xla_flops_conv_impl'] = impl
    res['compile_seconds'][impl] = run.compile_seconds
    runs[impl] = run
    if args.teacher_apart and jax.device_count() >= 2:
      # config.teacher.devices=1: the teacher on the second device, one call ahead.
      log(f'[{pair.key}] kdjax: compiling the fused call, teacher on its own device '
          f'(conv_impl={impl}) ...')
      runs[f'{impl},teacher apart'] = kdjax_setup(
          pair, arrays, steps_per_call=args_spc(pair, args), conv_impl=impl,
          teacher_apart=True)[0]

  teacher = torch_model(pair.teacher, pair, pair.teacher_kwargs)
  student = torch_model(pair.student, pair, pair.student_kwargs)
  t_apply, t_params, t_state = objects['teacher']
  s_apply, s_params, s_state = objects['student']
  from kdjax.models import count_params
  res['params'] = {
      'teacher_kdjax': count_params(t_params), 'teacher_torch': count_torch_params(teacher),
      'student_kdjax': count_params(s_params), 'student_torch': count_torch_params(student)}
  p = res['params']
  if p['teacher_kdjax'] != p['teacher_torch'] or p['student_kdjax'] != p['student_torch']:
    raise AssertionError(f'{pair.key}: parameter counts differ: {p}')
  log(f'[{pair.key}] parameters: teacher {pair.teacher} {p["teacher_kdjax"]:,} (kdjax) = '
      f'{p["teacher_torch"]:,} (torch); student {pair.student} {p["student_kdjax"]:,} = '
      f'{p["student_torch"]:,}')
  copy_kdjax_weights(teacher, t_params, t_state)
  copy_kdjax_weights(student, s_params, s_state)
  if args.check:
    res['equivalence'] = check_equivalence(pair, arrays, objects, teacher, student)
    e = res['equivalence']
    log(f'[{pair.key}] same weights, one batch: max rel. diff teacher logits '
        f'{e["teacher_logits_rel_diff"]:.1e}, student logits {e["student_logits_rel_diff"]:.1e}, '
        f'loss {e["loss_kdjax"]:.5f} (kdjax) vs {e["loss_torch"]:.5f} (torch)')

  x1 = to_torch_layout(arrays['x'][:1])
  t_fwd = conv_linear_flops(teacher, x1)
  s_fwd = conv_linear_flops(student, x1)
  res['analytic_flops_per_step'] = pair.batch_size * (t_fwd + 3.0 * s_fwd)
  res['analytic_teacher_fwd_flops_per_example'] = t_fwd
  res['analytic_student_fwd_flops_per_example'] = s_fwd

  trun = TorchRun(pair, arrays, teacher, student)
  cached_runs = {}
  if args.cached_teacher and pair.key == 'mnist1d':
    # kdjax's step takes the teacher's logits from the batch when it carries them (the
    # teacher cache's dense form): computed once here, gathered with each batch. Exact
    # here because neither side augments; torch gets the same shortcut.
    t0 = time.perf_counter()
    logits = teacher_logits_kdjax(objects['teacher'], arrays['x'])
    res['kdjax_teacher_logits_seconds'] = time.perf_counter() - t0
    log(f'[{pair.key}] kdjax: compiling the fused call with the teacher logits precomputed ...')
    cached_runs['kdjax[cached teacher]'], _, _ = kdjax_setup(
        pair, arrays, steps_per_call=args_spc(pair, args), conv_impl='xla',
        teacher_logits=logits)
    t0 = time.perf_counter()
    cached_trun = TorchRun(pair, arrays, teacher, student, cache_teacher=True)
    res['torch_teacher_logits_seconds'] = time.perf_counter() - t0
    # The other part of a live step: the teacher's forward alone over the same batches.
    for impl, objs in objects_by_impl.items():
      cached_runs[f'kdjax[teacher forward,{impl}]'] = TeacherOnlyRun(
          objs['teacher'], arrays, pair.batch_size, args_spc(pair, args))

  # Runners: name -> (do n units, examples per unit). Warm each up, then fix the work of
  # one repeat from a timed probe so that a repeat lasts at least --min-seconds. A runner
  # whose single call takes longer than --slow-seconds keeps its probe as its only sample.
  runners: dict[str, tuple[Callable[[int], None], int]] = {}
  for impl, run in runs.items():
    runners[f'kdjax[{impl}]'] = (run.calls, run.steps_per_call * pair.batch_size)
  for threads in torch_thread_counts(args):
    def torch_steps(n, threads=threads):
      torch.set_num_threads(threads)
      trun.steps(n)
    runners[f'torch[{threads}t]'] = (torch_steps, pair.batch_size)
  for name, run in cached_runs.items():
    runners[name] = (run.calls, run.steps_per_call * pair.batch_size)
  if cached_runs:
    for threads in torch_thread_counts(args):
      def torch_cached_steps(n, threads=threads):
        torch.set_num_threads(threads)
        cached_trun.steps(n)
      runners[f'torch[cached teacher,{threads}t]'] = (torch_cached_steps, pair.batch_size)

      def torch_teacher_steps(n, threads=threads):
        torch.set_num_threads(threads)
        trun.teacher_steps(n)
      runners[f'torch[teacher forward,{threads}t]'] = (torch_teacher_steps, pair.batch_size)

  samples: dict[str, list[float]] = {name: [] for name in runners}
  cpu: dict[str, list[float]] = {name: [] for name in runners}   # CPU seconds per step

  def timed(name, n):
    fn, per_unit = runners[name]
    c0, t0 = time.process_time(), time.perf_counter()
    fn(n)
    dt, dc = time.perf_counter() - t0, time.process_time() - c0
    samples[name].append(n * per_unit / dt)
    cpu[name].append(dc / (n * per_unit / pair.batch_size))
    return dt

  units, once = {}, set()
  for name, (fn, per_unit) in runners.items():
    if name.startswith('torch'):
      fn(args.torch_warmup_steps)
      probe_units = max(1, args_spc(pair, args))
    else:
      fn(1)
      probe_units = 1
    probe = timed(name, probe_units) / probe_units
    if probe > args.slow_seconds:
      once.add(name)
      log(f'[{pair.key}] {name}: {probe:.1f} s per call, timed once')
    else:
      samples[name].clear()
      cpu[name].clear()
    units[name] = steps_for(probe, args.min_seconds)

  for r in range(args.repeats):
    for name in runners:
      if name not in once:
        timed(name, units[name])
    log(f'[{pair.key}] repeat {r + 1}/{args.repeats}: ' + ', '.join(
        f'{k} {v[-1]:,.1f}' for k, v in samples.items()) + ' ex/s')
  torch.set_num_threads(torch_thread_counts(args)[0])

  med = {k: statistics.median(v) for k, v in samples.items()}
  part = lambda n: 'cached' in n or 'teacher forward' in n
  kd_names = [n for n in runners if n.startswith('kdjax') and not part(n)]
  th_names = [n for n in runners if n.startswith('torch') and not part(n)]
  best_kd = max(kd_names, key=med.get)
  best_th = max(th_names, key=med.get)
  default_kd = 'kdjax[xla]' if 'kdjax[xla]' in med else kd_names[0]
  res['timed_units_per_repeat'] = units
  res['examples_per_sec_samples'] = samples
  res['examples_per_sec_median'] = med
  res['cpu_seconds_per_step_median'] = {k: statistics.median(v) for k, v in cpu.items()}
  res['kdjax_variant'] = best_kd[len('kdjax['):-1]
  res['kdjax_conv_impl'] = res['kdjax_variant'].split(',')[0]
  res['kdjax_teacher_apart'] = res['kdjax_variant'].endswith('teacher apart')
  res['kdjax_examples_per_sec'] = med[best_kd]
  res['kdjax_examples_per_sec_default_conv_impl'] = med[default_kd]
  res['torch_threads'] = int(best_th[len('torch['):-2])
  res['torch_examples_per_sec'] = med[best_th]
  res['torch_examples_per_sec_all_cores'] = med[th_names[0]]
  res['ratio_vs_torch'] = med[best_kd] / med[best_th]
  res['ratio_vs_torch_by_runner'] = {k: med[k] / med[best_th] for k in kd_names}
  # The literal setting: kdjax's default conv lowering against torch on every core.
  res['ratio_default_vs_torch_all_cores'] = med[default_kd] / med[th_names[0]]
  if cached_runs:
    th_cached = max((n for n in runners if n.startswith('torch[cached')), key=med.get)
    kd_cached = med['kdjax[cached teacher]']
    res['cached_teacher'] = {
        'kdjax_examples_per_sec': kd_cached,
        'torch_examples_per_sec': med[th_cached],
        'torch_threads': int(th_cached.rsplit(',', 1)[1][:-2]),
        'ratio_vs_torch_cached': kd_cached / med[th_cached],
        'ratio_vs_torch_live_teacher': kd_cached / med[best_th],
    }
    res['parts'] = serial_parts(med, best_kd, best_th)
  return res


def serial_parts(med: dict, best_kd: str, best_th: str) -> dict:
  """A live step against its two parts timed alone: the teacher's forward, and the
  student step fed precomputed teacher logits. ``serial_bound`` = 1 / (1/teacher + 1/student)
  is what a step doing the two one after the other, with no other cost, would reach."""
  impl = best_kd[len('kdjax['):-1].split(',')[0]
  kd_t = med.get(f'kdjax[teacher forward,{impl}]') or max(
      v for k, v in med.items() if k.startswith('kdjax[teacher forward'))
  kd_s = med['kdjax[cached teacher]']
  threads = best_th[len('torch['):-2]
  th_t = med[f'torch[teacher forward,{threads}t]']
  th_s = med[f'torch[cached teacher,{threads}t]']
  bound = lambda a, b: 1.0 / (1.0 / a + 1.0 / b)
  out = {'kdjax_teacher_forward': kd_t, 'kdjax_student_step': kd_s,
         'kdjax_serial_bound': bound(kd_t, kd_s), 'torch_teacher_forward': th_t,
         'torch_student_step': th_s, 'torch_serial_bound': bound(th_t, th_s)}
  out['kdjax_live_over_serial_bound'] = med[best_kd] / out['kdjax_serial_bound']
  out['torch_live_over_serial_bound'] = med[best_th] / out['torch_serial_bound']
  out['teacher_forward_ratio'] = kd_t / th_t
  out['student_step_ratio'] = kd_s / th_s
  out['ratio_vs_torch_at_kdjax_serial_bound'] = out['kdjax_serial_bound'] / med[best_th]
  return out


class TeacherOnlyRun:
  """The teacher's eval forward alone over shuffled batches, ``steps`` per jitted call."""

  def __init__(self, teacher, arrays: dict, batch_size: int, steps: int):
    import jax
    import jax.numpy as jnp
    t_apply, t_params, t_state = teacher
    n = len(arrays['label'])
    per_epoch = n // batch_size

    def run(variables, x, key):
      perm = jax.random.permutation(key, n)

      def body(acc, i):
        idx = jax.lax.dynamic_slice(perm, ((i % per_epoch) * batch_size,), (batch_size,))
        out, _ = t_apply(*variables, jnp.take(x, idx, axis=0), train=False)
        return acc + jnp.sum(out.logits), None   # returned, so nothing is dead code

      return jax.lax.scan(body, jnp.zeros((), jnp.float32), jnp.arange(steps))[0]

    self.fn = jax.jit(run)
    self.variables = (t_params, t_state)
    self.x = jnp.asarray(arrays['x'])
    self.key = jax.random.key(0)
    self.steps_per_call = steps

  def calls(self, n: int) -> None:
    import jax
    for _ in range(n):
      self.key, sub = jax.random.split(self.key)
      out = self.fn(self.variables, self.x, sub)
    out.block_until_ready()


def teacher_logits_kdjax(teacher, x, chunk: int = 1024):
  """The teacher's eval-mode logits for every example (one jitted forward per chunk)."""
  import jax
  import numpy as np
  t_apply, t_params, t_state = teacher
  fwd = jax.jit(lambda p, s, x: t_apply(p, s, x, train=False)[0].logits)
  return np.concatenate([np.asarray(fwd(t_params, t_state, x[i:i + chunk]))
                         for i in range(0, len(x), chunk)])


def torch_thread_counts(args) -> list[int]:
  """Torch intra-op thread counts to time: the cores first, then the others asked for."""
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  counts = [args.threads or cores]
  for c in (int(v) for v in args.torch_threads.split(',') if v):
    if c not in counts:
      counts.append(c)
  return counts


def args_spc(pair: Pair, args) -> int:
  return args.steps_per_call if pair.key == 'mnist1d' else args.resnet_steps_per_call


# ------------------------------------------------------------------------- sweep


# Engine options of one process, compiled side by side and timed interleaved.
SWEEP_OPTIONS = [
    ('default', {}),
    ('steps_per_call=1', {'steps_per_call': 1}),
    ('steps_per_call=15', {'steps_per_call': 15}),
    ('steps_per_call=200', {'steps_per_call': 200}),
    ('teacher conv_impl=patches', {'conv_impl': 'patches'}),
    ('steps_per_call=200 + teacher patches', {'steps_per_call': 200, 'conv_impl': 'patches'}),
]
# Process-wide settings (XLA reads its flags once per process): one child each.
SWEEP_PROCESS = [
    ('default', '', None),
    ('--xla_cpu_multi_thread_eigen=false', '--xla_cpu_multi_thread_eigen=false', None),
    ('--xla_cpu_use_xnnpack=false', '--xla_cpu_use_xnnpack=false', None),
    ('--xla_cpu_use_onednn=true', '--xla_cpu_use_onednn=true', None),
    ('--xla_cpu_prefer_vector_width=512', '--xla_cpu_prefer_vector_width=512', None),
    ('--xla_cpu_enable_fast_math=true', '--xla_cpu_enable_fast_math=true', None),
    ('1 core (CPU affinity: XLA sizes its thread pool to it)', '', 1),
    ('2 CPU devices: batch sharded over a 2-device mesh',
     '--xla_force_host_platform_device_count=2', None),
]


def run_child(args) -> None:
  """``--child``: kdjax only, pair 1, a list of option sets timed interleaved; prints JSON."""
  option_sets = json.loads(args.child)
  pair = make_pairs(args)['mnist1d']
  arrays = load_data(pair)
  runs = []
  for opts in option_sets:
    run, _, _ = kdjax_setup(pair, arrays,
                            steps_per_call=opts.get('steps_per_call', args.steps_per_call),
                            conv_impl=opts.get('conv_impl', 'xla'))
    run.calls(1)
    runs.append((run, steps_for(time_once(run.calls, 1), args.min_seconds)))
  rates = [[] for _ in runs]
  cpu = [[] for _ in runs]
  for _ in range(args.repeats):
    for i, (run, units) in enumerate(runs):
      c0, t0 = time.process_time(), time.perf_counter()
      run.calls(units)
      dt, dc = time.perf_counter() - t0, time.process_time() - c0
      rates[i].append(units * run.steps_per_call * pair.batch_size / dt)
      cpu[i].append(dc / (units * run.steps_per_call))
  print(json.dumps([{'samples': r, 'cpu_seconds_per_step': statistics.median(c)}
                    for r, c in zip(rates, cpu)]))


def _child(args, option_sets, *, flags='', cpus=None):
  cmd = [sys.executable, os.path.abspath(__file__), '--mnist1d-data', args.mnist1d_data,
         '--batch-size', str(args.batch_size), '--steps-per-call', str(args.steps_per_call),
         '--min-seconds', str(args.sweep_min_seconds), '--repeats', str(args.repeats),
         '--child', json.dumps(option_sets)] + (['--quick'] if args.quick else [])
  if cpus is not None:
    cmd = ['taskset', '-c', ','.join(str(c) for c in sorted(os.sched_getaffinity(0))[:cpus])] + cmd
  env = dict(os.environ)
  if env.pop('KDJAX_BENCH_SET_DEVICES', None):   # main's own setting (teacher apart) only
    env.pop('JAX_NUM_CPU_DEVICES', None)
  env['XLA_FLAGS'] = ' '.join(filter(None, [os.environ.get('XLA_FLAGS', ''), flags]))
  out = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT)
  if out.returncode != 0:
    raise RuntimeError(f'child failed ({out.returncode}): {out.stderr.strip()[-500:]}')
  return json.loads(out.stdout.strip().splitlines()[-1])


def sweep(args, log) -> dict:
  """Pair 1 under other engine options, kdjax only.

  In-process options (steps per call, sharding constraint, donation, conv lowering) are
  compiled in one child and timed interleaved, ``--repeats`` x ``--sweep-rounds``
  samples each. Process-wide settings (XLA flags, CPU affinity) get a child each, run
  round-robin (every other round backwards) ``--sweep-rounds`` times. Each row gives the
  median and the best rate (the best is the least disturbed by other processes) and CPU
  seconds per step.
  """
  opt_samples = {name: [] for name, _ in SWEEP_OPTIONS}
  opt_cpu = {name: [] for name, _ in SWEEP_OPTIONS}
  proc_samples = {name: [] for name, *_ in SWEEP_PROCESS}
  proc_cpu = {name: [] for name, *_ in SWEEP_PROCESS}
  for rnd in range(args.sweep_rounds):
    rows = _child(args, [opts for _, opts in SWEEP_OPTIONS])
    for (name, _), row in zip(SWEEP_OPTIONS, rows):
      opt_samples[name] += row['samples']
      opt_cpu[name].append(row['cpu_seconds_per_step'])
    log(f'[sweep] round {rnd + 1}/{args.sweep_rounds} engine options: ' + ', '.join(
        f'{name} {statistics.median(row["samples"]):,.0f}' for (name, _), row in
        zip(SWEEP_OPTIONS, rows)))
    for name, flags, cpus in (SWEEP_PROCESS if rnd % 2 == 0 else SWEEP_PROCESS[::-1]):
      try:
        row = _child(args, [{}], flags=flags, cpus=cpus)[0]
      except RuntimeError as e:
        log(f'[sweep] {name}: {e}')
        continue
      proc_samples[name] += row['samples']
      proc_cpu[name].append(row['cpu_seconds_per_step'])
      log(f'[sweep] round {rnd + 1}/{args.sweep_rounds} {name}: '
          f'{statistics.median(row["samples"]):,.0f} ex/s')

  def table(samples, cpu):
    base = samples['default']
    out = []
    for name, vals in samples.items():
      med = statistics.median(vals) if vals else None
      out.append({'variant': name, 'samples': vals, 'examples_per_sec_median': med,
                  'examples_per_sec_best': max(vals) if vals else None,
                  'cpu_seconds_per_step': statistics.median(cpu[name]) if cpu[name] else None,
                  'median_relative_to_default': (med / statistics.median(base)) if (med and base) else None,
                  'best_relative_to_default': (max(vals) / max(base)) if (vals and base) else None})
    return out

  return {'engine_options': table(opt_samples, opt_cpu),
          'process_settings': table(proc_samples, proc_cpu),
          'options': {name: opts for name, opts in SWEEP_OPTIONS},
          'process': {name: {'xla_flags': f, 'cpus': c} for name, f, c in SWEEP_PROCESS}}


# ------------------------------------------------------------------------- report


def versions() -> dict:
  import importlib.metadata as md
  out = {}
  for pkg in ('jax', 'jaxlib', 'flax', 'optax', 'numpy', 'torch', 'torchdistill'):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--json', help='write every figure to this JSON file')
  p.add_argument('--quick', action='store_true', help='a seconds-long smoke run (tiny settings)')
  p.add_argument('--pairs', default='mnist1d,resnet', help='comma list of mnist1d, resnet')
  p.add_argument('--steps-per-call', type=int, default=50,
                 help='pair 1 steps fused per jitted call (kdjax configs: 50)')
  p.add_argument('--resnet-steps-per-call', type=int, default=1,
                 help='pair 2 steps per call (a step takes seconds: fusing saves nothing)')
  p.add_argument('--batch-size', type=int, default=256, help='pair 1 batch')
  p.add_argument('--resnet-batch-size', type=int, default=32, help='pair 2 batch')
  p.add_argument('--conv-impls', default=None,
                 help="pair 1: kdjax conv lowerings to time (the models' conv_impl option; "
                      "'T/S' gives teacher and student their own); the fastest is reported "
                      "(default: xla,patches; --quick: xla)")
  p.add_argument('--resnet-conv-impls', default=None,
                 help='pair 2: as --conv-impls (default: xla/patches,patches,xla; --quick: xla)')
  p.add_argument('--slow-seconds', type=float, default=20.0,
                 help='a runner whose one call takes longer is timed once, not repeated')
  p.add_argument('--mnist1d-data', choices=('real', 'synthetic'), default='real',
                 help='pair 1 data: the real MNIST-1D train split or random signals')
  p.add_argument('--repeats', type=int, default=3)
  p.add_argument('--min-seconds', type=float, default=3.0, help='least duration of one repeat')
  p.add_argument('--resnet-min-seconds', type=float, default=None,
                 help='least duration of one pair 2 repeat (default: --min-seconds)')
  p.add_argument('--torch-warmup-steps', type=int, default=10)
  p.add_argument('--matmul-n', type=int, default=2048)
  p.add_argument('--threads', type=int, default=None,
                 help='torch intra-op threads (default: the cores available)')
  p.add_argument('--torch-threads', default='1',
                 help='other torch thread counts also timed; the fastest is the reference '
                      '(with other processes on the cores, 1 thread can beat all cores)')
  p.add_argument('--no-cached-teacher', dest='cached_teacher', action='store_false',
                 help='pair 1: skip the extra runs with the teacher logits precomputed')
  p.add_argument('--no-check', dest='check', action='store_false',
                 help='skip the same-weights equivalence check')
  p.add_argument('--sweep', action='store_true', help='also time pair 1 under engine options')
  p.add_argument('--sweep-rounds', type=int, default=3)
  p.add_argument('--sweep-min-seconds', type=float, default=1.5)
  p.add_argument('--no-teacher-apart', dest='teacher_apart', action='store_false',
                 help="skip the runs with the teacher on its own device (the engine's "
                      'config.teacher.devices=1; on a CPU the main process then gets '
                      'JAX_NUM_CPU_DEVICES=2 unless it is set)')
  p.add_argument('--child', help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  if args.quick:
    # A smoke run: tiny models, short repeats, torch on one thread (on a loaded 2-core
    # machine a 2-thread torch step can take seconds); its figures mean nothing.
    if args.threads is None:
      args.threads = 1
    args.min_seconds = min(args.min_seconds, 0.1)
    args.steps_per_call = min(args.steps_per_call, 5)
    args.resnet_steps_per_call = 1
    args.matmul_n = min(args.matmul_n, 256)
    args.torch_warmup_steps = min(args.torch_warmup_steps, 2)
    args.sweep_rounds = 1
    args.sweep_min_seconds = 0.2
    args.conv_impls = args.conv_impls or 'xla'
    args.resnet_conv_impls = args.resnet_conv_impls or 'xla'
  args.conv_impls = args.conv_impls or 'xla,patches'
  args.resnet_conv_impls = args.resnet_conv_impls or 'xla/patches,patches,xla'
  return args


# The headline figures: pair result key -> top-level JSON key.
TOP_KEYS = {
    'mnist1d': {k: k for k in ('ratio_vs_torch', 'kdjax_examples_per_sec', 'torch_examples_per_sec',
                               'kdjax_flops_fraction_of_peak', 'torch_flops_fraction_of_peak')},
    'resnet': {'ratio_vs_torch': 'ratio_vs_torch_resnet',
               'kdjax_examples_per_sec': 'kdjax_resnet_examples_per_sec',
               'torch_examples_per_sec': 'torch_resnet_examples_per_sec',
               'kdjax_flops_fraction_of_peak': 'kdjax_resnet_flops_fraction_of_peak',
               'torch_flops_fraction_of_peak': 'torch_resnet_flops_fraction_of_peak'},
}


def main(argv=None) -> dict | None:
  args = parse_args(argv)
  os.environ.setdefault('JAX_PLATFORMS', 'cpu')
  if args.child:
    run_child(args)
    return None
  cores = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  import torch
  torch.set_num_threads(args.threads or cores)
  if (args.teacher_apart and cores >= 2 and os.environ['JAX_PLATFORMS'] == 'cpu'
      and 'JAX_NUM_CPU_DEVICES' not in os.environ):
    os.environ['JAX_NUM_CPU_DEVICES'] = '2'     # student on one, teacher on the other
    os.environ['KDJAX_BENCH_SET_DEVICES'] = '1'
  import jax

  t_start = time.perf_counter()

  def log(msg):
    print(f'[{time.perf_counter() - t_start:6.1f}s] {msg}', flush=True)

  started = datetime.datetime.now(datetime.timezone.utc)
  load_start = os.getloadavg()
  out: dict[str, Any] = {
      'date': started.isoformat(timespec='seconds'),
      'command': ' '.join([os.path.relpath(__file__, ROOT) if __file__ else 'step_throughput.py',
                           *(sys.argv[1:] if argv is None else argv)]),
      'machine': machine_info(), 'versions': versions(),
      'jax_devices': [str(d) for d in jax.devices()],
      'xla_flags': os.environ.get('XLA_FLAGS', ''),
      'torch_threads': torch.get_num_threads(),
      'options': {k: v for k, v in vars(args).items() if k not in ('child',)},
  }
  log(f'kdjax vs PyTorch KD step on {out["machine"]["cpu_model"]} ({cores} cores), '
      f'jax {out["versions"]["jax"]}, torch {out["versions"]["torch"]} '
      f'({torch.get_num_threads()} threads), load average {load_start[0]:.1f}')

  peak = matmul_peak_jax(args.matmul_n, 10)
  out['matmul_peak_flops'] = peak
  out['torch_matmul_peak_flops'] = matmul_peak_torch(args.matmul_n, 10)
  log(f'matmul peak ({args.matmul_n}^2 float32): jnp.dot {peak / 1e9:.1f} GFLOP/s, '
      f'torch.mm {out["torch_matmul_peak_flops"] / 1e9:.1f} GFLOP/s')

  pairs = make_pairs(args)
  wanted = [s for s in args.pairs.split(',') if s]
  for key in wanted:
    pair = pairs[key]
    pargs = args
    if key == 'resnet' and args.resnet_min_seconds is not None:
      pargs = argparse.Namespace(**{**vars(args), 'min_seconds': args.resnet_min_seconds})
    impls = args.conv_impls if key == 'mnist1d' else args.resnet_conv_impls
    res = bench_pair(pair, pargs, impls=[s for s in impls.split(',') if s], log=log)
    steps_per_sec = {k: v / pair.batch_size for k, v in
                     (('kdjax', res['kdjax_examples_per_sec']), ('torch', res['torch_examples_per_sec']))}
    flops = res['xla_flops_per_step'] or res['analytic_flops_per_step']
    res['flops_per_step_used'] = flops
    res['kdjax_flops_per_sec'] = flops * steps_per_sec['kdjax']
    res['torch_flops_per_sec'] = flops * steps_per_sec['torch']
    res['kdjax_flops_fraction_of_peak'] = res['kdjax_flops_per_sec'] / peak
    res['torch_flops_fraction_of_peak'] = res['torch_flops_per_sec'] / peak
    fused = res.get('xla_flops_per_fused_call')
    log(f'[{key}] FLOPs/step: XLA {res["xla_flops_per_step"] / 1e6:,.1f} M, analytic '
        f'{res["analytic_flops_per_step"] / 1e6:,.1f} M (teacher fwd + 3 x student fwd); '
        f'XLA per fused call {fused / 1e6 if fused else float("nan"):,.1f} M '
        f'(the scan body counted once)')
    log(f'[{key}] kdjax {res["kdjax_examples_per_sec"]:,.0f} ex/s '
        f'({res["kdjax_variant"]}), torch {res["torch_examples_per_sec"]:,.0f} ex/s '
        f'({res["torch_threads"]} thread(s)), '
        f'ratio {res["ratio_vs_torch"]:.2f} (kdjax conv_impl=xla vs torch on all cores: '
        f'{res["ratio_default_vs_torch_all_cores"]:.2f}); of matmul peak: kdjax '
        f'{100 * res["kdjax_flops_fraction_of_peak"]:.1f}%, torch '
        f'{100 * res["torch_flops_fraction_of_peak"]:.1f}%')
    if 'cached_teacher' in res:
      c = res['cached_teacher']
      log(f'[{key}] teacher logits precomputed on both sides: kdjax {c["kdjax_examples_per_sec"]:,.0f} '
          f'ex/s, torch {c["torch_examples_per_sec"]:,.0f} ex/s ({c["torch_threads"]} thread(s)), '
          f'ratio {c["ratio_vs_torch_cached"]:.2f}; kdjax cached vs torch live teacher '
          f'{c["ratio_vs_torch_live_teacher"]:.2f}')
    if 'parts' in res:
      q = res['parts']
      log(f'[{key}] parts alone (ex/s): teacher forward kdjax {q["kdjax_teacher_forward"]:,.0f} '
          f'vs torch {q["torch_teacher_forward"]:,.0f} ({q["teacher_forward_ratio"]:.2f}x), '
          f'student step kdjax {q["kdjax_student_step"]:,.0f} vs torch '
          f'{q["torch_student_step"]:,.0f} ({q["student_step_ratio"]:.2f}x); serial bound '
          f'kdjax {q["kdjax_serial_bound"]:,.0f} (live at {q["kdjax_live_over_serial_bound"]:.2f} '
          f'of it), torch {q["torch_serial_bound"]:,.0f} ({q["torch_live_over_serial_bound"]:.2f}); '
          f'kdjax at its serial bound would be {q["ratio_vs_torch_at_kdjax_serial_bound"]:.2f}x torch')
    out[key] = res
    out.update({TOP_KEYS[key][name]: res[name] for name in TOP_KEYS[key]})
  if 'resnet' in out:
    out['resnet_batch_size'] = pairs['resnet'].batch_size
    out['resnet_data'] = 'synthetic random images (no augmentation on either side)'

  if args.sweep:
    log('sweep over engine options (pair 1, kdjax only, in child processes):')
    out['sweep'] = sweep(args, log)
    for part in ('engine_options', 'process_settings'):
      log(f'  {part}: median / best ex/s (x vs default), CPU ms per step')
      for row in out['sweep'][part]:
        if not row['samples']:
          continue
        log(f'    {row["variant"]:<56} {row["examples_per_sec_median"]:>9,.0f} '
            f'(x{row["median_relative_to_default"]:.2f}) / {row["examples_per_sec_best"]:>9,.0f} '
            f'(x{row["best_relative_to_default"]:.2f})  {1e3 * row["cpu_seconds_per_step"]:.2f} ms')

  out['load_average_start'] = load_start
  out['load_average_end'] = os.getloadavg()
  out['wall_seconds'] = (datetime.datetime.now(datetime.timezone.utc) - started).total_seconds()
  log('summary: ' + ', '.join(f'{k}={out[k]:.3g}' for k in (
      'ratio_vs_torch', 'ratio_vs_torch_resnet', 'kdjax_flops_fraction_of_peak',
      'kdjax_resnet_flops_fraction_of_peak') if k in out))
  write_json(args.json, out)
  if args.json:
    log(f'wrote {args.json}')
  return out


if __name__ == '__main__':
  main()
