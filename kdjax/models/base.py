"""The functional core every kdjax model is used through.

Models are Flax NNX modules. The train step, the cache builder and the federated
simulator never hold a module: they hold `(apply, params, state)` from
:func:`functional`, where ``apply`` is a pure function of pytrees that ``jit``,
``vmap`` and sharding can transform.
"""

from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


class ModelOutput(NamedTuple):
  """What every model returns.

  Attributes:
    logits: ``[batch, ..., num_classes]``, in the model's computation dtype.
    features: named intermediate activations. Every classifier provides
      ``'stage1' ... 'stageN'`` (block outputs, channels last) and
      ``'penultimate'`` (``[batch, dim]``, the input of the classifier head).
    attentions: for attention models, a tuple with one
      ``[batch, heads, query, key]`` array per layer; ``None`` otherwise (language
      models fill it only when called with ``output_attentions=True``).
    hidden_states: for transformers called with ``output_hidden_states=True``, the
      embedding output and every layer's output, ``[batch, tokens, width]`` each
      (``num_layers + 1`` arrays); ``None`` otherwise.
    qkv: for transformers called with ``output_qkv=True``, one ``(queries, keys,
      values)`` triple per layer, each ``[batch, tokens, heads * head_dim]`` (keys
      and values with the key/value heads), for MiniLM's value and MiniLMv2's
      query/key/value relations; ``None`` otherwise.
    cache: a decoder's key/value cache after the call, when it was called with one.
  """

  logits: jax.Array
  features: dict[str, jax.Array]
  attentions: tuple[jax.Array, ...] | None = None
  hidden_states: tuple[jax.Array, ...] | None = None
  qkv: tuple[tuple[jax.Array, jax.Array, jax.Array], ...] | None = None
  cache: Any = None


ApplyFn = Callable[..., tuple[ModelOutput, Any]]

# Batch entries that are model inputs besides ``x`` (packed token sequences, padding
# masks); the train step, the teacher and the evaluator pass those a batch has.
MODEL_INPUT_KEYS = ('segment_ids', 'positions', 'attention_mask', 'token_type_ids')


# What a transformer returns only when asked (``output_<name>=True``), and the names
# under which :func:`named_features` puts the per-layer ones among the features.
OUTPUTS = ('attentions', 'hidden_states', 'qkv')


# Activation rematerialization (``config.model.remat``): which intermediate values the
# backward pass keeps from the forward one; the others are recomputed. Transformers
# apply it per block, the other models around their whole forward (kdjax.engine.precision).
REMAT_POLICIES = ('none', 'full', 'dots_saveable', 'dots_with_no_batch_dims_saveable',
                  'nothing_saveable', 'save_attention_out')
# The name transformers give their attention output (before the output projection), which
# 'save_attention_out' keeps: the backward pass then recomputes the projections and the
# MLP but not the attention itself.
ATTENTION_OUT = 'attention_out'


def remat_policy(name: str) -> Callable[..., bool] | None:
  """The ``jax.checkpoint`` policy a :data:`REMAT_POLICIES` name stands for.

  ``'full'`` and ``'nothing_saveable'`` keep only the block's inputs (``'full'`` is
  ``jax.checkpoint``'s default policy, None; the other is the named policy, the same
  choice); ``'dots_saveable'`` keeps every matrix product's output,
  ``'dots_with_no_batch_dims_saveable'`` those without batch dimensions (the
  projections, not the attention scores); ``'save_attention_out'`` keeps the values
  named :data:`ATTENTION_OUT`.

  Raises:
    ValueError: ``'none'`` (no rematerialization: no policy) or an unknown name.

  >>> remat_policy('dots_saveable') is jax.checkpoint_policies.dots_saveable
  True
  >>> remat_policy('full') is None
  True
  """
  policies = jax.checkpoint_policies
  table = {
      'full': None,
      'dots_saveable': policies.dots_saveable,
      'dots_with_no_batch_dims_saveable': policies.dots_with_no_batch_dims_saveable,
      'nothing_saveable': policies.nothing_saveable,
      'save_attention_out': policies.save_only_these_names(ATTENTION_OUT),
  }
  if name not in table:
    raise ValueError(f'remat must be one of {REMAT_POLICIES} other than none, got {name!r}')
  return table[name]


