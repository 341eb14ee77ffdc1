r"""Curriculum distillation: the teacher orders the training examples from easy to hard,
and the student sees a growing prefix of that order.

Before training, the teacher scores every training example once, on its inputs without
augmentation, in evaluation mode (:func:`teacher_scores`):

* ``score='confidence'``: its probability of the true label, :math:`p_T(y \mid x)`
  (Hacohen & Weinshall's *transfer scoring*: the confidence of a pre-trained network in
  the correct label);
* ``score='loss'``: its cross-entropy, :math:`-\log p_T(y \mid x)`.

An unlabeled example (label ``-1``) is scored by the teacher's largest probability
instead. Examples are ordered by difficulty, easiest first (:func:`difficulty_order`:
high confidence, or low loss, first; ties by position in the split). The two scores
give the same order (the loss is minus the log of the confidence); both are offered
because both names are used, and the scores themselves are kept in the workdir.

At step :math:`t` of :math:`S` the student's batch is drawn uniformly, without
replacement, from the :math:`n(t)` easiest examples (:func:`pacing_sizes`),
:math:`n(t) = \min(N, \max(B, \lceil g(t) N \rceil))` with the *pacing function*
:math:`g` rising from ``start_fraction`` :math:`g_0` to 1 at step :math:`a S`
(``full_at`` :math:`a`), then the full set:

* ``'linear'``: :math:`g(t) = \min(1, g_0 + (1 - g_0)\,t / (aS))`;
* ``'root'``: :math:`g(t) = \min(1, \sqrt{g_0^2 + (1 - g_0^2)\,t / (aS)})`;
* ``'exponential'``: Hacohen & Weinshall's fixed exponential pacing,
  :math:`g(t) = \min(1, g_0\,r^{\lfloor t / L \rfloor})`, the factor ``increase``
  :math:`r`, the step length :math:`L = aS / \lceil \log_r(1/g_0) \rceil` so that the
  last increase comes at :math:`aS`.

The batch at step :math:`t` is a pure function of ``(config.seed, t)``, the order and
the pacing (:class:`CurriculumSource`): each example of the prefix draws a uniform key
from ``fold_in(key(seed), t)`` and the :math:`B` smallest keys win. A resumed run
therefore sees the batches an uninterrupted one does. The order is written once to
``WORKDIR/curriculum.npz`` (scores, order, prefix sizes) and checked on resume (a
teacher whose scores changed is refused). The loss is the config's objective
(``config.loss.terms``: KD + CE in the shipped configs), the teacher live in the step.

Choices. Hacohen & Weinshall draw each mini-batch from the prefix as here, but sort by
a transfer network trained on another task; here the distillation teacher itself
scores, as instance-level KD curricula do (Zhao et al. order the examples by a
teacher-side difficulty and feed them easy to hard). The linear and root pacings are
Platanios et al.'s *competence* functions. Batches are drawn per step, not per epoch,
so an epoch (``config.data.augment``'s) is ``step // (N // B)``.

References:
  Hacohen, Weinshall. On The Power of Curriculum Learning in Training Deep Networks.
  ICML 2019. arXiv:1904.03626 (transfer scoring; fixed exponential pacing; mini-batches
  drawn uniformly from the easiest examples).
  Platanios, Stretcu, Neubig, Poczos, Mitchell. Competence-based Curriculum Learning for
  Neural Machine Translation. NAACL 2019. arXiv:1903.09848 (linear and root competence).
  Zhao, Sun, Dong, Dong, Li. Knowledge Distillation via Instance-level Sequence
  Learning. Knowledge-Based Systems 2021. arXiv:2106.10885 (a curriculum of instances,
  easy to hard, for KD).
  Bengio, Louradour, Collobert, Weston. Curriculum Learning. ICML 2009.
"""

from __future__ import annotations

