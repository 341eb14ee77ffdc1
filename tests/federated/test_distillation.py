"""Federated distillation algorithms (FD, FedMD, DS-FL): exchanged knowledge vs references."""

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.federated import packing
from kdjax.federated import partition
from kdjax.federated import simulator as sim
from kdjax.federated.dsfl import dsfl
from kdjax.federated.fd import fd
from kdjax.federated.fedmd import fedmd
from kdjax.federated.local import make_local_trainer
from kdjax.models import create
from kdjax.models import functional

N, K, B = 5, 3, 4


def _setup():
  rng = np.random.default_rng(0)
  y = rng.integers(0, 3, 50).astype(np.int32)
  x = (np.eye(3, 5)[y] * 2 + rng.normal(size=(50, 5))).astype(np.float32)
  part = partition.dirichlet(y, N, 0.5, min_size=4, seed=0, test_fraction=0.0)
  data = packing.pack(x, y, part.train, multiple=B)
  apply, params, state = functional(create('mlp', num_classes=3, input_shape=(5,),
                                           hidden=(6,), seed=2))
  trainer = make_local_trainer(apply, batch_size=B, epochs=1, lr=0.2)
  public = rng.normal(size=(12, 5)).astype(np.float32)
  return data, apply, params, state, trainer, public


def _client(tree, k):
  return jax.tree.map(lambda a: a[k], tree)


def _logits(apply, params, state, x):
  return np.asarray(apply(params, state, jnp.asarray(x), train=False)[0].logits)


def test_fd_server_table_is_pooled_class_mean_of_client_logits():
  data, apply, params, state, trainer, _ = _setup()
  alg = fd(trainer, num_classes=3, beta=1.0)
  rf = sim.make_round(alg, num_clients=N, clients_per_round=K, seed=1)
  st = sim.init_state(alg, params, state, N)
  st, info = rf(st, jax.tree.map(jnp.asarray, data))
  sums, counts = np.zeros((3, 3)), np.zeros(3)
  for k in np.asarray(info['cohort']):
    n = data.count[k]
    z = _logits(apply, _client(st.clients['params'], k), state, data.x[k, :n])
    for c in range(3):
      sums[c] += z[data.label[k, :n] == c].sum(0)
      counts[c] += (data.label[k, :n] == c).sum()
  seen = counts > 0
  np.testing.assert_array_equal(np.asarray(st.server.extra['seen']), seen)
  np.testing.assert_allclose(np.asarray(st.server.extra['logits'])[seen],
                             (sums[seen] / counts[seen][:, None]), atol=1e-5)
  # Clients outside the cohort kept the initial model.
  for k in set(range(N)) - set(np.asarray(info['cohort']).tolist()):
    for a, b in zip(jax.tree.leaves(_client(st.clients['params'], k)), jax.tree.leaves(params)):
      np.testing.assert_array_equal(a, b)
  # The distillation term acts from round 2 on: beta changes the client models.
  st_b0 = sim.init_state(fd(trainer, num_classes=3, beta=0.0), params, state, N)
  st_b0 = st_b0._replace(server=st_b0.server._replace(extra=st.server.extra),
                         clients=st.clients, round=st.round)
  rf0 = sim.make_round(fd(trainer, num_classes=3, beta=0.0), num_clients=N,
                       clients_per_round=K, seed=1)
  a, _ = rf(st, jax.tree.map(jnp.asarray, data))
  b, _ = rf0(st_b0, jax.tree.map(jnp.asarray, data))
  assert not np.allclose(a.clients['params']['head']['kernel'],
                         b.clients['params']['head']['kernel'])


