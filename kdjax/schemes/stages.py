r"""Multi-stage distillation: a run made of ordinary runs (stages), each stage's teacher an
earlier stage, run by one command that resumes stage by stage.

A stage is a small dict, ``{'name', 'config', 'teacher', 'overrides'}``:

* ``name``: its folder, ``WORKDIR/<name>/`` (letters, digits, ``_`` and ``-``);
* ``config``: a config file relative to ``configs/`` with an optional ``:variant``
  (``'mnist1d/kd.py:tiny'``), or an inline model (``{'name': 'mlp', 'kwargs': {...}}``)
  over the file ``config.scheme.base``;
* ``teacher``: ``None`` (trained from labels), the name of an EARLIER stage (its
  workdir is this stage's ``config.teacher.workdir``), or ``'external'``
  (``config.scheme.teacher_workdir``, a finished run of another command);
* ``overrides``: a partial config (nested mappings or dotted keys) over the file's;
  its key ``seed_offset`` (an integer) seeds the stage ``config.seed + seed_offset``.

A stage's config is its file, then the run's shared fields (``config.seed``,
``config.progress``, and ``config.data.name`` / ``config.data.data_dir`` when set), then
``config.scheme.overrides`` (every stage), then its own ``overrides``, then its teacher.
The list and every stage's config are checked before anything is written (unique names,
teachers that chain, a loss that reads the teacher exactly when there is one, and
:func:`kdjax.engine.validate`), each refusal in one line (:class:`UserError`, exit 2).

Each stage is an ordinary run of the engine in its own workdir, so the one command
resumes: a finished stage (its ``summary.json`` written at its final checkpoint, the
same config, distilled from the same teacher weights) is skipped, an interrupted one
resumes from its last checkpoint, and ``kill -9`` at any point ends, after a rerun, in
the result of an uninterrupted run. ``WORKDIR/summary.json`` lists every stage's summary
and the final stage's figures; ``WORKDIR/learning_curves.png`` draws every stage.

Two methods (``config.scheme.method``):

* ``'chain'``: the stages as listed; the teacher-assistant chain (TAKD, teacher ->
  assistant(s) -> student; ``configs/mnist1d/takd.py``) is one.
* ``'born_again'``: ``num_generations`` networks of one config file
  (``config.scheme.generation``): generation 0 from labels, generation g+1 from
  generation g with the loss ``config.scheme.born_again_loss`` (default: KL to the
  teacher's softmax at temperature 1, only). Generation g is seeded ``config.seed + g``.
  The born-again ensemble (the mean of the generations' softmax outputs on the eval
  split) is evaluated after the last generation: ``ban_ensemble_*`` over the born-again
  generations 1.., ``ensemble_all_*`` with generation 0 too; the logits it averages are
  kept in ``WORKDIR/predictions.npz``.

``config.scheme.teacher_workdir`` with ``config.scheme.teacher_stage`` stands a finished
run in for that stage (which is then not trained): ``--config.scheme.teacher_workdir=T``
distills the TAKD chain from an existing teacher.

References:
  Mirzadeh, Farajtabar, Li, Levine, Matsukawa, Ghasemzadeh. Improved Knowledge
  Distillation via Teacher Assistant. AAAI 2020. arXiv:1902.03393 (the chain teacher ->
  assistant -> student, each step the Hinton KD loss).

  Furlanello, Lipton, Tschannen, Itti, Anandkumar. Born Again Neural Networks. ICML
  2018. arXiv:1805.04770 (generation k+1 of the same architecture trained from the
  output distribution of generation k; Sec. 3.2: BAN ensembles, the average of the
  generations' predictions). The paper's loss is the cross-entropy to the teacher's
  softmax output; the ``kd`` term at temperature 1 used here is the KL divergence to it,
  which differs by the teacher's entropy, a constant, and so has the same gradient.
"""

from __future__ import annotations

import io
import os
import re
from collections.abc import Mapping
from typing import Any, NamedTuple

import jax
import ml_collections
import numpy as np

