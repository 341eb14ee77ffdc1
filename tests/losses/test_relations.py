"""Tests for the batch-level relation losses (RKD, PKT, SP, CC, CKA), CRD and TRG."""

import collections
import itertools
import math
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.losses import catalog
from kdjax.losses import crd
from kdjax.losses import relations
from kdjax.losses import trg


def objective(terms):
  """``build_objective`` with ``apply`` jitted (eager dispatch is slow on CPU)."""
  obj = build_objective(terms)
  return obj._replace(apply=jax.jit(obj.apply))


def jitted(module, **static):
  """The module's names, with the given functions jitted (eager dispatch is slow on CPU)."""
  ns = types.SimpleNamespace(**vars(module))
  for name, argnames in static.items():
    setattr(ns, name, jax.jit(getattr(module, name), static_argnames=argnames))
  return ns


R = jitted(relations, rkd_distance=(), rkd_angle=(), pkt=('eps', 'exclude_self', 'reduction'), similarity_preserving=(),
           correlation_congruence=('gamma', 'order', 'normalize'), linear_cka=())
C = jitted(crd, crd_loss=('temperature', 'symmetric'), crd_queue_loss=('temperature',))
G = jitted(trg, trg_loss=('k', 'temperature', 'context_temperature', 'context_weight',
                          'pool_to'))

@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  """Full-precision matmuls: the numpy references are float64, and TF32 on GPUs (the
  default there) is off by about 1e-4."""
  with jax.default_matmul_precision('highest'):
    yield


RTOL = 1e-5
ATOL = 1e-6


def rand(seed, shape, scale=1.0):
  return (np.random.default_rng(seed).standard_normal(shape) * scale).astype(np.float32)


# ----------------------------------------------------------------------- numpy references

def huber(x):
  a = np.abs(x)
  return np.where(a < 1, 0.5 * x * x, a - 0.5)


def np_rkd_distance(s, t):
  def psi(x):
    x = x.reshape(len(x), -1).astype(np.float64)
    n = len(x)
    d = np.array([[np.linalg.norm(x[i] - x[j]) for j in range(n)] for i in range(n)])
    off = ~np.eye(n, dtype=bool)
    return d / d[off].mean(), off
  ps, off = psi(s)
  pt, _ = psi(t)
  return huber(ps - pt)[off].mean()


def np_rkd_angle(s, t):
  def unit(v):
    n = np.linalg.norm(v)
    return v / n if n > 0 else v
  s = s.reshape(len(s), -1).astype(np.float64)
  t = t.reshape(len(t), -1).astype(np.float64)
  vals = []
  for i, j, k in itertools.permutations(range(len(s)), 3):
    a_s = unit(s[j] - s[i]) @ unit(s[k] - s[i])
    a_t = unit(t[j] - t[i]) @ unit(t[k] - t[i])
    vals.append(huber(a_s - a_t))
  return np.mean(vals)


def np_pkt(s, t, eps=1e-7, exclude_self=False, reduction='mean'):
  """PKT from its formula: kernel on x / (|x| + eps), row-normalized, KL(teacher || student)."""
  def cond(x):
    x = x.reshape(len(x), -1).astype(np.float64)
    n = len(x)
    p = np.zeros((n, n))
    for i in range(n):
      ks = {}
      for j in range(n):
        if j == i and exclude_self:
          continue
        a = x[i] / (np.linalg.norm(x[i]) + eps)
        b = x[j] / (np.linalg.norm(x[j]) + eps)
        ks[j] = (a @ b + 1) / 2
      total = sum(ks.values())
      for j, v in ks.items():
        p[i, j] = v / total
    return p
  ps, pt = cond(s), cond(t)
  n = len(s)
  total = 0.0
  for i in range(n):
    for j in range(n):
      if i != j or not exclude_self:
        total += pt[i, j] * np.log((pt[i, j] + eps) / (ps[i, j] + eps))
  if reduction == 'anchor':
    return total / n
  return total / (n * (n - 1) if exclude_self else n * n)


def np_sp(s, t):
  def g(x):
    x = x.reshape(len(x), -1).astype(np.float64)
    gm = x @ x.T
    return gm / np.linalg.norm(gm, axis=1, keepdims=True)
  n = len(s)
  return ((g(t) - g(s)) ** 2).sum() / n ** 2


