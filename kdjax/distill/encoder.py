"""Sentence-encoder distillation: a small BERT learns a sentence encoder's embeddings.

The teacher is a Hugging Face sentence encoder folder (all-MiniLM-L6-v2 by default:
6 layers, width 384; its sentence vector is the mean of the last hidden states over the
attended tokens, L2-normalised). The student is a :class:`kdjax.models.BertEncoder`
(``config.model``, e.g. 3 layers); its sentence vector is pooled the same way, through a
learned linear projection when the widths differ. The loss is
:func:`kdjax.distill.sentence.sentence_cosine` (``1 - cos``) between the two vectors,
optionally plus MiniLMv2's self-attention relations (``minilm_relations``).

**Where the teacher's outputs come from** (``config.encoder.teacher``):

* ``'cache'`` (default): the teacher runs once over the training and evaluation
  lines and its sentence vectors are stored
  (:func:`kdjax.distill.encoder_cache.build_embedding_cache`, 1.5 KB a line in float32);
  the run reads them through the engine's cache protocol
  (:class:`kdjax.distill.encoder_cache.EmbeddingCache`), at student-only cost. The cache records the teacher's
  fingerprint (sha256 over its parameters) and the data's (the classifier cache's
  :func:`kdjax.cache.dataset_fingerprint`); a run refuses a cache of another teacher or
  other data.
* ``'live'``: the teacher runs inside every step. The relations term needs it: MiniLMv2
  reads a teacher layer's queries, keys and values, ``3 x T x 384`` floats a line (147 KB
  at 32 tokens, 100 times the sentence vector; 13 GB for the 88,656 training lines),
  or, stored as relation matrices, ``3 x heads x T x T`` (also tens of KB). Recomputing
  them costs one teacher forward per step (about 0.7 of the 3-layer student's forward
  and backward), so the relations variant runs the teacher live and caches nothing.

**Initialisation** (``config.encoder.init``): ``'random'``; ``'embeddings'`` (the
teacher's token, position and type embeddings, random layers); ``'layers'``
(DistilBERT's: the embeddings and the teacher layers ``config.encoder.teacher_layers``,
one per student layer; :func:`kdjax.models.bert.init_from_teacher`).

**Evaluation** on the held-out lines (``config.data.eval_split``): the student's and the
teacher's sentence vectors, and :func:`kdjax.distill.sentence.embedding_metrics`: mean cosine to the teacher and
how often the student's nearest neighbours among those lines are the teacher's. The run
also evaluates the student before its first step (the same student without
distillation) into ``eval_init.json`` and ``summary.json['initial']``.

Run it (the ``kdjax`` command does not route here yet)::

    python -m kdjax.distill.encoder distill --config configs/lm/encoder_kd.py:tiny \\
        --workdir /tmp/enc --config.encoder.cache=/tmp/enc_cache
    python -m kdjax.distill.encoder cache --config configs/lm/encoder_kd.py \\
        --cache-dir /tmp/enc_cache      # the teacher's vectors only

A rerun of the same command resumes the cache build and the training where they stopped.

References:
  Reimers, Gurevych. Making Monolingual Sentence Embeddings Multilingual using Knowledge
  Distillation. EMNLP 2020. arXiv:2004.09813 (a student sentence encoder regresses the
  teacher's vectors on unlabeled sentences).
  Wang, Bao, Huang, Dong, Wei. MiniLMv2: Multi-Head Self-Attention Relation Distillation
  for Compressing Pretrained Transformers. Findings of ACL 2021. arXiv:2012.15828.
  Sanh, Debut, Chaumond, Wolf. DistilBERT. arXiv:1910.01108 (the layer initialisation).
"""

from __future__ import annotations

import json
import sys
from typing import Any, Callable, NamedTuple, Sequence

import jax
import numpy as np

