"""kdjax's data layer: TFDS sources, grain pipelines, seeded JAX augmentation.

Importing this package registers kdjax's TFDS builders (``mnist1d``,
``shakespeare``, ``shakespeare_lm``, ``uci_digits``). Records become standard examples ``{'x', 'label', 'id'}``; see
``kdjax.data.preprocessing`` for the normalization and the meaning of ``id``,
``kdjax.data.pipeline`` for sharding and epochs, ``kdjax.data.augment`` for how
augmentation keys derive from ``(seed, id, epoch)``.
"""

from kdjax.data import builders
from kdjax.data.augment import example_keys
from kdjax.data.augment import make_augment
from kdjax.data.augment import mix_draws
from kdjax.data.augment import normalize_spec
from kdjax.data.checkpoint import iterator_restore_args
from kdjax.data.checkpoint import iterator_save_args
from kdjax.data.errors import DataError
from kdjax.data.pipeline import make_eval_iterator
from kdjax.data.pipeline import make_train_iterator
from kdjax.data.pipeline import steps_per_epoch
from kdjax.data.preprocessing import preprocess
from kdjax.data.sources import DatasetSpec
from kdjax.data.sources import dataset_spec
from kdjax.data.sources import default_data_dir
from kdjax.data.sources import load_arrays
from kdjax.data.sources import load_source
from kdjax.data.sources import load_tokenizer
from kdjax.data.text import char_tokenizer
from kdjax.data.text import encode_documents
from kdjax.data.text import make_prompts
from kdjax.data.text import pack
from kdjax.data.text import train_bpe
