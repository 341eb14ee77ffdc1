"""Language-model text: tokenizers, packing and prompt sets (numpy references), and the
``shakespeare_lm`` builder's ``tiny`` configs against an independent recomputation."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow_datasets as tfds

from kdjax import data as kd
from kdjax.data import DataError
from kdjax.data import text
from kdjax.data.builders import shakespeare as shk
from kdjax.data.builders import shakespeare_lm as lm

TINY = 'shakespeare_lm/tiny'
TINY_CHAR = 'shakespeare_lm/tiny_char'
SPLITS = ('train', 'test', 'prompts_train', 'prompts_test')
LM_KEYS = ('input_ids', 'targets', 'segment_ids', 'positions', 'loss_mask')


# ----------------------------------------------------------------------------- references

def pack_reference(docs, seq_len, eos=text.EOS_ID, pad=text.PAD_ID):
  """Row by row, token by token: the packing rules as the module docstring states them."""
  stream, doc_of = [], []
  for i, d in enumerate(docs):
    for t in list(d) + [eos]:
      stream.append(int(t))
      doc_of.append(i)
  n = len(stream)
  rows = -(-n // seq_len)
  out = {k: np.zeros((rows, seq_len), np.int32) for k in LM_KEYS}
  out['input_ids'][:] = pad
  out['targets'][:] = pad
  for r in range(rows):
    segment, previous, position = 0, None, 0
    for c in range(seq_len):
      t = r * seq_len + c
      if t >= n:
        continue
      if doc_of[t] != previous:
        segment, previous, position = segment + 1, doc_of[t], 0
      else:
        position += 1
      out['input_ids'][r, c] = stream[t]
      out['segment_ids'][r, c] = segment
      out['positions'][r, c] = position
      if t + 1 < n:
        out['targets'][r, c] = stream[t + 1]
        out['loss_mask'][r, c] = int(doc_of[t + 1] == doc_of[t])
  return out, stream


def prompt_reference(a, b, p_len, c_len, eos=text.EOS_ID, pad=text.PAD_ID):
  """One prompt record, written out position by position."""
  p = (list(a) + [eos])[-p_len:]
  c = (list(b) + [eos])[:c_len]
  prompt_ids = [pad] * (p_len - len(p)) + p
  continuation_ids = c + [pad] * (c_len - len(c))
  seq = prompt_ids + continuation_ids
  real = [0] * (p_len - len(p)) + [1] * (len(p) + len(c)) + [0] * (c_len - len(c))
  total = p_len + c_len
  targets, loss, positions, count = [], [], [], 0
  for t in range(total):
    nxt = t + 1 < total and real[t] and real[t + 1]
    targets.append(seq[t + 1] if nxt else pad)
    loss.append(int(p_len <= t + 1 < p_len + len(c)))   # the target is a continuation token
    positions.append(count if real[t] else 0)
    count += real[t]
  return dict(prompt_ids=prompt_ids, prompt_mask=real[:p_len],
              continuation_ids=continuation_ids, continuation_mask=real[p_len:],
              input_ids=seq, targets=targets, segment_ids=real, positions=positions,
              loss_mask=loss)


def random_docs(rng, count, max_len=12):
  return [rng.integers(3, 50, size=rng.integers(0, max_len + 1)).astype(np.int32)
          for _ in range(count)]


# ----------------------------------------------------------------------------- packing

@pytest.mark.parametrize('seq_len', [1, 3, 5, 8, 16, 64])
def test_pack_equals_the_reference_and_keeps_every_token_once(seq_len):
  rng = np.random.default_rng(seq_len)
  docs = random_docs(rng, 25)
  got = text.pack(docs, seq_len)
  want, stream = pack_reference(docs, seq_len)
  assert set(got) == set(LM_KEYS)
  for k in LM_KEYS:
    assert got[k].dtype == np.int32 and got[k].shape == want[k].shape, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)
  # Invariants, read off the arrays: the real tokens are the stream, once, in order.
  real = got['segment_ids'] > 0
  np.testing.assert_array_equal(got['input_ids'][real], stream)
  assert len(got['input_ids']) == -(-len(stream) // seq_len)
  flat_in, flat_tg = got['input_ids'].ravel(), got['targets'].ravel()
  n = len(stream)
  np.testing.assert_array_equal(flat_tg[:n - 1], flat_in[1:n])   # next tokens, across rows
  assert (flat_tg[n - 1:] == text.PAD_ID).all()
  # The loss covers the next token of every document token, its <eos> included, and
  # nothing else: an <eos> (or an empty document, its <eos> alone) predicts nothing.
  assert got['loss_mask'].sum() == sum(len(d) for d in docs)
  assert (got['loss_mask'][~real] == 0).all()
  np.testing.assert_array_equal(
      flat_tg[got['loss_mask'].ravel() == 1],
      [t for d in docs if len(d) for t in list(d[1:]) + [text.EOS_ID]])
  # Segments count up from 1 in each row; positions restart with each segment.
  for seg, pos, r in zip(got['segment_ids'], got['positions'], real):
    s = seg[r]
    assert s[0] == 1 and set(np.diff(s)) <= {0, 1}
    np.testing.assert_array_equal(pos[r][1:][np.diff(s) == 0],
                                  pos[r][:-1][np.diff(s) == 0] + 1)
    assert (pos[r][1:][np.diff(s) == 1] == 0).all() and pos[r][0] == 0


def test_pack_edge_cases():
  # Exact fit: no padding row; empty documents are their <eos> alone.
  got = text.pack([np.array([7, 8]), np.array([], np.int32)], 4)
  np.testing.assert_array_equal(got['input_ids'], [[7, 8, 1, 1]])
  np.testing.assert_array_equal(got['segment_ids'], [[1, 1, 1, 2]])
  np.testing.assert_array_equal(got['loss_mask'], [[1, 1, 0, 0]])
  empty = text.pack([], 4)
  assert all(v.shape == (0, 4) for v in empty.values())
  with pytest.raises(DataError, match='seq_len'):
    text.pack([np.array([3])], 0)


def test_pack_custom_special_ids():
  got = text.pack([np.array([3, 4])], 2, eos_id=9, pad_id=7)
  np.testing.assert_array_equal(got['input_ids'], [[3, 4], [9, 7]])
  np.testing.assert_array_equal(got['targets'], [[4, 9], [7, 7]])


# ----------------------------------------------------------------------------- prompts

@pytest.mark.parametrize('p_len,c_len', [(4, 3), (1, 1), (6, 10), (16, 2)])
def test_prompts_equal_the_reference(p_len, c_len):
  rng = np.random.default_rng(p_len * 100 + c_len)
  groups = [random_docs(rng, 5), random_docs(rng, 1), random_docs(rng, 4, max_len=20)]
  got = text.make_prompts(groups, p_len, c_len)
  pairs = [(a, b) for g in groups for a, b in zip(g[:-1], g[1:])]
  assert len(pairs) == 4 + 0 + 3       # a one-document group gives none; none across groups
  want = [prompt_reference(a, b, p_len, c_len) for a, b in pairs]
  for k in text.PROMPT_KEYS:
    assert got[k].dtype == np.int32, k
    np.testing.assert_array_equal(got[k], [w[k] for w in want], err_msg=k)
  assert got['prompt_ids'].shape == (7, p_len)
  assert got['continuation_ids'].shape == (7, c_len)
  assert got['input_ids'].shape == (7, p_len + c_len)


def test_prompt_layout_left_padding_and_masks():
  a, b = np.arange(3, 13), np.array([20, 21])   # a is longer than the prompt
  got = text.make_prompts([[a, b]], 4, 5)
  # Left-truncated: the end of the speech and its <eos>; continuation right-padded.
  assert got['prompt_ids'].tolist() == [[10, 11, 12, 1]]
  assert got['prompt_mask'].tolist() == [[1, 1, 1, 1]]
  assert got['continuation_ids'].tolist() == [[20, 21, 1, 0, 0]]
  assert got['continuation_mask'].tolist() == [[1, 1, 1, 0, 0]]
  short = text.make_prompts([[np.array([5]), np.arange(30, 40)]], 4, 3)
  assert short['prompt_ids'].tolist() == [[0, 0, 5, 1]]   # left padding
  assert short['prompt_mask'].tolist() == [[0, 0, 1, 1]]
  assert short['continuation_ids'].tolist() == [[30, 31, 32]]   # capped, no <eos>
  assert short['loss_mask'].tolist() == [[0, 0, 0, 1, 1, 1, 0]]
  assert short['targets'].tolist() == [[0, 0, 1, 30, 31, 32, 0]]
  # The loss mask covers exactly the continuation: its targets are continuation_ids.
  for out in (got, short):
    lm_targets = out['targets'][out['loss_mask'] == 1]
    np.testing.assert_array_equal(
        lm_targets, out['continuation_ids'][out['continuation_mask'] == 1])
  assert text.make_prompts([[np.array([3])]], 2, 2)['input_ids'].shape == (0, 4)
  with pytest.raises(DataError, match='prompt_len'):
    text.make_prompts([[a, b]], 0, 2)


# ----------------------------------------------------------------------------- tokenizers

def _comedy_docs():
  return lm.play_documents(shk.read_play('comedy_of_errors_gut'))


_TRAIN_IN_CHILD = """
import json, sys
from kdjax.data import text
texts = json.load(open(sys.argv[1]))
json.dump([text.train_bpe(texts, 400).to_str(), text.char_tokenizer(texts).to_str()],
          open(sys.argv[2], 'w'))
