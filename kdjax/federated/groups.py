"""Heterogeneous client models: clients grouped by architecture, vmapped within a group.

A config's ``client_models`` (a list of ``{model, model_options, fraction}``)
assigns each client an architecture (:func:`assign_clients`: a seeded
permutation of the client ids cut into blocks of the fractions' sizes). Each
group has its own model, local trainer and algorithm instance; the
simulation state holds one server state and one stacked client-state pytree
per group (``SimState.server`` and ``SimState.clients`` are tuples).

A round (:func:`make_grouped_round`), inside one ``jax.jit``:

1. draws a *stratified* cohort: ``k_g`` distinct clients from group ``g``
   (:func:`group_cohort_sizes`: ``clients_per_round`` split in proportion to
   the group sizes, at least one per group), so every group's vmap has a
   static size; with one group this is exactly the homogeneous cohort;
2. runs each group's cohort through its own ``jax.vmap(client_update)``
   (:func:`kdjax.federated.simulator.cohort_pass`, chunked as configured);
3. averages the updates: a key in ``algorithm.group_keys`` within its group
   (FedDF's parameter deltas, one server model per architecture), every other
   key over all groups — the knowledge is in logit space (public/proxy
   logits, per-class logits), so groups share it;
4. applies each group's ``server_update`` to that mean, and, for algorithms
   with ``personalize`` (KnFu, FedD2S), runs it once over every client's
   server-side memory (the client-state keys other than ``params`` and
   ``model_state``), merged across groups in client-id order.

Only algorithms with ``heterogeneous=True`` accept several groups; the
parameter-averaging ones (FedAvg, FedProx, SCAFFOLD, ...) are refused.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.engine.step import tree_where
from kdjax.errors import UserError
from kdjax.federated import base
from kdjax.federated import simulator as sim

MODEL_KEYS = ('params', 'model_state')


def assign_clients(num_clients: int, fractions: Sequence[float], seed: int = 0) -> list[np.ndarray]:
  """Sorted client ids of each architecture group.

  Group sizes are ``fraction · num_clients`` rounded by largest remainder
  (fractions are normalized); the ids come from a permutation seeded by
  ``seed``.

  Args:
    num_clients: ``N``.
    fractions: one positive fraction per group.
    seed: the assignment seed.

  Returns:
    One int32 id array per group; together they cover ``0 … N−1`` once.

  Raises:
    UserError: a non-positive fraction or a group left without clients.

  >>> [g.tolist() for g in assign_clients(5, [0.6, 0.4], seed=0)]
  [[2, 3, 4], [0, 1]]
  """
  f = np.asarray(fractions, np.float64)
  if f.ndim != 1 or len(f) == 0 or np.any(~(f > 0)):
    raise UserError(f'client_models fractions must be positive, got {list(fractions)}.')
  sizes = _largest_remainder(num_clients, f / f.sum())
  if min(sizes) < 1:
    raise UserError(f'client_models fractions {list(fractions)} leave a model without any of '
                    f'the {num_clients} clients; raise its fraction or num_clients.')
  perm = np.random.default_rng([int(seed), 13]).permutation(num_clients)
  bounds = np.cumsum([0] + sizes)
  return [np.sort(perm[a:b]).astype(np.int32) for a, b in zip(bounds[:-1], bounds[1:])]


def _largest_remainder(total: int, shares: np.ndarray) -> list[int]:
  raw = shares * total
  out = np.floor(raw).astype(int)
  for i in np.argsort(-(raw - out), kind='stable')[:total - int(out.sum())]:
    out[i] += 1
  return out.tolist()


def group_cohort_sizes(clients_per_round: int, group_sizes: Sequence[int]) -> list[int]:
  """``k_g``: the cohort split over groups in proportion to their sizes (each ≥ 1).

  >>> group_cohort_sizes(10, [60, 30, 10])
  [6, 3, 1]
  >>> group_cohort_sizes(3, [98, 1, 1])
  [1, 1, 1]
  """
  k, sizes = int(clients_per_round), [int(s) for s in group_sizes]
  if not len(sizes) <= k <= sum(sizes):
    raise UserError(f'clients_per_round ({k}) must be between the number of client models '
                    f'({len(sizes)}) and num_clients ({sum(sizes)}).')
  out = _largest_remainder(k, np.asarray(sizes, np.float64) / sum(sizes))
  for i in range(len(out)):     # every group takes part: a missing one takes from the largest
    if out[i] == 0:
      out[int(np.argmax(out))] -= 1
      out[i] = 1
  return out


def check_heterogeneous(algorithms: Sequence[base.FedAlgorithm]) -> None:
  """Raises a one-line :class:`UserError` when ``algorithms`` cannot mix architectures."""
  if len(algorithms) > 1 and not all(a.heterogeneous for a in algorithms):
    name = algorithms[0].name
    raise UserError(
        f'{name} averages model parameters and cannot mix client architectures; use one '
        'model (no client_models) or a distillation algorithm (fd, fedmd, dsfl, feddf, '
        'edgefd, knfu, fedd2s).')


def init_grouped_state(algorithms: Sequence[base.FedAlgorithm], params: Sequence[Any],
                       model_states: Sequence[Any],
                       ids: Sequence[np.ndarray]) -> sim.SimState:
  """The state before round 0: per-group server and stacked client states."""
  servers, clients = [], []
  for alg, p, ms, g in zip(algorithms, params, model_states, ids):
    s, c = alg.init(p, ms, len(g))
    servers.append(s)
    clients.append(c)
  return sim.SimState(jnp.zeros((), jnp.int32), tuple(servers), tuple(clients))


def _chunk_for(k: int, clients_per_chunk: int | None) -> int:
  if not clients_per_chunk:
    return k
  c = min(int(clients_per_chunk), k)
  while k % c:
    c -= 1
  return c


def _mean(wsums, wtots, g: int, group_keys):
  """Group ``g``'s mean update: ``group_keys`` within the group, the rest over all groups."""
  wall = sum(wtots)
  div = lambda tree, t: jax.tree.map(lambda a: a / jnp.maximum(t, 1e-12), tree)
  total = lambda tree_of: jax.tree.map(lambda *a: sum(a), *[tree_of(w) for w in wsums])
  if isinstance(wsums[g], dict):
    return {key: (div(wsums[g][key], wtots[g]) if key in group_keys
                  else div(total(lambda w: w[key]), wall)) for key in wsums[g]}
  return div(total(lambda w: w), wall)


