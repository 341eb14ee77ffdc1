r"""The per-token teacher cache of a language model: top-k rows stored with a compact codec.

For token data (``x`` ``[N, T]`` ids, ``label`` the next tokens, ``mask`` which positions
have a target), the entry of row (sequence id) ``n`` and position ``t`` is what the teacher
predicts there: its ``k`` largest logits, their classes and the log-sum-exp of all its
logits, the three stored with a codec of :mod:`kdjax.cache.codec` (``'f32+i32'``,
``'int4+ef'``, ``'log3+ef'``, ...). A chunk of rows ``[s, t)`` holds the codec's three
``uint8`` arrays ``values``, ``indices`` and ``stats``, each ``[t - s, T, nbytes]``
(``nbytes`` from :func:`kdjax.cache.codec.layout`), so one token costs exactly
:func:`kdjax.cache.codec.bytes_per_token` bytes.

**Padding.** Positions without a target (``mask`` 0: padding, a document's last token, a
prompt's tokens) are stored as zero bytes. They decode to some row (not necessarily a
valid one) and are never read: every loss masks them with ``where``.

**Order.** With ``k`` equal to the vocabulary the logits are kept in class order (the
float codecs store them as given, ``ef`` sorts by class), so a ``'f32+i32'`` cache also
yields the dense teacher logits, the live teacher's to the bit.

**Reading.** The device feed keeps the encoded columns ``[1, N, T, nbytes]`` on device
with the data (the point of small codes: a 2048-token vocabulary at ``k = 32`` takes 36
bytes a token with ``'int4+ef'`` instead of 260 with ``'f32+i32'``) and decodes the
batch's rows inside the jitted call (:func:`decode_rows` is ``jax.numpy``); the stream
feed decodes each batch's rows on the host. Either way the batch gets
``teacher_topk_logits [B, T, k]``, ``teacher_topk_indices [B, T, k]`` and
``teacher_logsumexp [B, T]``, what the sparse losses (``sparse_kd``, ...) read. The
``int``/``log`` codecs return logits shifted by the row's top-1 logit (with a
consistent log-sum-exp): the sparse losses only read log-probabilities and the tail
mass, which do not change, but a loss of raw teacher logits is refused.

**Refusals** (one line each, before training): a cache of another teacher (parameter
fingerprint), data set, split or split content (``kdjax.cache.fingerprint``), vocabulary,
or other settings than the run's ``config.cache`` (``k``, codec); a chunk whose bytes do
not match the manifest's sha256 when the cache is loaded whole (device feed, or the
stream feed's ``'memory'`` reader; ``kdjax cache verify`` checks any cache).
"""

from __future__ import annotations

import contextlib
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax import teacher as teacher_lib
from kdjax.cache import codec as codec_lib
from kdjax.cache import read
from kdjax.cache.settings import check_config_settings
from kdjax.errors import UserError

KIND = 'tokens'
PARTS = codec_lib.PARTS            # the stored arrays of a chunk: values, indices, stats


def make_token_infer(apply, *, k: int, vocab_size: int):
  """``infer(variables, x, mask, model_inputs) -> (topk_logits, topk_indices, logsumexp)``.

  Pure (jit it). ``x`` ``[b, T]`` ids, ``mask`` ``[b, T]``, ``model_inputs`` the model's
  other inputs of the batch (``segment_ids``, ``positions``; what the live teacher gets).
  Rows of positions with ``mask`` 0 are computed on zero logits (never stored: see the
  module docstring). With ``k == vocab_size`` the logits stay in class order.

  >>> from kdjax.models import ModelOutput
  >>> apply = lambda p, s, x, train: (ModelOutput(x.astype(jnp.float32), {}), s)
  >>> infer = make_token_infer(apply, k=1, vocab_size=3)
  >>> z, i, lse = infer((None, None), jnp.array([[[0, 2, 1]]]), jnp.array([[True]]), {})
  >>> z.tolist(), i.tolist()
  ([[[2.0]]], [[[1]]])
  """

  def infer(variables, x, mask, model_inputs):
    out = teacher_lib.outputs(apply, variables, x, needs=('teacher_logits',), **model_inputs)
    logits = out['teacher_logits'].astype(jnp.float32)
    logits = jnp.where(mask[..., None], logits, 0.0)
    lse = jax.nn.logsumexp(logits, axis=-1)
    if k == vocab_size:
      values = logits
      indices = jnp.broadcast_to(jnp.arange(vocab_size, dtype=jnp.int32), logits.shape)
    else:
      values, indices = jax.lax.top_k(logits, k)
    return values, indices.astype(jnp.int32), lse

  return infer


