"""``build_cache``: run the teacher once over the training split, for E augmentation epochs.

Entry ``(example id, augmentation epoch e)`` holds what the teacher outputs for
``augment(x[id], id, e)``, with the augmentation of the distill config applied exactly as
the train step applies it (``make_augment(config.data.augment)(x, ids, epochs,
seed=config.seed)``), so cached epoch ``e`` is what the live teacher would see at epoch
``e``. Stored per entry: the top-k raw logits and their classes, the log-sum-exp of all
logits (so any temperature and the missing mass can be recovered; see
``kdjax.losses.sparse``) and optionally named teacher features.

With ``k`` equal to the number of classes the logits are kept in class order (indices
``0..C-1``), so the sparse losses add terms in the same order as the dense ones.

Token data (a language model's rows of ``T`` ids) is cached per token instead, in one of
three modes (``mode``, or ``config.cache.mode``): ``'topk'`` stores the teacher's top-k
logits of every position with a compact codec (:mod:`kdjax.cache.tokens`); ``'sampled'``
stores ``config.cache.samples`` classes per position drawn from the teacher
(Random-Sampling KD, :mod:`kdjax.cache.sampled`);
``'generate'`` stores the teacher's continuations of the prompts of a prompt split, for
sequence-level KD (:mod:`kdjax.cache.sequences`). A ``config.cache`` group
(:func:`cache_config`) names their settings; the arguments override it.

Work is split in chunks of ``chunk_size`` examples of one epoch (see
``kdjax.cache.store``). The teacher runs jitted on batches of ``config.batch_size``
sharded over the mesh's data axis; in a multi-process run every process takes part in
every forward pass and process ``p`` writes the chunks ``i`` with ``i mod P == p``
(``cache_dir`` must be on a file system all processes share, or a bucket: ``gs://...``).
"""

from __future__ import annotations

import functools
import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import data as kdata
from kdjax import storage
from kdjax import teacher as teacher_lib
from kdjax import workdir as workdir_lib
from kdjax.cache import codec as codec_lib
from kdjax.cache import sampled
from kdjax.cache import sequences
from kdjax.cache import store
from kdjax.cache import tokens
from kdjax.cache.fingerprint import dataset_fingerprint
from kdjax.cache.settings import cache_settings
from kdjax.cache.settings import is_token_data
from kdjax.engine.config import validate
from kdjax.errors import UserError
from kdjax.models.base import MODEL_INPUT_KEYS
from kdjax.parallel import batch_axes
from kdjax.parallel import batch_shards
from kdjax.parallel import batch_sharding
from kdjax.parallel import initialize_from_env
from kdjax.parallel import make_mesh

# Test hook: seconds to sleep after each written chunk (lets a test kill a build midway).
_DELAY_ENV = 'KDJAX_CACHE_CHUNK_DELAY'
_POOLS = ('none', 'mean', 'max')
# Default chunk sizes (rounded to whole batches): examples, tokens, prompts.
_CHUNK_EXAMPLES, _CHUNK_TOKENS, _CHUNK_PROMPTS = 4096, 1 << 16, 1024


def parse_feature(spec: str | dict) -> dict:
  """``'NAME[:POOL[:DTYPE]]'`` or a dict -> ``{'name', 'pool', 'dtype'}``.

  ``pool``: ``none`` (keep the shape), ``mean`` or ``max`` over every axis between the
  batch axis and the last (channel) axis.

  >>> parse_feature('stage2:mean:bfloat16')
  {'name': 'stage2', 'pool': 'mean', 'dtype': 'bfloat16'}
  """
  if isinstance(spec, str):
    parts = spec.split(':')
    spec = dict(zip(('name', 'pool', 'dtype'), parts))
  out = {'name': str(spec['name']), 'pool': str(spec.get('pool') or 'none'),
         'dtype': str(spec.get('dtype') or 'float32')}
  if out['pool'] not in _POOLS:
    raise UserError(f"feature {out['name']!r}: pool must be one of {_POOLS} (got {out['pool']!r})")
  if out['dtype'] not in ('float32', 'bfloat16', 'float16'):
    raise UserError(f"feature {out['name']!r}: dtype must be float32, bfloat16 or float16")
  return out


