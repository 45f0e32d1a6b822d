"""OpenAI CLIP's byte-level BPE tokenizer, token for token, made fast enough for a data pipeline.

`tokenize(texts)` gives the same ids as `clip.tokenize` of openai/CLIP: text is cleaned
(ftfy.fix_text, HTML unescape twice, whitespace collapsed, lowercased), split with OpenAI's
regex, byte-encoded, merged with the first 48,894 BPE merges, wrapped in <|startoftext|> (49406)
and <|endoftext|> (49407) and zero-padded.

Speed-ups, none of which changes an id (tests/test_tokenizer.py checks them against the
reference cases and the slow path):
- printable-ASCII text without '&' skips ftfy and html (both are the identity on it: ftfy
  returns ASCII unchanged and html.unescape needs an '&') and is split with the stdlib `re`
  using an ASCII-only form of the pattern;
- each word's ids are cached (bounded), so the BPE merge loop runs once per distinct word;
- padding and truncation are done on one flat numpy array.
"""
from __future__ import annotations

import functools
import gzip
import html
import re
from typing import Iterable, Sequence, Union

import ftfy
import numpy as np
import regex

from clip_jax.assets import asset_path

SOT = 49406  # <|startoftext|>
EOT = 49407  # <|endoftext|>
VOCAB_SIZE = 49408
CONTEXT_LENGTH = 77
_NUM_MERGES = 49152 - 256 - 2  # merge lines used by OpenAI: lines[1:48895] of the vocab file

# OpenAI's split pattern (openai/CLIP clip/simple_tokenizer.py), matched with the `regex` module.
_PATTERN = regex.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""",
    regex.IGNORECASE)
# The same pattern for printable-ASCII input, where \p{L} is [a-z] (text is lowercased), \p{N} is [0-9].
_ASCII_PATTERN = re.compile(
    r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[a-z]+|[0-9]|[^\sa-z0-9]+""")
_WHITESPACE = regex.compile(r"\s+")
# Printable ASCII without '&': text on which ftfy.fix_text and html.unescape change nothing.
_FAST_TEXT = re.compile(r"[ -%'-~]*")


@functools.lru_cache(maxsize=None)
def bytes_to_unicode() -> dict[int, str]:
  """OpenAI's reversible map from the 256 byte values to printable unicode characters."""
  bs = (list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
        + list(range(ord("®"), ord("ÿ") + 1)))
  cs = bs[:]
  n = 0
  for b in range(256):
    if b not in bs:
      bs.append(b)
      cs.append(256 + n)
      n += 1
  return dict(zip(bs, map(chr, cs)))


def clean_text(text: str) -> str:
  """OpenAI's cleaning: ftfy fix, HTML unescape twice, whitespace collapse and strip, lowercase."""
  return _clean(text)[0]


def _clean(text: str) -> tuple[str, bool]:
  """The cleaned text and whether it is printable ASCII (so the ASCII split pattern applies)."""
  if _FAST_TEXT.fullmatch(text):
    # Only ' ' is whitespace in printable ASCII, so str.split matches the \s+ collapse.
    return " ".join(text.split()).lower(), True
  text = ftfy.fix_text(text)
  text = html.unescape(html.unescape(text)).strip()
  return _WHITESPACE.sub(" ", text).strip().lower(), False


def _abbreviate(text: str, limit: int = 60) -> str:
  return repr(text if len(text) <= limit else text[:limit - 3] + "...")


