"""Prompt registry: class names and prompt templates of zero-shot datasets.

ImageNet (1000 OpenAI class names, 80 templates) and the 26 datasets of OpenAI's
prompts.md come from the package assets (MIT, see clip_jax/assets/LICENSE_openai_clip);
the synthetic set's come from `clip_jax.data.synthetic`. Keys are the dataset names of
prompts.md lower-cased without punctuation ("oxfordpets", "facialemotionrecognition2013");
TFDS names ("imagenet2012", "oxford_iiit_pet", "eurosat/rgb", ...) resolve to them.
ImageNet-A and ImageNet-R ("imageneta", "imagenetr") are the 200-class subsets of ImageNet's
names (WordNet ids in clip_jax/assets/imagenet_wnids.json) with its 80 templates.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import re
from typing import Sequence, Union

# A class is one name, or several synonyms whose prompts are averaged (FER2013).
ClassName = Union[str, Sequence[str]]

IMAGENET_ASSET = "imagenet_zeroshot.json"
PROMPTS_ASSET = "zeroshot_prompts.json"
WNIDS_ASSET = "imagenet_wnids.json"
# The suite's ImageNet and its distribution-shifted variants (the summary: each and their mean
# against ImageNet), as TFDS names.
IMAGENET = "imagenet2012"
IMAGENET_VARIANTS = ("imagenet_v2", "imagenet_sketch", "imagenet_a", "imagenet_r")
# ImageNet variants over a subset of the 1000 classes: registry key -> key in WNIDS_ASSET.
IMAGENET_SUBSETS = {"imageneta": "imagenet_a", "imagenetr": "imagenet_r"}

# TFDS (and common) names -> registry keys, where the label set is the prompt set.
ALIASES = {
    "imagenet2012": "imagenet",
    "imagenet2012real": "imagenet",
    "imagenet2012subset": "imagenet",
    "imagenetv2": "imagenet",
    "imagenetsketch": "imagenet",
    "imagenet1k": "imagenet",
    "oxfordiiitpet": "oxfordpets",
    "pets": "oxfordpets",
    "oxfordflowers102": "flowers102",
    "flowers": "flowers102",
    "cars196": "stanfordcars",
    "cars": "stanfordcars",
    "dtd": "describabletextures",
    "fer2013": "facialemotionrecognition2013",
    "fgvcaircraft": "fgvcaircraft",
    "aircraft": "fgvcaircraft",
    "patchcamelyon": "patchcamelyon",
    "pcam": "patchcamelyon",
    "voc2007": "pascalvoc2007",
    "clevrcount": "clevrcounts",
    "country211": "country211",
}


@dataclasses.dataclass(frozen=True)
class Prompts:
  classnames: tuple   # str per class, or a tuple of synonyms
  templates: tuple    # strings with "{}" where the class name goes


def _key(name: str) -> str:
  # "eurosat/rgb:2.0.0" -> "eurosat"; "Oxford-IIIT_Pet" -> "oxfordiiitpet".
  base = name.split("/")[0].split(":")[0]
  return re.sub(r"[^a-z0-9]", "", base.lower())


def _freeze_classes(classes) -> tuple:
  return tuple(c if isinstance(c, str) else tuple(c) for c in classes)


@functools.lru_cache(maxsize=None)
def _asset_prompts() -> dict[str, Prompts]:
  from clip_jax.assets import asset_path
  registry = {}
  with open(asset_path(PROMPTS_ASSET)) as f:
    for name, entry in json.load(f).items():
      registry[_key(name)] = Prompts(_freeze_classes(entry["classes"]), tuple(entry["templates"]))
  with open(asset_path(IMAGENET_ASSET)) as f:
    entry = json.load(f)
  registry["imagenet"] = Prompts(_freeze_classes(entry["classes"]), tuple(entry["templates"]))
  for key in IMAGENET_SUBSETS:
    columns = imagenet_subset_columns(key)
    registry[key] = Prompts(tuple(registry["imagenet"].classnames[i] for i in columns),
                            registry["imagenet"].templates)
  return registry


@functools.lru_cache(maxsize=None)
def _wnids() -> dict:
  from clip_jax.assets import asset_path
  with open(asset_path(WNIDS_ASSET)) as f:
    return json.load(f)


def imagenet_wnids() -> tuple[str, ...]:
  """The 1000 ImageNet WordNet ids, sorted: the class order of the "imagenet" prompts."""
  return tuple(_wnids()["imagenet"])


def imagenet_subset_columns(name: str) -> tuple[int, ...]:
  """Indices into the 1000 ImageNet classes of a variant's classes ("imagenet_a", "imagenet_r")."""
  key = _key(name)
  if key not in IMAGENET_SUBSETS:
    raise ValueError(f"{name!r} is not an ImageNet class subset; known: "
                     f"{', '.join(IMAGENET_SUBSETS.values())}")
  index = {w: i for i, w in enumerate(imagenet_wnids())}
  return tuple(index[w] for w in _wnids()[IMAGENET_SUBSETS[key]])


def known_datasets() -> list[str]:
  """Registry keys, "synthetic" included."""
  return sorted(set(_asset_prompts()) | {"synthetic"})


def resolve(name: str) -> str:
  """The registry key of a dataset name (TFDS names included); ValueError if unknown."""
  key = _key(name)
  key = ALIASES.get(key, key)
  if key != "synthetic" and key not in _asset_prompts():
    raise ValueError(
        f"no zero-shot prompts for dataset {name!r}; known: {', '.join(known_datasets())} "
        f"(TFDS names: {', '.join(sorted(ALIASES))})")
  return key


def get_prompts(name: str) -> Prompts:
  """Class names and templates of a dataset (registry key, TFDS name or "synthetic")."""
  key = resolve(name)
  if key == "synthetic":
    from clip_jax.data.synthetic import zeroshot_eval_set
    # The class names and templates do not depend on the images drawn.
    _, _, classnames, templates = zeroshot_eval_set(0, 8, 0)
    return Prompts(_freeze_classes(classnames), tuple(templates))
  return _asset_prompts()[key]


def _norm_label(name: ClassName) -> str:
  first = name if isinstance(name, str) else name[0]
  return re.sub(r"[\s_]+", " ", first).strip().lower()


def align_classnames(classnames: Sequence[ClassName], label_names: Sequence[str]) -> list:
  """Orders prompt class names as a dataset's integer labels.

  When the dataset's label names are the prompt names in another order (TFDS
  oxford_iiit_pet sorts case-insensitively, prompts.md by ASCII), they are matched by
  name; otherwise (e.g. ImageNet's WordNet ids, CIFAR's digits) the order is positional.
  """
  classnames = list(classnames)
  if len(classnames) != len(label_names):
    raise ValueError(
        f"the dataset has {len(label_names)} classes but the prompt registry has "
        f"{len(classnames)}; pass class names that match the dataset's labels")
  by_name = {_norm_label(c): c for c in classnames}
  wanted = [_norm_label(n) for n in label_names]
  if len(by_name) == len(classnames) and sorted(by_name) == sorted(wanted):
    return [by_name[n] for n in wanted]
  return classnames
