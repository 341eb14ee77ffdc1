"""The vmap simulator: a whole federated round as one jitted function.

A round (``make_round``):

1. samples a cohort of ``clients_per_round`` distinct clients, uniformly or
   with probability proportional to their example counts;
2. marks a ``dropout`` fraction of it (in expectation) as failing to report;
3. gathers the cohort's packed data and client states and runs
   ``jax.vmap(algorithm.client_update)`` over it — in one call, or, with
   ``clients_per_chunk``, as ``lax.map`` over chunks of that many clients
   (each chunk vmapped; only the running weighted sums cross chunks, so peak
   memory scales with the chunk, not the cohort);
4. averages the reported updates with their weights and calls
   ``algorithm.server_update``; the reported clients' states are written back.

Keys: round ``r`` uses ``k_r = fold_in(key(seed), r)``; the cohort is drawn
with ``fold_in(k_r, 0)``, dropouts with ``fold_in(k_r, 1)`` and client ``i``
trains with :func:`client_key` ``(k_r, i)``, so a client's randomness does not
depend on its position in the cohort or on the chunking.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.engine.step import accuracy
from kdjax.engine.step import tree_where
from kdjax.errors import UserError
from kdjax.federated import base
from kdjax.federated.packing import ClientData
from kdjax.parallel import replicate_global


class SimState(NamedTuple):
  """The whole simulation state (a pytree; what a checkpoint saves).

  Attributes:
    round: int32 number of rounds done.
    server: the algorithm's :class:`~kdjax.federated.base.ServerState`.
    clients: stacked per-client states ``[num_clients, ...]`` (or ``{}``).
  """

  round: jax.Array
  server: base.ServerState
  clients: Any


def init_state(algorithm: base.FedAlgorithm, params, model_state, num_clients: int) -> SimState:
  """The state before round 0."""
  server, clients = algorithm.init(params, model_state, num_clients)
  return SimState(jnp.zeros((), jnp.int32), server, clients)


def round_key(seed: int, round_index) -> jax.Array:
  """The key of round ``round_index``."""
  return jax.random.fold_in(jax.random.key(seed), round_index)


def client_key(rkey: jax.Array, client) -> jax.Array:
  """The training key of client ``client`` (a global client id) in a round."""
  return jax.random.fold_in(jax.random.fold_in(rkey, 2), client)


def sample_cohort(rkey: jax.Array, counts: jax.Array, clients_per_round: int,
                  sampling: str = 'uniform') -> jax.Array:
  """``[clients_per_round]`` distinct client ids.

  Args:
    rkey: the round key.
    counts: ``[num_clients]`` example counts (for size-weighted sampling).
    clients_per_round: the cohort size.
    sampling: ``'uniform'`` or ``'size'`` (probability ∝ example count,
      without replacement).

  Returns:
    int32 client ids.

  >>> sample_cohort(jax.random.key(0), jnp.ones(5), 5).sort().tolist()
  [0, 1, 2, 3, 4]
  """
  n = counts.shape[0]
  key = jax.random.fold_in(rkey, 0)
  if sampling == 'uniform':
    p = None
  elif sampling == 'size':
    p = counts.astype(jnp.float32) / jnp.sum(counts)
  else:
    raise UserError(f"cohort sampling must be 'uniform' or 'size', got {sampling!r}.")
  return jax.random.choice(key, n, (clients_per_round,), replace=False, p=p).astype(jnp.int32)


def sample_reported(rkey: jax.Array, cohort_size: int, dropout: float) -> jax.Array:
  """``[cohort_size]`` bool: which cohort clients report (each drops with prob. ``dropout``)."""
  if dropout <= 0:
    return jnp.ones((cohort_size,), bool)
  return jax.random.uniform(jax.random.fold_in(rkey, 1), (cohort_size,)) >= dropout


def _take(tree, idx):
  return jax.tree.map(lambda a: jnp.take(a, idx, axis=0), tree)


def make_round(algorithm: base.FedAlgorithm, *, num_clients: int, clients_per_round: int,
               sampling: str = 'uniform', dropout: float = 0.0,
               clients_per_chunk: int | None = None, seed: int = 0,
               mesh: jax.sharding.Mesh | None = None, client_axis: str = 'clients') -> Callable:
  """Builds ``round_fn(state, data) -> (state, info)``, jitted.

  Args:
    algorithm: the :class:`~kdjax.federated.base.FedAlgorithm`.
    num_clients: the client count ``N`` (the leading axis of ``data``).
    clients_per_round: the cohort size.
    sampling: ``'uniform'`` or ``'size'``.
    dropout: the probability that a cohort client fails to report (its update
      is left out of the average and its state is not changed).
    clients_per_chunk: when set, the cohort is processed in chunks of this
      many clients (``lax.map`` over ``clients_per_round / clients_per_chunk``
      vmapped chunks); it must divide ``clients_per_round``.
    seed: the simulation seed.
    mesh: with several devices, a mesh with axis ``client_axis``
      (:func:`kdjax.parallel.make_mesh`): each chunk's stacked client data,
      states and keys get a ``NamedSharding`` over that axis, so the vmapped
      clients run on all devices (the chunk size must divide by the axis
      size); the weighted sums become cross-device reductions. Pass the state
      and data through :func:`replicate` (the returned state is replicated).
    client_axis: the mesh axis the client axis is sharded over.

  Returns:
    A jitted ``round_fn(state: SimState, data: ClientData) -> (SimState, info)``
    (a :class:`RoundFn`: ``round_fn.rounds(state, data, n)`` runs ``n`` rounds in
    one call) where ``info`` holds ``cohort`` ``[K]``, ``reported`` ``[K]``, the summed
    training metrics ``loss`` and ``accuracy`` as ``(sum, count)`` over the
    reported clients, and ``num_reported``.

  Raises:
    UserError: a cohort larger than the client count, a bad chunk size or
      dropout rate.
  """
  k = int(clients_per_round)
  if not 1 <= k <= num_clients:
    raise UserError(
        f'clients_per_round ({clients_per_round}) must be between 1 and num_clients '
        f'({num_clients}).')
  if not 0.0 <= dropout < 1.0:
    raise UserError(f'client dropout must be in [0, 1), got {dropout}.')
  chunk = k if clients_per_chunk is None else int(clients_per_chunk)
  if chunk < 1 or k % chunk:
    raise UserError(
        f'clients_per_chunk ({clients_per_chunk}) must divide clients_per_round ({k}).')
  shard = None
  if mesh is not None:
    check_chunk_on_mesh(chunk, mesh, client_axis)
    shard = client_sharding(mesh, client_axis)

  seeded = _seeded_round(algorithm, num_clients=num_clients, k=k, sampling=sampling,
                         dropout=dropout, chunk=chunk, shard=shard)
  return jit_round(lambda state, data: seeded(state, data, seed), mesh)


class RoundFn:
  """A jitted round: ``round_fn(state, data) -> (state, info)``, and
  ``round_fn.rounds(state, data, n) -> (state, infos)``: ``n`` rounds as one
  ``lax.scan`` in one call (``infos`` stacked along a new leading axis of ``n``),
  equal to ``n`` calls of ``round_fn``. Fewer calls mean fewer dispatches and host
  synchronizations: the run loop (``kdjax fed run``, ``config.rounds_per_call``)
  calls it between evaluations and checkpoints. Each distinct ``n`` compiles once.
  """

  def __init__(self, fn: Callable, mesh: jax.sharding.Mesh | None):
    out = {} if mesh is None else {'out_shardings': replicated(mesh)}
    self._one = jax.jit(fn, **out)
    self._many = jax.jit(functools.partial(scan_rounds, fn), static_argnums=2, **out)
    # XLA:CPU's in-process all-reduce blocks a worker of the thread pool that every CPU
    # device shares, and a round dispatched while another device still finished the
    # previous one deadlocked there (jax 0.10.2, 2 devices on 2 cores: 2 hangs in 3 runs
    # of 100 back-to-back rounds, none with the wait): on a CPU mesh each call first
    # waits for the previous state.
    self._wait = (mesh is not None and mesh.devices.size > 1
                  and mesh.devices.flat[0].platform == 'cpu')
    self.lower = self._one.lower

  def __call__(self, state, data):
    if self._wait:
      jax.block_until_ready(state)
    return self._one(state, data)

  def rounds(self, state, data, n: int):
    if self._wait:
      jax.block_until_ready(state)
    return self._many(state, data, int(n))


def scan_rounds(round_fn: Callable, state, data, n: int):
  """``n`` rounds of ``round_fn(state, data) -> (state, info)`` as one ``lax.scan``:
  ``(state, infos)`` with every ``info`` leaf stacked along a leading axis of ``n``."""
  return jax.lax.scan(lambda s, _: round_fn(s, data), state, None, length=n)


def run_rounds(round_fn: RoundFn, state, data, n: int):
  """``n`` rounds from ``state``: ``(state, infos)`` with one ``info`` per round.

  One round is one plain call (its ``info`` stays on device); more are one
  :meth:`RoundFn.rounds` call, whose stacked infos come back to the host once and
  are split per round.
  """
  if n == 1:
    state, info = round_fn(state, data)
    return state, [info]
  state, stacked = round_fn.rounds(state, data, n)
  stacked = jax.device_get(stacked)
  return state, [jax.tree.map(lambda a, i=i: a[i], stacked) for i in range(n)]


def jit_round(fn: Callable, mesh: jax.sharding.Mesh | None) -> RoundFn:
  """:class:`RoundFn` for ``fn(state, data) -> (state, info)``; with a mesh the outputs
  come back replicated over it (the layout of :func:`replicate`d inputs, so round
  after round neither recompiles nor reshards), and on CPU each call first waits
  for the previous state (see :class:`RoundFn`).
  """
  return RoundFn(fn, mesh)


def round_segments(start: int, stop: int, per_call: int, *every: int) -> list[tuple[int, int]]:
  """Splits rounds ``start .. stop - 1`` into ``(first, count)`` runs of at most
  ``per_call`` rounds that never cross a multiple of any positive ``every`` (the
  rounds after which a run evaluates or checkpoints).

  >>> round_segments(3, 25, 10, 10)
  [(3, 7), (10, 10), (20, 5)]
  >>> round_segments(0, 7, 4, 3, 0)
  [(0, 3), (3, 3), (6, 1)]
  """
  per_call = max(int(per_call), 1)
  out, r = [], int(start)
  while r < stop:
    end = min(r + per_call, int(stop))
    for e in every:
      if e and e > 0:
        end = min(end, (r // e + 1) * e)
    out.append((r, end - r))
    r = end
  return out


def make_seeded_round(algorithm: base.FedAlgorithm, *, num_clients: int, clients_per_round: int,
                      sampling: str = 'uniform', dropout: float = 0.0,
                      clients_per_chunk: int | None = None) -> Callable:
  """``round_fn(state, data, seed)``, not jitted: :func:`make_round` with the seed an argument.

  The seed may be traced, so ``jax.jit(jax.vmap(round_fn))(states, datas, seeds)``
  runs one round of several independent simulations (a sweep's seeds) at once;
  each equals ``make_round(..., seed=s)`` on its own state and data. Arguments as
  in :func:`make_round` (no mesh).
  """
  k = int(clients_per_round)
  chunk = k if clients_per_chunk is None else int(clients_per_chunk)
  make_round(algorithm, num_clients=num_clients, clients_per_round=k, sampling=sampling,
             dropout=dropout, clients_per_chunk=clients_per_chunk)   # validates
  return _seeded_round(algorithm, num_clients=num_clients, k=k, sampling=sampling,
                       dropout=dropout, chunk=chunk, shard=None)


def _seeded_round(algorithm, *, num_clients, k, sampling, dropout, chunk, shard) -> Callable:
  def round_fn(state: SimState, data: ClientData, seed):
    rkey = round_key(seed, state.round)
    cohort = sample_cohort(rkey, data.count, k, sampling)
    reported = sample_reported(rkey, k, dropout)
    server = state.server
    wsum, wtot, metrics, new_states = cohort_pass(
        algorithm, server, cohort, cohort, reported, data, state.clients, rkey, chunk,
        sharding=shard)
    mean = jax.tree.map(lambda s: s / jnp.maximum(wtot, 1e-12), wsum)
    num_reported = jnp.sum(reported.astype(jnp.int32))
    info_counts = {'num_reported': num_reported, 'num_clients': jnp.asarray(num_clients),
                   'cohort_size': jnp.asarray(k), 'round': state.round}
    new_server = algorithm.server_update(server, mean, info_counts)
    # Nobody reported: the server keeps its state (no optimizer step on a zero update).
    any_rep = wtot > 0
    new_server = tree_where(any_rep, new_server, server)
    clients = jax.tree.map(lambda all_, new: all_.at[cohort].set(new), state.clients,
                           new_states)
    if algorithm.personalize is not None:
      clients = algorithm.personalize(new_server, clients)
    if algorithm.server_distill is not None:
      new_server, clients = algorithm.server_distill(new_server, clients)
    info = {'cohort': cohort, 'reported': reported, 'num_reported': num_reported,
            'loss': metrics['loss'], 'accuracy': metrics['accuracy']}
    return SimState(state.round + 1, new_server, clients), info

  return round_fn


def check_chunk_on_mesh(chunk: int, mesh: jax.sharding.Mesh, client_axis: str,
                        what: str = 'the cohort chunk') -> None:
  """A :class:`UserError` unless ``chunk`` clients split evenly over the mesh axis."""
  size = mesh.shape[client_axis]
  if chunk % size:
    raise UserError(f'{what} ({chunk} clients) must divide by the {size} devices of '
                    f'the mesh axis {client_axis!r}; change clients_per_round or '
                    'clients_per_chunk.')


def replicated(mesh: jax.sharding.Mesh) -> jax.sharding.NamedSharding:
  """The ``NamedSharding`` of a full copy on every device of ``mesh``."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def replicate(tree, mesh: jax.sharding.Mesh | None):
  """``tree`` copied once onto every device of ``mesh`` (unchanged without a mesh).

  Give a sharded :func:`make_round` its state and client data this way: arrays on
  one device would be copied to every device again at each round. The mesh may span
  processes (``jax.distributed``): every process passes the same ``tree`` and places
  the copies its own devices keep (:func:`kdjax.parallel.replicate_global`).
  """
  if mesh is None:
    return tree
  return replicate_global(tree, mesh)


def client_sharding(mesh: jax.sharding.Mesh, axis: str = 'clients'):
  """``NamedSharding`` of stacked client arrays: the leading axis over ``axis``."""
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(axis))


