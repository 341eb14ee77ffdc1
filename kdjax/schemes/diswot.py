r"""DisWOT: rank candidate students for a teacher without training them.

Every candidate is scored at initialization on one batch :math:`x` by how similar its
features are to the (trained) teacher's, in two ways (Dong, Li, Wei, CVPR 2023):

* **Semantic similarity**, from Grad-CAM class-activation maps of the last feature map
  :math:`A \in \mathbb{R}^{B \times L \times K}` before the linear head (an MLP's last
  hidden layer is :math:`L = 1`). The Grad-CAM weights are the spatial mean of the
  logits' gradients, :math:`\alpha_{k,c} = \frac{1}{L}\sum_l \partial y_c / \partial
  A_{l,k}`, which for a linear head on the flattened (or pooled) map are the head's
  kernel entries averaged over positions; the maps are
  :math:`G_c = \mathrm{ReLU}(\sum_k \alpha_{k,c} A_{:,:,k})`, flattened over the batch
  and positions into :math:`G \in \mathbb{R}^{C \times BL}`. With the normalised class
  Gram matrix :math:`\hat S(G) = G G^\top / \lVert G G^\top \rVert_F` (:math:`C \times C`,
  so teacher and student of different widths and lengths compare),

  .. math:: M_s = -\lVert \hat S(G^T) - \hat S(G^S) \rVert_F .

* **Relational similarity**, from the sample-wise correlation of the flattened
  features :math:`F \in \mathbb{R}^{B \times D}`, :math:`R = F F^\top` with each row
  L2-normalised (:math:`B \times B`),

  .. math:: M_r = -\lVert R^T - R^S \rVert_F .

The DisWOT score is :math:`M_s + M_r`; higher is better. The paper searches an
evolutionary space with it; here it ranks a fixed family (:data:`CANDIDATES`).

References:
  Dong, Li, Wei. DisWOT: Student Architecture Search for Distillation WithOut Training.
  CVPR 2023. arXiv:2303.15678 (the semantic and relational similarity metrics).
  Selvaraju et al. Grad-CAM. ICCV 2017. arXiv:1610.02391 (the activation maps).
  Tung, Mori. Similarity-Preserving Knowledge Distillation. ICCV 2019.
  arXiv:1907.09682 (row-normalised sample Gram matrices).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import data as kdata
from kdjax import teacher as teacher_lib
from kdjax.errors import UserError
from kdjax.models import from_config

# name:widths -> an MLP of those hidden sizes, or a 1-D CNN of those channels (kernel 5,
# stride 2): MNIST-1D students from 1k to 60k parameters.
CANDIDATES = ('mlp:32', 'mlp:64', 'mlp:128', 'mlp:32x32', 'mlp:64x64', 'mlp:100x100',
              'mlp:128x128', 'cnn1d:8x8', 'cnn1d:16x16', 'cnn1d:8x8x8', 'cnn1d:16x16x16',
              'cnn1d:32x32x32')


def candidate_model(spec: str) -> dict:
  """``config.model`` of a candidate ``'mlp:64x64'`` / ``'cnn1d:16x16x16'``.

  Raises:
    UserError: a spec of another form.

  >>> candidate_model('cnn1d:8x16')
  {'name': 'cnn1d', 'kwargs': {'channels': (8, 16), 'kernel_size': 5, 'strides': 2}}
  """
  name, _, widths = spec.partition(':')
  try:
    sizes = tuple(int(w) for w in widths.split('x'))
  except ValueError:
    sizes = ()
  if name not in ('mlp', 'cnn1d') or not sizes or min(sizes) < 1:
    raise UserError(f'candidate {spec!r} is not of the form mlp:W1xW2... or cnn1d:C1xC2...; '
                    f'e.g. {CANDIDATES[4]}')
  if name == 'mlp':
    return {'name': 'mlp', 'kwargs': {'hidden': sizes}}
  return {'name': 'cnn1d', 'kwargs': {'channels': sizes, 'kernel_size': 5, 'strides': 2}}


def last_feature_map(features: dict) -> jax.Array:
  """The map before the head: the last ``stage{i}`` (``[B, K]`` or ``[B, *S, K]``)."""
  stages = sorted((k for k in features if k.startswith('stage')), key=lambda k: int(k[5:]))
  return features[stages[-1]] if stages else features['penultimate']


def class_activation_maps(feature: jax.Array, head_kernel: jax.Array) -> jax.Array:
  r"""Grad-CAM maps ``[classes, B * L]`` of ``feature`` ``[B, (*S,) K]`` under a linear
  head whose ``head_kernel`` ``[D, C]`` reads it flattened (``D = L K``) or pooled /
  as is (``D = K``); see the module docstring.

  >>> a = jnp.array([[[1.0, 0.0], [0.0, 2.0]]])           # B=1, L=2, K=2
  >>> w = jnp.array([[1.0, -1.0], [1.0, 1.0]])            # K=2 -> C=2 (pooled head)
  >>> class_activation_maps(a, w).tolist()
  [[1.0, 2.0], [0.0, 2.0]]
  """
  b, k = feature.shape[0], feature.shape[-1]
  a = feature.reshape(b, -1, k).astype(jnp.float32)          # [B, L, K]
  l = a.shape[1]
  w = head_kernel.astype(jnp.float32)
  if w.shape[0] == l * k:
    alpha = w.reshape(l, k, -1).mean(axis=0)                 # [K, C]
  elif w.shape[0] == k:
    alpha = w
  else:
    raise ValueError(f'a head of {w.shape[0]} inputs does not read a map of {l} x {k}')
  g = jax.nn.relu(jnp.einsum('blk,kc->cbl', a, alpha))
  return g.reshape(g.shape[0], -1)


def _normalized_gram(g: jax.Array) -> jax.Array:
  s = g @ g.T
  return s / jnp.maximum(jnp.linalg.norm(s), 1e-12)


def _relation(f: jax.Array) -> jax.Array:
  f = f.reshape(f.shape[0], -1).astype(jnp.float32)
  r = f @ f.T
  return r / jnp.maximum(jnp.linalg.norm(r, axis=1, keepdims=True), 1e-12)


def diswot_score(teacher: tuple, student: tuple) -> dict[str, jax.Array]:
  """The DisWOT scores of a student against a teacher, each given as ``(feature map,
  head kernel)`` on the same batch.

  Returns:
    ``{'semantic': M_s, 'relational': M_r, 'score': M_s + M_r}`` (scalars; higher is
    more similar, 0 the most).

  >>> a = jnp.arange(12.0).reshape(3, 4)
  >>> s = diswot_score((a, jnp.ones((4, 2))), (a, jnp.ones((4, 2))))
  >>> [abs(round(float(v), 6)) for v in s.values()]
  [0.0, 0.0, 0.0]
  """
  (ft, wt), (fs, ws) = teacher, student
  semantic = -jnp.linalg.norm(_normalized_gram(class_activation_maps(ft, wt))
                              - _normalized_gram(class_activation_maps(fs, ws)))
  relational = -jnp.linalg.norm(_relation(ft) - _relation(fs))
  return {'semantic': semantic, 'relational': relational, 'score': semantic + relational}


def _features_and_head(apply, params, state, x) -> tuple[jax.Array, jax.Array]:
  out, _ = apply(params, state, x, train=False)
  if 'head' not in params or 'kernel' not in params['head']:
    raise UserError('DisWOT reads a model with a linear head named head (the MLP and CNN '
                    'classifiers)')
  return last_feature_map(out.features), params['head']['kernel']


def search_batch(config: ml_collections.ConfigDict, size: int | None = None) -> dict:
  """The one batch DisWOT scores on: the first ``size`` (default ``config.batch_size``)
  examples of ``config.data.train_split``."""
  arrays = kdata.load_arrays(config.data.name, config.data.train_split,
                             data_dir=config.data.data_dir or None)
  n = int(size or config.batch_size)
  return {k: np.asarray(v[:n]) for k, v in arrays.items()}


def rank_students(config: ml_collections.ConfigDict, teacher: teacher_lib.Teacher,
                  candidates: Sequence[str] = CANDIDATES, *, batch: dict | None = None
                  ) -> list[dict[str, Any]]:
  """Scores each candidate (at its initialization from ``config.seed``) against
  ``teacher`` on one batch; returns rows sorted best first: ``candidate``, ``score``,
  ``semantic``, ``relational``, ``params`` (its parameter count), ``rank`` (1 = best).

  Raises:
    UserError: a malformed candidate, or no candidates.
  """
  if not candidates:
    raise UserError('no candidates; pass --candidates mlp:64x64 cnn1d:16x16x16 ... or leave it '
                    'out for the default family')
  models = [(c, candidate_model(c)) for c in candidates]   # all checked before any work
  spec = kdata.dataset_spec(config.data.name, data_dir=config.data.data_dir or None)
  batch = search_batch(config) if batch is None else batch
  x = jnp.asarray(batch['x'])
  t = jax.jit(lambda v: _features_and_head(teacher.apply, *v, x))(teacher.variables)
  rows = []
  for name, model in models:
    apply, init, _ = from_config(model, num_classes=spec.num_classes,
                                 input_shape=spec.input_shape)
    params, state = init(int(config.seed))
    s = _features_and_head(apply, params, state, x)
    scores = {k: float(v) for k, v in jax.jit(diswot_score)(t, s).items()}
    count = sum(int(np.size(p)) for p in jax.tree.leaves(params))
    rows.append({'candidate': name, **scores, 'params': count})
  rows.sort(key=lambda r: -r['score'])
  for i, r in enumerate(rows):
    r['rank'] = i + 1
  return rows


def search_student(config: ml_collections.ConfigDict, teacher_workdir: str,
                   candidates: Sequence[str] | None = None) -> list[dict[str, Any]]:
  """:func:`rank_students` for the teacher of a ``kdjax train`` workdir (``kdjax
  search-student``).

  Raises:
    UserError: a teacher workdir that cannot be read, or a teacher of other inputs or
      classes than ``config.data``.
  """
  spec = kdata.dataset_spec(config.data.name, data_dir=config.data.data_dir or None)
  mesh = jax.make_mesh((jax.device_count(),), ('data',))
  teacher = teacher_lib.load_teacher(teacher_workdir, mesh)
  if teacher.num_classes != spec.num_classes:
    raise UserError(f'the teacher predicts {teacher.num_classes} classes but '
                    f'{config.data.name} has {spec.num_classes}; use a teacher of the same data')
  return rank_students(config, teacher, tuple(candidates or CANDIDATES))
