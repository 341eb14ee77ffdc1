"""Feeds: ready batches for the train call, one interface whatever the source.

A :class:`Feed` answers two questions, one on each side of ``jax.jit``:

* host side, ``feed.inputs(step, n)``: the arrays the call that runs steps
  ``step .. step + n - 1`` needs, placed on the mesh;
* inside the call, ``feed.ready(inputs, n)``: a function ``(i, state) -> (batch, state,
  metrics)`` (traced) that makes step ``step + i``'s ready batch: the source's examples,
  augmented as a pure function of ``(seed, example id, epoch)``, then, with a *policy*
  (on-policy distillation, :mod:`kdjax.engine.policy`), rewritten from the student of
  ``state`` (the train state before that step; the policy's own state is updated in it),
  and the teacher's entries (live, cached, or computed one call ahead on devices of the
  teacher's own). Without a policy ``state`` passes through untouched and ``metrics`` is
  empty; ``feed.batches(inputs, n)`` is then the plain ``i -> batch``.

Sources (where the examples come from):

* :class:`DeviceSource`: the whole training split on the devices; step ``s`` takes the
  examples ``perm_e[(s mod E)·B : (s mod E + 1)·B]`` of epoch ``e = s // E`` (``E``
  steps per epoch, the rest of each epoch dropped), gathered on device; the data
  position is the step itself. Cache columns ``[epochs, N, ...]`` may ride along.
* :class:`StreamSource`: a grain iterator (splits too large for the devices); ``n``
  batches are read on the host, joined with their cache rows if any, stacked and put
  on the mesh; the iterator state is the data position.

:class:`TeacherAhead` runs a live teacher on devices of its own, one call ahead of the
student's: the student's call takes the teacher's entries and the positions its call
used, so the two agree batch for batch.

A teacher with another tokenizer (``config.teacher.vocab_method='uld'``) reads the same
text in its own tokens: :class:`Retokenizer` rewrites the rows host side (the whole
split once for the device feed, each batch for the stream feed) into the columns of
:data:`TEACHER_VIEW_KEYS`, which ride along with the examples; the teacher runs on them
and ``teacher_where`` goes to the loss (:mod:`kdjax.losses.uld`).
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from kdjax import teacher as teacher_lib
from kdjax.data.text import PAD_ID
from kdjax.engine import policy as policy_lib
from kdjax.models.base import MODEL_INPUT_KEYS
from kdjax.models.base import model_kwargs
from kdjax.parallel import batch_sharding
from kdjax.parallel import put_rows

Batch = dict[str, Any]
# Per-example columns every source carries; token data adds its ``mask`` ([tokens]: which
# positions have a target) and its other model inputs when its arrays have them.
EXAMPLE_KEYS = ('x', 'label', 'id')
OPTIONAL_KEYS = ('mask', *MODEL_INPUT_KEYS)
# The teacher's own tokenization of a row (Retokenizer): its input ids, segment ids and
# positions, and the positions whose next token is in the row (the loss's teacher mask).
TEACHER_VIEW_KEYS = ('teacher_input_ids', 'teacher_segment_ids', 'teacher_positions',
                     'teacher_where')


def example_keys(arrays, extra_keys=()) -> tuple[str, ...]:
  """The columns of ``arrays`` (a split or a batch) a feed carries; ``extra_keys`` are
  columns a policy reads (``prompt_ids``, ...), carried when ``arrays`` has them.

  >>> example_keys({'x': 0, 'label': 0, 'id': 0, 'client': 0, 'segment_ids': 0})
  ('x', 'label', 'id', 'segment_ids')
  """
  return EXAMPLE_KEYS + tuple(k for k in (*OPTIONAL_KEYS, *extra_keys) if k in arrays)


class Source(Protocol):
  """Where a feed's examples come from (see the module docstring)."""

  repl: NamedSharding   # replicated over the source's mesh

  def inputs(self, step: int, n: int) -> Any: ...
  def shardings(self) -> Any: ...
  def batches(self, inputs, n: int, positions=None) -> Callable[[jax.Array], Batch]: ...
  def position(self, step: int) -> dict: ...
  def restore(self, position: dict) -> None: ...


