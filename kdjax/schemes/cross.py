r"""Cross-modal and cross-task distillation: teacher and student read different views
of the same example, or predict different label spaces.

* **Cross-modal.** ``config.scheme.student_view`` and ``teacher_view`` name a *view*
  (:data:`VIEWS`), a pure function of the (augmented) batch applied inside the jitted
  step, just before that model's forward: the feed augments the raw signal once, the
  teacher reads ``teacher_view(x)`` and the student ``student_view(x)`` (so both see the
  same augmented example, each in its own modality). MNIST-1D views of ``[batch, 40, 1]``:

  - ``'identity'``: the raw signal.
  - ``'downsample2'``: the mean of consecutive pairs, ``[batch, 20, 1]``.
  - ``'spectrogram'``: the short-time Fourier magnitude
    :math:`S_{f,m} = |\sum_{n=0}^{N-1} w_n\, x_{mH + n}\, e^{-2\pi i f n / N}|` with a
    periodic Hann window :math:`w` of :math:`N = 8` samples and hop :math:`H = 4`,
    ``[batch, frames = 1 + (L - N) / H, channels * (N / 2 + 1)]`` (frames as positions,
    frequencies as channels; 9 x 5 for MNIST-1D).
  - ``'identity+spectrogram'``: both, flattened and concatenated, ``[batch, 85, 1]`` for
    MNIST-1D (the multimodal input of :mod:`kdjax.schemes.mst_distill`'s teachers).

  Feature losses between the two (``hint`` with a projector, :mod:`kdjax.losses`) work
  as in plain KD: the objective's projector maps the student's feature onto the
  teacher's, whatever their widths.
* **Cross-task.** ``config.scheme.student_labels`` (None, or one student class per data
  class, e.g. ``COARSE5 = [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]``: pairs of MNIST-1D digits)
  relabels the data the student learns and is evaluated on; ``config.scheme.label_map``
  (one student class, or -1 to drop, per teacher class; the maps of
  :mod:`kdjax.schemes.multi_teacher`) brings a teacher of another label space to the
  student's: its probabilities are summed into the student's classes and renormalised
  (:func:`~kdjax.schemes.multi_teacher.map_probabilities`), and the teacher's logits the
  objective reads are their logarithm, :math:`\log \tilde p`. With a temperature
  :math:`T` the KD target is then :math:`\tilde p^{1/T} / \sum \tilde p^{1/T}` (the map
  is applied at :math:`T = 1`, before the tempering; for the identity map this equals
  the usual :math:`\mathrm{softmax}(t / T)`).

The teacher is ``config.teacher.workdir``: a ``kdjax train`` workdir, or a run of this
scheme without a teacher (a model trained on a view or on relabelled data; its view
and classes are read from its ``config.json``). Everything else is the engine's run:
its feed, objective (``config.loss.terms``, teacher terms allowed), step and loop.

References:
  Gupta, Hoffman, Malik. Cross Modal Distillation for Supervision Transfer. CVPR 2016.
  arXiv:1507.00448 (a teacher on one modality supervising a student on another).
  Hinton, Vinyals, Dean. Distilling the Knowledge in a Neural Network. 2015.
  arXiv:1503.02531.
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from kdjax import data as kdata
from kdjax import teacher as teacher_lib
from kdjax import workdir as workdir_lib
from kdjax.config import from_dict
from kdjax.config import with_defaults
from kdjax.engine import metrics as metrics_lib
from kdjax.engine.evaluate import make_evaluator
from kdjax.engine.feed import teacher_inputs
from kdjax.engine.loop import write_summary
from kdjax.engine.setup import Data
from kdjax.engine.setup import setup
from kdjax.engine.state import TrainState
from kdjax.engine.step import init_train_state
from kdjax.engine.step import make_train_step
from kdjax.errors import UserError
from kdjax.models import from_config
from kdjax.models.base import sample_inputs
from kdjax.models.base import output_kwargs
from kdjax.schemes.multi_teacher import check_label_maps
from kdjax.schemes.multi_teacher import label_map_matrix
from kdjax.schemes.multi_teacher import map_probabilities
from kdjax.schemes.online import IDENTITY
from kdjax.schemes.online import fit_run
from kdjax.schemes.online import log_line
from kdjax.schemes.online import with_step

NAME = 'cross'
COARSE5 = (0, 0, 1, 1, 2, 2, 3, 3, 4, 4)   # MNIST-1D digits in pairs: 5 coarse classes
DEFAULTS = {'name': NAME, 'student_view': 'identity', 'teacher_view': 'identity',
            'student_labels': None, 'label_map': None}
STFT_WINDOW, STFT_HOP = 8, 4


# --------------------------------------------------------------------------- views

def identity_view(x: jax.Array) -> jax.Array:
  """The raw input."""
  return x


def downsample2(x: jax.Array) -> jax.Array:
  """``[batch, L, C] -> [batch, L // 2, C]``: the mean of samples ``2i`` and ``2i + 1``.

  >>> downsample2(jnp.arange(8.0).reshape(1, 4, 2))[0].tolist()
  [[1.0, 2.0], [5.0, 6.0]]
  """
  n = x.shape[1] // 2
  return x[:, :2 * n].reshape(x.shape[0], n, 2, *x.shape[2:]).mean(axis=2)


def spectrogram(x: jax.Array, *, window: int = STFT_WINDOW, hop: int = STFT_HOP) -> jax.Array:
  """``[batch, L, C] -> [batch, frames, C * (window // 2 + 1)]``: the STFT magnitude
  with a periodic Hann window (module docstring).

  >>> spectrogram(jnp.ones((2, 40, 1))).shape
  (2, 9, 5)
  """
  if x.ndim == 2:
    x = x[..., None]
  frames = 1 + (x.shape[1] - window) // hop
  idx = np.arange(frames)[:, None] * hop + np.arange(window)[None, :]     # [frames, N]
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(window) / window)
  segments = x[:, idx, :] * jnp.asarray(hann, x.dtype)[None, None, :, None]  # [B, M, N, C]
  mag = jnp.abs(jnp.fft.rfft(segments.astype(jnp.float32), axis=2))       # [B, M, F, C]
  mag = jnp.swapaxes(mag, 2, 3)                                            # [B, M, C, F]
  return mag.reshape(x.shape[0], frames, -1).astype(x.dtype)


def raw_and_spectrogram(x: jax.Array) -> jax.Array:
  """Both modalities in one input (a *multimodal* view): the raw signal and its
  :func:`spectrogram`, each flattened and concatenated, ``[batch, L * C + frames * F, 1]``.

  >>> raw_and_spectrogram(jnp.ones((2, 40, 1))).shape
  (2, 85, 1)
  """
  if x.ndim == 2:
    x = x[..., None]
  b = x.shape[0]
  both = [x.reshape(b, -1), spectrogram(x).reshape(b, -1)]
  return jnp.concatenate(both, axis=1)[..., None]


VIEWS: dict[str, Callable[[jax.Array], jax.Array]] = {
    'identity': identity_view,
    'downsample2': downsample2,
    'spectrogram': spectrogram,
    'identity+spectrogram': raw_and_spectrogram,
}


def view_fn(name: str) -> Callable[[jax.Array], jax.Array]:
  """The view called ``name``.

  Raises:
    UserError: an unknown name.

  >>> view_fn('fft')
  Traceback (most recent call last):
  kdjax.errors.UserError: view 'fft' is not a view; use one of: identity, downsample2, spectrogram, identity+spectrogram
  """
  if name not in VIEWS:
    raise UserError(f'view {name!r} is not a view; use one of: {", ".join(VIEWS)}')
  return VIEWS[name]


def view_shape(name: str, input_shape) -> tuple[int, ...]:
  """One example's shape after view ``name``.

  >>> view_shape('spectrogram', (40, 1)), view_shape('downsample2', (40, 1))
  ((9, 5), (20, 1))
  """
  out = jax.eval_shape(view_fn(name), jax.ShapeDtypeStruct((1, *input_shape), jnp.float32))
  return tuple(out.shape[1:])


def viewed(apply: Callable, view: Callable) -> Callable:
  """``apply`` reading ``view(x)`` instead of ``x``."""
  def run(params, state, x, **kwargs):
    return apply(params, state, view(x), **kwargs)
  return run


# --------------------------------------------------------------------------- options

def cross_scheme(**options) -> ml_collections.ConfigDict:
  """``config.scheme`` for cross-modal / cross-task KD: :data:`DEFAULTS` with ``options``.

  >>> cross_scheme(student_view='spectrogram').student_view
  'spectrogram'
  """
  unknown = set(options) - set(DEFAULTS)
  if unknown:
    raise ValueError(f'unknown cross options {sorted(unknown)}; use {", ".join(DEFAULTS)}')
  return ml_collections.ConfigDict({**DEFAULTS, **options}, type_safe=False)


def _int_list(value, where: str) -> list[int] | None:
  if value is None:
    return None
  if not isinstance(value, (list, tuple)) or not all(
      isinstance(v, int) and not isinstance(v, bool) for v in value):
    raise UserError(f'{where} must be None or a list of integers; got {value!r}')
  return [int(v) for v in value]


def cross_options(config: ml_collections.ConfigDict) -> dict:
  """``config.scheme`` checked, with :data:`DEFAULTS` for what it leaves out.

  Raises:
    UserError: an unknown field or view, or a label list that is not integers.

  >>> cross_options(ml_collections.ConfigDict({'scheme': {'name': NAME, 'views': 1}}))
  Traceback (most recent call last):
  kdjax.errors.UserError: config.scheme.views is not a cross option; its options are name, student_view, teacher_view, student_labels, label_map
  """
  options = with_defaults(config.scheme, DEFAULTS, dotted='scheme', what='a cross option')
  for key in ('student_view', 'teacher_view'):
    view_fn(options[key])
  options['student_labels'] = _int_list(options['student_labels'], 'config.scheme.student_labels')
  options['label_map'] = _int_list(options['label_map'], 'config.scheme.label_map')
  return options


def relabel(arrays: dict, student_labels) -> dict:
  """``arrays`` with ``label`` sent through ``student_labels`` (unlabeled ``-1`` kept).

  >>> relabel({'label': np.array([3, -1, 9])}, COARSE5)['label'].tolist()
  [1, -1, 4]
  """
  if student_labels is None:
    return arrays
  table = np.asarray(student_labels, np.int32)
  labels = np.asarray(arrays['label'])
  return {**arrays, 'label': np.where(labels >= 0, table[np.maximum(labels, 0)], -1)}


def student_classes(num_classes: int, student_labels) -> int:
  """The student's classes: the data's, or those ``student_labels`` name.

  >>> student_classes(10, COARSE5)
  5
  """
  if student_labels is None:
    return num_classes
  if len(student_labels) != num_classes or min(student_labels) < 0:
    raise UserError(f'config.scheme.student_labels has {len(student_labels)} entries but the '
                    f'data has {num_classes} classes; give one student class (>= 0) per '
                    'data class')
  return max(student_labels) + 1


# --------------------------------------------------------------------------- the teacher

def teacher_view_and_classes(config) -> tuple[str, int | None]:
  """A teacher workdir config's view and classes: a ``cross`` run's own, else
  ``('identity', None)`` (its data set's classes)."""
  scheme = config.get('scheme')
  if scheme is not None and scheme.get('name') == NAME:
    spec = kdata.dataset_spec(config.data.name, data_dir=config.data.get('data_dir') or None)
    labels = scheme.get('student_labels')
    labels = None if labels is None else list(labels)
    return str(scheme.get('student_view') or 'identity'), student_classes(spec.num_classes,
                                                                           labels)
  return 'identity', None


def load_cross_teacher(workdir: str, mesh) -> tuple[teacher_lib.Teacher, str]:
  """The teacher of ``workdir`` (a plain or a ``cross`` run), and the view it was trained
  on; a ``cross`` run's model is built on that view's shape and its classes."""
  step = workdir_lib.latest_step(workdir) if workdir else None
  if step is None:
    return teacher_lib.load_teacher(workdir, mesh), 'identity'   # its one-line error
  config = from_dict(workdir_lib.read_config(workdir))
  view, classes = teacher_view_and_classes(config)
  if classes is None:
    return teacher_lib.load_teacher(workdir, mesh), view
  spec = kdata.dataset_spec(config.data.name, data_dir=config.data.get('data_dir') or None)
  apply, _, (params, state) = from_config(config.model, num_classes=classes,
                                          input_shape=view_shape(view, spec.input_shape),
                                          seed=int(config.seed))
  repl = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
  params = _fill(params, workdir_lib.restore_subtree(workdir, step, ('params', 'student')))
  state = _fill(state, workdir_lib.restore_subtree(workdir, step, ('model_state',)))
  variables = jax.device_put((params, state), repl)
  return teacher_lib.Teacher(apply, variables, classes, config, step,
                             teacher_lib.fingerprint(params)), view


def _fill(template, restored):
  leaves, (want, treedef) = jax.tree.leaves(restored), jax.tree.flatten(template)
  if len(leaves) != len(want) or any(tuple(w.shape) != np.shape(g) for w, g in zip(want, leaves)):
    raise UserError('the teacher checkpoint does not match its config.json model; retrain it')
  return jax.tree.unflatten(treedef, leaves)


def mapped_teacher(teacher: teacher_lib.Teacher, *, view: str, matrix, num_classes: int
                   ) -> teacher_lib.Teacher:
  """``teacher`` reading ``view(x)``, with logits :math:`\\log \\tilde p` in the student's
  classes (``matrix`` from :func:`label_map_matrix`; None: unchanged logits)."""
  inner = viewed(teacher.apply, view_fn(view))

  def apply(params, state, x, **kwargs):
    out, state = inner(params, state, x, **kwargs)
    if matrix is None:
      return out, state
    p = map_probabilities(jax.nn.softmax(out.logits.astype(jnp.float32), axis=-1), matrix)
    return out._replace(logits=jnp.log(jnp.maximum(p, 1e-30))), state

  return teacher._replace(apply=apply, num_classes=num_classes)


def _check_map(teacher_classes: int, label_map, num_classes: int) -> None:
  if label_map is None and teacher_classes != num_classes:
    raise UserError(f'the teacher predicts {teacher_classes} classes and the student '
                    f'{num_classes}; set config.scheme.label_map (one student class, or -1 '
                    'to drop, per teacher class)')
  try:
    check_label_maps([teacher_classes], [label_map], num_classes)
  except UserError as e:
    raise UserError(str(e).replace('config.scheme.teachers[0].label_map',
                                   'config.scheme.label_map').replace('teacher 0', 'the teacher')
                    ) from None


# --------------------------------------------------------------------------- the run

def setup_cross(config: ml_collections.ConfigDict, *, log: Callable[[str], None] = print):
  """Builds a cross-modal / cross-task run (writes nothing).

  Returns:
    ``(run, options)``: the engine's :class:`~kdjax.engine.Setup` whose student reads
    ``student_view(x)`` and whose feed runs the viewed, mapped teacher; and the options.

  Raises:
    UserError: a bad scheme, view, label list or map, teacher or config.
  """
  options = cross_options(config)
  data_dir = config.data.data_dir or None
  spec = kdata.dataset_spec(config.data.name, data_dir=data_dir)
  classes = student_classes(spec.num_classes, options['student_labels'])
  teacher = None
  if config.teacher.workdir:
    mesh = jax.make_mesh((jax.device_count(),), ('data',))
    raw_teacher, trained_view = load_cross_teacher(config.teacher.workdir, mesh)
    if trained_view != options['teacher_view']:
      raise UserError(f'the teacher in {config.teacher.workdir} was trained on the '
                      f'{trained_view!r} view; set config.scheme.teacher_view={trained_view!r}')
    _check_map(raw_teacher.num_classes, options['label_map'], classes)
    matrix = (None if options['label_map'] is None else
              label_map_matrix(options['label_map'], raw_teacher.num_classes, classes))
    teacher = mapped_teacher(raw_teacher, view=options['teacher_view'], matrix=matrix,
                             num_classes=classes)
  elif options['label_map'] is not None or options['teacher_view'] != 'identity':
    raise UserError('config.scheme.label_map and teacher_view describe a teacher; set '
                    'config.teacher.workdir or leave them at their defaults')
  load = lambda split: relabel(kdata.load_arrays(config.data.name, split, data_dir=data_dir),
                               options['student_labels'])
  data = Data(spec._replace(num_classes=classes), load(config.data.train_split),
              load(config.data.eval_split))
  run = setup(config, teacher=teacher, data=data, log=log)

  # The student on its view: its own shapes, init, step and evaluator.
  student_view = view_fn(options['student_view'])
  shape = view_shape(options['student_view'], spec.input_shape)
  eval_apply, init_params, _ = from_config(config.model, num_classes=classes, input_shape=shape)
  eval_apply = viewed(eval_apply, student_view)
  # The per-layer outputs the losses read, in training only (as the engine's student).
  apply = functools.partial(eval_apply, **output_kwargs(config.model.outputs))
  init = _init(apply, init_params, run.objective, run.tx, spec=spec, teacher=run.teacher)
  step = make_train_step(apply, run.objective, run.tx, nonfinite=str(config.nonfinite),
                         train_accuracy=bool(config.train_accuracy))
  evaluate_params = make_evaluator(eval_apply, data.eval, run.mesh,
                                   batch_size=int(config.data.eval_batch_size))
  run = with_step(run, config, init, step,
                  lambda state: evaluate_params(state.params['student'], state.model_state),
                  apply=apply)
  return run, options


def _init(apply, init_params, objective, tx, *, spec, teacher) -> Callable[[Any], TrainState]:
  """``init(seed)``: the student on its view and the objective's parts from a sample of
  the raw inputs (the teacher's outputs on them, when there is a teacher)."""
  x = np.zeros((2, *spec.input_shape), spec.input_dtype)
  extra = {}
  if teacher is not None:
    tx_, kwargs = teacher_inputs({'x': x})
    extra = jax.device_get(jax.jit(lambda v: teacher_lib.outputs(
        teacher.apply, v, tx_, **kwargs))(teacher.variables))

  def init(seed) -> TrainState:
    params, model_state = init_params(seed)
    out, _ = apply(params, model_state, x, train=False)
    sample = {**sample_inputs(out), **extra}
    key = jax.random.key(seed)
    loss_params, loss_state = objective.init(jax.random.fold_in(key, 1), sample)
    return init_train_state(params, model_state, tx, rng=jax.random.fold_in(key, 2),
                            loss_params=loss_params, loss_state=loss_state)

  return init


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Trains the student of a ``cross`` config into ``workdir``; returns the summary
  (``summary.json``): the usual figures plus the views and the student's classes.

  Raises:
    UserError: a bad config, scheme, teacher, map or workdir (nothing written).
  """
  workdir = workdir_lib.resolve(workdir)
  run, options = setup_cross(config, log=log_line)
  fitted, start = fit_run(run, config, workdir, identity=IDENTITY)
  summary = {
      **fitted.summary(resumed_from=start, feed=run.feed_kind),
      'scheme': NAME,
      'student_view': options['student_view'],
      'teacher_view': options['teacher_view'] if run.teacher is not None else None,
      'num_classes': run.spec.num_classes,
  }
  write_summary(workdir, summary)
  if jax.process_index() == 0:
    metrics_lib.plot_learning_curves(workdir, title=f'cross: student {options["student_view"]}')
  return summary
