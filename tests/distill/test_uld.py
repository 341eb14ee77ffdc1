"""Universal Logit Distillation across tokenizers: the loss against the authors' formula,
the re-tokenizing feed, a distill run end to end, and the refusal of mismatched
tokenizers without it.

The reference is a numpy transcription of ``DistillationLoss.forward`` in
github.com/Nicolas-BZRD/llm-recipes, ``models/distillation_model.py`` (Boizard et al.
2024, arXiv:2402.12030): per example, the answer tokens of each side from the first
one, a softmax per side at its temperature, a descending sort, the smaller vocabulary
padded with zeros, then ``abs(student[:size] - teacher[:size]).sum(-1).mean(-1)`` with
``size`` the shorter answer; the batch value is the mean over examples.

The run tests pair the session's tiny teacher (BPE of 300, ``shakespeare_lm/tiny``) with
a student on the same plays read as characters (``shakespeare_lm/tiny_char``): two
tokenizers, two vocabulary sizes, one text.
"""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

import kdjax.losses as L
from kdjax import data as kdata
from kdjax.engine.feed import TEACHER_VIEW_KEYS
from kdjax.engine.feed import Retokenizer
from kdjax.engine.feed import StreamSource
from kdjax.parallel import make_mesh

CHARS = 'shakespeare_lm/tiny_char'


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  with jax.default_matmul_precision('highest'):
    yield


# --------------------------------------------------------------------------- the loss

def _softmax(z):
  z = z - z.max(-1, keepdims=True)
  e = np.exp(z)
  return e / e.sum(-1, keepdims=True)


def authors_uld(s_logits, t_logits, s_mask, t_mask, s_temp=1.0, t_temp=1.0):
  """Per-example ULD as llm-recipes computes it (valid positions in order, the r-th
  student one against the r-th teacher one)."""
  out = []
  for i in range(s_logits.shape[0]):
    s_idx, t_idx = np.flatnonzero(s_mask[i]), np.flatnonzero(t_mask[i])
    ps = -np.sort(-_softmax(s_logits[i, s_idx] / s_temp), axis=-1)
    pt = -np.sort(-_softmax(t_logits[i, t_idx] / t_temp), axis=-1)
    width = max(ps.shape[-1], pt.shape[-1])
    ps = np.pad(ps, [(0, 0), (0, width - ps.shape[-1])])
    pt = np.pad(pt, [(0, 0), (0, width - pt.shape[-1])])
    size = min(len(s_idx), len(t_idx))
    out.append(np.abs(ps[:size] - pt[:size]).sum(-1).mean(-1))
  return np.array(out)


def _case(seed=0, b=3, ts=7, tt=9, vs=11, vt=6):
  rng = np.random.default_rng(seed)
  s = rng.normal(size=(b, ts, vs)) * 2.0
  t = rng.normal(size=(b, tt, vt)) * 2.0
  # Answers of each side, contiguous after a prompt as in the authors' data; of other
  # lengths on the two sides (each row: shorter on one side or the other).
  s_mask = np.zeros((b, ts), bool)
  t_mask = np.zeros((b, tt), bool)
  for i, (s0, s1, t0, t1) in enumerate([(2, 7, 1, 5), (0, 4, 3, 9), (3, 6, 0, 3)]):
    s_mask[i, s0:s1] = True
    t_mask[i, t0:t1] = True
  return s, t, s_mask, t_mask


def _per_example(value, aligned):
  value, aligned = np.asarray(value), np.asarray(aligned, np.float64)
  return (value * aligned).sum(-1) / aligned.sum(-1)


