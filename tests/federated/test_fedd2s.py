"""FedD2S: layer depths and dropping schedule, personalized aggregation, vmap vs sequential."""

import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.errors import UserError
from kdjax.federated import packing
from kdjax.federated import partition
from kdjax.federated import simulator as sim
from kdjax.federated.fedd2s import fedd2s
from kdjax.federated.fedd2s import kd_depth
from kdjax.federated.fedd2s import layer_depths
from kdjax.federated.fedd2s import personalized_teachers
from kdjax.federated.local import make_local_trainer
from kdjax.models import create
from kdjax.models import functional

N, K, B, C = 6, 4, 4, 3
CONFIG = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'fed',
                      'mnist1d_fedavg.py')


def _teachers_np(sums, counts, reported, gamma):
  """Written from the formula: w_kj ∝ exp(γ cos(n_k, n_j)) over reported j ≠ k."""
  n = len(counts)
  t, known = np.zeros_like(sums), np.zeros(counts.shape, bool)
  for k in range(n):
    if not reported[k]:
      continue
    others = [j for j in range(n) if j != k and reported[j]]
    if not others:
      continue
    cos = [counts[k] @ counts[j] / (np.linalg.norm(counts[k]) * np.linalg.norm(counts[j]))
           for j in others]
    w = np.exp(gamma * np.array(cos))
    w /= w.sum()
    num = sum(wi * sums[j] for wi, j in zip(w, others))
    den = sum(wi * counts[j] for wi, j in zip(w, others))
    known[k] = den > 0
    t[k][known[k]] = num[known[k]] / den[known[k]][:, None]
  return t, known


def test_layer_depths_of_mlp_and_cnn_and_dropping_schedule():
  _, p, _ = functional(create('mlp', num_classes=3, input_shape=(5,), hidden=(4, 3),
                              norm='layer'))
  d = layer_depths(p)
  assert [int(d['hidden'][i]['kernel']) for i in range(2)] == [1, 2]
  assert [int(d['norms'][i]['scale']) for i in range(2)] == [1, 2]
  assert int(d['head']['kernel']) == int(d['head']['bias']) == 3
  _, p, _ = functional(create('cnn1d', num_classes=3, input_shape=(40, 1)))
  d = layer_depths(p)
  assert sorted({int(v) for v in jax.tree.leaves(d)}) == list(range(1, len(p['convs']) + 2))
  assert int(d['head']['kernel']) == len(p['convs']) + 1
  # d(r) = max(D - floor(r / every), min_depth); hand table for D=4, every=3, min=2.
  want = [4, 4, 4, 3, 3, 3, 2, 2, 2, 2, 2, 2]
  assert [int(kd_depth(r, 4, drop_every=3, min_depth=2)) for r in range(12)] == want
  assert [int(kd_depth(r, 3, drop_every=1)) for r in range(5)] == [3, 2, 1, 1, 1]
  assert [int(kd_depth(r, 3, drop_every=0)) for r in range(3)] == [3, 3, 3]


def test_personalized_teachers_match_numpy_reference():
  rng = np.random.default_rng(0)
  counts = rng.integers(0, 4, (6, C)).astype(np.float32)
  counts[2] = 0.0
  counts[2, 1] = 5.0                   # a client holding one class only
  sums = rng.normal(size=(6, C, C)).astype(np.float32) * counts[..., None]
  reported = np.array([True, True, True, False, True, True])
  for gamma in (0.0, 3.0):
    t, known = personalized_teachers(jnp.asarray(sums), jnp.asarray(counts),
                                     jnp.asarray(reported), gamma=gamma)
    t_np, known_np = _teachers_np(sums, counts, reported, gamma)
    np.testing.assert_array_equal(np.asarray(known), known_np)
    np.testing.assert_allclose(np.asarray(t), t_np, atol=1e-5)
  assert not np.asarray(known)[3].any()      # no report: no teacher
  # gamma = 0 is FD without the client's own contribution.
  t0, _ = personalized_teachers(jnp.asarray(sums), jnp.asarray(counts), jnp.asarray(reported),
                                gamma=0.0)
  others = [j for j in range(6) if j != 0 and reported[j]]
  pooled = sums[others].sum(0) / np.maximum(counts[others].sum(0), 1e-12)[:, None]
  np.testing.assert_allclose(np.asarray(t0)[0], pooled, atol=1e-5)


def _kd_np(student, teacher):
  """Hinton KD at T=1 (KL(teacher || student)), per example."""
  ls = jax.nn.log_softmax(student)
  lt = jax.nn.log_softmax(teacher)
  return jnp.sum(jnp.exp(lt) * (lt - ls), -1)


