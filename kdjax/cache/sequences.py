r"""Sequence-level KD: the teacher's own continuations of the prompts, as the student's data.

Kim and Rush (2016) train the student by cross-entropy on the teacher's *output
sequences* instead of (or besides) matching its per-token distributions: the teacher
decodes every training input once, and the student learns to produce what the teacher
produced. Here the inputs are the prompts of a prompt split (``shakespeare_lm``'s
``prompts_train``: ``prompt_ids`` ``[P]`` left-padded with ``prompt_mask``); the teacher
continues each with :func:`kdjax.models.decoding.sample` (jitted, batched; greedy with
``temperature = 0``, else sampled with a seed); the cache stores per prompt

===============  ======================  ==========================================
``prompt_ids``   ``[P]`` int32           the prompt, left-padded
``prompt_mask``  ``[P]`` bool            its real tokens
``tokens``       ``[C]`` int32           the continuation, ``pad`` after its end
``mask``         ``[C]`` bool            the generated tokens (the stop token included)
``logprobs``     ``[C]`` float32         their log-probabilities under the sampler
===============  ======================  ==========================================

with ``P + C`` the data's row length, and a run reads it in place of the split's own
continuations: :func:`compose` lays prompt + continuation out exactly as the data set lays
out a prompt record (``x``, next-token ``label``, ``segment_ids``, ``positions``; the loss
``mask`` on the continuation only), and the cache's join returns those keys, which
replace the batch's (device feed: ``DeviceSource.batches`` updates the batch with the
join; stream feed: ``StreamSource`` with the host rows). Training is then plain ``ce``.

**Sampling.** Batch ``j`` of epoch ``e`` (rows ``[j B, (j + 1) B)`` of the split, ``B`` the
config's batch size) is decoded with the key :func:`generation_key` ``(seed, e, j)``, so a
chunk's continuations are a pure function of the teacher, the prompts, the settings and
the batch size (all in the cache's plan): a resumed build writes the same bytes. A
sampled row's draw depends on its batch, not only on its prompt. With ``epochs`` ``E > 1``
(sampling only) each prompt gets ``E`` continuations and epoch ``e`` of the run reads
draw ``e mod E``.

Beam search (Kim and Rush's decoder) is not implemented: greedy decoding is its beam-1
case, and sampling gives the diversity beams would; the cache stores one continuation
per prompt and epoch.

References:
  Kim, Rush. Sequence-Level Knowledge Distillation. EMNLP 2016. arXiv:1606.07947.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import teacher as teacher_lib
from kdjax.cache import read
from kdjax.cache.settings import check_config_settings
from kdjax.errors import UserError
from kdjax.models import decoding

KIND = 'sequences'
ARRAYS = ('prompt_ids', 'prompt_mask', 'tokens', 'mask', 'logprobs')
BATCH_KEYS = ('x', 'label', 'mask', 'segment_ids', 'positions')


def generation_key(seed, epoch, batch_index) -> jax.Array:
  """The key that decodes batch ``batch_index`` of epoch ``epoch`` (see the module docstring).

  >>> bool(jnp.all(jax.random.key_data(generation_key(0, 1, 2))
  ...              == jax.random.key_data(generation_key(0, 1, 2))))
  True
  """
  key = jax.random.fold_in(jax.random.key(seed), epoch)
  return jax.random.fold_in(key, batch_index)


def check_context(teacher, *, prompt_len: int, max_new_tokens: int) -> None:
  """Raises a one-line ``UserError`` when the prompts plus ``max_new_tokens`` do not fit
  the teacher's context; call it before the cache directory is written.

  The context is :func:`kdjax.teacher.context_length`'s: a Hugging Face decoder's
  ``max_positions``; a workdir teacher's ``model.kwargs.max_positions`` or else the row
  length of the data it was *trained* on, which may be shorter than the rows of the
  data whose prompts it continues. A teacher with no context (not a decoder) passes
  (the plan refuses it as such).

  Args:
    teacher: a :class:`kdjax.teacher.Teacher`.
    prompt_len: the prompts' columns ``P``.
    max_new_tokens: the continuation tokens to generate.
  """
  context = teacher_lib.context_length(teacher)
  if context is None:
    return
  room = context - int(prompt_len)
  fix = (f'lower config.cache.generate.max_new_tokens to at most {room}' if room > 0 else
         f'cache the prompts of a data set with prompts shorter than {context} tokens')
  decoding.check_context(prompt_len, max_new_tokens, context, who="the teacher's", fix=fix)


def make_generate(apply, init_cache, *, width: int, max_new_tokens: int, temperature: float,
                  top_k: int | None, top_p: float | None, stop_tokens, pad_id: int = 0):
  """``generate(variables, prompt_ids, prompt_mask, seed, epoch, batch_index) -> rows``.

  Pure (jit it): :func:`kdjax.models.decoding.sample` with the key
  :func:`generation_key` ``(seed, epoch, batch_index)``; ``rows`` are ``tokens``, ``mask``
  and ``logprobs``, ``[b, width]`` (``max_new_tokens <= width`` generated, then padding).
  """

  def generate(variables, prompt_ids, prompt_mask, seed, epoch, batch_index):
    params, state = variables
    g = decoding.sample(apply, params, state, prompt_ids, prompt_mask,
                        generation_key(seed, epoch, batch_index), init_cache=init_cache,
                        max_new_tokens=max_new_tokens, temperature=temperature, top_k=top_k,
                        top_p=top_p, stop_tokens=stop_tokens, pad_id=pad_id)
    pad = [(0, 0), (0, width - max_new_tokens)]
    return {'tokens': jnp.pad(g.tokens, pad, constant_values=pad_id),
            'mask': jnp.pad(g.mask, pad), 'logprobs': jnp.pad(g.logprobs, pad)}

  return generate


def compose(prompt_ids, prompt_mask, tokens, mask, *, pad_id: int = 0) -> dict[str, Any]:
  """Prompt + continuation as a training row, the layout of a prompt record.

  ``x`` is the prompt then the continuation (``pad_id`` elsewhere); ``label`` the next
  token where the next position is real (``pad_id`` elsewhere); ``mask`` (the loss) is
  True exactly at the positions whose next token is a continuation token (the prompt's
  last and the continuation's tokens but its last); ``segment_ids`` 1 on real tokens, 0
  on padding; ``positions`` count from the first real token. Numpy in, numpy out; else
  ``jax.numpy`` (jittable). The continuation's ``mask`` must be a prefix (as
  :func:`~kdjax.models.decoding.sample` returns it).

  Args:
    prompt_ids: ``[..., P]`` left-padded.
    prompt_mask: ``[..., P]``; the last prompt token must be real.
    tokens: ``[..., C]``.
    mask: ``[..., C]``.
    pad_id: the padding id.

  Returns:
    ``{'x', 'label', 'mask', 'segment_ids', 'positions'}``, each ``[..., P + C]``
    (``mask`` bool, the others int32).

  >>> out = compose(np.array([[0, 5, 6, 1]]), np.array([[0, 1, 1, 1]]), np.array([[7, 1, 0]]),
  ...               np.array([[1, 1, 0]]))
  >>> out['x'].tolist(), out['label'].tolist(), out['mask'].astype(int).tolist()
  ([[0, 5, 6, 1, 7, 1, 0]], [[0, 6, 1, 7, 1, 0, 0]], [[0, 0, 0, 1, 1, 0, 0]])
  >>> out['positions'].tolist(), out['segment_ids'].tolist()
  ([[0, 0, 1, 2, 3, 4, 0]], [[0, 1, 1, 1, 1, 1, 0]])
  """
  arrays = (prompt_ids, prompt_mask, tokens, mask)
  xp = np if all(isinstance(a, np.ndarray) for a in arrays) else jnp
  plen = prompt_ids.shape[-1]
  lead = prompt_ids.shape[:-1]
  real = xp.concatenate([prompt_mask.astype(bool), mask.astype(bool)], axis=-1)
  ids = xp.where(real, xp.concatenate([prompt_ids, tokens], axis=-1), pad_id).astype(xp.int32)
  follows = xp.logical_and(real[..., 1:], real[..., :-1])
  label = xp.concatenate([xp.where(follows, ids[..., 1:], pad_id).astype(xp.int32),
                          xp.full(lead + (1,), pad_id, xp.int32)], axis=-1)
  loss = xp.concatenate([xp.zeros(lead + (plen - 1,), bool), mask.astype(bool),
                         xp.zeros(lead + (1,), bool)], axis=-1)
  positions = xp.where(real, xp.cumsum(real.astype(xp.int32), axis=-1) - 1, 0)
  return {'x': ids, 'label': label, 'mask': loss, 'segment_ids': real.astype(xp.int32),
          'positions': positions.astype(xp.int32)}


class SequenceCache(NamedTuple):
  """A finished cache of teacher generations opened for a run (a
  :class:`kdjax.engine.setup.CachedTeacher`): its join replaces the batch's sequences."""

  cache_dir: str
  manifest: dict
  teacher_fingerprint: str | None = None

  @property
  def epochs(self) -> int:
    return int(self.manifest['epochs'])

  @property
  def nbytes(self) -> int:
    return read.cache_bytes(self.manifest)

  # Its rows replace the data's; a loss that reads the teacher's outputs has the live
  # teacher score them (kdjax.engine.setup).
  rows_only = True

  def check(self, config, *, num_classes: int, needs) -> None:
    """Raises a one-line ``UserError`` when the cache cannot feed this run: a loss that
    reads the teacher's outputs on the cached sequences (Kim and Rush's Seq-KD +
    Word-KD) needs the live teacher that generated them (``config.teacher.workdir`` or
    ``hf_path``; its fingerprint is checked against the cache's)."""
    read.check_source(self.manifest, config, num_classes=num_classes, cache_dir=self.cache_dir,
                      teacher_fingerprint=self.teacher_fingerprint)
    live_keys = ('teacher_logits', 'teacher_features', 'teacher_attentions')
    cached_keys = ('teacher_topk_logits', 'teacher_topk_indices', 'teacher_sample_indices',
                   'teacher_sample_weights')
    if (any(key in needs for key in cached_keys)
        or (any(key in needs for key in live_keys) and self.teacher_fingerprint is None)):
      raise UserError(f'the teacher cache {self.cache_dir} holds the teacher\'s generated '
                      'sequences, not its outputs; train on them with ce (configs/lm/seq_kd.py), '
                      'or set config.teacher.workdir to the teacher that generated them so it '
                      'scores them live')
    check_config_settings(self.manifest, config, self.cache_dir, ('mode', 'generate'))

  def check_arrays(self, arrays: dict) -> None:
    read.check_dataset(self.manifest, arrays, self.cache_dir)

  def check_stream(self, config) -> None:
    read.check_stream_dataset(self.manifest, config.data.name, config.data.train_split,
                              data_dir=config.data.data_dir or None, cache_dir=self.cache_dir)

  def columns(self, needs) -> dict[str, np.ndarray]:
    """The prompts and continuations ``[E, N, ...]`` (the log-probabilities stay on disk);
    each chunk is checked against its checksum as it is read."""
    del needs
    cols = read.load_columns(self.cache_dir, self.manifest, verify=True)
    return {key: cols[key] for key in ARRAYS if key != 'logprobs'}

  def join(self, columns, epoch, positions) -> dict:
    """``x``, ``label``, ``mask``, ``segment_ids``, ``positions`` of the batch's prompts
    with the teacher's continuations (jittable; they replace the batch's own)."""
    e = jnp.asarray(epoch) % self.epochs
    rows = jax.tree.map(lambda c: jnp.take(c[e], positions, axis=0), columns)
    return compose(rows['prompt_ids'], rows['prompt_mask'], rows['tokens'], rows['mask'],
                   pad_id=int(self.manifest['generate']['pad_id']))

  def reader(self, config) -> str:
    return read.choose_reader(self.manifest, reader=str(config.teacher.cache_reader),
                              max_bytes=int(config.teacher.cache_memory_max_bytes))

  def host_rows(self, reader: str, needs):
    """``rows(epochs, ids) -> entries`` (numpy) for the stream feed: :func:`compose` of
    the stored rows."""
    pad_id = int(self.manifest['generate']['pad_id'])
    if reader == 'memory':
      columns = self.columns(needs)

      def raw(epochs, ids):
        e, i = np.asarray(epochs) % self.epochs, np.maximum(np.asarray(ids), 0)
        return {key: c[e, i] for key, c in columns.items()}
    else:
      raw = read.ChunkReader(self.cache_dir, self.manifest, needs).raw_rows

    def rows(epochs, ids):
      r = raw(epochs, ids)
      out = compose(r['prompt_ids'], r['prompt_mask'], r['tokens'], r['mask'], pad_id=pad_id)
      out['mask'] &= (np.asarray(ids) >= 0)[:, None]     # a padding example (id -1) stays one
      return out

    return rows

  def sample(self, needs, n: int = 2) -> dict:
    """Nothing: the objective reads no teacher entry (the sequences are the data)."""
    del needs, n
    return {}