@pytest.mark.parametrize('temps', [(1.0, 1.0), (2.0, 0.5)])
def test_uld_equals_the_authors_formula(temps):
  s, t, s_mask, t_mask = _case()
  want = authors_uld(s, t, s_mask, t_mask, *temps)
  term = L.get('uld').factory(student_temperature=temps[0], teacher_temperature=temps[1])
  with jax.enable_x64(True):
    inputs = {'student_logits': jnp.asarray(s), 'teacher_logits': jnp.asarray(t),
              'where': jnp.asarray(s_mask), 'teacher_where': jnp.asarray(t_mask)}
    (value, aligned), _ = jax.jit(term.apply)({}, {}, inputs)
    np.testing.assert_allclose(_per_example(value, aligned), want, rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(aligned).sum(-1), [4, 4, 3])
    # The objective averages over every aligned token of the batch.
    objective = L.build_objective({'uld': {}})
    loss, _, metrics = jax.jit(objective.apply)({'uld': {}}, {'uld': {}}, dict(inputs, step=0))
  counts = np.asarray(aligned).sum(-1)
  if temps == (1.0, 1.0):
    np.testing.assert_allclose(float(loss), (want * counts).sum() / counts.sum(), rtol=1e-6)
    assert float(metrics['loss/uld'][1]) == counts.sum()


def test_non_contiguous_positions_pair_by_rank():
  s, t, _, _ = _case(seed=1)
  rng = np.random.default_rng(2)
  s_mask, t_mask = rng.random(s.shape[:2]) < 0.6, rng.random(t.shape[:2]) < 0.6
  with jax.enable_x64(True):
    value = L.uld_loss(s, t, where=s_mask, teacher_where=t_mask)
    _, aligned = L.uld_alignment(s_mask, t_mask)
    np.testing.assert_allclose(_per_example(value, aligned), authors_uld(s, t, s_mask, t_mask),
                               rtol=1e-12)


def test_uld_gradient():
  s, t, s_mask, t_mask = _case(seed=3)
  with jax.enable_x64(True):
    def f(logits):
      value = L.uld_loss(logits, jnp.asarray(t), where=s_mask, teacher_where=t_mask,
                         student_temperature=1.5)
      return jnp.sum(value) / jnp.sum(L.uld_alignment(s_mask, t_mask)[1])
    check_grads(jax.jit(f), (jnp.asarray(s),), order=1, modes=('rev',), eps=1e-6, atol=1e-6,
                rtol=1e-5)


def test_masked_positions_contribute_nothing():
  s, t, s_mask, t_mask = _case(seed=4)
  noisy_s, noisy_t = s.copy(), t.copy()
  noisy_s[~s_mask] = np.nan                               # garbage where the student is masked
  noisy_t[~t_mask] = 1e3 * np.random.default_rng(5).normal(size=t[~t_mask].shape)

  def f(logits, teacher):
    return jnp.sum(L.uld_loss(logits, teacher, where=s_mask, teacher_where=t_mask))

  value_and_grad = jax.jit(jax.value_and_grad(f))
  value, grad = value_and_grad(jnp.asarray(noisy_s, jnp.float32),
                               jnp.asarray(noisy_t, jnp.float32))
  clean, _ = value_and_grad(jnp.asarray(s, jnp.float32), jnp.asarray(t, jnp.float32))
  np.testing.assert_allclose(float(value), float(clean), rtol=1e-6)
  grad = np.asarray(grad)
  assert np.all(np.isfinite(grad)) and np.all(grad[~s_mask] == 0.0)
  # Valid student positions past the teacher's count are unaligned: no value, no gradient.
  _, aligned = L.uld_alignment(s_mask, t_mask)
  unaligned = s_mask & ~np.asarray(aligned)
  assert unaligned.any() and np.all(grad[unaligned] == 0.0)


def test_no_vocabulary_mapping_needed():
  """Only the sorted probabilities count: any permutation of either vocabulary gives the
  same value, and a teacher with the student's distribution in another order gives 0."""
  s, t, s_mask, t_mask = _case(seed=6)
  rng = np.random.default_rng(7)
  base = L.uld_loss(s, t, where=s_mask, teacher_where=t_mask)
  shuffled = L.uld_loss(s[..., rng.permutation(s.shape[-1])], t[..., rng.permutation(t.shape[-1])],
                        where=s_mask, teacher_where=t_mask)
  np.testing.assert_allclose(np.asarray(shuffled), np.asarray(base), rtol=1e-6, atol=1e-7)
  same = L.uld_loss(s, s[..., ::-1], where=s_mask)     # position-wise: no teacher_where
  np.testing.assert_allclose(np.asarray(same), 0.0, atol=1e-6)


# --------------------------------------------------------------------------- the feed