def test_masked_distillation_gradient_reaches_only_the_masked_layers():
  apply, params, state = functional(create('mlp', num_classes=C, input_shape=(5,),
                                           hidden=(4,), seed=3))
  rng = np.random.default_rng(1)
  x = rng.normal(size=(4, 5)).astype(np.float32)
  y = np.array([0, 1, 2, 1], np.int32)
  table = jnp.asarray(rng.normal(size=(C, C)).astype(np.float32))
  lr, beta = 0.5, 0.7
  trainer = make_local_trainer(apply, batch_size=4, epochs=1, lr=lr)

  def batch_loss(logits, labels, mask):
    return beta * jnp.mean(_kd_np(logits, table[labels]))

  mask = jax.tree_util.tree_map_with_path(   # the hidden layer distils, the head does not
      lambda path, _: 0.0 if 'head' in jax.tree_util.keystr(path) else 1.0, params)
  data = (jnp.asarray(x), jnp.asarray(y), jnp.ones(4, bool), 4)
  res = jax.jit(functools.partial(trainer.train, batch_loss=batch_loss,
                                  batch_loss_mask=mask))(params, state, data, jax.random.key(0))
  logits = lambda p: apply(p, state, jnp.asarray(x), train=True)[0].logits
  ce = lambda p: -jnp.mean(jax.nn.log_softmax(logits(p))[jnp.arange(4), y])
  kdl = lambda p: batch_loss(logits(p), jnp.asarray(y), None)
  g_ce, g_kd = jax.grad(ce)(params), jax.grad(kdl)(params)
  want = jax.tree.map(lambda p, a, b, m: p - lr * (a + m * b), params, g_ce, g_kd, mask)
  for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(want)):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # The head moved by the CE gradient alone; the KD term did change the hidden layer.
  np.testing.assert_allclose(res.params['head']['kernel'],
                             params['head']['kernel'] - lr * g_ce['head']['kernel'], atol=1e-6)
  assert float(jnp.max(jnp.abs(g_kd['hidden'][0]['kernel']))) > 1e-4


def test_fedd2s_vmap_rounds_equal_sequential_reference():
  rng = np.random.default_rng(0)
  y = rng.integers(0, C, 60).astype(np.int32)
  x = (np.eye(C, 5)[y] * 2 + rng.normal(size=(60, 5))).astype(np.float32)
  part = partition.dirichlet(y, N, 0.5, min_size=4, seed=0, test_fraction=0.0)
  data = packing.pack(x, y, part.train, multiple=B)
  jdata = jax.tree.map(jnp.asarray, data)
  apply, params, state = functional(create('mlp', num_classes=C, input_shape=(5,),
                                           hidden=(6, 4), seed=2))
  trainer = make_local_trainer(apply, batch_size=B, epochs=1, lr=0.2)
  beta, gamma = 2.0, 3.0
  alg = fedd2s(trainer, num_classes=C, knowledge='class_table', beta=beta, gamma=gamma,
               drop_every=1)
  round_fn = sim.make_round(alg, num_clients=N, clients_per_round=K, seed=1)
  st = sim.init_state(alg, params, state, N)
  cparams = [params] * N
  sums, counts = np.zeros((N, C, C)), np.zeros((N, C))
  reported = np.zeros(N, bool)
  teacher, known = np.zeros((N, C, C)), np.zeros((N, C), bool)
  depths = layer_depths(params)

  @jax.jit
  def reference_train(p, client, key, tab, kn, mask):
    def batch_loss(logits, labels, m):
      yy = jnp.maximum(labels, 0)
      w = (m & (labels >= 0) & kn[yy]).astype(jnp.float32)
      return beta * jnp.sum(_kd_np(logits, tab[yy]) * w) / jnp.maximum(jnp.sum(w), 1.0)
    return trainer.train(p, state, client, key, batch_loss=batch_loss, batch_loss_mask=mask)

  for r in range(3):
    st, info = round_fn(st, jdata)
    rkey = sim.round_key(1, r)
    d = max(3 - r, 1)     # D = 3 (two hidden layers + head), one layer dropped per round
    mask = jax.tree.map(lambda dep: jnp.float32(dep <= d), depths)
    for cid in np.asarray(info['cohort']).tolist():
      res = reference_train(cparams[cid], jax.tree.map(lambda a: a[cid], jdata),
                            sim.client_key(rkey, cid), jnp.asarray(teacher[cid], jnp.float32),
                            jnp.asarray(known[cid]), mask)
      cparams[cid] = res.params
      n = int(data.count[cid])
      z = np.asarray(apply(res.params, state, jnp.asarray(data.x[cid, :n]))[0].logits)
      onehot = np.eye(C)[data.label[cid, :n]]
      sums[cid], counts[cid], reported[cid] = onehot.T @ z, onehot.sum(0), True
    teacher, known = _teachers_np(sums, counts, reported, gamma)
    for cid in range(N):
      got = jax.tree.map(lambda a: a[cid], st.clients['params'])
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(cparams[cid])):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(st.clients['known']), known)
    np.testing.assert_allclose(np.asarray(st.clients['teacher']), teacher, atol=1e-4)
  assert int(st.server.extra['round']) == 3
  assert known.any()


