"""Precision and mixed precision in the engine (docs/precision.md): ``config.precision`` in
the lowered programs, bfloat16 computation with float32 master weights, bfloat16 and int8
frozen teachers, and activation rematerialization."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from kdjax import data as kdata
from kdjax import teacher as teacher_lib
from kdjax.config import load_config
from kdjax.engine import setup
from kdjax.engine.config import base_config
from kdjax.engine.config import validate
from kdjax.engine.precision import student_model
from kdjax.engine.setup import Data
from kdjax.engine.step import init_train_state
from kdjax.engine.step import make_train_step
from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.models.base import REMAT_POLICIES
from kdjax.parallel import make_mesh

# bfloat16 computation against float32, 30 steps of Adam on the same data from the same
# initial float32 weights: every step's loss within this (absolute, in nats). bfloat16
# keeps 8 bits of mantissa (relative rounding 2^-9 = 0.002 per operation); measured on
# XLA:CPU: at most 0.0010 (classifier) and 0.0025 (decoder LM).
BF16_LOSS_ATOL = 0.02
# An int8 teacher (per-output-channel symmetric kernels and embeddings) against the same
# teacher in float32, on evaluation rows: the largest difference of a token's
# log-probability; measured 0.011 on the tiny LM teacher (64 test rows; 0.012 for a
# bfloat16 teacher).
INT8_LOGPROB_ATOL = 0.05
BF16_LOGPROB_ATOL = 0.05


# Test programs only: XLA:CPU's backend optimizations cost more compile time than these
# tiny arrays give back.
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def _float_dtypes(tree):
  return {str(x.dtype) for x in jax.tree.leaves(tree) if jnp.issubdtype(x.dtype, jnp.floating)}


def _lm_config(paths, data_dir, teacher, **overrides):
  overrides = {'data.data_dir': data_dir, 'teacher.workdir': teacher, 'progress': False,
               **overrides}
  return load_config(f'{paths["configs"]}/lm/token_kd.py:tiny',
                     [(k, str(v)) for k, v in overrides.items()])


# --------------------------------------------------------------------------- the config

@pytest.mark.parametrize('field, value', [('precision', 'fast'), ('model.remat', 'some'),
                                          ('teacher.quantize', 'int4'),
                                          ('teacher.dtype', 'float16')])
def test_a_bad_value_is_refused_in_one_line(field, value):
  config = base_config()
  group, _, key = field.rpartition('.')
  (config[group] if group else config)[key] = value
  with pytest.raises(UserError, match=f'config.{field} must be one of') as e:
    validate(config)
  assert '\n' not in str(e.value)


def test_the_cli_refuses_a_bad_precision_before_writing(kdjax_main, paths, tmp_path):
  workdir = tmp_path / 'run'
  out = kdjax_main(['train', '--config', f'{paths["configs"]}/mnist1d/teacher.py:tiny',
                    '--workdir', str(workdir), '--config.precision=fast'], check=False)
  assert out.returncode == 2
  assert len(out.stderr.strip().splitlines()) == 1 and 'config.precision' in out.stderr
  assert not workdir.exists()


# --------------------------------------------------------------------------- precision

def _classifier_run(precision, **model):
  """A run on a data set in memory (no files read): an MLP on 8 features, 3 classes."""
  rng = np.random.default_rng(0)
  x = rng.normal(size=(64, 8)).astype(np.float32)
  arrays = {'x': x, 'label': (x[:, 0] > 0).astype(np.int32) + (x[:, 1] > 1),
            'id': np.arange(64, dtype=np.int32)}
  spec = kdata.DatasetSpec('memory', (8,), 3, {'train': 64, 'test': 64})
  config = base_config()
  config.batch_size, config.num_steps, config.precision = 16, 4, precision
  config.model.name, config.model.kwargs = 'mlp', {'hidden': (16,)}
  config.model.update(model)
  return setup(config, data=Data(spec, arrays, arrays), log=lambda _: None)


def test_precision_is_in_the_lowered_step_and_forward():
  highest, default = _classifier_run('highest'), _classifier_run('default')
  batch = {'x': jax.ShapeDtypeStruct((16, 8), jnp.float32),
           'label': jax.ShapeDtypeStruct((16,), jnp.int32),
           'mask': jax.ShapeDtypeStruct((16,), jnp.bool_)}
  params, state = highest.abstract_state.params['student'], highest.abstract_state.model_state

  def texts(run):
    step = jax.jit(run.step).lower(run.abstract_state, batch).as_text()
    forward = jax.jit(functools.partial(run.apply, train=False)).lower(
        params, state, batch['x']).as_text()
    return step, forward

  # 'default' leaves the ambient precision as it is: set it here, since another test of
  # this process may have left the global one at 'highest'.
  with jax.default_matmul_precision('default'):
    for text in texts(highest):
      assert 'dot_general' in text and 'HIGHEST' in text
    for text in texts(default):
      assert 'dot_general' in text and 'HIGHEST' not in text


# --------------------------------------------------------------------------- bfloat16

def _train(apply, params, model_state, batch, *, steps=30):
  """``steps`` Adam steps on one batch (one jitted scan): the losses, the final state."""
  tx = optax.adam(3e-3)
  objective = build_objective({'ce': {'weight': 1.0}})
  loss_params, loss_state = objective.init(jax.random.key(1), {})
  step = make_train_step(apply, objective, tx)
  state = init_train_state(params, model_state, tx, rng=jax.random.key(0),
                           loss_params=loss_params, loss_state=loss_state)

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def run(state):
    return jax.lax.scan(lambda s, _: step(s, batch), state, None, length=steps)

  state, metrics = run(state)
  return np.asarray(metrics['loss'][0] / metrics['loss'][1]), state


@pytest.mark.parametrize('name, kwargs, input_shape, num_classes', [
    ('mlp', {'hidden': (32,)}, (16,), 4),
    ('llama', {'hidden_size': 32, 'num_layers': 1, 'num_heads': 2}, (16,), 24),
])
def test_bfloat16_computation_keeps_float32_weights_and_follows_float32(
    name, kwargs, input_shape, num_classes):
  rng = np.random.default_rng(1)
  if name == 'mlp':
    x = rng.normal(size=(32, *input_shape)).astype(np.float32)
    label = np.argmax(x[:, :num_classes], axis=-1).astype(np.int32)
    mask = np.ones(32, bool)
  else:   # next token of a repeating pattern
    row = np.arange(input_shape[0] + 1) % 7 + 2
    ids = np.stack([np.roll(row, -k) for k in range(8)]).astype(np.int32)
    x, label, mask = ids[:, :-1], ids[:, 1:], np.ones((8, input_shape[0]), bool)
  batch = {'x': jnp.asarray(x), 'label': jnp.asarray(label), 'mask': jnp.asarray(mask)}
  runs = {}
  for dtype in ('float32', 'bfloat16'):
    apply, init, _ = student_model({'name': name, 'kwargs': kwargs, 'dtype': dtype},
                                   num_classes=num_classes, input_shape=input_shape)
    params, model_state = jax.jit(init)()
    assert _float_dtypes(params) == {'float32'}
    out, _ = jax.eval_shape(apply, params, model_state, batch['x'])
    assert out.logits.dtype == jnp.dtype(dtype)          # the computation is in dtype
    runs[dtype] = _train(apply, params, model_state, batch)
  (loss32, _), (loss16, state16) = runs['float32'], runs['bfloat16']
  assert _float_dtypes(state16.params) == {'float32'}     # master weights
  assert _float_dtypes(state16.opt_state) == {'float32'}  # Adam's moments
  assert loss16[-1] < 0.5 * loss16[0]                     # it learns
  np.testing.assert_allclose(loss16, loss32, atol=BF16_LOSS_ATOL)


# --------------------------------------------------------------------------- remat

def _decoder_grads(remat, params):
  """The lowered loss and gradient of a 2-block decoder with ``remat`` (built abstractly:
  the parameters are given)."""
  apply, _, (_, state) = student_model(
      {'name': 'llama', 'kwargs': {'hidden_size': 32, 'num_layers': 2, 'num_heads': 2},
       'remat': remat}, num_classes=29, input_shape=(16,))
  x = jnp.asarray(np.random.default_rng(2).integers(0, 29, (4, 16)), jnp.int32)

  def loss(p):
    out, _ = apply(p, state, x, train=True)
    return jnp.mean(jax.nn.logsumexp(out.logits, -1) - out.logits[..., 0])

  return jax.jit(jax.value_and_grad(loss)).lower(params)


def test_remat_per_block_gives_the_same_loss_and_gradients_with_less_memory():
  _, init, _ = student_model({'name': 'llama', 'kwargs': {
      'hidden_size': 32, 'num_layers': 2, 'num_heads': 2}}, num_classes=29, input_shape=(16,))
  params, _ = jax.jit(init)()
  with jax.default_matmul_precision('highest'):
    texts = {name: _decoder_grads(name, params) for name in REMAT_POLICIES}
    plain, full = texts['none'], texts['full']
    texts = {name: lowered.as_text() for name, lowered in texts.items()}
    assert len(set(texts.values())) >= 4   # each policy its own program (two may coincide)
    assert all(texts[name] != texts['none'] for name in texts if name != 'none')
    a, b = plain.compile(FAST_COMPILE), full.compile(FAST_COMPILE)
    (va, ga), (vb, gb) = a(params), b(params)
  np.testing.assert_allclose(vb, va, rtol=1e-6)
  for x, y in zip(jax.tree.leaves(gb), jax.tree.leaves(ga)):
    np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-7)
  memory_a, memory_b = a.memory_analysis(), b.memory_analysis()
  if memory_a is not None and memory_b is not None:   # XLA:CPU and GPU report it
    assert memory_b.temp_size_in_bytes < memory_a.temp_size_in_bytes


def test_remat_around_a_classifier_forward_gives_the_same_gradients():
  x = jnp.asarray(np.random.default_rng(3).normal(size=(8, 16)), jnp.float32)
  grads = {}
  for remat in ('none', 'dots_saveable'):
    apply, init, _ = student_model({'name': 'mlp', 'kwargs': {'hidden': (32, 32)},
                                    'remat': remat}, num_classes=5, input_shape=(16,))
    params, state = jax.jit(init)()
    loss = lambda p: jnp.sum(apply(p, state, x, train=True)[0].logits ** 2)
    lowered = jax.jit(jax.grad(loss)).lower(params)
    grads[remat] = (lowered.as_text(), lowered.compile(FAST_COMPILE)(params))
  assert grads['none'][0] != grads['dots_saveable'][0]
  for x_, y in zip(jax.tree.leaves(grads['dots_saveable'][1]), jax.tree.leaves(grads['none'][1])):
    np.testing.assert_allclose(x_, y, rtol=1e-6, atol=1e-7)


# --------------------------------------------------------------------------- teachers

def test_int8_and_bfloat16_teachers_follow_the_float32_one(lm_teacher_dir, data_dir):
  mesh = make_mesh([('data', -1)])
  where = {'workdir': lm_teacher_dir, 'partition_rules': [('.*', None)]}
  teachers = {kind: teacher_lib.load({**where, **options}, mesh)
              for kind, options in (('float32', {}), ('int8', {'quantize': 'int8'}),
                                    ('bfloat16', {'dtype': 'bfloat16'}))}
  rows = kdata.load_arrays('shakespeare_lm/tiny', 'test', data_dir=data_dir)
  x = jnp.asarray(rows['x'][:8])
  logprobs = {}
  with jax.default_matmul_precision('highest'):
    for kind, t in teachers.items():
      forward = jax.jit(lambda v: teacher_lib.outputs(t.apply, v, x, ('teacher_logits',)),
                        compiler_options=FAST_COMPILE)
      out = forward(t.variables)['teacher_logits']
      logprobs[kind] = np.asarray(jax.nn.log_softmax(out.astype(jnp.float32)))
  int8_error = np.max(np.abs(logprobs['int8'] - logprobs['float32']))
  bf16_error = np.max(np.abs(logprobs['bfloat16'] - logprobs['float32']))
  assert 0 < int8_error < INT8_LOGPROB_ATOL and 0 < bf16_error < BF16_LOGPROB_ATOL

  f32, q = teachers['float32'].variables[0], teachers['int8'].variables[0]
  kernels = [w for w in jax.tree.leaves(q, is_leaf=lambda w: isinstance(w, teacher_lib.Int8Weight))
             if isinstance(w, teacher_lib.Int8Weight)]
  assert kernels and all(w.values.dtype == jnp.int8 for w in kernels)
  assert teacher_lib.nbytes(q) < 0.3 * teacher_lib.nbytes(f32)     # ~4x smaller
  assert _float_dtypes(teachers['bfloat16'].variables[0]) == {'bfloat16'}
  assert teacher_lib.nbytes(teachers['bfloat16'].variables[0]) == teacher_lib.nbytes(f32) // 2
  # Each way of holding the teacher is its own fingerprint, read on the host alike.
  assert len({t.fingerprint for t in teachers.values()}) == 3
  assert teachers['int8'].fingerprint == teacher_lib.config_fingerprint(
      {'workdir': lm_teacher_dir, 'quantize': 'int8'})


def test_a_distillation_step_runs_with_an_int8_teacher_and_bfloat16_student(
    paths, data_dir, lm_teacher_dir):
  config = _lm_config(paths, data_dir, lm_teacher_dir, **{
      'teacher.quantize': 'int8', 'model.dtype': 'bfloat16', 'model.remat': 'full',
      'precision': 'highest'})
  run = setup(config, log=lambda _: None)
  state, metrics = run.calls(run.init(), run.feed.inputs(0, 2), 2)
  loss = np.asarray(metrics['loss'][0]) / np.asarray(metrics['loss'][1])
  assert np.all(np.isfinite(loss)) and loss.shape == (2,)
  assert np.all(np.asarray(metrics['loss/kd'][0]) > 0)
  assert _float_dtypes(state.params) == {'float32'}
