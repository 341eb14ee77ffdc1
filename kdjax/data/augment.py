"""Seeded data augmentation in JAX, applied on device inside the jitted step.

Every random choice for an example is a pure function of ``(seed, id, epoch)``:
the example's key is

.. math::

   k = \\mathrm{fold\\_in}(\\mathrm{fold\\_in}(\\mathrm{key}(seed), id), epoch)

(``jax.random.key``, a typed key; ``example_keys`` computes it), and each example
is transformed with its own key under ``jax.vmap``. So an example's augmented
view does not depend on which batch it lands in or where, a resumed run sees the
same views, and the teacher cache can key on ``(id, epoch)``.

Specs (``make_augment``):

* ``None`` or ``'none'``: identity (returns the input unchanged).
* ``dict(kind='signal', shift=0, scale=0.0, noise=0.0, mode='roll')`` for 1-D
  signals ``[batch, length]`` or ``[batch, length, channels]``: shift by an
  integer drawn uniformly from ``[-shift, shift]`` (``mode='roll'``: circular;
  ``'pad'``: zeros enter), multiply by a factor drawn uniformly from
  ``[1 - scale, 1 + scale]``, add Gaussian noise of std ``noise``, in that order.
* ``dict(kind='image', crop_padding=4, flip=True)`` for images
  ``[batch, height, width, channels]``: pad each side with ``crop_padding`` zeros
  (zero is the per-channel mean after kdjax's standardization), take a random
  crop of the original size (offsets uniform in ``[0, 2 * crop_padding]``), then
  flip left-right with probability 1/2.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import jax
import jax.numpy as jnp

from kdjax.data.errors import DataError

AugmentFn = Callable[..., jax.Array]

_DEFAULTS = {
    'none': {},
    'signal': dict(shift=0, scale=0.0, noise=0.0, mode='roll'),
    'image': dict(crop_padding=4, flip=True),
}


def normalize_spec(spec: str | Mapping[str, Any] | None) -> dict[str, Any]:
  """The spec with its kind and every default filled in (for manifests).

  >>> normalize_spec(None)
  {'kind': 'none'}
  >>> normalize_spec(dict(kind='image', flip=False))
  {'kind': 'image', 'crop_padding': 4, 'flip': False}
  """
  if spec is None or spec == 'none':
    return {'kind': 'none'}
  if isinstance(spec, str):
    spec = {'kind': spec}
  spec = dict(spec)
  kind = spec.pop('kind', None)
  if kind not in _DEFAULTS:
    raise DataError(
        f'Unknown augmentation kind {kind!r}; use one of {sorted(_DEFAULTS)}.')
  unknown = sorted(set(spec) - set(_DEFAULTS[kind]))
  if unknown:
    raise DataError(
        f'Unknown {kind!r} augmentation options {unknown}; allowed: '
        f'{sorted(_DEFAULTS[kind])}.')
  out = {'kind': kind, **_DEFAULTS[kind], **spec}
  for key, default in _DEFAULTS[kind].items():
    if key != 'mode':
      out[key] = type(default)(out[key])
  if kind == 'signal' and out['mode'] not in ('roll', 'pad'):
    raise DataError(f"Signal shift mode must be 'roll' or 'pad', got "
                    f"{out['mode']!r}.")
  negative = [k for k, v in out.items() if k not in ('kind', 'mode') and v < 0]
  if negative or out.get('scale', 0.0) >= 1.0:
    raise DataError(
        f'Augmentation options must be non-negative (and scale < 1); got '
        f'{out}.')
  return out


def example_keys(seed, ids: jax.Array, epochs: jax.Array) -> jax.Array:
  """Per-example typed keys ``fold_in(fold_in(key(seed), id), epoch)``."""
  base = jax.random.key(seed)
  fold = lambda i, e: jax.random.fold_in(jax.random.fold_in(base, i), e)
  return jax.vmap(fold)(jnp.asarray(ids), jnp.asarray(epochs))


def _shift_signal(x: jax.Array, s: jax.Array, mode: str) -> jax.Array:
  if mode == 'roll':
    return jnp.roll(x, s, axis=0)
  source = jnp.arange(x.shape[0]) - s
  inside = (source >= 0) & (source < x.shape[0])
  moved = jnp.take(x, jnp.clip(source, 0, x.shape[0] - 1), axis=0)
  inside = inside.reshape(inside.shape + (1,) * (x.ndim - 1))
  return jnp.where(inside, moved, jnp.zeros_like(moved))


def _signal_one(key, x, *, shift, scale, noise, mode):
  k_shift, k_scale, k_noise = jax.random.split(key, 3)
  if shift:
    s = jax.random.randint(k_shift, (), -shift, shift + 1)
    x = _shift_signal(x, s, mode)
  if scale:
    factor = jax.random.uniform(k_scale, (), x.dtype, 1.0 - scale, 1.0 + scale)
    x = x * factor
  if noise:
    x = x + noise * jax.random.normal(k_noise, x.shape, x.dtype)
  return x


def _image_one(key, x, *, crop_padding, flip):
  k_crop, k_flip = jax.random.split(key)
  if crop_padding:
    p = crop_padding
    padded = jnp.pad(x, ((p, p), (p, p), (0, 0)))
    dy, dx = jax.random.randint(k_crop, (2,), 0, 2 * p + 1)
    x = jax.lax.dynamic_slice(padded, (dy, dx, 0), x.shape)
  if flip:
    x = jnp.where(jax.random.bernoulli(k_flip), x[:, ::-1, :], x)
  return x


def make_augment(spec: str | Mapping[str, Any] | None) -> AugmentFn:
  """Builds ``augment(x, ids, epochs, *, seed) -> x`` for a spec.

  Args:
    spec: ``None``/``'none'``, or a dict with ``kind`` ``'signal'`` or
      ``'image'`` and its options (see the module docstring).

  Returns:
    A pure function of the batch ``x`` ``[batch, ...]``, the example ``ids``
    and ``epochs`` (``[batch]`` integers) and ``seed``; it keeps shape and dtype
    and works under ``jax.jit`` (``seed`` may be traced).

  >>> import jax.numpy as jnp
  >>> aug = make_augment(dict(kind='signal', shift=3, scale=0.1, noise=0.05))
  >>> x = jnp.ones((4, 40, 1))
  >>> y = aug(x, jnp.arange(4), jnp.zeros(4, jnp.int32), seed=0)
  >>> y.shape, y.dtype
  ((4, 40, 1), dtype('float32'))
  >>> bool(jnp.all(aug(x, jnp.arange(4), jnp.zeros(4, jnp.int32), seed=0) == y))
  True
  """
  spec = normalize_spec(spec)
  kind = spec.pop('kind')
  if kind == 'none':
    def identity(x, ids, epochs, *, seed):
      del ids, epochs, seed
      return x
    return identity
  one = _signal_one if kind == 'signal' else _image_one
  options = spec

  def augment(x, ids, epochs, *, seed):
    if kind == 'image' and jnp.ndim(x) != 4:
      raise DataError(
          f'Image augmentation needs [batch, height, width, channels], got '
          f'shape {x.shape}.')
    keys = example_keys(seed, ids, epochs)
    return jax.vmap(lambda k, xi: one(k, xi, **options))(keys, x)

  # Jitted so that eager calls compile once per shape; inside a jitted step
  # the inner jit is inlined.
  return jax.jit(augment)
