"""Language models on the one engine: a teacher trained from the data, token-level KD."""

import json
import os

import numpy as np

from kdjax.config import load_config
from kdjax.teacher import read_fingerprint


def _summary(workdir):
  with open(os.path.join(workdir, 'summary.json')) as f:
    return json.load(f)


def test_teacher_lm_reports_held_out_perplexity(lm_teacher_dir):
  s = _summary(lm_teacher_dir)
  assert s['step'] == 40 and s['feed'] == 'device'
  np.testing.assert_allclose(s['eval_perplexity'], np.exp(s['eval_loss']), rtol=1e-9)
  np.testing.assert_allclose(s['eval_bits_per_token'], s['eval_loss'] / np.log(2), rtol=1e-9)
  # 300 tokens: far below a uniform guess after 40 steps
  assert s['eval_perplexity'] < 150 and s['tokens_per_sec'] > 0


def test_token_kd_and_its_chunked_form_train_the_same_student(kdjax_main, lm_teacher_dir,
                                                              data_dir, tmp_path, paths):
  out = {}
  for variant in ('tiny', 'tiny,chunked'):
    workdir = str(tmp_path / variant.replace(',', '_'))
    kdjax_main(['distill', '--config', f'{paths["configs"]}/lm/token_kd.py:{variant}', '--workdir', workdir,
                f'--config.teacher.workdir={lm_teacher_dir}', f'--config.data.data_dir={data_dir}',
                '--config.num_steps=20', '--config.progress=false'])
    out[variant] = _summary(workdir)
  plain, chunked = out['tiny'], out['tiny,chunked']
  assert plain['teacher_fingerprint'] == read_fingerprint(lm_teacher_dir)
  np.testing.assert_allclose(chunked['train_loss'], plain['train_loss'], rtol=1e-5)
  np.testing.assert_allclose(chunked['eval_loss'], plain['eval_loss'], rtol=1e-5)


def test_minilm_relations_between_layers_of_other_widths_and_heads(kdjax_main, lm_teacher_dir,
                                                                    data_dir, tmp_path, paths):
  workdir = str(tmp_path / 'minilm')
  kdjax_main(['distill', '--config', f'{paths["configs"]}/lm/minilm.py:tiny', '--workdir',
              workdir, f'--config.teacher.workdir={lm_teacher_dir}',
              f'--config.data.data_dir={data_dir}', '--config.num_steps=10',
              '--config.progress=false'])
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    rows = [json.loads(line) for line in f]
  relation = [r['loss/minilm_relations'] for r in rows if 'loss/minilm_relations' in r]
  assert relation and all(np.isfinite(relation)) and relation[0] > 0


def test_lm_configs_load(paths):
  for name in ('teacher', 'student', 'token_kd', 'minilm'):
    c = load_config(f'{paths["configs"]}/lm/{name}.py:tiny')
    assert c.data.name == 'shakespeare_lm/tiny'
