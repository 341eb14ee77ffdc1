"""Shakespeare builder: the play parser on inline fixtures, windows, records, pipeline."""

import numpy as np
import pytest

from kdjax import data as kd
from kdjax.data import preprocessing
from kdjax.data import sources
from kdjax.data.builders import shakespeare as shk

TINY = 'shakespeare/tiny'

CAPS_PLAY = """THE TRAGEDY OF NOBODY

PERSONS REPRESENTED.

KING, a king.
FOOL.
GUARD.

ACT I.

SCENE I. A hall. [Enter KING and FOOL.]

KING.
Where is my fool? [Aside.] He hides
again.

FOOL.
Here, nuncle. [Kneels.]

[Enter GUARD, with
a torch.]

I hold no torch.

GUARD.
My lord, [Exeunt [all but Fool.]
still gone

SCENE II. Outside.

Nobody claims this line.

CHORUS.

Thus ends the day.

SONG

FOOL.
SONG.
Hey ho, the wind.
Enter KING, alone.
"""


def test_parse_caps_play_follows_the_rules():
  got = shk.parse_play(CAPS_PLAY)
  assert got == [
      ('KING', 'Where is my fool? He hides again.'),
      ('FOOL', 'Here, nuncle.'),
      ('FOOL', 'I hold no torch.'),     # continues after a stage direction
      ('GUARD', 'My lord,'),            # an unmatched '[' runs to the paragraph end
      ('CHORUS', 'Thus ends the day.'),  # a name alone in its paragraph
      ('FOOL', 'Hey ho, the wind. Enter KING, alone.'),  # SONG lines dropped
  ]


TITLE_PLAY = """Persons. Ham., a prince.

ACT I.

Scene I. A platform.

Ham.
To be, or not to be.

First Clown.
Ay, marry.

Ham.
Alas.

[Exit First Clown.]

Poor Yorick!
"""


def test_parse_title_case_abbreviations():
  got = shk.parse_play(TITLE_PLAY)
  assert got == [('HAM', 'To be, or not to be.'), ('FIRST CLOWN', 'Ay, marry.'),
                 ('HAM', 'Alas.'), ('HAM', 'Poor Yorick!')]
  assert shk.normalize_speaker('Ham.') == shk.normalize_speaker('HAM.') == 'HAM'
  assert shk.normalize_speaker('MRS.  PAGE.') == 'MRS. PAGE'


def test_header_ends_speech_and_preamble_is_skipped():
  text = 'KING.\nNot a speech: before the first act.\n\nACT I.\n\nKING.\nHello there.\n\nSCENE II.\n\nOrphan line.\n'
  assert shk.parse_play(text) == [('KING', 'Hello there.')]


def test_play_roles_concatenates_speeches_in_order():
  roles = shk.play_roles('nobody', CAPS_PLAY)
  assert list(roles) == ['nobody/KING', 'nobody/FOOL', 'nobody/GUARD', 'nobody/CHORUS']
  assert roles['nobody/FOOL'] == 'Here, nuncle. I hold no torch. Hey ho, the wind. Enter KING, alone.'


def test_vocabulary_is_fixed_and_round_trips():
  assert shk.NUM_CLASSES == 76 == len(shk.CHARS) + 1
  assert len(set(shk.CHARS)) == len(shk.CHARS)
  assert '\n' not in shk.CHARS and shk.CHARS[0] == ' '
  text = "O Romeo, Romeo! wherefore art thou Romeo? 1623 & 'tis (so): -- ;"
  ids = shk.encode(text)
  assert ids.dtype == np.int32 and ids.min() >= 1 and ids.max() <= 75
  assert shk.decode(ids) == text
  # Hand-checked ids: ' ' -> 1, 'A' -> 24 (1 + 12 punctuation + 10 digits + 1), 'a' -> 50.
  assert shk.encode(' Aa').tolist() == [1, 24, 50]
  assert shk.encode('#*\t').tolist() == [shk.OOV_ID] * 3