def np_cc(s, t, gamma=0.4, order=2, normalize=True):
  def corr(x):
    x = x.reshape(len(x), -1).astype(np.float64)
    if normalize:
      x = x / np.linalg.norm(x, axis=1, keepdims=True)
    n = len(x)
    c = np.zeros((n, n))
    for i in range(n):
      for j in range(n):
        if order is None:
          c[i, j] = np.exp(-gamma * np.sum((x[i] - x[j]) ** 2))
        else:
          series = sum((2 * gamma * x[i] @ x[j]) ** p / math.factorial(p) for p in range(order + 1))
          c[i, j] = np.exp(-gamma * x[i] @ x[i]) * np.exp(-gamma * x[j] @ x[j]) * series
    return c
  n = len(s)
  return ((corr(t) - corr(s)) ** 2).sum() / n ** 2


def np_cka(s, t):
  # Feature-space form ||Y^T X||_F^2 / (||X^T X||_F ||Y^T Y||_F), independent of the
  # library's Gram form.
  x = s.reshape(len(s), -1).astype(np.float64)
  y = t.reshape(len(t), -1).astype(np.float64)
  x, y = x - x.mean(0), y - y.mean(0)
  return 1 - np.linalg.norm(y.T @ x) ** 2 / (np.linalg.norm(x.T @ x) * np.linalg.norm(y.T @ y))


BATCH_LOSSES = {
    'rkd_distance': (R.rkd_distance, np_rkd_distance),
    'rkd_angle': (R.rkd_angle, np_rkd_angle),
    'pkt': (R.pkt, np_pkt),
    'similarity_preserving': (R.similarity_preserving, np_sp),
    'correlation_congruence': (R.correlation_congruence, np_cc),
    'linear_cka': (R.linear_cka, np_cka),
}


@pytest.mark.parametrize('name', sorted(BATCH_LOSSES))
@pytest.mark.parametrize('shapes', [((5, 4), (5, 7)), ((4, 2, 3), (4, 2, 2, 2))])
def test_matches_numpy(name, shapes):
  fn, ref = BATCH_LOSSES[name]
  s, t = rand(1, shapes[0]), rand(2, shapes[1])
  got = fn(s, t)
  assert got.shape == () and got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref(s, t), rtol=RTOL, atol=ATOL)


@pytest.mark.parametrize('exclude_self', [False, True])
@pytest.mark.parametrize('reduction', ['mean', 'anchor'])
def test_pkt_options(exclude_self, reduction):
  s, t = rand(1, (5, 4)), rand(2, (5, 7))
  got = R.pkt(s, t, exclude_self=exclude_self, reduction=reduction)
  np.testing.assert_allclose(got, np_pkt(s, t, exclude_self=exclude_self, reduction=reduction),
                             rtol=RTOL, atol=ATOL)
  with pytest.raises(UserError, match='reduction'):
    relations.pkt(s, t, reduction='sum')


@pytest.mark.parametrize('order', [None, 0, 1, 3])
@pytest.mark.parametrize('normalize', [True, False])
def test_cc_orders_and_normalization(order, normalize):
  s, t = rand(1, (4, 3), 0.5), rand(2, (4, 5), 0.5)
  got = R.correlation_congruence(s, t, gamma=0.7, order=order, normalize=normalize)
  np.testing.assert_allclose(got, np_cc(s, t, 0.7, order, normalize), rtol=RTOL, atol=ATOL)


def test_cc_taylor_converges_to_exact_kernel():
  s, t = rand(1, (4, 3)), rand(2, (4, 5))
  exact = R.correlation_congruence(s, t, order=None)
  np.testing.assert_allclose(R.correlation_congruence(s, t, order=12), exact, rtol=1e-5)