def output_kwargs(names) -> dict:
  """``['attentions', ...]`` -> ``{'output_attentions': True, ...}`` (call keywords).

  >>> output_kwargs(['qkv'])
  {'output_qkv': True}
  """
  unknown = sorted(set(names) - set(OUTPUTS))
  if unknown:
    raise ValueError(f'unknown model outputs {unknown}; choose from {list(OUTPUTS)}')
  return {f'output_{name}': True for name in names}


def named_features(out: ModelOutput) -> dict:
  """``out.features`` plus the per-layer outputs a transformer was asked for, by name:
  ``hidden0`` (the embeddings), ``hidden1 .. hiddenL`` (each layer's output, the last one
  after the final norm for decoders, as Hugging Face returns them), and ``query{i}``,
  ``key{i}``, ``value{i}`` (layer ``i``'s projections, ``[batch, tokens, heads *
  head_dim]``), so the feature losses (``hidden_mse``, MiniLM's value relation) can name
  them with a layer map.

  >>> import jax.numpy as jnp
  >>> out = ModelOutput(jnp.zeros(1), {}, hidden_states=(jnp.zeros(1), jnp.ones(1)))
  >>> sorted(named_features(out))
  ['hidden0', 'hidden1']
  """
  features = dict(out.features)
  for i, h in enumerate(out.hidden_states or ()):
    features[f'hidden{i}'] = h
  for i, (q, k, v) in enumerate(out.qkv or (), 1):
    features.update({f'query{i}': q, f'key{i}': k, f'value{i}': v})
  return features


def objective_inputs(out: ModelOutput, labels, where, step, example_ids=None) -> dict:
  """What a loss objective reads of a student's forward pass: its logits, its named
  features (:func:`named_features`) and attentions, with the labels, the example mask,
  the step and, when given, the examples' ids."""
  inputs = {'labels': labels, 'where': where, 'step': step, 'student_logits': out.logits,
            'student_features': named_features(out), 'student_attentions': out.attentions}
  if example_ids is not None:
    inputs['example_ids'] = example_ids
  return inputs


def sample_inputs(out: ModelOutput, xp=np) -> dict:
  """:func:`objective_inputs` of a forward pass for an objective's ``init``: zero labels
  of the logits' leading shape, every example kept, step 0 (``xp``: numpy or jax.numpy)."""
  labels = xp.zeros(out.logits.shape[:-1], xp.int32)
  return objective_inputs(out, labels, xp.ones(labels.shape, bool), 0)


def model_kwargs(batch: dict) -> dict:
  """The entries of ``batch`` named in :data:`MODEL_INPUT_KEYS`, as call keywords.

  >>> sorted(model_kwargs({'x': 0, 'segment_ids': 1, 'label': 2}))
  ['segment_ids']
  """
  return {k: batch[k] for k in MODEL_INPUT_KEYS if k in batch}


