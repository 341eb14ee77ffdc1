"""FedAvg rounds per second: kdjax's vmap simulator against three per-client loops.

One FedAvg round on MNIST-1D (the real train split): every one of ``--clients``
clients (100) holds 40 examples (a seeded IID split), trains 2 local epochs of
SGD (lr 0.05, batch 10: 8 steps) from the global model, and the server averages
the models weighted by example counts. Same model, partition, local steps,
shuffling orders and keys for every contender:

* ``kdjax``: the simulator's jitted round (``kdjax.federated.make_round`` over
  ``fedavg``): the cohort as ``jax.vmap`` of the ``lax.scan`` local trainer inside
  one ``jax.jit``, in ``lax.map`` chunks of ``--clients-per-chunk`` (25) clients (on
  CPU a chunk's parameters stay in cache), and as one vmap of all 100
  (``kdjax_one_vmap``). With several devices (on CPU ``--cpu-devices``, by default one
  per usable core, through ``JAX_NUM_CPU_DEVICES``) the same round is also timed with the
  client axis sharded over them (``make_round(mesh=...)``, chunks of
  ``--sharded-clients-per-chunk``: ``kdjax_sharded``; one vmap per device:
  ``kdjax_sharded_one_vmap``). The layouts named ``..._calls`` run the same rounds
  ``--rounds-per-call`` at a time (``RoundFn.rounds``: one ``lax.scan`` over rounds in
  one call, fewer dispatches and host waits), as ``kdjax fed run`` does with
  ``rounds_per_call``. Which layout is fastest depends on the model and the
  machine (each is a ``kdjax fed run`` setting: ``clients_per_chunk``, ``mesh``,
  ``rounds_per_call``); kdjax's figure and the ratios use the fastest
  (``kdjax_variant``); the best single-device figure and the best with one round per
  call (``*_one_round_per_call``) and their ratios are kept too. The
  other contenders run on the first device, as a plain JAX program does; the Flower
  actors each see one device.
* (a) ``sequential`` (FedJAX-style): a Python loop over clients and over their
  batches (gathered on the host with numpy), one jitted SGD step per batch.
* (b) ``scan_loop``: a Python loop over clients, each client's whole local
  training jitted as one ``lax.scan`` (kdjax's own local trainer, unvmapped).
* (c) ``flower``: Flower's Ray-based simulation (``flwr.simulation.start_simulation``,
  deprecated in Flower 1.13 but still shipped; its replacement, ``flwr run``,
  drives the same Ray backend through a separate SuperLink process), a
  ``NumPyClient`` whose ``fit`` runs the jitted ``lax.scan`` trainer of (b) on
  the client's 40 examples; ``FedAvg`` strategy with every client in every
  round. Run in a child process; skipped (recorded as ``null``) if ``flwr`` is
  not importable there (``--flower-path DIR`` prepends a ``pip --target``
  directory to that child's path).

Models: the MNIST-1D MLP (``mlp``, 100-100) and CNN (``cnn1d``, 3 stride-2
convs of 32 channels), each in two lowerings of the same arithmetic
(``LOWERINGS``), and every contender is credited with its faster one:

* CNN, ``conv_impl``: a convolution whose kernel is vmapped over clients is
  lowered by XLA (``'xla'``) to a grouped convolution (clients x channels
  groups), slow on CPU; kdjax's ``'patches'`` (im2col by strided slices, one
  ``dot_general``, the kernel gradient from the channels-first patches) becomes,
  under vmap, a *batched* matrix product, which is fast. It is also the faster
  lowering for the unvmapped small-batch steps of (a) and (b).
* MLP, ``dense_impl``: kdjax's default ``'auto'`` computes a Linear's kernel
  gradient for at most 16 rows (a client's batch of 10) as a sum of outer
  products, 3x faster than XLA:CPU's shallow batched ``dot`` under vmap; unvmapped,
  (a) and (b) are faster with the plain ``'xla'`` dot, so they (and Flower) use it.

Flower runs the lowering in which (b) was faster. Every figure is in the JSON.

Checks: after one round from the same initial model, the global parameters of
kdjax, (a) and (b) agree (max abs difference recorded, asserted < 1e-4); (c)'s
after its first round are compared the same way.

1000 clients: in a child process (so its peak RSS is its own), one cohort of
1000 clients (40 examples each, drawn from the train split per client), MLP
and CNN, run twice: in chunks of ``--many-chunk`` clients (the simulator's
``clients_per_chunk``: ``lax.map`` over vmapped chunks) and as one vmap of the
whole cohort. Each: rounds/s, CPU s/round, RSS and ``ru_maxrss`` after it, and
XLA's ``memory_analysis`` of the compiled round. On CPU the chunked round is the
faster one: a chunk's parameters, gradients and activations stay in cache, while
one vmap of 1000 clients streams every per-step update through memory.

Timing: each runner is warmed up (compiled; one more untimed round after the check,
since a sharded round whose input state came out of a sharded call compiles again);
repeats of ``--rounds`` rounds are interleaved across runners and the median rate kept. CPU seconds per round
(``time.process_time``, all threads) are recorded next to the rates: on a
machine shared with other processes they are the steadier view. There, a
multi-threaded XLA:CPU computation also waits for its slowest thread, which
hurts the large vmapped operations more than the small per-client ones;
``--xla-single-thread`` runs every contender (and the children) on one XLA
thread. The load average is recorded at the start and after the contenders.

    python benchmarks/fed_throughput.py --json /tmp/fed.json
    python benchmarks/fed_throughput.py --quick --json /tmp/fed_quick.json   # seconds
    python benchmarks/fed_throughput.py --xla-single-thread --json /tmp/fed_1t.json
    pip install --target /tmp/flwr "flwr[simulation]==1.42.0"   # contender (c), see pyproject
    python benchmarks/fed_throughput.py --flower-path /tmp/flwr --json /tmp/fed.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..'))
if ROOT not in sys.path:
  sys.path.insert(0, ROOT)

from bench_common import machine_info  # noqa: E402  (benchmarks/bench_common.py)
from bench_common import write_json  # noqa: E402

EXAMPLES_PER_CLIENT = 40
BATCH_SIZE = 10
EPOCHS = 2
LR = 0.05
SEED = 0
MODELS = {'mlp': {'hidden': (100, 100)}, 'cnn1d': {}}
# Per model: the model option and its values, kdjax's default first (see the docstring).
LOWERINGS = {'mlp': ('dense_impl', ('auto', 'xla')), 'cnn1d': ('conv_impl', ('patches', 'xla'))}
SINGLE_THREAD_FLAGS = '--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1'


# ------------------------------------------------------------------------- the problem


def client_indices(num_clients: int, num_examples: int, seed: int = SEED):
  """Per-client example indices: a seeded IID split, or (more clients than the
  split holds) each client draws its own examples, so clients overlap."""
  import numpy as np
  rng = np.random.default_rng(seed)
  if num_clients * EXAMPLES_PER_CLIENT <= num_examples:
    perm = rng.permutation(num_examples)
    return [perm[i * EXAMPLES_PER_CLIENT:(i + 1) * EXAMPLES_PER_CLIENT]
            for i in range(num_clients)]
  return [rng.choice(num_examples, EXAMPLES_PER_CLIENT, replace=False)
          for _ in range(num_clients)]


def build_problem(model: str, num_clients: int, lowering: str | None = None):
  """``(apply, params, model_state, data)``: the model (in ``lowering``, default
  kdjax's, see ``LOWERINGS``) and the packed clients (numpy)."""
  from kdjax import data as kdata
  from kdjax.federated import packing
  from kdjax.models import create
  from kdjax.models import functional
  arrays = kdata.load_arrays('mnist1d', 'train')
  idx = client_indices(num_clients, len(arrays['label']))
  packed = packing.pack(arrays['x'], arrays['label'], idx, multiple=BATCH_SIZE)
  opts = dict(MODELS[model])
  option, values = LOWERINGS[model]
  opts[option] = lowering or values[0]
  apply, params, state = functional(create(model, num_classes=10,
                                           input_shape=arrays['x'].shape[1:], seed=SEED,
                                           **opts))
  return apply, params, state, packed


def make_trainer(apply):
  from kdjax.federated.local import make_local_trainer
  return make_local_trainer(apply, batch_size=BATCH_SIZE, epochs=EPOCHS, lr=LR)


def client_keys(round_index: int, num_clients: int):
  """The training key of every client in a round, as the simulator derives them."""
  import jax
  import jax.numpy as jnp
  from kdjax.federated import simulator as sim
  rkey = sim.round_key(SEED, round_index)
  return jax.vmap(lambda i: sim.client_key(rkey, i))(jnp.arange(num_clients))


# ------------------------------------------------------------------------- runners


class Runner:
  """``run(n)`` does ``n`` FedAvg rounds; ``params()`` is the current global model."""

  name = ''

  def run(self, n: int) -> None:
    raise NotImplementedError

  def params(self):
    raise NotImplementedError


class KdjaxRunner(Runner):
  """The simulator's jitted round over the whole cohort."""

  def __init__(self, apply, params, state, data, num_clients, clients_per_chunk=None,
               sharded=False, rounds_per_call=1):
    import jax
    import jax.numpy as jnp
    from kdjax.federated import simulator as sim
    from kdjax.federated.fedavg import fedavg
    from kdjax.parallel import make_mesh
    alg = fedavg(make_trainer(apply))
    mesh = make_mesh([('clients', -1)]) if sharded else None
    self.round_fn = sim.make_round(alg, num_clients=num_clients, clients_per_round=num_clients,
                                   clients_per_chunk=clients_per_chunk, seed=SEED, mesh=mesh)
    # As `kdjax fed run` does: with a mesh, state and data are copied to every device once.
    self.state = sim.replicate(sim.init_state(alg, params, state, num_clients), mesh)
    self.data = sim.replicate(jax.tree.map(jnp.asarray, data), mesh)
    self.rounds_per_call = rounds_per_call

  def run(self, n):
    import jax
    from kdjax.federated import simulator as sim
    # As `kdjax fed run --config.rounds_per_call=K` does: K rounds per call (lax.scan).
    for _, count in sim.round_segments(0, n, self.rounds_per_call):
      if count == 1:
        self.state, _ = self.round_fn(self.state, self.data)
      else:
        self.state, _ = self.round_fn.rounds(self.state, self.data, count)
    jax.block_until_ready(self.state)

  def params(self):
    return self.state.server.params


class ScanLoopRunner(Runner):
  """(b): Python over clients; each client's local training is one jitted ``lax.scan``."""

  def __init__(self, apply, params, state, data, num_clients):
    import jax
    import jax.numpy as jnp
    trainer = make_trainer(apply)
    self.train = jax.jit(lambda p, s, d, k: trainer.train(p, s, d, k)[:2])
    self.accumulate = jax.jit(
        lambda acc, p, w: jax.tree.map(lambda a, b: a + w * b, acc, p))
    self.finish = jax.jit(lambda acc, tot: jax.tree.map(lambda a: a / tot, acc))
    self.clients = [jax.tree.map(lambda a, i=i: jnp.asarray(a[i]), data)
                    for i in range(num_clients)]
    self.weights = [float(c) for c in data.count]
    self.p, self.s = params, state
    self.num_clients = num_clients
    self.round = 0

  def run(self, n):
    import jax
    for _ in range(n):
      keys = client_keys(self.round, self.num_clients)
      acc = jax.tree.map(lambda a: 0.0 * a, self.p)
      for i, cdata in enumerate(self.clients):
        p, _ = self.train(self.p, self.s, cdata, keys[i])
        acc = self.accumulate(acc, p, self.weights[i])
      self.p = self.finish(acc, sum(self.weights))
      self.round += 1
    jax.block_until_ready(self.p)

  def params(self):
    return self.p


class SequentialRunner(Runner):
  """(a), FedJAX-style: Python over clients and batches, one jitted SGD step per batch."""

  def __init__(self, apply, params, state, data, num_clients):
    import jax
    import numpy as np
    import optax
    from kdjax.federated.local import epoch_orders
    from kdjax.losses import build_objective
    objective = build_objective({'ce': {}})
    op, os_ = objective.init(jax.random.key(0), {})
    tx = optax.sgd(LR)

    def step(p, opt, ms, xb, yb, mb):
      def loss_fn(p):
        out, new_ms = apply(p, ms, xb, train=True)
        loss, _, _ = objective.apply(op, os_, {'student_logits': out.logits, 'labels': yb,
                                               'where': mb, 'step': 0})
        return loss, new_ms
      (_, new_ms), g = jax.value_and_grad(loss_fn, has_aux=True)(p)
      updates, opt = tx.update(g, opt, p)
      return optax.apply_updates(p, updates), opt, new_ms

    self.step = jax.jit(step)
    self.opt_init = jax.jit(tx.init)
    self.orders = jax.jit(jax.vmap(
        lambda k, m: epoch_orders(jax.random.fold_in(k, 0), m, EPOCHS)))
    self.accumulate = jax.jit(
        lambda acc, p, w: jax.tree.map(lambda a, b: a + w * b, acc, p))
    self.finish = jax.jit(lambda acc, tot: jax.tree.map(lambda a: a / tot, acc))
    self.x, self.y, self.mask = (np.asarray(data.x), np.asarray(data.label),
                                 np.asarray(data.mask))
    self.counts = np.asarray(data.count)
    self.p, self.s = params, state
    self.num_clients = num_clients
    self.round = 0

  def run(self, n):
    import jax
    import numpy as np
    for _ in range(n):
      keys = client_keys(self.round, self.num_clients)
      orders = np.asarray(self.orders(keys, self.mask))      # [clients, epochs, E]
      acc = jax.tree.map(lambda a: 0.0 * a, self.p)
      for i in range(self.num_clients):
        p, ms, opt = self.p, self.s, self.opt_init(self.p)
        real = int(self.counts[i])
        for e in range(EPOCHS):
          order = orders[i, e, :real]
          for b in range(0, real, BATCH_SIZE):
            idx = order[b:b + BATCH_SIZE]
            xb, yb = self.x[i, idx], self.y[i, idx]
            mb = np.ones(len(idx), bool)
            if len(idx) < BATCH_SIZE:     # a last short batch, padded and masked
              pad = BATCH_SIZE - len(idx)
              xb = np.concatenate([xb, np.zeros((pad, *xb.shape[1:]), xb.dtype)])
              yb = np.concatenate([yb, np.full(pad, -1, yb.dtype)])
              mb = np.concatenate([mb, np.zeros(pad, bool)])
            p, opt, ms = self.step(p, opt, ms, xb, yb, mb)
        acc = self.accumulate(acc, p, float(real))
      self.p = self.finish(acc, float(self.counts.sum()))
      self.round += 1
    jax.block_until_ready(self.p)

  def params(self):
    return self.p


def max_abs_diff(a, b) -> float:
  import jax
  import numpy as np
  return float(max(np.max(np.abs(np.asarray(x) - np.asarray(y)))
                   for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))


def time_runners(runners: dict[str, Runner], rounds: int,
                 repeats: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
  """Rounds per wall second and CPU seconds per round of each runner.

  ``repeats`` interleaved repeats of ``rounds`` rounds (half as many for the
  slow sequential loop). CPU seconds are this process's user + system time
  (every XLA thread), a view less sensitive to other processes' load.
  """
  samples = {k: [] for k in runners}
  cpu = {k: [] for k in runners}
  for _ in range(repeats):
    for name, r in runners.items():
      n = max(1, rounds if not isinstance(r, SequentialRunner) else max(1, rounds // 2))
      t, c = time.perf_counter(), time.process_time()
      r.run(n)
      cpu[name].append((time.process_time() - c) / n)
      samples[name].append(n / (time.perf_counter() - t))
  return samples, cpu


def _divisor_chunk(clients: int, chunk: int, multiple: int = 1) -> int | None:
  """``chunk`` if it is a proper divisor of ``clients`` (and a multiple of ``multiple``)."""
  if chunk and chunk < clients and clients % chunk == 0 and chunk % multiple == 0:
    return chunk
  return None


def bench_model(model: str, args) -> dict[str, Any]:
  """Every in-process contender for one model; the equivalence check; rates."""
  import jax
  option, impls = LOWERINGS[model]
  impls = list(impls[:1] if args.quick else impls)
  runners: dict[str, Runner] = {}
  t_compile = {}
  for impl in impls:
    apply, params, state, data = build_problem(model, args.clients, impl)
    suffix = '' if impl == impls[0] else '_xla'
    chunk = _divisor_chunk(args.clients, args.clients_per_chunk)
    kinds = [('kdjax', lambda *a: KdjaxRunner(*a, clients_per_chunk=chunk)),
             ('scan_loop', ScanLoopRunner), ('sequential', SequentialRunner)]
    if impl == impls[0]:
      if chunk:   # the same round as one vmap of the whole cohort, for the record
        kinds.append(('kdjax_one_vmap', KdjaxRunner))
      ndev = len(jax.devices())
      schunk = _divisor_chunk(args.clients, args.sharded_clients_per_chunk, multiple=ndev)
      if ndev > 1 and (schunk or args.clients % ndev == 0):
        # The client axis sharded over the devices (CPU: one per core, --cpu-devices).
        kinds.append(('kdjax_sharded',
                      lambda *a: KdjaxRunner(*a, clients_per_chunk=schunk, sharded=True)))
        if schunk:
          kinds.append(('kdjax_sharded_one_vmap', lambda *a: KdjaxRunner(*a, sharded=True)))
        if args.rounds_per_call > 1:   # the same rounds, K per call
          kinds.append(('kdjax_sharded_calls', lambda *a: KdjaxRunner(
              *a, clients_per_chunk=schunk, sharded=True, rounds_per_call=args.rounds_per_call)))
          if schunk:
            kinds.append(('kdjax_sharded_one_vmap_calls', lambda *a: KdjaxRunner(
                *a, sharded=True, rounds_per_call=args.rounds_per_call)))
      elif args.rounds_per_call > 1:
        kinds.append(('kdjax_calls', lambda *a: KdjaxRunner(
            *a, clients_per_chunk=chunk, rounds_per_call=args.rounds_per_call)))
    for name, cls in kinds:
      r = cls(apply, params, state, data, args.clients)
      t = time.perf_counter()
      r.run(1)                             # compile + the first round (checked below)
      t_compile[name + suffix] = time.perf_counter() - t
      runners[name + suffix] = r
  ref = runners['kdjax'].params()
  diffs = {name: max_abs_diff(ref, r.params()) for name, r in runners.items()
           if not name.endswith('_xla')}
  diffs.update({name: max_abs_diff(runners['kdjax_xla'].params(), r.params())
                for name, r in runners.items() if name.endswith('_xla')})
  for r in runners.values():   # one more untimed round each: a round whose input state came
    r.run(1)                   # out of a sharded call may compile again (new input layout);
    if isinstance(r, KdjaxRunner) and r.rounds_per_call > 1:
      r.run(args.rounds)       # and the timed length of K-round calls compiles
  samples, cpu = time_runners(runners, args.rounds, args.repeats)
  rates = {k: statistics.median(v) for k, v in samples.items()}
  return {'rounds_per_sec': rates, 'samples': samples,
          'cpu_seconds_per_round': {k: statistics.median(v) for k, v in cpu.items()},
          'cpu_seconds_per_round_samples': cpu, 'first_round_seconds': t_compile,
          'round1_max_abs_diff_vs_kdjax': diffs, 'lowering_option': option,
          'lowerings': impls,
          'kdjax_clients_per_chunk': chunk or args.clients, 'devices': len(jax.devices())}


# ------------------------------------------------------------------------- Flower (child)

_ACTOR_CACHE: dict[str, Any] = {}


def _flower_problem(model: str, num_clients: int, lowering: str | None):
  """Built once per Ray actor process (Flower clients are ephemeral)."""
  key = (model, num_clients, lowering)
  if key not in _ACTOR_CACHE:
    import jax
    import jax.numpy as jnp
    apply, params, state, data = build_problem(model, num_clients, lowering)
    trainer = make_trainer(apply)
    leaves, treedef = jax.tree.flatten(params)
    train = jax.jit(lambda p, s, d, k: trainer.train(p, s, d, k).params)
    _ACTOR_CACHE[key] = (treedef, state, data, train, jnp)
  return _ACTOR_CACHE[key]


def flower_client_fn(context, model: str, num_clients: int, lowering: str | None = None):
  """A Flower ``NumPyClient`` for the node's partition (client) id."""
  import flwr
  import jax
  import numpy as np
  cid = int(context.node_config['partition-id'])

  class Client(flwr.client.NumPyClient):

    def fit(self, parameters, config):
      treedef, state, data, train, jnp = _flower_problem(model, num_clients, lowering)
      params = jax.tree.unflatten(treedef, [jnp.asarray(p) for p in parameters])
      row = jax.tree.map(lambda a: jnp.asarray(a[cid]), data)
      key = client_keys(int(config['round']) - 1, num_clients)[cid]
      new = train(params, state, row, key)
      return [np.asarray(p) for p in jax.tree.leaves(new)], int(data.count[cid]), {}

  return Client().to_client()


def flower_child(model: str, num_clients: int, rounds: int,
                 lowering: str | None = None) -> dict[str, Any]:
  """Runs Flower's simulation; returns rounds/s and the first round's model."""
  import flwr
  import jax
  import numpy as np
  from flwr.common import ndarrays_to_parameters, parameters_to_ndarrays
  from flwr.server.strategy import FedAvg
  import fed_throughput as me        # importable by the Ray workers (PYTHONPATH)

  _, params, _, _ = build_problem(model, num_clients, lowering)
  times, first = [], {}

  class Timed(FedAvg):

    def aggregate_fit(self, server_round, results, failures):
      out = super().aggregate_fit(server_round, results, failures)
      times.append(time.perf_counter())
      if server_round == 1:
        first['params'] = parameters_to_ndarrays(out[0])
      if failures:
        first.setdefault('failures', len(failures))
      return out

  strategy = Timed(fraction_fit=1.0, fraction_evaluate=0.0, min_fit_clients=num_clients,
                   min_evaluate_clients=0, min_available_clients=num_clients,
                   initial_parameters=ndarrays_to_parameters(
                       [np.asarray(p) for p in jax.tree.leaves(params)]),
                   on_fit_config_fn=lambda r: {'round': r})

  def client_fn(context):
    return me.flower_client_fn(context, model, num_clients, lowering)

  cpus = len(os.sched_getaffinity(0)) if hasattr(os, 'sched_getaffinity') else os.cpu_count()
  t0 = time.perf_counter()
  flwr.simulation.start_simulation(
      client_fn=client_fn, num_clients=num_clients,
      config=flwr.server.ServerConfig(num_rounds=rounds), strategy=strategy,
      client_resources={'num_cpus': 1, 'num_gpus': 0.0},
      ray_init_args={'num_cpus': cpus, 'include_dashboard': False,
                     'ignore_reinit_error': True, 'log_to_driver': False})
  total = time.perf_counter() - t0
  timed = len(times) - 1
  rate = timed / (times[-1] - times[0]) if timed > 0 else None
  return {'rounds_per_sec': rate, 'rounds': len(times), 'total_seconds': total,
          'first_round_seconds': times[0] - t0 if times else None,
          'failures': first.get('failures', 0),
          'round1_params': [p.tolist() for p in first.get('params', [])],
          'actors': cpus, 'flwr': flwr.__version__, 'lowering': lowering}


def run_flower(model: str, args, lowering: str | None = None) -> dict[str, Any] | None:
  env = dict(os.environ, FLWR_TELEMETRY_ENABLED='0', RAY_DEDUP_LOGS='0',
             JAX_PLATFORMS=os.environ.get('JAX_PLATFORMS', 'cpu'))
  env.pop('JAX_NUM_CPU_DEVICES', None)   # one device per Flower actor, as for (b)
  path = [ROOT, os.path.join(ROOT, 'benchmarks')]
  if args.flower_path:
    path.insert(0, os.path.abspath(args.flower_path))
  env['PYTHONPATH'] = os.pathsep.join(path + [env.get('PYTHONPATH', '')])
  cmd = [sys.executable, os.path.abspath(__file__), '--_flower-child', model,
         '--clients', str(args.clients), '--flower-rounds', str(args.flower_rounds)]
  if lowering:
    cmd += ['--_flower-lowering', lowering]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT,
                        timeout=args.flower_timeout)
  last = [l for l in proc.stdout.splitlines() if l.startswith('{')]
  if proc.returncode != 0 or not last:
    tail = proc.stderr[-1500:]
    if 'No module named' in tail and 'flwr' in tail:
      return None
    raise RuntimeError(f'the Flower child failed:\n{tail}')
  return json.loads(last[-1])


# ------------------------------------------------------------------------- 1000 clients (child)


def _rss_bytes() -> int:
  """This process's peak resident set size so far (``ru_maxrss``)."""
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def _rss_now_bytes() -> int:
  with open('/proc/self/statm') as f:
    return int(f.read().split()[1]) * os.sysconf('SC_PAGE_SIZE')


def many_clients_child(model: str, num_clients: int, rounds: int,
                       chunk: int) -> dict[str, Any]:
  """One cohort of ``num_clients``: chunked (``lax.map`` over vmapped chunks) first, then
  as one vmap, so that the second peak RSS covers the larger of the two."""
  import jax
  apply, params, state, data = build_problem(model, num_clients)
  out = {'model': model, 'clients': num_clients, 'cohort': num_clients,
         'client_data_bytes': int(sum(a.nbytes for a in data)), 'backend': jax.default_backend(),
         'rss_bytes_after_setup': _rss_now_bytes(), 'peak_rss_bytes_after_setup': _rss_bytes()}
  variants = [('chunked', chunk), ('one_vmap', None)] if chunk and chunk < num_clients else [
      ('one_vmap', None)]
  for name, c in variants:
    r = KdjaxRunner(apply, params, state, data, num_clients, clients_per_chunk=c)
    mem = r.round_fn.lower(r.state, r.data).compile().memory_analysis()
    memory = None
    if mem is not None:
      memory = {k: int(getattr(mem, k)) for k in
                ('argument_size_in_bytes', 'output_size_in_bytes', 'temp_size_in_bytes')
                if hasattr(mem, k)}
    t = time.perf_counter()
    r.run(1)
    first = time.perf_counter() - t
    t, cpu = time.perf_counter(), time.process_time()
    r.run(rounds)
    out[name] = {'clients_per_chunk': c or num_clients,
                 'rounds_per_sec': rounds / (time.perf_counter() - t),
                 'cpu_seconds_per_round': (time.process_time() - cpu) / rounds,
                 'first_round_seconds': first, 'xla_memory_analysis': memory,
                 'rss_bytes_after': _rss_now_bytes(), 'peak_rss_bytes': _rss_bytes()}
  best = max((out[n] for n, _ in variants), key=lambda v: v['rounds_per_sec'])
  out['rounds_per_sec'] = best['rounds_per_sec']
  out['peak_rss_bytes'] = _rss_bytes()
  return out


def run_many_clients(model: str, args) -> dict[str, Any]:
  env = dict(os.environ, PYTHONPATH=os.pathsep.join([ROOT, os.environ.get('PYTHONPATH', '')]))
  env.pop('JAX_NUM_CPU_DEVICES', None)
  cmd = [sys.executable, os.path.abspath(__file__), '--_many-child', model,
         '--many-clients', str(args.many_clients), '--rounds', str(args.rounds),
         '--many-chunk', str(args.many_chunk)]
  proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=600)
  if proc.returncode != 0:
    raise RuntimeError(f'the {args.many_clients}-client child failed:\n{proc.stderr[-1500:]}')
  return json.loads([l for l in proc.stdout.splitlines() if l.startswith('{')][-1])


# ------------------------------------------------------------------------- report


def versions(flower: str | None) -> dict:
  import importlib.metadata as md
  out = {}
  for pkg in ('jax', 'jaxlib', 'flax', 'optax', 'numpy'):
    try:
      out[pkg] = md.version(pkg)
    except md.PackageNotFoundError:
      out[pkg] = None
  out['flwr'] = flower
  return out


def parse_args(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split('\n\n')[0],
                              formatter_class=argparse.RawDescriptionHelpFormatter)
  p.add_argument('--json', help='write every figure to this JSON file')
  p.add_argument('--quick', action='store_true', help='a seconds-long smoke run')
  p.add_argument('--clients', type=int, default=None, help='clients per round (default 100)')
  p.add_argument('--rounds', type=int, default=None, help='rounds per timed repeat')
  p.add_argument('--repeats', type=int, default=None, help='interleaved repeats (median kept)')
  p.add_argument('--models', default='mlp,cnn1d', help='comma list of mlp, cnn1d')
  p.add_argument('--no-flower', action='store_true', help='skip contender (c)')
  p.add_argument('--flower-path', default=os.environ.get('KDJAX_FLOWER_PATH'),
                 help='a pip --target directory holding flwr[simulation], prepended to the '
                      "Flower child's path (default: $KDJAX_FLOWER_PATH; else the venv)")
  p.add_argument('--flower-rounds', type=int, default=None)
  p.add_argument('--flower-timeout', type=int, default=900)
  p.add_argument('--clients-per-chunk', type=int, default=25,
                 help="kdjax's clients_per_chunk for the cohort (lax.map over vmapped chunks; "
                      'on CPU chunks of about 25 clients keep their parameters in cache and '
                      'beat one vmap of 100); 0 or a non-divisor: one vmap. One vmap of the '
                      'whole cohort is timed beside it either way (kdjax_one_vmap)')
  p.add_argument('--cpu-devices', type=int, default=len(os.sched_getaffinity(0))
                 if hasattr(os, 'sched_getaffinity') else os.cpu_count(),
                 help='CPU devices (JAX_NUM_CPU_DEVICES) of the in-process contenders; with '
                      'more than one, kdjax is also timed with the client axis sharded over '
                      'them (kdjax_sharded; one device per core); default: the usable cores')
  p.add_argument('--rounds-per-call', type=int, default=None,
                 help='kdjax is also timed running this many rounds per jitted call (a '
                      'lax.scan; `kdjax fed run` --config.rounds_per_call) in the layouts '
                      "named '..._calls' (default: --rounds, so a timed repeat is one call; "
                      '1: not timed)')
  p.add_argument('--sharded-clients-per-chunk', type=int, default=50,
                 help="kdjax_sharded's clients_per_chunk (a multiple of the device count)")
  p.add_argument('--many-clients', type=int, default=None,
                 help='the one-cohort scale test (default 1000; 0 skips it)')
  p.add_argument('--many-models', default=None,
                 help='models of the scale test (default: --models; mlp with --quick)')
  p.add_argument('--many-chunk', type=int, default=100,
                 help='clients per vmapped chunk in the scale test, timed beside one vmap '
                      'of the whole cohort (0: one vmap only)')
  p.add_argument('--xla-single-thread', action='store_true',
                 help='run XLA:CPU on one thread (XLA_FLAGS, for every contender and child); '
                      'on a machine shared with other processes a multi-threaded step waits '
                      'for its slowest thread')
  p.add_argument('--_flower-child', dest='flower_child', default=None, help=argparse.SUPPRESS)
  p.add_argument('--_flower-lowering', dest='flower_lowering', default=None,
                 help=argparse.SUPPRESS)
  p.add_argument('--_many-child', dest='many_child', default=None, help=argparse.SUPPRESS)
  args = p.parse_args(argv)
  q = args.quick
  args.clients = args.clients or (10 if q else 100)
  args.rounds = args.rounds or (2 if q else 6)
  args.repeats = args.repeats or (2 if q else 5)
  args.rounds_per_call = args.rounds_per_call or args.rounds
  args.flower_rounds = args.flower_rounds or (3 if q else 4)
  if args.many_clients is None:
    args.many_clients = 50 if q else 1000
  if args.many_models is None:
    args.many_models = 'mlp' if q else args.models
  return args


def main(argv=None) -> dict | None:
  args = parse_args(argv)
  if args.xla_single_thread:    # before jax is imported (every import of it here is lazy)
    flags = os.environ.get('XLA_FLAGS', '')
    os.environ['XLA_FLAGS'] = (flags + ' ' + SINGLE_THREAD_FLAGS).strip()
  if args.flower_child:
    print(json.dumps(flower_child(args.flower_child, args.clients, args.flower_rounds,
                                  args.flower_lowering)))
    return None
  if args.many_child:
    print(json.dumps(many_clients_child(args.many_child, args.many_clients, args.rounds,
                                        args.many_chunk)))
    return None
  if args.cpu_devices and args.cpu_devices > 1:   # before jax is imported
    os.environ.setdefault('JAX_NUM_CPU_DEVICES', str(args.cpu_devices))
  import numpy as np
  out: dict[str, Any] = {
      'command': ' '.join(['benchmarks/fed_throughput.py', *(argv if argv is not None
                                                             else sys.argv[1:])]),
      'date': datetime.datetime.now(datetime.timezone.utc).isoformat(timespec='seconds'),
      'machine': machine_info(),
      'load_average_at_start': list(os.getloadavg()),
      'settings': {'clients': args.clients, 'examples_per_client': EXAMPLES_PER_CLIENT,
                   'batch_size': BATCH_SIZE, 'local_epochs': EPOCHS, 'lr': LR,
                   'rounds_per_repeat': args.rounds, 'repeats': args.repeats,
                   'rounds_per_call': args.rounds_per_call,
                   'flower_rounds': args.flower_rounds, 'quick': args.quick,
                   'xla_flags': os.environ.get('XLA_FLAGS', '')},
  }
  flower_version = None
  for model in [m for m in args.models.split(',') if m]:
    sfx = '' if model == 'mlp' else '_cnn'
    print(f'[{model}] in-process contenders ...', flush=True)
    res = bench_model(model, args)
    rates = res['rounds_per_sec']
    worst = max(res['round1_max_abs_diff_vs_kdjax'].values())
    if worst > 1e-4:
      raise AssertionError(f'{model}: contenders disagree after one round ({worst:g})')
    # Every contender is credited with its faster lowering (kdjax: and its faster layout).
    best_of = lambda names: max((k for k in names if k in rates), key=rates.get)
    seq_best = best_of(('sequential', 'sequential_xla'))
    scan_best = best_of(('scan_loop', 'scan_loop_xla'))
    scan_ref = rates[scan_best]
    lowering_of = lambda name: res['lowerings'][1 if name.endswith('_xla') else 0]
    fl = None
    if not args.no_flower:
      print(f'[{model}] Flower simulation (child process) ...', flush=True)
      fl = run_flower(model, args, lowering_of(scan_best))
    if fl is not None:
      flower_version = fl.pop('flwr')
      p1 = fl.pop('round1_params')
      ref_leaves = [np.asarray(a) for a in __import__('jax').tree.leaves(
          _round1_reference(model, args))]
      fl['round1_max_abs_diff_vs_kdjax'] = float(max(
          np.max(np.abs(np.asarray(a) - b)) for a, b in zip(p1, ref_leaves)))
      res['flower'] = fl
    out[model] = res
    # kdjax's figure: its fastest layout (one device or the client axis sharded over the
    # devices; chunked or one vmap) and lowering.
    best = best_of(('kdjax', 'kdjax_one_vmap', 'kdjax_sharded', 'kdjax_sharded_one_vmap',
                    'kdjax_xla', 'kdjax_calls', 'kdjax_sharded_calls',
                    'kdjax_sharded_one_vmap_calls'))
    single = best_of(('kdjax', 'kdjax_one_vmap', 'kdjax_xla', 'kdjax_calls'))
    per_round = best_of(('kdjax', 'kdjax_one_vmap', 'kdjax_sharded', 'kdjax_sharded_one_vmap',
                         'kdjax_xla'))
    res['kdjax_variant'] = best
    res['contender_variants'] = {'kdjax': best, 'sequential': seq_best, 'scan_loop': scan_best}
    out[f'kdjax{sfx}_variant'] = best
    out[f'kdjax{sfx}_rounds_per_sec'] = rates[best]
    out[f'kdjax{sfx}_single_device_rounds_per_sec'] = rates[single]
    out[f'kdjax{sfx}_one_round_per_call_rounds_per_sec'] = rates[per_round]
    out[f'sequential{sfx}_rounds_per_sec'] = rates[seq_best]
    out[f'sequential{sfx}_lowering'] = lowering_of(seq_best)
    out[f'scan_loop{sfx}_rounds_per_sec'] = scan_ref
    out[f'scan_loop{sfx}_lowering'] = lowering_of(scan_best)
    out[f'kdjax{sfx}_lowering'] = lowering_of(best)
    out[f'ratio_vs_sequential{sfx}'] = rates[best] / rates[seq_best]
    out[f'ratio_vs_scan_loop{sfx}'] = rates[best] / scan_ref
    out[f'ratio_vs_scan_loop{sfx}_single_device'] = rates[single] / scan_ref
    if fl is not None and fl.get('rounds_per_sec'):
      out[f'flower{sfx}_rounds_per_sec'] = fl['rounds_per_sec']
      out[f'ratio_vs_flower{sfx}'] = rates[best] / fl['rounds_per_sec']
      out[f'ratio_vs_flower{sfx}_single_device'] = rates[single] / fl['rounds_per_sec']
      out[f'ratio_vs_flower{sfx}_one_round_per_call'] = rates[per_round] / fl['rounds_per_sec']
    else:
      out[f'flower{sfx}_rounds_per_sec'] = None
      out[f'ratio_vs_flower{sfx}'] = None
  out['versions'] = versions(flower_version)
  out['load_average_after_contenders'] = list(os.getloadavg())
  if args.many_clients:
    out['many_clients'] = {}
    for model in [m for m in args.many_models.split(',') if m]:
      print(f'[{model}] {args.many_clients} clients in one cohort (child process) ...', flush=True)
      out['many_clients'][model] = run_many_clients(model, args)
  _print(out)
  write_json(args.json, out)
  return out


def _round1_reference(model: str, args):
  """kdjax's global model after round 1 (the reference the Flower child is checked against)."""
  apply, params, state, data = build_problem(model, args.clients)
  r = KdjaxRunner(apply, params, state, data, args.clients)
  r.run(1)
  return r.params()


def _print(out: dict) -> None:
  print(f"\nFedAvg, {out['settings']['clients']} clients x {EXAMPLES_PER_CLIENT} examples, "
        f'batch {BATCH_SIZE}, {EPOCHS} local epochs (rounds/s, median):')
  for model, sfx in (('mlp', ''), ('cnn1d', '_cnn')):
    if model not in out:
      continue
    fl = out.get(f'flower{sfx}_rounds_per_sec')
    print(f"  {model:6s} kdjax {out[f'kdjax{sfx}_rounds_per_sec']:8.2f} | "
          f"(a) sequential {out[f'sequential{sfx}_rounds_per_sec']:7.2f} "
          f"x{out[f'ratio_vs_sequential{sfx}']:.2f} | "
          f"(b) scan loop {out[f'scan_loop{sfx}_rounds_per_sec']:7.2f} "
          f"x{out[f'ratio_vs_scan_loop{sfx}']:.2f} | "
          + (f"(c) flower {fl:7.3f} x{out[f'ratio_vs_flower{sfx}']:.1f}" if fl
             else '(c) flower n/a'))
    c = out[model]['cpu_seconds_per_round']
    v = out[model]['contender_variants']
    print(f"         CPU s/round: kdjax {c[v['kdjax']]:.3f} | (a) {c[v['sequential']]:.3f} | "
          f"(b) {c[v['scan_loop']]:.3f}")
    opt, lows = out[model]['lowering_option'], out[model]['lowerings']
    print(f"         {opt}: kdjax {out[f'kdjax{sfx}_lowering']}, (a) "
          f"{out[f'sequential{sfx}_lowering']}, (b) and Flower {out[f'scan_loop{sfx}_lowering']}"
          f" (the faster of {', '.join(lows)} for each)")
    r = out[model]['rounds_per_sec']
    layouts = [f"one device, chunks of {out[model]['kdjax_clients_per_chunk']} {r['kdjax']:.2f}"]
    if 'kdjax_one_vmap' in r:
      layouts.append(f"one device, one vmap {r['kdjax_one_vmap']:.2f}")
    if 'kdjax_sharded' in r:
      layouts.append(f"sharded over {out[model]['devices']} devices {r['kdjax_sharded']:.2f}")
    if 'kdjax_sharded_one_vmap' in r:
      layouts.append(f"sharded, one vmap per device {r['kdjax_sharded_one_vmap']:.2f}")
    k = out['settings']['rounds_per_call']
    for name, what in (('kdjax_calls', 'one device, chunks'), ('kdjax_sharded_calls', 'sharded'),
                       ('kdjax_sharded_one_vmap_calls', 'sharded, one vmap per device')):
      if name in r:
        layouts.append(f"{what}, {k} rounds per call {r[name]:.2f}")
    print(f"         kdjax layouts (rounds/s): {'; '.join(layouts)} "
          f"(shown above: {out[model]['kdjax_variant']})")
    r = out[model]['rounds_per_sec']
    if 'kdjax_xla' in r:
      alt = out[model]['lowerings'][1]
      print(f"         with {out[model]['lowering_option']}={alt!r}: kdjax {r['kdjax_xla']:.2f} "
            f"(one device), (a) {r['sequential_xla']:.2f}, (b) {r['scan_loop_xla']:.2f}; "
            f"with {out[model]['lowerings'][0]!r}: (a) {r['sequential']:.2f}, "
            f"(b) {r['scan_loop']:.2f}")
  for model, m in out.get('many_clients', {}).items():
    for name in ('chunked', 'one_vmap'):
      if name not in m:
        continue
      v = m[name]
      mem = v['xla_memory_analysis'] or {}
      print(f"  {m['clients']} clients in one cohort, {model}, {name} "
            f"({v['clients_per_chunk']} per vmap): {v['rounds_per_sec']:.2f} rounds/s, "
            f"peak RSS {v['peak_rss_bytes'] / 2**20:.0f} MiB "
            f"(after setup {m['rss_bytes_after_setup'] / 2**20:.0f} MiB), "
            f"XLA temp {mem.get('temp_size_in_bytes', 0) / 2**20:.0f} MiB")

if __name__ == '__main__':
  main()
