r"""``kdjax plan``: compile a run's distillation step ahead of time for a TPU slice or N GPUs,
on this machine, and say whether it fits and how fast it could go.

The step compiled is the run's own: the student, the objective, the optimizer and the
partition rules of the config, the one train step of :func:`kdjax.engine.make_train_step`
inside the jitted call of :class:`kdjax.engine.TrainCalls` (a ``lax.scan`` of one step,
the state donated), fed by a :class:`kdjax.engine.Feed` over a
:class:`kdjax.engine.StreamSource` whose batch is abstract: the teacher's forward runs
inside the call as it does in ``kdjax distill`` (or, for a config that reads a teacher
cache, the cached entries ride in the batch). Nothing is allocated: the parameters, the
optimizer state, the teacher's weights and the batch are ``jax.ShapeDtypeStruct`` with
their shardings, and the call is lowered and compiled for the target's devices.

**Targets.**

* ``topology='v5e:16x16'``: a Cloud TPU slice (v4, v5e, v5p, v6e), its devices from
  ``jax.experimental.topologies.get_topology_desc`` (libtpu, no TPU needed); compiled by
  the TPU compiler, so the memory figures are the TPU's buffer assignment. A program
  that does not fit is refused by that compiler; its message (used and available bytes,
  the largest allocations) becomes the plan's. libtpu lives in a folder of its own,
  ``$KDJAX_LIBTPU_PATH`` or ``<sys.prefix>/libtpu`` (``pip install --target``), and is
  loaded from there for the plan only (``TPU_LIBRARY_PATH`` for that call): an
  importable libtpu would make every jax process on the machine try a TPU at start-up.
* ``devices=N`` (``gpu='h100'``, ...): N GPUs planned from their published memory,
  compiled for N CPU devices (``--xla_force_host_platform_device_count``). The CPU
  compiler's buffer assignment approximates the GPU one (same program, same sharding,
  other fusion and scheduling decisions): a first answer, not the GPU's.

**Shapes.** The data is never read: the batch is ``config.batch_size`` rows of
``config.plan.seq_len`` tokens over a vocabulary of ``config.plan.vocab_size`` (without a
``plan`` group: the input shape and class count of ``config.data``, read from the data
set's metadata, which prepares it), as the LM data sets give it (``x``, ``label``,
``mask``, ``segment_ids``, ``positions``). The teacher's architecture is
``config.plan.teacher`` (``name``, ``kwargs``, ``dtype``: weights and computation, as a
frozen teacher is served), else the model of ``config.teacher.workdir``'s
``config.json``, else ``config.teacher.hf_path``'s ``config.json`` (no weights read).

**Mesh in context.** The step is traced under ``jax.set_mesh(mesh)``, so the models'
activation constraints apply (the decoders' residual stream split over the batch axes,
:func:`kdjax.parallel.batch_axes`): FSDP gathers the weights, not the activations.

**Attention.** ``attention_impl='auto'`` picks the blocked path on a CPU backend only;
a plan is made on a CPU for an accelerator, so ``'auto'`` is planned as ``'dense'``,
what the run on the accelerator takes.

**The estimate (roofline).** Per chip, per step:

.. math::

  t_\text{compute} = F / P,\quad t_\text{HBM} = B / W_\text{HBM},\quad
  t_\text{ICI} = C / W_\text{ICI},\quad
  t = \max(t_\text{compute}, t_\text{HBM}, t_\text{ICI})

with ``F`` the FLOPs of the compiled per-chip program (``compiled.cost_analysis()``:
rematerialized work included), ``P`` the chip's bf16 peak, ``B`` the bytes the program
reads and writes (the same analysis), ``C`` the bytes each chip sends over its links in
the collectives of the optimized HLO (ring model: all-gather and reduce-scatter move
``(n - 1) / n`` of the full array, all-reduce twice that, all-to-all ``(n - 1) / n`` of
its operand, a collective-permute its operand; ``n`` the group size) and ``W_ICI`` the
chip's published bidirectional interconnect bandwidth. ``max`` assumes perfect overlap
(a lower bound on the step time); ``step_seconds_no_overlap`` is the sum. The implied
MFU is model FLOPs ``6 N_s T + 2 N_t T`` (student forward and backward, teacher forward;
``T`` tokens per step, ``N`` parameters without the input embedding table, whose lookup
does no matrix product, and without attention's score FLOPs) over ``t`` times the peak
times the chips.

References:
  MaxText (google/maxtext, ``MaxText/train_compile.py``): compiling a training step
  for a TPU topology on a CPU with ``jax.experimental.topologies``. The chip figures are
  in :data:`CHIPS` with their sources.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import data as kdata
from kdjax import storage
from kdjax import teacher as teacher_lib
from kdjax import workdir as workdir_lib
from kdjax.engine import Feed
from kdjax.engine import StreamSource
from kdjax.engine import TrainCalls
from kdjax.engine import init_train_state
from kdjax.engine import make_optimizer
from kdjax.engine import make_train_step
from kdjax.engine import validate
from kdjax.engine.feed import teacher_inputs
from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.models import from_config
from kdjax.models.base import output_kwargs
from kdjax.models.base import sample_inputs
from kdjax.parallel import batch_shards
from kdjax.parallel import make_mesh
from kdjax.parallel import shardings_from_rules

GiB = 1 << 30


class Chip(NamedTuple):
  """One accelerator's published figures (per chip).

  Attributes:
    name: the generation as ``kdjax plan`` spells it.
    hbm_bytes: memory.
    peak_flops: dense bf16 FLOP/s.
    hbm_bandwidth: memory bytes/s.
    ici_bandwidth: interconnect bytes/s (TPU ICI bidirectional per chip; GPU NVLink).
    source: where the figures come from.
  """

  name: str
  hbm_bytes: int
  peak_flops: float
  hbm_bandwidth: float
  ici_bandwidth: float
  source: str


# Per-chip figures. TPUs: Cloud TPU system architecture pages (cloud.google.com/tpu/docs/
# v4, v5e, v5p, v6e), read 2026: bf16 peak, HBM capacity and bandwidth, bidirectional ICI
# bandwidth per chip. v4's page gives no per-chip ICI figure: 6 links of 50 GB/s, after
# Jouppi et al., "TPU v4: An Optically Reconfigurable Supercomputer for Machine
# Learning", ISCA 2023 (an approximation). GPUs: NVIDIA's H100 SXM, H200 SXM and A100
# datasheets (dense bf16, no sparsity; NVLink bandwidth per GPU).
CHIPS: dict[str, Chip] = {
    'v4': Chip('v4', 32 * GiB, 275e12, 1200e9, 300e9, 'cloud.google.com/tpu/docs/v4'),
    'v5e': Chip('v5e', 16 * GiB, 197e12, 819e9, 400e9, 'cloud.google.com/tpu/docs/v5e'),
    'v5p': Chip('v5p', 95 * GiB, 459e12, 2765e9, 1200e9, 'cloud.google.com/tpu/docs/v5p'),
    'v6e': Chip('v6e', 32 * GiB, 918e12, 1638e9, 800e9, 'cloud.google.com/tpu/docs/v6e'),
    'h100': Chip('h100', 80 * 10**9, 989e12, 3.35e12, 900e9, 'NVIDIA H100 SXM datasheet'),
    'h200': Chip('h200', 141 * 10**9, 989e12, 4.8e12, 900e9, 'NVIDIA H200 SXM datasheet'),
    'a100-80g': Chip('a100-80g', 80 * 10**9, 312e12, 2.039e12, 600e9,
                     'NVIDIA A100 SXM datasheet'),
    'a100-40g': Chip('a100-40g', 40 * 10**9, 312e12, 1.555e12, 600e9,
                     'NVIDIA A100 SXM datasheet'),
}
TPUS = ('v4', 'v5e', 'v5p', 'v6e')
GPUS = ('h100', 'h200', 'a100-80g', 'a100-40g')
# libtpu's names of the generations, and the names people use.
_TPU_ALIASES = {'v4': 'v4', 'v5e': 'v5e', 'v5litepod': 'v5e', 'v5lite': 'v5e', 'v5p': 'v5p',
                'v6e': 'v6e', 'v6': 'v6e', 'trillium': 'v6e'}
COLLECTIVES = ('all-reduce', 'all-gather', 'reduce-scatter', 'all-to-all', 'collective-permute')


@dataclasses.dataclass
class Plan:
  """A compiled plan (see the module docstring); bytes and FLOPs are per device (one
  chip, or one TensorCore of a v4 chip) unless named ``global``.

  Attributes:
    target: ``'v5e:16x16'`` or ``'4 x h100'``.
    chip: the :class:`Chip`.
    devices: devices compiled for.
    mesh: ``{axis: size}``.
    hbm_bytes_per_chip: the memory a device may use (the chip's, or the override).
    fits: whether the peak fits in it.
    peak_bytes_per_chip: arguments + outputs - aliased + temporaries (+ code).
    param_bytes: the student's (and learned loss terms') parameters on a device.
    optimizer_bytes: the optimizer state on a device.
    teacher_bytes: the teacher's weights on a device.
    batch_bytes: the batch on a device.
    temp_bytes: activations and other temporaries (the compiler's).
    output_bytes: the call's outputs (the new state, mostly aliased to the donated one).
    flops_per_step: per device (the partitioned program's cost analysis).
    flops_per_step_global: times the devices.
    hbm_traffic_bytes: bytes read and written per step per device (cost analysis).
    collectives: ``{op: {'count', 'bytes', 'link_bytes'}}`` per device.
    estimated_step_seconds: the roofline ``max`` (module docstring).
    step_seconds_no_overlap: the sum of the three times.
    model_flops_per_step: ``6 N_s T + 2 N_t T`` (global).
    mfu: model FLOPs over estimated time, peak and devices.
    student_params, teacher_params: parameter counts.
    tokens_per_step: global.
    largest_buffers: ``[(description, bytes)]``, the largest first.
    compile_seconds: lowering and compiling.
    message: the compiler's refusal (a TPU program that does not fit), else ''.
  """

  target: str
  chip: Chip
  devices: int
  mesh: dict
  hbm_bytes_per_chip: int
  fits: bool
  peak_bytes_per_chip: int
  param_bytes: int
  optimizer_bytes: int
  teacher_bytes: int
  batch_bytes: int
  temp_bytes: int | None
  output_bytes: int | None
  flops_per_step: float | None
  flops_per_step_global: float | None
  hbm_traffic_bytes: float | None
  collectives: dict
  estimated_step_seconds: float | None
  step_seconds_no_overlap: float | None
  model_flops_per_step: float
  mfu: float | None
  student_params: int
  teacher_params: int
  tokens_per_step: int
  largest_buffers: list
  compile_seconds: float = 0.0
  message: str = ''

  def to_json(self) -> dict:
    """The plan as plain JSON values (``chip`` as its fields)."""
    out = dataclasses.asdict(self)
    out['chip'] = self.chip._asdict()
    out['largest_buffers'] = [list(b) for b in self.largest_buffers]
    return out


# --------------------------------------------------------------------------- targets

def parse_mesh(text: str) -> list[tuple[str, int]]:
  """``'data=16,fsdp=16'`` -> ``[('data', 16), ('fsdp', 16)]`` (one size may be -1).

  >>> parse_mesh('data=-1,fsdp=4')
  [('data', -1), ('fsdp', 4)]
  """
  axes = []
  for part in filter(None, (p.strip() for p in text.split(','))):
    name, eq, size = part.partition('=')
    try:
      axes.append((name.strip(), int(size)))
    except ValueError:
      eq = ''
    if not eq or not name.strip():
      raise UserError(f'--mesh {text!r}: write axes as name=size pairs, e.g. data=16,fsdp=16')
  if not axes:
    raise UserError('--mesh is empty; write axes as name=size pairs, e.g. data=16,fsdp=16')
  return axes


LIBTPU_ENV = 'KDJAX_LIBTPU_PATH'
LIBTPU_PIN = 'libtpu==0.0.42.*'   # the version jax 0.10.2's tpu extra pins


def libtpu_dir() -> str:
  """The folder libtpu is installed into for ``kdjax plan --topology``: ``$KDJAX_LIBTPU_PATH``,
  else ``<sys.prefix>/libtpu`` (``pip install --target``). It is kept out of the
  environment's import path on purpose: an importable libtpu makes every jax process try
  the TPU when it starts (warnings on stderr, ``/tmp/libtpu_lockfile``)."""
  import sys
  return os.environ.get(LIBTPU_ENV) or os.path.join(sys.prefix, 'libtpu')


def libtpu_library(folder: str | None = None) -> str:
  """The path of ``libtpu.so`` in ``folder`` (default :func:`libtpu_dir`): the folder may be
  a ``pip install --target`` folder (``libtpu/libtpu.so`` inside), the package folder, or
  the library itself.

  Raises:
    UserError: no ``libtpu.so`` there (the message names the install command).
  """
  folder = folder or libtpu_dir()
  for path in (folder, os.path.join(folder, 'libtpu', 'libtpu.so'),
               os.path.join(folder, 'libtpu.so')):
    if os.path.isfile(path) and path.endswith('.so'):
      return os.path.abspath(path)
  raise UserError(f'kdjax plan --topology needs libtpu in {folder}: run pip install --target '
                  f'{folder} "{LIBTPU_PIN}" (or point {LIBTPU_ENV} at a folder that has it)')


# libtpu looks for a TPU host's metadata when it loads; on a machine without one these keep
# it quiet (they describe no real device: the topology asked for is explicit).
_LIBTPU_QUIET = (('ALLOW_MULTIPLE_LIBTPU_LOAD', '1'), ('TPU_SKIP_MDS_QUERY', '1'),
                 ('TPU_ACCELERATOR_TYPE', 'v5litepod-4'), ('TPU_WORKER_HOSTNAMES', 'localhost'),
                 ('TPU_WORKER_ID', '0'))


def _topology_devices(topology: str, library: str) -> list:
  """libtpu's compile-only devices of ``topology``, libtpu loaded from ``library``.

  jax reads ``TPU_LIBRARY_PATH`` when it loads the TPU plugin, which
  ``get_topology_desc`` does on its first call, whether or not the backends have
  started; the variable is set for that call only. A process whose backends have not
  started yet is kept on the CPU first, so no TPU client is ever made (nothing runs on
  the topology's devices: they compile).
  """
  try:
    from jax._src import xla_bridge   # whether the backends exist yet: no public API
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    started = True
  if not started and not os.environ.get('JAX_PLATFORMS') and jax.config.jax_platforms is None:
    jax.config.update('jax_platforms', 'cpu')
  saved = {key: os.environ.get(key) for key, _ in _LIBTPU_QUIET + (('TPU_LIBRARY_PATH', ''),)}
  os.environ.update({key: value for key, value in _LIBTPU_QUIET if key not in os.environ})
  os.environ['TPU_LIBRARY_PATH'] = library
  try:
    from jax.experimental import topologies
    return list(topologies.get_topology_desc(topology_name=topology, platform='tpu').devices)
  finally:
    for key, value in saved.items():
      if value is None:
        os.environ.pop(key, None)
      else:
        os.environ[key] = value


def tpu_target(topology: str) -> tuple[Chip, list, int]:
  """``(chip, devices, chips)`` of a TPU topology such as ``'v5e:16x16'`` (libtpu's
  abstract devices, libtpu from :func:`libtpu_dir`; nothing runs on them).

  Raises:
    UserError: an unknown generation, no libtpu, or a topology libtpu refuses.
  """
  generation, _, shape = topology.partition(':')
  chip = CHIPS.get(_TPU_ALIASES.get(generation.lower(), ''))
  if chip is None or not re.fullmatch(r'\d+(x\d+)*', shape):
    raise UserError(f'--topology {topology!r}: write GENERATION:SHAPE with a generation of '
                    f'{", ".join(TPUS)}, e.g. v5e:16x16 or v5p:4x4x8')
  library = libtpu_library()
  try:
    devices = _topology_devices(topology, library)
  except Exception as e:  # noqa: BLE001  (libtpu's errors are runtime errors of any kind)
    first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
    raise UserError(f'--topology {topology!r}: libtpu ({library}) refuses it ({first})') from None
  chips = math.prod(int(s) for s in shape.split('x'))
  return chip, devices, chips


def gpu_target(num_devices: int, gpu: str) -> tuple[Chip, list]:
  """``(chip, devices)``: ``num_devices`` CPU devices standing for GPUs ``gpu``.

  Raises:
    UserError: an unknown GPU, or fewer CPU devices than asked (set
      ``--xla_force_host_platform_device_count`` before jax starts: the CLI does).
  """
  chip = CHIPS.get(gpu)
  if chip is None or gpu not in GPUS:
    raise UserError(f'--gpu {gpu!r}: choose one of {", ".join(GPUS)}')
  devices = jax.devices('cpu')
  if len(devices) < num_devices:
    raise UserError(f'--devices {num_devices}: this process has {len(devices)} CPU devices; '
                    f'start it with XLA_FLAGS=--xla_force_host_platform_device_count='
                    f'{num_devices} (the kdjax command does)')
  return chip, devices[:num_devices]


def ensure_cpu_devices(n: int) -> bool:
  """Makes this process start jax with at least ``n`` CPU devices (the CPU backend only,
  ``--xla_force_host_platform_device_count``) when jax has not started yet; True when it
  has (or already had) them. False: jax started with fewer (:func:`run_in_child`)."""
  try:
    from jax._src import xla_bridge   # whether the backends exist yet: no public API
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):
    started = True
  if not started:
    flags = [f for f in os.environ.get('XLA_FLAGS', '').split()
             if not f.startswith('--xla_force_host_platform_device_count')]
    os.environ['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={n}'])
    jax.config.update('jax_platforms', 'cpu')
  return len(jax.devices('cpu')) >= n


def run_in_child(argv, n: int) -> int:
  """Runs ``kdjax ARGV`` in a child process that starts jax with ``n`` CPU devices; its
  exit code."""
  import subprocess
  import sys
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  flags = [f for f in env.get('XLA_FLAGS', '').split()
           if not f.startswith('--xla_force_host_platform_device_count')]
  env['XLA_FLAGS'] = ' '.join(flags + [f'--xla_force_host_platform_device_count={n}'])
  return subprocess.run([sys.executable, '-m', 'kdjax', *argv], env=env).returncode


def _mesh(axes, devices) -> jax.sharding.Mesh:
  """The config's (or ``--mesh``'s) axes over ``devices``; on TPU devices in the order of
  their torus (``jax.make_mesh``), else in device order."""
  try:
    mesh = make_mesh(axes, devices=devices)
  except ValueError as e:
    raise UserError(f'mesh: {e}') from None
  try:
    return jax.make_mesh(tuple(mesh.shape.values()), mesh.axis_names, devices=devices,
                         axis_types=(jax.sharding.AxisType.Auto,) * len(mesh.axis_names))
  except Exception:  # noqa: BLE001  (a shape the torus helper does not place: keep the order)
    return mesh


# --------------------------------------------------------------------------- the run

class _Shapes(NamedTuple):
  seq_len: int
  vocab: int
  input_shape: tuple
  input_dtype: str
  tokens: bool


def _shapes(config) -> _Shapes:
  plan = config.get('plan')
  if plan is not None and plan.get('seq_len') and plan.get('vocab_size'):
    seq, vocab = int(plan.seq_len), int(plan.vocab_size)
    return _Shapes(seq, vocab, (seq,), 'int32', True)
  try:
    spec = kdata.dataset_spec(config.data.name, data_dir=config.data.data_dir or None)
  except kdata.DataError as e:
    raise UserError(f'{e} (or give the shapes: config.plan.seq_len and '
                    'config.plan.vocab_size)') from None
  tokens = len(spec.input_shape) == 1 and spec.input_dtype.startswith('int')
  seq = int(spec.input_shape[0]) if tokens else 0
  return _Shapes(seq, int(spec.num_classes), tuple(spec.input_shape), spec.input_dtype, tokens)


def _planned_model(model_cfg, *, accelerator: bool) -> dict:
  """``config.model``-like group as a plain dict, as the accelerator run builds it:
  ``attention_impl='auto'`` -> ``'dense'`` (module docstring) and ``model.remat`` (the
  group's field) passed to the model as its ``remat`` option."""
  cfg = model_cfg.to_dict() if hasattr(model_cfg, 'to_dict') else dict(model_cfg)
  kwargs = dict(cfg.get('kwargs') or {})
  if accelerator and kwargs.get('attention_impl', 'auto') == 'auto' and cfg.get('name') in (
      'decoder', 'llama', 'gpt2', 'qwen2'):
    kwargs['attention_impl'] = 'dense'
  remat = cfg.get('remat')
  if remat not in (None, '', 'none', False) and 'remat' not in kwargs:
    kwargs['remat'] = 'full' if remat is True else str(remat)
  cfg['kwargs'] = kwargs
  return cfg


def _teacher_model(config) -> dict | None:
  """The teacher's model group (module docstring), or None when the run has none."""
  plan = config.get('plan')
  if plan is not None and plan.get('teacher') is not None:
    t = plan.teacher.to_dict() if hasattr(plan.teacher, 'to_dict') else dict(plan.teacher)
    dtype = t.get('dtype') or 'float32'
    kwargs = dict(t.get('kwargs') or {})
    kwargs.setdefault('param_dtype', jnp.dtype(dtype))   # a frozen teacher: no master copy
    return {'name': t['name'], 'kwargs': kwargs, 'dtype': dtype}
  where = teacher_lib.source(config.teacher)
  if where is None:
    return None
  kind, path = where
  if kind == teacher_lib.WORKDIR:
    model = workdir_lib.read_config(path).get('model') or {}
    return {'name': model.get('name'), 'kwargs': dict(model.get('kwargs') or {}),
            'dtype': model.get('dtype') or 'float32'}
  from kdjax.models.transformer import config_from_hf
  hf = workdir_lib.read_json(os.path.join(path, 'config.json'), what='Hugging Face config')
  dtype = config.teacher.get('dtype') or 'float32'
  decoder = config_from_hf(hf, dtype=jnp.dtype(dtype))
  kwargs = teacher_lib.decoder_kwargs(decoder)
  kwargs['param_dtype'] = jnp.dtype(dtype)
  return {'name': 'decoder', 'kwargs': kwargs, 'dtype': dtype}


def _count(tree) -> int:
  return int(sum(math.prod(x.shape) for x in jax.tree.leaves(tree)))


def _bytes_per_device(tree) -> int:
  """Bytes of one device's shards of abstract arrays with shardings."""
  total = 0
  for x in jax.tree.leaves(tree):
    shape = x.sharding.shard_shape(x.shape) if getattr(x, 'sharding', None) else x.shape
    total += math.prod(shape) * jnp.dtype(x.dtype).itemsize
  return int(total)


def _matmul_params(params) -> int:
  """Parameters less the input embedding tables (a lookup, no matrix product) unless the
  head reads them (tied)."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  names = {jax.tree_util.keystr(p): x for p, x in flat}
  tied = not any('lm_head' in k for k in names)
  skip = sum(math.prod(x.shape) for k, x in names.items()
             if ('pos_embed' in k) or ('embed' in k and 'embedding' in k and not tied))
  return _count(params) - int(skip)


def _abstract(tree, shardings):
  return jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                      tree, shardings)


def _batch(config, shapes: _Shapes, mesh, objective, source: StreamSource) -> dict:
  """The abstract batch ``[1, B, ...]`` of one step as the stream feed gives it."""
  b = int(config.batch_size)
  sharding = source.sharding
  sds = lambda shape, dtype: jax.ShapeDtypeStruct((1, b, *shape), jnp.dtype(dtype),
                                                  sharding=sharding)
  if shapes.tokens:
    t = shapes.seq_len
    batch = {'x': sds((t,), 'int32'), 'label': sds((t,), 'int32'), 'mask': sds((t,), bool),
             'segment_ids': sds((t,), 'int32'), 'positions': sds((t,), 'int32')}
  else:
    batch = {'x': sds(shapes.input_shape, shapes.input_dtype), 'label': sds((), 'int32'),
             'mask': sds((), bool)}
  batch.update(id=sds((), 'int32'), epoch=sds((), 'int32'))
  cache_needs = objective.needs & {'teacher_topk_logits', 'teacher_topk_indices'}
  if cache_needs:
    k = int((config.get('plan') or {}).get('cache_k') or 0)
    if not k:
      raise UserError('this config reads a teacher cache (sparse top-k losses): give its k '
                      'as config.plan.cache_k for the plan')
    per = (shapes.seq_len, k) if shapes.tokens else (k,)
    batch.update(teacher_topk_logits=sds(per, 'float32'),
                 teacher_topk_indices=sds(per, 'int32'))
  return batch


def _objective(config):
  terms = config.loss.terms
  terms = terms.to_dict() if hasattr(terms, 'to_dict') else dict(terms)
  try:
    return build_objective(terms)
  except (KeyError, ValueError) as e:
    raise UserError(f'config.loss.terms: {e.args[0] if e.args else e}') from None


def plan(config: ml_collections.ConfigDict, *, topology: str | None = None,
         devices: int | None = None, gpu: str = 'h100', mesh: str | None = None,
         hbm_bytes: int | None = None, log=None) -> Plan:
  """Compiles the run of ``config`` for a TPU ``topology`` or ``devices`` GPUs (module
  docstring) and returns its :class:`Plan`.

  Args:
    config: a distillation (or training) config.
    topology: a TPU slice, ``'v5e:16x16'``; or
    devices: a number of GPUs ``gpu`` (this process needs as many CPU devices).
    gpu: one of :data:`GPUS`.
    mesh: ``'data=16,fsdp=16'`` instead of ``config.mesh``.
    hbm_bytes: the memory per device to plan against instead of the chip's.
    log: where progress notes go (None: nowhere).

  Raises:
    UserError: a config, target or mesh the plan cannot use.
  """
  import time
  note = log or (lambda msg: None)
  validate(config)
  if (topology is None) == (devices is None):
    raise UserError('kdjax plan: give exactly one of --topology (a TPU slice) and '
                    '--devices (a number of GPUs)')
  if topology is not None:
    chip, devs, chips = tpu_target(topology)
    target, per_chip = topology, len(devs) // max(chips, 1) or 1
  else:
    if devices < 1:
      raise UserError(f'--devices {devices}: give a positive number of GPUs')
    chip, devs = gpu_target(devices, gpu)
    target, per_chip = f'{devices} x {gpu}', 1
  hbm = int(hbm_bytes) if hbm_bytes else chip.hbm_bytes // per_chip
  axes = parse_mesh(mesh) if mesh else [tuple(a) for a in config.mesh]
  the_mesh = _mesh(axes, devs)
  batch_size = int(config.batch_size)
  if batch_size % batch_shards(the_mesh):
    raise UserError(f'batch_size {batch_size} does not divide over the '
                    f'{batch_shards(the_mesh)} batch shards of mesh {dict(the_mesh.shape)}; '
                    'pick a multiple or another mesh')

  # ---- the run's pieces, abstract
  shapes = _shapes(config)
  objective = _objective(config)
  needs = objective.needs
  model_cfg = _planned_model(config.model, accelerator=True)
  eval_apply, init_params, _ = from_config(model_cfg, num_classes=shapes.vocab,
                                           input_shape=shapes.input_shape)
  apply = functools.partial(eval_apply, **output_kwargs(config.model.outputs))
  tx = make_optimizer(config.optimizer, int(config.num_steps))

  teacher, teacher_params = None, 0
  cached = bool(needs & {'teacher_topk_logits', 'teacher_topk_indices'})
  live = not cached and bool(needs & set(teacher_lib.OUTPUT_KEYS))
  if live:
    tmodel = _teacher_model(config)
    if tmodel is None:
      raise UserError('this config distills from a teacher: describe it in config.plan.teacher '
                      "({'name', 'kwargs', 'dtype'}) or set config.teacher.workdir / hf_path")
    t_apply, _, t_vars = from_config(_planned_model(tmodel, accelerator=True),
                                     num_classes=shapes.vocab, input_shape=shapes.input_shape)
    t_apply = functools.partial(t_apply, **output_kwargs(config.teacher.outputs))
    rules = [tuple(r) for r in config.teacher.partition_rules]
    if config.teacher.get('hf_path') and rules == list(teacher_lib.DEFAULT_RULES):
      from kdjax.models.transformer import partition_rules
      rules = partition_rules(the_mesh)
    t_vars = _abstract(t_vars, shardings_from_rules(t_vars, rules, the_mesh))
    teacher = teacher_lib.Teacher(t_apply, t_vars, shapes.vocab, None, 0, '')
    teacher_params = _count(t_vars[0])

  source = StreamSource(None, mesh=the_mesh)
  feed = Feed(source, augment=kdata.make_augment(_plain(config.data.augment)),
              seed=int(config.seed), teacher=teacher, needs=needs)
  batch = _batch(config, shapes, the_mesh, objective, source)

  # ---- the state's shapes and shardings, as the setup makes them
  sample_rows = 2
  x = np.zeros((sample_rows, *shapes.input_shape), shapes.input_dtype)
  teacher_sample = {}
  if teacher is not None:
    rows = {k: jax.ShapeDtypeStruct((sample_rows, *v.shape[2:]), v.dtype)
            for k, v in batch.items()}
    t_x, t_kwargs = teacher_inputs(rows)
    teacher_sample = jax.eval_shape(
        lambda v, tx_, kw: teacher_lib.outputs(teacher.apply, v, tx_, needs, **kw),
        _unsharded(teacher.variables), t_x, t_kwargs)
  elif cached:
    teacher_sample = {k: jax.ShapeDtypeStruct((sample_rows, *v.shape[2:]), v.dtype)
                      for k, v in batch.items() if k.startswith('teacher_')}

  def init(seed, extra):
    params, model_state = init_params(seed)
    out, _ = apply(params, model_state, x, train=False)
    sample = {**sample_inputs(out, jnp), **extra}
    key = jax.random.key(seed)
    loss_params, loss_state = objective.init(jax.random.fold_in(key, 1), sample)
    return init_train_state(params, model_state, tx, rng=jax.random.fold_in(key, 2),
                            loss_params=loss_params, loss_state=loss_state)

  abstract = jax.eval_shape(init, np.int32(config.seed), teacher_sample)
  state_shardings = shardings_from_rules(abstract, config.partition_rules, the_mesh)
  abstract = _abstract(abstract, state_shardings)

  # ---- the call the run jits, lowered and compiled for the target
  step = make_train_step(apply, objective, tx, nonfinite=str(config.nonfinite),
                         train_accuracy=bool(config.train_accuracy))
  calls = TrainCalls(step, feed, state_shardings=state_shardings, mesh=the_mesh)
  repl = NamedSharding(the_mesh, P())
  inputs = {'source': batch, 'seed': jax.ShapeDtypeStruct((), jnp.int32, sharding=repl)}
  if teacher is not None:
    inputs['teacher'] = teacher.variables

  # ---- the numbers
  student = abstract.params['student']
  param_bytes = _bytes_per_device(abstract.params)
  optimizer_bytes = _bytes_per_device(abstract.opt_state)
  teacher_bytes = _bytes_per_device(teacher.variables) if teacher is not None else 0
  batch_bytes = _bytes_per_device(batch)
  tokens = batch_size * (shapes.seq_len or 1)
  model_flops = 6.0 * _matmul_params(student) * tokens + (
      2.0 * _matmul_params(teacher.variables[0]) * tokens if teacher is not None else 0.0)
  common = dict(target=target, chip=chip, devices=len(devs), mesh=dict(the_mesh.shape),
                hbm_bytes_per_chip=hbm, param_bytes=param_bytes,
                optimizer_bytes=optimizer_bytes, teacher_bytes=teacher_bytes,
                batch_bytes=batch_bytes, model_flops_per_step=model_flops,
                student_params=_count(student), teacher_params=teacher_params,
                tokens_per_step=tokens)
  arguments = param_bytes + optimizer_bytes + teacher_bytes + batch_bytes
  if arguments > hbm:   # the inputs alone do not fit: no need to compile
    return Plan(fits=False, peak_bytes_per_chip=arguments, temp_bytes=None, output_bytes=None,
                flops_per_step=None, flops_per_step_global=None, hbm_traffic_bytes=None,
                collectives={}, estimated_step_seconds=None, step_seconds_no_overlap=None,
                mfu=None, largest_buffers=_largest_arguments(abstract, inputs),
                compile_seconds=0.0, message=f'the state, the teacher and the batch alone take '
                f'{_gib(arguments)} per device (not compiled)', **common)
  note(f'compiling the step for {target} ({len(devs)} devices, mesh {dict(the_mesh.shape)})')
  t0 = time.perf_counter()
  # Traced under the mesh (jax.set_mesh), so the models' activation constraints
  # (kdjax.models.transformer: the residual stream split over the batch axes) apply.
  # The persistent compilation cache is off for a topology: a compile-only TPU
  # executable cannot be read back without a TPU client (a warning on every later plan).
  cache = bool(jax.config.jax_enable_compilation_cache)
  if topology is not None:
    jax.config.update('jax_enable_compilation_cache', False)
  compiled, refusal = None, ''
  try:
    with jax.set_mesh(the_mesh):
      lowered = calls.jitted(1).lower(abstract, inputs)
    compiled = lowered.compile()
  except Exception as e:  # noqa: BLE001  (the TPU compiler's out-of-memory refusal)
    if 'RESOURCE_EXHAUSTED' not in str(e) and 'memory' not in str(e).lower():
      raise
    refusal = str(e)
  finally:
    jax.config.update('jax_enable_compilation_cache', cache)
  common['compile_seconds'] = time.perf_counter() - t0

  if compiled is None:
    used = _refused_bytes(refusal)
    temps = used if used is not None and 'temporaries' in refusal else None
    if temps is not None:   # the message counts the temporaries; add the arguments
      used = temps + param_bytes + optimizer_bytes + teacher_bytes + batch_bytes
    return Plan(fits=False, peak_bytes_per_chip=used or 0, temp_bytes=temps, output_bytes=None,
                flops_per_step=None, flops_per_step_global=None, hbm_traffic_bytes=None,
                collectives={}, estimated_step_seconds=None, step_seconds_no_overlap=None,
                mfu=None, largest_buffers=(_refused_buffers(refusal)
                                           or _largest_arguments(abstract, inputs)),
                message=_refusal_line(refusal), **common)
  mem = compiled.memory_analysis()
  peak = int(mem.argument_size_in_bytes + mem.output_size_in_bytes - mem.alias_size_in_bytes
             + mem.temp_size_in_bytes + mem.generated_code_size_in_bytes)
  cost = compiled.cost_analysis()
  cost = (cost[0] if isinstance(cost, (list, tuple)) else cost) or {}
  flops = float(cost.get('flops', 0.0)) or None
  traffic = float(cost.get('bytes accessed', 0.0)) or None
  hlo = compiled.as_text()
  collectives = collective_bytes(hlo)
  link = sum(c['link_bytes'] for c in collectives.values())
  times = [(flops or 0.0) / chip.peak_flops * per_chip,
           (traffic or 0.0) / chip.hbm_bandwidth * per_chip, link / chip.ici_bandwidth]
  estimate = max(times) if any(times) else None
  mfu = (model_flops / (estimate * chip.peak_flops * len(devs) / per_chip)
         if estimate else None)
  buffers = _largest_arguments(abstract, inputs) + largest_hlo_buffers(hlo)
  buffers = sorted(buffers, key=lambda b: -b[1])[:8]
  return Plan(fits=peak <= hbm, peak_bytes_per_chip=peak, temp_bytes=int(mem.temp_size_in_bytes),
              output_bytes=int(mem.output_size_in_bytes), flops_per_step=flops,
              flops_per_step_global=flops * len(devs) if flops else None,
              hbm_traffic_bytes=traffic, collectives=collectives,
              estimated_step_seconds=estimate, step_seconds_no_overlap=sum(times) or None,
              mfu=mfu, largest_buffers=buffers, **common)


def _unsharded(tree):
  """Abstract arrays without their shardings (for shape-only tracing on the host)."""
  return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype), tree)


def _plain(value):
  return value.to_dict() if hasattr(value, 'to_dict') else value


# --------------------------------------------------------------------------- HLO figures

_DTYPE_BYTES = {'pred': 1, 's8': 1, 'u8': 1, 's16': 2, 'u16': 2, 'f16': 2, 'bf16': 2,
                's32': 4, 'u32': 4, 'f32': 4, 's64': 8, 'u64': 8, 'f64': 8, 'c64': 8,
                'c128': 16, 'f8e4m3fn': 1, 'f8e5m2': 1, 's4': 1, 'u4': 1}
_ARRAY = re.compile(r'\b(' + '|'.join(sorted(_DTYPE_BYTES, key=len, reverse=True))
                    + r')\[([\d,]*)\]')
_INSTR = re.compile(r'^\s*(?:ROOT\s+)?%?([\w.\-]+)\s*=\s*(.+?)\s+([\w\-]+)\((.*)$')


def _array_bytes(text: str) -> list[int]:
  return [_DTYPE_BYTES[d] * math.prod(int(s) for s in dims.split(',') if s)
          for d, dims in _ARRAY.findall(text)]


def _group_size(line: str, default: int) -> int:
  """Devices per group of a collective: ``replica_groups={{0,1},{2,3}}``, the iota form
  ``replica_groups=[4,2]<=[8]`` (last dimension), or the mesh form of libtpu's compiler
  ``replica_groups=mesh['axis_0'=16,'axis_1'=4], device_ids=(...) {'axis_0'}`` (the
  product of the named axes); a collective-permute's pairs count 2.

  >>> _group_size("replica_groups=mesh['axis_0'=16,'axis_1'=4] {'axis_0','axis_1'}", 2)
  64
  """
  m = re.search(r'replica_groups=\{\{([\d,]+)\}', line)
  if m:
    return len(m.group(1).split(','))
  m = re.search(r'replica_groups=\[([\d,]+)\]<=', line)
  if m:
    return int(m.group(1).split(',')[-1])
  m = re.search(r"replica_groups=mesh\[([^\]]*)\][^{]*\{([^}]*)\}", line)
  if m:
    sizes = dict(re.findall(r"'([^']+)'=(\d+)", m.group(1)))
    named = re.findall(r"'([^']+)'", m.group(2))
    if named and all(a in sizes for a in named):
      return math.prod(int(sizes[a]) for a in named)
  return default


def collective_bytes(hlo_text: str, num_devices: int = 2) -> dict:
  """``{op: {'count', 'bytes', 'link_bytes'}}`` over the collectives of an optimized HLO
  module's text: ``bytes`` the full arrays the ops produce (an all-gather's result, a
  reduce-scatter's operand, ...), ``link_bytes`` what each device sends in the ring model
  of the module docstring. Each collective counts once however often its text appears:

  * async ``*-start`` ops count once (their ``*-done`` not); an all-gather's or a
    collective-permute's start result holds its operands, then its results (then context
    scalars): only the results count;
  * libtpu's compiler splits an asynchronous collective into a start fusion
    (``AsyncCollectiveStart``), continuation fusions (``async_collective_fusion.N``,
    the collective overlapped with computation) and a done fusion
    (``AsyncCollectiveDone``), each holding a copy of the collective with the same
    ``channel_id``: copies with the same op, ``channel_id`` and result shapes are one
    collective (counted each, they made ``kdjax plan`` report 3.2 times the all-gathered
    bytes of the 7B -> 1B plan, ``benchmarks/RESULTS.md``);
  * an all-reduce inside libtpu's ``all-reduce-scatter`` fusion computation is that
    fusion's reduce-scatter (its operand the full array, sent once, not twice).

  A collective inside a while loop's body counts once, not once per iteration.

  >>> hlo = ('%ag = bf16[8,4]{1,0} all-gather(bf16[2,4]{1,0} %p), replica_groups={{0,1,2,3}}'
  ...        ', dimensions={0}')
  >>> collective_bytes(hlo)['all-gather']
  {'count': 1, 'bytes': 64, 'link_bytes': 48.0}
  """
  out, seen, computation = {}, set(), ''
  for line in hlo_text.splitlines():
    if line[:1] not in ('', ' ', '\t') and line.rstrip().endswith('{'):
      computation = line.split()[1 if line.startswith('ENTRY') else 0].lstrip('%')
      continue
    m = _INSTR.match(line) if any(c in line for c in COLLECTIVES) else None
    if not m:
      continue
    _, result_type, op, rest = m.groups()
    kind = op[:-len('-start')] if op.endswith('-start') else op
    if kind not in COLLECTIVES:
      continue
    arrays = _ARRAY.findall(result_type)
    head = rest.split(')', 1)[0]
    operands = _array_bytes(head) if '(' not in head else []
    if not arrays:
      continue
    channel = re.search(r'\bchannel_id=(\d+)', line)
    if channel:
      key = (kind, channel.group(1), tuple(arrays))
      if key in seen:
        continue
      seen.add(key)
    if op in ('all-gather-start', 'collective-permute-start'):
      while len(arrays) > 1 and arrays[-1] in (('u32', ''), ('s32', '')):
        arrays.pop()                            # the context scalars
      arrays = arrays[len(arrays) // 2:]        # (operands, results)
    result = sum(_DTYPE_BYTES[d] * math.prod(int(s) for s in dims.split(',') if s)
                 for d, dims in arrays)
    n = _group_size(line, num_devices)
    if kind == 'all-reduce' and computation.startswith('all-reduce-scatter'):
      kind, operands = 'reduce-scatter', [result]
    elif kind == 'reduce-scatter' and not operands:   # operands printed without types
      operands = [result * n]
    operand = sum(operands) if operands else result
    share = (n - 1) / n if n > 1 else 0.0
    if kind == 'all-gather':
      full, sent = result, result * share
    elif kind == 'reduce-scatter':
      full, sent = operand, operand * share
    elif kind == 'all-reduce':
      full, sent = result, 2 * result * share
    elif kind == 'all-to-all':
      full, sent = operand, operand * share
    else:   # collective-permute
      full, sent = operand, float(operand)
    entry = out.setdefault(kind, {'count': 0, 'bytes': 0, 'link_bytes': 0.0})
    entry['count'] += 1
    entry['bytes'] += int(full)
    entry['link_bytes'] += float(sent)
  return out


def largest_hlo_buffers(hlo_text: str, top: int = 5) -> list[tuple[str, int]]:
  """The ``top`` largest arrays an optimized HLO module's instructions produce, as
  ``('temp <op> <dtype>[shape]', bytes)``: where the temporaries go (not all live at once)."""
  seen, out = set(), []
  for line in hlo_text.splitlines():
    m = _INSTR.match(line)
    if not m or m.group(3) in ('parameter', 'get-tuple-element', 'tuple', 'bitcast',
                               'constant', 'copy-done', 'all-gather-done',
                               'all-reduce-done', 'collective-permute-done'):
      continue
    for d, dims in _ARRAY.findall(m.group(2)):
      nbytes = _DTYPE_BYTES[d] * math.prod(int(s) for s in dims.split(',') if s)
      key = (m.group(3), d, dims)
      if key not in seen:
        seen.add(key)
        out.append((f'temp {m.group(3)} {d}[{dims}]', nbytes))
  return sorted(out, key=lambda b: -b[1])[:top]


def _largest_arguments(abstract_state, inputs, top: int = 5) -> list[tuple[str, int]]:
  from kdjax.parallel import path_str
  rows = []
  for name, tree in (('state', abstract_state), ('inputs', inputs)):
    for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]:
      shape = x.sharding.shard_shape(x.shape)
      nbytes = math.prod(shape) * jnp.dtype(x.dtype).itemsize
      rows.append((f'{name}/{path_str(path)} {jnp.dtype(x.dtype).name}{list(shape)}', nbytes))
  return sorted(rows, key=lambda b: -b[1])[:top]


_SIZE = re.compile(r'([\d.]+)\s*([KMGT]?)i?B?\b')


def _to_bytes(number: str, unit: str) -> int:
  return int(float(number) * {'': 1, 'K': 2**10, 'M': 2**20, 'G': 2**30, 'T': 2**40}[unit])


def _refused_bytes(message: str) -> int | None:
  """The bytes a refused TPU program needs, from the compiler's message: ``Used 20.5G of
  15.75G hbm``, or ``memory required for HLO temporaries (260.61G) exceeds available HBM``
  (temporaries only: the caller adds the arguments).

  >>> _refused_bytes('the total memory required for HLO temporaries (2.00G) exceeds ...')
  2147483648
  """
  m = re.search(r'Used\s+([\d.]+)([KMGT]?)\s+of\s+([\d.]+)([KMGT]?)\s+hbm', message)
  if m is None:
    m = re.search(r'required for HLO temporaries \(([\d.]+)([KMGT]?)\)', message)
  return _to_bytes(m.group(1), m.group(2)) if m else None


def _refusal_line(message: str) -> str:
  for line in message.splitlines():
    if 'Used' in line and 'hbm' in line or 'Ran out of memory' in line:
      return line.strip()
  return message.strip().splitlines()[0][:300] if message.strip() else ''


def _refused_buffers(message: str, top: int = 8) -> list[tuple[str, int]]:
  """The largest allocations a TPU out-of-memory message lists (``Size: 1.00G`` lines
  followed by the allocation's description)."""
  rows, lines = [], message.splitlines()
  for i, line in enumerate(lines):
    m = re.search(r'Size:\s*([\d.]+)([KMGT]?)', line)
    if m:
      what = ' '.join(l.strip() for l in lines[i + 1:i + 4]
                      if l.strip() and 'Size:' not in l)[:160]
      rows.append((what or line.strip(), _to_bytes(m.group(1), m.group(2))))
  return rows[:top]


# --------------------------------------------------------------------------- the report

def _gib(n) -> str:
  """Bytes in the largest binary unit that keeps a digit before the point.

  >>> _gib(3 * 2**30), _gib(1536), _gib(None)
  ('3.00 GiB', '1.50 KiB', 'n/a')
  """
  if n is None:
    return 'n/a'
  for unit, size in (('GiB', 2**30), ('MiB', 2**20), ('KiB', 2**10)):
    if abs(n) >= size:
      return f'{n / size:.2f} {unit}'
  return f'{int(n)} B'


def verdict(p: Plan) -> str:
  """One line: the peak against the memory per device (and the compiler's refusal)."""
  line = (f'peak {_gib(p.peak_bytes_per_chip)} per device > {_gib(p.hbm_bytes_per_chip)} HBM '
          f'on {p.target} (mesh {p.mesh})' if p.peak_bytes_per_chip else
          f'the compiler refused the program for {p.target} (mesh {p.mesh})')
  return line + ('; shard the parameters (an fsdp mesh axis) or lower batch_size'
                 if not p.fits else '')


def format_plan(p: Plan) -> str:
  """The plan as the ``kdjax plan`` command prints it."""
  lines = [f'{"fits" if p.fits else "DOES NOT FIT"}: peak {_gib(p.peak_bytes_per_chip)} of '
           f'{_gib(p.hbm_bytes_per_chip)} HBM per device on {p.target} '
           f'({p.devices} devices, mesh {p.mesh})']
  if p.message:
    lines.append(f'  compiler: {p.message}')
  lines += [
      f'  student {p.student_params / 1e9:.3f} B parameters, teacher '
      f'{p.teacher_params / 1e9:.3f} B, {p.tokens_per_step} tokens per step',
      f'  per device: parameters {_gib(p.param_bytes)}, optimizer state '
      f'{_gib(p.optimizer_bytes)}, teacher weights {_gib(p.teacher_bytes)}, batch '
      f'{_gib(p.batch_bytes)}',
      f'              activations/temporaries {_gib(p.temp_bytes)}, outputs '
      f'{_gib(p.output_bytes)} (aliased to the donated state)',
  ]
  if p.flops_per_step is not None:
    lines.append(f'  FLOPs per step: {p.flops_per_step:.3e} per device (compiled, remat '
                 f'included), {p.flops_per_step_global:.3e} global; model FLOPs '
                 f'{p.model_flops_per_step:.3e} global')
  if p.collectives:
    parts = [f'{op} x{c["count"]} {_gib(c["bytes"])}' for op, c in
             sorted(p.collectives.items())]
    sent = sum(c['link_bytes'] for c in p.collectives.values())
    lines.append(f'  collectives per device: {", ".join(parts)}; sent over the links '
                 f'{_gib(sent)}')
  if p.estimated_step_seconds is not None:
    lines.append(f'  roofline step time {p.estimated_step_seconds * 1e3:.3g} ms '
                 f'(no overlap {p.step_seconds_no_overlap * 1e3:.3g} ms); implied MFU '
                 f'{100 * p.mfu:.1f}% at {p.chip.peak_flops / 1e12:.0f} TFLOP/s bf16 per chip')
  if not p.fits and p.largest_buffers:
    lines.append('  largest buffers per device:')
    lines += [f'    {_gib(n):>10}  {what}' for what, n in p.largest_buffers]
  done = f'compiled in {p.compile_seconds:.1f} s' if p.compile_seconds else 'not compiled'
  lines.append(f'  {done}; chip figures: {p.chip.source}')
  return '\n'.join(lines)


def write_json(p: Plan, path: str) -> None:
  """Writes :meth:`Plan.to_json` to ``path`` (a local path or a URL, ``gs://...``)."""
  storage.write_text(path, json.dumps(p.to_json(), indent=2, default=float))
