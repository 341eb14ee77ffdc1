"""Config names -> model builders.

A builder is ``builder(*, num_classes, input_shape, rngs, dtype, **kwargs) ->
nnx.Module``; :func:`create` makes the ``rngs`` from a seed.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Callable

import jax
import jax.numpy as jnp
from flax import nnx

Builder = Callable[..., nnx.Module]

_REGISTRY: dict[str, Builder] = {}


def register(
    name: str, builder: Builder | None = None, *, overwrite: bool = False
) -> Any:
  """Registers ``builder`` under ``name``; usable as a decorator.

  Args:
    name: the config name.
    builder: ``builder(*, num_classes, input_shape, rngs, dtype, **kwargs)``
      returning an ``nnx.Module`` whose call returns a
      :class:`~kdjax.models.ModelOutput`. If omitted, a decorator is returned.
    overwrite: allow replacing an existing entry.

  Returns:
    ``builder`` (or the decorator).

  Raises:
    ValueError: if ``name`` is taken and ``overwrite`` is False.

  >>> from kdjax.models import MLP
  >>> @register('my_mlp')
  ... def _my_mlp(*, num_classes, input_shape, rngs, dtype, **kw):
  ...   return MLP(input_shape, num_classes, hidden=(8,), rngs=rngs, dtype=dtype, **kw)
  >>> 'my_mlp' in names()
  True
  >>> _ = _REGISTRY.pop('my_mlp')  # keep the doctest side-effect free
  """

  def add(fn: Builder) -> Builder:
    if name in _REGISTRY and not overwrite:
      raise ValueError(
          f'A model named {name!r} is already registered; pass overwrite=True '
          'to replace it.'
      )
    _REGISTRY[name] = fn
    return fn

  return add if builder is None else add(builder)


def names() -> list[str]:
  """The registered model names, sorted.

  >>> 'resnet8x4' in names()
  True
  """
  return sorted(_REGISTRY)


def create(
    name: str,
    *,
    num_classes: int,
    input_shape: Sequence[int],
    seed: int = 0,
    dtype: Any = jnp.float32,
    prng_impl: str = 'rbg',
    **kwargs: Any,
) -> nnx.Module:
  """Builds the registered model ``name``.

  Args:
    name: one of :func:`names`.
    num_classes: size of the classifier output.
    input_shape: one example's shape, without the batch axis, channels last:
      ``(40, 1)`` for MNIST-1D, ``(8, 8, 1)`` for UCI digits, ``(32, 32, 3)``
      for CIFAR.
    seed: initialisation seed; the ``params`` and ``dropout`` streams are
      derived from it.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay in
      ``param_dtype`` (a kwarg, default float32).
    prng_impl: the PRNG that draws the initial parameters. The default
      ``'rbg'`` (XLA's RngBitGenerator) compiles its sampling kernels several
      times faster on CPU than ``'threefry2x32'`` (eager initialisation
      compiles one kernel per parameter shape), but its values may differ
      between backends (CPU/GPU/TPU) for the same seed; pass
      ``'threefry2x32'`` for backend-independent initial values. The
      ``dropout`` stream stored in the model is always threefry.
    **kwargs: model options (see each model class).

  Returns:
    The ``nnx.Module``; use it through :func:`~kdjax.models.functional`.

  Raises:
    KeyError: for an unknown name; the message lists the known names.

  >>> m = create('cnn1d', num_classes=10, input_shape=(40, 1), channels=(4, 4, 4))
  >>> type(m).__name__
  'CNN'
  """
  if name not in _REGISTRY:
    raise KeyError(
        f'Unknown model {name!r}; known models: {", ".join(names())}.'
    )
  rngs = nnx.Rngs(
      params=jax.random.key(seed, impl=prng_impl),
      dropout=jax.random.fold_in(jax.random.key(seed), 1),
  )
  return _REGISTRY[name](
      num_classes=num_classes,
      input_shape=tuple(input_shape),
      rngs=rngs,
      dtype=dtype,
      **kwargs,
  )


def from_config(cfg: Any, *, num_classes: int, input_shape: Sequence[int], seed: int = 0
                ) -> tuple[Callable[..., Any], Callable[[], tuple[Any, Any]], Any]:
  """A model from a config group (``name``, ``kwargs``, ``dtype``), built abstractly.

  Args:
    cfg: ``config.model`` (a ``ConfigDict`` or mapping with ``name`` and optionally
      ``kwargs`` and ``dtype``).
    num_classes: classifier outputs.
    input_shape: one example's shape.
    seed: initialisation seed.

  Returns:
    ``(apply, init, abstract)``: the pure ``apply`` of :func:`~kdjax.models.functional`;
    ``init(seed=seed) -> (params, state)``, pure and traceable (the seed may be traced),
    so ``jax.jit(init, out_shardings=...)`` makes the parameters directly in their
    shardings; and the
    ``(params, state)`` shapes as ``jax.ShapeDtypeStruct`` (nothing allocated).

  Raises:
    UserError: an unknown model name or model options it does not take.

  >>> apply, init, (params, state) = from_config(
  ...     {'name': 'mlp', 'kwargs': {'hidden': (8,)}}, num_classes=3, input_shape=(4,))
  >>> params['head']['kernel'].shape
  (8, 3)
  """
  from kdjax.errors import UserError
  from kdjax.models.base import functional
  get = cfg.get if hasattr(cfg, 'get') else (lambda k, d=None: getattr(cfg, k, d))
  name = get('name')
  kwargs = get('kwargs') or {}
  kwargs = dict(kwargs.to_dict() if hasattr(kwargs, 'to_dict') else kwargs)
  dtype = jnp.dtype(get('dtype') or 'float32')

  def build(seed=seed) -> nnx.Module:
    return create(name, num_classes=num_classes, input_shape=tuple(input_shape), seed=seed,
                  dtype=dtype, **kwargs)

  try:
    apply, params, state = functional(nnx.eval_shape(build))
  except KeyError as e:
    raise UserError(str(e.args[0]) if e.args else str(e)) from None
  except (TypeError, ValueError) as e:
    raise UserError(f'model {name!r} with options {kwargs}: {str(e).splitlines()[0]}') from None

  def init(seed=seed):
    return functional(build(seed))[1:]

  return apply, init, (params, state)