@pytest.mark.parametrize('name', sorted(BATCH_LOSSES))
def test_masked_row_is_excluded_with_zero_gradient(name):
  fn, _ = BATCH_LOSSES[name]
  s, t = rand(1, (5, 4)), rand(2, (5, 6))
  where = np.array([True, True, False, True, True])
  s_bad, t_bad = s.copy(), t.copy()
  s_bad[2] = np.nan
  t_bad[2] = np.inf
  got = fn(s_bad, t_bad, where=where)
  np.testing.assert_allclose(got, fn(s[where], t[where]), rtol=RTOL, atol=ATOL)
  g = jax.grad(lambda s: fn(s, t_bad, where=where))(s_bad)
  assert np.all(np.asarray(g[2]) == 0.0) and np.all(np.isfinite(g))
  assert float(jnp.abs(g).sum()) > 0


@pytest.mark.parametrize('name', sorted(BATCH_LOSSES))
def test_grads(name):
  fn, _ = BATCH_LOSSES[name]
  s, t = rand(1, (4, 3)), rand(2, (4, 5))
  check_grads(lambda s: fn(s, t), (s,), order=1, modes=['rev'], atol=1e-2, rtol=1e-2)


@pytest.mark.parametrize('name', sorted(BATCH_LOSSES))
def test_extreme_zero_and_bf16(name):
  fn, ref = BATCH_LOSSES[name]
  s, t = rand(1, (4, 3)), rand(2, (4, 5))
  cases = [np.zeros_like(s), rand(3, (4, 3), 1e30), rand(3, (4, 3), 1e-30)]
  dup = s.copy()
  dup[1] = dup[0]                                        # coincident points
  zero_row = s.copy()
  zero_row[0] = 0.0                                      # a zero vector among others
  vg = jax.jit(jax.value_and_grad(lambda x: fn(x, t)))
  for x in cases + [dup, zero_row]:
    v, g = vg(x)
    assert np.isfinite(v) and np.all(np.isfinite(g)), name
  # Every loss here is invariant to the scale of the student features (PKT only above
  # its eps: the reference normalizes by |x| + eps).
  np.testing.assert_allclose(fn(s * 1e30, t), ref(s, t), rtol=1e-4, atol=1e-6)
  if name != 'pkt':
    np.testing.assert_allclose(fn(s * 1e-30, t), ref(s, t), rtol=1e-4, atol=1e-6)
  got = fn(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, ref(s, t), rtol=5e-2, atol=5e-3)


def test_known_values():
  x = np.array([[0., 0.], [1., 0.], [0., 1.]], np.float32)
  # Identical structure -> zero loss for every relation loss.
  for fn, _ in BATCH_LOSSES.values():
    assert abs(float(fn(x, x))) < 1e-6
  # CKA of a representation with an unrelated (orthogonal after centring) one is 1 - 0.
  a = np.array([[1.], [-1.], [1.], [-1.]], np.float32)
  b = np.array([[1.], [1.], [-1.], [-1.]], np.float32)
  assert float(R.linear_cka(a, b)) == pytest.approx(1.0, abs=1e-6)
  # A constant representation has no structure: loss 1, finite gradient.
  v, g = jax.value_and_grad(lambda s: R.linear_cka(s, b))(np.ones((4, 2), np.float32))
  assert float(v) == pytest.approx(1.0) and np.all(np.isfinite(g))


@pytest.mark.parametrize('name', sorted(BATCH_LOSSES))
def test_registered_batch_level_terms(name):
  spec = {s.name: s for s in catalog()}[name]
  assert spec.family == 'relation' and spec.batch_level and 'arXiv' in spec.reference
  fn, ref = BATCH_LOSSES[name]
  s, t = rand(1, (5, 4)), rand(2, (5, 6))
  where = np.array([True, False, True, True, True])
  inputs = {'student_features': {'a': s}, 'teacher_features': {'b': t}, 'where': where}
  obj = objective({'r': dict(loss=name, student='a', teacher='b')})
  params, state = obj.init(jax.random.key(0), inputs)
  loss, _, metrics = obj.apply(params, state, inputs)
  np.testing.assert_allclose(loss, ref(s[where], t[where]), rtol=RTOL, atol=ATOL)
  assert float(metrics['loss/r'][1]) == 1.0            # a scalar counts once


