"""Tokenizer: the shared OpenAI reference ids exactly, and the fast paths equal OpenAI's plain algorithm."""
import gzip
import html
import json
import random

import ftfy
import numpy as np
import pytest
import regex

import clip_jax
from clip_jax import tokenizer
from clip_jax.assets import asset_path
from clip_jax.tokenizer import EOT, SOT, Tokenizer, tokenize


@pytest.fixture(scope="module")
def cases(shared_dir):
  lines = (shared_dir / "testdata/tokenizer_cases.jsonl").read_text(encoding="utf-8").splitlines()
  return [json.loads(line) for line in lines if line.strip()]


class OpenAIReference:
  """openai/CLIP clip/simple_tokenizer.py, kept plain (no fast path, no cache) as the reference."""

  def __init__(self):
    merges = gzip.open(asset_path("bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
    merges = [tuple(m.split()) for m in merges[1:49152 - 256 - 2 + 1]]
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
      if b not in bs:
        bs.append(b)
        cs.append(256 + n)
        n += 1
    self.byte_encoder = dict(zip(bs, map(chr, cs)))
    vocab = list(self.byte_encoder.values())
    vocab = vocab + [v + "</w>" for v in vocab] + ["".join(m) for m in merges] + ["<|startoftext|>", "<|endoftext|>"]
    self.encoder = dict(zip(vocab, range(len(vocab))))
    self.bpe_ranks = dict(zip(merges, range(len(merges))))
    self.pat = regex.compile(
        r"""<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+""", regex.IGNORECASE)

  def bpe(self, token):
    if token in ("<|startoftext|>", "<|endoftext|>"):
      return token
    word = tuple(token[:-1]) + (token[-1] + "</w>",)
    while len(word) > 1:
      pairs = set(zip(word, word[1:]))
      bigram = min(pairs, key=lambda pair: self.bpe_ranks.get(pair, float("inf")))
      if bigram not in self.bpe_ranks:
        break
      new_word, i = [], 0
      while i < len(word):
        if i < len(word) - 1 and (word[i], word[i + 1]) == bigram:
          new_word.append(word[i] + word[i + 1])
          i += 2
        else:
          new_word.append(word[i])
          i += 1
      word = tuple(new_word)
    return " ".join(word)

  @staticmethod
  def clean(text):
    text = html.unescape(html.unescape(ftfy.fix_text(text))).strip()
    return regex.sub(r"\s+", " ", text).strip().lower()

  def encode(self, text):
    text = self.clean(text)
    ids = []
    for token in regex.findall(self.pat, text):
      token = "".join(self.byte_encoder[b] for b in token.encode("utf-8"))
      ids.extend(self.encoder[t] for t in self.bpe(token).split(" "))
    return ids


@pytest.fixture(scope="module")
def reference():
  return OpenAIReference()


def test_every_shared_case_matches_exactly(cases):
  ids = tokenize([c["text"] for c in cases])
  expected = np.array([c["ids77"] for c in cases], dtype=np.int32)
  assert ids.dtype == np.int32 and ids.shape == (len(cases), 77)
  mismatches = [cases[i]["text"] for i in np.nonzero((ids != expected).any(axis=1))[0]]
  assert not mismatches, mismatches[:5]


def test_shared_cases_one_at_a_time_with_a_tiny_cache(cases):
  # A cache emptied every 3 words must give the same ids as a warm one.
  tok = Tokenizer(cache_size=3)
  for case in cases[::7] + [c for c in cases if not c["text"].isascii() or "&" in c["text"]]:
    np.testing.assert_array_equal(tok(case["text"])[0], case["ids77"], err_msg=case["text"])


def _random_texts(seed, count):
  rng = random.Random(seed)
  # Printable ASCII (fast path), '&' entities, controls, unicode whitespace, letters and digits of other scripts.
  alphabet = ([chr(c) for c in range(32, 127)] * 4 + list("&&;#\t\n\r\x0b\x0c\x1c\x1f\x00\x1b\x7f\x85\xa0")
              + list("éüßçøÅ€“”’…ﬁＡ１٣日本語кошкаΩ🐈\u200b\u2028\u3000"))
  words = ["&amp;", "&lt;", "&#39;", "&amp;amp;", "<|endoftext|>", "<|startoftext|>", "'s", "'ll", "don't", "A.I."]
  texts = []
  for _ in range(count):
    pieces = [rng.choice(words) if rng.random() < 0.1 else "".join(rng.choices(alphabet, k=rng.randint(1, 8)))
              for _ in range(rng.randint(1, 8))]
    texts.append(" ".join(pieces))
  return texts


def test_random_texts_match_openai_algorithm(reference):
  texts = _random_texts(seed=0, count=400)
  tok = Tokenizer()
  for text in texts:
    assert tokenizer.clean_text(text) == reference.clean(text), repr(text)
    assert tok.encode(text) == reference.encode(text), repr(text)


def test_fast_path_is_exact_on_printable_ascii(reference):
  rng = random.Random(1)
  printable = "".join(chr(c) for c in range(32, 127) if chr(c) != "&")
  tok = Tokenizer()
  for _ in range(400):
    text = "".join(rng.choices(printable + "    ", k=rng.randint(0, 40)))
    assert tokenizer._FAST_TEXT.fullmatch(text)
    assert tokenizer.clean_text(text) == reference.clean(text), repr(text)
    assert tok.encode(text) == reference.encode(text), repr(text)


def test_special_tokens_and_padding():
  ids = tokenize("a photo of a cat")[0]
  assert ids[0] == SOT == 49406 and EOT == 49407
  end = int(np.argmax(ids == EOT))
  assert end == 6 and (ids[end + 1:] == 0).all() and (ids[1:end] != 0).all()
  # The text tower pools at argmax(ids): that must be the EOT position.
  assert int(np.argmax(ids)) == end


def test_single_string_and_list_inputs():
  one = tokenize("a diagram")
  many = tokenize(["a diagram", "a dog", ""])
  assert one.shape == (1, 77) and many.shape == (3, 77)
  np.testing.assert_array_equal(one[0], many[0])
  np.testing.assert_array_equal(many[2, :3], [SOT, EOT, 0])
  assert tokenize([]).shape == (0, 77)
  assert clip_jax.tokenize is tokenize


def test_truncation_keeps_eot_last(reference):
  text = "one two three " * 40
  ids = tokenize(text)[0]
  body = reference.encode(text)
  assert len(body) > 75
  np.testing.assert_array_equal(ids, [SOT] + body[:75] + [EOT])
  short = tokenize(text, context_length=10)[0]
  np.testing.assert_array_equal(short, [SOT] + body[:8] + [EOT])
  # Exactly full: 75 body tokens fit without truncation.
  exact = " ".join(["dog"] * 75)
  ids = tokenize(exact, truncate=False)[0]
  assert ids[-1] == EOT and ids[-2] == ids[1] and (ids != 0).all()


def test_truncate_false_names_text_and_count():
  text = "a very long caption " * 30
  with pytest.raises(ValueError, match=r"text 'a very long caption a very.*\.\.\.' has 122 tokens .*context_length=77"):
    tokenize(["fine", text], truncate=False)
  with pytest.raises(ValueError, match="context_length=1"):
    tokenize("x", context_length=1)
  with pytest.raises(ValueError, match="list of str"):
    tokenize(["ok", 3])


def test_decode_round_trip():
  tok = tokenizer.default_tokenizer()
  for text in ["a photo of a cat", "Hello   World", "naïve café", "the number seven"]:
    ids = tok.encode(text)
    assert tok.decode(ids) == " ".join(tokenizer.clean_text(text).split())
  row = tokenize("a photo of a dog.")[0]
  assert tok.decode(row) == "a photo of a dog ."
  assert tok.decode(row, skip_special_tokens=False).startswith("<|startoftext|>a photo")
  with pytest.raises(ValueError, match="outside the vocabulary"):
    tok.decode([49408])


def test_vocabulary_layout():
  tok = tokenizer.default_tokenizer()
  assert tok.vocab_size == 49408
  assert tok.encoder["<|startoftext|>"] == SOT and tok.encoder["<|endoftext|>"] == EOT
  assert tok.encoder["!"] == 0 and tok.encoder["!</w>"] == 256


def test_bad_vocab_file_is_a_clear_error(tmp_path):
  path = tmp_path / "vocab.txt.gz"
  with gzip.open(path, "wt") as f:
    f.write("#version\ni n\n")
  with pytest.raises(ValueError, match="not an OpenAI BPE merges file"):
    Tokenizer(path)
