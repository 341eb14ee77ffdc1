r"""After TRG: distillation through a token-level relationship graph plus a contextual loss.

Built after TRG (Zhang, Liu, He 2023), not a reproduction of it. TRG distils the
relations between *tokens* (patches of a ViT, cells of a CNN feature map) rather than
between whole examples, and adds a token-wise *contextual loss* for the relations
inside each instance. The paper's method section could not be consulted in full for
this implementation; the parts below follow its abstract and published summaries, and
the concrete choices are ours:

* **Nodes.** Every valid token of every valid example in the batch, in each
  network's own feature space (so student and teacher widths may differ). A feature
  ``[B, H, W, C]`` gives ``H W`` tokens; if the two token grids differ, the larger is
  adaptive-average-pooled to the smaller (:mod:`kdjax.losses.projectors`).
* **Graph.** Edges from each node to its ``k`` nearest neighbours under the
  *teacher's* cosine similarity (self excluded), shared by both graphs. On each node
  the neighbour similarities define a distribution,
  :math:`P(j \mid i) = \mathrm{softmax}_{j \in N_k(i)}(\cos(x_i, x_j) / \tau)`.
* **Graph loss.** :math:`\mathcal{L}_{g} = \frac{1}{|V|}\sum_{i \in V}
  \mathrm{KL}(P^t(\cdot\mid i) \,\|\, P^s(\cdot\mid i))` over the nodes :math:`V`.
  It spans examples, so it is batch-level.
* **Contextual loss.** Inside each instance, every token's similarity distribution
  over the *other* tokens of the same instance,
  :math:`C(j \mid i) = \mathrm{softmax}_{j \ne i}(\cos(x_i, x_j) / \tau_c)`, matched by
  KL and averaged over tokens, then over valid instances.
* **TRG loss.** :math:`\mathcal{L} = \mathcal{L}_g + \lambda_c \mathcal{L}_c`
  (a batch-level scalar).

Memory is :math:`O((BT)^2)` for the graph; pool large token grids first
(``pool_to``) or distil a later stage.

References:
  Zhang, Liu, He. Knowledge Distillation via Token-level Relationship Graph.
  arXiv:2306.12442, 2023.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp

from kdjax.losses import _feature_inputs as fi
from kdjax.losses import projectors
from kdjax.losses.registry import register
from kdjax.losses.registry import stateless

_NEG = -1e30
# Cosine similarities are divided by temperatures of ~0.1: TF32 or bfloat16 matmul passes
# (the default on some accelerators) would put percent-level errors into the softmaxes.
_HIGHEST = jax.lax.Precision.HIGHEST


def _tokens(student, teacher, where, pool_to):
  """``(s [B, T, Ds], t [B, T, Dt], token mask [B, T], example mask [B])``."""
  s, t = fi.f32(student), fi.f32(teacher)
  if s.ndim < 3 or t.ndim < 3:
    raise ValueError(f'trg needs token or spatial features [B, ..., C]; got {s.shape}, {t.shape}')
  pos = None
  if where is not None and jnp.ndim(where) > 1:
    if s.shape[:-1] != t.shape[:-1] or jnp.shape(where) != s.shape[:-1]:
      raise ValueError(f'a per-token where {jnp.shape(where)} needs student and teacher '
                       f'features with those tokens; got {s.shape} and {t.shape}')
    if pool_to is not None:
      raise ValueError('trg: pool_to cannot be combined with a per-token where')
    pos = jnp.asarray(where).astype(bool)
  ex = fi.example_mask(where, s.shape[0])
  s, t = fi.zero_masked(s, ex), fi.zero_masked(t, ex)
  if pos is not None:
    s, t = fi.zero_masked(s, pos), fi.zero_masked(t, pos)
  else:
    s, t = projectors.match_spatial(s, t)
    if pool_to is not None:
      target = tuple(min(a, b) for a, b in zip(s.shape[1:-1], tuple(pool_to)))
      s, t = projectors.adaptive_avg_pool(s, target), projectors.adaptive_avg_pool(t, target)
  b = s.shape[0]
  s, t = s.reshape(b, -1, s.shape[-1]), t.reshape(b, -1, t.shape[-1])
  pos = (jnp.broadcast_to(ex[:, None], s.shape[:2]) if pos is None
         else jnp.logical_and(pos.reshape(b, -1), ex[:, None]))
  return s, t, pos, ex


def _kl_masked(log_p, log_q, mask):
  """Row-wise ``sum_j p (log p - log q)`` over ``mask``; rows sum to 1 over ``mask``."""
  p = jnp.where(mask, jnp.exp(log_p), 0.0)
  return jnp.sum(jnp.where(mask, p * (log_p - log_q), 0.0), axis=-1)


def token_graph_loss(student_tokens: jax.Array, teacher_tokens: jax.Array,
                     token_mask: jax.Array, *, k: int = 8,
                     temperature: float = 0.1) -> jax.Array:
  r"""The token-graph term :math:`\mathcal{L}_g` on ``[B, T, D]`` tokens (scalar).

  >>> x = jax.random.normal(jax.random.key(0), (2, 4, 3))
  >>> float(token_graph_loss(x, x, jnp.ones((2, 4), bool), k=3))
  0.0
  """
  b, t = token_mask.shape
  xs = fi.l2_normalize(student_tokens.reshape(b * t, -1))
  xt = fi.l2_normalize(teacher_tokens.reshape(b * t, -1))
  node = token_mask.reshape(-1)
  n = b * t
  edge = node[:, None] & node[None, :] & ~jnp.eye(n, dtype=bool)
  sim_t = jnp.where(edge, jnp.matmul(xt, xt.T, precision=_HIGHEST), _NEG)
  sim_s = jnp.matmul(xs, xs.T, precision=_HIGHEST)
  kk = min(k, n - 1)
  top_t, idx = jax.lax.top_k(jax.lax.stop_gradient(sim_t), kk)   # teacher's neighbours
  nb = jnp.take_along_axis(edge, idx, axis=1)                     # False if fewer than k
  top_t = jnp.take_along_axis(sim_t, idx, axis=1)
  top_s = jnp.take_along_axis(sim_s, idx, axis=1)
  log_pt = jax.nn.log_softmax(jnp.where(nb, top_t / temperature, _NEG), axis=-1)
  log_ps = jax.nn.log_softmax(jnp.where(nb, top_s / temperature, _NEG), axis=-1)
  kl = _kl_masked(log_pt, log_ps, nb)
  has = jnp.logical_and(node, jnp.any(nb, axis=-1))
  return jnp.sum(jnp.where(has, kl, 0.0)) / jnp.maximum(jnp.sum(has.astype(jnp.float32)), 1.0)


def contextual_loss(student_tokens: jax.Array, teacher_tokens: jax.Array,
                    token_mask: jax.Array, *, temperature: float = 0.1) -> jax.Array:
  r"""The per-instance contextual term, ``[B]``: mean over tokens of
  :math:`\mathrm{KL}(C^t(\cdot\mid i) \| C^s(\cdot\mid i))` (see the module doc).

  >>> x = jax.random.normal(jax.random.key(0), (2, 4, 3))
  >>> contextual_loss(x, x, jnp.ones((2, 4), bool)).tolist()
  [0.0, 0.0]
  """
  xs = fi.l2_normalize(student_tokens)
  xt = fi.l2_normalize(teacher_tokens)
  t = token_mask.shape[1]
  pair = token_mask[:, :, None] & token_mask[:, None, :] & ~jnp.eye(t, dtype=bool)[None]
  log_pt = jax.nn.log_softmax(
      jnp.where(pair, jnp.einsum('bid,bjd->bij', xt, xt, precision=_HIGHEST) / temperature,
                _NEG), axis=-1)
  log_ps = jax.nn.log_softmax(
      jnp.where(pair, jnp.einsum('bid,bjd->bij', xs, xs, precision=_HIGHEST) / temperature,
                _NEG), axis=-1)
  kl = _kl_masked(log_pt, log_ps, pair)                          # [B, T]
  rows = jnp.logical_and(token_mask, jnp.any(pair, axis=-1))
  count = jnp.sum(rows.astype(jnp.float32), axis=1)
  return jnp.sum(jnp.where(rows, kl, 0.0), axis=1) / jnp.maximum(count, 1.0)


def trg_loss(student: jax.Array, teacher: jax.Array, *, k: int = 8, temperature: float = 0.1,
        context_temperature: float = 0.1, context_weight: float = 1.0,
        pool_to: Sequence[int] | None = None, where: jax.Array | None = None) -> jax.Array:
  r"""TRG loss: token-graph term plus contextual term (batch-level scalar).

  .. math::

    \mathcal{L} = \frac{1}{|V|} \sum_{i \in V}
      \mathrm{KL}\big(P^t(\cdot \mid i) \,\|\, P^s(\cdot \mid i)\big)
      + \lambda_c \frac{1}{n} \sum_{b} \frac{1}{T_b} \sum_{i \in b}
      \mathrm{KL}\big(C^t(\cdot \mid i) \,\|\, C^s(\cdot \mid i)\big)

  with :math:`P(j \mid i)` the softmax of cosine similarities over the teacher's
  :math:`k` nearest tokens of token :math:`i` in the whole batch, and :math:`C(j
  \mid i)` the softmax over the other tokens of the same instance (module docstring).

  Args:
    student: ``[B, T, D_s]`` tokens or ``[B, H, W, C_s]`` feature maps.
    teacher: ``[B, T, D_t]`` or ``[B, H, W, C_t]``.
    k: neighbours per token in the graph.
    temperature: :math:`\tau` of the graph distributions.
    context_temperature: :math:`\tau_c` of the contextual distributions.
    context_weight: :math:`\lambda_c`.
    pool_to: optional token grid to pool both features to first (e.g. ``(4, 4)``).
    where: ``[B]`` example mask or ``[B, T]`` token mask (tokens features only).

  Returns:
    A float32 scalar.

  References:
    Zhang, Liu, He. Knowledge Distillation via Token-level Relationship Graph.
    arXiv:2306.12442, 2023.

  >>> x = jax.random.normal(jax.random.key(0), (3, 2, 2, 4))
  >>> round(float(trg_loss(x, x)), 6)
  0.0
  """
  s, t, pos, ex = _tokens(student, teacher, where, pool_to)
  graph = token_graph_loss(s, t, pos, k=k, temperature=temperature)
  context = contextual_loss(s, t, pos, temperature=context_temperature)
  n = jnp.sum(ex.astype(jnp.float32))
  context = jnp.sum(jnp.where(ex, context, 0.0)) / jnp.maximum(n, 1.0)
  return graph + context_weight * context


@register('trg', family='relation', needs=('student_features', 'teacher_features'),
          batch_level=True,
          reference='After Zhang, Liu & He, Knowledge Distillation via Token-level '
                    'Relationship Graph, arXiv:2306.12442, 2023 (built from the abstract and '
                    'summaries; graph and contextual terms are kdjax\'s choices)')
def trg_term(student: str = 'stage3', teacher: str = 'stage3', k: int = 8,
             temperature: float = 0.1, context_temperature: float = 0.1,
             context_weight: float = 1.0, pool_to: Sequence[int] | None = None):
  """After TRG: token-level relationship graph + contextual loss on token features (batch-level)."""
  def fn(inputs):
    s = fi.feature(inputs, 'student', student, 'trg')
    t = fi.feature(inputs, 'teacher', teacher, 'trg')
    where = inputs.get('where')
    if where is not None and not (jnp.ndim(where) > 1 and jnp.shape(where) == s.shape[:-1]
                                  == t.shape[:-1]):
      where = fi.example_mask(where, s.shape[0])
    return trg_loss(s, t, k=k, temperature=temperature, context_temperature=context_temperature,
               context_weight=context_weight, pool_to=pool_to, where=where)
  return stateless(fn)
