"""Numerics of a run: the matmul precision, the student's computation dtype and its
activation rematerialization (docs/precision.md).

* ``config.precision`` (``'default'``, ``'high'``, ``'highest'``): the run's step, its
  evaluation and its teacher's forward are traced under
  ``jax.default_matmul_precision(...)`` (:func:`with_precision`), so every matrix
  product and convolution that does not name its own precision gets it (the lowered
  HLO's ``dot_general`` ops carry it). ``'default'`` leaves the backend's choice (TF32
  on recent NVIDIA GPUs, one bfloat16 pass on TPUs).
* ``config.model.dtype='bfloat16'``: bfloat16 activations and matrix products; the
  parameters stay float32 (the models take ``param_dtype``, float32 by default), so do
  the gradients and the optimizer state, and the loss is computed on float32 copies of
  the student's and teacher's outputs (:func:`float32_outputs`, in the train step).
* ``config.model.remat`` (:data:`kdjax.models.base.REMAT_POLICIES`): transformers
  rematerialize per block (their ``remat`` field); the other models around their whole
  forward (:func:`remat_apply`). Same values and gradients; less activation memory.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp

from kdjax.models import from_config
from kdjax.models.base import remat_policy

PRECISIONS = ('default', 'high', 'highest')
# Models whose config has a `remat` field, applied per transformer block.
BLOCK_REMAT_MODELS = ('decoder', 'gpt2', 'llama', 'qwen2', 'bert')


def with_precision(fn: Callable[..., Any], precision: str) -> Callable[..., Any]:
  """``fn`` traced under ``jax.default_matmul_precision(precision)``; ``'default'``
  (or None): ``fn`` itself.

  The context is entered inside the function, so it holds while any ``jit`` around it
  traces it, whoever jits it (the loop's calls, the evaluator, the feed's teacher).

  >>> f = with_precision(lambda a: a @ a, 'highest')
  >>> 'HIGHEST' in jax.jit(f).lower(jnp.ones((2, 2))).as_text()
  True
  """
  if precision in (None, 'default'):
    return fn
  if precision not in PRECISIONS:
    raise ValueError(f'precision must be one of {PRECISIONS}, got {precision!r}')

  @functools.wraps(fn)
  def traced(*args, **kwargs):
    with jax.default_matmul_precision(precision):
      return fn(*args, **kwargs)

  return traced


def float32_outputs(tree):
  """``tree`` with its floating leaves narrower than float32 (bfloat16, float16) cast
  to float32; wider ones and non-floating leaves as they are.

  >>> out = float32_outputs({'a': jnp.ones(2, jnp.bfloat16), 'b': jnp.ones(2, jnp.int32)})
  >>> str(out['a'].dtype), str(out['b'].dtype)
  ('float32', 'int32')
  """
  def one(x):
    if x is None or not hasattr(x, 'dtype'):
      return x
    if jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32:
      return x.astype(jnp.float32)
    return x
  return jax.tree.map(one, tree)


def remat_apply(apply: Callable[..., Any], remat: str) -> Callable[..., Any]:
  """A model's pure ``apply`` with its whole forward under ``jax.checkpoint`` and the
  policy ``remat`` names (:func:`kdjax.models.base.remat_policy`); ``'none'``:
  ``apply`` itself.

  The parameters, the model state, the input and the RNG key are the checkpointed
  function's arguments; ``train`` and the other keywords (packed-sequence ids, output
  flags) are closed over.

  >>> from kdjax.models import create, functional
  >>> apply, params, state = functional(create('mlp', num_classes=3, input_shape=(4,)))
  >>> loss = lambda f: lambda p: f(p, state, jnp.ones((2, 4)))[0].logits.sum()
  >>> g0 = jax.jit(jax.grad(loss(apply)))(params)
  >>> g1 = jax.jit(jax.grad(loss(remat_apply(apply, 'full'))))(params)
  >>> bool(jnp.allclose(g0['head']['kernel'][...], g1['head']['kernel'][...]))
  True
  """
  if remat == 'none':
    return apply
  policy = remat_policy(remat)

  @functools.wraps(apply)
  def rematerialized(params, state, x, *, train: bool = False, rng=None, **kwargs):
    def forward(params, state, x, rng):
      return apply(params, state, x, train=train, rng=rng, **kwargs)
    return jax.checkpoint(forward, policy=policy)(params, state, x, rng)

  return rematerialized


def student_model(model_config, *, num_classes: int, input_shape: Sequence[int],
                  seed: int = 0) -> tuple[Callable[..., Any], Callable, Any]:
  """:func:`kdjax.models.from_config` with ``model_config.remat`` applied: for
  :data:`BLOCK_REMAT_MODELS` as the model's ``remat`` option (per block), for the
  others by :func:`remat_apply`.

  Returns:
    ``(apply, init, abstract)`` as :func:`kdjax.models.from_config`.
  """
  get = model_config.get if hasattr(model_config, 'get') else (
      lambda k, d=None: getattr(model_config, k, d))
  remat = get('remat') or 'none'
  name = get('name')
  if remat != 'none' and name in BLOCK_REMAT_MODELS:
    plain = model_config.to_dict() if hasattr(model_config, 'to_dict') else dict(model_config)
    kwargs = plain.get('kwargs') or {}
    kwargs = dict(kwargs.to_dict() if hasattr(kwargs, 'to_dict') else kwargs)
    model_config = {**plain, 'kwargs': {**kwargs, 'remat': remat}}
    return from_config(model_config, num_classes=num_classes, input_shape=input_shape,
                       seed=seed)
  apply, init, abstract = from_config(model_config, num_classes=num_classes,
                                      input_shape=input_shape, seed=seed)
  return remat_apply(apply, remat), init, abstract