from kdjax import data as kdata
from kdjax import storage
from kdjax import teacher as teacher_lib
from kdjax import workdir as workdir_lib
from kdjax.config import FREE_FORM_GROUPS
from kdjax.config import check_int
from kdjax.config import config_to_dict
from kdjax.config import load_config_file
from kdjax.config import merge
from kdjax.config import with_defaults
from kdjax.engine import metrics as metrics_lib
from kdjax.engine.config import IDENTITY_FIELDS
from kdjax.engine.config import base_config
from kdjax.engine.config import validate
from kdjax.engine.loop import fit_workdir
from kdjax.engine.loop import write_summary
from kdjax.engine.setup import TEACHER_NEEDS
from kdjax.engine.setup import setup
from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.parallel import make_mesh

NAME = 'stages'
METHODS = ('chain', 'born_again')
EXTERNAL = 'external'
# config.scheme's fields and their defaults.
DEFAULTS = {
    'name': NAME,
    'method': 'chain',        # 'chain' | 'born_again'
    'stages': [],             # chain: the stage dicts, in order
    'num_generations': 3,     # born_again: networks trained, generation 0 included
    'generation': '',         # born_again: every generation's config file[:variant]
    # born_again: the loss terms of generations 1.. (KL to the teacher's softmax, T = 1).
    'born_again_loss': {'kd': {'weight': 1.0, 'temperature': 1.0}},
    'overrides': {},          # a partial config over every stage's file
    'base': '',               # the config file a stage with an inline model starts from
    'teacher_workdir': '',    # a finished run: teacher 'external', or standing in for ...
    'teacher_stage': '',      # ... this stage, which is then not trained
    'configs_dir': '',        # where stage config files are read ('': this checkout's configs/)
}
STAGE_KEYS = ('name', 'config', 'teacher', 'overrides')
PREDICTIONS = 'predictions.npz'
# Config groups an override replaces whole (as kdjax.config.merge reads them).
_WHOLE = ('terms', 'kwargs', 'augment', 'options')
_NAME_RE = re.compile(r'[A-Za-z0-9][A-Za-z0-9_-]*')
_CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__)))), 'configs')


class Stage(NamedTuple):
  """One planned stage.

  Attributes:
    name: its name (and folder).
    config: its full training config (the teacher's workdir set).
    teacher: the stage it learns from, ``'external'``, or None (from labels).
    workdir: its folder, ``WORKDIR/<name>``, or the external run standing in for it.
    external: True when ``workdir`` is a finished run not trained here.
  """

  name: str
  config: ml_collections.ConfigDict | None
  teacher: str | None
  workdir: str
  external: bool


def stages_config(**options) -> ml_collections.ConfigDict:
  """The config of a multi-stage run: the shared fields and ``scheme`` (:data:`DEFAULTS`
  with ``options`` over them).

  >>> c = stages_config(stages=[{'name': 't', 'config': 'mnist1d/teacher.py'}])
  >>> c.scheme.name, c.scheme.method, c.seed, c.data.name
  ('stages', 'chain', 0, '')
  """
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown stages options {sorted(unknown)}; use {", ".join(DEFAULTS)}')
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.progress = True
  # '' keeps each stage file's own; set, they replace it in every stage.
  c.data = ml_collections.ConfigDict({'name': '', 'data_dir': ''})
  stages = [ml_collections.ConfigDict(dict(s)) if isinstance(s, Mapping) else s
            for s in options.pop('stages', [])]   # groups: --config.scheme.stages[i] paths
  c.scheme = ml_collections.ConfigDict({**DEFAULTS, **options})
  c.scheme.stages = stages
  return c


# --------------------------------------------------------------------------- the list

