"""UCI handwritten digits (the 8x8 set bundled with scikit-learn) as a TFDS builder.

Images are stored raw: uint8 ``(8, 8, 1)`` with values 0..16 (each pixel counts
the "on" bits of a 4x4 block of the original 32x32 bitmap). The kdjax
preprocessing divides by 16.

Splits come from a seeded, stratified permutation of the 1797 examples
(``SPLIT_SEED``): ``test`` holds 360 examples (each class in proportion, rounded
by largest remainder), ``train`` the other 1437. Both keep scikit-learn's row
order, so record ``i`` of a split is row ``split_rows(...)[name][i]`` of
``load_digits()``, and a record's index in its split is a stable example id.
"""

from __future__ import annotations

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

SPLIT_SEED = 0
NUM_TEST = 360
NUM_CLASSES = 10

_CITATION = """\
@misc{alpaydin1998digits,
  title={Optical Recognition of Handwritten Digits},
  author={Alpaydin, E. and Kaynak, C.},
  howpublished={UCI Machine Learning Repository},
  year={1998},
  doi={10.24432/C50P49}
}"""

_DESCRIPTION = """\
1797 handwritten digits as 8x8 images with 17 grey levels (0..16), 10 classes,
from the UCI optical recognition of handwritten digits data (the copy bundled
with scikit-learn). Deterministic stratified 1437/360 train/test split.
"""


def split_rows(labels: np.ndarray, num_test: int = NUM_TEST,
               seed: int = SPLIT_SEED) -> dict[str, np.ndarray]:
  """Stratified train/test row indices, each sorted ascending.

  Args:
    labels: ``[n]`` integer class of every row.
    num_test: size of the test split.
    seed: seed of the per-class permutations.

  Returns:
    ``{'train': rows, 'test': rows}``, disjoint, covering ``range(n)``.
  """
  labels = np.asarray(labels)
  classes, counts = np.unique(labels, return_counts=True)
  quota = counts * num_test / len(labels)
  take = np.floor(quota).astype(int)
  # Largest remainder; ties go to the smaller class id (stable sort).
  order = np.argsort(-(quota - take), kind='stable')
  take[order[:num_test - take.sum()]] += 1
  rng = np.random.default_rng(seed)
  test = [rng.permutation(np.flatnonzero(labels == c))[:k]
          for c, k in zip(classes, take)]
  test = np.sort(np.concatenate(test))
  train = np.setdiff1d(np.arange(len(labels)), test)
  return {'train': train, 'test': test}


class UciDigits(tfds.core.GeneratorBasedBuilder):
  """UCI 8x8 handwritten digits from scikit-learn."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Stratified 1437/360 split, raw 0..16 pixels.'}

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
            'image': tfds.features.Tensor(shape=(8, 8, 1), dtype=np.uint8),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
        }),
        supervised_keys=('image', 'label'),
        homepage=(
            'https://archive.ics.uci.edu/dataset/80/'
            'optical+recognition+of+handwritten+digits'),
        citation=_CITATION,
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The data ships inside scikit-learn.
    from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

    digits = load_digits()
    images = digits.images.astype(np.uint8)[..., None]
    labels = digits.target.astype(np.int64)
    rows = split_rows(labels)
    return {name: self._generate_examples(images[r], labels[r])
            for name, r in rows.items()}

  def _generate_examples(self, images, labels):
    for i, (image, label) in enumerate(zip(images, labels)):
      yield i, {'image': image, 'label': int(label)}
