"""TFDS image-text and image-classification datasets read through TFDS data sources.

Data sources (array_record files, random access) need no TensorFlow. Labels become captions
through templates; datasets with several captions per image use one at random per epoch.
"""
from __future__ import annotations

from typing import Optional

import numpy as np

LABEL_TEMPLATES = ("a photo of a {}.", "a picture of a {}.", "an image of a {}.", "a {}.")
_TEXT_KEYS = ("caption", "captions", "text", "texts", "sentences")


def _builder(name: str, data_dir: Optional[str]):
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  if not name:
    raise ValueError("config.data.name is empty; set it to a TFDS dataset name for "
                     "config.data.source='tfds'")
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    raise ValueError(f"config.data.name={name!r} is not a known TFDS dataset (nor prepared "
                     f"in config.data.data_dir={data_dir!r})") from None
  if not builder.is_prepared():
    raise ValueError(f"TFDS dataset {name!r} is not prepared in config.data.data_dir="
                     f"{data_dir!r}; prepare it first (tfds build {name} --data_dir=... "
                     f"--file_format=array_record)")
  return builder


def _split_names(split: str) -> list[str]:
  # "train[:10%]+validation" -> ["train", "validation"]
  return [part.split("[")[0].strip() for part in split.split("+")]


def validate(name: str, split: str, data_dir: Optional[str]):
  """ValueError (one line) for an unknown, unprepared or split-less dataset."""
  builder = _builder(name, data_dir)
  for split_name in _split_names(split):
    if split_name not in builder.info.splits:
      raise ValueError(f"config.data.split={split!r}: TFDS dataset {name!r} has splits "
                       f"{sorted(builder.info.splits)}")
  _feature_keys(builder.info.features, name)


def _feature_keys(features, name: str):
  """(image key, text key or None, label key or None, classnames or None)."""
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  image_key = text_key = label_key = None
  classnames = None
  for key, feature in features.items():
    if isinstance(feature, tfds.features.Image) and (image_key is None or key == "image"):
      image_key = key
    elif isinstance(feature, tfds.features.ClassLabel) and (label_key is None or key == "label"):
      label_key, classnames = key, [n.replace("_", " ") for n in feature.names]
    elif key in _TEXT_KEYS and text_key is None:
      text_key = key
  if image_key is None or (text_key is None and label_key is None):
    raise ValueError(f"TFDS dataset {name!r} needs an Image feature and a text or ClassLabel "
                     f"feature; it has {sorted(features.keys())}")
  return image_key, text_key, label_key, classnames


def _captions(value) -> list[str]:
  """Flattens a text feature (str, bytes, list, or {"text": [...]}) into a list of strings."""
  if isinstance(value, dict):
    value = value.get("text", next(iter(value.values()), ""))
  if isinstance(value, (str, bytes, np.bytes_, np.str_)):
    value = [value]
  out = []
  for v in np.asarray(value, dtype=object).reshape(-1):
    out.append(v.decode("utf-8", errors="replace") if isinstance(v, (bytes, np.bytes_)) else str(v))
  return out


class TfdsSource:
  """Random access to (image, caption candidates, label) of a TFDS split."""

  draws_captions = True  # `record` picks a caption (or label template) with its rng

  def __init__(self, name: str, split: str, data_dir: Optional[str]):
    builder = _builder(name, data_dir)
    self.name = name
    self.image_key, self.text_key, self.label_key, self.classnames = _feature_keys(
        builder.info.features, name)
    self._source = builder.as_data_source(split=split)

  def __len__(self) -> int:
    return len(self._source)

  def record(self, index: int, rng: np.random.Generator) -> dict:
    """{"image": uint8 HWC, "caption": str, "captions": [str], "label": int (-1 without
    labels), "key": str}; "captions" are all of the example's (for label datasets, "caption")."""
    example = self._source[index]
    label = int(example[self.label_key]) if self.label_key is not None else -1
    if self.text_key is not None:
      candidates = _captions(example[self.text_key])
      caption = candidates[int(rng.integers(len(candidates)))] if candidates else ""
    else:
      caption = LABEL_TEMPLATES[int(rng.integers(len(LABEL_TEMPLATES)))].format(
          self.classnames[label])
      candidates = [caption]
    return {"image": np.asarray(example[self.image_key]), "caption": caption,
            "captions": candidates, "label": label, "key": f"{self.name}/{index}"}
