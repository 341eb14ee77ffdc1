"""The config of a federated run: its defaults, and the checks that refuse a bad one.

The vocabulary is the training runs' (:mod:`kdjax.engine.config`): ``seed``,
``data.name``, ``model.name`` / ``model.kwargs``, ``optimizer`` (each client's:
``name``, ``learning_rate``, ``momentum``, ...), ``batch_size`` (a client's minibatch),
``eval_every``, ``checkpoint_every``, ``keep_checkpoints``, ``mesh``, ``progress``;
plus the federation: ``num_clients``, ``clients_per_round``, ``num_rounds``,
``local_epochs``, ``partition``, ``algorithm``, ... The names of older kdjax versions
(``dataset``, ``model_options``, ``local.lr``, ...) are refused with the new name.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping

import jax.numpy as jnp
import ml_collections

from kdjax.config import RENAMED
from kdjax.config import check_int
from kdjax.config import check_number
from kdjax.config import check_numbers_in
from kdjax.errors import UserError

SAMPLING = ('uniform', 'size')
CLIENT_OPTIMIZERS = ('sgd', 'adam', 'adamw')
# Algorithms whose client update assumes plain SGD steps of optimizer.learning_rate.
SGD_ONLY = ('scaffold', 'fednova')


def base_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.data = ml_collections.ConfigDict({'name': 'mnist1d', 'data_dir': ''})
  c.model = ml_collections.ConfigDict({'name': 'mlp', 'kwargs': {}, 'dtype': 'float32'})
  # Each client's optimizer, reset every round.
  c.optimizer = ml_collections.ConfigDict({'name': 'sgd', 'learning_rate': 0.05,
                                           'momentum': 0.0, 'weight_decay': 0.0,
                                           'grad_clip_norm': 0.0})
  c.batch_size = 10             # a client's minibatch
  c.local_epochs = 2            # passes over its data per round
  c.num_clients = 100
  c.clients_per_round = 10
  c.num_rounds = 200
  c.sampling = 'uniform'        # or 'size' (probability proportional to example count)
  c.dropout = 0.0               # fraction of the cohort that fails to report
  c.clients_per_chunk = 0       # 0: one vmap of the cohort; on CPU ~25 per chunk is faster for big cohorts
  c.mesh = ()                   # e.g. [('clients', -1)]: shard the client axis over devices
  c.client_models = ()          # heterogeneous architectures (configs/fed/mnist1d_hetero.py)
  c.partition = ml_collections.ConfigDict({
      'method': 'dirichlet', 'alpha': 0.5, 'min_size': 10, 'test_fraction': 0.2})
  c.feature_skew = ml_collections.ConfigDict()   # e.g. {'kind': 'noise', 'strength': 0.1}
  c.proxy_size = 0              # unlabeled proxy examples held out of train (FedDF needs > 0)
  c.algorithm = 'fedavg'
  c.algorithm_options = ml_collections.ConfigDict()
  c.eval_every = 10             # rounds; 0: at the end only
  c.checkpoint_every = 50       # rounds; 0: none
  c.keep_checkpoints = 2
  c.rounds_per_call = 10        # rounds per jitted call (lax.scan), cut at evaluations and
                                # checkpoints; the same results, fewer dispatches
  c.plots = True
  c.progress = True
  return c


def _plain(value):
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  return value


def check_renamed(config: ml_collections.ConfigDict) -> None:
  """Refuses a config written with the names of an older kdjax, naming the new one."""
  for old, new in RENAMED.items():
    node, found = config, True
    for part in old.split('.'):
      if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or part not in node:
        found = False
        break
      node = node[part]
    if found:
      raise UserError(f'config.{old} is now config.{new}; rename it in the config file')
  if isinstance(config.get('model'), str):
    raise UserError(f'config.model is now a group: config.model.name={config.model!r} and '
                    'config.model.kwargs (formerly model_options)')


def validate(config: ml_collections.ConfigDict) -> None:
  """Refuses, in one line, a federated config no run can use, before anything is read or
  written. What needs the data (the partition against the labels, a proxy set larger
  than the split) is checked by the setup."""
  from kdjax.federated.algorithms import ALGORITHMS
  from kdjax.federated.partition import PARTITIONERS
  check_renamed(config)
  check_int(config, 'seed', 0)
  check_int(config, 'num_clients', 1)
  check_int(config, 'clients_per_round', 1, int(config.num_clients))
  check_int(config, 'num_rounds', 0)
  check_int(config, 'eval_every', 0)
  check_int(config, 'checkpoint_every', 0)
  check_int(config, 'keep_checkpoints', 1)
  check_int(config, 'rounds_per_call', 1)
  check_int(config, 'batch_size', 1)
  check_int(config, 'local_epochs', 1)
  check_int(config, 'clients_per_chunk', 0)
  check_int(config, 'proxy_size', 0)
  chunk = int(config.clients_per_chunk)
  if chunk and int(config.clients_per_round) % chunk:
    raise UserError(f'config.clients_per_chunk ({chunk}) must divide config.clients_per_round '
                    f'({config.clients_per_round})')
  check_number(config, 'dropout', lambda v: 0 <= v < 1, 'in [0, 1)')
  if config.sampling not in SAMPLING:
    raise UserError(f'config.sampling must be one of {", ".join(SAMPLING)} '
                    f'(got {config.sampling!r})')
  _check_optimizer(config)
  _check_model(config.model, 'config.model')
  if not isinstance(config.data.name, str) or not config.data.name:
    raise UserError(f'config.data.name must name a data set (got {config.data.name!r})')
  _check_mesh(config.mesh)
  partition = dict(_plain(config.partition) or {})
  method = partition.pop('method', 'dirichlet')
  if method not in PARTITIONERS:
    raise UserError(f'config.partition.method must be one of {", ".join(PARTITIONERS)} '
                    f'(got {method!r})')
  check_numbers_in(partition, 'config.partition', lambda v: v >= 0, '>= 0')
  if 'test_fraction' in partition and not 0 <= float(partition['test_fraction']) < 1:
    raise UserError('config.partition.test_fraction must be in [0, 1), got '
                    f'{partition["test_fraction"]!r}')
  if 'alpha' in partition and not float(partition['alpha']) > 0:
    raise UserError(f'config.partition.alpha must be positive, got {partition["alpha"]!r}')
  check_numbers_in(_plain(config.feature_skew) or {}, 'config.feature_skew', lambda v: v >= 0,
                   '>= 0')
  if config.algorithm not in ALGORITHMS:
    raise UserError(f'config.algorithm must be one of {", ".join(ALGORITHMS)} '
                    f'(got {config.algorithm!r})')
  check_algorithm_options(config.algorithm, _plain(config.algorithm_options) or {},
                          'config.algorithm_options')
  if config.algorithm in SGD_ONLY and config.optimizer.name != 'sgd':
    raise UserError(f'{config.algorithm} assumes SGD clients: set config.optimizer.name=sgd')
  for i, entry in enumerate(config.client_models or ()):
    entry = dict(_plain(entry))
    unknown = set(entry) - {'name', 'kwargs', 'dtype', 'fraction'}
    if unknown or 'name' not in entry:
      raise UserError(f'config.client_models[{i}] needs a name (and optionally kwargs and '
                      f'fraction); got keys {sorted(entry)}')
    _check_model(entry, f'config.client_models[{i}]')
    fraction = entry.get('fraction', 1.0)
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not fraction > 0 \
        or fraction != fraction or fraction == float('inf'):
      raise UserError(f'config.client_models[{i}].fraction must be positive, got {fraction!r}')


def check_algorithm_options(algorithm: str, options: Mapping, where: str) -> None:
  """Option names the algorithm takes, and finite numbers ``>= 0`` for values."""
  from kdjax.federated.algorithms import ALGORITHMS
  params = inspect.signature(ALGORITHMS[algorithm]).parameters
  named = [p for p, v in params.items() if v.kind == v.KEYWORD_ONLY]
  unknown = sorted(set(options) - set(named))
  if unknown:
    raise UserError(f'{where}: {algorithm} has no option {", ".join(map(repr, unknown))}; '
                    f'its options: {", ".join(named)}')
  check_numbers_in(dict(options), where, lambda v: v >= 0, '>= 0')


def _check_optimizer(config) -> None:
  if config.optimizer.name not in CLIENT_OPTIMIZERS:
    raise UserError(f'config.optimizer.name must be one of {", ".join(CLIENT_OPTIMIZERS)} '
                    f'(got {config.optimizer.name!r})')
  check_number(config, 'optimizer.learning_rate', lambda v: v > 0, 'positive')
  check_number(config, 'optimizer.momentum', lambda v: 0 <= v < 1, 'in [0, 1)')
  check_number(config, 'optimizer.weight_decay', lambda v: v >= 0, '>= 0')
  check_number(config, 'optimizer.grad_clip_norm', lambda v: v >= 0, '>= 0')


def _check_model(model, where: str) -> None:
  model = dict(_plain(model))
  if not isinstance(model.get('name'), str):
    raise UserError(f'{where}.name must name a model (got {model.get("name")!r})')
  check_numbers_in(dict(_plain(model.get('kwargs')) or {}), f'{where}.kwargs', lambda v: v >= 0,
                   '>= 0')
  try:
    jnp.dtype(model.get('dtype') or 'float32')
  except TypeError:
    raise UserError(f'{where}.dtype must name a dtype such as float32 '
                    f'(got {model.get("dtype")!r})') from None


def _check_mesh(mesh) -> None:
  axes = list(mesh or ())
  if not axes:
    return
  ok = (len(axes) == 1 and isinstance(axes[0], (list, tuple)) and len(axes[0]) == 2
        and isinstance(axes[0][0], str) and isinstance(axes[0][1], int)
        and not isinstance(axes[0][1], bool) and (axes[0][1] == -1 or axes[0][1] >= 1))
  if not ok:
    raise UserError(f"config.mesh must be one axis such as [('clients', -1)], got {axes}")
