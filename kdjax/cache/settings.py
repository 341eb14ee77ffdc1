"""The settings of a language-model cache: the ``config.cache`` group and its checks.

A language-model distill config may carry a ``config.cache`` group
(:func:`cache_config`) naming how its teacher cache is built: the mode (per-token top-k
rows, per-token samples of the teacher, or teacher generations), ``k``, the codec, the
sampling settings and the decoding settings.
``kdjax cache build`` reads it (its flags override it), and a run that reads the cache
refuses one built with other settings (:func:`check_config_settings`).
"""

from __future__ import annotations

import math

import ml_collections

from kdjax import data as kdata
from kdjax.cache import codec as codec_lib
from kdjax.errors import UserError

MODES = ('topk', 'generate', 'sampled')
# 'sampled' mode (kdjax.cache.sampled): draws per token, proposal temperature, key seed.
SAMPLED_DEFAULTS = {'samples': 32, 'proposal_temperature': 1.0, 'seed': 0}
GENERATE_DEFAULTS = {'temperature': 0.0, 'top_k': 0, 'top_p': 1.0, 'max_new_tokens': 0,
                     'stop_at_eos': True, 'seed': 0}


def cache_config(*, mode: str = 'topk', k: int = 0, codec: str = 'f32+i32',
                 samples: int = SAMPLED_DEFAULTS['samples'],
                 proposal_temperature: float = SAMPLED_DEFAULTS['proposal_temperature'],
                 seed: int = SAMPLED_DEFAULTS['seed'], **generate) -> ml_collections.ConfigDict:
  """The ``config.cache`` group of a language-model distill config: how to build its cache.

  ``mode``: ``'topk'`` (per-token rows), ``'sampled'`` (per-token draws from the
  teacher, :mod:`kdjax.cache.sampled`: ``samples`` draws per token from the teacher at
  ``proposal_temperature``, keyed by ``seed``) or ``'generate'`` (sequence-level KD); ``k``:
  classes per token (0: the whole vocabulary); ``codec``: a
  :mod:`kdjax.cache.codec` name; ``chunk_size``: rows per chunk (0: a default);
  ``generate``: the decoding of ``'generate'`` (``temperature`` 0 is greedy; ``top_k``
  0 and ``top_p`` 1 cut nothing; ``max_new_tokens`` 0 fills the continuation;
  ``stop_at_eos``; the sampling ``seed``). The run that reads the cache refuses one
  built with other settings than its ``config.cache``.

  >>> c = cache_config(mode='generate', temperature=1.0)
  >>> c.mode, c.generate.temperature, c.generate.top_p
  ('generate', 1.0, 1.0)
  """
  unknown = set(generate) - set(GENERATE_DEFAULTS)
  if unknown:
    raise ValueError(f'unknown generate options {sorted(unknown)}; use {sorted(GENERATE_DEFAULTS)}')
  return ml_collections.ConfigDict({'mode': mode, 'k': k, 'codec': codec, 'chunk_size': 0,
                                    'samples': samples,
                                    'proposal_temperature': proposal_temperature,
                                    'seed': seed,
                                    'generate': {**GENERATE_DEFAULTS, **generate}})


def cache_settings(config, *, num_classes: int, mode: str | None = None, k: int | None = None,
                   codec: str | None = None) -> dict:
  """The token cache settings of ``config.cache`` (defaults without one), overridden by
  the arguments that are not None: ``{'mode', 'k', 'codec', 'generate', 'chunk_size',
  'samples', 'proposal_temperature', 'seed'}`` (``k`` 0 resolved to ``num_classes``,
  ``chunk_size`` 0: the default), checked.

  >>> import ml_collections
  >>> config = ml_collections.ConfigDict({'cache': cache_config(k=16, codec='int4+ef')})
  >>> s = cache_settings(config, num_classes=300, codec='log3+ef')
  >>> s['k'], s['codec'], s['generate']['temperature']
  (16, 'log3+ef', 0.0)
  """
  group = config.get('cache') if hasattr(config, 'get') else None
  group = group.to_dict() if hasattr(group, 'to_dict') else dict(group or {})
  mode = mode or group.get('mode') or 'topk'
  if mode not in MODES:
    raise UserError(f'the cache mode must be one of {", ".join(MODES)} (got {mode!r})')
  k = int(k if k is not None else (group.get('k') or num_classes))
  if not 1 <= k <= num_classes:
    raise UserError(f'cache k must be in [1, {num_classes}] (got {k})')
  codec = codec_lib.parse_codec(codec or group.get('codec') or 'f32+i32').name
  gen = {**GENERATE_DEFAULTS, **(group.get('generate') or {})}
  unknown = set(gen) - set(GENERATE_DEFAULTS)
  if unknown:
    raise UserError(f'config.cache.generate has unknown keys {sorted(unknown)}; it takes '
                    f'{", ".join(sorted(GENERATE_DEFAULTS))}')
  gen = {'temperature': float(gen['temperature']), 'top_k': int(gen['top_k']),
         'top_p': float(gen['top_p']), 'max_new_tokens': int(gen['max_new_tokens']),
         'stop_at_eos': bool(gen['stop_at_eos']), 'seed': int(gen['seed'])}
  if not (math.isfinite(gen['temperature']) and gen['temperature'] >= 0) or gen['top_k'] < 0 \
      or not 0 < gen['top_p'] <= 1 or gen['max_new_tokens'] < 0 or gen['seed'] < 0:
    raise UserError(f'config.cache.generate {gen}: temperature must be >= 0 (0: greedy), top_k '
                    '>= 0 (0: off), top_p in (0, 1], max_new_tokens >= 0 (0: fill) and seed >= 0')
  chunk_size = int(group.get('chunk_size') or 0)
  sampled = {key: group.get(key, default) for key, default in SAMPLED_DEFAULTS.items()}
  sampled = {'samples': int(sampled['samples']),
             'proposal_temperature': float(sampled['proposal_temperature']),
             'seed': int(sampled['seed'])}
  if mode == 'sampled':
    n, t, most = sampled['samples'], sampled['proposal_temperature'], codec_lib.MAX_SAMPLES
    if not 1 <= n <= most or not (math.isfinite(t) and t > 0) or sampled['seed'] < 0:
      raise UserError(f'config.cache samples={n}, proposal_temperature={t}, '
                      f'seed={sampled["seed"]}: samples must be in [1, {most}], the proposal '
                      'temperature > 0 (1: the teacher itself) and the seed >= 0')
  return {'mode': mode, 'k': k, 'codec': codec, 'generate': gen, 'chunk_size': chunk_size,
          **sampled}


def is_token_data(spec: kdata.DatasetSpec) -> bool:
  """Whether a data set is token data (``[T]`` integer ids per example)."""
  return len(spec.input_shape) == 1 and spec.input_dtype.startswith('int')


def check_config_settings(manifest: dict, config, cache_dir: str, keys) -> None:
  """Refuses a cache whose build settings differ from the run config's ``config.cache``
  group (when the config has one) for ``keys`` (``k``, ``codec``, ...)."""
  wanted = config.get('cache') if hasattr(config, 'get') else None
  if wanted is None:
    return
  settings = cache_settings(config, num_classes=manifest['num_classes'])
  got = {key: manifest['settings'][key] for key in keys}
  want = {key: settings[key] for key in keys}
  if got != want:
    diff = ', '.join(f'{key} {got[key]!r} (config: {want[key]!r})' for key in keys
                     if got[key] != want[key])
    raise UserError(f'the teacher cache {cache_dir} was built with {diff}; rebuild it with '
                    '`kdjax cache build` and this config, or make config.cache match it')
