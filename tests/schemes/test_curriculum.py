"""Curriculum distillation (``kdjax.schemes.curriculum``): the pacing and the order against
numpy, every batch drawn from the prefix that a numpy recomputation of the teacher's
scores and of the pacing allows, bad configs refused in one line with nothing written,
and a run killed with SIGKILL resumed to the uninterrupted run's parameters."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kdjax.schemes import difficulty_order
from kdjax.schemes import pacing_sizes
from kdjax.schemes import setup_curriculum

STEPS = 30
OVERRIDES = [f'--config.num_steps={STEPS}', '--config.checkpoint_every=10', '--config.log_every=10',
             f'--config.eval_every={STEPS}', '--config.steps_per_call=5', '--config.batch_size=64']


@pytest.fixture(autouse=True)
def _highest_precision():
  with jax.default_matmul_precision('highest'):
    yield


def np_fraction(t, total, pacing, g0, a, r=2.0):
  """The pacing functions, written again from Platanios et al. (linear, root) and
  Hacohen & Weinshall (fixed exponential)."""
  ramp = a * total
  if pacing == 'linear':
    g = g0 + (1 - g0) * t / ramp
  elif pacing == 'root':
    g = np.sqrt(g0 ** 2 + (1 - g0 ** 2) * t / ramp)
  else:
    rises = int(np.ceil(np.log(1 / g0) / np.log(r) - 1e-12))
    g = g0 * r ** np.floor(t / (ramp / rises))
  return min(1.0, g)


@pytest.mark.parametrize('pacing', ['linear', 'root', 'exponential'])
def test_pacing_sizes_match_numpy(pacing):
  total, n, b = 200, 1000, 32
  got = pacing_sizes(total, n, b, pacing=pacing, start_fraction=0.1, full_at=0.6)
  want = [min(n, max(b, int(np.ceil(np_fraction(t, total, pacing, 0.1, 0.6) * n - 1e-9))))
          for t in range(total)]
  np.testing.assert_array_equal(got, want)
  assert got[0] == 100 and got[-1] == n and np.all(np.diff(got) >= 0)
  assert got[int(0.6 * total) - 2] < n and got[int(0.6 * total)] == n   # full at 60%


def test_order_by_confidence_and_by_loss_is_easiest_first():
  rng = np.random.default_rng(0)
  z = rng.normal(size=(50, 5)) * 3
  y = rng.integers(0, 5, 50)
  y[3] = -1                                        # unlabeled: the largest probability
  p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
  p_y = np.where(y >= 0, p[np.arange(50), np.maximum(y, 0)], p.max(-1))
  scores, order = difficulty_order(z, y, 'confidence')
  np.testing.assert_allclose(scores, p_y, rtol=1e-12)
  np.testing.assert_array_equal(order, np.argsort(-p_y, kind='stable'))
  loss, by_loss = difficulty_order(z, y, 'loss')
  np.testing.assert_allclose(loss, -np.log(p_y), rtol=1e-12)
  np.testing.assert_array_equal(by_loss, order)   # -log p is decreasing in p


def _config(paths, data_dir, teacher_dir, *extra):
  from kdjax.config import load_config
  flags = [f'--config.data.name={paths["small"]}', f'--config.data.data_dir={data_dir}',
           f'--config.teacher.workdir={teacher_dir}', '--config.progress=false', *OVERRIDES,
           *extra]
  return load_config(f'{paths["configs"]}/mnist1d/curriculum.py:tiny',
                     [tuple(f[len('--config.'):].split('=', 1)) for f in flags])


def test_every_batch_comes_from_the_prefix_numpy_allows(paths, data_dir, teacher_dir):
  from kdjax import data as kdata
  from kdjax.teacher import load_teacher
  config = _config(paths, data_dir, teacher_dir, '--config.scheme.start_fraction=0.1',
                   '--config.scheme.full_at=0.8')
  built = setup_curriculum(config, log=lambda _: None)
  # The teacher's scores again: its logits on the whole split in one call, then numpy.
  arrays = kdata.load_arrays(paths['small'], 'train', data_dir=data_dir)
  teacher = load_teacher(teacher_dir, built.run.mesh)
  z = np.asarray(teacher.apply(*teacher.variables, jnp.asarray(arrays['x']), train=False)[0]
                 .logits, np.float64)
  p = np.exp(z - z.max(-1, keepdims=True))
  p /= p.sum(-1, keepdims=True)
  p_y = p[np.arange(len(p)), arrays['label']]
  np.testing.assert_allclose(built.scores, p_y, rtol=1e-4, atol=1e-6)
  n_all = len(p_y)
  sizes = [min(n_all, max(64, int(np.ceil(np_fraction(t, STEPS, 'linear', 0.1, 0.8) * n_all
                                          - 1e-9)))) for t in range(STEPS)]
  np.testing.assert_array_equal(built.sizes, sizes)
  assert sizes[0] < n_all // 5 and sizes[-1] == n_all

  source = built.run.feed.source

  def positions(first, n):
    inputs = source.inputs(first, n)
    batch_at = lambda inp: jax.lax.map(lambda i: source.batches(inp, n)(i)['position'],
                                       jnp.arange(n))
    return np.asarray(jax.jit(batch_at)(inputs))

  got = positions(0, STEPS)
  ranked = np.sort(p_y)[::-1]
  for t in range(STEPS):
    assert len(set(got[t].tolist())) == 64, t                       # no repeats in a batch
    # the easiest sizes[t] examples (numpy's order; a near-tie at the border may go either way)
    assert np.all(p_y[got[t]] >= ranked[sizes[t] - 1] - 1e-5), t
  assert len(set(got[:3].ravel().tolist())) <= sizes[2]             # the early prefix is small
  # a function of (seed, step): the same batches whatever call they fall in (a resume)
  np.testing.assert_array_equal(np.concatenate([positions(0, 10), positions(10, 20)]), got)


@pytest.mark.parametrize('override,message', [
    ('--config.scheme.score=margin', 'config.scheme.score must be one of confidence, loss'),
    ('--config.scheme.pacing=step', 'config.scheme.pacing must be one of linear, root'),
    ('--config.scheme.start_fraction=0.0', 'config.scheme.start_fraction must be in (0, 1]'),
    ('--config.teacher.workdir=', 'orders the examples by a teacher'),
])
def test_cli_refuses_a_bad_curriculum_and_writes_nothing(paths, tmp_path, kdjax_main, override,
                                                          message):
  wd = tmp_path / 'run'
  out = kdjax_main(['distill', '--config', f'{paths["configs"]}/mnist1d/curriculum.py:tiny',
                    '--workdir', str(wd), '--config.teacher.workdir=/nonexistent/teacher',
                    override], check=False)
  assert out.returncode == 2, out.stderr[-2000:]
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith('kdjax: error: ') and message in lines[0], lines
  assert not wd.exists()


def _args(paths, data_dir, teacher_dir, wd):
  return ['distill', '--config', f'{paths["configs"]}/mnist1d/curriculum.py:tiny',
          '--workdir', wd, f'--config.data.name={paths["small"]}',
          f'--config.data.data_dir={data_dir}', f'--config.teacher.workdir={teacher_dir}',
          '--config.progress=false', *OVERRIDES]


def _params(wd):
  from kdjax.workdir import restore_subtree
  return jax.tree.leaves(restore_subtree(wd, STEPS, ('params', 'student')))


@pytest.mark.slow
def test_kill9_resumes_to_the_uninterrupted_result(paths, data_dir, teacher_dir, tmp_path,
                                                   kdjax_main, kill9):
  ref, wd = str(tmp_path / 'ref'), str(tmp_path / 'killed')
  killed_at = kill9(_args(paths, data_dir, teacher_dir, wd),
                    os.path.join(wd, 'checkpoints'), timeout=120)
  assert killed_at is not None and killed_at < STEPS, 'the run ended before it was killed'
  kdjax_main(_args(paths, data_dir, teacher_dir, ref))   # the uninterrupted run
  out = kdjax_main(_args(paths, data_dir, teacher_dir, wd))
  assert f'resuming from step {killed_at}' in out.stdout
  a, b = (json.load(open(os.path.join(d, 'summary.json'))) for d in (ref, wd))
  assert b['resumed_from'] == killed_at
  for key in ('step', 'eval_accuracy', 'eval_loss', 'train_loss', 'curriculum_full_step'):
    assert a[key] == b[key], key
  assert all(np.array_equal(x, y) for x, y in zip(_params(ref), _params(wd)))
  with np.load(os.path.join(wd, 'curriculum.npz')) as saved:
    assert saved['sizes'][0] < saved['sizes'][-1] == len(saved['order'])


def test_an_order_that_changed_is_refused_on_resume(tmp_path):
  from kdjax.errors import UserError
  from kdjax.schemes import CurriculumSetup
  from kdjax.schemes.curriculum import ORDER_FILE
  from kdjax.schemes.curriculum import _check_or_write_order
  order, sizes = np.array([2, 0, 1], np.int32), np.array([2, 3], np.int32)
  built = CurriculumSetup(None, {}, np.array([0.5, 0.2, 0.9]), order, sizes)
  _check_or_write_order(str(tmp_path), built, resumed=False)
  assert (tmp_path / ORDER_FILE).exists()
  _check_or_write_order(str(tmp_path), built, resumed=True)          # the same: accepted
  with pytest.raises(UserError, match='orders the examples differently'):
    _check_or_write_order(str(tmp_path), built._replace(order=order[::-1].copy()), resumed=True)
