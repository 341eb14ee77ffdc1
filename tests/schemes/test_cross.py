"""Cross-modal / cross-task distillation and consistent teaching
(``kdjax.schemes.cross``, ``kdjax.data.augment`` mixup and cutmix): the views and the
mixes against numpy transcriptions (mixes determined by ``(seed, id, epoch)``), the
mapped teacher's logits, and tiny runs through ``kdjax distill`` (cross-modal with a
projected hint, cross-task through a label map, function matching on mixup) plus the
missing-map refusal (one line, exit 2, nothing written)."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.data import make_augment
from kdjax.data import mix_draws
from kdjax.errors import UserError
from kdjax.schemes import COARSE5
from kdjax.schemes import downsample2
from kdjax.schemes import relabel
from kdjax.schemes import spectrogram
from kdjax.schemes import view_fn
from kdjax.schemes.cross import mapped_teacher
from kdjax.schemes.multi_teacher import label_map_matrix
from kdjax.teacher import Teacher
from kdjax.models import ModelOutput


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def np_spectrogram(x, n=8, hop=4):
  """|DFT| of Hann-windowed frames, written from the STFT's definition."""
  b, length, c = x.shape
  w = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n) / n)
  frames = 1 + (length - n) // hop
  out = np.zeros((b, frames, c, n // 2 + 1))
  for m in range(frames):
    seg = x[:, m * hop:m * hop + n, :] * w[None, :, None]
    for f in range(n // 2 + 1):
      e = np.exp(-2j * np.pi * f * np.arange(n) / n)
      out[:, m, :, f] = np.abs(np.einsum('bnc,n->bc', seg, e))
  return out.reshape(b, frames, c * (n // 2 + 1))


def test_views_against_numpy():
  x = np.random.default_rng(0).normal(size=(3, 40, 2)).astype(np.float32)
  np.testing.assert_allclose(spectrogram(jnp.asarray(x)), np_spectrogram(x), atol=1e-5)
  np.testing.assert_allclose(downsample2(jnp.asarray(x)), (x[:, 0::2] + x[:, 1::2]) / 2,
                             atol=1e-6)
  with pytest.raises(UserError, match='is not a view'):
    view_fn('stft')


def test_relabel_keeps_unlabeled():
  assert relabel({'label': np.array([0, 5, -1])}, COARSE5)['label'].tolist() == [0, 2, -1]


@pytest.mark.parametrize('kind', ['mixup', 'cutmix'])
@pytest.mark.parametrize('shape', [(5, 40, 1), (4, 6, 8, 2)])
def test_mixes_against_numpy_and_deterministic(kind, shape):
  x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
  ids, epochs = np.array([7, 3, 11, 2, 9][:shape[0]]), np.full(shape[0], 4, np.int32)
  aug = make_augment({'kind': kind, 'alpha': 0.7})
  got = np.asarray(aug(jnp.asarray(x), jnp.asarray(ids), jnp.asarray(epochs), seed=5))
  image = len(shape) == 4
  d = jax.tree.map(np.asarray, mix_draws(5, jnp.asarray(ids), jnp.asarray(epochs), alpha=0.7,
                                         length=shape[1], width=shape[2] if image else 1))
  want = x.copy()
  for i in range(shape[0]):
    j = (i + 1) % shape[0]                               # the partner: the next example
    if kind == 'mixup':
      want[i] = d['lam'][i] * x[i] + (1 - d['lam'][i]) * x[j]
    else:
      (r0, c0), (h, w) = d['start'][i], d['size'][i]
      assert h == round((1 - d['lam'][i]) ** (0.5 if image else 1) * shape[1])
      if image:
        want[i, r0:r0 + h, c0:c0 + w] = x[j, r0:r0 + h, c0:c0 + w]
      else:
        want[i, r0:r0 + h] = x[j, r0:r0 + h]
  np.testing.assert_allclose(got, want, atol=1e-6)
  # The draws are each example's: the same (seed, id, epoch) in another batch order.
  perm = np.array([2, 0, 1, 3, 4][:shape[0]])
  d2 = mix_draws(5, jnp.asarray(ids[perm]), jnp.asarray(epochs), alpha=0.7,
                 length=shape[1], width=shape[2] if image else 1)
  np.testing.assert_array_equal(np.asarray(d2['lam']), d['lam'][perm])
  other = mix_draws(5, jnp.asarray(ids), jnp.asarray(epochs + 1), alpha=0.7, length=shape[1],
                    width=shape[2] if image else 1)
  assert not np.allclose(np.asarray(other['lam']), d['lam'])


def test_mapped_teacher_log_probabilities():
  logits = jnp.array([[1.0, 0.0, 2.0, -1.0]])

  def apply(params, state, x, **kwargs):
    return ModelOutput(logits + 0 * x.sum(), {}), state

  t = Teacher(apply, ({}, {}), 4, None, 0, '')
  m = mapped_teacher(t, view='identity', matrix=label_map_matrix([0, 0, 1, -1], 4, 2),
                     num_classes=2)
  out, _ = m.apply({}, {}, jnp.zeros((1, 3)))
  p = np.exp(np.asarray(logits[0]))
  want = np.array([p[0] + p[1], p[2]]) / (p[0] + p[1] + p[2])
  np.testing.assert_allclose(np.exp(np.asarray(out.logits[0])), want, rtol=1e-5)
  assert m.num_classes == 2


def _run(kdjax_main, paths, data_dir, teacher_dir, tmp_path, config, name, *extra,
         check=True):
  workdir = str(tmp_path / name)
  out = kdjax_main(['distill', '--config', f'{paths["configs"]}/mnist1d/{config}',
                    '--workdir', workdir,
             f'--config.data.name={paths["small"]}', f'--config.data.data_dir={data_dir}',
             f'--config.teacher.workdir={teacher_dir}', '--config.num_steps=20',
             '--config.steps_per_call=10', '--config.eval_every=20', '--config.log_every=20',
             '--config.checkpoint_every=20', '--config.progress=false', *extra], check=check)
  return out, workdir


def test_cross_modal_and_cross_task_runs(kdjax_main, paths, data_dir, teacher_dir, tmp_path):
  _, wd = _run(kdjax_main, paths, data_dir, teacher_dir, tmp_path, 'cross_modal.py:tiny',
               'modal')
  s = json.load(open(os.path.join(wd, 'summary.json')))
  assert s['step'] == 20 and s['student_view'] == 'spectrogram' and s['num_classes'] == 10
  assert 0.0 <= s['eval_accuracy'] <= 1.0 and np.isfinite(s['train_loss'])
  _, wd = _run(kdjax_main, paths, data_dir, teacher_dir, tmp_path, 'cross_task.py:tiny', 'task')
  s = json.load(open(os.path.join(wd, 'summary.json')))
  assert s['num_classes'] == 5 and np.isfinite(s['train_loss'])


def test_function_matching_run(kdjax_main, paths, data_dir, teacher_dir, tmp_path):
  _, wd = _run(kdjax_main, paths, data_dir, teacher_dir, tmp_path,
               'function_matching.py:tiny,cutmix', 'fm')
  s = json.load(open(os.path.join(wd, 'summary.json')))
  assert s['step'] == 20 and np.isfinite(s['train_loss'])


def test_missing_label_map_refused(kdjax_main, paths, data_dir, teacher_dir, tmp_path):
  out, wd = _run(kdjax_main, paths, data_dir, teacher_dir, tmp_path, 'cross_modal.py:tiny',
                 'nomap',
                 '--config.scheme.student_labels=[0,0,1,1,2,2,3,3,4,4]', check=False)
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and 'set config.scheme.label_map' in lines[0], out.stderr
  assert not os.path.exists(wd)