import io
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import data as kdata
from kdjax import storage
from kdjax import workdir as workdir_lib
from kdjax.config import check_number
from kdjax.config import with_defaults
from kdjax.engine import metrics as metrics_lib
from kdjax.engine.config import validate
from kdjax.engine.feed import DeviceSource
from kdjax.engine.feed import Feed
from kdjax.engine.loop import TrainCalls
from kdjax.engine.loop import write_summary
from kdjax.engine.setup import Setup
from kdjax.engine.setup import setup
from kdjax.errors import UserError
from kdjax.schemes.online import IDENTITY
from kdjax.schemes.online import fit_run
from kdjax.schemes.online import log_line

NAME = 'curriculum'
SCORES = ('confidence', 'loss')
PACINGS = ('linear', 'root', 'exponential')
# config.scheme's fields and their defaults.
DEFAULTS = {
    'name': NAME,
    'score': 'confidence',     # 'confidence' | 'loss'
    'pacing': 'linear',        # 'linear' | 'root' | 'exponential'
    'start_fraction': 0.2,     # g_0: the share of the easiest examples at step 0
    'full_at': 0.5,            # a: the whole set from step a * num_steps on
    'increase': 2.0,           # r: the exponential pacing's factor
}
ORDER_FILE = 'curriculum.npz'


def curriculum_scheme(**options) -> ml_collections.ConfigDict:
  """``config.scheme`` of a curriculum run: :data:`DEFAULTS` with ``options`` over them.

  >>> curriculum_scheme(pacing='root').pacing
  'root'
  """
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown curriculum options {sorted(unknown)}; use {", ".join(DEFAULTS)}')
  return ml_collections.ConfigDict({**DEFAULTS, **options})


def curriculum_options(config: ml_collections.ConfigDict) -> dict:
  """``config.scheme`` checked, with :data:`DEFAULTS` for the fields it leaves out.

  Raises:
    UserError: an unknown field, score or pacing, or a number out of range.

  >>> curriculum_options(ml_collections.ConfigDict({'scheme': {'name': 'curriculum',
  ...                                                          'score': 'margin'}}))
  Traceback (most recent call last):
  kdjax.errors.UserError: config.scheme.score must be one of confidence, loss (got 'margin')
  """
  options = with_defaults(config.scheme, DEFAULTS, dotted='scheme', what='a curriculum option')
  for key, allowed in (('score', SCORES), ('pacing', PACINGS)):
    if options[key] not in allowed:
      raise UserError(f'config.scheme.{key} must be one of {", ".join(allowed)} '
                      f'(got {options[key]!r})')
  checked = ml_collections.ConfigDict({'scheme': {k: options[k] for k in
                                                  ('start_fraction', 'full_at', 'increase')}})
  check_number(checked, 'scheme.start_fraction', lambda v: 0 < v <= 1, 'in (0, 1]')
  check_number(checked, 'scheme.full_at', lambda v: 0 < v <= 1, 'in (0, 1]')
  check_number(checked, 'scheme.increase', lambda v: v > 1, 'above 1')
  for key in ('start_fraction', 'full_at', 'increase'):
    options[key] = float(options[key])
  return options


# --------------------------------------------------------------------------- the math

def pacing_fraction(step: np.ndarray, num_steps: int, *, pacing: str, start_fraction: float,
                    full_at: float, increase: float = 2.0) -> np.ndarray:
  r"""The pacing function :math:`g(t)`: the share of the easiest examples available at
  each step (see the module docstring), float64.

  >>> pacing_fraction(np.array([0, 25, 50, 99]), 100, pacing='linear', start_fraction=0.2,
  ...                 full_at=0.5).round(6).tolist()
  [0.2, 0.6, 1.0, 1.0]
  """
  t = np.asarray(step, np.float64)
  ramp = full_at * num_steps
  g0 = start_fraction
  if pacing == 'linear':
    g = g0 + (1.0 - g0) * t / ramp
  elif pacing == 'root':
    g = np.sqrt(g0 * g0 + (1.0 - g0 * g0) * t / ramp)
  elif pacing == 'exponential':
    rises = max(1, math.ceil(math.log(1.0 / g0) / math.log(increase) - 1e-12))
    g = g0 * np.power(increase, np.floor(t / (ramp / rises)))
  else:
    raise ValueError(f'unknown pacing {pacing!r}; use one of {PACINGS}')
  return np.minimum(1.0, g)


