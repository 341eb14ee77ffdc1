"""Raw TFDS records -> kdjax's standard example.

A standard example (or batch of them) is a dict:

* ``'x'``: float32, channels last: ``(40, 1)`` for MNIST-1D, ``(8, 8, 1)`` for
  UCI digits, ``(32, 32, 3)`` for CIFAR; int32 token ids ``(seq_len,)`` for
  Shakespeare (a recipe with ``dtype='int32'`` keeps integer inputs as they are).
* ``'label'``: int32 class, ``-1`` for an unlabeled example.
* ``'client'``: int32, only for data sets with natural clients (Shakespeare's
  speaking roles), passed through from the record.
* ``'mask'``: bool, only for token data with a loss mask (``shakespeare_lm``): which
  positions carry a target (``[seq_len]`` per example); the model inputs of packed
  sequences (``'segment_ids'``, ``'positions'``) and of prompt sets (``'prompt_ids'``,
  ``'prompt_mask'``, ...) pass through as int32 when the record has them.
* ``'id'``: int32, the record's index in its split. The pair ``(split, id)`` is the
  example's key: each split (``train``, ``test``, ``transfer``) has its own index
  space.

Normalization: images are divided by their maximum raw value (255, or 16 for UCI
digits) into [0, 1], then standardized per channel with the data set's usual
constants (the training split's mean and std). MNIST-1D signals are kept as they
are: its generator already centers them with unit standard deviation.
"""

from __future__ import annotations

import dataclasses
from typing import Mapping

import numpy as np

from kdjax.data.errors import DataError


@dataclasses.dataclass(frozen=True)
class Recipe:
  """How to turn one data set's records into standard examples.

  Attributes:
    input_key: record feature holding the input.
    scale: the input is divided by this (raw maximum; 1 keeps it as is).
    mean: per-channel mean subtracted after scaling, or None.
    std: per-channel std divided by after centering, or None.
    add_channel: append a channel axis (1-D signals).
    dtype: dtype of ``'x'``; an integer dtype (token ids) skips the scaling.
    extra_keys: record features passed through as int32 (``'client'``) when the
      record has them.
    label_key: record feature holding the label (``'targets'``: next tokens).
    mask_key: record feature holding a per-position loss mask, or None.
  """

  input_key: str
  scale: float = 1.0
  mean: tuple[float, ...] | None = None
  std: tuple[float, ...] | None = None
  add_channel: bool = False
  dtype: str = 'float32'
  extra_keys: tuple[str, ...] = ()
  label_key: str = 'label'
  mask_key: str | None = None


# Token records of the language-model sets: what passes through besides ids and targets.
_LM_KEYS = ('segment_ids', 'positions', 'prompt_ids', 'prompt_mask', 'continuation_ids',
            'continuation_mask')

# Per-channel statistics of the [0, 1]-scaled training images.
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN = (0.5071, 0.4865, 0.4409)
CIFAR100_STD = (0.2673, 0.2564, 0.2762)
MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
# Computed from kdjax's uci_digits train split (1437 images, pixels / 16).
DIGITS_MEAN = (0.3055,)
DIGITS_STD = (0.3761,)

RECIPES: dict[str, Recipe] = {
    'mnist1d': Recipe('signal', add_channel=True),
    'shakespeare': Recipe('x', dtype='int32', extra_keys=('client',)),
    'shakespeare_lm': Recipe('input_ids', dtype='int32', extra_keys=_LM_KEYS,
                             label_key='targets', mask_key='loss_mask'),
    # Lines for a BERT sentence encoder: the padding mask is the model's attention_mask
    # and the per-token `where` of its losses; targets are all -1 (no labels).
    'shakespeare_lines': Recipe('input_ids', dtype='int32',
                                extra_keys=('attention_mask', 'token_type_ids'),
                                label_key='targets', mask_key='attention_mask'),
    'uci_digits': Recipe('image', 16.0, DIGITS_MEAN, DIGITS_STD),
    'cifar10': Recipe('image', 255.0, CIFAR10_MEAN, CIFAR10_STD),
    'cifar100': Recipe('image', 255.0, CIFAR100_MEAN, CIFAR100_STD),
    'mnist': Recipe('image', 255.0, MNIST_MEAN, MNIST_STD),
    'fashion_mnist': Recipe('image', 255.0, FASHION_MNIST_MEAN,
                            FASHION_MNIST_STD),
}
# Catalog image data sets without an entry: [0, 1] scaling only.
_GENERIC_IMAGE = Recipe('image', 255.0)
# Records that already hold standard examples ('x' and maybe 'label').
_IDENTITY = Recipe('x')