def test_retokenized_rows_read_the_same_text(data_dir):
  student = kdata.load_tokenizer(CHARS, data_dir=data_dir)
  teacher = kdata.load_tokenizer('shakespeare_lm/tiny', data_dir=data_dir)
  rows = kdata.load_arrays(CHARS, 'train', data_dir=data_dir)
  x, seg = rows['x'][:64], rows['segment_ids'][:64]
  retokenize = Retokenizer(student, teacher, length=40, student_eos=1, teacher_eos=1)
  out = retokenize(x, seg)
  again = retokenize(x, seg)
  for key in TEACHER_VIEW_KEYS:                                   # deterministic
    np.testing.assert_array_equal(out[key], again[key])
  for i in range(len(x)):
    for k in range(1, int(seg[i].max()) + 1):
      text = student.decode(x[i][seg[i] == k].tolist())
      ids = out['teacher_input_ids'][i][out['teacher_segment_ids'][i] == k].tolist()
      assert text.startswith(teacher.decode(ids))               # a prefix if cut at the end
  assert out['teacher_where'].sum() > 0.5 * (out['teacher_segment_ids'] > 0).sum()
  # The stream feed adds the same columns to each batch, host side.
  batch = {'x': x[:8], 'label': rows['label'][:8], 'id': rows['id'][:8],
           'epoch': np.zeros(8, np.int32), 'mask': rows['mask'][:8], 'segment_ids': seg[:8],
           'positions': rows['positions'][:8]}
  source = StreamSource(iter([batch]), mesh=make_mesh([('data', -1)]), retokenize=retokenize)
  inputs = source.inputs(0, 1)
  for key in TEACHER_VIEW_KEYS:
    np.testing.assert_array_equal(np.asarray(inputs[key])[0], out[key][:8])


# --------------------------------------------------------------------------- runs

def _distill(kdjax_main, paths, config, workdir, teacher_dir, data_dir, *extra, check=True):
  return kdjax_main(['distill', '--config', f'{paths["configs"]}/lm/{config}', '--workdir',
                     str(workdir), f'--config.teacher.workdir={teacher_dir}',
                     f'--config.data.name={CHARS}', f'--config.data.data_dir={data_dir}',
                     '--config.progress=false', *extra], check=check)


def test_distill_across_tokenizers_with_uld(kdjax_main, lm_teacher_dir, data_dir, paths,
                                           tmp_path):
  workdir = tmp_path / 'uld'
  _distill(kdjax_main, paths, 'uld.py:tiny', workdir, lm_teacher_dir, data_dir,
           '--config.num_steps=30', '--config.eval_every=30', '--config.checkpoint_every=30')
  with open(workdir / 'summary.json') as f:
    summary = json.load(f)
  assert summary['step'] == 30 and summary['teacher_fingerprint'] is not None
  assert np.isfinite(summary['eval_loss'])
  with open(workdir / 'metrics.jsonl') as f:
    rows = [json.loads(line) for line in f if '"train"' in line]
  uld = [r['loss/uld'] for r in rows]
  ce = [r['loss/ce'] for r in rows]
  assert len(uld) == 3 and all(np.isfinite(uld)) and uld[0] > 0
  assert uld[-1] < uld[0] and ce[-1] < ce[0]        # the student moves toward the teacher


def test_mismatched_tokenizers_are_refused(kdjax_main, lm_teacher_dir, data_dir, paths, tmp_path):
  workdir = tmp_path / 'kd'
  out = _distill(kdjax_main, paths, 'token_kd.py:tiny', workdir, lm_teacher_dir, data_dir,
                 check=False)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and not workdir.exists()
  assert len(lines) == 1 and 'tokenizers differ' in lines[0]
  assert '--config.teacher.vocab_method=uld' in lines[0]
  # uld with a term that reads the teacher in one vocabulary is refused as well
  out = _distill(kdjax_main, paths, 'uld.py:tiny', workdir, lm_teacher_dir, data_dir,
                 "--config.loss.terms={'uld': {}, 'kd': {}}", check=False)
  lines = out.stderr.strip().splitlines()
  assert out.returncode == 2 and not workdir.exists()
  assert len(lines) == 1 and 'kd' in lines[0] and 'uld' in lines[0]
