"""Several captions per image: which one a training sample uses.

`config.data.caption_keys` names the captions a sample may have, `::`-separated:

    txt                         wds/files: the whole `key.txt` (the default)
    txt::recap.txt              `key.txt` or `key.recap.txt` (wds: in the same tar group)
    json:caption::json:recap    fields of `key.json` (a field holding a list: one of its items)
    title::recap                csv: column names (with the default "txt", config.data.csv_caption_key)

`config.data.caption_probs` ("0.5::0.5"; default equal) are the keys' relative probabilities.
Each sample draws one key per epoch from its own random stream (seed, epoch, sample index:
the same on any number of processes); a sample without the drawn key (no file, no field, an
empty value) takes the first present key of the list instead, and is counted in
data/caption_fallbacks.
"""
from __future__ import annotations

import json
from typing import Callable, Optional, Sequence

import numpy as np

DEFAULT_KEYS = "txt"
FALLBACK = "caption_fallback"  # the per-sample flag, summed into data/caption_fallbacks


def split_list(spec: str) -> list[str]:
  """`a::b::c` -> [a, b, c] (surrounding spaces dropped); "" -> []."""
  return [part.strip() for part in str(spec).split("::")] if str(spec).strip() else []


def parse_weights(spec: str, count: int, field: str, what: str) -> np.ndarray:
  """`W1::W2...` (or "" for equal weights) as `count` probabilities; ValueError (one line)
  for another count, a non-number, a negative or non-finite weight, or all zero."""
  parts = split_list(spec)
  if not parts:
    return np.full(count, 1.0 / count)
  if len(parts) != count:
    raise ValueError(f"config.data.{field}={spec!r} has {len(parts)} weights for {count} "
                     f"{what}; give one per {what.rstrip('s')}, separated by '::'")
  try:
    weights = np.array([float(p) for p in parts], np.float64)
  except ValueError:
    raise ValueError(f"config.data.{field}={spec!r}: every weight must be a number") from None
  if not np.all(np.isfinite(weights)) or np.any(weights < 0):
    raise ValueError(f"config.data.{field}={spec!r}: weights must be finite and >= 0")
  if weights.sum() <= 0:
    raise ValueError(f"config.data.{field}={spec!r}: the weights are all zero")
  return weights / weights.sum()


def _option(config, name: str, default):
  return config.data.get(name, default) if hasattr(config.data, "get") else default


class CaptionPicker:
  """Draws one of several caption keys per sample, falling back to a present one.

  A key is ("file", EXT) (wds/files: `key.EXT`), ("json", FIELD) or ("column", NAME) (csv).
  """

  def __init__(self, keys: Sequence[tuple[str, str]], probs: np.ndarray):
    self.keys, self.probs = tuple(keys), np.asarray(probs, np.float64)
    self._cdf = np.cumsum(self.probs)

  @property
  def file_extensions(self) -> tuple[str, ...]:
    return tuple(name for kind, name in self.keys if kind == "file")

  @property
  def json_fields(self) -> tuple[str, ...]:
    return tuple(name for kind, name in self.keys if kind == "json")

  def draw(self, rng: np.random.Generator) -> int:
    return int(min(np.searchsorted(self._cdf, rng.random(), side="right"), len(self.keys) - 1))

  def pick(self, value: Callable[[tuple[str, str]], Optional[object]],
           rng: np.random.Generator) -> tuple[Optional[str], bool]:
    """(caption, fell back) with value(key) -> str | list of str | None (missing); the
    drawn key first, then the others in list order. (None, False): no key is present."""
    drawn = self.draw(rng)
    for i in (drawn, *(j for j in range(len(self.keys)) if j != drawn)):
      caption = _text(value(self.keys[i]), rng)
      if caption:
        return caption, i != drawn
    return None, False

  def options_from_files(self, files: dict) -> dict:
    """{key: value} of one sample's files ({EXT: bytes}, a wds tar group), for `pick`."""
    meta = _json(files.get("json")) if self.json_fields else None
    options = {}
    for key in self.keys:
      kind, name = key
      if kind == "json":
        options[key] = meta.get(name) if isinstance(meta, dict) else None
      elif name in files:
        options[key] = files[name].decode("utf-8", errors="replace")
    return options


def _json(data: Optional[bytes]) -> Optional[dict]:
  if data is None:
    return None
  try:
    meta = json.loads(data)
  except ValueError:
    return None
  return meta if isinstance(meta, dict) else None


def _text(value, rng: np.random.Generator) -> Optional[str]:
  """A caption value as one stripped string: a list gives one of its non-empty items."""
  if isinstance(value, (list, tuple)):
    items = [str(v).strip() for v in value if v is not None and str(v).strip()]
    return items[int(rng.integers(len(items)))] if items else None
  if value is None:
    return None
  return str(value).strip() or None


def picker(config, kind: str) -> Optional[CaptionPicker]:
  """The CaptionPicker of config.data.caption_keys/caption_probs for a source of `kind`
  (wds, files, csv); None where the source keeps its one caption (the default keys, or a
  source without caption keys). ValueError (one line) for a bad list."""
  spec = str(_option(config, "caption_keys", DEFAULT_KEYS))
  names = split_list(spec)
  if not names:
    raise ValueError("config.data.caption_keys is empty; use 'txt' (the default) or a list "
                     "such as 'txt::recap.txt' or 'json:caption::json:recaption'")
  probs = parse_weights(str(_option(config, "caption_probs", "")), len(names), "caption_probs",
                        f"caption keys ({spec!r})")
  if kind not in ("wds", "files", "csv") or (spec == DEFAULT_KEYS and kind != "csv"):
    return None
  if kind == "csv":
    if spec == DEFAULT_KEYS:
      return None  # the column is config.data.csv_caption_key
    if any(name.startswith("json:") for name in names):
      raise ValueError(f"config.data.caption_keys={spec!r}: csv sources take column names, "
                       "not json: fields")
    return CaptionPicker([("column", name) for name in names], probs)
  keys = []
  for name in names:
    if name.startswith("json:"):
      if not name[5:]:
        raise ValueError(f"config.data.caption_keys={spec!r}: 'json:' needs a field name, "
                         "e.g. 'json:caption'")
      keys.append(("json", name[5:]))
    else:
      keys.append(("file", name.lstrip(".").lower()))
  return CaptionPicker(keys, probs)