def pacing_sizes(num_steps: int, num_examples: int, batch_size: int, **pacing) -> np.ndarray:
  r"""``[num_steps]`` int32: :math:`n(t) = \min(N, \max(B, \lceil g(t) N \rceil))`, the
  prefix of the order the batch of step ``t`` is drawn from (``pacing``: the keywords of
  :func:`pacing_fraction`).

  >>> pacing_sizes(4, 10, 2, pacing='linear', start_fraction=0.1, full_at=0.5).tolist()
  [2, 6, 10, 10]
  """
  g = pacing_fraction(np.arange(num_steps), num_steps, **pacing)
  n = np.ceil(g * num_examples - 1e-9).astype(np.int64)
  return np.clip(n, batch_size, num_examples).astype(np.int32)


def difficulty_order(logits: np.ndarray, labels: np.ndarray, score: str
                     ) -> tuple[np.ndarray, np.ndarray]:
  r"""``(scores, order)``: each example's score (``'confidence'``: the teacher's
  probability of its label; ``'loss'``: its cross-entropy; unlabeled examples: the
  largest probability, or its minus log) and the positions from easiest to hardest
  (confidence descending, loss ascending; ties by position).

  >>> z = np.log(np.array([[0.5, 0.5], [0.9, 0.1], [0.2, 0.8]]))
  >>> difficulty_order(z, np.array([0, 0, 0]), 'confidence')[1].tolist()
  [1, 0, 2]
  """
  z = np.asarray(logits, np.float64)
  z = z - z.max(-1, keepdims=True)
  log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
  labels = np.asarray(labels)
  picked = np.where(labels >= 0, log_p[np.arange(len(labels)), np.maximum(labels, 0)],
                    log_p.max(-1))
  if score == 'confidence':
    scores = np.exp(picked)
    key = -scores
  elif score == 'loss':
    scores = -picked
    key = scores
  else:
    raise ValueError(f'unknown score {score!r}; use one of {SCORES}')
  return scores, np.argsort(key, kind='stable').astype(np.int32)


def teacher_logits(teacher, arrays: dict, batch_size: int) -> np.ndarray:
  """The teacher's logits on every example of ``arrays`` (no augmentation, evaluation
  mode), in chunks of ``batch_size`` (the last one padded), as float32 numpy."""
  x = np.asarray(arrays['x'])
  n, b = len(x), max(1, min(int(batch_size), len(x)))
  x = np.concatenate([x, np.zeros((-n % b, *x.shape[1:]), x.dtype)])
  forward = jax.jit(lambda v, xb: teacher.apply(v[0], v[1], xb, train=False)[0].logits)
  out = [np.asarray(forward(teacher.variables, x[i:i + b]), np.float32)
         for i in range(0, len(x), b)]
  return np.concatenate(out)[:n]


# --------------------------------------------------------------------------- the feed

