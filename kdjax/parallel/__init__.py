"""Meshes, sharding rules, multi-host start-up and the compilation cache."""

from kdjax.parallel.compile_cache import enable_compilation_cache
from kdjax.parallel.distributed import initialize_from_env
from kdjax.parallel.mesh import batch_axes
from kdjax.parallel.mesh import batch_shards
from kdjax.parallel.mesh import batch_sharding
from kdjax.parallel.mesh import batch_spec
from kdjax.parallel.mesh import make_mesh
from kdjax.parallel.mesh import path_str
from kdjax.parallel.mesh import replicated
from kdjax.parallel.mesh import shardings_from_rules
from kdjax.parallel.multihost import put_rows
from kdjax.parallel.multihost import replicate_global
from kdjax.parallel.multihost import split_devices
