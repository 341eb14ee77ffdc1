"""The vmap simulator against a plain per-client Python loop (same seeds)."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax.errors import UserError
from kdjax.federated import packing
from kdjax.federated import partition
from kdjax.federated import simulator as sim
from kdjax.federated.ditto import ditto
from kdjax.federated.fedavg import fedavg
from kdjax.federated.fednova import fednova
from kdjax.federated.fedprox import fedprox
from kdjax.federated.local import epoch_orders
from kdjax.federated.local import make_local_trainer
from kdjax.federated.scaffold import scaffold
from kdjax.models import create
from kdjax.models import functional

NUM_CLIENTS, COHORT, B, EPOCHS, LR = 6, 4, 4, 2, 0.3


def _problem(seed=0, n=60, num_classes=3, dim=5):
  rng = np.random.default_rng(seed)
  labels = rng.integers(0, num_classes, n)
  centers = rng.normal(0, 1.5, (num_classes, dim))
  x = (centers[labels] + rng.normal(0, 1, (n, dim))).astype(np.float32)
  return x, labels.astype(np.int32)


def _model(num_classes=3, dim=5):
  return functional(create('mlp', num_classes=num_classes, input_shape=(dim,), hidden=(7,),
                           seed=1))


def _ce(apply, params, x, y):
  out, _ = apply(params, {}, x, train=True)
  logp = jax.nn.log_softmax(out.logits)
  return -jnp.mean(logp[jnp.arange(len(y)), y])


def _sq(t):
  return sum(jnp.sum(jnp.square(a)) for a in jax.tree.leaves(t))


@functools.partial(jax.jit, static_argnums=0)
def _ref_grad(apply, q, x, y, global_params, mu):
  def loss(q):
    return _ce(apply, q, x, y) + 0.5 * mu * _sq(jax.tree.map(jnp.subtract, q, global_params))
  return jax.grad(loss)(q)


def _reference_local(apply, params, x, y, mask, key, *, mu=0.0, correction=None, center=None):
  """Plain loop: shuffle the real examples, cut into batches of B, one SGD step each.

  The loss is CE + (mu/2)·‖p − center‖² (center: the starting params by default).
  """
  orders = np.asarray(epoch_orders(jax.random.fold_in(key, 0), jnp.asarray(mask), EPOCHS))
  global_params = params if center is None else center
  p = params
  steps = 0
  for e in range(EPOCHS):
    real = [int(i) for i in orders[e] if mask[i]]
    for s in range(0, len(real), B):
      idx = np.array(real[s:s + B])
      g = _ref_grad(apply, p, x[idx], y[idx], global_params, mu)
      if correction is not None:
        g = jax.tree.map(jnp.add, g, correction)
      p = jax.tree.map(lambda a, b: a - LR * b, p, g)
      steps += 1
  return p, steps


def _weighted_mean(trees, weights):
  tot = float(sum(weights))
  return jax.tree.map(lambda *ls: sum(w * l for w, l in zip(weights, ls)) / tot, *trees)


def _setup(dropout=0.0, chunk=None, algorithm='fedavg', seed=3):
  x, y = _problem()
  part = partition.dirichlet(y, NUM_CLIENTS, 0.5, min_size=4, seed=0, test_fraction=0.0)
  data = packing.pack(x, y, part.train, multiple=B)
  sizes = data.count
  assert len(set(sizes.tolist())) > 1  # unequal clients: masked steps are exercised
  assert any(s % B for s in sizes)     # and partial last batches
  apply, params, state = _model()
  trainer = make_local_trainer(apply, batch_size=B, epochs=EPOCHS, lr=LR)
  alg = {'fedavg': lambda: fedavg(trainer),
         'fedprox': lambda: fedprox(trainer, mu=0.5),
         'scaffold': lambda: scaffold(trainer),
         'fednova': lambda: fednova(trainer),
         'ditto': lambda: ditto(trainer, lam=0.7)}[algorithm]()
  round_fn = sim.make_round(alg, num_clients=NUM_CLIENTS, clients_per_round=COHORT,
                            dropout=dropout, clients_per_chunk=chunk, seed=seed)
  st = sim.init_state(alg, params, state, NUM_CLIENTS)
  return apply, params, data, round_fn, st


@pytest.mark.parametrize('algorithm,chunk,dropout', [
    ('fedavg', None, 0.0),
    ('fedavg', 2, 0.4),
    ('fedprox', 2, 0.0),
    ('scaffold', None, 0.0),
    ('scaffold', 2, 0.3),
    ('fednova', 2, 0.0),
    ('ditto', None, 0.3),
])
def test_vmap_round_equals_sequential_reference(algorithm, chunk, dropout):
  apply, params, data, round_fn, st = _setup(dropout, chunk, algorithm)
  jdata = jax.tree.map(jnp.asarray, data)
  w = params
  c_server = jax.tree.map(jnp.zeros_like, params)
  c_client = [c_server] * NUM_CLIENTS
  personal = [params] * NUM_CLIENTS
  saw_dropout = False
  for r in range(3):
    st, info = round_fn(st, jdata)
    rkey = sim.round_key(3, r)
    cohort = np.asarray(info['cohort'])
    reported = np.asarray(info['reported'])
    np.testing.assert_array_equal(
        cohort, np.asarray(sim.sample_cohort(rkey, jdata.count, COHORT)))
    assert len(set(cohort.tolist())) == COHORT
    saw_dropout |= not reported.all()
    deltas, dcs, weights, work = [], [], [], []
    for cid, rep in zip(cohort, reported):
      if not rep:
        continue
      n = int(data.count[cid])
      x, y = data.x[cid, :n], data.label[cid, :n]
      mask = data.mask[cid]
      key = sim.client_key(rkey, int(cid))
      corr = None
      if algorithm == 'scaffold':
        corr = jax.tree.map(jnp.subtract, c_server, c_client[cid])
      xp, yp = np.pad(x, ((0, len(mask) - n), (0, 0))), np.pad(y, (0, len(mask) - n))
      if algorithm == 'ditto':
        v, _ = _reference_local(apply, personal[cid], xp, yp, mask, jax.random.fold_in(key, 1),
                                mu=0.7, center=w)
        personal[cid] = v
        key = jax.random.fold_in(key, 0)
      p, k = _reference_local(
          apply, w, xp, yp, mask, key, mu=0.5 if algorithm == 'fedprox' else 0.0,
          correction=corr)
      delta = jax.tree.map(jnp.subtract, p, w)
      if algorithm == 'fednova':
        delta = jax.tree.map(lambda d: d / k, delta)
        work.append(k)
      deltas.append(delta)
      weights.append(n)
      if algorithm == 'scaffold':
        c_new = jax.tree.map(lambda ci, c, a, b: ci - c + (a - b) / (k * LR),
                             c_client[cid], c_server, w, p)
        dcs.append(jax.tree.map(jnp.subtract, c_new, c_client[cid]))
        c_client[cid] = c_new
    if weights:
      mean = _weighted_mean(deltas, weights)
      if algorithm == 'fednova':
        tau_eff = sum(p_ * a for p_, a in zip(weights, work)) / sum(weights)
        mean = jax.tree.map(lambda d: tau_eff * d, mean)
      w = jax.tree.map(jnp.add, w, mean)
      if algorithm == 'scaffold':
        frac = len(weights) / NUM_CLIENTS
        c_server = jax.tree.map(lambda c, d: c + frac * d, c_server,
                                _weighted_mean(dcs, weights))
    for a, b in zip(jax.tree.leaves(st.server.params), jax.tree.leaves(w)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    if algorithm == 'scaffold':
      for a, b in zip(jax.tree.leaves(st.server.extra['c']), jax.tree.leaves(c_server)):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
      for cid in range(NUM_CLIENTS):
        got = jax.tree.map(lambda a: a[cid], st.clients['c'])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(c_client[cid])):
          np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    if algorithm == 'ditto':
      for cid in range(NUM_CLIENTS):
        got = jax.tree.map(lambda a: a[cid], st.clients['params'])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(personal[cid])):
          np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  if dropout:
    assert saw_dropout
  # The model moved: the comparison is not between two untouched copies.
  assert max(float(jnp.max(jnp.abs(a - b))) for a, b in
             zip(jax.tree.leaves(st.server.params), jax.tree.leaves(params))) > 1e-2


@pytest.mark.parametrize('algorithm,chunk,dropout', [
    ('fedavg', None, 0.0),
    ('scaffold', 2, 0.3),
    ('ditto', None, 0.3),
])
def test_rounds_in_one_call_equal_round_by_round(algorithm, chunk, dropout):
  """``round_fn.rounds(state, data, n)`` (one lax.scan) is ``n`` calls of ``round_fn``:
  same states (server and clients), same per-round infos."""
  _, params, data, round_fn, st0 = _setup(dropout, chunk, algorithm)
  jdata = jax.tree.map(jnp.asarray, data)
  st, infos = st0, []
  for _ in range(4):
    st, info = round_fn(st, jdata)
    infos.append(info)
  st_many, stacked = round_fn.rounds(st0, jdata, 4)
  assert int(st_many.round) == int(st.round) == 4
  for a, b in zip(jax.tree.leaves((st.server, st.clients)),
                  jax.tree.leaves((st_many.server, st_many.clients))):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-6)
  for r, info in enumerate(infos):
    for a, b in zip(jax.tree.leaves(info), jax.tree.leaves(stacked)):
      np.testing.assert_allclose(a, np.asarray(b)[r], atol=1e-6, rtol=1e-6)
  # run_rounds splits the stacked infos per round; one round is a plain call.
  st_run, split = sim.run_rounds(round_fn, st0, jdata, 4)
  assert len(split) == 4
  np.testing.assert_array_equal(split[2]['cohort'], infos[2]['cohort'])
  st_one, [one] = sim.run_rounds(round_fn, st0, jdata, 1)
  np.testing.assert_array_equal(one['cohort'], infos[0]['cohort'])
  # The rounds differ from each other: equal infos would not show their order.
  assert not np.array_equal(infos[0]['cohort'], infos[1]['cohort'])


@pytest.mark.parametrize('start,stop,per_call,every', [
    (0, 50, 10, (25, 0)), (3, 25, 10, (10,)), (0, 7, 1, (3,)), (5, 41, 7, (6, 10)),
    (0, 0, 4, (3,)), (9, 10, 100, (1,)),
])
def test_round_segments_cover_the_range_without_crossing_boundaries(start, stop, per_call,
                                                                    every):
  segs = sim.round_segments(start, stop, per_call, *every)
  rounds = [r for first, n in segs for r in range(first, first + n)]
  assert rounds == list(range(start, stop))
  for first, n in segs:
    assert 1 <= n <= per_call
    for e in every:
      if e:   # no multiple of e strictly inside a segment: it only ends there
        assert all((r + 1) % e for r in range(first, first + n - 1))
  # Greedy: a segment is cut short only at a boundary or the end.
  for first, n in segs[:-1]:
    end = first + n
    assert n == per_call or any(e and end % e == 0 for e in every)


def test_fedavg_one_full_batch_step_equals_centralized_gd():
  x, y = _problem(n=48)
  part = partition.iid(y, 4, seed=0, test_fraction=0.0)
  data = packing.pack(x, y, part.train, multiple=12)
  assert data.count.tolist() == [12, 12, 12, 12]
  apply, params, state = _model()
  trainer = make_local_trainer(apply, batch_size=12, epochs=1, lr=LR)
  alg = fedavg(trainer)
  round_fn = sim.make_round(alg, num_clients=4, clients_per_round=4)
  st = sim.init_state(alg, params, state, 4)
  jdata = jax.tree.map(jnp.asarray, data)
  xs = np.concatenate([data.x[k] for k in range(4)])
  ys = np.concatenate([data.label[k] for k in range(4)])
  w = params
  for _ in range(5):
    st, _ = round_fn(st, jdata)
    g = jax.grad(lambda q: _ce(apply, q, xs, ys))(w)
    w = jax.tree.map(lambda a, b: a - LR * b, w, g)
  for a, b in zip(jax.tree.leaves(st.server.params), jax.tree.leaves(w)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_server_momentum_differs_from_fedavg_and_matches_formula():
  """FedAvgM: v ← βv + (−Δ); w ← w − lr·v, checked against two FedAvg deltas."""
  apply, params, data, _, _ = _setup()
  jdata = jax.tree.map(jnp.asarray, data)
  trainer = make_local_trainer(apply, batch_size=B, epochs=EPOCHS, lr=LR)
  plain = fedavg(trainer)
  mom = fedavg(trainer, server_tx=optax.sgd(1.0, momentum=0.5))
  rp = sim.make_round(plain, num_clients=NUM_CLIENTS, clients_per_round=COHORT, seed=3)
  rm = sim.make_round(mom, num_clients=NUM_CLIENTS, clients_per_round=COHORT, seed=3)
  state = _model()[2]
  sm = sim.init_state(mom, params, state, NUM_CLIENTS)
  v = None
  w = params
  for _ in range(2):
    sp = sim.init_state(plain, w, state, NUM_CLIENTS)._replace(round=sm.round)
    sp, _ = rp(sp, jdata)
    delta = jax.tree.map(jnp.subtract, sp.server.params, w)
    v = jax.tree.map(jnp.negative, delta) if v is None else jax.tree.map(
        lambda a, d: 0.5 * a - d, v, delta)
    w = jax.tree.map(jnp.subtract, w, v)
    sm, _ = rm(sm, jdata)
    for a, b in zip(jax.tree.leaves(sm.server.params), jax.tree.leaves(w)):
      np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)


def test_round_errors():
  apply, params, _ = _model()
  alg = fedavg(make_local_trainer(apply, batch_size=2))
  with pytest.raises(UserError, match='clients_per_round'):
    sim.make_round(alg, num_clients=3, clients_per_round=4)
  with pytest.raises(UserError, match='clients_per_chunk'):
    sim.make_round(alg, num_clients=8, clients_per_round=4, clients_per_chunk=3)
  with pytest.raises(UserError, match='dropout'):
    sim.make_round(alg, num_clients=8, clients_per_round=4, dropout=1.0)


def test_personalized_summary_worst10():
  s = sim.personalized_summary(np.arange(20.0), np.full(20, 20.0))
  assert s['personalized_accuracy_mean'] == pytest.approx(np.mean(np.arange(20) / 20))
  assert s['personalized_accuracy_worst10'] == pytest.approx((0 + 1 / 20) / 2)


def test_feddf_equals_fedavg_then_reference_ensemble_distillation():
  from kdjax.federated.feddf import feddf
  apply, params, data, _, _ = _setup()
  state = _model()[2]
  jdata = jax.tree.map(jnp.asarray, data)
  proxy = np.random.default_rng(5).normal(size=(16, 5)).astype(np.float32)
  trainer = make_local_trainer(apply, batch_size=B, epochs=EPOCHS, lr=LR)
  steps, batch, lr, seed = 4, 8, 0.01, 11
  alg = feddf(trainer, proxy, server_steps=steps, server_batch_size=batch, server_lr=lr,
              seed=seed)
  round_fn = sim.make_round(alg, num_clients=NUM_CLIENTS, clients_per_round=COHORT, seed=3)
  st, info = round_fn(sim.init_state(alg, params, state, NUM_CLIENTS), jdata)
  # Reference: the clients as a plain loop, FedAvg, then Adam on KL(ensemble || student).
  rkey = sim.round_key(3, 0)
  client_params, weights = [], []
  for cid in np.asarray(info['cohort']):
    n = int(data.count[cid])
    p, _ = _reference_local(apply, params, data.x[cid], data.label[cid], data.mask[cid],
                            sim.client_key(rkey, int(cid)))
    client_params.append(p)
    weights.append(n)
  w = _weighted_mean(client_params, weights)
  logits = [np.asarray(apply(p, state, proxy)[0].logits) for p in client_params]
  teacher = sum(wt * l for wt, l in zip(weights, logits)) / sum(weights)
  tx = optax.adam(lr)
  opt = tx.init(w)
  key = jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), 3), 0)
  for s in range(steps):
    idx = np.asarray(jax.random.choice(jax.random.fold_in(jax.random.fold_in(key, s), 0),
                                       16, (batch,), replace=False))

    def loss(q):
      logq = jax.nn.log_softmax(apply(q, state, proxy[idx])[0].logits)
      t = jax.nn.softmax(teacher[idx])
      return jnp.mean(jnp.sum(t * (jnp.log(t) - logq), -1))

    upd, opt = tx.update(jax.grad(loss)(w), opt, w)
    w = optax.apply_updates(w, upd)
  for a, b in zip(jax.tree.leaves(st.server.params), jax.tree.leaves(w)):
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
  # With no server steps FedDF is FedAvg exactly.
  plain = sim.make_round(feddf(trainer, proxy, server_steps=0), num_clients=NUM_CLIENTS,
                         clients_per_round=COHORT, seed=3)
  avg = sim.make_round(fedavg(trainer), num_clients=NUM_CLIENTS, clients_per_round=COHORT,
                       seed=3)
  s0 = sim.init_state(fedavg(trainer), params, state, NUM_CLIENTS)
  a_state, _ = plain(s0, jdata)
  b_state, _ = avg(s0, jdata)
  for a, b in zip(jax.tree.leaves(a_state.server.params), jax.tree.leaves(b_state.server.params)):
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize('budget,clients_per_chunk', [
    (lambda e: 10_000, None),   # every client in one vmap, each client's examples at once
    (lambda e: 8, None),        # chunks of one client, batches of 8 examples within it
    (lambda e: 3, None),        # batches of 3 (the last one padded)
    (lambda e: 4 * e + 1, None),   # the budget makes chunks of 4 of the 6 clients (last padded)
    (lambda e: 10_000, 4),      # so does clients_per_chunk
], ids=['one-vmap', 'batches-of-8', 'batches-of-3', 'budget-chunks', 'config-chunks'])
def test_personal_and_clients_global_evaluation_equal_a_per_client_loop(budget,
                                                                         clients_per_chunk):
  """Chunked, batched evaluation equals counting each client model's hits one by one."""
  x, y = _problem(n=150)
  part = partition.dirichlet(y, NUM_CLIENTS, 0.5, min_size=10, seed=0, test_fraction=0.4)
  train, test = packing.pack_partition(x, y, part, batch_size=B)
  assert test.x.shape[1] > 8 and len(set(test.count.tolist())) > 1
  max_examples = budget(test.x.shape[1])
  apply, params, state = _model()
  alg = ditto(make_local_trainer(apply, batch_size=B, epochs=1, lr=LR), lam=0.7)
  round_fn = sim.make_round(alg, num_clients=NUM_CLIENTS, clients_per_round=NUM_CLIENTS, seed=2)
  st, _ = round_fn(sim.init_state(alg, params, state, NUM_CLIENTS),
                   jax.tree.map(jnp.asarray, train))   # personal models now differ
  want_c, want_n, glob_c = [], [], []
  for i in range(NUM_CLIENTS):
    p, ms = alg.personal(st.server, jax.tree.map(lambda a: a[i], st.clients))
    k = int(test.count[i])
    logits = np.asarray(apply(p, ms, jnp.asarray(test.x[i, :k]), train=False)[0].logits)
    want_c.append(float(np.sum(logits.argmax(-1) == test.label[i, :k])))
    want_n.append(float(k))
    glob_c.append(float(np.sum(
        np.asarray(apply(p, ms, jnp.asarray(x), train=False)[0].logits).argmax(-1) == y)))
  assert len(set(want_c)) > 1
  c, n = sim.make_personal_evaluate(alg, apply, clients_per_chunk=clients_per_chunk,
                                    max_examples=max_examples)(st, jax.tree.map(jnp.asarray, test))
  np.testing.assert_array_equal(np.asarray(c), want_c)
  np.testing.assert_array_equal(np.asarray(n), want_n)
  gc, gn = sim.make_clients_global_evaluate(alg, apply, batch_size=max(1, max_examples // 4))(
      st, jnp.asarray(x), jnp.asarray(y))
  np.testing.assert_array_equal(np.asarray(gc), glob_c)
  np.testing.assert_array_equal(np.asarray(gn), [float(len(y))] * NUM_CLIENTS)
