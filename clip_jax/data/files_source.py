"""img2dataset's `files` output (or any tree of images with a same-named `.txt` beside each).

    DIR/00000/000000123.jpg  DIR/00000/000000123.txt  DIR/00000/000000123.json ...

The tree is listed once into an index of (image, caption file) pairs, sorted by path, and the
index is cached (in the run's workdir) so a restart does not walk a million files again;
delete `files_index_*.json` there after changing the tree. `config.data.path` is a folder,
several by brace pattern or glob, local or any fsspec URL.
"""
from __future__ import annotations

import functools
import hashlib
import json
import os
from typing import Optional

import numpy as np

from clip_jax import storage
from clip_jax.data import wds

IMAGE_EXTENSIONS = tuple("." + e for e in wds.IMAGE_EXTENSIONS)
_INDEX_VERSION = 1


def _is_url(path: str) -> bool:
  return "://" in path and not path.startswith("file://")


def _walk(root: str) -> list[str]:
  """Every file under `root`, as paths relative to it."""
  if _is_url(root):
    import fsspec  # pylint: disable=g-import-not-at-top
    fs, stripped = fsspec.core.url_to_fs(root)
    stripped = stripped.rstrip("/")
    return [p[len(stripped) + 1:] for p in fs.find(stripped)]
  root = root.removeprefix("file://")
  out = []
  for folder, _, names in os.walk(root):
    relative = os.path.relpath(folder, root)
    out.extend(n if relative == "." else os.path.join(relative, n) for n in names)
  return out


def _pairs(relative_paths: list[str]) -> tuple[list[str], list[bool]]:
  """(image paths, whether each has a `.txt` beside it), sorted by path."""
  images, texts = {}, set()
  for path in relative_paths:
    stem, ext = os.path.splitext(path)
    ext = ext.lower()
    if ext in IMAGE_EXTENSIONS:
      images.setdefault(stem, path)
    elif ext == ".txt":
      texts.add(stem)
  stems = sorted(images)
  return [images[s] for s in stems], [s in texts for s in stems]


def _roots(path: str) -> list[str]:
  if not path:
    raise ValueError("config.data.path is empty; set it to a folder of images with .txt "
                     "captions (img2dataset's output_format='files') for "
                     "config.data.source='files'")
  roots = wds.list_shards(path)
  if not roots:
    raise ValueError(f"config.data.path={path!r} matches no folders")
  return [r if _is_url(r) else os.path.abspath(r.removeprefix("file://")) for r in roots]


def _cache_file(cache_dir: str, roots: list[str]) -> str:
  digest = hashlib.sha1("\n".join(roots).encode()).hexdigest()[:16]
  return os.path.join(cache_dir, f"files_index_{digest}.json")


def _read_cache(cache_file: str, roots: list[str]) -> Optional[dict]:
  from etils import epath  # pylint: disable=g-import-not-at-top
  try:
    index = json.loads(epath.Path(cache_file).read_text())
  except (OSError, ValueError):
    return None
  if index.get("version") != _INDEX_VERSION or index.get("roots") != roots:
    return None
  return index


def _write_cache(cache_file: str, index: dict) -> None:
  # Atomic (renamed into place locally, one upload on gs://): a reader (another process, a
  # restart) never sees half of it.
  storage.write_text(cache_file, json.dumps(index))


@functools.lru_cache(maxsize=4)
def _list(roots: tuple[str, ...]) -> dict:
  """The index of `roots` (walked once per process and cached here)."""
  index = {"version": _INDEX_VERSION, "roots": list(roots), "root_of": [], "images": [],
           "has_text": []}
  for r, root in enumerate(roots):
    images, has_text = _pairs(_walk(root))
    index["root_of"] += [r] * len(images)
    index["images"] += images
    index["has_text"] += has_text
  return index


def _no_pairs_error(path: str) -> ValueError:
  return ValueError(f"config.data.path={path!r} holds no image with a same-named .txt caption "
                    f"(img2dataset's files layout: 000000123.jpg + 000000123.txt)")


def _check_folders(path: str, roots: list[str]) -> None:
  for root in roots:
    if not _is_url(root) and not os.path.isdir(root):
      raise ValueError(f"config.data.path={path!r}: {root!r} is not a folder")