def quantize(values: jax.Array, dtype: str) -> dict[str, jax.Array]:
  """Top-k logits ``[..., k]`` float32 in the stored dtype.

  ``int8``: per row (last axis), ``logit ≈ offset + scale · q`` with ``q`` in ``[-127, 127]``,
  ``offset`` the mid-range and ``scale = (max - min) / 254`` (error at most scale / 2).
  """
  if dtype == 'int8':
    hi, lo = jnp.max(values, -1), jnp.min(values, -1)
    offset = (hi + lo) / 2
    scale = jnp.where(hi > lo, (hi - lo) / 254.0, 1.0)
    q = jnp.clip(jnp.round((values - offset[..., None]) / scale[..., None]), -127, 127)
    return {'teacher_topk_logits': q.astype(jnp.int8), 'teacher_topk_scale': scale,
            'teacher_topk_offset': offset}
  return {'teacher_topk_logits': values.astype(jnp.dtype(dtype))}


def _pool(f, pool):
  if pool == 'none' or f.ndim <= 2:
    return f
  axes = tuple(range(1, f.ndim - 1))
  return jnp.mean(f, axes) if pool == 'mean' else jnp.max(f, axes)


def make_infer(apply, augment, *, seed: int, k: int, num_classes: int, dtype: str,
               features: Sequence[dict] = (), index_dtype=jnp.int16):
  """``infer(variables, x, ids, epochs) -> {array name: [b, ...]}`` (pure; jit it)."""

  def infer(variables, x, ids, epochs):
    x = augment(x, ids, epochs, seed=seed)
    out = teacher_lib.outputs(apply, variables, x, needs=('teacher_logits', 'teacher_features'))
    logits = out['teacher_logits'].astype(jnp.float32)
    rows = {'teacher_logsumexp': jax.nn.logsumexp(logits, axis=-1)}
    if k == num_classes:
      values = logits
      indices = jnp.broadcast_to(jnp.arange(num_classes), logits.shape)
    else:
      values, indices = jax.lax.top_k(logits, k)
    rows.update(quantize(values, dtype))
    rows['teacher_topk_indices'] = indices.astype(index_dtype)
    for feat in features:
      if feat['name'] not in out['teacher_features']:
        raise UserError(f"the teacher has no feature {feat['name']!r}; it has "
                        f"{sorted(out['teacher_features'])}")
      f = _pool(out['teacher_features'][feat['name']].astype(jnp.float32), feat['pool'])
      rows['feature.' + feat['name']] = f.astype(jnp.dtype(feat['dtype']))
    return rows

  return infer