def cohort_pass(algorithm: base.FedAlgorithm, server, ids, state_ids, reported, data,
                client_states, rkey, chunk: int, sharding=None):
  """Runs ``algorithm.client_update`` over a cohort, vmapped (``lax.map`` over chunks).

  Args:
    algorithm: the algorithm.
    server: its server state (broadcast to every client).
    ids: ``[k]`` global client ids (rows of ``data``; the client keys).
    state_ids: ``[k]`` rows of ``client_states`` (``ids`` itself, or the clients'
      positions within an architecture group).
    reported: ``[k]`` bool.
    data: the packed client data.
    client_states: stacked client states.
    rkey: the round key.
    chunk: clients per vmapped chunk (it divides ``k``).
    sharding: optional :func:`client_sharding` for each chunk's stacked client
      data, states and keys.

  Returns:
    ``(weighted update sum, weight total, summed metrics, new client states [k])``.
  """
  k = ids.shape[0]
  num_chunks = k // chunk

  def run_chunk(ids, sids, reported):
    cdata = _take(data, ids)
    cstates = _take(client_states, sids)
    keys = jax.vmap(lambda i: client_key(rkey, i))(ids)
    if sharding is not None:
      cdata, cstates, keys, reported = jax.lax.with_sharding_constraint(
          (cdata, cstates, keys, reported), sharding)
    out = jax.vmap(algorithm.client_update, in_axes=(None, 0, 0, 0))(
        server, cstates, cdata, keys)
    w = out.weight.astype(jnp.float32) * reported.astype(jnp.float32)
    wsum = jax.tree.map(lambda u: jnp.tensordot(w, u.astype(jnp.float32), axes=1), out.update)
    rep = reported.astype(jnp.float32)
    metrics = jax.tree.map(lambda m: jnp.sum(m * rep), out.metrics)
    new_states = jax.tree.map(
        lambda new, old: tree_where(reported.reshape((-1,) + (1,) * (new.ndim - 1)), new, old),
        out.client_state, cstates)
    return wsum, jnp.sum(w), metrics, new_states

  if num_chunks == 1:
    return run_chunk(ids, state_ids, reported)
  wsums, wtots, mets, states = jax.lax.map(
      lambda a: run_chunk(*a), (ids.reshape(num_chunks, chunk),
                                state_ids.reshape(num_chunks, chunk),
                                reported.reshape(num_chunks, chunk)))
  wsum = jax.tree.map(lambda a: jnp.sum(a, 0), wsums)
  wtot = jnp.sum(wtots)
  metrics = jax.tree.map(lambda a: jnp.sum(a, 0), mets)
  new_states = jax.tree.map(lambda a: a.reshape((k,) + a.shape[2:]), states)
  return wsum, wtot, metrics, new_states