def put_global(tree, sharding):
  """Host numpy -> global arrays; every process passes the same (replicated) data."""
  return jax.tree.map(lambda a: jax.make_array_from_process_local_data(sharding, np.asarray(a)),
                      tree)


# --------------------------------------------------------------------------- shuffles

def epoch_permutations(seed, first_epoch, num_epochs: int, num_examples: int):
  """``[num_epochs, num_examples]`` shuffles for epochs ``first_epoch, ...`` (see
  :func:`packed_permutation`); ``seed`` may be traced."""
  base = jax.random.key(seed)
  epochs = first_epoch + jnp.arange(num_epochs)
  return jax.vmap(lambda e: packed_permutation(jax.random.fold_in(base, e), num_examples))(epochs)


# Below this many random bits per sort key, packed_permutation would need too many
# rounds; it then takes jax.random.permutation (n above 2**24).
_MIN_FREE_BITS = 8


def packed_permutation(key: jax.Array, n: int) -> jax.Array:
  """A uniformly random permutation of ``range(n)`` (int32), as rounds of one-operand sorts.

  Each round draws ``32 - b`` random bits per position (``b`` = bits of ``n - 1``),
  packs them above the position, sorts the packed uint32 words (unique, so one
  operand and no payload) and reorders by the positions read back from the low bits;
  ties in the random bits keep the previous round's (random) order. Rounds are
  added until they hold ``3·b`` random bits in all, the criterion
  ``jax.random.permutation`` applies to its 32-bit key rounds. Same distribution,
  different draws: on XLA:CPU a key-value sort is far slower than a one-operand
  sort (five shuffles of 4,000 positions: 7.9 ms with ``jax.random.permutation``,
  1.95 ms this way, jax 0.10.2, one core; 1.5x at a million positions:
  ``benchmarks/shuffle.py``), and a device-fed call shuffles every epoch it spans.
  For ``n > 2**24`` it is ``jax.random.permutation``.

  >>> p = packed_permutation(jax.random.key(0), 10)
  >>> sorted(p.tolist()) == list(range(10))
  True
  """
  bits = max(1, (n - 1).bit_length())
  free = 32 - bits
  if free < _MIN_FREE_BITS:
    return jax.random.permutation(key, n)
  rounds = -(-3 * bits // free)
  positions = jnp.arange(n, dtype=jnp.uint32)
  order = positions
  for r in range(rounds):
    draws = jax.random.bits(jax.random.fold_in(key, r), (n,), jnp.uint32) >> bits
    packed = jax.lax.sort((draws << bits) | positions, is_stable=False)
    order = jnp.take(order, packed & jnp.uint32((1 << bits) - 1))
  return order.astype(jnp.int32)


# --------------------------------------------------------------------------- sources

class DeviceSource:
  """The whole training split on the devices (see the module docstring).

  Args:
    arrays: the split: ``x``, ``label``, ``id`` (numpy, every process the same).
    batch_size: the global batch.
    seed: the shuffle seed.
    mesh: the devices; the first axis shards the batch.
    columns: cache columns ``[epochs, N, ...]`` kept on device with the data.
    join: ``join(columns, epoch, positions) -> entries`` (jittable): the rows of cached
      epoch ``epoch mod epochs``; the batch's ``epoch`` becomes ``epoch mod epochs``, so
      the augmentation is the one the cached teacher saw.
    extra_keys: more columns of ``arrays`` to carry (a policy's ``keys``).
  """

  def __init__(self, arrays: dict, *, batch_size: int, seed: int, mesh: jax.sharding.Mesh,
               columns: dict | None = None,
               join: Callable[[Any, Any, Any], dict] | None = None,
               extra_keys: tuple[str, ...] = ()):
    self.num_examples = int(len(arrays['label']))
    self.batch_size = int(batch_size)
    self.steps_per_epoch = self.num_examples // self.batch_size
    if self.steps_per_epoch < 1:
      raise ValueError(f'batch size {batch_size} is larger than the {self.num_examples} '
                       'training examples')
    self.seed = int(seed)
    self.repl = NamedSharding(mesh, P())
    self.batch_sharding = batch_sharding(mesh)
    self.keys = example_keys(arrays, extra_keys)
    data = {k: arrays[k] for k in self.keys}
    if columns is not None:
      data['cache'] = columns
      self.num_cached = int(jax.tree.leaves(columns)[0].shape[0])
    self.join = join
    self.data = put_global(data, self.repl)

  def inputs(self, step: int, n: int) -> dict:
    del n
    return {'data': self.data, 'step': np.int32(step), 'seed': np.int32(self.seed)}

  def shardings(self) -> dict:
    return {'data': jax.tree.map(lambda _: self.repl, self.data), 'step': self.repl,
            'seed': self.repl}

  def batches(self, inputs, n: int, positions=None) -> Callable[[jax.Array], Batch]:
    data, first = inputs['data'], inputs['step']
    spe, b = self.steps_per_epoch, self.batch_size
    if positions is None:
      first_epoch = first // spe
      perms = epoch_permutations(inputs['seed'], first_epoch, (n + spe - 1) // spe + 1,
                                 self.num_examples)

    def batch_at(i):
      step = first + i
      epoch = step // spe
      if positions is None:
        idx = jax.lax.dynamic_slice(perms[epoch - first_epoch], ((step % spe) * b,), (b,))
      else:
        idx = positions[i]
      batch = {k: jnp.take(data[k], idx, axis=0) for k in self.keys}
      batch['epoch'] = jnp.full((b,), epoch, jnp.int32)
      if 'mask' not in batch:
        batch['mask'] = jnp.ones((b,), bool)
      batch['position'] = idx
      if 'cache' in data:
        batch.update(self.join(data['cache'], epoch, idx))
        batch['epoch'] = jnp.full((b,), epoch % self.num_cached, jnp.int32)
      return jax.lax.with_sharding_constraint(batch, self.batch_sharding)

    return batch_at

  def position(self, step: int) -> dict:
    return {'feed': 'device', 'step': int(step)}

  def restore(self, position: dict) -> None:
    del position   # the step is the position


class StreamSource:
  """Batches read by a grain iterator on the host, ``n`` per call (module docstring).

  Args:
    iterator: a grain iterator of per-process batches (``kdjax.data.make_train_iterator``).
    mesh: the devices; the first axis shards the batch.
    rows: ``rows(epochs, ids) -> entries`` (numpy): the teacher cache rows of a batch.
    num_cached: the cache's epochs (a batch's ``epoch`` becomes ``epoch mod num_cached``).
    extra_keys: more columns of the batches to carry (a policy's ``keys``).
    retokenize: a :class:`Retokenizer`: each batch's rows in the teacher's tokens are
      added (:data:`TEACHER_VIEW_KEYS`).
  """

  KEYS = ('x', 'label', 'id', 'epoch', 'mask')

  def __init__(self, iterator, *, mesh: jax.sharding.Mesh,
               rows: Callable[[np.ndarray, np.ndarray], dict] | None = None,
               num_cached: int | None = None, extra_keys: tuple[str, ...] = (),
               retokenize: 'Retokenizer | None' = None):
    self.iterator = iterator
    self.rows, self.num_cached = rows, num_cached
    self.retokenize = retokenize
    self.extra_keys = tuple(extra_keys)
    self.sharding = batch_sharding(mesh, leading=1)
    self.batch_sharding = batch_sharding(mesh)
    self.repl = NamedSharding(mesh, P())

  def _next(self) -> dict:
    batch = next(self.iterator)
    keys = self.KEYS + tuple(k for k in (*MODEL_INPUT_KEYS, *self.extra_keys) if k in batch)
    out = {k: np.asarray(batch[k]) for k in keys}
    if self.rows is not None:
      out.update(self.rows(out['epoch'], out['id']))
      out['epoch'] = out['epoch'] % self.num_cached
    if self.retokenize is not None:
      out.update(self.retokenize(out['x'], out.get('segment_ids')))
    return out

  def inputs(self, step: int, n: int) -> dict:
    del step
    batches = [self._next() for _ in range(n)]
    stacked = jax.tree.map(lambda *a: np.stack(a), *batches)
    return put_global(stacked, self.sharding)

  def shardings(self):
    return self.sharding

  def batches(self, inputs, n: int, positions=None) -> Callable[[jax.Array], Batch]:
    del n
    if positions is not None:
      raise ValueError('a stream feed cannot take batch positions')
    return lambda i: jax.lax.with_sharding_constraint(
        jax.tree.map(lambda a: a[i], inputs), self.batch_sharding)

  def position(self, step: int) -> dict:
    return {'feed': 'stream', 'step': int(step), 'iterator': self.iterator.get_state()}

  def restore(self, position: dict) -> None:
    if position.get('iterator') is not None:
      self.iterator.set_state(position['iterator'])


# --------------------------------------------------------------------------- re-tokenization

class Retokenizer:
  """Rows of token ids -> the same text in the teacher's tokens (host side, numpy).

  Each segment of a row (its ``segment_ids``; without them, the row's non-pad tokens),
  its pad and end-of-document tokens left out, is decoded with the student's tokenizer
  and encoded again with the teacher's (no special tokens added); a segment that ended
  with the student's end-of-document token ends with the teacher's (if it has one). The
  row's segments follow each other in a teacher row of ``length`` tokens (what does not
  fit is dropped), with segment ids 1, 2, ..., positions from 0 in each segment, and the
  teacher's pad id after them. ``teacher_where`` is True where the next token is in the
  same segment of the teacher row: the teacher positions with a target, as the
  student's ``mask`` marks its own (a document's end-of-document token has none). The
  result is a pure function of the rows and the two tokenizers.

  Args:
    student: the student data's ``tokenizers.Tokenizer``.
    teacher: the teacher's.
    length: the teacher row length.
    student_eos: the student's end-of-document id.
    teacher_eos: the teacher's, or None (a segment end is then only its last token).
    pad_id: the student's pad id (left out), also written on the teacher's padding.

  >>> from kdjax.data.text import char_tokenizer
  >>> student = char_tokenizer(['ab c'], special_tokens=('<pad>', '<eos>', '<unk>'))
  >>> teacher = char_tokenizer(['abc '], special_tokens=('<pad>', '<eos>', '<unk>', '<x>'))
  >>> x = np.array([student.encode('ab').ids + [1] + student.encode('c').ids + [0]])
  >>> out = Retokenizer(student, teacher, length=6, student_eos=1, teacher_eos=1)(
  ...     x, np.array([[1, 1, 1, 2, 0]]))
  >>> out['teacher_input_ids'].tolist(), out['teacher_where'].astype(int).tolist()
  ([[5, 6, 1, 7, 0, 0]], [[1, 1, 0, 0, 0, 0]])
  """

  def __init__(self, student, teacher, *, length: int, student_eos: int,
               teacher_eos: int | None, pad_id: int = 0):
    self.student, self.teacher = student, teacher
    self.length, self.pad_id = int(length), int(pad_id)
    self.student_eos, self.teacher_eos = int(student_eos), teacher_eos

  def __call__(self, x, segment_ids=None) -> dict[str, np.ndarray]:
    x = np.asarray(x)
    if segment_ids is None:
      segment_ids = (x != self.pad_id).astype(np.int32)
    segment_ids = np.asarray(segment_ids)
    spans = []     # (row, ids without pad/eos, ended with eos)
    for row in range(x.shape[0]):
      for seg in np.unique(segment_ids[row]):
        if seg == 0:
          continue
        ids = x[row][segment_ids[row] == seg]
        ended = bool(len(ids)) and int(ids[-1]) == self.student_eos
        ids = ids[(ids != self.pad_id) & (ids != self.student_eos)]
        spans.append((row, ids.tolist(), ended))
    texts = self.student.decode_batch([ids for _, ids, _ in spans]) if spans else []
    encoded = (self.teacher.encode_batch(texts, add_special_tokens=False) if texts else [])
    n, length = x.shape[0], self.length
    out = {'teacher_input_ids': np.full((n, length), self.pad_id, np.int32),
           'teacher_segment_ids': np.zeros((n, length), np.int32),
           'teacher_positions': np.zeros((n, length), np.int32),
           'teacher_where': np.zeros((n, length), bool)}
    fill = np.zeros(n, np.int64)
    segment = np.zeros(n, np.int32)
    for (row, _, ended), enc in zip(spans, encoded):
      ids = list(enc.ids) + ([self.teacher_eos] if ended and self.teacher_eos is not None else [])
      start = int(fill[row])
      ids = ids[:length - start]
      if not ids:
        continue
      stop = start + len(ids)
      segment[row] += 1
      out['teacher_input_ids'][row, start:stop] = ids
      out['teacher_segment_ids'][row, start:stop] = segment[row]
      out['teacher_positions'][row, start:stop] = np.arange(len(ids))
      out['teacher_where'][row, start:stop - 1] = True
      fill[row] = stop
    return out


def teacher_inputs(batch: Batch) -> tuple[Any, dict]:
  """``(x, model kwargs)`` the teacher reads in ``batch``: its own tokenization
  (:data:`TEACHER_VIEW_KEYS`) when the batch has one, else the student's inputs.

  >>> x, kwargs = teacher_inputs({'x': 1, 'segment_ids': 2, 'teacher_input_ids': 3,
  ...                             'teacher_segment_ids': 4, 'teacher_positions': 5})
  >>> x, sorted(kwargs.items())
  (3, [('positions', 5), ('segment_ids', 4)])
  """
  if 'teacher_input_ids' in batch:
    return batch['teacher_input_ids'], {'segment_ids': batch['teacher_segment_ids'],
                                        'positions': batch['teacher_positions']}
  return batch['x'], model_kwargs(batch)


def with_prompt_loss(batch: Batch) -> Batch:
  """``batch`` with its loss ``mask`` widened to every next-token target of its rows:
  the prompt's tokens as well as the continuation's.

  A prompt record (``prompts_*`` splits, :mod:`kdjax.data.text`) supervises only its
  continuation; its prompt is text of the same corpus, and its targets are the
  positions whose ``label`` is a real token (``label`` is ``<pad>`` wherever the token
  or its successor is padding). The continuation keeps its own mask (a sampled
  continuation's, or the cache's).

  >>> b = {'label': jnp.array([[0, 6, 7, 8, 0]]), 'mask': jnp.array([[0, 0, 1, 1, 0]], bool)}
  >>> with_prompt_loss(b)['mask'].astype(int).tolist()
  [[0, 1, 1, 1, 0]]
  """
  return dict(batch, mask=jnp.logical_or(batch['mask'], batch['label'] != PAD_ID))


# --------------------------------------------------------------------------- the feed

class Feed:
  """Ready batches: a source's examples, augmented, maybe rewritten by a policy, with the
  teacher's entries.

  Args:
    source: a :class:`DeviceSource` or :class:`StreamSource`.
    augment: ``augment(x, ids, epochs, *, seed)`` (``kdjax.data.make_augment``).
    seed: the augmentation seed.
    teacher: a live :class:`kdjax.teacher.Teacher` run inside the call, or None (no
      teacher, or cached entries from the source).
    needs: the teacher entries the objective reads.
    ahead: a :class:`TeacherAhead` that computes the teacher's entries on its own
      devices (``teacher`` is then None).
    policy: a :class:`kdjax.engine.policy.Policy` run on each augmented batch with the
      train state before its step, before the teacher's forward (on-policy
      distillation: the student writes the continuations the teacher scores). Needs a
      live ``teacher`` inside the call (no cache, no ``ahead``).
  """

  def __init__(self, source: Source, *, augment: Callable, seed: int,
               teacher: teacher_lib.Teacher | None = None, needs=teacher_lib.OUTPUT_KEYS,
               ahead: 'TeacherAhead | None' = None,
               policy: policy_lib.Policy | None = None, prompt_loss: bool = False):
    if policy is not None and ahead is not None:
      raise ValueError('a policy rewrites batches inside the student\'s call; a teacher '
                       'ahead scores the source\'s batches: use one or the other')
    self.source, self.augment, self.seed = source, augment, int(seed)
    self.teacher, self.needs, self.ahead = teacher, tuple(needs), ahead
    self.policy, self.prompt_loss = policy, bool(prompt_loss)
    self._evaluated = None

  def inputs(self, step: int, n: int) -> dict:
    # The seed is an input, not a constant: runs that differ only in it share programs
    # (in the persistent compilation cache, too).
    inputs = {'source': self.source.inputs(step, n), 'seed': np.int32(self.seed)}
    if self.teacher is not None:
      inputs['teacher'] = self.teacher.variables
    if self.ahead is not None:
      inputs['ahead'] = self.ahead.entries(step, n)
    return inputs

  def shardings(self) -> dict:
    out = {'source': self.source.shardings(), 'seed': self.source.repl}
    if self.teacher is not None:
      out['teacher'] = jax.tree.map(lambda a: a.sharding, self.teacher.variables)
    if self.ahead is not None:
      out['ahead'] = self.ahead.sharding
    return out

  def ready(self, inputs, n: int) -> Callable[[jax.Array, Any], tuple[Batch, Any, dict]]:
    """``ready(i, state) -> (batch, state, metrics)``: step ``step + i``'s ready batch.

    The source's batch, augmented; with a policy, rewritten by it from the student of
    ``state`` (the train state before the step), whose policy part it updates, and its
    ``(sum, count)`` metrics; then the teacher's entries for the final batch. Without a
    policy, ``state`` is returned as it came and ``metrics`` is ``{}``.
    """
    ahead = inputs.get('ahead')
    raw = self.source.batches(inputs['source'], n,
                              positions=None if ahead is None else ahead['position'])

    def ready_at(i, state):
      batch = raw(i)
      batch['x'] = self.augment(batch['x'], batch['id'], batch['epoch'], seed=inputs['seed'])
      metrics = {}
      if self.policy is not None:
        batch, state, metrics = policy_lib.run(self.policy, batch, state,
                                               teacher=inputs.get('teacher'))
      if self.prompt_loss:
        batch = with_prompt_loss(batch)
      if ahead is not None:
        batch.update({k: jax.tree.map(lambda a: a[i], v) for k, v in ahead.items()
                      if k != 'position'})
      elif self.teacher is not None:
        x, kwargs = teacher_inputs(batch)
        batch.update(teacher_lib.outputs(self.teacher.apply, inputs['teacher'], x,
                                         self.needs, **kwargs))
      return batch, state, metrics

    return ready_at

  def batches(self, inputs, n: int) -> Callable[[jax.Array], Batch]:
    """``batch_at(i) -> batch``: :meth:`ready` without a train state (a feed without a
    policy, whose batches do not depend on the student)."""
    if self.policy is not None:
      raise ValueError('a feed with a policy makes its batches from the train state: call '
                       'ready(inputs, n)(i, state)')
    ready = self.ready(inputs, n)
    return lambda i: ready(i, None)[0]

  def evaluated(self, state, metrics: dict):
    """The train state after an evaluation with these ``metrics``: the policy's
    ``evaluated`` applied to its part (DistiLLM's threshold), or ``state`` itself."""
    if self.policy is None or self.policy.evaluated is None:
      return state
    if self._evaluated is None:   # jitted once, the state donated and kept in its shardings
      def update(train_state, values):
        new = self.policy.evaluated(policy_lib.policy_state(train_state), values)
        return policy_lib.with_policy_state(train_state, new)
      self._evaluated = jax.jit(update, donate_argnums=0,
                                out_shardings=jax.tree.map(lambda a: a.sharding, state))
    return self._evaluated(state, {k: np.float32(v) for k, v in metrics.items()})

  def position(self, step: int) -> dict:
    return self.source.position(step)

  def restore(self, position: dict) -> None:
    self.source.restore(position)


class TeacherAhead:
  """A live teacher on devices of its own, one call ahead of the student.

  ``entries(step, n)`` returns the teacher's entries for steps ``step .. step + n - 1``
  (each ``[n, batch, ...]``) and the positions of their examples in the split
  (``position``), computed ahead when the previous call asked, and dispatches the
  teacher's call for the chunk ``next_chunk(step + n)`` (``(first, count)`` or None),
  which then runs on the teacher's devices while the student's call runs on its own.
  The entries are the same as a teacher inside the student's call would compute. They
  come out split over the teacher's devices along the batch and are moved to the
  student's batch sharding (:func:`kdjax.parallel.put_rows`: in a multi-process run
  each process places the rows its own teacher devices computed).

  Args:
    arrays: the training split (``x``, ``label``, ``id``), as for :class:`DeviceSource`.
    teacher: the teacher, loaded on ``teacher_mesh``.
    teacher_mesh: the teacher's devices.
    student_mesh: the student's devices (the entries are moved there, batch-sharded).
    batch_size, seed: as the student's :class:`DeviceSource`.
    augment: the augmentation (the teacher sees the student's augmented inputs).
    needs: the entries the objective reads.
    next_chunk: ``next_chunk(step) -> (first, count) | None``: the student's next call.
  """

  def __init__(self, arrays: dict, teacher: teacher_lib.Teacher, *,
               teacher_mesh: jax.sharding.Mesh, student_mesh: jax.sharding.Mesh,
               batch_size: int, seed: int, augment: Callable, needs,
               next_chunk: Callable[[int], tuple[int, int] | None]):
    source = DeviceSource(arrays, batch_size=batch_size, seed=seed, mesh=teacher_mesh)
    self.feed = Feed(source, augment=augment, seed=seed, teacher=teacher, needs=needs)
    self.next_chunk = next_chunk
    self.teacher_mesh = teacher_mesh
    self.teacher_sharding = batch_sharding(teacher_mesh, leading=1)
    self.sharding = batch_sharding(student_mesh, leading=1)
    self._calls: dict[int, Callable] = {}
    self._pending: dict[tuple[int, int], Any] = {}

  def _call(self, first: int, n: int):
    if n not in self._calls:
      feed = self.feed

      def run(inputs):
        batch_at = feed.batches(inputs, n)

        def body(_, i):
          batch = batch_at(i)
          return None, {k: v for k, v in batch.items()
                        if k.startswith('teacher_') or k == 'position'}

        return jax.lax.scan(body, None, jnp.arange(n))[1]

      self._calls[n] = jax.jit(run, in_shardings=(feed.shardings(),),
                               out_shardings=self.teacher_sharding)
    with jax.set_mesh(self.teacher_mesh):   # the teacher's activation constraints apply
      return self._calls[n](self.feed.inputs(first, n))

  def entries(self, step: int, n: int):
    out = self._pending.pop((step, n), None)
    self._pending.clear()
    if out is None:
      out = self._call(step, n)
    nxt = self.next_chunk(step + n)
    if nxt is not None:
      self._pending[nxt] = self._call(*nxt)
    # Several processes: each hands over the rows its teacher devices hold, which are
    # the rows its student devices take (both meshes are process-major).
    return put_rows(out, self.sharding, axis=1)
