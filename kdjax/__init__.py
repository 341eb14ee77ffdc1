"""kdjax: JAX-native knowledge distillation.

Pure-functional losses (:mod:`kdjax.losses`), sharded jitted train steps
(:mod:`kdjax.distill`), models (:mod:`kdjax.models`), data (:mod:`kdjax.data`).
"""

__version__ = '0.1.0'
