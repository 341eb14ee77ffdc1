"""Heterogeneous client models: grouped rounds vs per-client sequential references; refusals;
one group is the homogeneous round; FedDF per-group deltas."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.errors import UserError
from kdjax.federated import groups
from kdjax.federated import packing
from kdjax.federated import partition
from kdjax.federated import simulator as sim
from kdjax.federated.algorithms import make_algorithm
from kdjax.federated.fedd2s import personalized_teachers
from kdjax.federated.local import make_local_trainer
from kdjax.models import create
from kdjax.models import functional

N, K, B, C = 8, 4, 4, 3
HIDDEN = [(6,), (8, 5)]


def _data():
  rng = np.random.default_rng(0)
  y = rng.integers(0, C, 80).astype(np.int32)
  x = (np.eye(C, 5)[y] * 2 + rng.normal(size=(80, 5))).astype(np.float32)
  part = partition.dirichlet(y, N, 0.5, min_size=4, seed=0, test_fraction=0.0)
  return x, packing.pack(x, y, part.train, multiple=B)


def _groups(name, proxy, **options):
  algs, params, states = [], [], []
  for h in HIDDEN:
    apply, p, s = functional(create('mlp', num_classes=C, input_shape=(5,), hidden=h, seed=1))
    trainer = make_local_trainer(apply, batch_size=B, epochs=1, lr=0.2)
    algs.append(make_algorithm(name, trainer, proxy_x=proxy, num_classes=C, **options))
    params.append(p)
    states.append(s)
  return algs, params, states


def test_assignment_and_cohort_split():
  ids = groups.assign_clients(10, [3, 1, 1], seed=4)
  assert [len(g) for g in ids] == [6, 2, 2]
  assert sorted(np.concatenate(ids).tolist()) == list(range(10))
  again = groups.assign_clients(10, [3, 1, 1], seed=4)
  assert all((a == b).all() for a, b in zip(ids, again))      # deterministic
  assert groups.group_cohort_sizes(7, [5, 5]) == [4, 3]
  assert groups.group_cohort_sizes(2, [9, 1]) == [1, 1]
  with pytest.raises(UserError, match='fractions'):
    groups.assign_clients(10, [1.0, 0.0])
  with pytest.raises(UserError, match='without any'):
    groups.assign_clients(3, [10.0, 0.01])
  with pytest.raises(UserError, match='clients_per_round'):
    groups.group_cohort_sizes(1, [5, 5])


@pytest.mark.parametrize('name,chunk', [('fd', 1), ('fedd2s', None)])
def test_grouped_round_equals_sequential_clients_of_each_group(name, chunk):
  x, data = _data()
  jdata = jax.tree.map(jnp.asarray, data)
  algs, params, states = _groups(name, None)
  ids = groups.assign_clients(N, [0.5, 0.5], seed=0)
  sizes = groups.group_cohort_sizes(K, [len(g) for g in ids])
  offsets = np.cumsum([0] + sizes)
  round_fn = groups.make_grouped_round(algs, ids, num_clients=N, clients_per_round=K, seed=1,
                                       clients_per_chunk=chunk)
  st = groups.init_grouped_state(algs, params, states, ids)
  updates = [jax.jit(a.client_update) for a in algs]
  for r in range(2):
    new, info = round_fn(st, jdata)
    cohort = np.asarray(info['cohort'])
    assert len(set(cohort.tolist())) == K
    rkey = sim.round_key(1, r)
    total, count = 0.0, 0.0
    for g in range(2):
      members = cohort[offsets[g]:offsets[g + 1]]
      assert set(members.tolist()) <= set(ids[g].tolist())
      for cid in members.tolist():
        pos = int(np.searchsorted(ids[g], cid))
        out = updates[g](st.server[g], jax.tree.map(lambda a: a[pos], st.clients[g]),
                         jax.tree.map(lambda a: a[cid], jdata), sim.client_key(rkey, cid))
        got = jax.tree.map(lambda a: a[pos], new.clients[g]['params'])
        for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(out.client_state['params'])):
          np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
        total = total + np.asarray(out.update['sum'])
        count = count + np.asarray(out.update['count'])
    if name == 'fd':   # both groups hold the same pooled per-class logits of all groups
      has = count > 0
      for g in range(2):
        np.testing.assert_allclose(np.asarray(new.server[g].extra['logits'])[has],
                                   total[has] / count[has][:, None], atol=1e-4)
    else:              # memory merged across groups in client-id order, then personalized
      sums, counts = np.zeros((N, C, C)), np.zeros((N, C))
      rep = np.zeros(N, bool)
      for g in range(2):
        sums[ids[g]] = np.asarray(new.clients[g]['sum'])
        counts[ids[g]] = np.asarray(new.clients[g]['count'])
        rep[ids[g]] = np.asarray(new.clients[g]['reported'])
      assert rep.sum() >= K and rep[cohort].all()
      t, known = personalized_teachers(jnp.asarray(sums), jnp.asarray(counts),
                                       jnp.asarray(rep), gamma=5.0)
      for g in range(2):
        np.testing.assert_allclose(new.clients[g]['teacher'], np.asarray(t)[ids[g]], atol=1e-5)
        np.testing.assert_array_equal(new.clients[g]['known'], np.asarray(known)[ids[g]])
    st = new
  if name == 'fd':   # personalized accuracy counts every client of every group
    applies = [functional(create('mlp', num_classes=C, input_shape=(5,), hidden=h, seed=1))[0]
               for h in HIDDEN]
    evaluate = groups.make_grouped_evaluate(algs, applies, ids, num_clients=N)
    metrics, (pc, pn) = evaluate(st, jdata, jnp.asarray(x[:20]), jnp.asarray(data.label[0, :20]))
    for g in range(2):
      for pos, cid in enumerate(ids[g].tolist()):
        n = int(data.count[cid])
        p = jax.tree.map(lambda a: a[pos], st.clients[g]['params'])
        z = np.asarray(applies[g](p, {}, jnp.asarray(data.x[cid, :n]))[0].logits)
        assert pn[cid] == n
        assert pc[cid] == (z.argmax(-1) == data.label[cid, :n]).sum()
    acc = pc / pn
    assert metrics['personalized_accuracy_mean'] == pytest.approx(acc.mean())


def test_parameter_averaging_algorithms_refuse_mixed_architectures():
  algs, _, _ = _groups('fedavg', None)
  ids = groups.assign_clients(N, [0.5, 0.5])
  with pytest.raises(UserError, match='cannot mix client architectures'):
    groups.make_grouped_round(algs, ids, num_clients=N, clients_per_round=K)
  for name in ('fedprox', 'scaffold', 'fednova', 'fedbn', 'ditto'):
    with pytest.raises(UserError, match='cannot mix'):
      groups.check_heterogeneous(_groups(name, None)[0])


def test_one_group_is_the_homogeneous_round():
  _, data = _data()
  jdata = jax.tree.map(jnp.asarray, data)
  algs, params, states = _groups('fedd2s', None)
  ids = [np.arange(N, dtype=np.int32)]
  a = groups.make_grouped_round(algs[:1], ids, num_clients=N, clients_per_round=K, seed=2,
                                dropout=0.3)
  b = sim.make_round(algs[0], num_clients=N, clients_per_round=K, seed=2, dropout=0.3)
  sa = groups.init_grouped_state(algs[:1], params[:1], states[:1], ids)
  sb = sim.init_state(algs[0], params[0], states[0], N)
  for _ in range(2):
    sa, ia = a(sa, jdata)
    sb, ib = b(sb, jdata)
  np.testing.assert_array_equal(ia['cohort'], ib['cohort'])
  np.testing.assert_array_equal(ia['reported'], ib['reported'])
  for u, v in zip(jax.tree.leaves(sa.clients[0]), jax.tree.leaves(sb.clients)):
    np.testing.assert_allclose(u, v, atol=1e-6)


def test_feddf_averages_parameter_deltas_within_each_architecture_group():
  x, data = _data()
  jdata = jax.tree.map(jnp.asarray, data)
  algs, params, states = _groups('feddf', x[:8], server_steps=0)
  ids = groups.assign_clients(N, [0.5, 0.5], seed=0)
  sizes = groups.group_cohort_sizes(K, [len(g) for g in ids])
  offsets = np.cumsum([0] + sizes)
  round_fn = groups.make_grouped_round(algs, ids, num_clients=N, clients_per_round=K, seed=1)
  st = groups.init_grouped_state(algs, params, states, ids)
  new, info = round_fn(st, jdata)
  cohort, rkey = np.asarray(info['cohort']), sim.round_key(1, 0)
  for g in range(2):
    deltas, weights = [], []
    for cid in cohort[offsets[g]:offsets[g + 1]].tolist():
      out = jax.jit(algs[g].client_update)(st.server[g], {}, jax.tree.map(lambda a: a[cid], jdata),
                                           sim.client_key(rkey, cid))
      deltas.append(out.update['delta'])
      weights.append(float(out.weight))
    want = jax.tree.map(lambda p, *d: p + sum(w * a for w, a in zip(weights, d)) / sum(weights),
                        params[g], *deltas)
    for a, b in zip(jax.tree.leaves(new.server[g].params), jax.tree.leaves(want)):
      np.testing.assert_allclose(a, b, atol=1e-5)
