"""Relation-based distillation losses: the structure of a batch, not single examples.

Every loss here is **batch-level**: it returns a float32 scalar computed from the
pairwise (or triplet) structure of the batch, and is registered with
``batch_level=True``. ``where`` (``[batch]`` bool, or ``[batch, ...]`` reduced to
"any valid") removes examples from that structure: the loss with a masked row equals
the loss on the batch without it, and the gradient with respect to the masked row
is exactly zero. Features of any rank are flattened to ``[batch, dim]``; student and
teacher widths may differ. Everything is computed in float32; the losses invariant
to the scale of the features (all but CC with ``normalize=False``, and PKT, whose
normalization ``x / (||x|| + eps)`` is the reference code's) first
rescale the batch by its largest magnitude, so huge and tiny features stay in range.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from kdjax.errors import UserError
from kdjax.losses import _feature_inputs as fi
from kdjax.losses.registry import register
from kdjax.losses.registry import stateless

_FEATURES = ('student_features', 'teacher_features')


def _prepare(x, where):
  """``(x [B, D] float32 with masked rows zeroed, mask [B], valid count)``."""
  x = fi.flatten_examples(x)
  m = fi.example_mask(where, x.shape[0])
  return fi.zero_masked(x, m), m, jnp.sum(m.astype(jnp.float32))


def _masked_mean(values, mask):
  mask = jnp.broadcast_to(mask, values.shape)
  total = jnp.sum(jnp.where(mask, values, 0.0))
  return total / jnp.maximum(jnp.sum(mask.astype(jnp.float32)), 1.0)


def _huber(x):
  """Smooth L1 (Huber with delta 1): ``x^2 / 2`` for ``|x| < 1``, else ``|x| - 1/2``."""
  a = jnp.abs(x)
  return jnp.where(a < 1.0, 0.5 * x * x, a - 0.5)


def _pair_mask(m):
  b = m.shape[0]
  return m[:, None] & m[None, :] & ~jnp.eye(b, dtype=bool)


# =========================================================================== RKD

def _normalized_distances(x, m):
  x, _ = fi.rescale(x)                             # distance ratios are scale-free
  diff = x[:, None, :] - x[None, :, :]
  d = fi.safe_sqrt(fi.sq_norm(diff))
  pairs = _pair_mask(m)
  mu = _masked_mean(d, pairs)
  return d / jnp.where(mu > 0, mu, 1.0), pairs


def rkd_distance(student: jax.Array, teacher: jax.Array, *,
                 where: jax.Array | None = None) -> jax.Array:
  r"""RKD distance-wise loss (batch-level scalar).

  With :math:`\psi_D(x_i, x_j) = \lVert x_i - x_j \rVert / \mu`, :math:`\mu` the mean
  distance over the ordered pairs :math:`i \ne j` of valid examples,

  .. math::

    \mathcal{L} = \frac{1}{n(n-1)} \sum_{i \ne j}
      \ell_\delta\big(\psi_D(s_i, s_j) - \psi_D(t_i, t_j)\big)

  with :math:`\ell_\delta` the Huber (smooth-L1, :math:`\delta = 1`) loss. (The
  reference code averages over all :math:`n^2` entries, diagonal included; dividing by
  :math:`n(n-1)` instead only changes the scale by :math:`n / (n - 1)`.)

  Args:
    student: ``[B, ...]`` embeddings.
    teacher: ``[B, ...]`` embeddings (any width).
    where: ``[B]`` example mask.

  Returns:
    A float32 scalar.

  References:
    Park, Kim, Lu, Cho. Relational Knowledge Distillation. CVPR 2019.
    arXiv:1904.05068.

  >>> x = jnp.array([[0., 0.], [1., 0.], [0., 2.]])
  >>> float(rkd_distance(x, 3 * x))  # distance ratios are scale-free
  0.0
  """
  s, m, _ = _prepare(student, where)
  t, _, _ = _prepare(teacher, m)
  ps, pairs = _normalized_distances(s, m)
  pt, _ = _normalized_distances(t, m)
  return _masked_mean(_huber(ps - pt), pairs)


def _angles(x):
  x, _ = fi.rescale(x)
  e = fi.l2_normalize(x[None, :, :] - x[:, None, :])    # e[i, j] = unit(x_j - x_i)
  return jnp.einsum('ijd,ikd->ijk', e, e)


def rkd_angle(student: jax.Array, teacher: jax.Array, *,
              where: jax.Array | None = None) -> jax.Array:
  r"""RKD angle-wise loss (batch-level scalar).

  With :math:`\psi_A(x_i, x_j, x_k) = \langle e_{ij}, e_{ik} \rangle`, the cosine of
  the angle at :math:`x_i`, :math:`e_{ij} = (x_j - x_i) / \lVert x_j - x_i \rVert`,

  .. math::

    \mathcal{L} = \frac{1}{n(n-1)(n-2)} \sum_{i, j, k \text{ distinct}}
      \ell_\delta\big(\psi_A(s_i, s_j, s_k) - \psi_A(t_i, t_j, t_k)\big)

  over triplets of valid examples (the reference code averages over all :math:`n^3`
  index triplets, degenerate ones included). Memory is :math:`O(B^3 + B^2 D)`.

  Args:
    student: ``[B, ...]`` embeddings.
    teacher: ``[B, ...]`` embeddings.
    where: ``[B]`` example mask.

  Returns:
    A float32 scalar.

  References:
    Park, Kim, Lu, Cho. Relational Knowledge Distillation. CVPR 2019.
    arXiv:1904.05068.

  >>> x = jnp.array([[0., 0.], [1., 0.], [0., 2.], [1., 1.]])
  >>> round(float(rkd_angle(x, 2 * x + 1)), 6)  # angles survive scaling and shifts
  0.0
  """
  s, m, _ = _prepare(student, where)
  t, _, _ = _prepare(teacher, m)
  b = s.shape[0]
  eye = jnp.eye(b, dtype=bool)
  distinct = ~eye[:, :, None] & ~eye[:, None, :] & ~eye[None, :, :]
  valid = m[:, None, None] & m[None, :, None] & m[None, None, :] & distinct
  return _masked_mean(_huber(_angles(s) - _angles(t)), valid)


# =========================================================================== PKT

PKT_REDUCTIONS = ('mean', 'anchor')


def _pkt_conditionals(x, pairs, eps):
  # The reference's normalization x / (||x|| + eps), with an overflow-safe norm.
  xn = x / (fi.safe_norm(x, keepdims=True) + eps)
  k = jnp.where(pairs, (xn @ xn.T + 1.0) / 2.0, 0.0)
  row = jnp.sum(k, axis=1, keepdims=True)
  return k / jnp.where(row > 0, row, 1.0)


def pkt(student: jax.Array, teacher: jax.Array, *, where: jax.Array | None = None,
        eps: float = 1e-7, exclude_self: bool = False, reduction: str = 'mean') -> jax.Array:
  r"""Probabilistic knowledge transfer with the cosine-similarity kernel (batch-level).

  With :math:`\hat x = x / (\lVert x \rVert + \epsilon)`, the kernel
  :math:`K_{ij} = (\langle \hat x_i, \hat x_j \rangle + 1) / 2 \in [0, 1]` and the
  conditional probabilities :math:`p_{j|i} = K_{ij} / \sum_k K_{ik}` over the valid
  examples,

  .. math::

    \mathcal{L} = \frac{1}{n^2} \sum_{i, j}
      p^t_{j|i} \log \frac{p^t_{j|i} + \epsilon}{p^s_{j|i} + \epsilon}

  (``reduction='mean'``, the default): the reference code's value, self-pairs
  :math:`j = i` included in the sums and the double sum divided by :math:`n^2`, so its
  weight (30000 in RepDistiller) carries over. ``exclude_self=True`` leaves
  :math:`j = i` out of :math:`p_{j|i}` and of the sum (the paper's definition; the
  mean is then over the :math:`n(n-1)` pairs); ``reduction='anchor'`` sums over
  :math:`j` and averages over the anchors :math:`i` (:math:`n` times the ``'mean'``
  value with self-pairs, :math:`n - 1` times without), a KL divergence per anchor.

  Args:
    student: ``[B, ...]`` embeddings.
    teacher: ``[B, ...]`` embeddings.
    where: ``[B]`` example mask.
    eps: :math:`\epsilon`.
    exclude_self: leave the self-pairs out.
    reduction: ``'mean'`` over the pairs or ``'anchor'`` (sum over :math:`j`, mean over
      :math:`i`).

  Returns:
    A float32 scalar.

  References:
    Passalis, Tefas. Learning Deep Representations with Probabilistic Knowledge
    Transfer. ECCV 2018. arXiv:1803.10837. Reference code: HobbitLong/RepDistiller
    ``distiller_zoo/PKT.py`` (from the authors' passalis/probabilistic_kt).

  >>> x = jnp.array([[1., 0.], [0., 1.], [1., 1.]])
  >>> round(float(pkt(x, 5 * x)), 6)
  0.0
  """
  if reduction not in PKT_REDUCTIONS:
    raise UserError(f'pkt: reduction must be one of {PKT_REDUCTIONS}; got {reduction!r}')
  s, m, n = _prepare(student, where)
  t, _, _ = _prepare(teacher, m)
  pairs = _pair_mask(m) if exclude_self else m[:, None] & m[None, :]
  ps = _pkt_conditionals(s, pairs, eps)
  pt = _pkt_conditionals(t, pairs, eps)
  terms = jnp.where(pairs, pt * (jnp.log(pt + eps) - jnp.log(ps + eps)), 0.0)
  if reduction == 'anchor':
    count = n
  else:
    count = n * (n - 1.0) if exclude_self else n * n
  return jnp.sum(terms) / jnp.maximum(count, 1.0)


# =========================================================================== SP

def _sp_gram(x):
  x, _ = fi.rescale(x)
  return fi.l2_normalize(x @ x.T, axis=-1)


def similarity_preserving(student: jax.Array, teacher: jax.Array, *,
                          where: jax.Array | None = None) -> jax.Array:
  r"""Similarity-preserving KD (batch-level scalar).

  With :math:`G = F F^\top` the batch Gram matrix of the flattened features and
  :math:`\tilde G` its rows L2-normalized,

  .. math::

    \mathcal{L} = \frac{1}{n^2} \big\lVert \tilde G^t - \tilde G^s \big\rVert_F^2

  over the :math:`n` valid examples. (The paper sums this over layer pairs and
  weights it by :math:`\gamma`; use one term per pair and the term weight.)

  Args:
    student: ``[B, ...]`` features (flattened per example).
    teacher: ``[B, ...]`` features.
    where: ``[B]`` example mask.

  Returns:
    A float32 scalar.

  References:
    Tung, Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019.
    arXiv:1907.09682.

  >>> x = jnp.array([[1., 0.], [0., 1.], [1., 1.]])
  >>> float(similarity_preserving(x, 10 * x))
  0.0
  """
  s, m, n = _prepare(student, where)
  t, _, _ = _prepare(teacher, m)
  return jnp.sum(jnp.square(_sp_gram(t) - _sp_gram(s))) / jnp.maximum(n * n, 1.0)


# =========================================================================== CC

def _cc_matrix(x, gamma, order, normalize):
  if normalize:
    x = fi.l2_normalize(x)
  sq = fi.sq_norm(x)
  if order is None:
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * (x @ x.T), 0.0)
    return jnp.exp(-gamma * d2)
  # exp(-g|a-b|^2) = exp(-g|a|^2) exp(-g|b|^2) exp(2g a.b), the last factor expanded
  # to ``order``: sum_p (2g a.b)^p / p!.
  dot = 2.0 * gamma * (x @ x.T)
  series = sum(dot ** p / math.factorial(p) for p in range(order + 1))
  scale = jnp.exp(-gamma * sq)
  return scale[:, None] * scale[None, :] * series


def correlation_congruence(student: jax.Array, teacher: jax.Array, *, gamma: float = 0.4,
                           order: int | None = 2, normalize: bool = True,
                           where: jax.Array | None = None) -> jax.Array:
  r"""Correlation congruence (CCKD) with a Gaussian RBF kernel (batch-level scalar).

  The correlation between two embeddings is the Gaussian kernel
  :math:`k(a, b) = \exp(-\gamma \lVert a - b \rVert^2)`, approximated as in the paper
  by a Taylor expansion of order :math:`P` of its cross term:

  .. math::

    k(a, b) \approx e^{-\gamma\lVert a\rVert^2} e^{-\gamma\lVert b\rVert^2}
      \sum_{p=0}^{P} \frac{(2\gamma\, a^\top b)^p}{p!},
    \qquad
    \mathcal{L} = \frac{1}{n^2} \sum_{i,j} \big(C^t_{ij} - C^s_{ij}\big)^2

  over valid :math:`i, j` (diagonal included). With ``normalize`` (default, as in the
  paper) the embeddings are L2-normalized first, so the prefactor is
  :math:`e^{-2\gamma}`; ``order=None`` uses the exact kernel.

  Args:
    student: ``[B, ...]`` embeddings (in the paper, after a linear embedding layer
      to a common width; any widths work here).
    teacher: ``[B, ...]`` embeddings.
    gamma: :math:`\gamma` (paper default 0.4).
    order: :math:`P` (paper default 2), or ``None`` for the exact kernel.
    normalize: L2-normalize embeddings first.
    where: ``[B]`` example mask.

  Returns:
    A float32 scalar.

  References:
    Peng, Jin, Liu, Li, Wu, Liu, Zhou, Zhang. Correlation Congruence for Knowledge
    Distillation. ICCV 2019. arXiv:1904.01802.

  >>> x = jnp.array([[1., 0.], [0., 1.], [1., 1.]])
  >>> float(correlation_congruence(x, 4 * x))  # normalized: scale-free
  0.0
  """
  s, m, n = _prepare(student, where)
  t, _, _ = _prepare(teacher, m)
  pairs = m[:, None] & m[None, :]
  diff = _cc_matrix(t, gamma, order, normalize) - _cc_matrix(s, gamma, order, normalize)
  return jnp.sum(jnp.where(pairs, jnp.square(diff), 0.0)) / jnp.maximum(n * n, 1.0)


# =========================================================================== CKA

def _centered_gram(x, m, n):
  mean = jnp.sum(x, axis=0, keepdims=True) / jnp.maximum(n, 1.0)
  xc = fi.zero_masked(x - mean, m)
  xc, _ = fi.rescale(xc)                           # CKA is scale-free
  return xc @ xc.T


def linear_cka(student: jax.Array, teacher: jax.Array, *,
               where: jax.Array | None = None) -> jax.Array:
  r"""One minus linear CKA between the batch representations (batch-level scalar).

  With :math:`X, Y` the column-centred ``[n, D]`` matrices of valid examples,

  .. math::

    \mathrm{CKA}(X, Y) = \frac{\lVert Y^\top X \rVert_F^2}
      {\lVert X^\top X \rVert_F \, \lVert Y^\top Y \rVert_F}
      = \frac{\langle X X^\top, Y Y^\top \rangle_F}
      {\lVert X X^\top \rVert_F \lVert Y Y^\top \rVert_F},
    \qquad \mathcal{L} = 1 - \mathrm{CKA}(X, Y) .

  Computed with the ``[n, n]`` Gram form. A constant representation has no
  similarity structure: its CKA is taken as 0 (loss 1).

  Args:
    student: ``[B, ...]`` features (flattened per example).
    teacher: ``[B, ...]`` features.
    where: ``[B]`` example mask.

  Returns:
    A float32 scalar in ``[0, 1]``.

  References:
    Kornblith, Norouzi, Lee, Hinton. Similarity of Neural Network Representations
    Revisited. ICML 2019. arXiv:1905.00414.

  >>> x = jnp.array([[1., 0.], [0., 1.], [1., 1.]])
  >>> abs(round(float(linear_cka(x, 3 * x + 2)), 6))
  0.0
  """
  s, m, n = _prepare(student, where)
  t, _, _ = _prepare(teacher, m)
  ks, kt = _centered_gram(s, m, n), _centered_gram(t, m, n)
  num = jnp.sum(ks * kt)
  den = fi.safe_norm(ks.reshape(-1)) * fi.safe_norm(kt.reshape(-1))
  ok = den > 0
  return 1.0 - jnp.where(ok, num / jnp.where(ok, den, 1.0), 0.0)


# =========================================================================== terms

def _relation_term(loss_fn, name, student, teacher, **options):
  def fn(inputs):
    s = fi.feature(inputs, 'student', student, name)
    t = fi.feature(inputs, 'teacher', teacher, name)
    where = inputs.get('where')
    ex = None if where is None else fi.example_mask(where, s.shape[0])
    return loss_fn(s, t, where=ex, **options)
  return stateless(fn)


_RKD = 'Park et al., Relational Knowledge Distillation, CVPR 2019, arXiv:1904.05068'


@register('rkd_distance', family='relation', needs=_FEATURES, batch_level=True, reference=_RKD)
def rkd_distance_term(student: str = 'penultimate', teacher: str = 'penultimate'):
  """RKD distance-wise loss on named embeddings (batch-level)."""
  return _relation_term(rkd_distance, 'rkd_distance', student, teacher)


@register('rkd_angle', family='relation', needs=_FEATURES, batch_level=True, reference=_RKD)
def rkd_angle_term(student: str = 'penultimate', teacher: str = 'penultimate'):
  """RKD angle-wise loss on named embeddings (batch-level)."""
  return _relation_term(rkd_angle, 'rkd_angle', student, teacher)


@register('pkt', family='relation', needs=_FEATURES, batch_level=True,
          reference='Passalis & Tefas, Learning Deep Representations with Probabilistic '
                    'Knowledge Transfer, ECCV 2018, arXiv:1803.10837')
def pkt_term(student: str = 'penultimate', teacher: str = 'penultimate', eps: float = 1e-7,
             exclude_self: bool = False, reduction: str = 'mean'):
  """Probabilistic knowledge transfer, cosine kernel (batch-level); see :func:`pkt`.

  The defaults are the reference code's (weight 30000 in RepDistiller carries over).
  """
  if reduction not in PKT_REDUCTIONS:
    raise UserError(f'pkt: reduction must be one of {PKT_REDUCTIONS}; got {reduction!r}')
  return _relation_term(pkt, 'pkt', student, teacher, eps=eps, exclude_self=exclude_self,
                        reduction=reduction)


@register('similarity_preserving', family='relation', needs=_FEATURES, batch_level=True,
          reference='Tung & Mori, Similarity-Preserving Knowledge Distillation, ICCV 2019, '
                    'arXiv:1907.09682')
def similarity_preserving_term(student: str = 'stage1', teacher: str = 'stage1'):
  """Similarity-preserving KD on batch Gram matrices (batch-level)."""
  return _relation_term(similarity_preserving, 'similarity_preserving', student, teacher)


@register('correlation_congruence', family='relation', needs=_FEATURES, batch_level=True,
          reference='Peng et al., Correlation Congruence for Knowledge Distillation, '
                    'ICCV 2019, arXiv:1904.01802')
def correlation_congruence_term(student: str = 'penultimate', teacher: str = 'penultimate',
                                gamma: float = 0.4, order: int | None = 2,
                                normalize: bool = True):
  """CCKD: Gaussian-kernel correlation congruence, Taylor order ``order`` (batch-level)."""
  return _relation_term(correlation_congruence, 'correlation_congruence', student, teacher,
                        gamma=gamma, order=order, normalize=normalize)


@register('linear_cka', family='relation', needs=_FEATURES, batch_level=True,
          reference='Kornblith et al., Similarity of Neural Network Representations '
                    'Revisited, ICML 2019, arXiv:1905.00414')
def linear_cka_term(student: str = 'penultimate', teacher: str = 'penultimate'):
  """One minus linear CKA between batch representations (batch-level)."""
  return _relation_term(linear_cka, 'linear_cka', student, teacher)