def test_windows_and_split_by_position():
  assert shk.window_starts(10, 4, 1).tolist() == [0, 1, 2, 3, 4, 5]
  assert shk.window_starts(10, 4, 2).tolist() == [0, 2, 4]
  assert shk.window_starts(4, 4, 1).tolist() == []   # no next character
  texts = [np.arange(1, 12), np.arange(1, 4), np.arange(1, 9)]   # lengths 11, 3, 8
  out = shk.split_windows(texts, 3, 1)
  # Role 0: 8 windows -> 7 train / 1 test... num_train(8) = 8 - floor(1.6) = 7.
  assert [(r, s.tolist()) for r, s in out['train']] == [(0, [0, 1, 2, 3, 4, 5, 6]),
                                                        (1, [0, 1, 2, 3])]
  assert [(r, s.tolist()) for r, s in out['test']] == [(0, [7]), (1, [4])]


@pytest.fixture(scope='module')
def tiny(data_dir):
  kd.load_source(TINY, 'train', data_dir=data_dir)
  return data_dir


def test_tiny_records_equal_an_independent_recomputation(tiny):
  spec = kd.dataset_spec(TINY, data_dir=tiny)
  assert spec.input_shape == (20,) and spec.num_classes == 76
  names, texts = shk.build_roles(('hamlet_gut', 'midsummer_nights_dream_gut'))
  kept = [(n, t) for n, t in zip(names, texts) if len(t) > 20]
  assert sources.role_names(TINY, data_dir=tiny) == [n for n, _ in kept]
  want = {'train': [], 'test': []}
  for role, (_, t) in enumerate(kept):
    starts = list(range(0, len(t) - 20, 20))
    k = len(starts) - int(np.floor(0.2 * len(starts)))
    for split, part in (('train', starts[:k]), ('test', starts[k:])):
      want[split] += [(t[s:s + 20], t[s + 20], role) for s in part]
  for split in ('train', 'test'):
    arrays = kd.load_arrays(TINY, split, data_dir=tiny)
    assert spec.splits[split] == len(want[split]) == len(arrays['label'])
    assert arrays['x'].dtype == np.int32 and arrays['x'].shape[1:] == (20,)
    np.testing.assert_array_equal(arrays['x'], np.stack([w[0] for w in want[split]]))
    np.testing.assert_array_equal(arrays['label'], [w[1] for w in want[split]])
    np.testing.assert_array_equal(arrays['client'], [w[2] for w in want[split]])
    np.testing.assert_array_equal(arrays['id'], np.arange(len(want[split])))
  first = kd.load_arrays(TINY, 'train', data_dir=tiny)
  assert shk.decode(first['x'][0]) == shk.decode(kept[0][1][:20])


def test_preprocess_keeps_integer_inputs_and_client():
  raw = {'x': np.array([[3, 4, 5]], np.int32), 'label': np.array([7]),
         'client': np.array([2])}
  out = preprocessing.preprocess('shakespeare/tiny', raw, np.array([9]))
  assert out['x'].dtype == np.int32 and out['x'].tolist() == [[3, 4, 5]]
  assert out['client'].tolist() == [2] and out['id'].tolist() == [9]


def test_grain_pipelines_yield_integer_batches(tiny):
  it = kd.make_train_iterator(TINY, batch_size=8, seed=0, data_dir=tiny,
                              shard_index=0, shard_count=1)
  batch = next(it)
  assert batch['x'].dtype == np.int32 and batch['x'].shape == (8, 20)
  arrays = kd.load_arrays(TINY, 'train', data_dir=tiny)
  np.testing.assert_array_equal(batch['x'], arrays['x'][batch['id']])
  np.testing.assert_array_equal(batch['label'], arrays['label'][batch['id']])
  ev = next(kd.make_eval_iterator(TINY, batch_size=4, data_dir=tiny,
                                  shard_index=0, shard_count=1))
  assert ev['x'].dtype == np.int32 and ev['id'].tolist() == [0, 1, 2, 3]


def test_corpus_plays_all_parse_into_many_roles():
  # The whole corpus (seconds): every play yields roles; totals near LEAF's.
  names, texts = shk.build_roles(shk.PLAYS)
  plays = {n.split('/')[0] for n in names}
  assert len(plays) == len(shk.PLAYS) == 37
  assert len(names) > 1000
  total = sum(len(t) for t in texts)
  assert 3_500_000 < total < 5_000_000
  assert sum(int((t == shk.OOV_ID).sum()) for t in texts) < 100
