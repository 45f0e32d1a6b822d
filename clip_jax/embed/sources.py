"""The datasets `python -m clip_jax.embed --dataset` reads, as one fixed order of samples.

    wds:PATTERN        webdataset tars (img2dataset's layout), shards in sorted order
    csv:PATH           open_clip's CSV/TSV files (a path column and a caption column)
    files:DIR          img2dataset's files layout (DIR/00000/000000123.jpg + .txt + .json)
    imagefolder:DIR    one sub-folder per class (the caption is "a photo of a {class}.")

The project's sources (clip_jax.data) number the samples; partition k of size P is the
samples [k * P, (k + 1) * P) of that order, the same on every run and every host. A
partition yields one loader per sample: a function that reads the sample (its caption
file, its image bytes) when called, so a host reads only its own rows, in threads, and a
committed partition of a random-access source is skipped without reading anything.

A loaded sample is {"key", "image" (encoded bytes or a path/URL), "caption", "meta" (the
source's metadata columns: image_path or url, img2dataset's json fields, the CSV's other
columns, the class), "error" (None, or why the sample cannot be used)}.
"""
from __future__ import annotations

import csv
import functools
import io
import itertools
import json
import os
import tarfile
from typing import Callable, Iterator, Optional

from clip_jax import storage
from clip_jax.data import csv_source, files_source, imagefolder, wds

KINDS = ("wds", "csv", "files", "imagefolder")
# Metadata columns the embedder writes itself; a source's columns of these names are dropped.
RESERVED = ("key", "caption", "clip_score")

Loader = Callable[[], dict]


def _scalars(meta: dict) -> dict:
  """The scalar fields of a json object (lists and objects are not parquet columns here)."""
  return {k: v for k, v in meta.items()
          if k not in RESERVED and (v is None or isinstance(v, (str, int, float, bool)))}


def _json_meta(data: Optional[bytes]) -> dict:
  if not data:
    return {}
  try:
    meta = json.loads(data)
  except ValueError:
    return {}
  return _scalars(meta) if isinstance(meta, dict) else {}


class Dataset:
  """A dataset in a fixed order: `partitions(size)` yields (k, loaders of partition k)."""

  kind = ""

  def __init__(self, spec: str, location: str):
    self.spec = spec
    self.location = location
    # Where the images are: the manifest keeps it so that a server can find them again
    # under another root (clip_jax.search --images_root).
    self.images_root: Optional[str] = None

  def __len__(self) -> int:
    raise NotImplementedError

  def load(self, index: int) -> dict:
    raise NotImplementedError

  def loaders(self) -> Iterator[Loader]:
    return (functools.partial(self._safe_load, i) for i in range(len(self)))

  def _safe_load(self, index: int) -> dict:
    try:
      return self.load(index)
    except (ValueError, UnicodeError, *storage.errors()) as e:  # one unreadable sample
      return {"key": f"#{index}", "image": None, "caption": "", "meta": {},
              "error": storage.describe(e)}

  def partitions(self, size: int) -> Iterator[tuple[int, Iterator[Loader]]]:
    """(k, the loaders of partition k); a partition the caller leaves unread is read past."""
    stream = self.loaders()
    for k in itertools.count():
      first = next(stream, None)
      if first is None:
        return
      chunk = itertools.chain([first], itertools.islice(stream, size - 1))
      yield k, chunk
      for _ in chunk:  # what the caller did not read (a committed partition)
        pass


class SourceDataset(Dataset):
  """A random-access source of clip_jax.data (`self.source`); `meta` adds its columns."""

  source = None

  def __len__(self) -> int:
    return len(self.source)

  def meta(self, record: dict) -> dict:
    raise NotImplementedError

  def load(self, index: int) -> dict:
    record = self.source.record(index)
    return {"key": record["key"], "image": record["image"], "caption": record["caption"],
            "meta": self.meta(record), "error": None}


class FilesDataset(SourceDataset):
  kind = "files"

  def __init__(self, spec: str, location: str):
    super().__init__(spec, location)
    self.source = files_source.FilesSource(location)
    self.images_root = storage.absolute(wds.list_shards(location)[0])

  def meta(self, record: dict) -> dict:
    stem = os.path.splitext(record["image"])[0]
    try:
      meta = _json_meta(wds.read_bytes(stem + ".json"))  # img2dataset's url, size, status
    except storage.errors():
      meta = {}
    return dict(meta, image_path=record["image"])


