"""Config files: ``path/to/file.py[:arg]`` with ``get_config(arg)``, and overrides.

Overrides are ``--config.a.b=value``; the value is read as a Python literal when it
parses as one (``3e-3``, ``[('data', -1)]``, ``{'kd': {'weight': 1.0}}``) and as a
string otherwise. Unknown keys and wrong types are refused with a
:class:`~kdjax.errors.UserError`.
"""

from __future__ import annotations

import ast
import importlib.util
import os
from collections.abc import Sequence

import ml_collections

from kdjax.errors import UserError


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  """Loads ``file.py[:arg]`` and returns ``get_config(arg)``."""
  path, _, arg = spec.partition(':')
  if not os.path.isfile(path):
    raise UserError(f'config file {path} not found; pass --config path/to/config.py[:variant] '
                    '(see configs/)')
  module_name = '_kdjax_config_' + os.path.splitext(os.path.basename(path))[0]
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except SyntaxError as e:
    raise UserError(f'config file {path} has a syntax error at line {e.lineno}: {e.msg}') from None
  if not hasattr(module, 'get_config'):
    raise UserError(f'config file {path} defines no get_config(arg)')
  try:
    config = module.get_config(arg or None)
  except ValueError as e:
    raise UserError(f'config {spec}: {e}') from None
  if not isinstance(config, ml_collections.ConfigDict):
    raise UserError(f'get_config in {path} must return an ml_collections.ConfigDict')
  return config


def sibling(config_file: str, name: str):
  """Loads the config module ``name`` next to ``config_file`` (for configs built on others).

  Loaded by path under a unique module name, so ``configs/a/base.py`` and
  ``configs/b/base.py`` never shadow each other.
  """
  path = os.path.join(os.path.dirname(os.path.abspath(config_file)), name + '.py')
  unique = '_kdjax_config_' + os.path.abspath(path).replace(os.sep, '_').replace('.', '_')
  spec = importlib.util.spec_from_file_location(unique, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


# Config groups whose keys are options of something named elsewhere (loss terms, model
# kwargs, augmentation; a federated run's partition method, algorithm, model and feature
# skew): ``--config.<group>.<key>`` may add a key the config file did not list.
FREE_FORM_GROUPS = ('terms', 'kwargs', 'augment', 'partition', 'algorithm_options',
                    'model_options', 'feature_skew')


def parse_value(text: str):
  try:
    return ast.literal_eval(text)
  except (ValueError, SyntaxError):
    return text


def apply_override(config: ml_collections.ConfigDict, dotted: str, text: str) -> None:
  """Sets ``config.<dotted> = parse_value(text)``, refusing unknown keys and wrong types."""
  *parents, leaf = dotted.split('.')
  node = config
  for i, part in enumerate(parents):
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      raise UserError(f'unknown config key {".".join(parents[:i + 1])!r} in --config.{dotted}; '
                      f'see the config file for the keys it has')
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict):
    raise UserError(f'--config.{dotted}: {".".join(parents)!r} is not a group of keys')
  value = parse_value(text)
  # Free-form mappings accept new keys; whoever consumes them refuses unknown ones.
  free_form = parents and parents[-1] in FREE_FORM_GROUPS
  if leaf not in node and not free_form:
    known = ', '.join(sorted(node.keys()))
    raise UserError(f'unknown config key {dotted!r}; keys here: {known}')
  if leaf in node:
    old = node[leaf]
    value = _coerce(dotted, old, value)
  try:
    if isinstance(value, dict):
      value = ml_collections.ConfigDict(value)
      with node.ignore_type():
        node[leaf] = value
    else:
      node[leaf] = value
  except TypeError as e:
    raise UserError(f'--config.{dotted}={text}: wrong type ({e})') from None


def _coerce(dotted, old, value):
  if isinstance(old, bool):
    if isinstance(value, bool):
      return value
    if isinstance(value, str) and value.lower() in ('true', 'false'):
      return value.lower() == 'true'
    raise UserError(f'--config.{dotted} takes true or false (got {value!r})')
  if isinstance(old, int) and not isinstance(value, bool) and isinstance(value, int):
    return value
  if isinstance(old, float) and isinstance(value, (int, float)) and not isinstance(value, bool):
    return float(value)
  if isinstance(old, (int, float)) and not isinstance(old, bool):
    raise UserError(f'--config.{dotted} takes a {type(old).__name__} (got {value!r})')
  if isinstance(old, str) and not isinstance(value, str):
    return str(value)
  if isinstance(old, (list, tuple)) and not isinstance(value, (list, tuple)):
    raise UserError(f'--config.{dotted} takes a list (got {value!r})')
  if isinstance(old, ml_collections.ConfigDict) and not isinstance(value, dict):
    raise UserError(f'--config.{dotted} takes a mapping (got {value!r})')
  return value


def load_config(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
  config = load_config_file(spec)
  for dotted, text in overrides:
    apply_override(config, dotted, text)
  return config


def split_overrides(argv: Sequence[str]) -> tuple[list[str], list[tuple[str, str]]]:
  """Separates ``--config.x=v`` / ``--config.x v`` from the other arguments."""
  rest, overrides = [], []
  argv = list(argv)
  i = 0
  while i < len(argv):
    arg = argv[i]
    if arg.startswith('--config.'):
      key = arg[len('--config.'):]
      if '=' in key:
        key, value = key.split('=', 1)
      else:
        if i + 1 >= len(argv):
          raise UserError(f'{arg} needs a value: {arg}=VALUE')
        i += 1
        value = argv[i]
      overrides.append((key, value))
    else:
      rest.append(arg)
    i += 1
  return rest, overrides
