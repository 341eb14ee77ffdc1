"""Sentence vectors: the distillation loss between two sentence encoders, and its figures.

:func:`sentence_vectors` pools a BERT's token states as all-MiniLM-L6-v2 does (the mean
over the attended tokens, L2-normalised), through an optional projection;
:func:`sentence_cosine` (registered as the loss ``sentence_cosine``) is the cosine
distance between a student's and a teacher's vectors; :func:`embedding_metrics` says how
close two encoders are on a set of lines: the mean cosine, and how often the student's
nearest neighbours among the lines are the teacher's. The encoder distillation run
(:mod:`kdjax.distill.encoder`) trains with the first and evaluates with the second.

References:
  Reimers, Gurevych. Making Monolingual Sentence Embeddings Multilingual using Knowledge
  Distillation. EMNLP 2020. arXiv:2004.09813.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses.registry import Term
from kdjax.losses.registry import register

EMBEDDING = 'embedding'          # the name of a cached teacher's sentence vector feature


def _unit(v: jax.Array) -> jax.Array:
  """``v / |v|`` on the last axis; a zero vector stays zero, with a finite gradient."""
  sq = jnp.sum(jnp.square(v), axis=-1, keepdims=True)
  return v * jax.lax.rsqrt(jnp.maximum(sq, 1e-24))


def sentence_vectors(hidden: jax.Array, where: jax.Array | None = None,
                     kernel: jax.Array | None = None) -> jax.Array:
  """Unit sentence vectors: token states mean-pooled over ``where``, projected, normalised.

  Args:
    hidden: ``[B, T, D]`` token states (pooled over the tokens ``where`` marks), or
      ``[B, D]`` vectors already pooled (a cached teacher's).
    where: ``[B, T]`` tokens to pool (default all); ignored for ``[B, D]`` input.
    kernel: optional ``[D, D']`` projection applied to the pooled vector.

  Returns:
    ``[B, D']`` float32 unit vectors (a row with no token is zero).

  >>> h = jnp.array([[[3.0, 0.0], [0.0, 4.0], [100.0, 100.0]]])
  >>> sentence_vectors(h, jnp.array([[1, 1, 0]])).tolist()
  [[0.6000000238418579, 0.800000011920929]]
  """
  h = jnp.asarray(hidden, jnp.float32)
  if h.ndim == 3:
    w = (jnp.ones(h.shape[:2], jnp.float32) if where is None
         else (jnp.asarray(where) != 0).astype(jnp.float32))
    h = jnp.sum(h * w[..., None], axis=1) / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
  elif h.ndim != 2:
    raise ValueError(f'sentence vectors come from [batch, tokens, width] states or [batch, '
                     f'width] vectors, got shape {h.shape}')
  if kernel is not None:
    h = jnp.einsum('bd,de->be', h, jnp.asarray(kernel, jnp.float32),
                   precision=jax.lax.Precision.HIGHEST)
  return _unit(h)


def sentence_cosine(student: jax.Array, teacher: jax.Array, *, where: jax.Array | None = None,
                    kernel: jax.Array | None = None) -> jax.Array:
  r"""Cosine distance between the student's and the teacher's sentence vectors.

  .. math::

    \ell_i = 1 - \Big\langle \frac{W^\top \bar s_i}{\lVert W^\top \bar s_i \rVert},
                             \frac{\bar t_i}{\lVert \bar t_i \rVert} \Big\rangle, \qquad
    \bar s_i = \frac{1}{|S_i|} \sum_{p \in S_i} s_{i,p}

  with :math:`S_i` the attended tokens of line :math:`i`, :math:`W` the projection
  (the identity when the widths are equal) and :math:`\bar t_i` the teacher's vector
  (pooled the same way from its token states, or given). For unit vectors
  :math:`\lVert u - v \rVert^2 = 2 \ell`, so this is half the MSE of Reimers and
  Gurevych's embedding regression, on the normalised vectors the encoder serves.

  Args:
    student: ``[B, T, D_s]`` token states (or ``[B, D_s]`` vectors).
    teacher: ``[B, T, D_t]`` token states or ``[B, D_t]`` vectors.
    where: ``[B, T]`` attended tokens (the attention mask).
    kernel: ``[D_s, D_t]`` projection; needed when ``D_s != D_t``.

  Returns:
    ``[B]`` float32 in ``[0, 2]``.

  References:
    Reimers, Gurevych. Making Monolingual Sentence Embeddings Multilingual using
    Knowledge Distillation. EMNLP 2020. arXiv:2004.09813.

  >>> s = jnp.array([[[1.0, 0.0], [1.0, 0.0]]])
  >>> sentence_cosine(s, jnp.array([[0.0, 2.0]])).tolist()
  [1.0]
  """
  s = sentence_vectors(student, where, kernel)
  t = sentence_vectors(teacher, where)
  if s.shape != t.shape:
    raise ValueError(f'sentence_cosine: student vectors {s.shape} and teacher vectors '
                     f'{t.shape} differ; project the student (a kernel of shape '
                     f'[{s.shape[-1]}, {t.shape[-1]}])')
  return 1.0 - jnp.sum(s * t, axis=-1)


def _feature(inputs, side: str, name: str) -> jax.Array:
  features = inputs[f'{side}_features']
  if name not in features:
    raise ValueError(f'sentence_cosine: the {side} has no feature {name!r}; it has '
                     f'{sorted(features)}')
  return features[name]


@register('sentence_cosine', family='feature', needs=('student_features', 'teacher_features'),
          batch_level=True,
          reference='Reimers & Gurevych, Making Monolingual Sentence Embeddings Multilingual '
                    'using Knowledge Distillation, EMNLP 2020, arXiv:2004.09813')
def sentence_cosine_term(student: str = 'last_hidden', teacher: str = EMBEDDING,
                         project: bool | None = None) -> Term:
  """Sentence-vector cosine distance (mean-pooled, projected), the mean over the lines.

  Options: ``student``, ``teacher``: feature names (token states ``[B, T, D]``,
  pooled over ``where``, or vectors ``[B, D]``); ``project``: learn a linear
  projection of the student's vector (``[D_s, D_t]``, normal init with variance
  ``1 / D_s``); default (None): only when the widths differ. The value is the mean of
  :func:`sentence_cosine` over the lines with an attended token (every line weighs the
  same, whatever its length), a scalar.
  """

  def widths(inputs):
    return (_feature(inputs, 'student', student).shape[-1],
            _feature(inputs, 'teacher', teacher).shape[-1])

  def init(rng, inputs):
    ds, dt = widths(inputs)
    if project is False and ds != dt:
      raise ValueError(f'sentence_cosine: student width {ds} differs from teacher width {dt}; '
                       'set project=True (or leave it unset)')
    if project or (project is None and ds != dt):
      return {'kernel': jax.random.normal(rng, (ds, dt), jnp.float32) / np.sqrt(ds)}, {}
    return {}, {}

  def apply(params, state, inputs):
    s = _feature(inputs, 'student', student)
    where = inputs.get('where')
    if where is None:
      where = jnp.ones(s.shape[:2] if s.ndim == 3 else s.shape[:1], bool)
    where = jnp.asarray(where).astype(bool)
    value = sentence_cosine(s, _feature(inputs, 'teacher', teacher), where=where,
                            kernel=params.get('kernel'))
    lines = jnp.any(where, axis=1) if where.ndim == 2 else where
    n = jnp.sum(lines.astype(jnp.float32))
    return jnp.sum(jnp.where(lines, value, 0.0)) / jnp.maximum(n, 1.0), state

  return Term(init, apply)


# ============================================================================= the metrics


def embedding_metrics(student: jax.Array, teacher: jax.Array, *, k: int = 5
                      ) -> dict[str, jax.Array]:
  """How close the student's sentence vectors are to the teacher's, on ``N`` lines.

  For each line ``i`` the teacher's nearest neighbour ``n_t(i)`` is the other line
  ``j != i`` of highest cosine to it under the teacher (ties: the lowest index), and
  ``K_t(i)``, ``K_s(i)`` are the ``k`` nearest other lines under the teacher and the
  student.

  * ``mean_cosine``: mean over ``i`` of ``cos(s_i, t_i)`` (only when the widths agree:
    the student's vectors after its projection).
  * ``nn_top1``: the fraction of lines whose nearest neighbour under the student is
    ``n_t(i)``.
  * ``nn_top{k}``: the fraction with ``n_t(i)`` among the student's ``k`` nearest.
  * ``nn_overlap{k}``: the mean of ``|K_s(i) ∩ K_t(i)| / k``.

  Args:
    student: ``[N, D_s]`` vectors (normalised here).
    teacher: ``[N, D_t]``.
    k: neighbours for the top-k and overlap figures; ``N > k``.

  Returns:
    Scalars (float32).

  >>> t = jnp.array([[1.0, 0.0], [0.9, 0.2], [0.0, 1.0], [0.3, 0.9], [0.6, 0.5]])
  >>> s = t[jnp.array([0, 1, 2, 4, 3])]   # the student swaps the vectors of lines 3 and 4
  >>> {key: round(float(v), 4) for key, v in embedding_metrics(s, t, k=2).items()}
  {'mean_cosine': 0.9401, 'nn_top1': 0.4, 'nn_top2': 0.6, 'nn_overlap2': 0.6}
  """
  s, t = _unit(jnp.asarray(student, jnp.float32)), _unit(jnp.asarray(teacher, jnp.float32))
  n = s.shape[0]
  if t.shape[0] != n or n <= k:
    raise ValueError(f'embedding_metrics needs the same N > k lines on both sides, got '
                     f'{s.shape[0]} and {t.shape[0]} with k={k}')
  out = {}
  if s.shape[1] == t.shape[1]:
    out['mean_cosine'] = jnp.mean(jnp.sum(s * t, axis=1))

  def nearest(v):
    sim = jnp.einsum('id,jd->ij', v, v, precision=jax.lax.Precision.HIGHEST)
    sim = jnp.where(jnp.eye(n, dtype=bool), -jnp.inf, sim)
    return jax.lax.top_k(sim, k)[1]   # equal values: the lower index first

  near_s, near_t = nearest(s), nearest(t)
  hit = near_s == near_t[:, :1]
  out['nn_top1'] = jnp.mean(hit[:, 0].astype(jnp.float32))
  out[f'nn_top{k}'] = jnp.mean(jnp.any(hit, axis=1).astype(jnp.float32))
  shared = jnp.sum(near_s[:, :, None] == near_t[:, None, :], axis=(1, 2))
  out[f'nn_overlap{k}'] = jnp.mean(shared.astype(jnp.float32)) / k
  return out
