"""Character-level recurrent language models (next-character classifiers).

``char_lstm`` is LEAF's Shakespeare model: an embedding of each character id
(dimension 8), stacked LSTM layers (two of 256 units), and a dense layer over
the vocabulary applied to the last position's hidden state. ``char_gru`` swaps
the cell for a GRU (three gates instead of four: about 3/4 of the recurrent
cost), a cheaper student.

The recurrence runs as one ``jax.lax.scan`` over time per layer; the input
projection of every time step is one matmul before the scan, so the scan body
is a single ``[batch, hidden] @ [hidden, gates * hidden]`` product. Everything
is a pure function of the parameters, so the model can be ``vmap``-ped over
federated clients.

LSTM (gate order ``i, f, g, o`` in the ``4 * hidden`` axis):

.. math::

   z_t = x_t W + h_{t-1} U + b,\\quad
   i, f, o = \\sigma(z^{i}), \\sigma(z^{f}), \\sigma(z^{o}),\\quad
   g = \\tanh(z^{g}),\\\\
   c_t = f \\odot c_{t-1} + i \\odot g,\\quad h_t = o \\odot \\tanh(c_t).

The forget-gate bias starts at 1 (Jozefowicz et al. 2015). GRU (gate order
``r, u, n`` in the ``3 * hidden`` axis, the candidate's recurrent part gated
after its matmul, as cuDNN does):

.. math::

   r, u = \\sigma(x_t W^{r,u} + h_{t-1} U^{r,u} + b^{r,u}),\\quad
   n = \\tanh(x_t W^{n} + b^{n}_x + r \\odot (h_{t-1} U^{n} + b^{n}_h)),\\\\
   h_t = (1 - u) \\odot n + u \\odot h_{t-1}.

Parameter counts (vocabulary ``V``, embedding ``E``, hidden ``H``, ``L``
layers, ``G = 4`` for the LSTM and ``3`` for the GRU; the GRU has a second bias
``b_h`` of ``G H``): ``V E + sum_l (d_l G H + H G H + G H) + H V + V`` with
``d_1 = E`` and ``d_l = H`` after. LEAF's model (``V = 76``) has 816,812.

References:
  Hochreiter & Schmidhuber, "Long Short-Term Memory", Neural Computation 1997.
  Cho et al., "Learning Phrase Representations using RNN Encoder-Decoder for
  Statistical Machine Translation", EMNLP 2014 (GRU).
  Caldas et al., "LEAF: A Benchmark for Federated Settings", arXiv:1812.01097
  (the Shakespeare LSTM: embedding 8, two LSTM layers of 256).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from kdjax.models.base import ModelOutput
from kdjax.models.registry import register

_GATES = {'lstm': 4, 'gru': 3}


def lstm_step(carry, z_x, u, dtype=jnp.float32):
  """One LSTM step given the precomputed input part ``z_x = x_t W + b``.

  Args:
    carry: ``(h, c)``, each ``[batch, hidden]``.
    z_x: ``[batch, 4 * hidden]``.
    u: ``[hidden, 4 * hidden]`` recurrent weights.
    dtype: matmul dtype.

  Returns:
    ``((h, c), h)``.
  """
  h, c = carry
  z = z_x + jnp.dot(h.astype(dtype), u.astype(dtype)).astype(z_x.dtype)
  i, f, g, o = jnp.split(z, 4, axis=-1)
  c = jax.nn.sigmoid(f) * c + jax.nn.sigmoid(i) * jnp.tanh(g)
  h = jax.nn.sigmoid(o) * jnp.tanh(c)
  return (h, c), h


def gru_step(h, z_x, u, b_h, dtype=jnp.float32):
  """One GRU step given the precomputed input part ``z_x = x_t W + b``.

  Args:
    h: ``[batch, hidden]``.
    z_x: ``[batch, 3 * hidden]``.
    u: ``[hidden, 3 * hidden]`` recurrent weights.
    b_h: ``[3 * hidden]`` recurrent bias (only its candidate third matters
      beyond ``b``; all of it is kept for a uniform layout).
    dtype: matmul dtype.

  Returns:
    ``(h, h)``.
  """
  z_h = jnp.dot(h.astype(dtype), u.astype(dtype)).astype(z_x.dtype) + b_h
  xr, xu, xn = jnp.split(z_x, 3, axis=-1)
  hr, hu, hn = jnp.split(z_h, 3, axis=-1)
  r = jax.nn.sigmoid(xr + hr)
  upd = jax.nn.sigmoid(xu + hu)
  n = jnp.tanh(xn + r * hn)
  h = (1.0 - upd) * n + upd * h
  return h, h


class RecurrentLayer(nnx.Module):
  """One LSTM or GRU layer over ``[batch, time, features]``, scanned over time."""

  def __init__(self, in_features: int, hidden: int, *, cell: str = 'lstm',
               dtype: Any = jnp.float32, param_dtype: Any = jnp.float32,
               rngs: nnx.Rngs):
    if cell not in _GATES:
      raise ValueError(f'cell must be one of {sorted(_GATES)}, got {cell!r}.')
    g = _GATES[cell]
    self.cell, self.hidden, self.dtype = cell, hidden, dtype
    init = nnx.initializers.lecun_normal()
    self.w = nnx.Param(init(rngs.params(), (in_features, g * hidden), param_dtype))
    self.u = nnx.Param(nnx.initializers.orthogonal()(
        rngs.params(), (hidden, g * hidden), param_dtype))
    b = jnp.zeros((g * hidden,), param_dtype)
    if cell == 'lstm':
      b = b.at[hidden:2 * hidden].set(1.0)   # forget gate
    self.b = nnx.Param(b)
    self.b_h = nnx.Param(jnp.zeros((g * hidden,), param_dtype)) if cell == 'gru' else None

  def __call__(self, x: jax.Array) -> jax.Array:
    """``[batch, time, in] -> [batch, time, hidden]`` hidden states."""
    batch = x.shape[0]
    state_dtype = jnp.promote_types(self.dtype, jnp.float32)   # float32 at least
    z = jnp.dot(x.astype(self.dtype), self.w[...].astype(self.dtype))
    z = (z + self.b[...].astype(z.dtype)).astype(state_dtype)
    z = jnp.swapaxes(z, 0, 1)                     # [time, batch, G * hidden]
    h0 = jnp.zeros((batch, self.hidden), state_dtype)
    u = self.u[...]
    if self.cell == 'lstm':
      step = lambda carry, zt: lstm_step(carry, zt, u, self.dtype)
      _, hs = jax.lax.scan(step, (h0, h0), z)
    else:
      b_h = self.b_h[...].astype(state_dtype)
      step = lambda h, zt: gru_step(h, zt, u, b_h, self.dtype)
      _, hs = jax.lax.scan(step, h0, z)
    return jnp.swapaxes(hs, 0, 1).astype(self.dtype)


class CharRNN(nnx.Module):
  """Embedding -> stacked LSTM/GRU layers -> dense over the vocabulary (last step).

  Features: ``'stage{l}'`` is layer ``l``'s hidden state at every position
  ``[batch, time, hidden]``; ``'penultimate'`` is the last layer's final hidden
  state ``[batch, hidden]`` (the head's input).

  Args:
    input_shape: ``(seq_len,)``; inputs are character ids (integers; float
      inputs holding integers, such as padded client arrays, are cast).
    num_classes: vocabulary size (output classes and embedding rows).
    embed_dim: embedding dimension.
    hidden: hidden units per layer (an int, or one per layer).
    layers: number of recurrent layers (when ``hidden`` is an int).
    cell: ``'lstm'`` or ``'gru'``.
    dtype: computation dtype of the matmuls (the recurrent state is kept in
      float32, or float64 when ``dtype`` is float64).
    param_dtype: parameter dtype.
    rngs: ``nnx.Rngs`` with ``params``.

  References:
    Caldas et al., arXiv:1812.01097 (LEAF).

  >>> from kdjax.models import create, functional
  >>> m = create('char_lstm', num_classes=76, input_shape=(80,), hidden=16)
  >>> apply, params, state = functional(m)
  >>> out, _ = jax.jit(apply)(params, state, jnp.zeros((3, 80), jnp.int32))
  >>> out.logits.shape, out.features['stage2'].shape, out.features['penultimate'].shape
  ((3, 76), (3, 80, 16), (3, 16))
  """

  def __init__(
      self,
      input_shape: Sequence[int],
      num_classes: int,
      *,
      embed_dim: int = 8,
      hidden: int | Sequence[int] = 256,
      layers: int = 2,
      cell: str = 'lstm',
      dtype: Any = jnp.float32,
      param_dtype: Any = jnp.float32,
      rngs: nnx.Rngs,
  ):
    if len(tuple(input_shape)) != 1:
      raise ValueError(
          f'char models take [seq_len] character ids, got input_shape {input_shape}.')
    sizes = (hidden,) * int(layers) if isinstance(hidden, int) else tuple(hidden)
    self.input_shape = tuple(input_shape)
    self.embed = nnx.Embed(num_classes, embed_dim, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)
    ins = (embed_dim, *sizes[:-1])
    self.rnn = nnx.List([
        RecurrentLayer(a, b, cell=cell, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        for a, b in zip(ins, sizes)])
    self.head = nnx.Linear(sizes[-1], num_classes, dtype=dtype,
                           param_dtype=param_dtype, rngs=rngs)

  def __call__(self, x: jax.Array) -> ModelOutput:
    h = self.embed(jnp.asarray(x).astype(jnp.int32))
    features = {}
    for i, layer in enumerate(self.rnn):
      h = layer(h)
      features[f'stage{i + 1}'] = h
    last = h[:, -1]
    features['penultimate'] = last
    return ModelOutput(self.head(last), features)


def num_params(num_classes: int, *, embed_dim: int = 8, hidden: int = 256,
               layers: int = 2, cell: str = 'lstm') -> int:
  """The parameter count of :class:`CharRNN` (the formula in the module doc).

  >>> num_params(76)   # LEAF's Shakespeare LSTM
  816812
  """
  g = _GATES[cell]
  total = num_classes * embed_dim + hidden * num_classes + num_classes
  d = embed_dim
  for _ in range(layers):
    total += d * g * hidden + hidden * g * hidden + g * hidden
    if cell == 'gru':
      total += g * hidden
    d = hidden
  return total


@register('char_lstm')
def _char_lstm(*, num_classes, input_shape, rngs, dtype, **kwargs) -> CharRNN:
  return CharRNN(input_shape, num_classes, cell='lstm', rngs=rngs, dtype=dtype, **kwargs)


@register('char_gru')
def _char_gru(*, num_classes, input_shape, rngs, dtype, **kwargs) -> CharRNN:
  return CharRNN(input_shape, num_classes, cell='gru', rngs=rngs, dtype=dtype, **kwargs)
