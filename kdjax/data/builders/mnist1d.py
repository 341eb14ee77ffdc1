"""MNIST-1D as a TFDS builder that writes array_record files (no TensorFlow).

Splits:

* ``train`` (4000) and ``test`` (1000): the standard MNIST-1D data set, exactly
  ``mnist1d.data.make_dataset(mnist1d.data.get_dataset_args())`` (seed 42, 5000
  samples, an 80/20 split). Record ``i`` of ``train`` is row ``i`` of that call's
  ``x``/``y``; record ``i`` of ``test`` is row ``i`` of ``x_test``/``y_test``.
* ``transfer``: extra unlabeled signals for distillation, drawn from the same
  generator with other seeds. The split is made of chunks of
  ``TRANSFER_CHUNK`` signals; chunk ``c`` is
  ``make_dataset(num_samples=TRANSFER_CHUNK, seed=TRANSFER_SEED + c)`` (class
  balanced, shuffled, standardized by its own mean and std like every MNIST-1D
  draw; the per-chunk scale differs from the standard set's by about 1%). So the
  ``small`` config's transfer split is a prefix of the ``default`` config's.
  Transfer examples keep the generator's class in ``label`` (for diagnostics
  only) and carry ``labeled=False``; the kdjax pipeline turns them into
  ``label=-1``.

Records are written in generation order (shuffling at write time is disabled),
so a record's index in its split is a stable example id.

Signals are float32 ``(40,)`` and, as produced by MNIST-1D, already centered with
unit standard deviation over the whole draw.
"""

from __future__ import annotations

import dataclasses
import random

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

TRANSFER_CHUNK = 1000
TRANSFER_SEED = 10_000
SIGNAL_LENGTH = 40
NUM_CLASSES = 10

_CITATION = """\
@article{greydanus2020scaling,
  title={Scaling down Deep Learning},
  author={Greydanus, Sam},
  journal={arXiv preprint arXiv:2011.14439},
  year={2020}
}"""

_DESCRIPTION = """\
MNIST-1D (Greydanus 2020): 40-point one-dimensional signals made from ten digit
templates by padding, scaling, translation, correlated and iid noise and shear.
train/test are the standard 4000/1000 examples (seed 42); transfer is an extra
unlabeled split drawn with other seeds, for knowledge distillation.
"""


@dataclasses.dataclass
class Mnist1dConfig(tfds.core.BuilderConfig):
  """Builder config: how many signals the ``transfer`` split holds.

  Attributes:
    transfer_size: number of transfer signals; a multiple of ``TRANSFER_CHUNK``.
  """

  transfer_size: int = 40_000


def _draw(num_samples: int, seed: int, train_split: float) -> dict:
  """Runs MNIST-1D's own generator without disturbing global RNG state."""
  from mnist1d.data import get_dataset_args  # pylint: disable=g-import-not-at-top
  from mnist1d.data import make_dataset  # pylint: disable=g-import-not-at-top

  args = get_dataset_args()
  args.num_samples = num_samples
  args.seed = seed
  args.train_split = train_split
  np_state = np.random.get_state()
  py_state = random.getstate()
  try:
    return make_dataset(args)
  finally:
    np.random.set_state(np_state)
    random.setstate(py_state)


def standard_draw() -> dict:
  """The standard MNIST-1D data set (``make_dataset(get_dataset_args())``)."""
  from mnist1d.data import get_dataset_args  # pylint: disable=g-import-not-at-top

  args = get_dataset_args()
  return _draw(args.num_samples, args.seed, args.train_split)


def transfer_chunk(index: int) -> tuple[np.ndarray, np.ndarray]:
  """Signals and generator classes of transfer chunk ``index``."""
  data = _draw(TRANSFER_CHUNK, TRANSFER_SEED + index, 1.0)
  return data['x'].astype(np.float32), data['y'].astype(np.int64)


class Mnist1d(tfds.core.GeneratorBasedBuilder):
  """MNIST-1D with a configurable unlabeled transfer split."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {
      '1.0.0': 'train/test = standard MNIST-1D (seed 42); transfer split.',
  }
  BUILDER_CONFIGS = [
      Mnist1dConfig(
          name='default', transfer_size=40_000,
          description='transfer split of 40000 signals'),
      Mnist1dConfig(
          name='small', transfer_size=4_000,
          description='transfer split of 4000 signals (tests, laptops)'),
  ]

  # TFDS 4.9.10 finds a builder's file through the `importlib_resources`
  # package, which it only declares for Python < 3.9 (tensorflow/datasets#11212);
  # pointing at this file directly needs nothing extra.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=_DESCRIPTION,
        features=tfds.features.FeaturesDict({
            'signal': tfds.features.Tensor(
                shape=(SIGNAL_LENGTH,), dtype=np.float32),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            'labeled': tfds.features.Tensor(shape=(), dtype=np.bool_),
        }),
        supervised_keys=('signal', 'label'),
        homepage='https://github.com/greydanus/mnist1d',
        citation=_CITATION,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is generated locally.
    size = self.builder_config.transfer_size
    if size <= 0 or size % TRANSFER_CHUNK:
      raise ValueError(
          f'mnist1d transfer_size must be a positive multiple of '
          f'{TRANSFER_CHUNK}, got {size}.')
    data = standard_draw()
    return {
        'train': self._generate_examples(
            ((data['x'], data['y'], True),)),
        'test': self._generate_examples(
            ((data['x_test'], data['y_test'], True),)),
        'transfer': self._generate_examples(
            _transfer_chunks(size // TRANSFER_CHUNK)),
    }

  def _generate_examples(self, chunks):
    offset = 0
    for xs, ys, labeled in chunks:
      for i, (x, y) in enumerate(zip(xs, ys)):
        yield offset + i, {
            'signal': np.asarray(x, np.float32),
            'label': int(y),
            'labeled': labeled,
        }
      offset += len(ys)


def _transfer_chunks(num_chunks: int):
  for c in range(num_chunks):
    xs, ys = transfer_chunk(c)
    yield xs, ys, False