def test_fedd2s_cli_run_improves_over_initial_accuracy(tmp_path, capsys):
  import json

  from kdjax import cli
  from kdjax.config import load_config
  from kdjax.config import split_overrides
  from kdjax.federated import run

  workdir = str(tmp_path / 'w')
  args = ['--config.algorithm=fedd2s', '--config.num_rounds=6', '--config.plots=False',
          '--config.checkpoint_every=0']
  assert cli.main(['fed', 'run', '--config', CONFIG + ':tiny', '--workdir', workdir,
                   '--no-progress'] + args) == 0
  summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  config = load_config(CONFIG + ':tiny', split_overrides(args)[1])
  parts = run.setup(config)
  initial = run.evaluate_state(parts, sim.init_state(parts['algorithm'], parts['params'],
                                                     parts['model_state'], config.num_clients))
  assert summary['round'] == 6
  assert summary['global_accuracy'] > initial['global_accuracy'] + 0.05
  assert summary['personalized_accuracy_mean'] > initial['personalized_accuracy_mean'] + 0.05


def _head_np(w, b, reps, logits, labels, where, steps, lr, t):
  """The server head written from the formula: full-batch Adam (optax defaults) on the mean
  over `where` of CE(g(h), y) + t^2 KL(softmax(z/t) || softmax(g(h)/t)), g(h) = h w + b."""
  w, b = w.astype(np.float64), b.astype(np.float64)
  sm = lambda a: np.exp(a - a.max(-1, keepdims=True)) / np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True)
  wt = where.astype(np.float64)
  n = max(wt.sum(), 1.0)
  m = [np.zeros_like(w), np.zeros_like(b)]
  v = [np.zeros_like(w), np.zeros_like(b)]
  for i in range(1, steps + 1):
    u = reps @ w + b
    onehot = np.eye(u.shape[-1])[np.maximum(labels, 0)]
    du = (sm(u) - onehot) + t * (sm(u / t) - sm(logits / t))   # d/du of CE + t^2 KL
    du *= wt[..., None] / n
    g = [reps.reshape(-1, reps.shape[-1]).T @ du.reshape(-1, du.shape[-1]),
         du.reshape(-1, du.shape[-1]).sum(0)]
    for j, p in enumerate((w, b)):
      m[j] = 0.9 * m[j] + 0.1 * g[j]
      v[j] = 0.999 * v[j] + 0.001 * g[j] ** 2
      p -= lr * (m[j] / (1 - 0.9 ** i)) / (np.sqrt(v[j] / (1 - 0.999 ** i)) + 1e-8)
  return w, b


def test_server_head_soft_labels_match_numpy_reference():
  jax.config.update('jax_default_matmul_precision', 'highest')
  import optax
  from kdjax.federated.fedd2s import soft_labels
  from kdjax.federated.fedd2s import train_server_head
  rng = np.random.default_rng(1)
  reps = rng.normal(size=(3, 4, 5)).astype(np.float32)      # 3 clients x 4 reports x H=5
  logits = rng.normal(size=(3, 4, C)).astype(np.float32)
  labels = rng.integers(0, C, (3, 4)).astype(np.int32)
  labels[2, 3] = -1
  where = labels >= 0
  where[1] = False                                          # a client reported at another cut
  w0 = rng.normal(size=(5, C)).astype(np.float32) * 0.1
  b0 = np.zeros(C, np.float32)
  for t in (1.0, 2.0):
    w, b = train_server_head(jnp.asarray(w0), jnp.asarray(b0), jnp.asarray(reps),
                             jnp.asarray(logits), jnp.asarray(labels), jnp.asarray(where),
                             tx=optax.adam(0.05), steps=7, temperature=t)
    w_np, b_np = _head_np(w0, b0, reps, logits, labels, where, 7, 0.05, t)
    np.testing.assert_allclose(np.asarray(w), w_np, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(b), b_np, rtol=1e-4, atol=1e-5)
  # The soft labels are per example: two examples of one label get different targets.
  q = np.asarray(soft_labels(w, b, jnp.asarray(reps)))
  np.testing.assert_allclose(q, reps @ w_np + b_np, rtol=1e-4, atol=1e-4)
  same = [(i, j) for i in range(4) for j in range(i + 1, 4) if labels[0, i] == labels[0, j]]
  assert all(not np.allclose(q[0, i], q[0, j]) for i, j in same)