def test_fedmd_consensus_is_mean_public_logits_and_first_round_skips_digest():
  data, apply, params, state, trainer, public = _setup()
  alg = fedmd(trainer, public, digest_batch_size=4)
  rf = sim.make_round(alg, num_clients=N, clients_per_round=K, seed=1)
  st = sim.init_state(alg, params, state, N)
  jdata = jax.tree.map(jnp.asarray, data)
  st, info = rf(st, jdata)
  cohort = np.asarray(info['cohort'])
  rkey = sim.round_key(1, 0)
  zs = []
  for k in cohort:
    ref = jax.jit(trainer.train)(params, state, _client(jdata, k), sim.client_key(rkey, int(k)))
    got = _client(st.clients['params'], k)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(ref.params)):
      np.testing.assert_allclose(a, b, atol=1e-6)   # no digest before a consensus exists
    zs.append(_logits(apply, got, state, public))
  np.testing.assert_allclose(np.asarray(st.server.extra['consensus']), np.mean(zs, 0),
                             atol=1e-5)
  # Round 2 digests: the client differs from local training alone.
  st2, info2 = rf(st, jdata)
  k = int(np.asarray(info2['cohort'])[0])
  alone = jax.jit(trainer.train)(_client(st.clients['params'], k), state, _client(jdata, k),
                                 sim.client_key(sim.round_key(1, 1), k))
  assert not np.allclose(st2.clients['params']['head']['kernel'][k],
                         alone.params['head']['kernel'])


def test_dsfl_soft_labels_are_era_of_mean_client_probabilities():
  data, apply, params, state, trainer, public = _setup()
  temperature = 0.3
  alg = dsfl(trainer, public, temperature=temperature, distill_batch_size=4)
  rf = sim.make_round(alg, num_clients=N, clients_per_round=K, seed=1)
  st = sim.init_state(alg, params, state, N)
  st, info = rf(st, jax.tree.map(jnp.asarray, data))
  probs = []
  for k in np.asarray(info['cohort']):
    z = _logits(apply, _client(st.clients['params'], k), state, public).astype(np.float64)
    e = np.exp(z - z.max(1, keepdims=True))
    probs.append(e / e.sum(1, keepdims=True))
  m = np.mean(probs, 0)
  sharp = m ** (1 / temperature)
  sharp /= sharp.sum(1, keepdims=True)
  got = np.asarray(st.server.extra['soft_labels'])
  np.testing.assert_allclose(got, sharp, atol=1e-5)
  # Sharper than the plain average (entropy reduced).
  ent = lambda p: -(p * np.log(p)).sum(1).mean()
  assert ent(got) < ent(m)


def test_kmeans_matches_numpy_lloyd_and_filter_separates_near_from_far():
  from kdjax.federated.edgefd import in_distribution
  from kdjax.federated.edgefd import kmeans
  rng = np.random.default_rng(3)
  x = np.concatenate([rng.normal(0, 0.3, (20, 2)), rng.normal(3, 0.3, (20, 2)),
                      np.zeros((4, 2))]).astype(np.float32)
  mask = np.arange(44) < 40
  key = jax.random.key(1)
  got = np.asarray(kmeans(jnp.asarray(x), jnp.asarray(mask), 2, 6, key))
  p = mask / mask.sum()
  c = x[np.asarray(jax.random.choice(key, 44, (2,), replace=False, p=jnp.asarray(p)))]
  for _ in range(6):
    a = np.argmin(((x[:40, None] - c[None]) ** 2).sum(-1), 1)
    c = np.stack([x[:40][a == j].mean(0) if (a == j).any() else c[j] for j in range(2)])
  np.testing.assert_allclose(got, c, atol=1e-5)
  proxy = np.concatenate([rng.normal(0, 0.2, (5, 2)), rng.normal(10, 0.5, (5, 2))])
  keep = np.asarray(in_distribution(jnp.asarray(x), jnp.asarray(mask), jnp.asarray(proxy),
                                    num_clusters=2, iters=6, quantile=0.95, rng=key))
  assert keep[:5].all() and not keep[5:].any()