def test_batch_level_term_reduces_per_token_where_to_examples():
  s, t = rand(1, (3, 4, 2)), rand(2, (3, 4, 5))
  where = np.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 0, 0, 0]], bool)
  inputs = {'student_features': {'a': s}, 'teacher_features': {'a': t}, 'where': where}
  obj = objective({'r': dict(loss='similarity_preserving', student='a', teacher='a')})
  loss, _, _ = obj.apply(*obj.init(jax.random.key(0), inputs), inputs)
  keep = np.array([True, False, True])
  np.testing.assert_allclose(loss, np_sp(s[keep], t[keep]), rtol=RTOL)


# ----------------------------------------------------------------------- CRD

def np_embed(p, x):
  x = x.reshape(len(x), -1).astype(np.float64)
  z = x @ np.asarray(p['kernel'], np.float64) + np.asarray(p['bias'], np.float64)
  return z / np.linalg.norm(z, axis=1, keepdims=True)


def np_nce(anchor, positives, extra=None, temp=0.07):
  total = 0.0
  for i in range(len(anchor)):
    logits = [anchor[i] @ p / temp for p in positives]
    if extra is not None:
      logits += [anchor[i] @ q / temp for q in extra]
    logits = np.array(logits)
    total += -(logits[i] - np.log(np.exp(logits - logits.max()).sum()) - logits.max())
  return total / len(anchor)


@pytest.mark.parametrize('symmetric', [True, False])
def test_crd_in_batch_matches_numpy(symmetric):
  s, t = rand(1, (5, 4)), rand(2, (5, 2, 3))
  params = C.crd_init(jax.random.key(0), s.shape, t.shape, dim=3)
  params['student']['bias'] = jnp.asarray(rand(3, (3,)))
  zs, zt = np_embed(params['student'], s), np_embed(params['teacher'], t)
  want = np_nce(zs, zt, temp=0.5)
  if symmetric:
    want = want + np_nce(zt, zs, temp=0.5)      # both directions summed, as the reference
  got = C.crd_loss(params, s, t, temperature=0.5, symmetric=symmetric)
  np.testing.assert_allclose(got, want, rtol=RTOL)
  check_grads(lambda p: C.crd_loss(p, s, t, temperature=0.5), (params,), order=1,
              modes=['rev'], atol=1e-2, rtol=1e-2)


def test_crd_mask_extreme_bf16():
  s, t = rand(1, (5, 4)), rand(2, (5, 6))
  params = C.crd_init(jax.random.key(0), s.shape, t.shape, dim=3)
  where = np.array([True, True, False, True, True])
  s_bad = s.copy()
  s_bad[2] = np.nan
  got = C.crd_loss(params, s_bad, t, where=where)
  np.testing.assert_allclose(got, C.crd_loss(params, s[where], t[where]), rtol=RTOL)
  g = jax.grad(lambda s: C.crd_loss(params, s, t, where=where))(s_bad)
  assert np.all(np.asarray(g[2]) == 0.0) and np.all(np.isfinite(g))
  vg = jax.jit(jax.value_and_grad(lambda x: C.crd_loss(params, x, t)))
  for x in (np.zeros_like(s), s * 1e30, s * 1e-30):
    v, g = vg(x)
    assert np.isfinite(v) and np.all(np.isfinite(g))
  got = C.crd_loss(params, jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16))
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, C.crd_loss(params, s, t), rtol=5e-2)


def ring_contents(state):
  """Queue entries oldest -> newest (the ring read from ptr), valid ones only."""
  k = state.queue.shape[0]
  order = [(int(state.ptr) + i) % k for i in range(k)]
  return [np.asarray(state.queue[i]).tolist() for i in order if bool(state.valid[i])]


def test_crd_queue_fifo_semantics():
  k = 5
  state = C.crd_queue_init(k, 1)
  reference = collections.deque(maxlen=k)
  counter = 0
  pushes = [(3, None), (1, None), (4, [True, False, True, True]), (7, None), (0, None),
            (2, [False, False])]
  for n, mask in pushes:
    rows = np.arange(counter, counter + n, dtype=np.float32)[:, None]
    counter += n
    where = None if mask is None else np.array(mask)
    state = jax.jit(C.crd_queue_push)(state, rows, where)
    for i in range(n):
      if mask is None or mask[i]:
        reference.append([float(rows[i, 0])])
    assert ring_contents(state) == list(reference), (n, mask)
  assert int(state.valid.sum()) == k


