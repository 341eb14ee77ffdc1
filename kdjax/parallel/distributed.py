"""Multi-process start-up: ``jax.distributed`` from the environment.

On Cloud TPU and under SLURM ``jax.distributed.initialize()`` finds its peers by
itself. For explicit launches (and for the multi-process tests on one machine)
set ``KDJAX_COORDINATOR=host:port``, ``KDJAX_NUM_PROCESSES`` and
``KDJAX_PROCESS_ID``.
"""

from __future__ import annotations

import os

import jax

_initialized = False


def initialize_from_env() -> bool:
  """Initializes ``jax.distributed`` when the environment asks for it.

  Returns True when this is a multi-process run.
  """
  global _initialized
  if _initialized:
    return jax.process_count() > 1
  coordinator = os.environ.get('KDJAX_COORDINATOR')
  if coordinator:
    jax.distributed.initialize(
        coordinator_address=coordinator,
        num_processes=int(os.environ['KDJAX_NUM_PROCESSES']),
        process_id=int(os.environ['KDJAX_PROCESS_ID']),
    )
    _initialized = True
  elif os.environ.get('KDJAX_DISTRIBUTED_AUTO') == '1':
    jax.distributed.initialize()
    _initialized = True
  return jax.process_count() > 1