BETA = 1.5


@functools.lru_cache(maxsize=None)
def _heads_run():
  """Three rounds of FedD2S (heads, drop_every=1: cuts at stage indices 1, 1, 0), the
  states before and after each round and its cohort; shared by the tests below."""
  rng = np.random.default_rng(4)
  y = rng.integers(0, C, 72).astype(np.int32)
  x = (np.eye(C, 5)[y] * 2 + rng.normal(size=(72, 5))).astype(np.float32)
  part = partition.dirichlet(y, N, 1.0, min_size=4, seed=0, test_fraction=0.25)
  train = jax.tree.map(jnp.asarray, packing.pack(x, y, part.train, multiple=B))
  test = jax.tree.map(jnp.asarray, packing.pack(x, y, part.test, multiple=B))
  apply, params, state = functional(create('mlp', num_classes=C, input_shape=(5,),
                                           hidden=(6, 4), seed=1))
  trainer = make_local_trainer(apply, batch_size=B, lr=0.2, epochs=2)
  alg = fedd2s(trainer, num_classes=C, knowledge='heads', beta=BETA, drop_every=1,
               head_steps=5, head_lr=0.1, reps_per_client=8)
  assert not alg.heterogeneous and alg.server_distill is not None
  rf = sim.make_round(alg, num_clients=N, clients_per_round=K, seed=0)
  st = sim.init_state(alg, params, state, N)
  hist = []
  for _ in range(3):
    before = st
    st, info = rf(st, train)
    hist.append((before, st, np.asarray(info['cohort'])))
  return apply, state, trainer, train, test, hist


def test_fedd2s_heads_rounds_train_the_head_and_distil_per_example():
  from kdjax.federated.fedd2s import current_stage
  _, _, _, train, _, hist = _heads_run()
  _, st, cohort = hist[0]
  # Round 0 cut: d = D = 3, the stage entering the head (index 1); its head is trained.
  assert int(current_stage(3, 3)) == 1
  assert np.asarray(st.server.extra['trained']).tolist() == [False, True]
  assert np.abs(np.asarray(st.server.extra['w'][1])).sum() > 0
  assert (np.asarray(st.clients['stage'])[cohort] == 1).all()
  lab = np.asarray(st.clients['label'])
  counts = np.asarray(train.count)
  for k in cohort:   # a report of min(count, 8) real examples
    assert (lab[k] >= 0).sum() == min(int(counts[k]), 8)
  # Round 1: d = 2, cut at stage index 1 still (min(d, D - 1)); round 2: d = 1, index 0.
  assert np.asarray(hist[2][1].server.extra['trained']).tolist() == [True, True]


