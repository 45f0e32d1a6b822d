"""Evaluation data for the command line: the synthetic set, TFDS datasets, wds shards.

TFDS and wds go through `clip_jax.data.make_eval_iterator` (each process reads its part);
the synthetic set is generated identically on every process.
"""
from __future__ import annotations

from typing import Optional

import ml_collections

KINDS = ("synthetic", "tfds", "wds")


def dataset_kind(name: str) -> str:
  """"synthetic", "wds" (wds:PATTERN, or a pattern/path of .tar shards) or "tfds"."""
  if name == "synthetic":
    return "synthetic"
  if name.startswith("wds:") or ".tar" in name:
    return "wds"
  return "tfds"


def wds_path(name: str) -> str:
  return name[len("wds:"):] if name.startswith("wds:") else name


def data_config(name: str, split: str, data_dir: Optional[str], seed: int = 0,
                captions_per_image: int = 5):
  """The config.data fields `clip_jax.data.make_eval_iterator` reads."""
  kind = dataset_kind(name)
  return ml_collections.ConfigDict({
      "seed": seed,
      "data": {
          "source": kind, "name": name if kind == "tfds" else "",
          "path": wds_path(name) if kind == "wds" else "", "split": split,
          "data_dir": data_dir, "num_workers": 0, "shuffle_buffer": 1,
          "resample_shards": False, "min_scale": 1.0, "max_scale": 1.0,
          "image_dtype": "float32", "captions_per_image": captions_per_image,
      },
  })


def validate_dataset(name: str, split: str, data_dir: Optional[str]) -> None:
  """ValueError (one line) for an unknown or unprepared dataset, before the model loads."""
  kind = dataset_kind(name)
  if kind == "synthetic":
    return
  from clip_jax.data import validate_data_config
  try:
    validate_data_config(data_config(name, split, data_dir))
  except ValueError as e:
    if kind == "tfds" and "not a known TFDS dataset" in str(e):
      raise ValueError(f"unknown dataset {name!r}; known: synthetic, a TFDS dataset name "
                       f"(imagenet2012, cifar10, oxford_iiit_pet, coco_captions, ...), or "
                       f"wds shards (wds:/path/shards-{{00000..00009}}.tar)") from None
    raise


def tfds_classnames(name: str, split: str, data_dir: Optional[str]) -> Optional[list[str]]:
  """The TFDS label names (None without a ClassLabel feature)."""
  from clip_jax.data import tfds_source
  return tfds_source.TfdsSource(name, split, data_dir).classnames


def eval_batches(name: str, split: str, data_dir: Optional[str], *, image_size: int,
                 local_batch: int, num_examples: Optional[int], seed: int = 0,
                 all_captions: bool = False, captions_per_image: int = 5):
  """Process-local batches {"images", "tokens", "labels", "mask"} of one pass.

  all_captions: "captions" (every caption of each image) instead of "tokens"; the
  synthetic set then has captions_per_image distinct captions per image.
  """
  from clip_jax.data import make_eval_iterator
  return make_eval_iterator(data_config(name, split, data_dir, seed, captions_per_image),
                            image_size=image_size, batch_size=local_batch,
                            num_examples=num_examples, all_captions=all_captions)