def test_edgefd_server_logits_average_only_clients_that_kept_the_example():
  from kdjax.federated.edgefd import edgefd
  from kdjax.federated.edgefd import in_distribution
  data, apply, params, state, trainer, proxy = _setup()
  proxy = np.concatenate([proxy, proxy + 50.0])     # the second half is far away
  alg = edgefd(trainer, proxy, num_clusters=2, kmeans_iters=5, quantile=0.9,
               distill_batch_size=4)
  rf = sim.make_round(alg, num_clients=N, clients_per_round=K, seed=1)
  st, info = rf(sim.init_state(alg, params, state, N), jax.tree.map(jnp.asarray, data))
  sums, counts = np.zeros((24, 3)), np.zeros(24)
  rkey = sim.round_key(1, 0)
  for k in np.asarray(info['cohort']):
    keep = np.asarray(in_distribution(
        jnp.asarray(data.x[k]), jnp.asarray(data.mask[k]), jnp.asarray(proxy), num_clusters=2,
        iters=5, quantile=0.9, rng=jax.random.fold_in(sim.client_key(rkey, int(k)), 8)))
    z = _logits(apply, _client(st.clients['params'], k), state, proxy)
    sums += z * keep[:, None]
    counts += keep
  seen = counts > 0
  assert not seen[12:].any() and seen[:12].any()
  np.testing.assert_array_equal(np.asarray(st.server.extra['seen']), seen)
  np.testing.assert_allclose(np.asarray(st.server.extra['logits'])[seen],
                             sums[seen] / counts[seen][:, None], atol=1e-5)


def _js_np(p, q):
  m = 0.5 * (p + q)
  kl = lambda a, b: sum(x * (np.log(x) - np.log(y)) for x, y in zip(a, b) if x > 0)
  return 0.5 * kl(p, m) + 0.5 * kl(q, m)


def test_knfu_fuses_reports_of_nearest_label_distributions():
  from kdjax.federated.knfu import knfu
  data, apply, params, state, trainer, transfer = _setup()
  beta, m = 4.0, 2
  alg = knfu(trainer, transfer, num_classes=3, beta=beta, num_neighbors=m,
             distill_batch_size=4)
  rf = sim.make_round(alg, num_clients=N, clients_per_round=4, seed=1)
  st, info = rf(sim.init_state(alg, params, state, N), jax.tree.map(jnp.asarray, data))
  cohort = sorted(np.asarray(info['cohort']).tolist())
  reports, epds = {}, {}
  for k in cohort:
    reports[k] = _logits(apply, _client(st.clients['params'], k), state, transfer)
    h = np.bincount(data.label[k, :data.count[k]], minlength=3).astype(np.float64)
    epds[k] = h / h.sum()
    np.testing.assert_allclose(st.clients['report'][k], reports[k], atol=1e-5)
    np.testing.assert_allclose(st.clients['epd'][k], epds[k], atol=1e-6)
  for k in range(N):
    if k not in epds:    # no report yet: no EPD, nothing fused
      assert not bool(st.clients['fused_ok'][k])
      np.testing.assert_array_equal(np.asarray(st.clients['fused'][k]), 0.0)
      continue
    d = {j: _js_np(epds[k], epds[j]) for j in cohort if j != k}
    kth = sorted(d.values())[m - 1]
    keep = [j for j in d if d[j] <= kth + 1e-7]
    assert len(keep) == m  # no ties here: exactly the m nearest
    w = np.array([np.exp(-beta * d[j]) for j in keep])
    w /= w.sum()
    want = sum(wi * reports[j] for wi, j in zip(w, keep))
    np.testing.assert_allclose(np.asarray(st.clients['fused'][k]), want, atol=1e-4)
    assert bool(st.clients['fused_ok'][k])


def test_public_trainer_vmapped_over_seeds_equals_each_seed_alone():
  # The seed-vmapped sweep must give each seed's run exactly (FedDF's server steps).
  import optax
  from kdjax.federated.public import make_public_trainer
  apply, params, state = functional(create('mlp', num_classes=10, input_shape=(40,),
                                           hidden=(100, 100), seed=0))
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(500, 40)), jnp.float32)
  targets = jnp.asarray(rng.normal(size=(500, 10)) * 3, jnp.float32)
  train = make_public_trainer(apply, batch_size=128, loss='kd', tx=optax.adam(1e-3), steps=20)
  keys = jax.random.split(jax.random.key(9), 2)
  together = jax.jit(jax.vmap(lambda k: train(params, state, x, targets, k)[0]))(keys)
  for i in range(2):
    alone = jax.jit(lambda k: train(params, state, x, targets, k)[0])(keys[i])
    for a, b in zip(jax.tree.leaves(together), jax.tree.leaves(alone)):
      np.testing.assert_array_equal(np.asarray(a[i]), np.asarray(b))