def base_name(name: str) -> str:
  """``'mnist1d/small:1.0.0'`` -> ``'mnist1d'``."""
  return name.split('/')[0].split(':')[0]


def recipe_for(name: str | None, keys=()) -> Recipe:
  """The recipe for data set ``name`` (None: records are standard examples)."""
  if name is None:
    return _IDENTITY
  recipe = RECIPES.get(base_name(name))
  if recipe is None and 'image' in keys:
    recipe = _GENERIC_IMAGE
  if recipe is None:
    raise DataError(
        f'No preprocessing recipe for data set {name!r}: kdjax knows '
        f'{sorted(RECIPES)} and catalog data sets with an "image" feature.')
  return recipe


def preprocess(name: str | None, example: Mapping[str, np.ndarray],
               ids) -> dict[str, np.ndarray]:
  """Turns a raw record (or a batch of records, stacked) into a standard example.

  Args:
    name: data set name (``'mnist1d'``, ``'uci_digits'``, ``'cifar10'``, ...;
      a config or version suffix is ignored), or None when ``example`` already
      holds ``'x'`` (and optionally ``'label'``).
    example: the record's features as numpy arrays; a leading batch axis is
      allowed. ``label`` is optional; ``labeled=False`` marks unlabeled records.
    ids: the record index (or indices) in its split.

  Returns:
    ``{'x': float32 (or the recipe's integer dtype), 'label': int32, 'id':
    int32}``, plus the recipe's ``extra_keys``.

  >>> import numpy as np
  >>> raw = {'image': np.full((2, 8, 8, 1), 16, np.uint8), 'label': np.array([3, 7])}
  >>> out = preprocess('uci_digits', raw, np.array([5, 6]))
  >>> out['x'].shape, out['x'].dtype, out['label'].tolist(), out['id'].tolist()
  ((2, 8, 8, 1), dtype('float32'), [3, 7], [5, 6])
  >>> round(float(out['x'][0, 0, 0, 0]), 4)  # (1 - 0.3055) / 0.3761
  1.8466
  """
  recipe = recipe_for(name, example.keys())
  x = np.asarray(example[recipe.input_key]).astype(recipe.dtype)
  if recipe.scale != 1.0:
    x = x / np.float32(recipe.scale)
  if recipe.mean is not None:
    x = x - np.asarray(recipe.mean, np.float32)
  if recipe.std is not None:
    x = x / np.asarray(recipe.std, np.float32)
  if recipe.add_channel:
    x = x[..., None]
  ids = np.asarray(ids, np.int32)
  if recipe.label_key in example:
    label = np.asarray(example[recipe.label_key]).astype(np.int32)
  else:
    label = np.full(ids.shape, -1, np.int32)
  if 'labeled' in example:
    label = np.where(np.asarray(example['labeled'], bool), label, -1)
    label = label.astype(np.int32)
  out = {'x': x, 'label': label, 'id': ids}
  if recipe.mask_key is not None:
    out['mask'] = np.asarray(example[recipe.mask_key]).astype(bool)
  for key in recipe.extra_keys:
    if key in example:
      out[key] = np.asarray(example[key]).astype(np.int32)
  return out


def input_shape(name: str, feature_shape: tuple[int, ...]) -> tuple[int, ...]:
  """Shape of one standard ``'x'`` given the raw input feature's shape."""
  recipe = recipe_for(name, ('image',))
  return tuple(feature_shape) + ((1,) if recipe.add_channel else ())
