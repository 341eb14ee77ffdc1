"""A live teacher from a Hugging Face checkpoint folder (``config.teacher.hf_path``).

The session's tiny trained teacher (a workdir) is written with
:func:`kdjax.models.save_pretrained` and its data set's ``tokenizer.json``; read back
through ``hf_path`` it must be the same teacher: the same fingerprint, the same logits,
and the same first distillation step. The tokenizer check compares tokenizers by
content, so the folder's copy (written by ``tokenizers`` or by ``transformers``) matches
the data set's.
"""

from __future__ import annotations

import os

import jax
import numpy as np
import pytest
from flax import nnx

from kdjax import data as kdata
from kdjax import teacher as teacher_lib
from kdjax.config import load_config
from kdjax.engine import setup
from kdjax.models import create
from kdjax.models import save_pretrained
from kdjax.parallel import make_mesh

LM_TINY = 'shakespeare_lm/tiny'


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  with jax.default_matmul_precision('highest'):
    yield


@pytest.fixture(scope='module')
def hf_dir(lm_teacher_dir, data_dir, tmp_path_factory):
  """The workdir teacher as a Hugging Face folder (weights, config.json, tokenizer.json)."""
  teacher = teacher_lib.load_teacher(lm_teacher_dir, make_mesh([('data', -1)]))
  model = teacher.config.model
  module = create(str(model.name), num_classes=teacher.num_classes, input_shape=(32,),
                  **model.kwargs.to_dict())
  nnx.update(module, teacher.variables[0])
  path = str(tmp_path_factory.mktemp('hf_teacher'))
  save_pretrained(module, path)
  kdata.load_tokenizer(LM_TINY, data_dir=data_dir).save(os.path.join(path, 'tokenizer.json'))
  return path


def _config(paths, data_dir, **teacher):
  c = load_config(f'{paths["configs"]}/lm/token_kd.py:tiny')
  c.data.data_dir = data_dir
  c.progress = False
  for key, value in teacher.items():
    c.teacher[key] = value
  return c


def test_hf_teacher_is_the_workdir_teacher(hf_dir, lm_teacher_dir, data_dir):
  mesh = make_mesh([('data', -1)])
  workdir = teacher_lib.load_teacher(lm_teacher_dir, mesh)
  hf = teacher_lib.load({'hf_path': hf_dir, 'partition_rules': [('.*', None)],
                         'dtype': 'float32'}, mesh)
  assert hf.fingerprint == workdir.fingerprint
  assert hf.fingerprint == teacher_lib.config_fingerprint({'hf_path': hf_dir})
  assert hf.num_classes == workdir.num_classes == 300
  rows = kdata.load_arrays(LM_TINY, 'train', data_dir=data_dir)
  kwargs = {k: rows[k][:4] for k in ('segment_ids', 'positions')}
  logits = [np.asarray(jax.jit(lambda v, t=t: teacher_lib.outputs(
      t.apply, v, rows['x'][:4], **kwargs)['teacher_logits'])(t.variables))
      for t in (workdir, hf)]
  np.testing.assert_allclose(logits[1], logits[0], rtol=1e-6, atol=1e-6)
  # bfloat16: the same teacher, rounded
  bf16 = teacher_lib.load({'hf_path': hf_dir, 'dtype': 'bfloat16'}, mesh)
  assert bf16.fingerprint != hf.fingerprint
  low = jax.jit(lambda v: teacher_lib.outputs(bf16.apply, v, rows['x'][:4], **kwargs)[
      'teacher_logits'])(bf16.variables)
  assert low.dtype == jax.numpy.bfloat16
  np.testing.assert_allclose(np.asarray(low, np.float32), logits[0], atol=0.25)


def test_hf_teacher_gives_the_same_first_step(hf_dir, lm_teacher_dir, data_dir, paths):
  losses = {}
  for name, teacher in (('workdir', {'workdir': lm_teacher_dir}), ('hf', {'hf_path': hf_dir})):
    run = setup(_config(paths, data_dir, **teacher), log=lambda _: None)
    assert run.teacher.fingerprint == teacher_lib.read_fingerprint(lm_teacher_dir)
    _, metrics = run.calls(run.init(), run.feed.inputs(0, 1), 1)
    losses[name] = {k: float(s[0] / c[0]) for k, (s, c) in metrics.items()
                    if k.startswith('loss')}
  assert set(losses['hf']) == {'loss', 'loss/kd', 'loss/ce'}
  for key, value in losses['workdir'].items():
    np.testing.assert_allclose(losses['hf'][key], value, rtol=1e-6)


def test_one_teacher_source_only(kdjax_main, hf_dir, lm_teacher_dir, data_dir, paths, tmp_path):
  workdir = tmp_path / 'both'
  out = kdjax_main(['distill', '--config', f'{paths["configs"]}/lm/token_kd.py:tiny', '--workdir',
                    str(workdir), f'--config.teacher.workdir={lm_teacher_dir}',
                    f'--config.teacher.hf_path={hf_dir}', f'--config.data.data_dir={data_dir}'],
                   check=False)
  assert out.returncode == 2 and not workdir.exists()
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and 'hf_path' in lines[0] and 'workdir' in lines[0]


def test_a_tokenizer_saved_twice_has_one_digest(data_dir, tmp_path):
  from transformers import PreTrainedTokenizerFast
  tok = kdata.load_tokenizer(LM_TINY, data_dir=data_dir)
  PreTrainedTokenizerFast(tokenizer_object=tok, eos_token='<eos>', pad_token='<pad>',
                          unk_token='<unk>').save_pretrained(str(tmp_path))
  from kdjax.models import load_tokenizer
  again = load_tokenizer(str(tmp_path))
  assert teacher_lib.tokenizer_digest(again) == teacher_lib.tokenizer_digest(tok)
  other = kdata.load_tokenizer('shakespeare_lm/tiny_char', data_dir=data_dir)
  assert teacher_lib.tokenizer_digest(other) != teacher_lib.tokenizer_digest(tok)


def test_cache_build_from_hf_teacher_equals_the_workdir_teachers(hf_dir, lm_teacher_dir, data_dir,
                                                                  paths, tmp_path):
  """``kdjax cache build`` reads an ``hf_path`` teacher: the same rows and fingerprint as
  from its workdir, and a run reading the cache checks it against the HF folder."""
  from kdjax.cache import build_cache
  from kdjax.cache import open_for_run

  def build(name, **teacher):
    c = load_config(f'{paths["configs"]}/lm/cached_kd.py:tiny')
    c.data.data_dir = data_dir
    c.progress = False
    for key, value in teacher.items():
      c.teacher[key] = value
    return c, build_cache(c, str(tmp_path / name), progress=False)

  _, a = build('from_workdir', workdir=lm_teacher_dir)
  config, b = build('from_hf', hf_path=hf_dir)
  assert a['teacher']['fingerprint'] == b['teacher']['fingerprint']
  assert a['content_checksum'] == b['content_checksum']
  config.teacher.cache = str(tmp_path / 'from_hf')
  assert open_for_run(config) is not None