def test_crd_queue_loss_uses_queue_as_negatives_and_pushes():
  s, t = rand(1, (3, 4)), rand(2, (3, 6))
  params = C.crd_init(jax.random.key(0), s.shape, t.shape, dim=3)
  state = C.crd_queue_init(4, 3)
  loss0, state = C.crd_queue_loss(params, state, s, t, temperature=0.5)
  zs, zt = np_embed(params['student'], s), np_embed(params['teacher'], t)
  np.testing.assert_allclose(loss0, np_nce(zs, zt, temp=0.5), rtol=RTOL)   # empty queue
  assert int(state.valid.sum()) == 3
  s2, t2 = rand(3, (3, 4)), rand(4, (3, 6))
  where = np.array([True, False, True])
  loss1, state2 = C.crd_queue_loss(params, state, s2, t2, temperature=0.5, where=where)
  zs2, zt2 = np_embed(params['student'], s2[where]), np_embed(params['teacher'], t2[where])
  np.testing.assert_allclose(loss1, np_nce(zs2, zt2, extra=zt, temp=0.5), rtol=RTOL)
  assert int(state2.valid.sum()) == 4                                      # 3 + 2, capped at 4
  # No gradient flows into the queued embeddings.
  g = jax.grad(lambda q: C.crd_queue_loss(params, state._replace(queue=q), s2, t2)[0])(
      state.queue)
  assert np.all(np.asarray(g) == 0.0)


@pytest.mark.parametrize('queue_size', [0, 6])
def test_crd_term(queue_size):
  s, t = rand(1, (4, 5)), rand(2, (4, 3))
  inputs = {'student_features': {'penultimate': s}, 'teacher_features': {'penultimate': t},
            'where': np.ones(4, bool)}
  obj = objective({'crd': dict(dim=4, temperature=0.2, queue_size=queue_size)})
  params, state = obj.init(jax.random.key(0), inputs)
  assert params['crd']['student']['kernel'].shape == (5, 4)
  assert params['crd']['teacher']['kernel'].shape == (3, 4)
  loss, new_state, _ = obj.apply(params, state, inputs)
  if queue_size:
    assert state['crd']['queue'].shape == (6, 4) and int(new_state['crd']['valid'].sum()) == 4
    loss2, newer, _ = obj.apply(params, new_state, inputs)
    assert int(newer['crd']['valid'].sum()) == 6 and int(newer['crd']['ptr']) == 2
    assert float(loss2) > float(loss)                      # more negatives, same positives
  else:
    assert new_state == {'crd': {}}
  g = jax.grad(lambda p: obj.apply(p, state, inputs)[0])(params)
  assert float(jnp.abs(g['crd']['student']['kernel']).sum()) > 0
  assert float(jnp.abs(g['crd']['teacher']['kernel']).sum()) > 0


def test_crd_nce_memory_writes_and_keeps_z():
  # Values, gradients, banks, Z and masks against the reference: test_feature_parity.py.
  b, n_data, k, dim = 4, 12, 5, 3
  s, t = rand(1, (b, 6)), rand(2, (b, 5))
  params = crd.crd_init(jax.random.key(0), s.shape, t.shape, dim=dim)
  mem = crd.crd_memory_init(jax.random.key(1), n_data, dim)
  # The reference's initialization: rows uniform in +-1/sqrt(dim/3) (about unit norm).
  assert float(jnp.abs(mem.student).max()) <= 1 / np.sqrt(dim / 3)
  ids = np.array([3, 7, 0, 11])
  contrast = np.random.default_rng(0).integers(0, n_data, (b, k))
  step = jax.jit(crd.crd_nce_loss)
  _, new = step(params, mem, s, t, ids, contrast)
  zs = np_embed(params['student'], s)
  row = 0.5 * np.asarray(mem.student[3]) + 0.5 * zs[0]
  np.testing.assert_allclose(new.student[3], row / np.linalg.norm(row), rtol=1e-5)
  untouched = np.setdiff1d(np.arange(n_data), ids)
  np.testing.assert_array_equal(new.student[untouched], mem.student[untouched])
  _, newer = step(params, new, s[::-1], t[::-1], ids, contrast)
  assert float(new.z_student) > 0 and float(newer.z_student) == float(new.z_student)