from kdjax import data as kdata
from kdjax import storage
from kdjax import teacher as teacher_lib
from kdjax import workdir as workdir_lib
from kdjax.distill.encoder_cache import build_embedding_cache
from kdjax.distill.encoder_cache import check_config
from kdjax.distill.encoder_cache import cosine_terms
from kdjax.distill.encoder_cache import embed_split
from kdjax.distill.encoder_cache import load_hf_teacher
from kdjax.distill.encoder_cache import open_embedding_cache
from kdjax.distill.encoder_cache import teacher_embedder
from kdjax.distill.encoder_cache import teacher_path
from kdjax.distill.sentence import embedding_metrics
from kdjax.distill.sentence import sentence_vectors
from kdjax.engine import metrics as metrics_lib
from kdjax.engine.config import IDENTITY_FIELDS
from kdjax.engine.loop import fit
from kdjax.engine.loop import write_summary
from kdjax.engine.setup import Setup
from kdjax.engine.setup import setup
from kdjax.errors import Diverged
from kdjax.errors import UserError
from kdjax.models import bert as bert_lib
from kdjax.models import from_config
from kdjax.models.base import named_features

INIT_EVAL = 'eval_init.json'
# The encoder fields that give a workdir's checkpoints their meaning (the cache may move).
IDENTITY = ('encoder.teacher_path', 'encoder.teacher', 'encoder.init', 'encoder.teacher_layers')


# ================================================================================ the run


class EncoderRun(NamedTuple):
  """What :func:`prepare_run` builds: the engine's setup, the teacher, the evaluator and
  the initial state (the student before distillation, initialised as the config says)."""

  setup: Setup
  teacher: teacher_lib.Teacher
  evaluate: Callable[[Any], dict[str, float]]
  init: Callable[[], Any]
  eval_lines: int


def _log(msg: str) -> None:
  if jax.process_index() == 0:
    print(msg, flush=True)


def prepare_run(config, *, log: Callable[[str], None] = _log) -> EncoderRun:
  """The teacher, its cached vectors (built when missing), the engine's setup, the
  evaluator and the initial state of an encoder distillation run; writes nothing but
  the cache.

  Raises:
    UserError: a bad config, teacher, data set or cache.
  """
  check_config(config)
  if jax.process_count() > 1:
    raise UserError('sentence distillation runs in one process (its evaluator reads the '
                    'vectors on the host); run it without a multi-process launcher')
  enc = config.encoder
  teacher = load_hf_teacher(teacher_path(config))
  live = enc.teacher == 'live'
  cache = None
  if not live:
    cache_dir = storage.abspath(enc.cache)
    build_embedding_cache(config, cache_dir, teacher=teacher)
    cache = open_embedding_cache(cache_dir, config.data.train_split,
                                 teacher_fingerprint=teacher.fingerprint)
    eval_cache = open_embedding_cache(cache_dir, config.data.eval_split,
                                      teacher_fingerprint=teacher.fingerprint)
  run = setup(config, cache=cache, teacher=teacher if live else None, log=log)
  data_dir = config.data.data_dir or None
  eval_arrays = kdata.load_arrays(config.data.name, config.data.eval_split, data_dir=data_dir)
  if live:
    eval_vectors = embed_split(teacher_embedder(teacher), eval_arrays, int(enc.cache_batch_size))
  else:
    eval_cache.check_arrays(eval_arrays)
    eval_vectors = eval_cache.vectors(verify=True)
  if len(eval_vectors) <= int(enc.neighbours):
    raise UserError(f'{config.data.eval_split} has {len(eval_vectors)} lines; the neighbour '
                    f'figures need more than config.encoder.neighbours={enc.neighbours}')
  evaluate = _evaluator(config, run, eval_arrays, eval_vectors)

  def init():
    state = run.init()
    if enc.init == 'random':
      return state
    layers = list(enc.teacher_layers) if enc.init == 'layers' else None
    student = bert_lib.init_from_teacher(jax.device_get(state.params['student']),
                                         jax.device_get(teacher.variables[0]), layers=layers)
    params = dict(state.params, student=student)
    return jax.device_put(state.replace(params=params, opt_state=run.tx.init(params)),
                          run.state_shardings)

  return EncoderRun(run, teacher, evaluate, init, len(eval_vectors))