def merge_memory(clients: Sequence[Any], ids: Sequence[np.ndarray], num_clients: int):
  """The client-state keys other than the model, as ``[num_clients, ...]`` in id order."""
  keys = [k for k in clients[0] if k not in MODEL_KEYS]
  out = {}
  for key in keys:
    first = clients[0][key]
    full = jax.tree.map(lambda a: jnp.zeros((num_clients,) + a.shape[1:], a.dtype), first)
    for c, g in zip(clients, ids):
      full = jax.tree.map(lambda f, a: f.at[jnp.asarray(g)].set(a), full, c[key])
    out[key] = full
  return out


def make_grouped_round(algorithms: Sequence[base.FedAlgorithm], ids: Sequence[np.ndarray], *,
                       num_clients: int, clients_per_round: int, sampling: str = 'uniform',
                       dropout: float = 0.0, clients_per_chunk: int | None = None,
                       seed: int = 0, mesh: jax.sharding.Mesh | None = None,
                       client_axis: str = 'clients') -> Callable:
  """Builds ``round_fn(state, data) -> (state, info)``, jitted (module docstring).

  Args:
    algorithms: one algorithm per group (the same algorithm and options, each
      built around its group's trainer).
    ids: the groups' sorted client ids (:func:`assign_clients`).
    num_clients: ``N``.
    clients_per_round: the cohort size ``K`` (split by :func:`group_cohort_sizes`).
    sampling: ``'uniform'`` or ``'size'``, within each group.
    dropout: the probability that a cohort client fails to report.
    clients_per_chunk: chunk size of each group's vmap (the largest divisor
      of ``k_g`` not above it).
    seed: the simulation seed.
    mesh: as in :func:`kdjax.federated.simulator.make_round`: each group's
      chunks are sharded over ``client_axis`` (each group's chunk must divide by
      the axis size); pass state and data through ``simulator.replicate``.
    client_axis: the mesh axis of the client axis.

  Returns:
    The jitted round: ``info`` holds ``cohort`` ``[K]`` (group after group),
    ``reported`` ``[K]``, ``num_reported``, ``group_reported`` ``[G]``,
    ``loss`` and ``accuracy`` ``(sum, count)`` over every group.

  Raises:
    UserError: a parameter-averaging algorithm with several groups, a bad
      cohort size or dropout rate.
  """
  check_heterogeneous(algorithms)
  if sorted(np.concatenate(ids).tolist()) != list(range(num_clients)):
    raise ValueError('the groups must partition the client ids 0 .. num_clients - 1')
  if not 0.0 <= dropout < 1.0:
    raise UserError(f'client dropout must be in [0, 1), got {dropout}.')
  if not 1 <= clients_per_round <= num_clients:
    raise UserError(f'clients_per_round ({clients_per_round}) must be between 1 and '
                    f'num_clients ({num_clients}).')
  sizes = group_cohort_sizes(clients_per_round, [len(g) for g in ids])
  k = int(clients_per_round)
  num_groups = len(algorithms)
  group_keys = set(algorithms[0].group_keys)
  offsets = np.cumsum([0] + sizes)
  personalize = algorithms[0].personalize
  chunks = [_chunk_for(kg, clients_per_chunk) for kg in sizes]
  shard = None
  if mesh is not None:
    for g, c in enumerate(chunks):
      sim.check_chunk_on_mesh(c, mesh, client_axis, what=f'group {g}\'s cohort chunk')
    shard = sim.client_sharding(mesh, client_axis)

  def round_fn(state: sim.SimState, data):
    rkey = sim.round_key(seed, state.round)
    reported = sim.sample_reported(rkey, k, dropout)
    cohorts, locals_, reps, outs = [], [], [], []
    for g, (alg, gid) in enumerate(zip(algorithms, ids)):
      gid = jnp.asarray(gid)
      gkey = rkey if num_groups == 1 else jax.random.fold_in(rkey, 1000 + g)
      local = sim.sample_cohort(gkey, data.count[gid], sizes[g], sampling)
      cohort = gid[local]
      rep = reported[offsets[g]:offsets[g + 1]]
      outs.append(sim.cohort_pass(alg, state.server[g], cohort, local, rep, data,
                                  state.clients[g], rkey, chunks[g], sharding=shard))
      cohorts.append(cohort)
      locals_.append(local)
      reps.append(rep)
    wsums = [o[0] for o in outs]
    wtots = [o[1] for o in outs]
    wall = sum(wtots)
    num_reported = jnp.sum(reported.astype(jnp.int32))
    info_counts = {'num_reported': num_reported, 'num_clients': jnp.asarray(num_clients),
                   'cohort_size': jnp.asarray(k), 'round': state.round}
    servers, clients = [], []
    for g, alg in enumerate(algorithms):
      mean = _mean(wsums, wtots, g, group_keys)
      new = alg.server_update(state.server[g], mean, info_counts)
      new = tree_where(wall > 0, new, state.server[g])
      servers.append(new)
      clients.append(jax.tree.map(lambda all_, s: all_.at[locals_[g]].set(s),
                                  state.clients[g], outs[g][3]))
    if personalize is not None:
      merged = personalize(servers[0], merge_memory(clients, ids, num_clients))
      clients = [dict(c, **{key: jax.tree.map(lambda a: a[jnp.asarray(gid)], merged[key])
                            for key in merged})
                 for c, gid in zip(clients, ids)]
    metrics = jax.tree.map(lambda *a: sum(a), *[o[2] for o in outs])
    info = {'cohort': jnp.concatenate(cohorts), 'reported': reported,
            'num_reported': num_reported,
            'group_reported': jnp.stack([jnp.sum(r.astype(jnp.int32)) for r in reps]),
            'loss': metrics['loss'], 'accuracy': metrics['accuracy']}
    return sim.SimState(state.round + 1, tuple(servers), tuple(clients)), info

  return sim.jit_round(round_fn, mesh)


