"""Bad input: a prompt plus the tokens to generate longer than the model's context.

Wherever prompts meet a decoder — :func:`kdjax.models.generate` / ``sample``, an
on-policy run (the student, or with ``seq_kd`` the teacher, samples), ``kdjax cache build
--mode generate`` (the teacher continues the prompts) — ``P + max_new_tokens`` beyond the
decoder's ``max_positions`` is one ``UserError`` line: exit 2 from the command, nothing
written to the workdir or cache directory.

A model's context is its config's ``max_positions``, by default the rows of the data it
was built for. A *teacher* keeps the context of the data it was trained on, which may be
shorter than the rows of the data it is later asked to continue: the tests make such a
teacher from the session's tiny teacher LM (rotary positions, so its parameters do not
depend on the row length) by declaring it trained on ``tiny16``, the ``tiny`` plays and
tokenizer in 16-token rows (a builder config registered for the test, built by the real
builder into a directory of its own).
"""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import data as kdata
from kdjax.cache import sequences
from kdjax.config import from_dict
from kdjax.data.builders import shakespeare_lm as lm
from kdjax.errors import UserError
from kdjax.models import decoding
from kdjax.models import transformer
from kdjax.teacher import Teacher

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
CONFIGS = os.path.join(ROOT, 'configs')
SHORT = 'tiny16'    # the tiny plays in 16-token rows (prompts of 8)


def _one_line_exit_2(out, message, *paths):
  assert out.returncode == 2, out.stderr
  lines = out.stderr.strip().splitlines()
  assert len(lines) == 1 and message in lines[0], out.stderr
  assert 'Traceback' not in out.stderr
  for path in paths:
    assert not os.path.exists(path), path


# --------------------------------------------------------------------------- decoding

@pytest.fixture(scope='module')
def model():
  return transformer.Decoder(transformer.DecoderConfig.llama(
      vocab_size=40, hidden_size=16, num_layers=1, num_heads=2, max_positions=12),
      rngs=nnx.Rngs(0))


def test_generate_fits_up_to_the_context_and_refuses_one_token_more(model):
  ids = np.ones((2, 8), np.int32)
  assert decoding.generate(model, ids, max_new_tokens=4).tokens.shape == (2, 4)   # 8 + 4 = 12
  with pytest.raises(UserError) as e:
    decoding.generate(model, ids, max_new_tokens=5)
  message = str(e.value)
  assert '\n' not in message
  assert 'a prompt of 8 tokens plus 5 new tokens exceeds the model context of 12' in message
  with pytest.raises(UserError, match='a prompt of 13 tokens'):     # the prompt alone
    decoding.generate(model, np.ones((1, 13), np.int32), max_new_tokens=1)


def test_sample_checks_the_context_when_traced(model):
  view = nnx.view(model, deterministic=True, raise_if_not_found=False)
  graphdef, params, state = nnx.split(view, nnx.Param, ...)

  def apply(p, s, x, **kw):
    return nnx.merge(graphdef, p, s)(x, **kw), s

  def run(prompt_len, new):
    ids = jnp.ones((1, prompt_len), jnp.int32)
    return jax.jit(lambda p: decoding.sample(
        apply, p, state, ids, jnp.ones_like(ids), jax.random.key(0), max_new_tokens=new,
        init_cache=lambda b, n: transformer.init_cache(model.config, b, n), temperature=0.0,
        max_positions=model.config.max_positions))(params)

  assert run(6, 6).tokens.shape == (1, 6)
  with pytest.raises(UserError, match='6 tokens plus 7 new tokens exceeds the model context'):
    run(6, 7)


def test_check_context_message_names_the_model_and_the_fix():
  decoding.check_context(10, 6, 16)
  with pytest.raises(UserError, match=r"exceeds the teacher's context of 16 positions; lower it\.$"):
    decoding.check_context(10, 7, 16, who="the teacher's", fix='lower it')


# --------------------------------------------------------------------------- runs

