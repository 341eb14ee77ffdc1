"""Text for language models: tokenizers, packed sequences, prompt -> continuation sets.

Everything here is a pure function of token ids (numpy) or of texts, except
:func:`kdjax.data.load_tokenizer`, which reads a prepared data set's tokenizer.

**Tokenizers.** Both kinds are ``tokenizers.Tokenizer`` objects, so they share one
interface (``encode(text).ids``, ``decode(ids)``, ``get_vocab_size()``,
``token_to_id``, ``save('tokenizer.json')`` / ``Tokenizer.from_file``):

* :func:`train_bpe`: byte-level BPE (Sennrich et al. 2016, over bytes as in
  GPT-2): the ``ByteLevel`` pre-tokenizer and decoder, the 256 byte symbols always
  in the vocabulary, so every text encodes without an unknown token and
  ``decode(encode(text).ids) == text``.
* :func:`char_tokenizer`: one token per character seen in the training texts
  (sorted by code point); any other character encodes to ``<unk>``.

The special tokens come first, so with the default :data:`SPECIAL_TOKENS`
``<pad>`` is id 0 (:data:`PAD_ID`), ``<eos>`` id 1 (:data:`EOS_ID`) and ``<unk>``
id 2 (:data:`UNK_ID`; byte-level BPE never emits it but keeps the id so both
kinds agree). Training is deterministic: the same texts and ``vocab_size`` give
the same ``tokenizer.json`` bytes, in any process.

**Packed sequences** (:func:`pack`). The documents, each followed by ``<eos>``,
are concatenated in order into one stream of ``n`` tokens and cut into rows of
``seq_len``; the last row is padded with ``<pad>``. Per row:

* ``input_ids``: the stream; ``targets``: the next token of the stream (so the
  last target of a row is the first token of the next row; ``<pad>`` after the
  stream's end);
* ``loss_mask``: 1 where the target is the next token of the *same* document,
  its ``<eos>`` included; 0 on a document's ``<eos>`` (its target starts the
  next document), on the stream's last token and on padding;
* ``segment_ids``: 1, 2, 3, ... for the documents (or parts of them) in the row,
  0 on padding;
* ``positions``: the position within the document's part in this row. A
  document cut by a row boundary continues in the next row as a new segment
  (segment 1) whose positions **restart at 0**: a model that attends only within
  a segment sees it without its beginning, as the positions say (T5-style
  packing; Raffel et al. 2020).

Worked example, documents ``[5, 6, 7]`` and ``[8, 9]``, ``seq_len=3``: the stream
is ``5 6 7 1 8 9 1`` (``n=7``), three rows::

  input_ids    5 6 7 | 1 8 9 | 1 0 0
  targets      6 7 1 | 8 9 1 | 0 0 0
  loss_mask    1 1 1 | 0 1 1 | 0 0 0
  segment_ids  1 1 1 | 1 2 2 | 1 0 0
  positions    0 1 2 | 0 0 1 | 0 0 0

**Prompt -> continuation** (:func:`make_prompts`). For consecutive documents
``a, b`` of one group (speeches of one play): the prompt is ``a + <eos>``, its
*last* ``prompt_len`` tokens (left-truncated, so it always ends with
``<eos>``), left-padded to ``P = prompt_len``; the continuation is ``b + <eos>``,
its *first* ``continuation_len`` tokens, right-padded to ``C``. Records:

* ``prompt_ids [P]``, ``prompt_mask [P]`` (1 on real tokens; all prompts end at
  position ``P - 1``, so generation appends at ``P``);
* ``continuation_ids [C]``, ``continuation_mask [C]``;
* the teacher-forced view ``[P + C]``: ``input_ids`` (prompt then continuation,
  with the pads where they are), ``targets`` (the next real token; ``<pad>``
  where the token or its successor is padding), ``loss_mask`` (1 exactly where
  the target is a continuation token: the prompt mask), ``segment_ids`` (1 on
  real tokens, 0 on padding), ``positions`` (0, 1, ... from the first real
  prompt token; 0 on padding).

Worked example, ``a = [5, 6]``, ``b = [7]``, ``P = 4``, ``C = 3``::

  prompt_ids        0 5 6 1        prompt_mask        0 1 1 1
  continuation_ids  7 1 0          continuation_mask  1 1 0
  input_ids    0 5 6 1 7 1 0
  targets      0 6 1 7 1 0 0
  loss_mask    0 0 0 1 1 0 0
  segment_ids  0 1 1 1 1 1 0
  positions    0 0 1 2 3 4 0

References:
  Sennrich, Haddow and Birch, "Neural Machine Translation of Rare Words with
  Subword Units", ACL 2016 (BPE).
  Radford et al., "Language Models are Unsupervised Multitask Learners", 2019
  (byte-level BPE).
  Raffel et al., "Exploring the Limits of Transfer Learning with a Unified
  Text-to-Text Transformer", JMLR 2020 (packing with segment ids and
  positions).
"""