def functional(module: nnx.Module) -> tuple[ApplyFn, nnx.State, nnx.State]:
  """Splits a module into a pure ``apply`` and its ``(params, state)``.

  ``params`` holds the trainable ``nnx.Param`` leaves; ``state`` holds the rest
  (batch statistics, RNG stream keys and counters). The returned function is

  ``apply(params, state, x, *, train=False, rng=None, **kwargs) -> (ModelOutput, new_state)``

  and is pure: the module is rebuilt inside it with ``nnx.merge`` from fresh
  variables, so neither ``module`` nor the arguments are mutated.

  * ``train`` (a Python bool, static under ``jit``) selects the training view
    of the module: ``nnx.BatchNorm`` normalises with batch statistics and
    updates its running averages in ``new_state``; ``nnx.Dropout`` is active.
    With ``train=False`` batch norm uses the stored averages and ``new_state``
    equals ``state``.
  * ``rng`` (a PRNG key, typed or raw ``uint32``) reseeds every RNG stream of
    the module for this call: stream ``i`` (in graph order) gets
    ``fold_in(rng, i)`` with its counter reset, so the dropout masks are a
    function of ``rng`` alone. The streams are put back afterwards, so
    ``new_state`` carries no trace of ``rng``. Without ``rng`` the streams
    stored in ``state`` are used and advanced, and ``new_state`` carries the
    advanced counters (still pure, but pass ``rng`` when stepping many clients
    from identical states under ``vmap``).
  * ``**kwargs`` go to the module's ``__call__``.

  The training and evaluation views are two ``GraphDef``s built once here with
  ``nnx.view``, which sets the ``deterministic`` / ``use_running_average``
  attributes of the modules that support them (flax's ``BatchNorm``,
  ``Dropout``, attention, ...).

  Args:
    module: an NNX module; it is not modified.

  Returns:
    ``(apply, params, state)``.

  >>> from kdjax.models import create
  >>> import jax.numpy as jnp
  >>> apply, params, state = functional(create('mlp', num_classes=10, input_shape=(40, 1)))
  >>> out, _ = jax.jit(apply)(params, state, jnp.zeros((2, 40, 1)))
  >>> out.logits.shape
  (2, 10)
  >>> sorted(out.features)
  ['penultimate', 'stage1', 'stage2']
  """
  graphdefs = {}
  for train in (False, True):
    view = nnx.view(
        module,
        deterministic=not train,
        use_running_average=not train,
        raise_if_not_found=False,
    )
    graphdefs[train] = nnx.split(view, nnx.Param, ...)[0]
  _, params, state = nnx.split(module, nnx.Param, ...)
  # Copies: later stateful use of `module` must not change what we return.
  params, state = jax.tree.map(lambda a: a, (params, state))

  def apply(
      params: nnx.State,
      state: nnx.State,
      x: Any,
      *,
      train: bool = False,
      rng: jax.Array | None = None,
      **kwargs: Any,
  ) -> tuple[Any, nnx.State]:
    if not isinstance(train, (bool, int, np.bool_)):
      raise TypeError(
          f'`train` must be a Python bool (static under jit), got {type(train)}.'
      )
    # Fresh Variable objects owned by the current trace: `merge` would otherwise
    # reuse (and the call would mutate) the caller's Variables, which is impure
    # and fails inside `grad`/`vmap` of an outer `jit`.
    params, state = jax.tree.map(lambda a: a, (params, state))
    model = nnx.merge(graphdefs[bool(train)], params, state)
    saved = _reseed(model, rng) if rng is not None else ()
    out = model(x, **kwargs)
    _restore(saved)
    new_state = nnx.split(model, nnx.Param, ...)[2]
    return out, new_state

  return apply, params, state


def count_params(tree: Any) -> int:
  """Number of scalar entries in a pytree (e.g. ``params`` from :func:`functional`).

  Args:
    tree: any pytree of arrays (or ``jax.ShapeDtypeStruct``), or an NNX module
      (its ``nnx.Param`` leaves).

  Returns:
    The total number of elements.

  >>> count_params({'w': jnp.zeros((3, 4)), 'b': jnp.zeros(4)})
  16
  """
  if isinstance(tree, nnx.Module):
    tree = nnx.state(tree, nnx.Param)
  return sum(math.prod(jnp.shape(leaf)) for leaf in jax.tree.leaves(tree))


def _as_typed_key(rng: jax.Array) -> jax.Array:
  rng = jnp.asarray(rng)
  if jnp.issubdtype(rng.dtype, jax.dtypes.prng_key):
    return rng
  return jax.random.wrap_key_data(rng)


def _reseed(model: nnx.Module, rng: jax.Array) -> tuple[tuple[Any, ...], ...]:
  """Gives every RNG stream in ``model`` a key derived from ``rng``.

  Returns the previous ``(stream, key, count)`` values for :func:`_restore`.
  """
  rng = _as_typed_key(rng)
  saved = []
  streams = [s for _, s in nnx.iter_graph(model) if isinstance(s, nnx.RngStream)]
  for i, stream in enumerate(streams):
    old_key, old_count = stream.key.get_value(), stream.count.get_value()
    saved.append((stream, old_key, old_count))
    key = jax.random.fold_in(rng, i)
    shape = tuple(old_key.shape)
    if shape:  # a stream holding a batch of keys (e.g. made by `split`)
      key = jax.random.split(key, shape)
    stream.key.set_value(key)
    stream.count.set_value(jnp.zeros(shape, dtype=old_count.dtype))
  return tuple(saved)


def _restore(saved: tuple[tuple[Any, ...], ...]) -> None:
  for stream, key, count in saved:
    stream.key.set_value(key)
    stream.count.set_value(count)