def scheme_options(config: ml_collections.ConfigDict) -> dict:
  """``config.scheme`` checked, with :data:`DEFAULTS` for the fields it leaves out.

  Raises:
    UserError: an unknown field or method, or a number out of range.
  """
  options = with_defaults(config.scheme, DEFAULTS, dotted='scheme', what='a stages option')
  if options['method'] not in METHODS:
    raise UserError(f'config.scheme.method must be one of {", ".join(METHODS)} '
                    f'(got {options["method"]!r})')
  check_int(ml_collections.ConfigDict({'scheme': {'num_generations':
                                                  options['num_generations']}}),
            'scheme.num_generations', 2)
  for key in ('generation', 'base', 'teacher_workdir', 'teacher_stage', 'configs_dir'):
    if not isinstance(options[key], str):
      raise UserError(f'config.scheme.{key} must be a string (got {options[key]!r})')
  for key in ('overrides', 'born_again_loss'):
    if not isinstance(options[key], Mapping):
      raise UserError(f'config.scheme.{key} must be a mapping (got {options[key]!r})')
  if not isinstance(options['stages'], (list, tuple)):
    raise UserError(f'config.scheme.stages must be a list of stage dicts (got '
                    f'{options["stages"]!r})')
  probe = base_config()   # the born-again loss, checked whatever the method
  probe.loss.terms = ml_collections.ConfigDict(_plain(options['born_again_loss']))
  try:
    validate(probe)
  except UserError as e:
    raise UserError(str(e).replace('config.loss.terms', 'config.scheme.born_again_loss')
                    ) from None
  return options


def expand_stages(options: dict) -> list[dict]:
  """The stage dicts of ``options`` (:func:`scheme_options`): ``stages`` for a chain, or
  the generations ``gen0``, ``gen1``, ... of a born-again run.

  >>> [(s['name'], s['teacher']) for s in expand_stages({**DEFAULTS,
  ...     'method': 'born_again', 'generation': 'digits/student_baseline.py'})]
  [('gen0', None), ('gen1', 'gen0'), ('gen2', 'gen1')]
  """
  if options['method'] == 'chain':
    return [_plain(s) for s in options['stages']]
  if options['stages']:
    raise UserError("config.scheme.stages is for method 'chain'; a born_again run makes its "
                    'stages from config.scheme.generation and num_generations')
  if not options['generation']:
    raise UserError('config.scheme.generation is empty; name the config file every '
                    "generation trains with, such as 'mnist1d/student_baseline.py'")
  out = []
  for g in range(int(options['num_generations'])):
    overrides = {'seed_offset': g}
    if g:
      overrides['loss'] = {'terms': _plain(options['born_again_loss'])}
    out.append({'name': f'gen{g}', 'config': options['generation'],
                'teacher': f'gen{g - 1}' if g else None, 'overrides': overrides})
  return out


