"""Image classification data kept as one sub-folder per class (torchvision's ImageFolder layout).

    root/n01440764/ILSVRC2012_val_00000293.JPEG      (or root/golden retriever/img_001.png)

Classes are the sub-folders in sorted order; records are ordered by (folder, file name),
so every process sees the same indices and reads its own range of them.
"""
from __future__ import annotations

import os
from typing import Optional, Sequence

import numpy as np

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff", ".ppm")
CAPTION_TEMPLATE = "a photo of a {}."


def _is_image(name: str) -> bool:
  return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _images_of(folder: str) -> list[str]:
  return sorted(n for n in os.listdir(folder) if _is_image(n)
                and os.path.isfile(os.path.join(folder, n)))


def class_folders(path: str) -> list[str]:
  """The sorted names of the class sub-folders of `path` (hidden ones excluded)."""
  return sorted(n for n in os.listdir(path)
                if not n.startswith(".") and os.path.isdir(os.path.join(path, n)))


def validate(path: str) -> None:
  """ValueError (one line) unless `path` holds class sub-folders with images in them."""
  if not path:
    raise ValueError("the image-folder path is empty; pass a directory with one sub-folder "
                     "per class")
  if not os.path.isdir(path):
    raise ValueError(f"image folder {path} does not exist; pass a directory with one "
                     "sub-folder per class")
  folders = class_folders(path)
  if not folders:
    raise ValueError(f"image folder {path} has no class sub-folders; expected "
                     f"{path}/<class>/<image>.jpg")
  if not any(_images_of(os.path.join(path, f)) for f in folders):
    raise ValueError(f"the class sub-folders of {path} hold no images "
                     f"({', '.join(IMAGE_EXTENSIONS)})")


class ImageFolderSource:
  """Random access to (encoded image, caption, label) of an image folder."""

  draws_captions = False  # `record` ignores its rng: RecordLoader passes None

  def __init__(self, path: str, classnames: Optional[Sequence[str]] = None):
    validate(path)
    self.path = path
    self.name = os.path.basename(os.path.normpath(path)) or path
    self.folders = class_folders(path)
    if classnames is not None and len(classnames) != len(self.folders):
      raise ValueError(f"image folder {path} has {len(self.folders)} class sub-folders but "
                       f"{len(classnames)} class names were given")
    self.classnames = list(classnames) if classnames is not None else list(self.folders)
    self._files: list[tuple[str, int]] = []
    for label, folder in enumerate(self.folders):
      self._files.extend((os.path.join(folder, n), label)
                         for n in _images_of(os.path.join(path, folder)))

  def __len__(self) -> int:
    return len(self._files)

  @property
  def labels(self) -> np.ndarray:
    """The label of every record, in record order (no file is read)."""
    return np.asarray([label for _, label in self._files], np.int64)

  def record(self, index: int, rng: Optional[np.random.Generator] = None) -> dict:
    """{"image": encoded bytes, "caption", "captions": [caption], "label", "key"}."""
    del rng  # one caption per class: nothing to draw
    relative, label = self._files[index]
    with open(os.path.join(self.path, relative), "rb") as f:
      image = f.read()
    caption = CAPTION_TEMPLATE.format(self.classnames[label])
    return {"image": image, "caption": caption, "captions": [caption], "label": label,
            "key": relative}