def encode_rows(topk_logits, topk_indices, logsumexp, mask, *, codec: str, vocab_size: int
                ) -> dict[str, np.ndarray]:
  """Teacher rows ``[b, T, k]`` -> the codec's ``uint8 [b, T, nbytes]`` arrays (numpy),
  zero bytes where ``mask`` is 0.

  >>> enc = encode_rows(np.zeros((1, 2, 2)), np.array([[[0, 1], [0, 1]]]), np.ones((1, 2)),
  ...                   np.array([[True, False]]), codec='f32+i32', vocab_size=4)
  >>> int(enc['indices'][0, 1].max()), int(enc['indices'][0, 0, 4]), enc['values'].shape
  (0, 1, (1, 2, 8))
  """
  enc = codec_lib.encode(topk_logits, topk_indices, logsumexp, codec=codec,
                         vocab_size=vocab_size)
  keep = np.asarray(mask, bool)[..., None]
  return {key: np.where(keep, a, np.uint8(0)) for key, a in enc.items()}


def decode_rows(encoded: dict, *, codec: str, k: int, vocab_size: int,
                dense: bool = False) -> dict[str, Any]:
  """The codec's arrays ``[..., nbytes]`` -> the sparse losses' batch entries (jittable).

  Args:
    encoded: ``{'values', 'indices', 'stats'}`` as a chunk stores them.
    codec: the cache's codec.
    k: its classes per token.
    vocab_size: its vocabulary.
    dense: also return ``teacher_logits [..., vocab]`` (a float codec with ``k ==
      vocab_size`` only: its rows are in class order).

  Returns:
    ``teacher_topk_logits [..., k]`` float32, ``teacher_topk_indices [..., k]`` int32,
    ``teacher_logsumexp [...]`` float32 (and ``teacher_logits``).

  >>> enc = encode_rows([[[1.0, 3.0]]], [[[0, 1]]], [[3.5]], [[True]], codec='f32+i32',
  ...                   vocab_size=2)
  >>> out = decode_rows(enc, codec='f32+i32', k=2, vocab_size=2, dense=True)
  >>> out['teacher_logits'].tolist(), out['teacher_logsumexp'].tolist()
  ([[[1.0, 3.0]]], [[3.5]])
  """
  if dense and (k != vocab_size or codec_lib.parse_codec(codec).kind != 'float'):
    raise ValueError(f'dense teacher logits need a float codec with k = {vocab_size} '
                     f'(got {codec} with k = {k})')
  z, idx, lse = codec_lib.decode({key: encoded[key] for key in PARTS}, codec=codec, k=k,
                                 vocab_size=vocab_size)
  out = {'teacher_topk_logits': z, 'teacher_topk_indices': idx, 'teacher_logsumexp': lse}
  if dense:
    out['teacher_logits'] = z
  return out


@contextlib.contextmanager
def _on_host():
  """Runs what is inside on the CPU when JAX has one (the stream feed decodes on the host)."""
  try:
    cpu = jax.devices('cpu')[0]
  except RuntimeError:
    cpu = None
  if cpu is None:
    yield
  else:
    with jax.default_device(cpu):
      yield