def test_crd_negative_sampler():
  labels_all = np.repeat(np.arange(3), [4, 5, 3])            # 12 examples, 3 classes
  key = jax.random.key(0)
  uni = np.asarray(jax.jit(crd.crd_sample_negatives, static_argnums=(1, 2, 3))(key, 64, 12, 7))
  assert uni.shape == (64, 7) and uni.min() >= 0 and uni.max() < 12
  assert len(np.unique(uni)) == 12                            # uniform over all examples
  # Other classes; 9 negatives: class 2 has 9 others (drawn without repeats), classes 0 and 1
  # have 8 and 7 (drawn with replacement, as the reference).
  labels = np.array([0, 1, 2, 2])
  idx = np.asarray(jax.jit(lambda key: crd.crd_sample_negatives(
      key, 4, 12, 9, labels=labels, dataset_labels=labels_all))(key))
  for i in range(4):
    assert np.all(labels_all[idx[i]] != labels[i])
  assert sorted(idx[2]) == sorted(idx[3]) == list(range(9))
  assert len(set(idx[1])) < 9
  with pytest.raises(UserError, match='one label per training example'):
    crd.crd_sample_negatives(key, 4, 12, 6, labels=labels, dataset_labels=labels_all[:5])


def test_crd_nce_term_state_and_errors():
  s, t = rand(1, (4, 5)), rand(2, (4, 3))
  inputs = {'student_features': {'penultimate': s}, 'teacher_features': {'penultimate': t},
            'where': np.ones(4, bool), 'labels': np.array([0, 1, 2, 1]),
            'example_ids': np.array([0, 5, 9, 2])}
  obj = objective({'crd': dict(objective='nce', n_data=10, nce_k=6, dim=4)})
  params, state = jax.jit(obj.init)(jax.random.key(0), inputs)
  assert state['crd']['student'].shape == (10, 4) and float(state['crd']['z_student']) < 0
  loss, new, metrics = obj.apply(params, state, inputs)
  assert np.isfinite(loss) and float(new['crd']['z_teacher']) > 0
  assert float(metrics['loss/crd'][1]) == 1.0
  assert not np.array_equal(new['crd']['rng'], state['crd']['rng'])   # fresh negatives
  no_ids = {k: v for k, v in inputs.items() if k != 'example_ids'}
  with pytest.raises(UserError, match="inputs\\['example_ids'\\]"):
    obj.apply(params, state, no_ids)
  with pytest.raises(UserError, match='n_data'):
    build_objective({'crd': dict(objective='nce')})
  with pytest.raises(UserError, match='objective'):
    build_objective({'crd': dict(objective='ntxent')})
  with pytest.raises(UserError, match='one label per training example'):
    build_objective({'crd': dict(objective='nce', n_data=10, dataset_labels=[0, 1])})


# ----------------------------------------------------------------------- TRG

def np_trg(s, t, k, temp, ctemp, cw, pos=None):
  b = s.shape[0]
  s = s.reshape(b, -1, s.shape[-1]).astype(np.float64)
  t = t.reshape(b, -1, t.shape[-1]).astype(np.float64)
  tl = s.shape[1]
  if pos is None:
    pos = np.ones((b, tl), bool)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)
  nodes = [(i, j) for i in range(b) for j in range(tl) if pos[i, j]]
  xs = np.stack([unit(s[i, j]) for i, j in nodes])
  xt = np.stack([unit(t[i, j]) for i, j in nodes])
  sim_s, sim_t = xs @ xs.T, xt @ xt.T
  kls = []
  for a in range(len(nodes)):
    others = [c for c in range(len(nodes)) if c != a]
    nb = sorted(others, key=lambda c: -sim_t[a, c])[:k]
    if not nb:
      continue
    lt = sim_t[a, nb] / temp
    ls = sim_s[a, nb] / temp
    pt = np_softmax(lt)
    kls.append((pt * (np.log(pt) - np.log(np_softmax(ls)))).sum())
  graph = np.mean(kls) if kls else 0.0
  ctx = []
  for i in range(b):
    idx = [j for j in range(tl) if pos[i, j]]
    if not idx:
      continue
    vs = np.stack([unit(s[i, j]) for j in idx])
    vt = np.stack([unit(t[i, j]) for j in idx])
    rows = []
    for a in range(len(idx)):
      others = [c for c in range(len(idx)) if c != a]
      if not others:
        continue
      pt = np_softmax(vt[a] @ vt[others].T / ctemp)
      ps = np_softmax(vs[a] @ vs[others].T / ctemp)
      rows.append((pt * (np.log(pt) - np.log(ps))).sum())
    ctx.append(np.mean(rows) if rows else 0.0)
  return graph + cw * np.mean(ctx)