def check_stages(stages, *, teacher_workdir: str = '', teacher_stage: str = '') -> None:
  """Refuses a stage list that does not chain, in one line.

  Args:
    stages: the stage dicts (see the module docstring).
    teacher_workdir: ``config.scheme.teacher_workdir`` ('' none).
    teacher_stage: ``config.scheme.teacher_stage`` ('' none).

  Raises:
    UserError: no stage; a stage that is not a dict of the known keys; a name that is
      missing, repeated or not a folder name; a teacher that is not an earlier stage,
      ``'external'`` or None; ``'external'`` without a teacher workdir; a teacher stage
      that names no stage or is the last one; a teacher workdir no stage reads.

  >>> check_stages([{'name': 'a', 'config': 'x.py'},
  ...               {'name': 'b', 'config': 'x.py', 'teacher': 'c'},
  ...               {'name': 'c', 'config': 'x.py', 'teacher': 'a'}])
  Traceback (most recent call last):
  kdjax.errors.UserError: stage 'b' learns from 'c', which comes after it; list every teacher before the stages it teaches
  """
  if not isinstance(stages, (list, tuple)) or not stages:
    raise UserError("config.scheme.stages is empty; list at least one stage such as "
                    "{'name': 'teacher', 'config': 'mnist1d/teacher.py', 'teacher': None}")
  names = [s.get('name') if isinstance(s, Mapping) else None for s in stages]
  seen: list[str] = []
  for i, (stage, name) in enumerate(zip(stages, names)):
    if not isinstance(stage, Mapping):
      raise UserError(f'config.scheme.stages[{i}] must be a dict with keys '
                      f'{", ".join(STAGE_KEYS)} (got {stage!r})')
    unknown = sorted(set(stage) - set(STAGE_KEYS))
    if unknown:
      raise UserError(f'config.scheme.stages[{i}] has an unknown key {unknown[0]!r}; a stage '
                      f'has {", ".join(STAGE_KEYS)}')
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
      raise UserError(f'config.scheme.stages[{i}].name must be a folder name of letters, '
                      f'digits, _ and - (got {name!r})')
    if name in seen:
      raise UserError(f'stage name {name!r} is used twice; give every stage its own name')
    source = stage.get('config')
    if not (isinstance(source, str) and source) and not (
        isinstance(source, Mapping) and isinstance(source.get('name'), str)):
      raise UserError(f"stage {name!r} needs 'config': a config file such as "
                      f"'mnist1d/kd.py:tiny' or an inline model such as {{'name': 'mlp'}}")
    if not isinstance(stage.get('overrides') or {}, Mapping):
      raise UserError(f"stage {name!r}: 'overrides' must be a mapping (a partial config)")
    teacher = stage.get('teacher')
    if teacher == EXTERNAL:
      if not teacher_workdir:
        raise UserError(f"stage {name!r} learns from 'external'; set "
                        '--config.scheme.teacher_workdir=DIR (a finished kdjax run)')
    elif teacher is not None:
      if teacher == name:
        raise UserError(f'stage {name!r} names itself as its teacher; name an earlier stage')
      if teacher in names[i + 1:]:
        raise UserError(f'stage {name!r} learns from {teacher!r}, which comes after it; list '
                        'every teacher before the stages it teaches')
      if teacher not in seen:
        raise UserError(f'stage {name!r} learns from {teacher!r}, which names no stage; use '
                        f"an earlier stage's name, 'external' or None")
    seen.append(name)
  if teacher_stage and teacher_workdir:   # the stage an external run stands in for
    if teacher_stage not in names:
      raise UserError(f'config.scheme.teacher_stage {teacher_stage!r} names no stage; use one '
                      f'of {", ".join(names)}')
    if teacher_stage == names[-1]:
      raise UserError(f'config.scheme.teacher_stage {teacher_stage!r} is the last stage, which '
                      'would leave nothing to train; name an earlier one')
  uses = any(s.get('teacher') == EXTERNAL for s in stages)
  if teacher_workdir and not uses and not teacher_stage:
    raise UserError('config.scheme.teacher_workdir is set but no stage reads it; set '
                    "config.scheme.teacher_stage or give a stage the teacher 'external'")


# --------------------------------------------------------------------------- the plan

def plan_stages(config: ml_collections.ConfigDict, workdir: str) -> list[Stage]:
  """Every stage of the run in ``workdir``, its config composed and checked; reads the
  config files and an external teacher's folder, writes nothing.

  Raises:
    UserError: a bad scheme, stage list, config file or stage config (naming the stage).
  """
  check_int(config, 'seed', 0)
  options = scheme_options(config)
  external_dir = options['teacher_workdir']
  stages = expand_stages(options)
  check_stages(stages, teacher_workdir=external_dir, teacher_stage=options['teacher_stage'])
  if external_dir:
    external_dir = storage.abspath(external_dir)
    if workdir_lib.latest_step(external_dir) is None:
      raise UserError(f'config.scheme.teacher_workdir {external_dir} has no checkpoint; train '
                      'that teacher first, or unset it to train the teacher as a stage')
  configs_dir = options['configs_dir'] or _CONFIGS
  folders = {s['name']: storage.join(workdir, s['name']) for s in stages}
  stand_in = options['teacher_stage'] if external_dir else ''
  if stand_in:
    folders[stand_in] = external_dir
  plan = []
  for stage in stages:
    name, teacher = stage['name'], stage.get('teacher')
    if name == stand_in:
      plan.append(Stage(name, None, teacher, external_dir, True))
      continue
    where = f'stage {name!r}'
    stage_config = _compose(stage, config, options, configs_dir, where)
    with stage_config.ignore_type():
      stage_config.teacher.workdir = (external_dir if teacher == EXTERNAL
                                      else folders[teacher] if teacher else '')
    _check_stage_config(stage_config, teacher, where)
    plan.append(Stage(name, stage_config, teacher, folders[name], False))
  return plan