"""


def test_tokenizer_training_is_deterministic_across_processes(tmp_path):
  texts = _comedy_docs()[:300]
  first = [text.train_bpe(texts, 400).to_str(), text.char_tokenizer(texts).to_str()]
  assert [text.train_bpe(texts, 400).to_str(), text.char_tokenizer(texts).to_str()] == first
  # Another process (other hash seeds, thread timing) writes the same tokenizer.json bytes.
  (tmp_path / 'texts.json').write_text(json.dumps(texts))
  subprocess.run([sys.executable, '-c', _TRAIN_IN_CHILD, str(tmp_path / 'texts.json'),
                  str(tmp_path / 'out.json')], check=True,
                 cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
  assert json.loads((tmp_path / 'out.json').read_text()) == first
  assert text.train_bpe(texts, 401).to_str() != first[0]
  assert text.train_bpe(texts[:-50], 400).to_str() != first[0]


def test_bpe_round_trips_any_text_and_fixes_special_ids(tmp_path):
  tok = text.train_bpe(_comedy_docs()[:300], 400)
  assert tok.get_vocab_size() == 400
  assert [tok.token_to_id(t) for t in text.SPECIAL_TOKENS] == [0, 1, 2]
  assert (text.PAD_ID, text.EOS_ID, text.UNK_ID) == (0, 1, 2)
  samples = ['ANTIPHOLUS: Not I, sir.\n', '  two  spaces\tand a tab\n\n',
             'Ünïcödé ☃ and emoji \U0001F600 too', '', 'x' * 500]
  for s in samples:
    ids = tok.encode(s).ids
    assert text.UNK_ID not in ids and text.PAD_ID not in ids
    assert tok.decode(ids) == s
  # Merges make text shorter than bytes; the bytes alone cover everything.
  doc = _comedy_docs()[400]
  assert len(tok.encode(doc).ids) < len(doc.encode())
  path = str(tmp_path / 'tokenizer.json')
  tok.save(path)
  again = type(tok).from_file(path)
  assert again.encode(doc).ids == tok.encode(doc).ids and again.decode(again.encode(doc).ids) == doc
  with pytest.raises(DataError, match='vocab_size >= 259'):
    text.train_bpe(['abc'], 258)


def test_char_tokenizer_vocabulary_and_unknowns():
  tok = text.char_tokenizer(['ba\n', 'cab'])
  vocab = tok.get_vocab()
  assert [vocab[t] for t in text.SPECIAL_TOKENS] == [0, 1, 2]
  assert [vocab[c] for c in '\nabc'] == [3, 4, 5, 6]   # sorted by code point
  assert tok.get_vocab_size() == 7
  assert tok.encode('cab\n').ids == [6, 4, 5, 3]
  assert tok.decode(tok.encode('cab\n').ids) == 'cab\n'
  assert tok.encode('aZa').ids == [4, text.UNK_ID, 4]
  assert tok.decode([4, text.EOS_ID, 5], skip_special_tokens=False) == 'a<eos>b'
  docs = _comedy_docs()
  full = text.char_tokenizer(docs)
  assert all(full.decode(ids.tolist()) == d
             for ids, d in zip(text.encode_documents(full, docs[:50]), docs[:50]))
  with pytest.raises(DataError, match='unk_token'):
    text.char_tokenizer(['a'], special_tokens=('<pad>', '<eos>'))


def test_play_documents_merge_speeches_with_speaker_lines():
  docs = _comedy_docs()
  pairs = shk.parse_play(shk.read_play('comedy_of_errors_gut'))
  assert docs[0] == f'{pairs[0][0]}: {pairs[0][1]}\n' == (
      'AEGEON: Proceed, Solinus, to procure my fall, And, by the doom of death, end '
      'woes and all.\n')   # two lines of verse, one document
  assert all(d.endswith('\n') and d.count('\n') == 1 for d in docs)
  speakers = [d.split(': ', 1)[0] for d in docs]
  assert all(a != b for a, b in zip(speakers[:-1], speakers[1:]))   # merged
  merged = [p for i, p in enumerate(pairs) if i == 0 or p[0] != pairs[i - 1][0]]
  assert len(docs) == len(merged) < len(pairs)


# ----------------------------------------------------------------------------- configs

def test_config_names_parse_into_configs(tmp_path):
  cfg = lm.ShakespeareLM.get_builder_config('bpe1024_96')
  assert (cfg.tokenizer, cfg.vocab_size, cfg.seq_len) == ('bpe', 1024, 96)
  assert (cfg.prompt_tokens, cfg.continuation_tokens) == (48, 48)
  assert cfg.plays == () and cfg.held_out == lm.HELD_OUT
  assert lm.ShakespeareLM.get_builder_config('char_65').continuation_tokens == 33
  assert lm.ShakespeareLM.get_builder_config('tiny') is lm.ShakespeareLM.builder_configs['tiny']
  assert lm.ShakespeareLM.get_builder_config('bpe_12') is None
  with pytest.raises(DataError, match='at least 259'):
    lm.config_from_name('bpe100_32')
  with pytest.raises(DataError, match='seq_len'):
    lm.config_from_name('char_1')
  # TFDS takes the grammar's names (and config objects with other names), unprepared.
  builder = tfds.builder('shakespeare_lm/bpe700_48', data_dir=str(tmp_path))
  assert builder.builder_config.vocab_size == 700
  assert builder.info.features['prompt_ids'].shape == (24,)
  mine = lm.ShakespeareLMConfig(name='mine', seq_len=10, prompt_len=3)
  builder = tfds.builder('shakespeare_lm', config=mine, data_dir=str(tmp_path))
  assert builder.info.features['continuation_ids'].shape == (7,)
  for bad, match in ((dict(tokenizer='word'), 'tokenizer'), (dict(prompt_len=10), 'prompt_len'),
                     (dict(plays=('hamlet',)), 'Unknown plays'),
                     (dict(held_out=()), 'held_out'),
                     (dict(plays=lm.TINY_PLAYS, held_out=lm.TINY_PLAYS), 'held_out')):
    with pytest.raises(DataError, match=match):
      lm.check_config(lm.ShakespeareLMConfig(name='x', seq_len=10, **bad))


def test_held_out_plays_are_spread_and_disjoint_from_train():
  cfg = lm.ShakespeareLM.builder_configs['bpe2048_256']
  plays = lm.split_plays(cfg)
  assert set(plays['test']) == set(lm.HELD_OUT) and len(plays['test']) == 4
  assert set(plays['train']).isdisjoint(plays['test'])
  assert set(plays['train']) | set(plays['test']) == set(shk.PLAYS)


# ----------------------------------------------------------------------------- the builder

@pytest.fixture(scope='module')
def tiny(data_dir):
  """Prepares ``shakespeare_lm/tiny`` and ``tiny_char`` (about a second each)."""
  for name in (TINY, TINY_CHAR):
    kd.load_source(name, 'train', data_dir=data_dir)
  return data_dir


def _records(name, split, data_dir):
  src = kd.load_source(name, split, data_dir=data_dir)
  records = src.__getitems__(list(range(len(src))))
  return {k: np.stack([r[k] for r in records]) for k in records[0]}


@pytest.mark.parametrize('name', [TINY, TINY_CHAR])
def test_tiny_records_equal_an_independent_recomputation(tiny, name):
  cfg = lm.ShakespeareLM.builder_configs[name.split('/')[1]]
  train_docs = _comedy_docs()
  test_docs = lm.play_documents(shk.read_play('midsummer_nights_dream_gut'))
  # The tokenizer is trained on the train play only, and is the stored one.
  want_tok = (text.train_bpe(train_docs, 300) if cfg.tokenizer == 'bpe'
              else text.char_tokenizer(train_docs))
  stored = kd.load_tokenizer(name, data_dir=tiny)
  assert stored.to_str() == want_tok.to_str()
  with_test = (text.train_bpe(train_docs + test_docs, 300) if cfg.tokenizer == 'bpe'
               else text.char_tokenizer(train_docs + test_docs))
  assert with_test.to_str() != stored.to_str()
  want = {}
  for split, docs in (('train', train_docs), ('test', test_docs)):
    ids = [np.asarray(want_tok.encode(d).ids, np.int32) for d in docs]
    want[split] = pack_reference(ids, 32)[0]
    pairs = [prompt_reference(a, b, 16, 16) for a, b in zip(ids[:-1], ids[1:])]
    want['prompts_' + split] = {k: np.array([p[k] for p in pairs]) for k in pairs[0]}
  src = kd.load_source(name, None, data_dir=tiny)
  assert sorted(src) == sorted(SPLITS)
  for split in SPLITS:
    got = _records(name, split, tiny)
    assert len(src[split]) == len(want[split]['input_ids'])
    for k, v in want[split].items():
      assert got[k].dtype == np.int32, k
      np.testing.assert_array_equal(got[k], v, err_msg=f'{split}/{k}')
    if split in ('train', 'test'):     # prompt fields of packed rows are zeros
      assert not any(got[k].any() for k in ('prompt_ids', 'prompt_mask',
                                            'continuation_ids', 'continuation_mask'))
  meta = src['train'].dataset_info.metadata
  assert meta['train_plays'] == ['comedy_of_errors_gut']
  assert meta['test_plays'] == ['midsummer_nights_dream_gut']
  assert meta['vocab_size'] == stored.get_vocab_size()
  assert meta['tokens'] == {'train': sum(len(stored.encode(d).ids) + 1 for d in train_docs),
                            'test': sum(len(stored.encode(d).ids) + 1 for d in test_docs)}


def test_held_out_play_never_appears_in_train(tiny, monkeypatch):
  monkeypatch.setenv('KDJAX_DATA_DIR', tiny)   # load_tokenizer's default, as load_source's
  tok = kd.load_tokenizer(TINY)
  train = _records(TINY, 'train', tiny)
  decoded = tok.decode(train['input_ids'].ravel().tolist())
  prompts = _records(TINY, 'prompts_train', tiny)
  decoded_prompts = tok.decode(prompts['input_ids'].ravel().tolist())
  test = tok.decode(_records(TINY, 'test', tiny)['input_ids'].ravel().tolist())
  for speaker in ('THESEUS:', 'PUCK:', 'BOTTOM:', 'TITANIA:'):   # only in the held-out play
    assert speaker in test
    assert speaker not in decoded and speaker not in decoded_prompts
  assert decoded == ''.join(_comedy_docs())     # the train split is the train play, whole
  with pytest.raises(DataError, match='stores no tokenizer'):
    kd.load_tokenizer('uci_digits', data_dir=tiny)
  with pytest.raises(DataError, match='Unknown data set'):
    kd.load_tokenizer('no_such_set', data_dir=tiny)


def test_tiny_prompt_records_decode_to_consecutive_speeches(tiny):
  tok = kd.load_tokenizer(TINY, data_dir=tiny)
  got = _records(TINY, 'prompts_test', tiny)
  docs = lm.play_documents(shk.read_play('midsummer_nights_dream_gut'))
  assert len(got['input_ids']) == len(docs) - 1
  for i in (0, 7, len(docs) - 2):
    prompt = tok.decode(got['prompt_ids'][i].tolist())
    continuation = tok.decode(got['continuation_ids'][i].tolist())
    assert docs[i].endswith(prompt) and docs[i + 1].startswith(continuation)
    assert got['prompt_ids'][i, -1] == text.EOS_ID
    np.testing.assert_array_equal(got['input_ids'][i],
                                  np.concatenate([got['prompt_ids'][i],
                                                  got['continuation_ids'][i]]))


def test_tiny_spec_and_pipeline_batches(tiny):
  spec = kd.dataset_spec(TINY, data_dir=tiny)
  assert spec.input_shape == (32,) and spec.num_classes == 300
  assert set(spec.splits) == set(SPLITS)
  it = kd.make_train_iterator(TINY, batch_size=4, seed=0, data_dir=tiny,
                              shard_index=0, shard_count=1)
  batch = next(it)
  assert batch['x'].dtype == np.int32 and batch['x'].shape == (4, 32)
  train = _records(TINY, 'train', tiny)
  np.testing.assert_array_equal(batch['x'], train['input_ids'][batch['id']])
