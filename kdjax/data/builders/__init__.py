"""kdjax's TFDS builders; importing this package registers them with TFDS.

They write ``array_record`` files through ``tfds.data_source`` and need no
TensorFlow.
"""

from kdjax.data.builders.mnist1d import Mnist1d
from kdjax.data.builders.shakespeare import Shakespeare
from kdjax.data.builders.shakespeare_lm import ShakespeareLM
from kdjax.data.builders.uci_digits import UciDigits
from kdjax.data.builders.shakespeare_lines import ShakespeareLines

NAMES = (
    Mnist1d.name,
    UciDigits.name,
    Shakespeare.name,
    ShakespeareLM.name,
    ShakespeareLines.name,
)