def _compose(stage: dict, config, options: dict, configs_dir: str, where: str):
  source = stage['config']
  if isinstance(source, str):
    out = _load(source, configs_dir, where)
  else:
    if not options['base']:
      raise UserError(f'{where} gives an inline model; set config.scheme.base to the config '
                      "file it starts from, such as 'mnist1d/kd.py'")
    out = _load(options['base'], configs_dir, where)
    with out.ignore_type():
      out.model.name = source['name']
      out.model.kwargs = ml_collections.ConfigDict(_plain(source.get('kwargs') or {}))
  overrides = dict(_plain(stage.get('overrides') or {}))
  offset = overrides.pop('seed_offset', 0)   # born_again: generation g's seed
  if isinstance(offset, bool) or not isinstance(offset, int) or offset < 0:
    raise UserError(f'{where}: seed_offset must be an integer >= 0 (got {offset!r})')
  out.seed = int(config.seed) + offset
  out.progress = bool(config.get('progress', True))
  shared = config.get('data') or {}
  for key in ('name', 'data_dir'):
    if shared.get(key):
      out.data[key] = shared[key]
  _override(out, _plain(options['overrides']), f'{where}: config.scheme.overrides')
  _override(out, overrides, f'{where}: its overrides')
  return out


def _load(spec: str, configs_dir: str, where: str) -> ml_collections.ConfigDict:
  path, _, variant = spec.partition(':')
  full = path if os.path.isabs(path) else os.path.join(configs_dir, path)
  if not os.path.isfile(full):
    raise UserError(f'{where}: config file {path} not found under {configs_dir}; name a file '
                    "relative to configs/, such as 'mnist1d/kd.py:tiny'")
  try:
    loaded = load_config_file(full + (f':{variant}' if variant else ''))
  except UserError as e:
    raise UserError(f'{where}: {e}') from None
  if loaded.get('scheme') is not None:
    raise UserError(f'{where}: {spec} is itself a scheme; a stage is one ordinary run')
  return loaded


def _override(config, overrides: Mapping, where: str, prefix: str = '') -> None:
  """Writes a partial config over ``config``, refusing keys it does not have (except in
  the free-form groups); groups in :data:`_WHOLE` are replaced whole."""
  for key, value in overrides.items():
    dotted = f'{prefix}{key}'
    *parents, leaf = str(key).split('.')
    node = config
    for part in parents:
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise UserError(f'{where}: unknown config key {dotted!r}')
      node = node[part]
    if not isinstance(node, ml_collections.ConfigDict):
      raise UserError(f'{where}: {dotted!r} is not inside a group of keys')
    group = parents[-1] if parents else prefix.rstrip('.').rsplit('.', 1)[-1]
    if leaf not in node and group not in FREE_FORM_GROUPS:
      raise UserError(f'{where}: unknown config key {dotted!r}; keys here: '
                      f'{", ".join(sorted(node.keys()))}')
    if (isinstance(value, Mapping) and leaf in node and leaf not in _WHOLE
        and isinstance(node[leaf], ml_collections.ConfigDict)):
      _override(node[leaf], value, where, f'{dotted}.')
      continue
    with node.ignore_type():
      node[leaf] = ml_collections.ConfigDict(dict(value)) if isinstance(value, Mapping) else value