class CsvDataset(SourceDataset):
  kind = "csv"

  def __init__(self, spec: str, location: str, image_key: str, caption_key: str,
               separator: str):
    super().__init__(spec, location)
    self.source = csv_source.CsvSource(location, image_key, caption_key, separator)
    self.image_key, self.caption_key = image_key, caption_key
    self.separator = "\t" if separator in ("\\t", "tab") else separator
    self.files = wds.list_shards(location)
    self.images_root = os.path.dirname(storage.absolute(self.files[0]))

  @functools.cached_property
  def columns(self) -> dict[str, dict]:
    """The other columns of every row, by the row's key (CsvSource's `file:line`)."""
    columns = {}
    for csv_file in self.files:
      with wds.open_binary(csv_file) as f:
        reader = csv.reader(io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline=""),
                            delimiter=self.separator)
        header = next(reader)
        for row in reader:
          if len(row) == len(header):
            columns[f"{csv_file}:{reader.line_num}"] = {
                name: value for name, value in zip(header, row)
                if name not in (self.image_key, self.caption_key, *RESERVED)}
    return columns

  def meta(self, record: dict) -> dict:
    return dict(self.columns.get(record["key"], {}), image_path=record["image"])


class ImageFolderDataset(SourceDataset):
  kind = "imagefolder"

  def __init__(self, spec: str, location: str):
    super().__init__(spec, location)
    self.source = imagefolder.ImageFolderSource(location)
    self.images_root = storage.absolute(location)

  def meta(self, record: dict) -> dict:
    return {"image_path": os.path.join(self.images_root, record["key"]),
            "label": record["label"], "class": self.source.classnames[record["label"]]}


class WdsDataset(Dataset):
  """Tar shards, read front to back in sorted order (a stream: no length up front)."""

  kind = "wds"

  def __init__(self, spec: str, location: str):
    super().__init__(spec, location)
    self.shards = sorted(wds.validate_shards(location))

  def __len__(self) -> int:
    raise TypeError("a wds dataset is a stream")

  def loaders(self) -> Iterator[Loader]:
    for shard in self.shards:
      for sample in _tar_samples(shard):
        yield functools.partial(dict, sample)


def _tar_samples(shard: str) -> Iterator[dict]:
  """The samples of one tar, with img2dataset's json fields as metadata (which
  wds.iter_tar_samples does not return); a truncated tail is one bad sample."""
  key, files = None, {}
  try:
    with wds.open_binary(shard) as f, tarfile.open(fileobj=f, mode="r|*") as tar:
      for member in tar:
        if not member.isfile():
          continue
        folder, name = os.path.split(member.name)
        stem, _, ext = name.partition(".")  # extensions start at the first dot, as in wds
        member_key, ext = os.path.join(folder, stem), ext.lower()
        if key is not None and member_key != key:
          yield _tar_sample(shard, key, files)
          files = {}
        key = member_key
        files[ext] = tar.extractfile(member).read()
  except (tarfile.TarError, EOFError, ValueError, *storage.errors()) as e:
    yield {"key": key or f"{shard}:<start>", "image": None, "caption": "",
           "meta": {"shard": shard}, "error": f"truncated or unreadable tar: "
                                               f"{storage.describe(e)}"}
    return
  if key is not None:
    yield _tar_sample(shard, key, files)


def _tar_sample(shard: str, key: str, files: dict) -> dict:
  image = next((files[e] for e in wds.IMAGE_EXTENSIONS if e in files), None)
  meta = _json_meta(files.get("json"))
  caption = files["txt"].decode("utf-8", errors="replace").strip() if "txt" in files else ""
  if not caption and files.get("json"):
    try:
      caption = str(json.loads(files["json"]).get("caption") or "").strip()
    except (ValueError, AttributeError):
      pass
  meta["shard"] = shard
  return {"key": key, "image": image, "caption": caption, "meta": meta,
          "error": None if image is not None else "no image file (jpg/png/webp)"}


def open_dataset(spec: str, *, csv_image_key: str = "filepath", csv_caption_key: str = "title",
                 csv_separator: str = "\t") -> Dataset:
  """The dataset of a `--dataset KIND:LOCATION`; ValueError (one line) for a bad one."""
  kind, sep, location = spec.partition(":")
  if not sep or kind not in KINDS or not location:
    raise ValueError(f"--dataset {spec!r}: expected KIND:LOCATION with KIND one of "
                     f"{', '.join(KINDS)} (e.g. wds:shards/{{00000..00127}}.tar, "
                     "csv:train.tsv, files:DIR, imagefolder:DIR)")
  try:
    if kind == "wds":
      return WdsDataset(spec, location)
    if kind == "csv":
      return CsvDataset(spec, location, csv_image_key, csv_caption_key, csv_separator)
    if kind == "files":
      return FilesDataset(spec, location)
    return ImageFolderDataset(spec, location)
  except ValueError as e:
    # The sources speak of config.data.*, the trainer's names: here it is --dataset.
    message = str(e).replace("config.data.path", "path").replace("config.data.", "--")
    raise ValueError(f"--dataset {spec!r}: {message}") from None
