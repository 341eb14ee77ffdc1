"""The teacher-inference cache: run the teacher once, distill at student-only cost.

``build_cache`` writes it (``kdjax cache build``), ``kdjax.cache.store`` describes the
layout on disk, ``open_for_run`` joins it to a distill run (``--config.teacher.cache=DIR``),
``inspect_cache``/``verify_cache`` report on it. Classifier caches hold per-example rows
(``kdjax.cache.read``); language-model caches hold per-token top-k rows in a compact codec
(``kdjax.cache.tokens``, ``kdjax.cache.codec``), per-token draws from the teacher
(Random-Sampling KD, ``kdjax.cache.sampled``) or the teacher's generated continuations
for sequence-level KD (``kdjax.cache.sequences``), set by a ``config.cache`` group
(``cache_config``).
"""

from kdjax.cache.build import build_cache
from kdjax.cache.codec import Codec
from kdjax.cache.codec import CodecError
from kdjax.cache.codec import bytes_per_token
from kdjax.cache.codec import decode
from kdjax.cache.codec import decode_samples
from kdjax.cache.codec import encode
from kdjax.cache.codec import encode_samples
from kdjax.cache.codec import layout
from kdjax.cache.codec import parse_codec
from kdjax.cache.codec import sample_bytes_per_token
from kdjax.cache.codec import sample_format
from kdjax.cache.codec import sample_layout
from kdjax.cache.fingerprint import dataset_fingerprint
from kdjax.cache.fingerprint import stream_dataset_fingerprint
from kdjax.cache.read import ChunkReader
from kdjax.cache.read import RunCache
from kdjax.cache.read import cache_kind
from kdjax.cache.read import choose_reader
from kdjax.cache.read import gather_rows
from kdjax.cache.read import open_cache
from kdjax.cache.report import inspect_cache
from kdjax.cache.report import verify_cache
from kdjax.cache.run import open_for_run
from kdjax.cache.sampled import SampledCache
from kdjax.cache.sequences import SequenceCache
from kdjax.cache.sequences import compose
from kdjax.cache.sequences import generation_key
from kdjax.cache.settings import cache_config
from kdjax.cache.tokens import TokenCache
from kdjax.cache.tokens import decode_rows
