"""open_clip's CSV/TSV datasets: one row per image, an image path column and a caption column.

    filepath<TAB>title
    images/0001.jpg<TAB>a dog on a beach

`config.data.path` is a file, a brace pattern or glob of files (`parts/{0..3}.tsv`), local or
any fsspec URL. Relative image paths resolve against the folder of the file that names them.
The rows of all files, in file order, form one random-access index; a malformed row keeps its
index and is skipped (and counted) when read, so every process agrees on the numbering.
"""
from __future__ import annotations

import csv
import io
import os
import posixpath
from typing import Optional

import numpy as np

from clip_jax.data import wds


def _join(folder: str, path: str) -> str:
  """`path` as written if absolute or a URL, else relative to `folder` (a dir or URL)."""
  if "://" in path or os.path.isabs(path):
    return path
  if "://" in folder:
    return posixpath.join(folder, path)
  return os.path.join(folder, path)


def _folder(path: str) -> str:
  return posixpath.dirname(path) if "://" in path else os.path.dirname(os.path.abspath(
      path.removeprefix("file://")))


def _separator(separator: str) -> str:
  # Flags and JSON configs often spell the tab as the two characters "\t".
  return "\t" if separator in ("\\t", "tab") else separator


def _files(path: str) -> list[str]:
  if not path:
    raise ValueError("config.data.path is empty; set it to a CSV/TSV file (or a brace pattern "
                     "of files) for config.data.source='csv'")
  files = wds.list_shards(path)
  if not files:
    raise ValueError(f"config.data.path={path!r} matches no CSV/TSV files")
  return files


def _header(csv_file: str, separator: str) -> tuple[list[str], bool]:
  """(column names, whether a data row follows) of one file; ValueError if it is unreadable."""
  try:
    with wds.open_binary(csv_file) as f:
      lines = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
      reader = csv.reader(lines, delimiter=separator)
      header = next(reader, None)
      has_rows = next(reader, None) is not None
  except (OSError, ValueError) as e:
    raise ValueError(f"config.data.path: cannot read {csv_file!r}: {type(e).__name__}: "
                     f"{e}") from None
  if not header:
    raise ValueError(f"config.data.path: {csv_file!r} is empty (no header row with the "
                     f"image and caption columns)")
  return header, has_rows


def _caption_columns(caption_key: str, picker) -> list[str]:
  return [name for _, name in picker.keys] if picker is not None else [caption_key]


def validate(path: str, image_key: str, caption_key: str, separator: str,
             picker=None) -> list[str]:
  """The CSV files of `path`; ValueError (one line) for no match, an empty file or a missing
  column (naming the columns there are). picker: a captions.CaptionPicker of caption columns
  (config.data.caption_keys), which then replace `caption_key`."""
  separator = _separator(separator)
  files = _files(path)
  any_rows = False
  field = "caption_keys" if picker is not None else "csv_caption_key"
  columns = [("csv_image_key", image_key)] + [
      (field, name) for name in _caption_columns(caption_key, picker)]
  for csv_file in files:
    header, has_rows = _header(csv_file, separator)
    for field, key in columns:
      if key not in header:
        raise ValueError(f"config.data.{field}={key!r} is not a column of {csv_file!r} "
                         f"(columns: {header}; config.data.csv_separator={separator!r})")
    any_rows |= has_rows
  if not any_rows:
    raise ValueError(f"config.data.path={path!r}: the CSV files have a header but no rows")
  return files


class CsvSource:
  """Random access to the (image path, caption) rows of CSV/TSV files.

  With a captions.CaptionPicker (config.data.caption_keys naming columns), each record
  carries the values of those columns as "caption_options", for the sample's own draw.
  """

  draws_captions = False  # `record` ignores its rng: RecordLoader passes None

  def __init__(self, path: str, image_key: str = "filepath", caption_key: str = "title",
               separator: str = "\t", picker=None):
    separator = _separator(separator)
    self.name = path
    self._picker = picker
    images, captions, keys, options = [], [], [], []
    for csv_file in validate(path, image_key, caption_key, separator, picker):
      folder = _folder(csv_file)
      with wds.open_binary(csv_file) as f:
        lines = io.TextIOWrapper(f, encoding="utf-8", errors="replace", newline="")
        reader = csv.reader(lines, delimiter=separator)
        header = next(reader)
        image_column = header.index(image_key)
        option_columns = [header.index(c) for c in _caption_columns(caption_key, picker)]
        caption_column = option_columns[0]
        for row in reader:
          if not row:  # blank line
            continue
          keys.append(f"{csv_file}:{reader.line_num}")
          if len(row) != len(header):
            images.append(None)  # malformed: counted as skipped when read
            captions.append(f"{len(row)} fields, the header has {len(header)}")
            options.append(None)
            continue
          image = row[image_column].strip()
          images.append(_join(folder, image) if image else "")
          captions.append(row[caption_column])
          options.append(tuple(row[c] for c in option_columns) if picker is not None else None)
    # Object arrays pickle (into grain's worker processes) much faster than lists of str.
    self._images = np.array(images, dtype=object)
    self._captions = np.array(captions, dtype=object)
    self._keys = np.array(keys, dtype=object)
    self._options = np.empty(len(options), dtype=object)
    self._options[:] = options

  def __len__(self) -> int:
    return len(self._images)

  def record(self, index: int, rng: Optional[np.random.Generator] = None) -> dict:
    """{"image": path (read and decoded by the loader), "caption", "captions", "label" -1,
    "key"}; ValueError for a malformed row."""
    del rng  # one caption per row
    image, caption, key = self._images[index], self._captions[index], self._keys[index]
    if image is None:
      raise ValueError(f"malformed CSV row {key}: {caption}")
    if not image:
      raise ValueError(f"CSV row {key} has an empty image path")
    record = {"image": image, "caption": caption, "captions": [caption], "label": -1,
              "key": key}
    if self._picker is not None:
      record["caption_options"] = dict(zip(self._picker.keys, self._options[index]))
    return record