def _check_stage_config(config, teacher: str | None, where: str) -> None:
  for field, what in (('teacher.cache', 'a cache of a teacher not trained yet'),
                      ('teacher.hf_path', 'a Hugging Face teacher'),
                      ('init.workdir', 'a warm start')):
    node = config
    for part in field.split('.'):
      node = node[part]
    if node:
      raise UserError(f'{where}: config.{field} is set, but a stage learns from its teacher '
                      f'stage, not {what}; unset it')
  try:
    validate(config)
    needs = build_objective(_plain(config.loss.terms)).needs
  except UserError as e:
    raise UserError(f'{where}: {e}') from None
  except (ValueError, KeyError) as e:
    raise UserError(f'{where}: config.loss.terms: {e}') from None
  reads_teacher = bool(needs & TEACHER_NEEDS)
  if teacher and not reads_teacher:
    raise UserError(f'{where} learns from {teacher!r} but its loss reads no teacher; give it a '
                    "distillation loss such as {'kd': {'weight': 1.0}} or set its teacher to None")
  if not teacher and reads_teacher:
    raise UserError(f'{where} has no teacher but its loss reads one; name an earlier stage as '
                    'its teacher or train it from labels (ce)')


def _plain(value):
  if isinstance(value, ml_collections.ConfigDict):
    return value.to_dict()
  if isinstance(value, Mapping):
    return {k: _plain(v) for k, v in value.items()}
  return value


# --------------------------------------------------------------------------- one stage

def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def run_stage(config: ml_collections.ConfigDict, workdir: str, *, run=None,
              fresh=None) -> dict[str, Any]:
  """One stage: the engine's run into ``workdir`` (resuming its last checkpoint), as
  ``kdjax train`` / ``kdjax distill`` run it; returns its summary.

  ``run``: the stage's :class:`kdjax.engine.Setup` when built already (default
  ``setup(config)``); ``fresh``: ``fresh(run) -> state``, the state a run that has no
  checkpoint starts from (default ``run.init()``; called before anything is written).
  """
  run = run or setup(config, log=_log)
  fitted, start = fit_workdir(run, config, workdir, identity=IDENTITY_FIELDS,
                              defaults=base_config(),
                              fresh=(lambda: fresh(run)) if fresh else None, log=_log)
  teacher = run.teacher
  summary = {
      **fitted.summary(resumed_from=start, feed=run.feed_kind),
      'teacher_workdir': config.teacher.workdir or None,
      'teacher_step': teacher.step if teacher else None,
      'teacher_fingerprint': teacher.fingerprint if teacher else None,
  }
  write_summary(workdir, summary)
  return summary


def _finished_summary(stage: Stage) -> dict | None:
  """The summary of a stage finished before this run, or None (to be run or resumed)."""
  path = storage.join(stage.workdir, workdir_lib.SUMMARY)
  if not storage.exists(path):
    return None
  summary = workdir_lib.read_json(path, what='stage summary')
  if (not isinstance(summary, dict) or summary.get('diverged')
      or workdir_lib.latest_step(stage.workdir) != int(stage.config.num_steps)
      or summary.get('step') != int(stage.config.num_steps)):
    return None
  teacher_dir = stage.config.teacher.workdir
  if teacher_dir and summary.get('teacher_fingerprint') != teacher_lib.read_fingerprint(
      teacher_dir):
    raise UserError(f'stage {stage.name!r} ({stage.workdir}) was distilled from other teacher '
                    f'weights than {teacher_dir} holds now; delete {stage.workdir} to redo it')
  return summary


def check_resumable(plan: list[Stage]) -> None:
  """Refuses, before anything is written, a stage folder holding another config's run."""
  defaults = config_to_dict(base_config())
  for stage in plan:
    if stage.external or not workdir_lib.has_checkpoints(stage.workdir):
      continue
    old = workdir_lib.read_config(stage.workdir)
    diff = workdir_lib.config_differences(old, config_to_dict(stage.config),
                                          identity=IDENTITY_FIELDS, defaults=defaults)
    if diff:
      raise UserError(f'stage {stage.name!r}: {stage.workdir} holds a run of another config '
                      f'(it differs in {"; ".join(diff[:3])}); use a new --workdir, or delete '
                      'that folder to redo the stage')