def build_cache(config, cache_dir: str, *, mode: str | None = None, epochs: int = 1,
                k: int | None = None, dtype: str | None = None, codec: str | None = None,
                features: Sequence[str | dict] = (), chunk_size: int | None = None,
                progress: bool | None = None) -> dict:
  """Builds (or finishes) the teacher cache of a distill config in ``cache_dir``.

  Args:
    config: a distill config (``config.teacher.workdir`` names the teacher; the data,
      augmentation, seed, batch size and mesh are the run's; ``config.cache``, if any,
      the settings of a token cache: :func:`cache_config`).
    cache_dir: where the cache goes; an unfinished build there is resumed, a finished
      one with the same plan is left as it is.
    mode: token data only: ``'topk'`` (default), ``'sampled'`` or ``'generate'``.
    epochs: augmentation epochs ``E`` to cache (1 is enough without augmentation;
      token data: 1, or sampled continuations per prompt in ``'generate'`` mode).
    k: top-k logits kept per entry (default: all classes, or ``config.cache.k``).
    dtype: classifier data: ``float32`` (default), ``bfloat16``, ``float16`` or ``int8``
      (with a per-row scale).
    codec: token data: a :mod:`kdjax.cache.codec` name (default ``config.cache.codec``,
      else ``'f32+i32'``).
    features: classifier data: teacher features to keep, ``'NAME[:POOL[:DTYPE]]'`` (see
      ``parse_feature``).
    chunk_size: examples (rows, prompts) per chunk (a multiple of ``config.batch_size``;
      default about 4096 examples, 65536 tokens or 1024 prompts).
    progress: show a progress bar (default ``config.progress``).

  Returns:
    The manifest (also in ``cache_dir/manifest.json``).
  """
  validate(config)
  workdir_lib.check_creatable(cache_dir)
  if int(epochs) < 1:
    raise UserError(f'cache epochs must be positive (got {epochs})')
  if k is not None and int(k) < 1:
    raise UserError(f'cache k must be positive (got {k})')
  if chunk_size is not None and int(chunk_size) < 1:
    raise UserError(f'cache chunk size must be positive (got {chunk_size})')
  initialize_from_env()
  try:
    mesh = make_mesh([tuple(axis) for axis in config.mesh])
  except ValueError as e:
    raise UserError(f'config.mesh: {e}') from None
  batch = int(config.batch_size)
  if batch % batch_shards(mesh):
    raise UserError(f'batch_size {batch} does not divide over the {batch_shards(mesh)} devices '
                    f'of mesh axes {" x ".join(batch_axes(mesh))}')
  data_dir = config.data.data_dir or None
  spec = kdata.dataset_spec(config.data.name, data_dir=data_dir)
  token_data = is_token_data(spec)
  if token_data and (dtype is not None or features):
    raise UserError('token data is cached with a codec (--codec, e.g. int4+ef), not a --dtype '
                    'or --features')
  if not token_data and (mode not in (None, 'topk') or codec is not None):
    raise UserError(f'--mode generate and --codec are for token data (language models); '
                    f'{config.data.name} is cached with --dtype')
  dtype = 'float32' if dtype is None else dtype
  if dtype not in store.DTYPES:
    raise UserError(f'cache dtype must be one of {", ".join(store.DTYPES)} (got {dtype!r})')
  features = [parse_feature(f) for f in features]
  settings = (cache_settings(config, num_classes=spec.num_classes, mode=mode, k=k, codec=codec)
              if token_data else None)
  if config.teacher.get('vocab_method', 'none') != 'none':
    raise UserError(f'config.teacher.vocab_method={config.teacher.vocab_method} distills from a '
                    'live teacher on its own tokens; a cache holds the teacher on the student\'s '
                    'tokens: set it to none, or train without a cache')
  teacher_tokens = teacher_lib.tokenizer(config.teacher) if token_data else None
  data_tokens = teacher_lib.data_tokenizer(config.data.name, data_dir) if token_data else None
  if teacher_tokens is not None and data_tokens is not None and (
      teacher_lib.tokenizer_digest(teacher_tokens) != teacher_lib.tokenizer_digest(data_tokens)):
    raise UserError(f"the teacher's and {config.data.name}'s tokenizers differ; a cache keyed "
                    "by the student's tokens needs a teacher with the same tokenizer")
  teacher = teacher_lib.load(config.teacher, mesh)
  num_classes = spec.num_classes
  if teacher.num_classes != num_classes:
    raise UserError(f'the teacher predicts {teacher.num_classes} classes but '
                    f'{config.data.name} has {num_classes}')
  arrays = kdata.load_arrays(config.data.name, config.data.train_split, data_dir=data_dir)
  if chunk_size is None:
    chunk_size = (settings or {}).get('chunk_size') or _default_chunk_size(settings, arrays, batch)
  chunk_size = int(chunk_size)
  if chunk_size <= 0 or chunk_size % batch:
    raise UserError(f'chunk size {chunk_size} must be a positive multiple of batch_size {batch}')

  if settings is None:
    k = num_classes if k is None else int(k)
    if not 1 <= k <= num_classes:
      raise UserError(f'cache k must be in [1, {num_classes}] (got {k})')
    plan, forward = _plan(config, teacher, arrays, mesh, epochs=int(epochs), k=k, dtype=dtype,
                          features=features, chunk_size=chunk_size)
  elif settings['mode'] == 'topk':
    plan, forward = _plan_tokens(config, teacher, arrays, mesh, epochs=int(epochs),
                                 settings=settings, chunk_size=chunk_size)
  elif settings['mode'] == 'sampled':
    plan, forward = _plan_sampled(config, teacher, arrays, mesh, epochs=int(epochs),
                                  settings=settings, chunk_size=chunk_size)
  else:
    plan, forward = _plan_generate(config, teacher, arrays, mesh, epochs=int(epochs),
                                   settings=settings, chunk_size=chunk_size)
  _claim(cache_dir, plan)
  ranges = store.chunk_ranges(len(arrays['label']), chunk_size)
  work = [(e, i, s, t) for e in range(int(epochs)) for i, (s, t) in enumerate(ranges)]
  show = (config.progress if progress is None else progress) and jax.process_index() == 0
  t0 = time.time()
  computed, fresh = _compute_chunks(cache_dir, work, forward, num_examples=len(arrays['label']),
                                    batch=batch, show=show)
  manifest = _finish(cache_dir, plan, work)
  seconds = time.time() - t0
  if show:
    print(f'cache: {len(work)} chunks ({fresh} computed now), {computed} entries in '
          f'{seconds:.1f}s ({computed / max(seconds, 1e-9):.0f} examples/s)', flush=True)
  return manifest