# --------------------------------------------------------------------------- evaluation

# At most this many examples go through the model in one vmapped evaluation call
# (clients x examples): a 502-client Shakespeare evaluation in one vmap needed 31 GB.
EVAL_EXAMPLES = 4096


def _count_correct(apply_fn, params, model_state, x, label, batch: int, logits_fn=None):
  """``(correct, count)`` of one model on ``x`` in ``lax.map`` batches of ``batch``.

  ``label == -1`` marks padding; ``x`` is padded up to a multiple of ``batch``.
  ``logits_fn(xb) -> [b, C]``, when given, scores the batches instead of the model.
  """
  n = x.shape[0]
  b = max(1, min(int(batch), n))
  nb = -(-n // b)
  pad = nb * b - n
  x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
  label = jnp.pad(label, (0, pad), constant_values=-1)

  def one(args):
    xb, yb = args
    if logits_fn is not None:
      return accuracy(logits_fn(xb), yb, yb >= 0)
    out, _ = apply_fn(params, model_state, xb, train=False)
    return accuracy(out.logits, yb, yb >= 0)

  c, v = jax.lax.map(one, (x.reshape(nb, b, *x.shape[1:]), label.reshape(nb, b)))
  return jnp.sum(c), jnp.sum(v)


def make_evaluate(apply_fn: Callable[..., Any], *, batch_size: int = 1000) -> Callable:
  """``evaluate(params, model_state, x, label) -> (correct, count)``, jitted, in batches.

  ``label == -1`` marks padding. ``x`` is split into batches of ``batch_size``
  (the last one padded) scanned with ``lax.map``.
  """
  return jax.jit(lambda params, model_state, x, label: _count_correct(
      apply_fn, params, model_state, x, label, batch_size))


# ``fold_in`` offset of the evaluation-time fine-tuning keys (``FedAlgorithm.finetune``).
FINETUNE_KEY = 3


def finetune_key(seed, round_index, client) -> jax.Array:
  """The key of client ``client``'s evaluation-time fine-tuning after ``round_index`` rounds."""
  return jax.random.fold_in(jax.random.fold_in(round_key(seed, round_index), FINETUNE_KEY),
                            client)


def make_personal_evaluate(algorithm: base.FedAlgorithm, apply_fn: Callable[..., Any], *,
                           clients_per_chunk: int | None = None,
                           max_examples: int = EVAL_EXAMPLES) -> Callable:
  """``evaluate(state, test, train=None, seed=0) -> (correct [N], count [N])`` on every
  client's local test split.

  Each client evaluates ``algorithm.personal(server, its client state)`` (the
  global model for non-personalized algorithms), or the arg-max of
  ``algorithm.personal_logits`` where the algorithm sets it, or, for an algorithm with a
  ``finetune`` hook, ``algorithm.finetune(server, its client state, its row of
  train, key)`` with ``key = finetune_key(seed, state.round, client)``: every
  client (not only the last cohort) adapts the current server state on its own
  training split, then evaluates. ``train`` is then required. Memory is
  bounded: clients are vmapped in chunks of at most ``max_examples // E``
  clients (``E``: the padded local test size; and at most
  ``clients_per_chunk``), ``lax.map`` over the chunks, and a client's examples
  go through in batches of at most ``max_examples``.
  """
  tune = algorithm.finetune
  scores = algorithm.personal_logits

  def one_client(server, cstate, x, label, batch, tdata, key):
    if tune is not None:
      params, model_state = tune(server, cstate, tdata, key)
      return _count_correct(apply_fn, params, model_state, x, label, batch)
    if scores is not None:
      return _count_correct(apply_fn, None, None, x, label, batch,
                            lambda xb: scores(server, cstate, xb))
    params, model_state = algorithm.personal(server, cstate)
    return _count_correct(apply_fn, params, model_state, x, label, batch)

  def evaluate(state: SimState, test: ClientData, train: ClientData | None = None, seed=0):
    if tune is not None and train is None:
      raise ValueError(f'{algorithm.name} fine-tunes before evaluating: pass the packed '
                       'training split (evaluate(state, test, train, seed))')
    n, e = test.x.shape[0], test.x.shape[1]
    batch = max(1, min(e, int(max_examples)))
    chunk = max(1, int(max_examples) // batch)
    if clients_per_chunk:
      chunk = min(chunk, int(clients_per_chunk))
    chunk = min(chunk, n)
    tdata = {} if tune is None else tuple(train)
    keys = (jnp.zeros((n,)) if tune is None else
            jax.vmap(lambda i: finetune_key(seed, state.round, i))(jnp.arange(n)))
    fn = jax.vmap(lambda sv, cs, x, y, td, k: one_client(sv, cs, x, y, batch, td, k),
                  in_axes=(None, 0, 0, 0, 0, 0))
    per_client = (state.clients, test.x, test.label, tdata, keys)
    if chunk >= n:
      return fn(state.server, *per_client)
    nc = -(-n // chunk)
    pad = nc * chunk - n
    padt = lambda a: jnp.concatenate([a, jnp.repeat(a[:1], pad, 0)]) if pad else a
    xs = jax.tree.map(lambda a: padt(a).reshape(nc, chunk, *a.shape[1:]), per_client)
    c, v = jax.lax.map(lambda t: fn(state.server, *t), xs)
    return c.reshape(-1)[:n], v.reshape(-1)[:n]

  return jax.jit(evaluate)


def make_clients_global_evaluate(algorithm: base.FedAlgorithm,
                                 apply_fn: Callable[..., Any], *,
                                 batch_size: int = 1000) -> Callable:
  """``evaluate(state, x, label) -> (correct [N], count [N])``: every client's model on one set.

  For algorithms without a global model, "global accuracy" is the mean of
  the clients' accuracies on the global test set. Clients go one after another
  (``lax.map``), each over the set in batches of ``batch_size``.
  """

  scores = algorithm.personal_logits

  def one_client(server, cstate, x, label):
    if scores is not None:
      return _count_correct(apply_fn, None, None, x, label, batch_size,
                            lambda xb: scores(server, cstate, xb))
    params, model_state = algorithm.personal(server, cstate)
    return _count_correct(apply_fn, params, model_state, x, label, batch_size)

  def evaluate(state: SimState, x, label):
    return jax.lax.map(lambda cs: one_client(state.server, cs, x, label), state.clients)

  return jax.jit(evaluate)


def personalized_summary(correct, count) -> dict[str, float]:
  """Mean, std and worst-10% mean of per-client accuracy (clients with a test split).

  >>> personalized_summary(np.array([1., 2., 0.]), np.array([2., 2., 0.]))['personalized_accuracy_mean']
  0.75
  """
  correct, count = np.asarray(correct, np.float64), np.asarray(count, np.float64)
  has = count > 0
  if not has.any():
    return {'personalized_accuracy_mean': float('nan'), 'personalized_accuracy_std': float('nan'),
            'personalized_accuracy_worst10': float('nan')}
  acc = correct[has] / count[has]
  worst = np.sort(acc)[:max(1, int(np.ceil(0.1 * len(acc))))]
  return {'personalized_accuracy_mean': float(acc.mean()),
          'personalized_accuracy_std': float(acc.std()),
          'personalized_accuracy_worst10': float(worst.mean())}


def tree_bytes(tree) -> int:
  """Bytes of every array leaf of ``tree`` (shapes only; works on abstract values).

  A PRNG key leaf (a model's dropout stream) counts as its key data.

  >>> tree_bytes({'a': jnp.zeros((2, 3)), 'b': jnp.zeros(4, jnp.int8)})
  28
  >>> tree_bytes({'k': jax.random.key(0)})   # threefry: two uint32 words
  8
  """
  def nbytes(a):
    if jnp.issubdtype(a.dtype, jax.dtypes.prng_key):
      a = jax.eval_shape(jax.random.key_data, a)
    return int(np.prod(np.shape(a))) * jnp.dtype(a.dtype).itemsize
  return int(sum(nbytes(a) for a in jax.tree.leaves(tree)))