# --------------------------------------------------------------------------- ensembles

def ensemble_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  r"""Accuracy and cross-entropy of the mean of ``G`` models' softmax outputs.

  Args:
    logits: ``[G, N, C]``, each model's logits on the same ``N`` examples.
    labels: ``[N]`` class ids.

  Returns:
    ``{'accuracy', 'loss'}`` of :math:`\bar p = \frac1G \sum_g \mathrm{softmax}(z_g)`.

  >>> z = np.array([[[2.0, 0.0], [0.0, 1.0]], [[0.0, 3.0], [0.0, 2.0]]])
  >>> ensemble_metrics(z, np.array([0, 1]))['accuracy']
  0.5
  """
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  mean = probs.mean(0)
  labels = np.asarray(labels)
  picked = mean[np.arange(len(labels)), labels]
  return {'accuracy': float(np.mean(mean.argmax(-1) == labels)),
          'loss': float(np.mean(-np.log(np.maximum(picked, 1e-30))))}


def eval_logits(workdir: str) -> tuple[np.ndarray, np.ndarray]:
  """The logits of ``workdir``'s latest checkpoint on its eval split, and the labels."""
  config = merge(base_config(), workdir_lib.read_config(workdir))
  mesh = make_mesh([tuple(a) for a in config.mesh])
  model = teacher_lib.load_teacher(workdir, mesh, config.partition_rules)
  arrays = kdata.load_arrays(config.data.name, config.data.eval_split,
                             data_dir=config.data.data_dir or None)
  x = np.asarray(arrays['x'])
  n, batch = len(x), max(1, min(int(config.data.eval_batch_size), len(x)))
  pad = -n % batch
  x = np.concatenate([x, np.zeros((pad, *x.shape[1:]), x.dtype)])
  forward = jax.jit(lambda p, s, xb: model.apply(p, s, xb, train=False)[0].logits)
  out = [np.asarray(forward(*model.variables, x[i:i + batch])) for i in range(0, len(x), batch)]
  return np.concatenate(out)[:n].astype(np.float32), np.asarray(arrays['label'])


def _born_again_ensemble(plan: list[Stage], workdir: str) -> dict[str, Any]:
  logits, labels = zip(*(eval_logits(s.workdir) for s in plan))
  logits = np.stack(logits)
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.savez(buffer, logits=logits, label=labels[0], names=np.array([s.name for s in plan]))
    storage.write_bytes(storage.join(workdir, PREDICTIONS), buffer.getvalue())
  ban = ensemble_metrics(logits[1:], labels[0])
  every = ensemble_metrics(logits, labels[0])
  return {'generations': [s.name for s in plan],
          'generation_accuracies': [ensemble_metrics(z[None], labels[0])['accuracy']
                                    for z in logits],
          'ban_ensemble_accuracy': ban['accuracy'], 'ban_ensemble_loss': ban['loss'],
          'ensemble_all_accuracy': every['accuracy'], 'ensemble_all_loss': every['loss']}


# --------------------------------------------------------------------------- the run