def _evaluator(config, run: Setup, eval_arrays: dict, teacher_vectors: np.ndarray):
  """``evaluate(state) -> {'mean_cosine', 'nn_top1', 'nn_top{k}', 'nn_overlap{k}'}`` on the
  evaluation lines: the student's vectors (through its projection) against the teacher's."""
  term, opts = cosine_terms(config)[0]
  feature = opts.get('student', 'last_hidden')
  eval_apply, _, _ = from_config(config.model, num_classes=run.spec.num_classes,
                                 input_shape=run.spec.input_shape)
  k = int(config.encoder.neighbours)

  @jax.jit
  def vectors(params, model_state, loss_params, x, mask, types):
    out, _ = eval_apply(params, model_state, x, train=False, attention_mask=mask,
                        token_type_ids=types)
    return sentence_vectors(named_features(out)[feature], mask, loss_params.get('kernel'))

  metrics = jax.jit(lambda s, t: embedding_metrics(s, t, k=k))
  batch = int(config.data.eval_batch_size)

  def evaluate(state) -> dict[str, float]:
    student, model_state = state.params['student'], state.model_state
    loss_params = state.params['loss'].get(term, {})
    got = embed_split(lambda x, m, t: vectors(student, model_state, loss_params, x, m, t),
                      eval_arrays, batch)
    return {key: float(v) for key, v in jax.device_get(metrics(got, teacher_vectors)).items()}

  return evaluate


def evaluate_initial(config) -> dict[str, float]:
  """The evaluation figures of the student before distillation (no workdir written): the
  baseline of the same student without a teacher, initialised as ``config.encoder.init``."""
  run = prepare_run(config)
  return run.evaluate(run.init())


def distill_encoder(config, workdir: str) -> dict[str, Any]:
  """Distills the sentence encoder of ``config`` into ``workdir``; returns the summary.

  The workdir holds what a ``kdjax distill`` workdir holds (``config.json``, orbax
  checkpoints, ``metrics.jsonl`` with the evaluation figures, ``summary.json``) plus
  ``eval_init.json`` (the student before distillation) and ``learning_curves.png``. A
  rerun of the same command resumes from the last checkpoint.

  Raises:
    UserError: a bad config, teacher, data set, cache or workdir (nothing written to the
      workdir).
    Diverged: a non-finite loss or gradient norm.
  """
  workdir = workdir_lib.resolve(workdir)
  check_config(config)
  enc_run = prepare_run(config)
  run = enc_run.setup
  start = workdir_lib.latest_step(workdir)
  workdir_lib.prepare(workdir, config, has_results=start is not None,
                      identity=IDENTITY_FIELDS + IDENTITY)
  manager = workdir_lib.checkpoint_manager(workdir, keep=int(config.keep_checkpoints))
  position: dict = {}
  init_path = storage.join(workdir, INIT_EVAL)
  if start is None:
    state = enc_run.init()
    initial = enc_run.evaluate(state)
    workdir_lib.write_json(init_path, initial)
    _log('before distillation: ' + _figures(initial))
  else:
    state, position = workdir_lib.restore(manager, start, run.abstract_state)
    run.feed.restore(position)
    initial = (workdir_lib.read_json(init_path, what='initial evaluation')
               if storage.exists(init_path) else None)
    _log(f'resuming from step {start} ({workdir_lib.checkpoint_dir(workdir)}/{start})')
  fitted = fit(config, workdir, state=state, start=start, position=position, manager=manager,
               schedule=run.schedule, calls=run.calls, feed=run.feed,
               evaluate=enc_run.evaluate, log=_log)
  result, train, evaluation = fitted.result, fitted.train, fitted.eval
  summary = {
      'step': result.step, **evaluation, 'initial': initial,
      'train_loss': train.get('loss'),
      'examples_per_sec': result.examples_per_sec or train.get('examples_per_sec'),
      'wall_seconds': fitted.seconds, 'resumed_from': start, 'feed': run.feed_kind,
      'init': str(config.encoder.init), 'teacher': str(config.encoder.teacher),
      'teacher_path': str(enc_run.teacher.config.hf_path),
      'teacher_fingerprint': enc_run.teacher.fingerprint, 'eval_lines': enc_run.eval_lines,
  }
  write_summary(workdir, summary)
  _log('after distillation: ' + _figures(evaluation))
  plot_curves(workdir)
  return summary


