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
* ``dict(kind='mixup', alpha=1.0)``: example :math:`i` of the batch is mixed with its
  partner, the next example of the same batch (:math:`j = (i + 1) \\bmod B`, a fixed
  rule, so the partner is as deterministic as the batch), with a weight
  :math:`\\lambda_i \\sim \\mathrm{Beta}(\\alpha, \\alpha)` drawn from example :math:`i`'s
  key: :math:`\\tilde x_i = \\lambda_i x_i + (1 - \\lambda_i) x_j` (Zhang et al., ICLR
  2018, arXiv:1710.09412).
* ``dict(kind='cutmix', alpha=1.0)``: the same partner and :math:`\\lambda_i`; a region
  of the partner of :math:`1 - \\lambda_i` of the example's size is pasted into it. For
  1-D signals ``[batch, length(, channels)]`` the region is a segment of
  ``round((1 - lam) * length)`` samples at an offset uniform in ``[0, length - size]``;
  for images a box of ``round(H * sqrt(1 - lam))`` by ``round(W * sqrt(1 - lam))``
  pixels whose corner is uniform over the positions where it fits (Yun et al., ICCV
  2019, arXiv:1905.04899; the box is kept inside the image instead of clipped).

Mixup and cutmix do not mix the labels: they are meant for function matching
(``configs/mnist1d/function_matching.py``; Beyer et al., CVPR 2022,
arXiv:2106.05237), where the teacher labels the mixed input it is given, so a
mixed run trains on teacher terms only. The draws (:func:`mix_draws`) are pure
functions of ``(seed, id, epoch)``; the mixed view also depends on the partner, so a
teacher cache, which keys on ``(id, epoch)`` only, does not apply to them.
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
    'mixup': dict(alpha=1.0),
    'cutmix': dict(alpha=1.0),
}
MIX_KINDS = ('mixup', 'cutmix')


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
  if kind in MIX_KINDS and not out['alpha'] > 0:
    raise DataError(f'{kind} needs alpha > 0 (the Beta(alpha, alpha) of its mixing '
                    f'weight); got {out["alpha"]}.')
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


def mix_draws(seed, ids: jax.Array, epochs: jax.Array, *, alpha: float,
              length: int, width: int = 1) -> dict[str, jax.Array]:
  """The random draws of mixup and cutmix for a batch, each a pure function of its
  example's ``(seed, id, epoch)`` (:func:`example_keys`).

  Args:
    seed: the augmentation seed.
    ids: ``[batch]`` example ids.
    epochs: ``[batch]`` epochs.
    alpha: the Beta(alpha, alpha) parameter of the mixing weight.
    length: the signal length (images: the height).
    width: images: the width; 1 for signals.

  Returns:
    ``lam`` ``[batch]`` (the weight of the example itself), and cutmix's region:
    ``size`` ``[batch, 2]`` (rows, columns; columns 1 for signals) and ``start``
    ``[batch, 2]``.

  >>> d = mix_draws(0, jnp.arange(3), jnp.zeros(3, jnp.int32), alpha=1.0, length=40)
  >>> d['lam'].shape, d['size'].shape, bool(jnp.all(d['start'] + d['size'] <= 40))
  ((3,), (3, 2), True)
  """
  keys = example_keys(seed, ids, epochs)

  def one(key):
    k_lam, k_row, k_col = jax.random.split(key, 3)
    lam = jax.random.beta(k_lam, alpha, alpha)
    cut = 1.0 - lam
    if width == 1:
      size = jnp.stack([jnp.round(cut * length), jnp.float32(1)]).astype(jnp.int32)
    else:
      side = jnp.sqrt(cut)
      size = jnp.stack([jnp.round(side * length), jnp.round(side * width)]).astype(jnp.int32)
    row = jax.random.randint(k_row, (), 0, length - size[0] + 1)
    col = jax.random.randint(k_col, (), 0, width - size[1] + 1)
    return lam, size, jnp.stack([row, col])

  lam, size, start = jax.vmap(one)(keys)
  return {'lam': lam, 'size': size, 'start': start}


def _mix(kind: str, x: jax.Array, ids, epochs, *, seed, alpha: float) -> jax.Array:
  """Mixup or cutmix of a batch with its partners ``roll(x, -1)`` (module docstring)."""
  image = jnp.ndim(x) == 4
  if jnp.ndim(x) < 2:
    raise DataError(f'{kind} needs a batch [batch, length(, channels)] or images '
                    f'[batch, height, width, channels], got shape {x.shape}.')
  partner = jnp.roll(x, -1, axis=0)
  d = mix_draws(seed, ids, epochs, alpha=alpha, length=x.shape[1],
                width=x.shape[2] if image else 1)
  if kind == 'mixup':
    lam = d['lam'].astype(x.dtype).reshape((-1,) + (1,) * (x.ndim - 1))
    return lam * x + (1 - lam) * partner
  rows = jnp.arange(x.shape[1])
  inside = ((rows[None] >= d['start'][:, :1]) & (rows[None] < (d['start'] + d['size'])[:, :1]))
  if image:
    cols = jnp.arange(x.shape[2])
    across = ((cols[None] >= d['start'][:, 1:]) & (cols[None] < (d['start'] + d['size'])[:, 1:]))
    inside = inside[:, :, None] & across[:, None, :]
  inside = inside.reshape(inside.shape + (1,) * (x.ndim - inside.ndim))
  return jnp.where(inside, partner, x)


def make_augment(spec: str | Mapping[str, Any] | None) -> AugmentFn:
  """Builds ``augment(x, ids, epochs, *, seed) -> x`` for a spec.

  Args:
    spec: ``None``/``'none'``, or a dict with ``kind`` ``'signal'``, ``'image'``,
      ``'mixup'`` or ``'cutmix'`` and its options (see the module docstring).

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
  if kind in MIX_KINDS:
    alpha = spec['alpha']

    def mix(x, ids, epochs, *, seed):
      return _mix(kind, x, ids, epochs, seed=seed, alpha=alpha)
    return jax.jit(mix)
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
