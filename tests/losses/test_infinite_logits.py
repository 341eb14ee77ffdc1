"""Every registered logit loss with -inf columns (a padded vocabulary): finite values and
gradients, equal to the loss on the logits with those columns removed.

The guard is DistiLLM's (jongwooko/distillm, ``distillm/losses.py``: an entry where
either side's logit is infinite contributes zero); ``test_reference_parity.py``
compares it with that code directly. Here the registry is iterated: every loss whose
``needs`` include the student's logits is built with its defaults (and the sparse
ones in each ``missing_mass`` mode), all in one objective, so each input shape
compiles once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kdjax.losses as L

B, C, K = 5, 8, 3
PAD = (2, 6)                                  # the padded (-inf) columns
KEEP = tuple(c for c in range(C) if c not in PAD)
REQUIRED = {'taid': dict(total_steps=10), 'ctkd': dict(curriculum_steps=10)}
# The sparse losses' other modes take other code paths (the tail, the top-k support).
VARIANTS = {
    'sparse_kd': [dict(), dict(missing_mass='uniform')],
    'sparse_reverse_kl': [dict(), dict(missing_mass='zero')],
    'sparse_generalized_jsd': [dict(), dict(missing_mass='uniform', beta=0.4)],
    'sparse_tvd': [dict(), dict(missing_mass='uniform')],
}
# Test programs only: XLA:CPU's backend optimizations cost more compile time than
# these tiny arrays ever give back (the values are the same).
FAST_COMPILE = {'xla_backend_optimization_level': 0}


def logit_losses():
  """kdjax's registered losses that read the student's logits (the ones a padded vocabulary
  hits); losses registered by users in the same process (the notebook's) are not kdjax's."""
  return [spec for spec in L.catalog() if 'student_logits' in spec.needs
          and spec.factory.__module__.startswith('kdjax.losses')]


def terms():
  out = {}
  for spec in logit_losses():
    for i, options in enumerate(VARIANTS.get(spec.name, [REQUIRED.get(spec.name, {})])):
      out[f'{spec.name}#{i}'] = dict(loss=spec.name, **options)
  return out


TERMS = terms()
NAMES = tuple(TERMS)


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  with jax.default_matmul_precision('highest'):
    yield


def _inputs(s, t, labels, where):
  t = jnp.asarray(t, jnp.float32)
  vals, idx = jax.lax.top_k(t, K)
  return dict(student_logits=jnp.asarray(s, jnp.float32), teacher_logits=t,
              labels=jnp.asarray(labels), where=jnp.asarray(where),
              teacher_topk_logits=vals, teacher_topk_indices=idx,
              teacher_sample_indices=idx, teacher_sample_weights=jax.nn.softmax(vals, -1),
              teacher_logsumexp=jax.nn.logsumexp(t, axis=-1), step=jnp.asarray(3))


def _make(seed=0):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(B, C)) * 2.0
  t = rng.normal(size=(B, C)) * 2.0
  labels = rng.choice(KEEP, size=B)
  labels[1] = -1                                           # unlabeled
  where = np.array([True, True, True, False, True])        # one padded example
  return s, t, labels, where


def _values(objective, params, state):
  """``(student_logits, inputs) -> [terms]``: each term's masked mean."""
  def values(s, inputs):
    _, _, metrics = objective.apply(params, state, {**inputs, 'student_logits': s})
    return jnp.stack([metrics[f'loss/{n}'][0] / jnp.maximum(metrics[f'loss/{n}'][1], 1.0)
                      for n in NAMES])
  return values


@pytest.fixture(scope='module')
def results():
  """Each term's value and gradient (one program for all) on padded logits, on one-sided
  padding, and its value on the logits without the padded columns (top-k indices and
  labels renumbered).

  Computed under its own full-precision pin: a module-scoped fixture is set up before
  the per-test ``_highest_matmul_precision`` one, and the padded and cut programs would
  otherwise round their products differently under TF32 on GPUs (about 1e-4)."""
  with jax.default_matmul_precision('highest'):
    return _results()


def _results():
  s, t, labels, where = _make()
  objective = L.build_objective(TERMS)
  renumber = {c: i for i, c in enumerate(KEEP)}
  cut = _inputs(s[:, KEEP], t[:, KEEP], np.array([renumber.get(y, -1) for y in labels]),
                where)
  params, state = objective.init(jax.random.key(0), cut)
  values = _values(objective, params, state)
  with_grads = jax.jit(lambda inputs: (values(inputs['student_logits'], inputs),
                                       jax.jacrev(values)(inputs['student_logits'], inputs)),
                       compiler_options=FAST_COMPILE)
  padded_s, padded_t = s.copy(), t.copy()
  padded_s[:, PAD] = -np.inf
  padded_t[:, PAD] = -np.inf
  only_t = t.copy()
  only_t[:, PAD[:1]] = -np.inf
  return {
      'padded': with_grads(_inputs(padded_s, padded_t, labels, where)),
      'cut': jax.jit(lambda inputs: values(inputs['student_logits'], inputs),
                     compiler_options=FAST_COMPILE)(cut),
      # One side only (same shape as padded: no compile).
      'student_only': with_grads(_inputs(padded_s, t, labels, where)),
      'teacher_only': with_grads(_inputs(s, only_t, labels, where)),
  }


def test_every_logit_loss_is_covered():
  names = {spec.name for spec in logit_losses()}
  assert {'kd', 'reverse_kl', 'generalized_jsd', 'js_divergence', 'skew_kl', 'skew_reverse_kl',
          'tvd', 'dkd', 'logit_standardized_kd', 'bdkd', 'dist', 'sinkhorn_kd', 'pld', 'tf_kd',
          'adaptive_weight_kd', 'taid', 'ctkd', 'ce', 'chunked_kd', 'sparse_kd',
          'sparse_reverse_kl', 'sparse_generalized_jsd', 'sparse_tvd'} <= names
  assert names == {TERMS[n]['loss'] for n in NAMES}


@pytest.mark.parametrize('i, name', list(enumerate(NAMES)), ids=NAMES)
def test_padded_columns_equal_removed_columns(results, i, name):
  value, grad = np.asarray(results['padded'][0][i]), np.asarray(results['padded'][1][i])
  assert np.isfinite(value) and np.all(np.isfinite(grad))
  np.testing.assert_allclose(value, np.asarray(results['cut'][i]), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(grad[:, list(PAD)], 0.0)   # no mass, no gradient
  assert np.any(grad != 0.0) and float(value) != 0.0      # the loss is really computed


@pytest.mark.parametrize('i, name', list(enumerate(NAMES)), ids=NAMES)
def test_one_sided_infinities_are_finite(results, i, name):
  """DistiLLM's guard: an entry infinite on one side only contributes zero too."""
  for case in ('student_only', 'teacher_only'):
    value, grad = np.asarray(results[case][0][i]), np.asarray(results[case][1][i])
    assert np.isfinite(value) and np.all(np.isfinite(grad)), case
  np.testing.assert_array_equal(np.asarray(results['student_only'][1][i])[:, list(PAD)], 0.0)
