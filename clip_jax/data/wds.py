"""Webdataset tar shards in the img2dataset layout: `key.jpg|png|webp` + `key.txt` (+ `key.json`).

Evaluation sets with several captions per image put one per line of `key.txt` and/or a
"captions" list in `key.json`.

Shards come from local paths, brace patterns (`shards/{00000..00127}.tar`), globs, or any
fsspec URL (gs://, s3://, ...) whose filesystem package is installed. Each process reads its
own shards, in a new order every epoch (or drawn with replacement for endless streams);
a shard is streamed once, front to back, and its read position is checkpointable.
"""
from __future__ import annotations

import functools
import glob
import io
import json
import os
import re
import sys
import tarfile
from typing import Iterator, Optional

from absl import logging
import grain
import numpy as np

from clip_jax import storage

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
_BRACE = re.compile(r"\{(\d+)\.\.(\d+)\}|\{([^{}]*,[^{}]*)\}")


def expand_braces(pattern: str) -> list[str]:
  """`a/{000..002}.tar` -> a/000.tar a/001.tar a/002.tar (zero padding kept); `{x,y}` lists too."""
  match = _BRACE.search(pattern)
  if match is None:
    return [pattern]
  head, tail = pattern[:match.start()], pattern[match.end():]
  if match.group(3) is not None:
    options = match.group(3).split(",")
  else:
    lo, hi = match.group(1), match.group(2)
    width = len(lo) if lo.startswith("0") or len(lo) == len(hi) else 0
    options = [str(i).zfill(width) for i in range(int(lo), int(hi) + 1)]
  return [path for option in options for path in expand_braces(head + option + tail)]


def _is_url(path: str) -> bool:
  return "://" in path and not path.startswith("file://")


def _filesystem(url: str):
  import fsspec  # pylint: disable=g-import-not-at-top
  try:
    fs, _ = fsspec.core.url_to_fs(url)
  except (ImportError, ValueError) as e:
    raise ValueError(f"config.data.path={url!r}: no fsspec filesystem for this URL "
                     f"(install its package, e.g. gcsfs for gs://, s3fs for s3://): {e}") from None
  return fs


def list_shards(path: str) -> list[str]:
  """Expands `config.data.path` (patterns separated by `::` or whitespace) into shard paths."""
  shards = []
  for pattern in path.replace("::", " ").split():
    for expanded in expand_braces(pattern):
      if any(c in expanded for c in "*?["):
        if _is_url(expanded):
          fs = _filesystem(expanded)
          shards.extend(sorted(fs.unstrip_protocol(p) for p in fs.glob(expanded)))
        else:
          shards.extend(sorted(glob.glob(expanded)))
      else:
        shards.append(expanded)
  return shards


def validate_shards(path: str) -> list[str]:
  """The shard list of `path`; ValueError (one line) if it is empty or a shard is missing."""
  if not path:
    raise ValueError("config.data.path is empty; set it to a shard pattern such as "
                     "'shards/{00000..00127}.tar' for config.data.source='wds'")
  shards = list_shards(path)
  if not shards:
    raise ValueError(f"config.data.path={path!r} matches no shard files")
  first_url = next((s for s in shards if _is_url(s)), None)
  fs = _filesystem(first_url) if first_url else None
  for shard in shards:
    exists = fs.exists(shard) if _is_url(shard) else os.path.isfile(shard.removeprefix("file://"))
    if not exists:
      raise ValueError(f"config.data.path={path!r}: shard {shard!r} does not exist")
  return shards


def open_binary(path: str):
  """A local path (or file:// URL) or any fsspec URL, opened for reading bytes."""
  if _is_url(path):
    import fsspec  # pylint: disable=g-import-not-at-top
    return fsspec.open(path, "rb").open()
  return open(path.removeprefix("file://"), "rb")


def read_bytes(path: str) -> bytes:
  with open_binary(path) as f:
    return f.read()


def _split_name(name: str) -> tuple[str, str]:
  """`dir/000012.jpg` -> (`dir/000012`, `jpg`); extensions start at the basename's first dot."""
  dirname, basename = os.path.split(name)
  stem, _, ext = basename.partition(".")
  return os.path.join(dirname, stem), ext.lower()


def _sample_from_files(files: dict, picker=None) -> dict:
  """Picks the image bytes and captions out of one key's files; `error` says what is missing.

  "caption" is the whole `key.txt` (else the json's "caption"); "captions" lists every
  caption: the non-empty lines of `key.txt`, then the json's "captions" list (or "caption").
  With a captions.CaptionPicker (config.data.caption_keys), "caption_options" holds the
  values of its keys, for the sample's own draw among them (clip_jax.data.pipeline).
  """
  image = next((files[e] for e in IMAGE_EXTENSIONS if e in files), None)
  if picker is not None:
    return {"image": image, "caption": "", "captions": [],
            "caption_options": picker.options_from_files(files),
            "error": None if image is not None else "no image file (jpg/png/webp)"}
  caption, captions = None, []
  if "txt" in files:
    caption = files["txt"].decode("utf-8", errors="replace").strip()
    captions = [line.strip() for line in caption.splitlines() if line.strip()]
  if "json" in files:
    try:
      meta = json.loads(files["json"])
      listed = meta.get("captions") or [meta.get("caption") or ""]
    except (ValueError, AttributeError):
      meta, listed = None, []
    if isinstance(listed, str):
      listed = [listed]
    if caption is None and meta is not None:
      caption = str(meta.get("caption") or "").strip()
    if "txt" not in files or "captions" in (meta or {}):
      captions += [str(c).strip() for c in listed if str(c).strip()]
  error = None
  if image is None:
    error = "no image file (jpg/png/webp)"
  elif not caption and not captions:
    error = "missing or empty caption"
  return {"image": image, "caption": caption or "", "captions": captions, "error": error}


