"""The personalized baselines: local-only training and FedAvg + local fine-tuning.

local_only sends nothing and its clients' models equal an independent per-client
loop of plain minibatch SGD written here from the batching rule of
:mod:`kdjax.federated.local`; fedavg_ft's global model is FedAvg's and its
personalized accuracy equals fine-tuning the final global model per client (every client,
in an independent loop); both
run in the tiny sweep and show in its table against local_only.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import cli
from kdjax.errors import UserError
from kdjax.federated import packing
from kdjax.federated import partition
from kdjax.federated import simulator as sim
from kdjax.federated import sweep
from kdjax.federated.fedavg import fedavg
from kdjax.federated.fedavg_ft import fedavg_ft
from kdjax.federated.local import epoch_orders
from kdjax.federated.local import make_local_trainer
from kdjax.federated.local_only import local_only
from kdjax.models import create
from kdjax.models import functional

N, K, B, C, ROUNDS, LR = 5, 3, 4, 3, 3, 0.3
TINY = os.path.join(os.path.dirname(__file__), '..', '..', 'configs', 'fed',
                    'mnist1d_sweep.py') + ':tiny'


def _setup(epochs=2):
  rng = np.random.default_rng(0)
  y = rng.integers(0, C, 60).astype(np.int32)
  x = (np.eye(C, 5)[y] * 2 + rng.normal(size=(60, 5))).astype(np.float32)
  part = partition.dirichlet(y, N, 0.5, min_size=4, seed=0, test_fraction=0.25)
  train = packing.pack(x, y, part.train, multiple=B)
  test = packing.pack(x, y, part.test, multiple=B)
  apply, params, state = functional(create('mlp', num_classes=C, input_shape=(5,),
                                           hidden=(6,), seed=2))
  trainer = make_local_trainer(apply, batch_size=B, epochs=epochs, lr=LR)
  return train, test, apply, params, state, trainer


_GRADS = {}


def _sgd(apply, params, state, x, label, mask, rng, epochs):
  """Independent per-client loop: plain SGD on the mean cross-entropy of each batch.

  Batches follow the documented rule (real examples first in a seeded order, batches of
  B, a batch without real examples is skipped); everything else is written here.
  """
  order = np.asarray(epoch_orders(jax.random.fold_in(rng, 0), jnp.asarray(mask),
                                  epochs)).reshape(-1, B)
  if apply not in _GRADS:
    def loss(p, xb, yb, mb):
      logits = apply(p, state, xb, train=True)[0].logits
      ce = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(yb, 0))
      return jnp.sum(ce * mb) / jnp.sum(mb)
    _GRADS[apply] = jax.jit(jax.grad(loss))
  grad = _GRADS[apply]
  for idx in order:
    mb = np.asarray(mask)[idx].astype(np.float32)
    if mb.sum() == 0:
      continue
    g = grad(params, jnp.asarray(x[idx]), jnp.asarray(label[idx]), jnp.asarray(mb))
    params = jax.tree.map(lambda p, d: p - LR * d, params, g)
  return params


def _row(tree, k):
  return jax.tree.map(lambda a: a[k], tree)


def _run(alg, train, params, state, rounds=ROUNDS):
  rf = sim.make_round(alg, num_clients=N, clients_per_round=K, seed=1)
  st = sim.init_state(alg, params, state, N)
  data = jax.tree.map(jnp.asarray, train)
  cohorts = []
  for _ in range(rounds):
    st, info = rf(st, data)
    cohorts.append(np.asarray(info['cohort']))
  return st, cohorts


def test_local_only_sends_nothing_and_equals_an_independent_per_client_loop():
  jax.config.update('jax_default_matmul_precision', 'highest')
  train, test, apply, params, state, trainer = _setup()
  alg = local_only(trainer)
  st, cohorts = _run(alg, train, params, state)
  # 0 bytes: nothing uploaded, nothing downloaded.
  one = lambda t: jax.tree.map(lambda a: a[0], t)
  update = jax.eval_shape(alg.client_update, st.server, one(st.clients), one(train),
                          jax.random.key(0)).update
  assert sim.tree_bytes(update) == 0 and sim.tree_bytes(alg.download(st.server)) == 0
  # Every client: its own SGD in the rounds it was sampled, with the round's client key.
  for k in range(N):
    p = params
    for r, cohort in enumerate(cohorts):
      if k in cohort:
        key = sim.client_key(sim.round_key(1, r), k)
        p = _sgd(apply, p, state, train.x[k], train.label[k], train.mask[k], key,
                 trainer.epochs)
    got = _row(st.clients['params'], k)
    for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(p)):
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    if not any(k in c for c in cohorts):   # never sampled: the initial model
      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(params)):
        np.testing.assert_array_equal(a, b)
  # Personalized accuracy is each client's own model on its own test split.
  pc, pn = sim.make_personal_evaluate(alg, apply)(st, jax.tree.map(jnp.asarray, test))
  for k in range(N):
    n = int(test.count[k])
    logits = apply(_row(st.clients['params'], k), state, jnp.asarray(test.x[k, :n]),
                   train=False)[0].logits
    assert int(pc[k]) == int(np.sum(np.argmax(logits, -1) == test.label[k, :n]))
    assert int(pn[k]) == n


def test_fedavg_ft_global_is_fedavg_and_personal_is_finetuning_the_final_model():
  jax.config.update('jax_default_matmul_precision', 'highest')
  train, test, apply, params, state, trainer = _setup(epochs=1)
  alg = fedavg_ft(trainer, finetune_epochs=2)
  st, _ = _run(alg, train, params, state)
  g, _ = _run(fedavg(trainer), train, params, state)
  for a, b in zip(jax.tree.leaves(st.server.params), jax.tree.leaves(g.server.params)):
    np.testing.assert_array_equal(a, b)   # the same updates and keys: FedAvg bit for bit
  # Every client (sampled or not) fine-tunes the FINAL global model on its training split,
  # in an independent loop, and evaluates that on its test split.
  evaluate = sim.make_personal_evaluate(alg, apply, clients_per_chunk=2)   # 3 chunks, 1 padded
  pc, pn = evaluate(st, jax.tree.map(jnp.asarray, test), jax.tree.map(jnp.asarray, train), 1)
  correct = []
  for k in range(N):
    key = sim.finetune_key(1, ROUNDS, k)
    want = _sgd(apply, st.server.params, state, train.x[k], train.label[k], train.mask[k],
                key, 2)
    n = int(test.count[k])
    logits = apply(want, state, jnp.asarray(test.x[k, :n]), train=False)[0].logits
    correct.append(int(np.sum(np.argmax(logits, -1) == test.label[k, :n])))
    assert int(pn[k]) == n
  assert np.asarray(pc).astype(int).tolist() == correct
  # Fine-tuning changes what is evaluated (not the global model's own accuracy).
  tuned_params = alg.finetune(st.server, {}, jax.tree.map(lambda a: jnp.asarray(a[0]), train),
                              sim.finetune_key(1, ROUNDS, 0))[0]
  assert not np.allclose(tuned_params['head']['kernel'], st.server.params['head']['kernel'])
  with pytest.raises(ValueError, match='training split'):
    evaluate(st, jax.tree.map(jnp.asarray, test))
  with pytest.raises(UserError, match='finetune_epochs'):
    fedavg_ft(trainer, finetune_epochs=0)


def test_both_baselines_run_in_the_tiny_sweep_and_the_table_compares_to_local_only(tmp_path):
  workdir = str(tmp_path / 'sweep')
  grid = ['--config.grid.alpha=[0.5]', "--config.grid.algorithm=['local_only', 'fedavg_ft']",
          '--config.grid.seeds=[0, 1]', '--config.num_rounds=2', '--config.eval_every=2']
  assert cli.main(['fed', 'sweep', '--config', TINY, '--workdir', workdir, '--no-progress',
                   *grid]) == 0
  rows = json.load(open(os.path.join(workdir, 'results.json')))
  by = {(r['algorithm'], r['seed']): r for r in rows}
  assert by['local_only', 0]['bytes_total'] == by['local_only', 1]['bytes_total'] == 0
  assert by['fedavg_ft', 0]['bytes_total'] > 0
  summary = {s['algorithm']: s for s in sweep.summarize(rows)}
  want = np.mean([by['fedavg_ft', s]['personalized_accuracy_mean']
                  - by['local_only', s]['personalized_accuracy_mean'] for s in (0, 1)])
  assert summary['fedavg_ft']['personalized_vs_local_mean'] == pytest.approx(want)
  assert 'personalized_vs_local_mean' not in summary['local_only']
  md = open(os.path.join(workdir, 'summary.md')).read()
  assert 'personalized − local_only' in md
  assert f"{100 * want:+.1f}" in md.splitlines()[-1]
