"""Heterogeneous client models: one group is the homogeneous round; FedDF per-group deltas."""

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.federated import groups
from kdjax.federated import packing
from kdjax.federated import partition
from kdjax.federated import simulator as sim
from kdjax.federated.algorithms import make_algorithm
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