def np_softmax(x):
  e = np.exp(x - x.max())
  return e / e.sum()


@pytest.mark.parametrize('k', [2, 5, 100])
def test_trg_matches_numpy(k):
  s, t = rand(1, (3, 2, 2, 4)), rand(2, (3, 2, 2, 6))
  got = G.trg_loss(s, t, k=k, temperature=0.5, context_temperature=0.3, context_weight=0.7)
  np.testing.assert_allclose(got, np_trg(s, t, k, 0.5, 0.3, 0.7), rtol=1e-5, atol=1e-6)


def test_trg_pools_larger_grid_and_token_mask():
  s, t = rand(1, (2, 4, 4, 3)), rand(2, (2, 2, 2, 5))
  pooled = s.reshape(2, 2, 2, 2, 2, 3).mean(axis=(2, 4))
  np.testing.assert_allclose(G.trg_loss(s, t, k=3), np_trg(pooled, t, 3, 0.1, 0.1, 1.0),
                             rtol=1e-5, atol=1e-6)
  s, t = rand(3, (2, 5, 3)), rand(4, (2, 5, 4))
  pos = np.array([[1, 1, 1, 0, 0], [1, 1, 0, 0, 0]], bool)
  s_bad = s.copy()
  s_bad[~pos] = np.nan
  got = G.trg_loss(s_bad, t, k=2, where=pos)
  np.testing.assert_allclose(got, np_trg(s, t, 2, 0.1, 0.1, 1.0, pos), rtol=1e-5, atol=1e-6)
  g = jax.grad(lambda s: G.trg_loss(s, t, k=2, where=pos))(s_bad)
  assert np.all(np.asarray(g)[~pos] == 0.0) and np.all(np.isfinite(g))


def test_trg_example_mask_grads_extremes_bf16_and_term():
  s, t = rand(1, (4, 3, 2)), rand(2, (4, 3, 5))
  where = np.array([True, False, True, True])
  s_bad = s.copy()
  s_bad[1] = np.nan
  got = G.trg_loss(s_bad, t, k=3, where=where)
  np.testing.assert_allclose(got, G.trg_loss(s[where], t[where], k=3), rtol=RTOL, atol=ATOL)
  g = jax.grad(lambda s: G.trg_loss(s, t, k=3, where=where))(s_bad)
  assert np.all(np.asarray(g[1]) == 0.0) and np.all(np.isfinite(g))
  check_grads(lambda s: G.trg_loss(s, t, k=3, temperature=0.5), (s,), order=1, modes=['rev'],
              atol=1e-2, rtol=1e-2)
  vg = jax.jit(jax.value_and_grad(lambda x: G.trg_loss(x, t, k=3)))
  for x in (np.zeros_like(s), s * 1e30, s * 1e-30):
    v, g = vg(x)
    assert np.isfinite(v) and np.all(np.isfinite(g))
  got = G.trg_loss(jnp.asarray(s, jnp.bfloat16), jnp.asarray(t, jnp.bfloat16), k=3)
  assert got.dtype == jnp.float32
  np.testing.assert_allclose(got, np_trg(s, t, 3, 0.1, 0.1, 1.0), rtol=0.1, atol=0.05)
  spec = {x.name: x for x in catalog()}['trg']
  assert spec.family == 'relation' and spec.batch_level
  inputs = {'student_features': {'stage3': s}, 'teacher_features': {'stage3': t},
            'where': where}
  obj = objective({'trg': dict(k=3, temperature=0.5)})
  loss, _, _ = obj.apply(*obj.init(jax.random.key(0), inputs), inputs)
  np.testing.assert_allclose(loss, np_trg(s[where], t[where], 3, 0.5, 0.1, 1.0), rtol=1e-5)
