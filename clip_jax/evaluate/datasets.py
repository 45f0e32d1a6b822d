"""Evaluation data for the command line: the synthetic set, TFDS, wds shards, image folders,
open_clip-style CSV/TSV files (csv:PATH) and img2dataset `files` trees (files:PATH).

TFDS, wds, csv, files and image folders go through `clip_jax.data.make_eval_iterator` (each process
reads its part); the synthetic set is generated identically on every process.

A dataset's label space (`label_space`) says which prompts its zero-shot classifier is
built from and how its labels index that classifier's columns: every ImageNet-family set
(ImageNet, V2, Sketch, A, R, from TFDS or from WordNet-id folders) shares one 1000-class
classifier, restricted to the columns of its classes.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

import ml_collections
import numpy as np

# Name prefixes of the dataset kinds read from a path (`kind:PATH`); anything else that is
# not "synthetic" or a .tar pattern is a TFDS name.
PREFIXES = {"wds:": "wds", "imagefolder:": "imagefolder", "csv:": "csv", "files:": "files"}
KINDS = ("synthetic", "tfds") + tuple(PREFIXES.values())
# Default evaluation split where a TFDS dataset has no "test" split.
DEFAULT_SPLITS = {"imagenet2012": "validation", "imagenet2012_real": "validation",
                  "imagenet2012_subset": "validation"}
_WNID = re.compile(r"^n\d{8}$")


def dataset_kind(name: str) -> str:
  """"synthetic", a PREFIXES kind ("wds", "imagefolder", "csv", "files"), "wds" for .tar
  patterns, or "tfds"."""
  if name == "synthetic":
    return "synthetic"
  for prefix, kind in PREFIXES.items():
    if name.startswith(prefix):
      return kind
  if ".tar" in name:
    return "wds"
  return "tfds"


def dataset_path(name: str) -> str:
  """The path of a `kind:PATH` dataset (a bare .tar pattern is its own path)."""
  for prefix in PREFIXES:
    if name.startswith(prefix):
      return name[len(prefix):]
  return name


def default_split(name: str) -> str:
  return DEFAULT_SPLITS.get(name.split(":")[0].split("/")[0], "test")


def imagefolder_root(name: str, split: str) -> str:
  """PATH/split when that folder exists (a tree of split folders), else PATH itself."""
  path = dataset_path(name)
  nested = os.path.join(path, split)
  return nested if split and os.path.isdir(nested) else path


def data_config(name: str, split: str, data_dir: Optional[str], seed: int = 0,
                captions_per_image: int = 5, classnames: Optional[list] = None):
  """The config.data fields `clip_jax.data.make_eval_iterator` reads."""
  kind = dataset_kind(name)
  if kind == "imagefolder":
    path = imagefolder_root(name, split)
  else:
    path = dataset_path(name) if kind != "tfds" and kind != "synthetic" else ""
  return ml_collections.ConfigDict({
      "seed": seed,
      "data": {
          "source": kind, "name": name if kind == "tfds" else "",
          "path": path, "split": split,
          "data_dir": data_dir, "num_workers": 0, "shuffle_buffer": 1,
          "resample_shards": False, "min_scale": 1.0, "max_scale": 1.0,
          "image_dtype": "float32", "captions_per_image": captions_per_image,
          "classnames": [str(c) for c in classnames] if classnames else [],
      },
  })


def validate_dataset(name: str, split: str, data_dir: Optional[str],
                     train: bool = False) -> None:
  """ValueError (one line) for an unknown or unprepared dataset, before the model loads.

  train: `split` is a probe's training split (an image folder needs it as PATH/split).
  """
  kind = dataset_kind(name)
  if kind == "synthetic":
    return
  if kind == "imagefolder":
    from clip_jax.data import imagefolder
    path = dataset_path(name)
    if train and not os.path.isdir(os.path.join(path, split)):
      raise ValueError(f"a linear probe on image folders trains on {path}/{split}/<class>/, "
                       "which does not exist; keep the splits as sub-folders (or pass "
                       "--train_split)")
    if not os.path.isdir(os.path.join(path, split)) and os.path.isdir(os.path.join(path, "train")):
      raise ValueError(f"image folder {path} holds split folders "
                       f"({', '.join(imagefolder.class_folders(path))}) but no {split!r}; pass "
                       "--split")
    imagefolder.validate(imagefolder_root(name, split))
    return
  from clip_jax.data import validate_data_config
  try:
    validate_data_config(data_config(name, split, data_dir))
  except ValueError as e:
    if kind == "tfds" and "not a known TFDS dataset" in str(e):
      raise ValueError(f"unknown dataset {name!r}; known: synthetic, a TFDS dataset name "
                       f"(imagenet2012, cifar10, oxford_iiit_pet, coco_captions, ...), "
                       f"wds shards (wds:/path/shards-{{00000..00009}}.tar), class folders "
                       f"(imagefolder:/path/val), a CSV/TSV of image paths and captions "
                       f"(csv:/path/val.tsv) or an img2dataset files tree (files:/path)") from None
    raise


def tfds_classnames(name: str, split: str, data_dir: Optional[str]) -> Optional[list[str]]:
  """The TFDS label names (None without a ClassLabel feature)."""
  from clip_jax.data import tfds_source
  return tfds_source.TfdsSource(name, split, data_dir).classnames


@dataclasses.dataclass(frozen=True)
class LabelSpace:
  """How a dataset's labels meet a zero-shot classifier.

  The classifier is built over (classnames, templates), cached under `prompts_key`; its
  `columns` (all when None) are kept, in order, and dataset label l scores against kept
  column label_map[l] (l itself when label_map is None; -1 marks labels outside the set).
  """
  prompts_key: str
  classnames: tuple
  templates: tuple
  columns: Optional[tuple] = None
  label_map: Optional[tuple] = None

  @property
  def names(self) -> list:
    """The class names of the kept columns, in column order."""
    if self.columns is None:
      return list(self.classnames)
    return [self.classnames[i] for i in self.columns]

  def restrict(self, classifier: np.ndarray) -> np.ndarray:
    return classifier if self.columns is None else classifier[:, list(self.columns)]

  def map_labels(self, labels: np.ndarray, dataset: str) -> np.ndarray:
    labels = np.asarray(labels, np.int64)
    if self.label_map is None:
      return labels
    mapped = np.asarray(self.label_map, np.int64)[labels]
    if np.any(mapped < 0):
      outside = sorted(set(labels[mapped < 0].tolist()))[:5]
      raise ValueError(f"dataset {dataset!r} has labels {outside} "
                       f"outside its {len(self.names)} evaluated classes")
    return mapped


def _imagenet_space(columns: Optional[tuple] = None, label_map: Optional[tuple] = None):
  from clip_jax.evaluate import registry
  prompts = registry.get_prompts("imagenet")
  return LabelSpace("imagenet", prompts.classnames, prompts.templates, columns, label_map)


def _imagefolder_space(name: str, split: str, classnames_key: Optional[str]) -> LabelSpace:
  from clip_jax.data import imagefolder
  from clip_jax.evaluate import registry
  root = imagefolder_root(name, split)
  imagefolder.validate(root)
  folders = imagefolder.class_folders(root)
  if classnames_key:
    prompts = registry.get_prompts(classnames_key)
    if len(prompts.classnames) != len(folders):
      raise ValueError(f"image folder {root} has {len(folders)} class sub-folders but "
                       f"--classnames {classnames_key} has {len(prompts.classnames)} classes")
    # Folders named as the registry's classes match by name; others take its order.
    names = registry.align_classnames(prompts.classnames, [f.replace("_", " ") for f in folders])
    return LabelSpace(registry.resolve(classnames_key), tuple(names), prompts.templates)
  wnids = registry.imagenet_wnids()
  if all(_WNID.match(f) for f in folders):
    index = {w: i for i, w in enumerate(wnids)}
    unknown = [f for f in folders if f not in index]
    if unknown:
      raise ValueError(f"image folder {root}: {unknown[0]} (and {len(unknown) - 1} more) are "
                       "WordNet ids outside ImageNet-1k's 1000 classes")
    columns = tuple(index[f] for f in folders)
    return _imagenet_space(None if columns == tuple(range(len(wnids))) else columns)
  # Plain folder names are the class names, with ImageNet's 80 generic templates.
  names = tuple(f.replace("_", " ") for f in folders)
  return LabelSpace(f"imagefolder:{os.path.abspath(root)}", names,
                    registry.get_prompts("imagenet").templates)


def label_space(name: str, split: str, data_dir: Optional[str],
                classnames_key: Optional[str] = None) -> LabelSpace:
  """The zero-shot label space of a dataset (see LabelSpace)."""
  from clip_jax.evaluate import registry
  kind = dataset_kind(name)
  if kind == "imagefolder":
    return _imagefolder_space(name, split, classnames_key)
  key = registry.resolve(classnames_key or name)
  if key in registry.IMAGENET_SUBSETS:
    columns = registry.imagenet_subset_columns(key)
    if kind == "tfds":
      # TFDS imagenet_a / imagenet_r label in the 1000 ImageNet classes: map to the subset.
      label_map = np.full(len(registry.imagenet_wnids()), -1, np.int64)
      label_map[list(columns)] = np.arange(len(columns))
      return _imagenet_space(columns, tuple(int(x) for x in label_map))
    return _imagenet_space(columns)
  prompts = registry.get_prompts(key)
  if key == "imagenet":
    return _imagenet_space()
  if kind == "synthetic":
    return LabelSpace(key, prompts.classnames, prompts.templates)
  label_names = tfds_classnames(name, split, data_dir)
  if label_names is None:
    raise ValueError(f"TFDS dataset {name!r} has no class labels; use --task retrieval")
  classnames = registry.align_classnames(prompts.classnames, label_names)
  return LabelSpace(key, tuple(classnames), prompts.templates)


def eval_batches(name: str, split: str, data_dir: Optional[str], *, image_size: int,
                 local_batch: int, num_examples: Optional[int], seed: int = 0,
                 all_captions: bool = False, captions_per_image: int = 5,
                 classnames: Optional[list] = None):
  """Process-local batches {"images", "tokens", "labels", "mask"} of one pass.

  all_captions: "captions" (every caption of each image) instead of "tokens"; the
  synthetic set then has captions_per_image distinct captions per image.
  classnames: image folders' captions ("a photo of a {name}.") use these names.
  """
  from clip_jax.data import make_eval_iterator
  return make_eval_iterator(
      data_config(name, split, data_dir, seed, captions_per_image, classnames),
      image_size=image_size, batch_size=local_batch, num_examples=num_examples,
      all_captions=all_captions)