def iter_tar_samples(shard: str, picker=None) -> Iterator[tuple[str, dict]]:
  """Streams (key, {image, caption, error}) from one tar; a truncated tail ends it cleanly.

  picker: a captions.CaptionPicker whose keys' values each sample carries (see
  _sample_from_files).

  The group being read when the archive breaks off is yielded with an error, so it is
  counted as skipped; nothing after the break can be recovered.
  """
  key, files = None, {}
  try:
    with open_binary(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        member_key, ext = _split_name(member.name)
        if member_key != key and key is not None:
          yield key, _sample_from_files(files, picker)
          files = {}
        key = member_key
        files[ext] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, ValueError, *storage.errors()) as e:
    # A storage error here comes after the client's own retries (gcsfs: 6 attempts).
    logging.warning("wds shard %s is truncated or unreadable after key %s: %s", shard, key,
                    storage.describe(e))
    # The group being read (or the shard itself, if nothing was read) is lost: one skip.
    yield key or "<shard start>", {"image": None, "caption": "", "captions": [],
                                    "error": f"truncated or unreadable tar: "
                                             f"{storage.describe(e)}"}
    return
  if key is not None:
    yield key, _sample_from_files(files, picker)


class _TarShardIterator(grain.DatasetIterator):
  """Reads one shard; its state is the number of samples already produced."""

  def __init__(self, shard: str, shard_id: int, epoch: int, picker=None):
    super().__init__()
    self._shard, self._shard_id, self._epoch = shard, shard_id, epoch
    self._picker = picker
    self._position = 0
    self._samples = None

  def __next__(self) -> dict:
    if self._samples is None:
      self._samples = iter_tar_samples(self._shard, self._picker)
      for _ in range(self._position):  # resume: skip what was already produced
        next(self._samples, None)
    key, sample = next(self._samples)
    sample.update(key=key, shard=self._shard, epoch=self._epoch,
                  index=(self._shard_id, self._position))
    self._position += 1
    return sample

  def get_state(self) -> dict:
    return {"position": self._position}

  def set_state(self, state: dict):
    self._position = int(state["position"])
    self._samples = None


class TarShardDataset(grain.IterDataset):
  """One shard of one epoch as a grain IterDataset of raw samples."""

  def __init__(self, shard: str, shard_id: int, epoch: int, picker=None):
    super().__init__()
    self._shard, self._shard_id, self._epoch = shard, shard_id, epoch
    self._picker = picker

  def __iter__(self) -> _TarShardIterator:
    return _TarShardIterator(self._shard, self._shard_id, self._epoch, self._picker)

  def __str__(self) -> str:
    return f"TarShardDataset({self._shard}, epoch={self._epoch})"


class ShardSchedule:
  """Endless sequence of TarShardDatasets for one process.

  Without resampling, process p reads shards p, p+P, ... of the sorted list, in a new order
  each epoch (seeded by (seed, epoch)). With resampling, entry i is a shard drawn from all
  shards with replacement by (seed, process, i). picker: the captions.CaptionPicker of
  config.data.caption_keys, if any.
  """

  def __init__(self, shards: list[str], *, seed: int, process_index: int, process_count: int,
               resample: bool, num_epochs: Optional[int] = None, picker=None):
    self._all_shards = list(shards)
    self._picker = picker
    self._seed, self._process_index = seed, process_index
    self._resample = resample
    if resample:
      self._local_ids = list(range(len(shards)))
    else:
      if len(shards) < process_count:
        raise ValueError(f"config.data.path has {len(shards)} shards but there are "
                         f"{process_count} processes; use at least one shard per process "
                         f"or config.data.resample_shards=True")
      self._local_ids = list(range(process_index, len(shards), process_count))
    self._len = sys.maxsize if num_epochs is None else num_epochs * len(self._local_ids)

  @functools.lru_cache(maxsize=4)
  def _order(self, epoch: int) -> np.ndarray:
    return np.random.default_rng([self._seed & 0xFFFFFFFF, epoch]).permutation(len(self._local_ids))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, position: int) -> TarShardDataset:
    if self._resample:
      rng = np.random.default_rng([self._seed & 0xFFFFFFFF, self._process_index, position])
      shard_id = int(rng.integers(len(self._all_shards)))
      epoch = position
    else:
      epoch, i = divmod(position, len(self._local_ids))
      shard_id = self._local_ids[int(self._order(epoch)[i])]
    return TarShardDataset(self._all_shards[shard_id], shard_id, epoch, self._picker)


def write_shard(path: str, samples, image_format: str = "jpg"):
  """Writes (key, image uint8 HWC | bytes, caption | None, json dict | None) samples as a tar."""
  from PIL import Image  # pylint: disable=g-import-not-at-top

  def add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))

  with tarfile.open(path, "w") as tar:
    for key, image, caption, meta in samples:
      if not isinstance(image, (bytes, bytearray)):
        buf = io.BytesIO()
        Image.fromarray(np.asarray(image)).save(buf, format="JPEG" if image_format == "jpg"
                                                else image_format.upper(), quality=90)
        image = buf.getvalue()
      add(tar, f"{key}.{image_format}", bytes(image))
      if caption is not None:
        add(tar, f"{key}.txt", caption.encode("utf-8"))
      if meta is not None:
        add(tar, f"{key}.json", json.dumps(meta).encode("utf-8"))
