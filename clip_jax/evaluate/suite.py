"""Benchmark suites: many (task, dataset) evaluations of one checkpoint, never stopped by a
missing dataset.

A suite is a built-in name (SUITES) or a comma list of `task:dataset` items. Each built-in
dataset is looked for as class folders under --data_dir first (`DIR/<folder>[/<split>]`),
then as a prepared TFDS dataset in --data_dir; a dataset found neither way is listed in
the summary as skipped, with how to prepare it.
"""
from __future__ import annotations

import dataclasses
import json
import os
import re
from typing import Optional

from clip_jax import storage
from clip_jax.evaluate import runner
from clip_jax.evaluate.registry import IMAGENET, IMAGENET_VARIANTS  # noqa: F401 (suite.IMAGENET)


@dataclasses.dataclass(frozen=True)
class SuiteDataset:
  name: str                        # the row name in the summary (a TFDS name where one exists)
  tfds: Optional[str]              # TFDS name, or None
  split: str                       # evaluation split (TFDS split; a sub-folder of a folder)
  folders: tuple = ()              # folder names tried under --data_dir
  prompts: Optional[str] = None    # registry key naming the classes of plain class folders


def _imagenet_family():
  return (
      SuiteDataset("imagenet2012", "imagenet2012", "validation",
                   ("imagenet/val", "imagenet2012/val", "imagenet/validation", "imagenet-val")),
      SuiteDataset("imagenet_v2", "imagenet_v2", "test",
                   ("imagenetv2", "imagenet_v2", "imagenetv2-matched-frequency-format-val")),
      SuiteDataset("imagenet_sketch", "imagenet_sketch", "test",
                   ("imagenet-sketch", "imagenet_sketch", "sketch")),
      SuiteDataset("imagenet_a", "imagenet_a", "test", ("imagenet-a", "imagenet_a")),
      SuiteDataset("imagenet_r", "imagenet_r", "test", ("imagenet-r", "imagenet_r")),
  )


# The CLIP paper's zero-shot datasets that TFDS provides (or class folders of the same name).
_PAPER = (
    SuiteDataset("food101", "food101", "validation", ("food101", "food-101"), "food101"),
    SuiteDataset("cifar10", "cifar10", "test", ("cifar10",), "cifar10"),
    SuiteDataset("cifar100", "cifar100", "test", ("cifar100",), "cifar100"),
    SuiteDataset("sun397", "sun397", "test", ("sun397",), "sun397"),
    SuiteDataset("cars196", "cars196", "test", ("stanford_cars", "cars196"), "stanfordcars"),
    SuiteDataset("dtd", "dtd", "test", ("dtd",), "describabletextures"),
    SuiteDataset("oxford_iiit_pet", "oxford_iiit_pet", "test", ("oxford_iiit_pet", "pets"),
                 "oxfordpets"),
    SuiteDataset("caltech101", "caltech101", "test", ("caltech101",), "caltech101"),
    SuiteDataset("oxford_flowers102", "oxford_flowers102", "test", ("flowers102",),
                 "flowers102"),
    SuiteDataset("mnist", "mnist", "test", ("mnist",), "mnist"),
    SuiteDataset("stl10", "stl10", "test", ("stl10",), "stl10"),
    SuiteDataset("patch_camelyon", "patch_camelyon", "test", ("patch_camelyon", "pcam"),
                 "patchcamelyon"),
    SuiteDataset("fer2013", None, "test", ("fer2013",), "facialemotionrecognition2013"),
    SuiteDataset("gtsrb", None, "test", ("gtsrb",), "gtsrb"),
    SuiteDataset("country211", None, "test", ("country211",), "country211"),
    SuiteDataset("birdsnap", None, "test", ("birdsnap",), "birdsnap"),
    SuiteDataset("fgvc_aircraft", None, "test", ("fgvc_aircraft", "aircraft"), "fgvcaircraft"),
    SuiteDataset("resisc45", None, "test", ("resisc45",), "resisc45"),
    SuiteDataset("eurosat", None, "test", ("eurosat",), "eurosat"),
)

SUITES = {
    "paper_zeroshot": [("zeroshot", d) for d in _imagenet_family()[:1] + _PAPER],
    "robustness": [("zeroshot", d) for d in _imagenet_family()],
    "smoke": [("zeroshot", SuiteDataset("synthetic", None, "test")),
              ("linear_probe", SuiteDataset("synthetic", None, "test")),
              ("retrieval", SuiteDataset("synthetic", None, "test"))],
}


@dataclasses.dataclass
class Item:
  """One evaluation of a suite: its row name, the dataset as the evaluator reads it."""
  task: str
  name: str
  dataset: Optional[str]          # None: skipped
  split: Optional[str] = None
  classnames: Optional[str] = None
  skip_reason: str = ""
  how_to: str = ""


def split_items(text: str) -> list[str]:
  """Splits a comma list, keeping commas inside {...} (wds brace patterns) together."""
  items, depth, current = [], 0, ""
  for char in text:
    depth += {"{": 1, "}": -1}.get(char, 0)
    if char == "," and depth == 0:
      items.append(current)
      current = ""
    else:
      current += char
  items.append(current)
  return [i.strip() for i in items if i.strip()]


