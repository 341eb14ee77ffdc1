"""A multilayer perceptron over flattened inputs (the MNIST-1D paper's MLP by default)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models import layers
from kdjax.models.base import ModelOutput
from kdjax.models.registry import register


class MLP(nnx.Module):
  """Flatten -> [Linear -> norm -> ReLU -> dropout] per hidden size -> Linear.

  With ``residual=True`` every hidden layer after the first whose input and
  output widths agree adds its input back: ``h = h + dropout(relu(norm(W h)))``
  (the MNIST-1D paper's MLP: ``h = relu(W1 x); h = h + relu(W2 h)``).

  Features: ``'stage{i}'`` is the ``i``-th hidden activation ``[B, hidden[i-1]]``
  (after ReLU, dropout and the residual sum); ``'penultimate'`` is the last of
  them (the flattened input when ``hidden=()``).

  Args:
    input_shape: one example's shape (flattened inside).
    num_classes: output size.
    hidden: hidden layer sizes; ``(100, 100)`` is the MNIST-1D paper's MLP.
    norm: ``None``, ``'batch'`` or ``'layer'`` after each hidden Linear.
    dropout: dropout rate after each hidden activation.
    residual: add each hidden layer's input to its output where the widths agree
      (never the first layer's); ``False`` by default.
    dense_impl: ``'auto'`` or ``'xla'``: the Linear layers' kernel gradient for
      small batches (see :func:`kdjax.models.layers.small_rows_dot_general`).
    dtype: computation dtype.
    param_dtype: parameter dtype.
    rngs: ``nnx.Rngs`` with ``params`` (and ``dropout`` when ``dropout > 0``).

  References:
    Greydanus & Kobak, "Scaling down deep learning with MNIST-1D", ICML 2024
    (arXiv:2011.14439).

  >>> from kdjax.models import create, functional
  >>> apply, params, state = functional(create('mlp', num_classes=10, input_shape=(40, 1)))
  >>> out, _ = jax.jit(apply)(params, state, jnp.zeros((3, 40, 1)))
  >>> out.features['stage2'].shape, out.logits.shape
  ((3, 100), (3, 10))
  """

  def __init__(
      self,
      input_shape: Sequence[int],
      num_classes: int,
      *,
      hidden: Sequence[int] = (100, 100),
      norm: str | None = None,
      dropout: float = 0.0,
      residual: bool = False,
      dense_impl: str = 'auto',
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    self.input_shape = tuple(input_shape)
    sizes = (layers.flat_size(input_shape), *hidden)
    kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.hidden = nnx.List(
        [layers.linear(a, b, dense_impl=dense_impl, **kw)
         for a, b in zip(sizes[:-1], sizes[1:])]
    )
    self.norms = nnx.List([layers.norm(norm, b, **kw) for b in hidden])
    self.dropout = nnx.Dropout(dropout, rngs=rngs) if dropout > 0 else None
    self.skips = tuple(bool(residual) and i > 0 and a == b
                       for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])))
    # The head keeps the plain dot: its output gradient is the loss's elementwise
    # chain, which XLA:CPU recomputes inside the outer-product loop (a federated MLP
    # round of 50 clients took 16.8 against 12.1 ms that way; not a kept benchmark).
    self.head = nnx.Linear(sizes[-1], num_classes, **kw)
    self.dtype = dtype

  def __call__(self, x: jax.Array) -> ModelOutput:
    nd = len(self.input_shape)
    h = jnp.reshape(x, (*x.shape[: x.ndim - nd], -1)).astype(self.dtype)
    features = {}
    for i, (lin, nrm, skip) in enumerate(zip(self.hidden, self.norms, self.skips)):
      u = lin(h)
      if nrm is not None:
        u = nrm(u)
      u = jax.nn.relu(u)
      if self.dropout is not None:
        u = self.dropout(u)
      h = h + u if skip else u
      features[f'stage{i + 1}'] = h
    features['penultimate'] = h
    return ModelOutput(self.head(h), features)


@register('mlp')
def _mlp(*, num_classes, input_shape, rngs, dtype, **kwargs) -> MLP:
  return MLP(input_shape, num_classes, rngs=rngs, dtype=dtype, **kwargs)