from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np
import tokenizers
from tokenizers import decoders
from tokenizers import models
from tokenizers import pre_tokenizers
from tokenizers import trainers

from kdjax.data.errors import DataError

SPECIAL_TOKENS = ('<pad>', '<eos>', '<unk>')
PAD_ID = 0
EOS_ID = 1
UNK_ID = 2
BYTE_ALPHABET_SIZE = 256
METADATA_KEY = 'tokenizer'   # DatasetInfo.metadata entry holding tokenizer.json's text


def train_bpe(texts: Iterable[str], vocab_size: int, *,
              special_tokens: Sequence[str] = SPECIAL_TOKENS) -> tokenizers.Tokenizer:
  """A byte-level BPE tokenizer trained on ``texts``, deterministically.

  Args:
    texts: the training texts (documents); only their content matters, each is
      pre-tokenized on its own.
    vocab_size: size of the final vocabulary: the special tokens, the 256 byte
      symbols, then one token per merge, learned greedily by pair frequency.
    special_tokens: tokens given ids ``0, 1, ...`` in this order.

  Returns:
    A ``tokenizers.Tokenizer`` with a ``ByteLevel`` pre-tokenizer (no prefix
    space) and decoder: ``decode(encode(text).ids) == text`` for any text that
    does not spell a special token.

  Raises:
    DataError: ``vocab_size`` leaves no room for the byte symbols.

  >>> tok = train_bpe(['to be or not to be'] * 4, 262)
  >>> tok.get_vocab_size(), tok.token_to_id('<pad>'), tok.token_to_id('<eos>')
  (262, 0, 1)
  >>> tok.encode('to be').tokens
  ['to', 'Ġbe']
  >>> tok.decode(tok.encode('not to be!').ids)
  'not to be!'
  """
  smallest = BYTE_ALPHABET_SIZE + len(special_tokens)
  if vocab_size < smallest:
    raise DataError(f'A byte-level BPE vocabulary holds the {BYTE_ALPHABET_SIZE} bytes '
                    f'and {len(special_tokens)} special tokens: use vocab_size >= '
                    f'{smallest}, not {vocab_size}.')
  tokenizer = tokenizers.Tokenizer(models.BPE())
  tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tokenizer.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
      vocab_size=vocab_size, min_frequency=0, show_progress=False,
      special_tokens=list(special_tokens),
      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tokenizer.train_from_iterator(texts, trainer=trainer)
  return tokenizer


def char_tokenizer(texts: Iterable[str], *,
                   special_tokens: Sequence[str] = SPECIAL_TOKENS,
                   unk_token: str = '<unk>') -> tokenizers.Tokenizer:
  """A character-level tokenizer over the characters of ``texts``.

  A BPE model with no merges: every character of the vocabulary is one token.
  The vocabulary is ``special_tokens`` (ids ``0, 1, ...``) then the distinct
  characters of ``texts`` sorted by code point; other characters encode to
  ``unk_token``, which must be one of ``special_tokens``.

  Args:
    texts: the training texts.
    special_tokens: tokens given the first ids, in this order.
    unk_token: the token of characters outside the vocabulary.

  Returns:
    A ``tokenizers.Tokenizer``; ``decode`` joins the characters as they are
    (and, as for every tokenizer, drops special tokens unless
    ``skip_special_tokens=False``).

  >>> tok = char_tokenizer(['abc', 'cab\\n'])
  >>> tok.get_vocab_size(), tok.encode('cab').ids, tok.encode('c#').tokens
  (7, [6, 4, 5], ['c', '<unk>'])
  >>> tok.decode(tok.encode('a b').ids)   # ' ' is not in the vocabulary
  'ab'
  """
  if unk_token not in special_tokens:
    raise DataError(f'unk_token {unk_token!r} must be one of the special tokens '
                    f'{list(special_tokens)}; add it to them.')
  chars = sorted(set().union(*(set(t) for t in texts)) - set(special_tokens))
  vocab = {t: i for i, t in enumerate(list(special_tokens) + chars)}
  tokenizer = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token=unk_token))
  tokenizer.decoder = decoders.Fuse()
  tokenizer.add_special_tokens(list(special_tokens))
  return tokenizer


