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

Work is split in chunks of ``chunk_size`` examples of one epoch (see
``kdjax.cache.store``). The teacher runs jitted on batches of ``config.batch_size``
sharded over the mesh's data axis; in a multi-process run every process takes part in
every forward pass and process ``p`` writes the chunks ``i`` with ``i mod P == p``
(``cache_dir`` must be on a file system all processes share).
"""

from __future__ import annotations

import math
import os
import time
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import data as kdata
from kdjax import teacher as teacher_lib
from kdjax import workdir as workdir_lib
from kdjax.cache import store
from kdjax.cache.fingerprint import dataset_fingerprint
from kdjax.engine.config import validate
from kdjax.errors import UserError
from kdjax.parallel import initialize_from_env
from kdjax.parallel import make_mesh

# Test hook: seconds to sleep after each written chunk (lets a test kill a build midway).
_DELAY_ENV = 'KDJAX_CACHE_CHUNK_DELAY'
_POOLS = ('none', 'mean', 'max')


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


def build_cache(config, cache_dir: str, *, epochs: int = 1, k: int | None = None,
                dtype: str = 'float32', features: Sequence[str | dict] = (),
                chunk_size: int | None = None, progress: bool | None = None) -> dict:
  """Builds (or finishes) the teacher cache of a distill config in ``cache_dir``.

  Args:
    config: a distill config (``config.teacher.workdir`` names the teacher; the data,
      augmentation, seed, batch size and mesh are the run's).
    cache_dir: where the cache goes; an unfinished build there is resumed, a finished
      one with the same plan is left as it is.
    epochs: augmentation epochs ``E`` to cache (1 is enough without augmentation).
    k: top-k logits kept per entry (default: all classes).
    dtype: ``float32``, ``bfloat16``, ``float16`` or ``int8`` (with a per-row scale).
    features: teacher features to keep, ``'NAME[:POOL[:DTYPE]]'`` (see ``parse_feature``).
    chunk_size: examples per chunk (a multiple of ``config.batch_size``; default about
      4096).
    progress: show a progress bar (default ``config.progress``).

  Returns:
    The manifest (also in ``cache_dir/manifest.json``).
  """
  validate(config)
  workdir_lib.check_creatable(cache_dir)
  if dtype not in store.DTYPES:
    raise UserError(f'cache dtype must be one of {", ".join(store.DTYPES)} (got {dtype!r})')
  if int(epochs) < 1:
    raise UserError(f'cache epochs must be positive (got {epochs})')
  if k is not None and int(k) < 1:
    raise UserError(f'cache k must be positive (got {k})')
  if chunk_size is not None and int(chunk_size) < 1:
    raise UserError(f'cache chunk size must be positive (got {chunk_size})')
  features = [parse_feature(f) for f in features]
  initialize_from_env()
  try:
    mesh = make_mesh([tuple(axis) for axis in config.mesh])
  except ValueError as e:
    raise UserError(f'config.mesh: {e}') from None
  data_axis = mesh.axis_names[0]
  batch = int(config.batch_size)
  if batch % mesh.shape[data_axis]:
    raise UserError(f'batch_size {batch} does not divide over the {mesh.shape[data_axis]} devices')
  data_dir = config.data.data_dir or None
  spec = kdata.dataset_spec(config.data.name, data_dir=data_dir)
  teacher = teacher_lib.load_teacher(config.teacher.workdir, mesh, config.teacher.partition_rules)
  num_classes = spec.num_classes
  if teacher.num_classes != num_classes:
    raise UserError(f'the teacher predicts {teacher.num_classes} classes but '
                    f'{config.data.name} has {num_classes}')
  k = num_classes if k is None else int(k)
  if not 1 <= k <= num_classes:
    raise UserError(f'cache k must be in [1, {num_classes}] (got {k})')
  arrays = kdata.load_arrays(config.data.name, config.data.train_split, data_dir=data_dir)
  if chunk_size is None:
    chunk_size = batch * max(1, 4096 // batch)
  chunk_size = int(chunk_size)
  if chunk_size <= 0 or chunk_size % batch:
    raise UserError(f'chunk size {chunk_size} must be a positive multiple of batch_size {batch}')

  plan, run = _plan(config, teacher, arrays, mesh, epochs=int(epochs), k=k, dtype=dtype,
                    features=features, chunk_size=chunk_size)
  _claim(cache_dir, plan)
  ranges = store.chunk_ranges(len(arrays['label']), chunk_size)
  work = [(e, i, s, t) for e in range(int(epochs)) for i, (s, t) in enumerate(ranges)]
  show = (config.progress if progress is None else progress) and jax.process_index() == 0
  t0 = time.time()
  computed, fresh = _compute_chunks(cache_dir, work, run, teacher.variables, arrays, mesh,
                                    batch=batch, show=show)
  manifest = _finish(cache_dir, plan, work)
  seconds = time.time() - t0
  if show:
    print(f'cache: {len(work)} chunks ({fresh} computed now), {computed} entries in '
          f'{seconds:.1f}s ({computed / max(seconds, 1e-9):.0f} examples/s)', flush=True)
  return manifest


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
  batch_sh = NamedSharding(mesh, P(mesh.axis_names[0]))

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
  return plan, run


def _claim(cache_dir: str, plan: dict) -> None:
  """Writes ``plan.json`` into ``cache_dir``, or refuses a cache of other settings there."""
  os.makedirs(cache_dir, exist_ok=True)
  plan_path = os.path.join(cache_dir, store.PLAN)
  old = store.read_json(plan_path)
  if old is not None and old != plan:
    diff = sorted(key for key in set(old) | set(plan) if old.get(key) != plan.get(key))
    raise UserError(f'{cache_dir} holds a cache built with other settings ({", ".join(diff)} '
                    'differ); use another directory or delete it')
  _sync('kdjax_cache_plan_read')
  if jax.process_index() == 0 and old is None:
    store.write_json(plan_path, plan)


def _compute_chunks(cache_dir: str, work, run, variables, arrays: dict, mesh, *, batch: int,
                    show: bool) -> tuple[int, int]:
  """Computes every chunk of ``work`` not yet written; process ``p`` writes chunk ``j``
  when ``j mod P == p``. Returns ``(entries computed, chunks computed)``."""
  n = len(arrays['label'])
  repl = NamedSharding(mesh, P())
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
    parts = []
    for b0 in range(s, t, batch):
      ids = np.arange(b0, b0 + batch) % n          # pad the last batch; cut below
      inputs = (arrays['x'][ids], arrays['id'][ids].astype(np.int32), np.full(batch, e, np.int32))
      # Every process passes the same (replicated) batch; outputs come back replicated.
      inputs = [jax.make_array_from_process_local_data(repl, a) for a in inputs]
      out = run(variables, *inputs)
      parts.append({key: np.asarray(v.addressable_data(0))[:min(t, b0 + batch) - b0]
                    for key, v in out.items()})
    if store.chunk_name(e, i) in mine:
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
    store.write_json(os.path.join(cache_dir, store.MANIFEST), manifest)
  _sync('kdjax_cache_manifest_written')
  return manifest


def _plain(value: Any) -> Any:
  return value.to_dict() if hasattr(value, 'to_dict') else value


def _sync(tag: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(tag)