def _figures(metrics: dict) -> str:
  return ', '.join(f'{k} {v:.4f}' for k, v in metrics.items())


def plot_curves(workdir: str) -> str | None:
  """``learning_curves.png``: the train loss and the evaluation figures against the step."""
  path = storage.join(workdir, workdir_lib.METRICS)
  if not storage.exists(path):
    return None
  import matplotlib
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt
  rows = metrics_lib.read_jsonl(path)
  train = [(r['step'], r['loss']) for r in rows if r.get('split') == 'train'
           and r.get('loss') is not None]
  evals = [r for r in rows if r.get('split') == 'eval']
  fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(9, 3.5))
  if train:
    ax1.plot(*np.asarray(train).T)
  ax1.set_xlabel('step')
  ax1.set_ylabel('train loss')
  keys = sorted({k for r in evals for k in r if k == 'mean_cosine' or k.startswith('nn_')})
  for key in keys:
    points = [(r['step'], r[key]) for r in evals if r.get(key) is not None]
    if points:
      ax2.plot(*np.asarray(points).T, marker='o', label=key)
  ax2.set_xlabel('step')
  ax2.set_ylabel('held-out lines')
  if evals:
    ax2.legend(fontsize=8)
  fig.suptitle(storage.basename(workdir))
  fig.tight_layout()
  out = storage.savefig(fig, storage.join(workdir, 'learning_curves.png'), dpi=100)
  plt.close(fig)
  return out


# ============================================================================== the command


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m kdjax.distill.encoder distill|cache --config C (--workdir W | --cache-dir D)
  [--config.k=v ...]``; a user's mistake ends in one line and exit code 2."""
  import argparse
  from kdjax.config import load_config
  from kdjax.config import split_overrides
  argv = list(sys.argv[1:] if argv is None else argv)
  parser = argparse.ArgumentParser(prog='python -m kdjax.distill.encoder',
                                   description='Distill a BERT sentence encoder.')
  parser.add_argument('command', choices=('distill', 'cache'))
  parser.add_argument('--config', required=True, help='path/to/config.py[:variant]')
  parser.add_argument('--workdir', help='distill: the run directory')
  parser.add_argument('--cache-dir', help='cache: the cache directory (default: '
                      'config.encoder.cache)')
  try:
    rest, overrides = split_overrides(argv)
    args = parser.parse_args(rest)
    config = load_config(args.config, overrides)
    try:
      if args.command == 'cache':
        cache_dir = args.cache_dir or config.encoder.get('cache')
        if not cache_dir:
          raise UserError('give --cache-dir DIR (or --config.encoder.cache=DIR)')
        manifests = build_embedding_cache(config, cache_dir)
        print(json.dumps({split: {'lines': m['dataset']['num_examples'],
                                  'content_checksum': m['content_checksum']}
                          for split, m in manifests.items()}))
        return 0
      if not args.workdir:
        raise UserError('give --workdir DIR')
      summary = distill_encoder(config, args.workdir)
    except kdata.DataError as e:
      raise UserError(str(e)) from None
    print(workdir_lib.dumps({k: summary[k] for k in (
        'step', 'mean_cosine', 'nn_top1', f'nn_top{config.encoder.neighbours}',
        'train_loss') if k in summary}))
    return 0
  except UserError as e:
    print(f'kdjax: error: {e}', file=sys.stderr)
    return 2
  except Diverged as e:
    print(f'kdjax: diverged: {e}', file=sys.stderr)
    return 3


if __name__ == '__main__':
  sys.exit(main())