def parse_suite(text: str) -> list[tuple[str, SuiteDataset]]:
  """A built-in suite name, or `task:dataset,task:dataset,...`; ValueError (one line) if bad."""
  if text in SUITES:
    return list(SUITES[text])
  out = []
  for item in split_items(text):
    task, sep, dataset = item.partition(":")
    if not sep or not dataset:
      raise ValueError(f"--suite item {item!r} is not task:dataset; use a built-in suite "
                       f"({', '.join(SUITES)}) or e.g. zeroshot:imagenet2012,"
                       f"linear_probe:cifar10")
    if task not in runner.TASKS:
      raise ValueError(f"--suite item {item!r}: unknown task {task!r}; known: "
                       f"{', '.join(runner.TASKS)}")
    out.append((task, SuiteDataset(dataset, None, "")))
  return out


def _tfds_hint(name: str, data_dir: Optional[str]) -> str:
  return (f"tfds build {name} --data_dir={data_dir or '~/tensorflow_datasets'} "
          "--file_format=array_record")


def resolve(task: str, entry: SuiteDataset, opts: runner.Options) -> Item:
  """Where a suite dataset is read from, or why it is skipped and how to prepare it."""
  from clip_jax.evaluate import datasets
  data_dir = opts.data_dir
  if entry.tfds is None and not entry.folders:
    # A user item: the dataset exactly as --dataset takes it.
    name = entry.name
    split = opts.split or datasets.default_split(name)
    try:
      datasets.validate_dataset(name, split, data_dir)
      if task == "linear_probe" and datasets.dataset_kind(name) != "synthetic":
        datasets.validate_dataset(name, opts.train_split, data_dir, train=True)
    except (ValueError, FileNotFoundError) as e:
      kind = datasets.dataset_kind(name)
      how = {"tfds": _tfds_hint(name, data_dir),
             "imagefolder": f"put images in {datasets.dataset_path(name)}/<class>/<image>.jpg",
             "wds": "write the shards (clip_jax.data.wds.write_shard) or fix the pattern"}
      return Item(task, name, None, skip_reason=" ".join(str(e).split()),
                  how_to=how.get(kind, ""))
    return Item(task, name, name, split)
  if entry.name == "synthetic":
    return Item(task, "synthetic", "synthetic", entry.split)
  for folder in entry.folders:
    root = os.path.join(data_dir or ".", folder)
    candidate = f"imagefolder:{root}"
    try:
      datasets.validate_dataset(candidate, entry.split, data_dir)
    except ValueError:
      continue
    if entry.prompts is None and not _wnid_folders(candidate, entry.split):
      continue  # an ImageNet set must be WordNet-id folders (not, e.g., train/ and val/)
    return Item(task, entry.name, candidate, entry.split, classnames=_folder_prompts(entry, root))
  reason = f"not found as class folders ({', '.join(entry.folders)} under {data_dir})"
  if entry.tfds is not None:
    try:
      datasets.validate_dataset(entry.tfds, entry.split, data_dir)
      return Item(task, entry.name, entry.tfds, entry.split)
    except (ValueError, FileNotFoundError) as e:
      reason = f"{reason}; TFDS: {' '.join(str(e).split())}"
  how = f"put class folders in {os.path.join(data_dir or '.', entry.folders[0])}/<class>/"
  if entry.tfds is not None:
    how = f"{_tfds_hint(entry.tfds, data_dir)}, or {how}"
  return Item(task, entry.name, None, skip_reason=reason, how_to=how)


def _wnid_folders(dataset: str, split: str) -> bool:
  from clip_jax.data import imagefolder
  from clip_jax.evaluate import datasets
  folders = imagefolder.class_folders(datasets.imagefolder_root(dataset, split))
  return all(re.match(r"^n\d{8}$", f) for f in folders)


def _folder_prompts(entry: SuiteDataset, root: str) -> Optional[str]:
  """The registry key for plain class folders of a built-in dataset (WordNet ids need none)."""
  if entry.prompts is None or _wnid_folders(f"imagefolder:{root}", entry.split):
    return None
  return entry.prompts


def slug(text: str) -> str:
  return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_") or "dataset"


def run_suite(evaluator: runner.Evaluator, suite: str, opts: runner.Options,
              output_dir: str, progress: bool = True) -> dict:
  """Runs every item, writes OUT/<dataset>_<task>.json and returns the summary dict."""
  import jax
  from tqdm import tqdm

  from clip_jax.evaluate import summary
  items = [resolve(task, entry, opts) for task, entry in parse_suite(suite)]
  primary = jax.process_index() == 0
  if primary and not storage.is_remote(output_dir):
    os.makedirs(output_dir, exist_ok=True)
  results, skipped = [], []
  bar = tqdm(items, desc="datasets", unit="dataset", disable=not (progress and primary))
  for item in bar:
    bar.set_postfix_str(f"{item.task}:{item.name}")
    if item.dataset is None:
      skipped.append({"dataset": item.name, "task": runner.TASKS[item.task],
                      "reason": item.skip_reason, "how_to": item.how_to})
      continue
    item_opts = dataclasses.replace(opts, split=item.split or opts.split,
                                    classnames=item.classnames or opts.classnames,
                                    progress=progress and primary)
    try:
      result = evaluator.run(item.task, item.dataset, item_opts)
    except (ValueError, FileNotFoundError) as e:
      skipped.append({"dataset": item.name, "task": runner.TASKS[item.task],
                      "reason": " ".join(str(e).split()), "how_to": ""})
      continue
    file_name = f"{slug(item.name)}_{item.task}.json"
    if primary:  # local or gs:// (clip_jax.storage)
      storage.write_text(storage.join(output_dir, file_name), json.dumps(result, indent=2) + "\n")
    results.append({"name": item.name, "file": file_name, "result": result})
  return summary.build(results, skipped, suite=suite, model=evaluator.model_config.name,
                       checkpoint=storage.absolute(evaluator.path))
