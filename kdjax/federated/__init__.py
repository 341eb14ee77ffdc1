"""vmap-simulated federated learning: partitioners, packing, algorithms, simulator.

Clients are a stacked pytree; a round samples a cohort and runs
``jax.vmap(client_update)`` over it inside one ``jax.jit``. See
:mod:`kdjax.federated.simulator` for the round, :mod:`kdjax.federated.base`
for the algorithm contract and :mod:`kdjax.federated.run` for ``kdjax fed run``.
"""

from kdjax.federated.algorithms import ALGORITHMS
from kdjax.federated.algorithms import make_algorithm
from kdjax.federated.base import ClientOutput
from kdjax.federated.base import FedAlgorithm
from kdjax.federated.base import ServerState
from kdjax.federated.base import server_optimizer
from kdjax.federated.ditto import ditto
from kdjax.federated.dsfl import dsfl
from kdjax.federated.edgefd import edgefd
from kdjax.federated.fd import fd
from kdjax.federated import groups
from kdjax.federated.fedavg import fedavg
from kdjax.federated.fedavg_ft import fedavg_ft
from kdjax.federated.fedbn import fedbn
from kdjax.federated.fedmd import fedmd
from kdjax.federated.fedd2s import fedd2s
from kdjax.federated.feddf import feddf
from kdjax.federated.fednova import fednova
from kdjax.federated.fedopt import fedadam
from kdjax.federated.fedopt import fedavgm
from kdjax.federated.fedopt import fedyogi
from kdjax.federated.fedprox import fedprox
from kdjax.federated.knfu import knfu
from kdjax.federated.local import LocalTrainer
from kdjax.federated.local import make_local_trainer
from kdjax.federated.local_only import local_only
from kdjax.federated.packing import ClientData
from kdjax.federated.packing import pack
from kdjax.federated.packing import pack_partition
from kdjax.federated.partition import FeatureSkew
from kdjax.federated.partition import Partition
from kdjax.federated.partition import apply_feature_skew
from kdjax.federated.partition import class_counts
from kdjax.federated.partition import dirichlet
from kdjax.federated.partition import feature_skew
from kdjax.federated.partition import format_stats
from kdjax.federated.partition import iid
from kdjax.federated.partition import make_partition
from kdjax.federated.partition import partition_stats
from kdjax.federated.partition import pathological
from kdjax.federated.partition import plot_heatmap
from kdjax.federated.partition import quantity_skew
from kdjax.federated.partition import shards
from kdjax.federated.scaffold import scaffold
from kdjax.federated.simulator import SimState
from kdjax.federated.simulator import client_sharding
from kdjax.federated.simulator import cohort_pass
from kdjax.federated.simulator import init_state
from kdjax.federated.simulator import make_evaluate
from kdjax.federated.simulator import make_personal_evaluate
from kdjax.federated.simulator import make_round