def _has_pair(root: str) -> bool:
  """Whether some folder under `root` holds an image and its .txt (stops at the first)."""
  if _is_url(root):
    return any(_pairs(_walk(root))[1])
  for _, _, names in os.walk(root.removeprefix("file://")):
    if any(_pairs(names)[1]):
      return True
  return False


def build_index(path: str, cache_dir: Optional[str] = None) -> dict:
  """The (cached) index of `path`: {"roots", "root_of", "images", "has_text"} lists.

  ValueError (one line) when `path` is empty, matches nothing or holds no image+.txt pair.
  """
  roots = _roots(path)
  cache_file = _cache_file(cache_dir, roots) if cache_dir else None
  index = _read_cache(cache_file, roots) if cache_file else None
  if index is None:
    _check_folders(path, roots)
    index = _list(tuple(roots))
    if not any(index["has_text"]):
      raise _no_pairs_error(path)
    if cache_file:
      _write_cache(cache_file, index)
  return index


def validate(path: str, cache_dir: Optional[str] = None) -> None:
  """ValueError (one line) for an empty path, no folder, or no image+.txt pair; cheap: it
  reads the cached index or walks only until the first pair."""
  roots = _roots(path)
  if cache_dir and _read_cache(_cache_file(cache_dir, roots), roots) is not None:
    return
  _check_folders(path, roots)
  if not any(_has_pair(root) for root in roots):
    raise _no_pairs_error(path)


class FilesSource:
  """Random access to the (image, caption) pairs of a files-layout tree.

  With a captions.CaptionPicker (config.data.caption_keys such as "txt::recap.txt" or
  "json:caption::json:recaption"), `record` draws the caption with its rng, reading only
  the drawn file (and others only to fall back).
  """

  def __init__(self, path: str, cache_dir: Optional[str] = None, picker=None):
    index = build_index(path, cache_dir)
    self.name = path
    self._picker = picker
    self.draws_captions = picker is not None  # else `record` ignores its rng (None)
    self._roots = index["roots"]
    self._root_of = np.asarray(index["root_of"], np.int32)
    self._images = np.array(index["images"], dtype=object)
    self._has_text = np.asarray(index["has_text"], bool)

  def __len__(self) -> int:
    return len(self._images)

  def _path(self, index: int, relative: str) -> str:
    root = self._roots[self._root_of[index]]
    return f"{root.rstrip('/')}/{relative}" if _is_url(root) else os.path.join(root, relative)

  def record(self, index: int, rng: Optional[np.random.Generator] = None) -> dict:
    """{"image": path (read and decoded by the loader), "caption" (the whole .txt),
    "captions" (its non-empty lines), "label" -1, "key"}; OSError for an unreadable .txt.
    With caption keys, "caption" is the drawn one and "caption_fallback" says whether the
    drawn key was missing."""
    image = self._images[index]
    if self._picker is not None:
      caption, fell_back = self._picker.pick(self._caption_reader(index), rng)
      return {"image": self._path(index, image), "caption": caption or "",
              "captions": [caption] if caption else [], "label": -1, "key": image,
              "caption_fallback": int(fell_back)}
    caption = ""
    if self._has_text[index]:
      text_file = self._path(index, os.path.splitext(image)[0] + ".txt")
      caption = wds.read_bytes(text_file).decode("utf-8", errors="replace").strip()
    captions = [line.strip() for line in caption.splitlines() if line.strip()]
    return {"image": self._path(index, image), "caption": caption, "captions": captions,
            "label": -1, "key": image}

  def _caption_reader(self, index: int):
    """key -> the caption value of record `index` (None when its file or field is absent)."""
    stem = os.path.splitext(self._images[index])[0]
    meta = {}

    def value(key):
      kind, name = key
      if kind == "json":
        if "json" not in meta:
          try:
            meta["json"] = json.loads(wds.read_bytes(self._path(index, stem + ".json")))
          except (FileNotFoundError, ValueError):
            meta["json"] = None
        return meta["json"].get(name) if isinstance(meta["json"], dict) else None
      if name == "txt" and not self._has_text[index]:
        return None  # the index knows: no read
      try:
        return wds.read_bytes(self._path(index, f"{stem}.{name}")).decode("utf-8",
                                                                          errors="replace")
      except FileNotFoundError:
        return None
    return value