def encode_documents(tokenizer: tokenizers.Tokenizer,
                     texts: Sequence[str]) -> list[np.ndarray]:
  """The token ids of every text, as int32 arrays (no special tokens added).

  >>> tok = char_tokenizer(['ab'])
  >>> [ids.tolist() for ids in encode_documents(tok, ['ab', 'b', ''])]
  [[3, 4], [4], []]
  """
  encodings = tokenizer.encode_batch(list(texts), add_special_tokens=False)
  return [np.asarray(e.ids, np.int32) for e in encodings]


def pack(documents: Sequence[np.ndarray], seq_len: int, *, eos_id: int = EOS_ID,
         pad_id: int = PAD_ID) -> dict[str, np.ndarray]:
  """Packs documents, each followed by ``eos_id``, into rows of ``seq_len`` tokens.

  Args:
    documents: token ids of each document, in order (no ``eos_id`` inside).
    seq_len: tokens per row.
    eos_id: the end-of-document token appended to every document.
    pad_id: the token filling the last row.

  Returns:
    ``{'input_ids', 'targets', 'segment_ids', 'positions', 'loss_mask'}``, each
    int32 ``[ceil(n / seq_len), seq_len]`` where ``n`` is the number of tokens
    with the appended ``<eos>`` tokens; the layout is the module docstring's.

  >>> rows = pack([np.array([5, 6, 7]), np.array([8, 9])], 3)
  >>> rows['input_ids'].tolist()
  [[5, 6, 7], [1, 8, 9], [1, 0, 0]]
  >>> rows['targets'].tolist(), rows['loss_mask'].tolist()
  ([[6, 7, 1], [8, 9, 1], [0, 0, 0]], [[1, 1, 1], [0, 1, 1], [0, 0, 0]])
  >>> rows['segment_ids'].tolist(), rows['positions'].tolist()
  ([[1, 1, 1], [1, 2, 2], [1, 0, 0]], [[0, 1, 2], [0, 0, 1], [0, 0, 0]])
  """
  if seq_len < 1:
    raise DataError(f'seq_len must be a positive number of tokens, not {seq_len}.')
  lengths = np.array([len(d) + 1 for d in documents], np.int64)
  n = int(lengths.sum())
  rows = -(-n // seq_len)
  total = rows * seq_len
  stream = np.full(n, eos_id, np.int32)
  starts = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  for start, doc in zip(starts, documents):
    stream[start:start + len(doc)] = doc
  doc_of = np.repeat(np.arange(len(lengths)), lengths)
  in_doc = np.arange(n) - starts[doc_of]
  column = np.arange(total) % seq_len
  real = np.arange(total) < n

  input_ids = np.full(total, pad_id, np.int32)
  input_ids[:n] = stream
  targets = np.full(total, pad_id, np.int32)
  targets[:n - 1] = stream[1:]
  loss_mask = np.zeros(total, np.int32)
  loss_mask[:n - 1] = doc_of[1:] == doc_of[:-1]
  # A segment starts at a document's first token or at a row's first token.
  starts_segment = np.zeros(total, np.int32)
  starts_segment[:n] = (in_doc == 0) | (column[:n] == 0)
  segment_ids = np.cumsum(starts_segment.reshape(rows, seq_len), axis=1).reshape(-1)
  segment_ids = np.where(real, segment_ids, 0)
  # Within a row, a document began at its own start or, continued, at column 0.
  positions = np.zeros(total, np.int64)
  positions[:n] = np.minimum(in_doc, column[:n])
  out = dict(input_ids=input_ids, targets=targets, segment_ids=segment_ids,
             positions=positions, loss_mask=loss_mask)
  return {k: v.astype(np.int32).reshape(rows, seq_len) for k, v in out.items()}


def _prompt_record(prompt: np.ndarray, continuation: np.ndarray, prompt_len: int,
                   continuation_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """One record of :func:`make_prompts` from already cut token ids."""
  p, c = len(prompt), len(continuation)
  length = prompt_len + continuation_len
  prompt_ids = np.full(prompt_len, pad_id, np.int32)
  prompt_ids[prompt_len - p:] = prompt
  continuation_ids = np.full(continuation_len, pad_id, np.int32)
  continuation_ids[:c] = continuation
  first, end = prompt_len - p, prompt_len + c    # real tokens: [first, end)
  input_ids = np.concatenate([prompt_ids, continuation_ids])
  targets = np.full(length, pad_id, np.int32)
  targets[first:end - 1] = input_ids[first + 1:end]
  loss_mask = np.zeros(length, np.int32)
  loss_mask[prompt_len - 1:end - 1] = 1
  segment_ids = np.zeros(length, np.int32)
  segment_ids[first:end] = 1
  positions = np.zeros(length, np.int32)
  positions[first:end] = np.arange(end - first)
  return dict(
      prompt_ids=prompt_ids, prompt_mask=(np.arange(prompt_len) >= first).astype(np.int32),
      continuation_ids=continuation_ids,
      continuation_mask=(np.arange(continuation_len) < c).astype(np.int32),
      input_ids=input_ids, targets=targets, segment_ids=segment_ids,
      positions=positions, loss_mask=loss_mask)


PROMPT_KEYS = ('prompt_ids', 'prompt_mask', 'continuation_ids', 'continuation_mask',
               'input_ids', 'targets', 'segment_ids', 'positions', 'loss_mask')


def make_prompts(groups: Sequence[Sequence[np.ndarray]], prompt_len: int,
                 continuation_len: int, *, eos_id: int = EOS_ID,
                 pad_id: int = PAD_ID) -> dict[str, np.ndarray]:
  """Prompt -> continuation records from consecutive documents of each group.

  Args:
    groups: per group (a play), its documents' token ids in order; a pair never
      spans two groups.
    prompt_len: ``P``, the most prompt tokens kept (the last ones).
    continuation_len: ``C``, the most continuation tokens kept (the first ones).
    eos_id: appended to the prompt's and the continuation's document.
    pad_id: fills ``prompt_ids`` on the left and ``continuation_ids`` on the
      right.

  Returns:
    The arrays of :data:`PROMPT_KEYS`, int32, one row per consecutive pair (the
    groups in order, then the pairs in order): ``[N, P]`` for ``prompt_*``,
    ``[N, C]`` for ``continuation_*`` and ``[N, P + C]`` for the rest; the
    layout is the module docstring's.

  >>> out = make_prompts([[np.array([5, 6]), np.array([7])]], 4, 3)
  >>> out['prompt_ids'].tolist(), out['continuation_ids'].tolist()
  ([[0, 5, 6, 1]], [[7, 1, 0]])
  >>> out['input_ids'].tolist(), out['targets'].tolist(), out['loss_mask'].tolist()
  ([[0, 5, 6, 1, 7, 1, 0]], [[0, 6, 1, 7, 1, 0, 0]], [[0, 0, 0, 1, 1, 0, 0]])
  >>> out['positions'].tolist()
  [[0, 0, 1, 2, 3, 4, 0]]
  """
  if prompt_len < 1 or continuation_len < 1:
    raise DataError('prompt_len and continuation_len must be positive numbers of '
                    f'tokens, not {prompt_len} and {continuation_len}.')
  records = []
  eos = np.array([eos_id], np.int32)
  for docs in groups:
    for a, b in zip(docs[:-1], docs[1:]):
      prompt = np.concatenate([np.asarray(a, np.int32), eos])[-prompt_len:]
      continuation = np.concatenate([np.asarray(b, np.int32), eos])[:continuation_len]
      records.append(_prompt_record(prompt, continuation, prompt_len,
                                    continuation_len, pad_id))
  widths = {'prompt_ids': prompt_len, 'prompt_mask': prompt_len,
            'continuation_ids': continuation_len,
            'continuation_mask': continuation_len}
  return {k: (np.stack([r[k] for r in records]) if records else
              np.zeros((0, widths.get(k, prompt_len + continuation_len)), np.int32))
          for k in PROMPT_KEYS}