def test_fedd2s_heads_local_loop_is_the_shared_trainer():
  """A FedD2S client trains through LocalTrainer.train: in round 0 (no trained head) it is
  plain local training; in round 1 it is trainer.train with beta * KD toward the stage-2
  head's soft labels of its own examples (written here), its gradient kept to depth <= 2."""
  apply, state, trainer, train, _, hist = _heads_run()
  depths = layer_depths(hist[0][0].server.params)
  mask = jax.tree.map(lambda d: jnp.float32(d <= 2), depths)   # d(1) = D - 1 = 2

  def kd_term(out, batch):
    w = batch['mask'].astype(jnp.float32) * batch['on']
    return BETA * jnp.sum(_kd_np(out.logits, batch['q']) * w) / jnp.maximum(jnp.sum(w), 1.0)

  reference = jax.jit(lambda p, d, k, q, on: trainer.train(
      p, state, d, k, batch_extra={'q': q, 'on': on}, loss_extra=kd_term, batch_loss_mask=mask))
  stage2 = jax.jit(lambda p, xx: apply(p, state, xx, train=False)[0].features['stage2'])
  for r in (0, 1):
    before, after, cohort = hist[r]
    ex = before.server.extra
    assert bool(ex['trained'][1]) == (r == 1)
    for cid in cohort.tolist():
      p = jax.tree.map(lambda a: a[cid], before.clients['params'])
      xs = train.x[cid]
      feats = np.asarray(stage2(p, xs))                                 # [E, 4]
      q = feats @ np.asarray(ex['w'][1])[:4] + np.asarray(ex['b'][1])   # stage 2 padded to 6
      on = jnp.full(xs.shape[:1], float(r == 1))
      want = reference(p, (xs, train.label[cid], train.mask[cid], train.count[cid]),
                       sim.client_key(sim.round_key(0, r), cid), jnp.asarray(q), on)
      got = jax.tree.map(lambda a: a[cid], after.clients['params'])
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(want.params)):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_ensemble_prediction_adds_the_server_head_on_the_clients_own_features():
  from kdjax.federated.fedd2s import ensemble_logits
  from kdjax.federated.fedd2s import make_ensemble_evaluate
  apply, state, _, _, test, hist = _heads_run()
  ens = jax.jit(jax.vmap(functools.partial(ensemble_logits, apply, drop_every=1),
                         in_axes=(None, 0, 0)))
  fwd = jax.jit(jax.vmap(lambda p, xx: apply(p, state, xx)[0]))
  lsm = lambda a: a - a.max(-1, keepdims=True) - np.log(
      np.exp(a - a.max(-1, keepdims=True)).sum(-1, keepdims=True))
  st = hist[0][0]            # before round 0: no trained head, the client's own log-probabilities
  np.testing.assert_allclose(ens(st.server, st.clients, test.x),
                             lsm(np.asarray(fwd(st.clients['params'], test.x).logits)), atol=1e-5)
  st = hist[2][1]            # after round 2, which cut at stage index 0 (d = 1)
  ex = st.server.extra
  assert bool(ex['trained'][0])
  out = fwd(st.clients['params'], test.x)
  h = np.asarray(out.features['stage1'])                                  # [N, E, 6]
  want = lsm(np.asarray(out.logits)) + lsm(h @ np.asarray(ex['w'][0]) + np.asarray(ex['b'][0]))
  np.testing.assert_allclose(ens(st.server, st.clients, test.x), want, atol=1e-4)
  correct, count = make_ensemble_evaluate(apply, drop_every=1)(st, test)
  lab = np.asarray(test.label)
  np.testing.assert_array_equal(np.asarray(correct),
                                ((want.argmax(-1) == lab) & (lab >= 0)).sum(1))
  np.testing.assert_array_equal(np.asarray(count), (lab >= 0).sum(1))
  # The server head changes the prediction of some test example (it is not a no-op).
  assert (want.argmax(-1) != np.asarray(out.logits).argmax(-1))[lab >= 0].any()


def test_the_simulators_personal_evaluation_scores_the_ensemble_unless_predict_own():
  """``predict='ensemble'`` (the default) sets ``personal_logits``: the simulator's
  personalized and clients-on-global-test evaluations score :func:`ensemble_logits`;
  ``predict='own'`` scores each client's model alone."""
  from kdjax.federated.fedd2s import make_ensemble_evaluate
  apply, state, trainer, _, test, hist = _heads_run()
  st = hist[2][1]
  lab = np.asarray(test.label)
  kw = dict(num_classes=C, knowledge='heads', beta=BETA, drop_every=1, head_steps=5,
            head_lr=0.1, reps_per_client=8)
  ens = fedd2s(trainer, **kw)
  own = fedd2s(trainer, **kw, predict='own')
  assert ens.personal_logits is not None and own.personal_logits is None
  want, _ = make_ensemble_evaluate(apply, drop_every=1)(st, test)
  got, count = sim.make_personal_evaluate(ens, apply)(st, test)
  np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  fwd = jax.vmap(lambda p, xx: apply(p, state, xx)[0].logits)
  alone = ((np.asarray(fwd(st.clients['params'], test.x)).argmax(-1) == lab) & (lab >= 0)).sum(1)
  np.testing.assert_array_equal(np.asarray(sim.make_personal_evaluate(own, apply)(st, test)[0]),
                                alone)
  assert (alone != np.asarray(want)).any()   # the two predictions differ on this run
  # The clients on one shared set (the global test): the same scores, client by client.
  x, y = test.x.reshape(-1, *test.x.shape[2:]), test.label.reshape(-1)
  glob, _ = sim.make_clients_global_evaluate(ens, apply)(st, x, y)
  scores = np.asarray(jax.vmap(lambda cs: ens.personal_logits(st.server, cs, x))(st.clients))
  np.testing.assert_array_equal(np.asarray(glob),
                                ((scores.argmax(-1) == np.asarray(y)) & (np.asarray(y) >= 0)).sum(1))
  with pytest.raises(UserError, match='predict'):
    fedd2s(trainer, **kw, predict='both')
