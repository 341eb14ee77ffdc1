"""Config files: ``path/to/file.py[:arg]`` with ``get_config(arg)``, and overrides.

Overrides are ``--config.a.b=value``; the value is read as a Python literal when it
parses as one (``3e-3``, ``[('data', -1)]``, ``{'kd': {'weight': 1.0}}``) and as a
string otherwise. Unknown keys and wrong types are refused with a
:class:`~kdjax.errors.UserError`.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import math
import numbers
import os
from collections.abc import Mapping, Sequence
from typing import Any, Callable

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


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """The config as plain JSON data (what ``WORKDIR/config.json`` holds)."""
  return json.loads(config.to_json_best_effort())


# Groups whose values are mappings or lists read as a whole (not merged key by key).
_WHOLE = ('terms', 'kwargs', 'augment', 'options')
_TUPLE_LISTS = ('mesh', 'partition_rules')


def merge(config: ml_collections.ConfigDict, raw: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """Writes ``raw`` (a config as JSON data) over ``config``, adding keys it lacks.

  >>> c = ml_collections.ConfigDict({'a': 1, 'g': {'b': 2}})
  >>> merge(c, {'g': {'b': 3, 'new': [1]}, 'mesh': [['data', -1]]}).to_dict()
  {'a': 1, 'g': {'b': 3, 'new': [1]}, 'mesh': [('data', -1)]}
  """
  for key, value in raw.items():
    if (isinstance(value, dict) and key in config
        and isinstance(config[key], ml_collections.ConfigDict) and key not in _WHOLE):
      merge(config[key], value)
      continue
    with config.ignore_type():
      if isinstance(value, dict):
        value = ml_collections.ConfigDict(value)
      elif key in _TUPLE_LISTS and isinstance(value, list):
        value = [tuple(v) for v in value]
      config[key] = value
  return config


def from_dict(raw: Mapping[str, Any]) -> ml_collections.ConfigDict:
  """A config from JSON data (a workdir's ``config.json``)."""
  return merge(ml_collections.ConfigDict(), raw)


# Config keys that were renamed: --config.<old> is refused with the new name.
RENAMED = {
    'dataset': 'data.name',
    'model_options': 'model.kwargs',
    'local.lr': 'optimizer.learning_rate',
    'local.momentum': 'optimizer.momentum',
    'local.batch_size': 'batch_size',
    'local.epochs': 'local_epochs',
    'local': 'batch_size, local_epochs and optimizer',
}


def renamed_hint(dotted: str) -> str | None:
  """The one-line hint for an old config key, or None.

  >>> renamed_hint('local.lr')
  'config.local.lr is now config.optimizer.learning_rate'
  """
  for old in sorted(RENAMED, key=len, reverse=True):
    if dotted == old or dotted.startswith(old + '.'):
      return f'config.{old} is now config.{RENAMED[old]}'
  return None


# --------------------------------------------------------------------------- checks

def with_defaults(section, defaults: Mapping[str, Any], *, dotted: str, what: str) -> dict:
  """``section`` (a config section or dict) as a dict over ``defaults``; a field that
  ``defaults`` does not have is a one-line :class:`UserError`.

  Args:
    section: the fields set (a ``ConfigDict`` or a mapping).
    defaults: every field with its default.
    dotted: the section's path under ``config`` (for the message).
    what: what its options are of, after "is not" (``'a DML option'``).

  >>> with_defaults({'weight': 2.0}, {'weight': 1.0, 'temperature': 4.0}, dotted='scheme',
  ...               what='a DML option')
  {'weight': 2.0, 'temperature': 4.0}
  >>> with_defaults({'tau': 2.0}, {'weight': 1.0}, dotted='scheme', what='a DML option')
  Traceback (most recent call last):
  kdjax.errors.UserError: config.scheme.tau is not a DML option; its options are weight
  """
  raw = section.to_dict() if hasattr(section, 'to_dict') else dict(section)
  unknown = sorted(set(raw) - set(defaults))
  if unknown:
    raise UserError(f'config.{dotted}.{unknown[0]} is not {what}; its options are '
                    f'{", ".join(defaults)}')
  return {**defaults, **raw}


def check_number(config: ml_collections.ConfigDict, dotted: str, ok: Callable[[float], bool],
                 what: str, *, integer: bool = False) -> None:
  """Raises a one-line :class:`UserError` unless ``config.<dotted>`` is a finite number
  (an integer if ``integer``) with ``ok(value)`` true; ``what`` says what it must be.

  >>> c = ml_collections.ConfigDict({'optimizer': {'learning_rate': -1.0}})
  >>> check_number(c, 'optimizer.learning_rate', lambda v: v > 0, 'positive')
  Traceback (most recent call last):
  kdjax.errors.UserError: config.optimizer.learning_rate must be positive, got -1.0
  """
  value = get(config, dotted)
  valid = (isinstance(value, numbers.Real) and not isinstance(value, bool)
           and math.isfinite(float(value)) and (not integer or float(value).is_integer()))
  if not valid or not ok(float(value)):
    kind = 'an integer ' if integer else ('' if valid else 'a number ')
    raise UserError(f'config.{dotted} must be {kind}{what}, got {value!r}')


def check_int(config, dotted: str, low: int, high: int | None = None) -> None:
  """``config.<dotted>`` is an integer in ``[low, high]``."""
  what = f'>= {low}' if high is None else f'in [{low}, {high}]'
  check_number(config, dotted, lambda v: v >= low and (high is None or v <= high), what,
               integer=True)


def check_numbers_in(tree, where: str, ok: Callable[[float], bool], what: str) -> None:
  """Every number anywhere in ``tree`` (nested mappings and lists) is finite with
  ``ok(value)``; else a one-line :class:`UserError` naming the top-level key.

  >>> check_numbers_in({'hidden': (100, -1)}, 'config.model.kwargs', lambda v: v >= 0, '>= 0')
  Traceback (most recent call last):
  kdjax.errors.UserError: config.model.kwargs.hidden must hold finite numbers >= 0, got (100, -1)
  """
  def bad(node) -> bool:
    if isinstance(node, bool) or node is None or isinstance(node, str):
      return False
    if isinstance(node, numbers.Real):
      return not math.isfinite(float(node)) or not ok(float(node))
    if isinstance(node, (Mapping, ml_collections.ConfigDict)):
      return any(bad(v) for v in node.values())
    if isinstance(node, (list, tuple)):
      return any(bad(v) for v in node)
    return False

  items = tree.items() if isinstance(tree, (Mapping, ml_collections.ConfigDict)) else ()
  for key, value in items:
    if bad(value):
      shown = value.to_dict() if isinstance(value, ml_collections.ConfigDict) else value
      raise UserError(f'{where}.{key} must hold finite numbers {what}, got {shown!r}')


def get(config, dotted: str):
  """``config.<dotted>`` or None when a part is missing."""
  node = config
  for part in dotted.split('.'):
    if not isinstance(node, (Mapping, ml_collections.ConfigDict)) or part not in node:
      return None
    node = node[part]
  return node


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
      hint = renamed_hint(dotted)
      if hint:
        raise UserError(f'unknown config key {dotted!r}: {hint}')
      raise UserError(f'unknown config key {".".join(parents[:i + 1])!r} in --config.{dotted}; '
                      f'see the config file for the keys it has')
    node = node[part]
  if not isinstance(node, ml_collections.ConfigDict):
    raise UserError(f'--config.{dotted}: {".".join(parents)!r} is not a group of keys')
  value = parse_value(text)
  # Free-form mappings accept new keys; whoever consumes them refuses unknown ones.
  free_form = parents and parents[-1] in FREE_FORM_GROUPS
  if leaf not in node and not free_form:
    hint = renamed_hint(dotted)
    if hint:
      raise UserError(f'unknown config key {dotted!r}: {hint}')
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