class Tokenizer:
  """Byte-level BPE with OpenAI CLIP's vocabulary; `encode`/`decode` without start/end tokens."""

  def __init__(self, bpe_path=None, cache_size: int = 1 << 20):
    """Loads the merges from `bpe_path` (default: the packaged vocabulary).

    Args:
      bpe_path: gzip-compressed merges file in OpenAI's format.
      cache_size: how many distinct words keep their ids cached; the cache is emptied when full,
        which bounds memory on endless caption streams.
    """
    path = asset_path("bpe_simple_vocab_16e6.txt.gz") if bpe_path is None else bpe_path
    with gzip.open(path) as f:
      lines = f.read().decode("utf-8").split("\n")
    merges = [tuple(line.split()) for line in lines[1:_NUM_MERGES + 1]]
    if len(merges) != _NUM_MERGES or any(len(m) != 2 for m in merges):
      raise ValueError(f"{path} is not an OpenAI BPE merges file: expected {_NUM_MERGES} merge lines "
                       "after the header")
    self.byte_encoder = bytes_to_unicode()
    self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
    vocab = list(self.byte_encoder.values())
    vocab = vocab + [v + "</w>" for v in vocab]
    vocab.extend("".join(m) for m in merges)
    vocab.extend(["<|startoftext|>", "<|endoftext|>"])
    self.encoder = {token: i for i, token in enumerate(vocab)}
    self.decoder = dict(enumerate(vocab))
    self.bpe_ranks = {m: i for i, m in enumerate(merges)}
    self.vocab_size = len(vocab)
    # str.translate table: utf-8 bytes read as latin-1 code points -> OpenAI's byte characters.
    self._byte_table = dict(self.byte_encoder)
    self._cache_size = cache_size
    self._word_cache: dict[str, tuple[int, ...]] = {}
    self._reset_cache()

  def _reset_cache(self):
    self._word_cache.clear()
    # Special tokens in the text map to themselves, as in OpenAI's tokenizer.
    self._word_cache["<|startoftext|>"] = (SOT,)
    self._word_cache["<|endoftext|>"] = (EOT,)

  def bpe(self, word: str) -> list[str]:
    """Merges the byte-encoded characters of one word, lowest merge rank first."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    ranks = self.bpe_ranks
    while len(parts) > 1:
      best_rank, best = None, None
      for pair in zip(parts, parts[1:]):
        rank = ranks.get(pair)
        if rank is not None and (best_rank is None or rank < best_rank):
          best_rank, best = rank, pair
      if best is None:
        break
      first, second = best
      merged, i = [], 0
      while i < len(parts):
        if i < len(parts) - 1 and parts[i] == first and parts[i + 1] == second:
          merged.append(first + second)
          i += 2
        else:
          merged.append(parts[i])
          i += 1
      parts = merged
    return parts

  def _word_ids(self, word: str) -> tuple[int, ...]:
    ids = self._word_cache.get(word)
    if ids is None:
      encoded = word.encode("utf-8").decode("latin-1").translate(self._byte_table)
      ids = tuple(self.encoder[part] for part in self.bpe(encoded))
      if len(self._word_cache) >= self._cache_size:
        self._reset_cache()
      self._word_cache[word] = ids
    return ids

  def encode(self, text: str) -> list[int]:
    """Token ids of `text`, without start/end tokens (as openai/CLIP's SimpleTokenizer.encode)."""
    text, printable_ascii = _clean(text)
    pattern = _ASCII_PATTERN if printable_ascii else _PATTERN
    cache = self._word_cache
    ids = []
    for word in pattern.findall(text):
      word_ids = cache.get(word)
      ids.extend(word_ids if word_ids is not None else self._word_ids(word))
    return ids

  def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
    """Text of token ids, as openai/CLIP's SimpleTokenizer.decode but stripped.

    With skip_special_tokens, a leading SOT is dropped and decoding stops at the first EOT, so a
    padded `tokenize` row decodes to its text. Words come back cleaned, lowercased and separated
    by single spaces (punctuation too: "a cat." -> "a cat .").
    """
    ids = [int(i) for i in ids]
    if skip_special_tokens:
      if ids and ids[0] == SOT:
        ids = ids[1:]
      if EOT in ids:
        ids = ids[:ids.index(EOT)]
    for i in ids:
      if not 0 <= i < self.vocab_size:
        raise ValueError(f"token id {i} is outside the vocabulary [0, {self.vocab_size})")
    text = "".join(self.decoder[i] for i in ids)
    data = bytearray(self.byte_decoder[c] for c in text)
    return data.decode("utf-8", errors="replace").replace("</w>", " ").strip()

  def __call__(self, texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH,
               truncate: bool = True) -> np.ndarray:
    """int32 [N, context_length]: SOT, the ids, EOT, zero padding (see `tokenize`)."""
    if isinstance(texts, str):
      texts = [texts]
    if context_length < 2:
      raise ValueError(f"context_length={context_length} leaves no room for the start and end tokens; "
                       "use >= 2")
    max_body = context_length - 2
    rows = []
    for text in texts:
      if not isinstance(text, str):
        raise ValueError("tokenize expects a str or a list of str, got an element of type "
                         f"{type(text).__name__}")
      ids = self.encode(text)
      if len(ids) > max_body:
        if not truncate:
          raise ValueError(f"text {_abbreviate(text)} has {len(ids) + 2} tokens (with start and end "
                           f"tokens), more than context_length={context_length}; shorten it or pass "
                           "truncate=True")
        # OpenAI cuts [SOT, ids, EOT] to context_length and puts EOT last: ids[:context_length - 2] survive.
        ids = ids[:max_body]
      rows.append(ids)
    lengths = np.fromiter((len(r) for r in rows), dtype=np.int64, count=len(rows))
    out = np.zeros((len(rows), context_length), dtype=np.int32)
    out[:, 0] = SOT
    flat = np.fromiter((i for r in rows for i in r), dtype=np.int32, count=int(lengths.sum()))
    columns = np.arange(context_length)
    body = (columns[None, :] >= 1) & (columns[None, :] <= lengths[:, None])
    out[body] = flat
    out[np.arange(len(rows)), lengths + 1] = EOT
    return out


@functools.lru_cache(maxsize=1)
def default_tokenizer() -> Tokenizer:
  """The process-wide tokenizer with the packaged vocabulary (built once, ~0.3 s)."""
  return Tokenizer()


def tokenize(texts: Union[str, Sequence[str]], context_length: int = CONTEXT_LENGTH,
             truncate: bool = True) -> np.ndarray:
  """Tokenizes like openai/CLIP's `clip.tokenize`.

  Args:
    texts: one string or a list of strings.
    context_length: tokens per row, start and end tokens included.
    truncate: cut too-long text to context_length tokens, keeping EOT last; if False,
      too-long text raises ValueError naming it and its token count.

  Returns:
    int32 array [len(texts), context_length]: SOT (49406), ids, EOT (49407), then zeros.
  """
  return default_tokenizer()(texts, context_length=context_length, truncate=truncate)
