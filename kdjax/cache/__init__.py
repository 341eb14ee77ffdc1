"""The teacher-inference cache: run the teacher once, distill at student-only cost.

``build_cache`` writes it (``kdjax cache build``), ``kdjax.cache.store`` describes the
layout on disk, ``kdjax.cache.read`` joins it to a distill run
(``--config.teacher.cache=DIR``), ``inspect_cache``/``verify_cache`` report on it.
"""

from kdjax.cache.build import build_cache
from kdjax.cache.codec import Codec
from kdjax.cache.codec import CodecError
from kdjax.cache.codec import bytes_per_token
from kdjax.cache.codec import decode
from kdjax.cache.codec import encode
from kdjax.cache.codec import layout
from kdjax.cache.codec import parse_codec
from kdjax.cache.fingerprint import dataset_fingerprint
from kdjax.cache.fingerprint import stream_dataset_fingerprint
from kdjax.cache.read import ChunkReader
from kdjax.cache.read import RunCache
from kdjax.cache.read import choose_reader
from kdjax.cache.read import gather_rows
from kdjax.cache.read import open_cache
from kdjax.cache.read import open_for_run
from kdjax.cache.report import inspect_cache
from kdjax.cache.report import verify_cache