@pytest.fixture
def short_teacher(lm_teacher_dir, tmp_path_factory, tmp_path, monkeypatch):
  """The tiny teacher LM, declared trained on ``shakespeare_lm/tiny16`` (context 16)."""
  cfg = lm.ShakespeareLMConfig(name=SHORT, tokenizer='bpe', vocab_size=300, seq_len=16,
                               plays=lm.TINY_PLAYS, held_out=lm.TINY_HELD_OUT,
                               description='the tiny plays in 16-token rows (a test)')
  monkeypatch.setitem(lm.ShakespeareLM.builder_configs, SHORT, cfg)
  data_dir = tmp_path_factory.getbasetemp() / 'tiny16_data'     # built once per session
  kdata.dataset_spec(f'shakespeare_lm/{SHORT}', data_dir=str(data_dir))   # its progress here
  path = tmp_path / 'short_teacher'
  shutil.copytree(lm_teacher_dir, path, ignore=shutil.ignore_patterns('tensorboard'))
  with open(path / 'config.json') as f:
    config = json.load(f)
  assert config['model']['name'] == 'llama'           # rotary: no table of positions
  config['data'].update(name=f'shakespeare_lm/{SHORT}', data_dir=str(data_dir))
  with open(path / 'config.json', 'w') as f:
    json.dump(config, f)
  return str(path)


def test_a_teachers_context_is_that_of_its_own_training_data(short_teacher, lm_teacher_dir):
  def teacher(workdir):
    with open(os.path.join(workdir, 'config.json')) as f:
      config = from_dict(json.load(f))
    return Teacher(None, None, 300, config, 0, '')

  sequences.check_context(teacher(lm_teacher_dir), prompt_len=16, max_new_tokens=16)
  with pytest.raises(UserError, match="exceeds the teacher's context of 32 positions"):
    sequences.check_context(teacher(lm_teacher_dir), prompt_len=16, max_new_tokens=17)
  sequences.check_context(teacher(short_teacher), prompt_len=8, max_new_tokens=8)
  with pytest.raises(UserError, match='lower config.cache.generate.max_new_tokens to at most 4'
                     ) as e:
    sequences.check_context(teacher(short_teacher), prompt_len=12, max_new_tokens=5)
  assert "exceeds the teacher's context of 16 positions" in str(e.value)
  with pytest.raises(UserError, match='prompts shorter than 16 tokens'):
    sequences.check_context(teacher(short_teacher), prompt_len=16, max_new_tokens=1)


def _distill(config, data_dir, teacher, workdir, **overrides):
  overrides = {'data.data_dir': data_dir, 'teacher.workdir': teacher, 'progress': 'false',
               **overrides}
  return ['distill', '--config', f'{CONFIGS}/lm/{config}', '--workdir', workdir,
          *[f'--config.{k}={v}' for k, v in overrides.items()]]


def test_on_policy_prompt_beyond_the_students_context_exits_2(cli, data_dir, lm_teacher_dir,
                                                              tmp_path):
  # A real `python -m kdjax` process: prompts of 16 + 17 new tokens, a student of 32.
  wd = str(tmp_path / 'never')
  out = cli(_distill('gkd.py:tiny', data_dir, lm_teacher_dir, wd,
                     **{'on_policy.max_new_tokens': 17}), check=False)
  _one_line_exit_2(out, "a prompt of 16 tokens plus 17 new tokens exceeds the student's "
                   'context of 32 positions', wd)


def test_on_policy_teacher_samples_within_its_own_context(kdjax_main, data_dir, short_teacher,
                                                          tmp_path):
  # seq_kd: the teacher samples the off-policy continuations; its context is 16, the
  # prompts are 16 tokens: not one token fits, whatever this run's rows are.
  wd = str(tmp_path / 'never')
  out = kdjax_main(_distill('gkd.py:tiny', data_dir, short_teacher, wd,
                            **{'on_policy.seq_kd': 'true', 'on_policy.max_new_tokens': 4}),
                   check=False)
  _one_line_exit_2(out, "a prompt of 16 tokens plus 4 new tokens exceeds the teacher's "
                   'context of 16 positions', wd)


def test_cache_generate_beyond_the_teachers_context_exits_2(kdjax_main, data_dir,
                                                            short_teacher, tmp_path):
  cache_dir = str(tmp_path / 'never_cache')
  out = kdjax_main(['cache', 'build', '--config', f'{CONFIGS}/lm/seq_kd.py:tiny',
                    '--cache-dir', cache_dir, f'--config.data.data_dir={data_dir}',
                    f'--config.teacher.workdir={short_teacher}', '--config.progress=false',
                    '--config.cache.generate.max_new_tokens=4'], check=False)
  _one_line_exit_2(out, "a prompt of 16 tokens plus 4 new tokens exceeds the teacher's "
                   'context of 16 positions', cache_dir)