class TokenCache(NamedTuple):
  """A finished per-token cache opened for a run (a
  :class:`kdjax.engine.setup.CachedTeacher`)."""

  cache_dir: str
  manifest: dict
  teacher_fingerprint: str | None = None

  @property
  def epochs(self) -> int:
    return int(self.manifest['epochs'])

  @property
  def nbytes(self) -> int:
    return read.cache_bytes(self.manifest)

  @property
  def dense(self) -> bool:
    """Whether the rows hold the raw logits of every class (float codec, ``k`` = vocab)."""
    m = self.manifest
    return m['k'] == m['num_classes'] and codec_lib.parse_codec(m['codec']).kind == 'float'

  def check(self, config, *, num_classes: int, needs) -> None:
    """Raises a one-line ``UserError`` when the cache cannot feed this run."""
    m, where = self.manifest, f'the teacher cache {self.cache_dir}'
    read.check_source(m, config, num_classes=num_classes, cache_dir=self.cache_dir,
                      teacher_fingerprint=self.teacher_fingerprint)
    codec = codec_lib.parse_codec(m['codec'])
    if 'teacher_logits' in needs and codec.kind != 'float':
      raise UserError(f"{where} stores {codec.name} rows, whose logits are shifted by the "
                      'top-1 logit, but the loss needs raw teacher logits; use a sparse loss '
                      '(e.g. sparse_kd) or rebuild the cache with a float codec (f32+i32)')
    if 'teacher_logits' in needs and m['k'] < num_classes:
      raise UserError(f"{where} keeps the top {m['k']} of {num_classes} logits per token, but "
                      'the loss needs dense teacher logits; use a sparse loss (e.g. sparse_kd) '
                      f'or rebuild with --k {num_classes}')
    if 'teacher_features' in needs or 'teacher_attentions' in needs:
      raise UserError(f'{where} stores top-k logits only, but the loss needs teacher features '
                      'or attentions; use the live teacher')
    if 'teacher_sample_indices' in needs or 'teacher_sample_weights' in needs:
      raise UserError(f'{where} stores top-k logits, but the loss reads sampled teacher '
                      "classes (sampled_kd); build a cache with config.cache.mode='sampled' or "
                      'use a sparse loss (e.g. sparse_kd)')
    check_config_settings(m, config, self.cache_dir, ('mode', 'k', 'codec'))

  def check_arrays(self, arrays: dict) -> None:
    read.check_dataset(self.manifest, arrays, self.cache_dir)

  def check_stream(self, config) -> None:
    read.check_stream_dataset(self.manifest, config.data.name, config.data.train_split,
                              data_dir=config.data.data_dir or None, cache_dir=self.cache_dir)

  def columns(self, needs) -> dict[str, np.ndarray]:
    """The encoded arrays ``[1, N, T, nbytes]`` (uint8), kept on device as they are; each
    chunk is checked against its checksum as it is read (a corrupt one is refused)."""
    del needs
    return read.load_columns(self.cache_dir, self.manifest, verify=True)

  def decode(self, encoded: dict, *, dense: bool | None = None) -> dict:
    """:func:`decode_rows` with this cache's codec (``dense``: default whenever it can)."""
    m = self.manifest
    return decode_rows(encoded, codec=m['codec'], k=m['k'], vocab_size=m['num_classes'],
                       dense=self.dense if dense is None else dense)

  def join(self, columns, epoch, positions) -> dict:
    """The decoded rows of the batch at ``positions`` (jittable; the device feed).

    The dense ``teacher_logits`` of a float ``k = vocab`` cache come along; a jitted
    step that does not read them does not compute them.
    """
    e = jnp.asarray(epoch) % self.epochs
    return self.decode(jax.tree.map(lambda c: jnp.take(c[e], positions, axis=0), columns))

  def reader(self, config) -> str:
    return read.choose_reader(self.manifest, reader=str(config.teacher.cache_reader),
                              max_bytes=int(config.teacher.cache_memory_max_bytes))

  def host_rows(self, reader: str, needs):
    """``rows(epochs, ids) -> entries`` (numpy, decoded on the host) for the stream feed."""
    dense = self.dense and 'teacher_logits' in needs
    if reader == 'memory':
      columns = self.columns(needs)

      def raw(epochs, ids):
        e, i = np.asarray(epochs) % self.epochs, np.maximum(np.asarray(ids), 0)
        return {key: c[e, i] for key, c in columns.items()}
    else:
      raw = read.ChunkReader(self.cache_dir, self.manifest, needs).raw_rows

    def rows(epochs, ids):
      with _on_host():
        return jax.tree.map(np.asarray, self.decode(raw(epochs, ids), dense=dense))

    return rows

  def sample(self, needs, n: int = 2) -> dict:
    """The first ``n`` rows, decoded (numpy; for loss initialization)."""
    return self.host_rows('chunks', needs)(np.zeros(n, np.int64), np.arange(n))
