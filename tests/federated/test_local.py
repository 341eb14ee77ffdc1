"""The shared local trainer's per-example extras: ``batch_extra`` rows meet their own
examples, ``loss_extra`` is added to the loss, ``batch_loss_mask`` scales its gradient."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kdjax.federated.local import epoch_orders
from kdjax.federated.local import make_local_trainer
from kdjax.models import create
from kdjax.models import functional

B, C, LR, BETA = 4, 3, 0.3, 0.7


def _setup():
  apply, params, state = functional(create('mlp', num_classes=C, input_shape=(5,),
                                           hidden=(6,), seed=4))
  rng = np.random.default_rng(2)
  x = rng.normal(size=(8, 5)).astype(np.float32)
  y = np.array([0, 1, 2, 1, 0, 2, -1, -1], np.int32)       # 6 real examples, 2 padding
  mask = y >= 0
  w = rng.normal(size=(8, C)).astype(np.float32)           # a per-example extra
  return apply, params, state, x, y, mask, w


def _extra(logits, w, m):
  """β · mean over real examples of <logits_i, w_i> (written here)."""
  m = m.astype(jnp.float32)
  return BETA * jnp.sum(jnp.sum(logits * w, -1) * m) / jnp.maximum(jnp.sum(m), 1.0)


def test_batch_extra_rows_follow_their_examples_and_loss_extra_is_added():
  jax.config.update('jax_default_matmul_precision', 'highest')
  apply, params, state, x, y, mask, w = _setup()
  trainer = make_local_trainer(apply, batch_size=B, epochs=2, lr=LR)
  head_only = jax.tree_util.tree_map_with_path(   # the extra term reaches the head only
      lambda path, _: 1.0 if 'head' in jax.tree_util.keystr(path) else 0.0, params)
  key = jax.random.key(5)
  res = jax.jit(lambda p: trainer.train(
      p, state, (jnp.asarray(x), jnp.asarray(y), jnp.asarray(mask), 6), key,
      batch_extra={'w': jnp.asarray(w)},
      loss_extra=lambda out, batch: _extra(out.logits, batch['w'], batch['mask']),
      batch_loss_mask=head_only))(params)

  # Independent loop: the documented batch order, plain SGD on CE + mask * extra.
  @jax.jit
  def step(p, xb, yb, mb, wb, scale):
    def ce(p):
      logits = apply(p, state, xb, train=True)[0].logits
      per = optax.softmax_cross_entropy_with_integer_labels(logits, jnp.maximum(yb, 0))
      return jnp.sum(per * mb) / jnp.sum(mb)
    ex = lambda p: _extra(apply(p, state, xb, train=True)[0].logits, wb, mb)
    g1, g2 = jax.grad(ce)(p), jax.grad(ex)(p)
    return jax.tree.map(lambda a, u, v, s: a - LR * (u + scale * s * v), p, g1, g2, head_only)

  order = np.asarray(epoch_orders(jax.random.fold_in(key, 0), jnp.asarray(mask), 2)).reshape(-1, B)
  refs = []
  for scale in (1.0, 0.0):
    p, steps = params, 0
    for idx in order:
      if not mask[idx].any():
        continue
      p = step(p, x[idx], y[idx], mask[idx].astype(np.float32), w[idx], scale)
      steps += 1
    refs.append(p)
  assert int(res.num_steps) == steps == 4
  for a, b in zip(jax.tree.leaves(res.params), jax.tree.leaves(refs[0])):
    np.testing.assert_allclose(a, b, atol=1e-6)
  # The extra term did move the head (the reference without it is elsewhere).
  assert float(jnp.max(jnp.abs(refs[1]['head']['kernel'] - res.params['head']['kernel']))) > 1e-3