def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs the stages of ``config.scheme`` into ``workdir`` and returns the run's summary.

  ``WORKDIR/<stage>/`` is each stage's ordinary workdir; ``WORKDIR/config.json`` the
  run's config; ``WORKDIR/summary.json`` lists ``stages`` (each stage's name, teacher,
  folder, whether it was skipped as finished, and its summary) and the final stage's
  ``step``, ``eval_accuracy``, ``eval_loss``, ``train_loss``, ``train_accuracy``,
  ``examples_per_sec``; a born-again run adds its ensemble's figures.

  Raises:
    UserError: a bad scheme, stage list or stage config (nothing written), or what a
      stage's run raises.
    Diverged: a stage's non-finite loss (its ``summary.json`` says where).
  """
  workdir = workdir_lib.resolve(workdir)
  plan = plan_stages(config, workdir)
  check_resumable(plan)
  workdir_lib.prepare(workdir, config, has_results=False)

  rows = run_stages(plan)
  final = rows[-1]['summary']
  out = {'scheme': NAME, 'method': scheme_options(config)['method'],
         'final_stage': plan[-1].name, 'stages': rows}
  for key in ('step', 'eval_accuracy', 'eval_loss', 'train_loss', 'train_accuracy',
              'examples_per_sec'):
    out[key] = final.get(key)
  if out['method'] == 'born_again':
    out.update(_born_again_ensemble(plan, workdir))
  if jax.process_index() == 0:
    workdir_lib.write_json(storage.join(workdir, workdir_lib.SUMMARY), out)
    plot_stages(workdir, [s.name for s in plan], [s.workdir for s in plan],
                ensemble=out.get('ban_ensemble_accuracy'))
  return out


def run_stages(plan: list[Stage], runner=None) -> list[dict[str, Any]]:
  """Runs the stages of ``plan`` in order: a finished one is skipped, an interrupted one
  resumed, the others run by ``runner(stage) -> summary`` (default: the engine's run
  of ``stage.config`` into ``stage.workdir``; :mod:`kdjax.schemes.layerwise` passes its
  own, a warm-started run with frozen parameters). Returns one row per stage: ``name``,
  ``teacher``, ``workdir``, ``external``, ``skipped`` and its ``summary``."""
  runner = runner or (lambda stage: run_stage(stage.config, stage.workdir))
  rows = []
  for i, stage in enumerate(plan):
    head = f'stage {i + 1}/{len(plan)} {stage.name!r}'
    if stage.external:
      _log(f'{head}: the finished run {stage.workdir}')
      path = storage.join(stage.workdir, workdir_lib.SUMMARY)
      summary = workdir_lib.read_json(path, what='summary') if storage.exists(path) else None
      rows.append({'name': stage.name, 'teacher': stage.teacher, 'workdir': stage.workdir,
                   'external': True, 'skipped': True, 'summary': summary})
      continue
    summary = _finished_summary(stage)
    skipped = summary is not None
    if skipped:
      _log(f'{head}: finished, skipped ({stage.workdir})')
    else:
      _log(f'{head}' + (f' from {stage.teacher!r}' if stage.teacher else ' from labels'))
      summary = runner(stage)
    rows.append({'name': stage.name, 'teacher': stage.teacher, 'workdir': stage.workdir,
                 'external': False, 'skipped': skipped, 'summary': summary})
  return rows


def plot_stages(workdir: str, names: list[str], folders: list[str], *,
                ensemble: float | None = None) -> str:
  """Draws every stage's train loss and eval accuracy against its step, a line per
  stage (and the born-again ensemble's accuracy), into ``WORKDIR/learning_curves.png``."""
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
  for name, folder in zip(names, folders):
    path = storage.join(folder, workdir_lib.METRICS)
    rows = metrics_lib.read_jsonl(path) if storage.exists(path) else []
    train = [(r['step'], r['loss']) for r in rows
             if r.get('split') == 'train' and r.get('loss') is not None]
    evals = [(r['step'], r['accuracy']) for r in rows
             if r.get('split') == 'eval' and r.get('accuracy') is not None]
    if train:
      ax1.plot(*np.asarray(train).T, label=name)
    if evals:
      ax2.plot(*np.asarray(evals).T, marker='o', label=name)
  if ensemble is not None:
    ax2.axhline(ensemble, color='k', linestyle='--', label='BAN ensemble')
  ax1.set_xlabel('step'); ax1.set_ylabel('train loss'); ax1.legend(fontsize='small')
  ax2.set_xlabel('step'); ax2.set_ylabel('eval accuracy'); ax2.legend(fontsize='small')
  fig.suptitle(f'{storage.basename(workdir)}: {" -> ".join(names)}')
  fig.tight_layout()
  out = storage.savefig(fig, storage.join(workdir, 'learning_curves.png'), dpi=100)
  plt.close(fig)
  return out