class CurriculumSource(DeviceSource):
  """The device source of a curriculum: step ``t``'s batch is ``batch_size`` examples
  drawn without replacement from the ``sizes[t]`` first positions of ``order``, by the
  smallest uniform keys of ``fold_in(key(seed), t)``; the data position is the step.

  Args:
    arrays: the training split (as :class:`kdjax.engine.feed.DeviceSource`).
    order: ``[N]`` positions, easiest first.
    sizes: ``[num_steps]`` prefix sizes (:func:`pacing_sizes`).
    batch_size, seed, mesh: as :class:`kdjax.engine.feed.DeviceSource`.
  """

  def __init__(self, arrays: dict, *, order: np.ndarray, sizes: np.ndarray, batch_size: int,
               seed: int, mesh: jax.sharding.Mesh):
    super().__init__(arrays, batch_size=batch_size, seed=seed, mesh=mesh)
    self.order = jax.device_put(np.asarray(order, np.int32), self.repl)
    self.sizes = jax.device_put(np.asarray(sizes, np.int32), self.repl)

  def inputs(self, step: int, n: int) -> dict:
    return {**super().inputs(step, n), 'order': self.order, 'sizes': self.sizes}

  def shardings(self) -> dict:
    return {**super().shardings(), 'order': self.repl, 'sizes': self.repl}

  def batches(self, inputs, n: int, positions=None) -> Callable[[jax.Array], dict]:
    if positions is not None:
      raise ValueError('a curriculum draws its own batch positions')
    data, first, order = inputs['data'], inputs['step'], inputs['order']
    b, spe = self.batch_size, self.steps_per_epoch
    ranks = jnp.arange(self.num_examples)

    def batch_at(i):
      step = first + i
      size = jnp.take(inputs['sizes'], jnp.minimum(step, inputs['sizes'].shape[0] - 1))
      keys = jax.random.uniform(jax.random.fold_in(jax.random.key(inputs['seed']), step),
                                (self.num_examples,))
      keys = jnp.where(ranks < size, keys, 2.0)
      idx = jnp.take(order, jax.lax.top_k(-keys, b)[1])
      batch = {k: jnp.take(data[k], idx, axis=0) for k in self.keys}
      batch['epoch'] = jnp.full((b,), step // spe, jnp.int32)
      if 'mask' not in batch:
        batch['mask'] = jnp.ones((b,), bool)
      batch['position'] = idx
      return jax.lax.with_sharding_constraint(batch, self.batch_sharding)

    return batch_at


# --------------------------------------------------------------------------- the run

class CurriculumSetup(NamedTuple):
  """What :func:`setup_curriculum` builds: the engine's run with the curriculum's feed,
  the checked options, the teacher's scores and order, and the prefix sizes."""

  run: Setup
  options: dict
  scores: np.ndarray
  order: np.ndarray
  sizes: np.ndarray


def setup_curriculum(config: ml_collections.ConfigDict, *,
                     log: Callable[[str], None] = print) -> CurriculumSetup:
  """Builds a curriculum run from ``config`` (writes nothing): the engine's
  :func:`kdjax.engine.setup`, the teacher's scores of the training split, and the feed
  of :class:`CurriculumSource` in place of the engine's.

  Raises:
    UserError: a bad scheme or config, no teacher, a teacher cache, the stream feed or
      a teacher on devices of its own.
  """
  options = curriculum_options(config)
  validate(config)   # the config's own fields before the teacher's
  if not config.teacher.workdir:
    raise UserError('the curriculum scheme orders the examples by a teacher: set '
                    '--config.teacher.workdir=DIR (a finished `kdjax train` run)')
  if config.teacher.cache or int(config.teacher.devices) or config.data.feed == 'stream':
    raise UserError('the curriculum scheme runs its teacher in the step on the device feed: '
                    'unset config.teacher.cache and config.teacher.devices, and keep '
                    "config.data.feed 'auto' or 'device'")
  if config.get('on_policy') is not None:
    raise UserError('the curriculum scheme feeds the data set\'s examples; remove '
                    'config.on_policy')
  run = setup(config, log=log)
  if run.feed_kind != 'device':
    raise UserError(f'{config.data.name}:{config.data.train_split} is too large for the device '
                    'feed the curriculum needs; raise config.data.device_max_bytes')
  data_dir = config.data.data_dir or None
  arrays = kdata.load_arrays(config.data.name, config.data.train_split, data_dir=data_dir)
  logits = teacher_logits(run.teacher, arrays, int(config.data.eval_batch_size))
  scores, order = difficulty_order(logits, np.asarray(arrays['label']), options['score'])
  sizes = pacing_sizes(int(config.num_steps), len(order), int(config.batch_size),
                       pacing=options['pacing'], start_fraction=options['start_fraction'],
                       full_at=options['full_at'], increase=options['increase'])
  source = CurriculumSource(arrays, order=order, sizes=sizes, batch_size=int(config.batch_size),
                            seed=int(config.seed), mesh=run.mesh)
  old = run.feed
  feed = Feed(source, augment=old.augment, seed=old.seed, teacher=old.teacher, needs=old.needs,
              prompt_loss=old.prompt_loss)
  calls = TrainCalls(run.step, feed, state_shardings=run.state_shardings, mesh=run.mesh)
  run = run._replace(feed=feed, calls=calls, feed_kind='curriculum')
  return CurriculumSetup(run, options, scores, order, sizes)


def _check_or_write_order(workdir: str, built: CurriculumSetup, resumed: bool) -> None:
  """Writes ``WORKDIR/curriculum.npz`` on a fresh run; on a resumed one, refuses an order
  that differs from the one written (the teacher's weights changed)."""
  path = storage.join(workdir, ORDER_FILE)
  if resumed and storage.exists(path):
    with np.load(io.BytesIO(storage.read_bytes(path))) as saved:
      same = (np.array_equal(saved['order'], built.order)
              and np.array_equal(saved['sizes'], built.sizes))
    if not same:
      raise UserError(f'the teacher now orders the examples differently from {path} (its '
                      'weights changed); use a new --workdir')
    return
  if jax.process_index() == 0:
    buffer = io.BytesIO()
    np.savez(buffer, scores=built.scores, order=built.order, sizes=built.sizes)
    storage.write_bytes(path, buffer.getvalue())


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the student on the curriculum into ``workdir`` and returns the summary
  (``summary.json``): the usual figures, the teacher's fingerprint, the scheme's
  options, and ``curriculum_full_step``, the first step that draws from the whole set.
  A rerun resumes from the last checkpoint to the uninterrupted result.

  Raises:
    UserError: a bad config, scheme, teacher, data set or workdir (nothing written).
    Diverged: a non-finite loss or gradient norm (``summary.json`` says where).
  """
  workdir = workdir_lib.resolve(workdir)
  built = setup_curriculum(config, log=log_line)
  run = built.run
  resumed = workdir_lib.latest_step(workdir) is not None
  if resumed:   # the workdir's config first, then its order, before anything more is written
    workdir_lib.prepare(workdir, config, has_results=True, identity=IDENTITY)
    _check_or_write_order(workdir, built, resumed=True)
  fitted, start = fit_run(_writing_order(run, workdir, built, resumed), config, workdir,
                          identity=IDENTITY)
  full = np.flatnonzero(built.sizes == len(built.order))
  summary = {**fitted.summary(resumed_from=start, feed=run.feed_kind),
             'scheme': NAME, **{k: v for k, v in built.options.items() if k != 'name'},
             'teacher_step': run.teacher.step, 'teacher_fingerprint': run.teacher.fingerprint,
             'curriculum_full_step': int(full[0]) if len(full) else None}
  write_summary(workdir, summary)
  if jax.process_index() == 0:
    metrics_lib.plot_learning_curves(workdir, title='curriculum')
  return summary


def _writing_order(run: Setup, workdir: str, built: CurriculumSetup, resumed: bool) -> Setup:
  """``run`` whose fresh ``init`` also writes the order file (``fit_run`` calls it after
  ``config.json`` is written, so nothing reaches a workdir a bad config names)."""
  if resumed:
    return run
  init = run.init

  def init_and_write():
    state = init()
    _check_or_write_order(workdir, built, resumed=False)
    return state

  return run._replace(init=init_and_write)