def _default_chunk_size(settings, arrays, batch: int) -> int:
  """About 4096 examples, 65536 tokens or 1024 prompts, in whole batches."""
  if settings is None:
    rows = _CHUNK_EXAMPLES
  elif settings['mode'] in ('topk', 'sampled'):
    rows = _CHUNK_TOKENS // arrays['x'].shape[1]
  else:
    rows = _CHUNK_PROMPTS
  return batch * max(1, rows // batch)


def _source(config, teacher, arrays, *, epochs: int, chunk_size: int) -> dict:
  """The plan fields every kind of cache has: what it was built from."""
  return {
      'format': store.FORMAT, 'version': store.VERSION,
      'teacher': {'fingerprint': teacher.fingerprint, 'step': int(teacher.step),
                  'model': str(teacher.config.model.name), 'num_classes': teacher.num_classes},
      'dataset': dataset_fingerprint(config.data.name, config.data.train_split, arrays),
      'augment': kdata.normalize_spec(_plain(config.data.augment)), 'seed': int(config.seed),
      'epochs': epochs, 'num_classes': teacher.num_classes, 'chunk_size': chunk_size,
  }


def _replicated_forward(run, mesh):
  """``forward(args, keep) -> host rows | None``: ``run`` on replicated copies of the host
  arrays ``args`` (every process passes the same), its replicated outputs read back by
  the process that keeps them (the others only take part in the computation)."""
  repl = NamedSharding(mesh, P())

  def forward(args, keep: bool):
    out = run(*[jax.make_array_from_process_local_data(repl, np.asarray(a)) for a in args])
    if not keep:
      return None
    return {key: np.asarray(v.addressable_data(0)) for key, v in out.items()}

  return forward


def _plan(config, teacher, arrays, mesh, *, epochs, k, dtype, features, chunk_size):
  """``(plan, run)``: what the cache will hold (the manifest without its chunks), and the
  jitted ``run(variables, x, ids, epochs) -> rows`` that computes a batch of entries."""
  num_classes = teacher.num_classes
  batch = int(config.batch_size)
  augment_spec = kdata.normalize_spec(_plain(config.data.augment))
  index_dtype = np.int16 if num_classes <= np.iinfo(np.int16).max else np.int32
  plan = {
      'format': store.FORMAT, 'version': store.VERSION,
      'teacher': {'fingerprint': teacher.fingerprint, 'step': int(teacher.step),
                  'model': str(teacher.config.model.name), 'num_classes': num_classes},
      'dataset': dataset_fingerprint(config.data.name, config.data.train_split, arrays),
      'augment': augment_spec, 'seed': int(config.seed), 'epochs': epochs,
      'k': k, 'num_classes': num_classes, 'dtype': dtype, 'chunk_size': chunk_size,
      'features': features,
  }
  infer = make_infer(teacher.apply, kdata.make_augment(augment_spec), seed=int(config.seed),
                     k=k, num_classes=num_classes, dtype=dtype, features=features,
                     index_dtype=index_dtype)
  repl = NamedSharding(mesh, P())
  batch_sh = batch_sharding(mesh)

  def sharded(variables, x, ids, epochs_):
    x, ids, epochs_ = jax.lax.with_sharding_constraint((x, ids, epochs_), batch_sh)
    return infer(variables, x, ids, epochs_)

  teacher_sh = jax.tree.map(lambda a: a.sharding, teacher.variables)
  run = jax.jit(sharded, in_shardings=(teacher_sh, repl, repl, repl), out_shardings=repl)
  sample = jax.eval_shape(run, teacher.variables,
                          np.zeros((batch, *arrays['x'].shape[1:]), np.float32),
                          np.zeros(batch, np.int32), np.zeros(batch, np.int32))
  plan['arrays'] = {name: {'dtype': str(s.dtype), 'shape': list(s.shape[1:])}
                    for name, s in sorted(sample.items())}
  plan['bytes_per_entry'] = int(sum(math.prod(s.shape[1:]) * s.dtype.itemsize
                                    for s in sample.values()))
  on_mesh = _replicated_forward(functools.partial(run, teacher.variables), mesh)

  def forward(epoch, first, ids, keep):
    del first
    return on_mesh((arrays['x'][ids], arrays['id'][ids].astype(np.int32),
                    np.full(len(ids), epoch, np.int32)), keep)

  return plan, forward


def _plan_tokens(config, teacher, arrays, mesh, *, epochs, settings, chunk_size):
  """``(plan, forward)`` of a per-token top-k cache (:mod:`kdjax.cache.tokens`)."""
  if epochs != 1:
    raise UserError(f'token data has no augmentation: cache one epoch (--epochs 1, not {epochs})')
  vocab, k, codec = teacher.num_classes, settings['k'], settings['codec']
  seq_len = int(arrays['x'].shape[1])
  sizes = codec_lib.layout(codec, k, vocab)
  plan = _source(config, teacher, arrays, epochs=epochs, chunk_size=chunk_size)
  plan.update({
      'kind': tokens.KIND, 'settings': {key: settings[key] for key in ('mode', 'k', 'codec')},
      'k': k, 'codec': codec, 'vocab_size': vocab, 'tokens': seq_len,
      'bytes_per_token': codec_lib.bytes_per_token(codec, k, vocab),
      'bytes_per_entry': seq_len * sum(sizes.values()),
      'arrays': {key: {'dtype': 'uint8', 'shape': [seq_len, sizes[key]]} for key in tokens.PARTS},
  })
  inputs = tuple(key for key in MODEL_INPUT_KEYS if key in arrays)
  infer = tokens.make_token_infer(teacher.apply, k=k, vocab_size=vocab)
  batch_sh = batch_sharding(mesh)

  def sharded(variables, x, mask, *model_inputs):
    x, mask, model_inputs = jax.lax.with_sharding_constraint((x, mask, model_inputs), batch_sh)
    values, indices, lse = infer(variables, x, mask, dict(zip(inputs, model_inputs)))
    return {'values': values, 'indices': indices, 'logsumexp': lse}

  repl = NamedSharding(mesh, P())
  teacher_sh = jax.tree.map(lambda a: a.sharding, teacher.variables)
  run = jax.jit(sharded, in_shardings=(teacher_sh,) + (repl,) * (2 + len(inputs)),
                out_shardings=repl)
  on_mesh = _replicated_forward(functools.partial(run, teacher.variables), mesh)
  mask = arrays['mask'] if 'mask' in arrays else np.ones(arrays['x'].shape, bool)

  def forward(epoch, first, ids, keep):
    del epoch, first
    out = on_mesh((arrays['x'][ids], mask[ids], *(arrays[key][ids] for key in inputs)), keep)
    if out is None:
      return None
    return tokens.encode_rows(out['values'], out['indices'], out['logsumexp'], mask[ids],
                              codec=codec, vocab_size=vocab)

  return plan, forward


def _plan_sampled(config, teacher, arrays, mesh, *, epochs, settings, chunk_size):
  """``(plan, forward)`` of a per-token sampled cache (:mod:`kdjax.cache.sampled`)."""
  if epochs != 1:
    raise UserError(f'token data has no augmentation: cache one epoch (--epochs 1, not {epochs})')
  vocab, seq_len = teacher.num_classes, int(arrays['x'].shape[1])
  n, t, seed = settings['samples'], settings['proposal_temperature'], settings['seed']
  weighted = t != 1.0
  sizes = codec_lib.sample_layout(n, vocab, weighted=weighted)
  plan = _source(config, teacher, arrays, epochs=epochs, chunk_size=chunk_size)
  plan.update({
      'kind': sampled.KIND, 'settings': {key: settings[key] for key in sampled.SETTINGS},
      'samples': n, 'proposal_temperature': t, 'k': n,
      'sample_format': codec_lib.sample_format(n, t), 'vocab_size': vocab, 'tokens': seq_len,
      'bytes_per_token': codec_lib.sample_bytes_per_token(n, vocab, weighted=weighted),
      'bytes_per_entry': seq_len * sum(sizes.values()),
      'arrays': {key: {'dtype': 'uint8', 'shape': [seq_len, size]} for key, size in sizes.items()},
  })
  inputs = tuple(key for key in MODEL_INPUT_KEYS if key in arrays)
  infer = sampled.make_sample_infer(teacher.apply, samples=n, proposal_temperature=t, seed=seed)
  batch_sh = batch_sharding(mesh)

  def sharded(variables, x, mask, ids, *model_inputs):
    x, mask, ids, model_inputs = jax.lax.with_sharding_constraint(
        (x, mask, ids, model_inputs), batch_sh)
    draws, log_weights = infer(variables, x, mask, ids, dict(zip(inputs, model_inputs)))
    return {'draws': draws, 'log_weights': log_weights}

  repl = NamedSharding(mesh, P())
  teacher_sh = jax.tree.map(lambda a: a.sharding, teacher.variables)
  run = jax.jit(sharded, in_shardings=(teacher_sh,) + (repl,) * (3 + len(inputs)),
                out_shardings=repl)
  on_mesh = _replicated_forward(functools.partial(run, teacher.variables), mesh)
  mask = arrays['mask'] if 'mask' in arrays else np.ones(arrays['x'].shape, bool)

  def forward(epoch, first, ids, keep):
    del epoch, first
    out = on_mesh((arrays['x'][ids], mask[ids], ids.astype(np.int32),
                   *(arrays[key][ids] for key in inputs)), keep)
    if out is None:
      return None
    return sampled.encode_rows(out['draws'], out['log_weights'], mask[ids], vocab_size=vocab,
                               weighted=weighted)

  return plan, forward


def decoder_config(teacher: teacher_lib.Teacher, seq_len: int):
  """The :class:`kdjax.models.DecoderConfig` of a decoder teacher (its key/value cache's
  shape), or a ``UserError`` when the teacher is not a decoder."""
  from flax import nnx
  from kdjax.models import Decoder
  from kdjax.models import create
  model = teacher.config.model
  kwargs = _plain(model.kwargs) or {}
  try:
    module = nnx.eval_shape(lambda: create(
        str(model.name), num_classes=teacher.num_classes, input_shape=(seq_len,),
        dtype=jnp.dtype(model.get('dtype') or 'float32'), **dict(kwargs)))
  except (KeyError, TypeError, ValueError) as e:
    raise UserError(f'the teacher model {model.name!r} cannot decode {seq_len} tokens: '
                    f'{str(e).splitlines()[0]}') from None
  if not isinstance(module, Decoder):
    raise UserError(f'generate mode needs a decoder teacher (llama, gpt2, qwen2, decoder); '
                    f'the teacher is {model.name!r}')
  return module.config


def _plan_generate(config, teacher, arrays, mesh, *, epochs, settings, chunk_size):
  """``(plan, forward)`` of a cache of teacher generations (:mod:`kdjax.cache.sequences`)."""
  gen = settings['generate']
  where = f'{config.data.name}:{config.data.train_split}'
  if 'prompt_ids' not in arrays or not arrays['prompt_mask'][:, -1].all():
    raise UserError(f'generate mode continues prompts, but the rows of {where} have none; '
                    'use a prompt split (--config.data.train_split=prompts_train)')
  if epochs > 1 and gen['temperature'] == 0:
    raise UserError(f'greedy decoding gives the same continuation every epoch: use --epochs 1, '
                    f'or sample (config.cache.generate.temperature > 0) for {epochs} draws')
  seq_len = int(arrays['x'].shape[1])
  prompt_len = int(arrays['prompt_ids'].shape[1])
  width = seq_len - prompt_len
  max_new = gen['max_new_tokens'] or width
  if not 1 <= max_new <= width:
    raise UserError(f'config.cache.generate.max_new_tokens must be in [1, {width}] (the '
                    f'continuation of {where} is {width} tokens; got {max_new})')
  sequences.check_context(teacher, prompt_len=prompt_len, max_new_tokens=max_new)
  decoding = {'temperature': gen['temperature'], 'top_k': gen['top_k'] or None,
              'top_p': gen['top_p'] if gen['top_p'] < 1 else None, 'max_new_tokens': max_new,
              'stop_tokens': [kdata.text.EOS_ID] if gen['stop_at_eos'] else [],
              'pad_id': kdata.text.PAD_ID, 'seed': gen['seed'],
              'batch_size': int(config.batch_size), 'search': 'sample (no beam search)'}
  plan = _source(config, teacher, arrays, epochs=epochs, chunk_size=chunk_size)
  arrays_spec = {'prompt_ids': ('int32', prompt_len), 'prompt_mask': ('bool', prompt_len),
                 'tokens': ('int32', width), 'mask': ('bool', width),
                 'logprobs': ('float32', width)}
  plan.update({
      'kind': sequences.KIND,
      'settings': {'mode': settings['mode'], 'generate': gen},
      'generate': decoding, 'prompt_len': prompt_len, 'continuation_len': width,
      'arrays': {key: {'dtype': d, 'shape': [n]} for key, (d, n) in arrays_spec.items()},
      'bytes_per_entry': int(sum(np.dtype(d).itemsize * n for d, n in arrays_spec.values())),
  })
  from kdjax.models import init_cache
  dconfig = decoder_config(teacher, seq_len)
  generate = sequences.make_generate(
      teacher.apply, lambda b, length: init_cache(dconfig, b, length), width=width,
      max_new_tokens=max_new, temperature=decoding['temperature'], top_k=decoding['top_k'],
      top_p=decoding['top_p'], stop_tokens=tuple(decoding['stop_tokens']),
      pad_id=decoding['pad_id'])
  batch_sh = batch_sharding(mesh)

  def sharded(variables, prompt_ids, prompt_mask, seed, epoch, batch_index):
    prompt_ids, prompt_mask = jax.lax.with_sharding_constraint((prompt_ids, prompt_mask),
                                                               batch_sh)
    return generate(variables, prompt_ids, prompt_mask, seed, epoch, batch_index)

  repl = NamedSharding(mesh, P())
  teacher_sh = jax.tree.map(lambda a: a.sharding, teacher.variables)
  run = jax.jit(sharded, in_shardings=(teacher_sh,) + (repl,) * 5, out_shardings=repl)
  on_mesh = _replicated_forward(functools.partial(run, teacher.variables), mesh)
  batch = int(config.batch_size)

  def forward(epoch, first, ids, keep):
    prompt_ids, prompt_mask = arrays['prompt_ids'][ids], arrays['prompt_mask'][ids]
    out = on_mesh((prompt_ids, prompt_mask, np.int32(gen['seed']), np.int32(epoch),
                   np.int32(first // batch)), keep)
    if out is None:
      return None
    return dict(out, prompt_ids=prompt_ids.astype(np.int32),
                prompt_mask=prompt_mask.astype(bool))

  return plan, forward


def _claim(cache_dir: str, plan: dict) -> None:
  """Writes ``plan.json`` into ``cache_dir``, or refuses a cache of other settings there."""
  storage.makedirs(cache_dir)
  plan_path = storage.join(cache_dir, store.PLAN)
  old = store.read_json(plan_path)
  if old is not None and old != plan:
    diff = sorted(key for key in set(old) | set(plan) if old.get(key) != plan.get(key))
    raise UserError(f'{cache_dir} holds a cache built with other settings ({", ".join(diff)} '
                    'differ); use another directory or delete it')
  _sync('kdjax_cache_plan_read')
  if jax.process_index() == 0 and old is None:
    store.write_json(plan_path, plan)


def _compute_chunks(cache_dir: str, work, forward, *, num_examples: int, batch: int,
                    show: bool) -> tuple[int, int]:
  """Computes every chunk of ``work`` not yet written; process ``p`` writes chunk ``j``
  when ``j mod P == p``. ``forward(epoch, first, ids, keep)`` computes the rows of one
  batch (every process runs it; it returns them, as host arrays, where ``keep``).
  Returns ``(entries computed, chunks computed)``."""
  n = num_examples
  pid, nproc = jax.process_index(), jax.process_count()
  mine = {store.chunk_name(e, i) for j, (e, i, _, _) in enumerate(work) if j % nproc == pid}
  store.remove_stale_temporaries(cache_dir, mine)
  # Every process must run the same forward passes: skip only what all see as done.
  done = [store.chunk_exists(cache_dir, store.chunk_name(e, i)) for e, i, _, _ in work]
  todo = [w for w, d in zip(work, done) if not d]
  delay = float(os.environ.get(_DELAY_ENV, '0') or 0)
  from tqdm.auto import tqdm
  bar = tqdm(total=sum(t - s for _, _, s, t in work),
             initial=sum(t - s for (_, _, s, t), d in zip(work, done) if d), unit='ex',
             disable=not show, dynamic_ncols=True, mininterval=1.0)
  t0, computed = time.time(), 0
  for e, i, s, t in todo:
    keep = store.chunk_name(e, i) in mine
    parts = []
    for b0 in range(s, t, batch):
      ids = np.arange(b0, b0 + batch) % n          # pad the last batch; cut below
      # Every process passes the same (replicated) batch; outputs come back replicated.
      out = forward(e, b0, ids, keep)
      if keep:
        parts.append({key: v[:min(t, b0 + batch) - b0] for key, v in out.items()})
    if keep:
      store.write_chunk(cache_dir, store.chunk_name(e, i),
                        {key: np.concatenate([p[key] for p in parts]) for key in parts[0]})
      if delay:
        time.sleep(delay)
    computed += t - s
    bar.update(t - s)
    bar.set_postfix(ex_per_s=f'{computed / max(time.time() - t0, 1e-9):.0f}')
  bar.close()
  _sync('kdjax_cache_chunks_written')
  return computed, len(todo)


def _finish(cache_dir: str, plan: dict, work) -> dict:
  """The manifest: the plan, every chunk's checksum, the content checksum (process 0
  writes it; a cache is finished once it exists)."""
  chunks = {}
  for e, i, s, t in work:
    name = store.chunk_name(e, i)
    digest, nbytes = store.chunk_checksum(cache_dir, name)
    chunks[name] = {'epoch': e, 'start': s, 'stop': t, 'sha256': digest, 'bytes': nbytes}
  manifest = dict(plan, chunks=chunks, content_checksum=store.content_checksum(chunks),
                  complete=True)
  if jax.process_index() == 0:
    store.write_json(storage.join(cache_dir, store.MANIFEST), manifest)
  _sync('kdjax_cache_manifest_written')
  return manifest


def _plain(value: Any) -> Any:
  return value.to_dict() if hasattr(value, 'to_dict') else value


def _sync(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)
