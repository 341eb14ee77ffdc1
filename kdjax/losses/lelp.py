r"""After LELP: linear projections of teacher embeddings as pseudo-subclass soft targets.

For binary and few-class problems the teacher's class probabilities carry little
information. LELP finds informative linear directions in the teacher's embedding
space, per class, and splits each class into pseudo-subclasses along them; the
student learns the resulting finer-grained soft targets through its own learned
subclass head.

What kdjax implements is built after the paper, not a reproduction of it (our reading
of the method; choices marked):

1. **Directions** (:func:`lelp_directions`): for each class :math:`c`, the top
   :math:`k` principal directions :math:`v_{c,1..k}` of the class's teacher
   embeddings, centred at the class mean :math:`\mu_c` and, when the teacher's
   classifier :math:`W` is given, projected onto the null space of :math:`W^\top`
   (so the directions carry information the teacher's logits do not). Signs are fixed
   so the largest-magnitude component of each direction is positive.
2. **Pseudo-subclasses** (:func:`lelp_targets`): each direction splits class
   :math:`c` in two (the positive and the negative side), :math:`2k` subclasses per
   class. *Choice:* the teacher's subclass logits are
   :math:`z_c + \log\mathrm{softmax}_{(j,\pm)}(\pm\beta\langle h - \mu_c, v_{c,j}\rangle)`,
   so that summing subclass probabilities gives back the teacher's class
   probabilities exactly and the split within a class follows the projections.
3. **Distillation** (:func:`lelp_loss`): the student's subclass logits come from a
   learned linear head on its embedding; the loss is the temperature-scaled KL
   between the two subclass distributions (times :math:`T^2`, as in KD).

Per-example values ``[batch]`` in float32.

References:
  Loo, Iliopoulos, Hu, Vee. Linear Projections of Teacher Embeddings for Few-Class
  Distillation. arXiv:2409.20449, 2024.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kdjax.losses import _feature_inputs as fi
from kdjax.losses import projectors
from kdjax.losses._logit_helpers import kl_from_log_probs
from kdjax.losses._logit_helpers import tempered_log_probs
from kdjax.losses.registry import Term
from kdjax.losses.registry import register

# Small matmuls (projections onto a few directions, class covariances): full float32,
# so that TF32 or bfloat16 passes on accelerators do not move the directions.
_HIGHEST = jax.lax.Precision.HIGHEST


def _mm(a, b):
  return jnp.matmul(a, b, precision=_HIGHEST)


def lelp_directions(teacher_embeddings: jax.Array, labels: jax.Array, num_classes: int,
                    num_directions: int, *, classifier: jax.Array | None = None,
                    where: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  r"""Per-class principal directions of the teacher's embeddings (LELP step 1).

  Args:
    teacher_embeddings: ``[N, D]`` (e.g. the teacher's penultimate features over the
      training set or a large sample of it).
    labels: ``[N]`` int; ``-1`` is skipped.
    num_classes: ``C``.
    num_directions: ``k <= D``.
    classifier: optional ``[D, C]`` teacher classifier kernel; directions are taken
      in the orthogonal complement of its column space.
    where: optional ``[N]`` mask.

  Returns:
    ``(directions [C, k, D], means [C, D])``: unit directions, largest variance first.

  >>> e = jnp.array([[0., 0.], [2., 0.], [0., 1.], [0., 3.]]); y = jnp.array([0, 0, 1, 1])
  >>> v, mu = lelp_directions(e, y, 2, 1)
  >>> v.round(3).tolist(), mu.tolist()
  ([[[1.0, 0.0]], [[0.0, 1.0]]], [[1.0, 0.0], [0.0, 2.0]])
  """
  e = fi.flatten_examples(teacher_embeddings)
  labels = jnp.asarray(labels)
  d = e.shape[-1]
  if not 0 < num_directions <= d:
    raise ValueError(f'num_directions must be in [1, {d}]; got {num_directions}')
  valid = jnp.logical_and(fi.example_mask(where, e.shape[0]), labels >= 0)
  e = fi.zero_masked(e, valid)
  if classifier is not None:
    q, _ = jnp.linalg.qr(fi.f32(classifier))          # [D, C] orthonormal basis of col(W)
    null = lambda x: x - _mm(_mm(x, q), q.T)
  else:
    null = lambda x: x

  def per_class(c):
    w = jnp.logical_and(valid, labels == c).astype(jnp.float32)
    n = jnp.maximum(jnp.sum(w), 1.0)
    mu = _mm(w, e) / n
    x = null(e - mu) * jnp.sqrt(w)[:, None]
    cov = _mm(x.T, x) / n
    _, vecs = jnp.linalg.eigh(cov)                     # ascending eigenvalues
    top = vecs[:, ::-1][:, :num_directions].T          # [k, D]
    pivot = jnp.take_along_axis(top, jnp.argmax(jnp.abs(top), axis=1)[:, None], axis=1)
    return top * jnp.where(pivot < 0, -1.0, 1.0), mu

  return jax.vmap(per_class)(jnp.arange(num_classes))


def lelp_targets(teacher_embedding: jax.Array, teacher_logits: jax.Array,
                 directions: jax.Array, means: jax.Array, *, scale: float = 1.0) -> jax.Array:
  r"""Teacher pseudo-subclass logits ``[B, C * 2k]`` (LELP step 2, see the module doc).

  Subclass ``(c, j, s)`` with sign :math:`s = \pm 1` sits at index ``c * 2k + 2 j + (s < 0)``.

  >>> h = jnp.array([[3.0, 0.0]]); z = jnp.array([[0.0, 0.0]])
  >>> v = jnp.array([[[1.0, 0.0]], [[0.0, 1.0]]]); mu = jnp.zeros((2, 2))
  >>> p = jax.nn.softmax(lelp_targets(h, z, v, mu))
  >>> p.reshape(2, 2).sum(-1).round(4).tolist()  # class marginals are the teacher's
  [0.5, 0.5]
  """
  h = fi.flatten_examples(teacher_embedding)
  z = fi.f32(teacher_logits)
  proj = jnp.einsum('bd,ckd->bck', h, fi.f32(directions), precision=_HIGHEST) - jnp.einsum(
      'cd,ckd->ck', fi.f32(means), fi.f32(directions), precision=_HIGHEST)[None]
  signed = jnp.stack([proj, -proj], axis=-1) * scale     # [B, C, k, 2]
  b, c, k, _ = signed.shape
  within = jax.nn.log_softmax(signed.reshape(b, c, 2 * k), axis=-1)
  return (z[:, :, None] + within).reshape(b, c * 2 * k)


def lelp_loss(student_subclass_logits: jax.Array, teacher_subclass_logits: jax.Array, *,
              temperature: float = 1.0, where: jax.Array | None = None) -> jax.Array:
  r"""KL between teacher and student pseudo-subclass distributions (LELP step 3).

  .. math::

    \ell_i = T^2 \, \mathrm{KL}\big(\mathrm{softmax}(z^t_i / T) \,\big\|\,
      \mathrm{softmax}(z^s_i / T)\big)

  Args:
    student_subclass_logits: ``[B, C * 2k]`` from the student's subclass head.
    teacher_subclass_logits: ``[B, C * 2k]`` from :func:`lelp_targets`.
    temperature: :math:`T`.
    where: ``[B]`` example mask.

  Returns:
    ``[B]`` float32.

  References:
    Loo, Iliopoulos, Hu, Vee. Linear Projections of Teacher Embeddings for Few-Class
    Distillation. arXiv:2409.20449, 2024.

  >>> z = jnp.array([[1.0, 2.0, 3.0, 4.0]])
  >>> lelp_loss(z, z).tolist()
  [0.0]
  """
  zs, zt = fi.f32(student_subclass_logits), fi.f32(teacher_subclass_logits)
  ex = fi.example_mask(where, zs.shape[0])
  zs, zt = fi.zero_masked(zs, ex), fi.zero_masked(zt, ex)
  # A subclass with an infinite logit on either side (a -inf teacher class) adds nothing.
  lp = tempered_log_probs(zs, zt, temperature, -1)
  kl = kl_from_log_probs(lp.log_p, lp.log_q, -1, lp.skip)
  return jnp.where(ex, kl * lp.temperature ** 2, 0.0)


@register('lelp', family='feature',
          needs=('student_features', 'teacher_features', 'teacher_logits', 'labels'),
          reference='After Loo et al., Linear Projections of Teacher Embeddings for Few-Class '
                    'Distillation, arXiv:2409.20449, 2024 (kdjax\'s reading: per-class '
                    'principal directions, a within-class softmax split)')
def lelp_term(student: str = 'penultimate', teacher: str = 'penultimate',
              num_directions: int = 2, scale: float = 1.0, temperature: float = 1.0,
              directions=None, means=None, classifier=None) -> Term:
  """After LELP: pseudo-subclass distillation with a learned student subclass head.

  Options: ``directions`` ``[C, k, D]`` and ``means`` ``[C, D]`` from
  :func:`lelp_directions` run over the teacher's training-set embeddings (the
  intended use). Without them, ``init`` computes them from the batch it is given
  (labels and teacher features of that batch; a class absent from it gets arbitrary
  directions) and keeps them fixed in the term's state. ``classifier`` (``[D, C]``)
  is used only in that case.
  """
  def init(rng, inputs):
    s = fi.feature(inputs, 'student', student, 'lelp')
    t = fi.feature(inputs, 'teacher', teacher, 'lelp')
    num_classes = int(jnp.shape(inputs['teacher_logits'])[-1])
    if directions is None:
      v, mu = lelp_directions(t, inputs['labels'], num_classes, num_directions,
                              classifier=classifier,
                              where=fi.example_mask(inputs.get('where'), t.shape[0]))
    else:
      v = jnp.asarray(directions, jnp.float32)
      mu = (jnp.zeros(v.shape[::2], jnp.float32) if means is None
            else jnp.asarray(means, jnp.float32))
    if v.shape[0] != num_classes or v.shape[-1] != int(np.prod(t.shape[1:])):
      raise ValueError(f'lelp: directions of shape {v.shape} do not match {num_classes} '
                       f'classes and teacher width {int(np.prod(t.shape[1:]))}')
    width = int(np.prod(s.shape[1:]))
    head = projectors.linear_init(rng, width, num_classes * 2 * v.shape[1])
    return head, {'directions': v, 'means': mu}

  def apply(params, state, inputs):
    s = fi.flatten_examples(fi.feature(inputs, 'student', student, 'lelp'))
    t = fi.feature(inputs, 'teacher', teacher, 'lelp')
    where = inputs.get('where')
    zt = lelp_targets(t, inputs['teacher_logits'], state['directions'], state['means'],
                      scale=scale)
    zs = projectors.linear_apply(params, s)
    value = lelp_loss(zs, zt, temperature=temperature,
                      where=fi.example_mask(where, s.shape[0]))
    return fi.per_example_output(value, where), state

  return Term(init, apply)