def group_bytes(algorithms: Sequence[base.FedAlgorithm], state: sim.SimState, data,
                ids: Sequence[np.ndarray]) -> tuple[list[int], list[int]]:
  """Bytes one client of each group uploads and downloads in a round."""
  up, down = [], []
  for g, alg in enumerate(algorithms):
    row = int(ids[g][0])
    shape = jax.eval_shape(alg.client_update, state.server[g],
                           jax.tree.map(lambda a: a[0], state.clients[g]),
                           jax.tree.map(lambda a: a[row], data), jax.random.key(0)).update
    up.append(sim.tree_bytes(shape))
    down.append(sim.tree_bytes(alg.download(state.server[g])))
  return up, down


def make_grouped_evaluate(algorithms: Sequence[base.FedAlgorithm],
                          applies: Sequence[Callable[..., Any]], ids: Sequence[np.ndarray], *,
                          num_clients: int, clients_per_chunk: int | None = None) -> Callable:
  """``evaluate(state, test, test_x, test_label) -> (metrics, (correct [N], count [N]))``.

  The metrics cover every group; ``correct`` / ``count`` are every client's
  personalized test counts, in client-id order.

  ``global_accuracy``: for algorithms with a server model (FedDF), the
  client-count-weighted mean of the groups' server models' accuracies (each
  also reported as ``global_accuracy_<g>``); otherwise the mean over all
  clients of their model's accuracy on the global test set. Personalized
  accuracy: every client's model on its local test split, all groups
  together.
  """
  evals = [sim.make_evaluate(a) for a in applies]
  personal = [sim.make_personal_evaluate(alg, a, clients_per_chunk=clients_per_chunk)
              for alg, a in zip(algorithms, applies)]
  on_global = [sim.make_clients_global_evaluate(alg, a) for alg, a in zip(algorithms, applies)]

  def evaluate(state: sim.SimState, test, test_x, test_label) -> dict[str, float]:
    pc, pn = np.zeros(num_clients), np.zeros(num_clients)
    out = {}
    if algorithms[0].has_global_model:
      accs = []
      for g in range(len(algorithms)):
        c, n = evals[g](state.server[g].params, state.server[g].model_state, test_x,
                        test_label)
        accs.append(float(c) / max(float(n), 1.0))
        out[f'global_accuracy_{g}'] = accs[-1]
      w = np.asarray([len(g) for g in ids], np.float64)
      out['global_accuracy'] = float(np.dot(w, accs) / w.sum())
    else:
      accs = np.zeros(num_clients)
      for g, gid in enumerate(ids):
        sub = sim.SimState(state.round, state.server[g], state.clients[g])
        cs, ns = on_global[g](sub, test_x, test_label)
        accs[gid] = np.asarray(cs) / np.maximum(np.asarray(ns), 1.0)
      out['global_accuracy'] = float(np.mean(accs))
    for g, gid in enumerate(ids):
      sub = sim.SimState(state.round, state.server[g], state.clients[g])
      c, n = personal[g](sub, jax.tree.map(lambda a: a[jnp.asarray(gid)], test))
      pc[gid], pn[gid] = np.asarray(c), np.asarray(n)
    out.update(sim.personalized_summary(pc, pn))
    return out, (pc, pn)

  return evaluate
