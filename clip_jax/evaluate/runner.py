"""One loaded checkpoint, any number of (task, dataset) evaluations.

The model loads once; zero-shot classifiers are cached per (checkpoint, prompt set) so the
text tower encodes a dataset's class prompts once (every ImageNet-family set shares one),
and image features are kept per (dataset, split) so zero-shot and probes read them once.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Optional

import numpy as np

from clip_jax import storage

TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
         "linear_probe": "linear_probe"}
SYNTHETIC_DEFAULT_EXAMPLES = 1000
SYNTHETIC_DEFAULT_CAPTIONS = 5


@dataclasses.dataclass
class Options:
  """What one evaluation reads (the command line's flags)."""
  split: Optional[str] = None
  train_split: str = "train"
  data_dir: Optional[str] = None
  batch_size: int = 256
  num_examples: Optional[int] = None
  num_train_examples: Optional[int] = None
  captions_per_image: Optional[int] = None
  seed: int = 0
  classnames: Optional[str] = None   # a registry key naming image folders' classes
  shots: Optional[list] = None       # few-shot linear probe: k per class
  seeds: int = 1                     # few-shot draws per k
  progress: bool = False             # a bar over each pass's batches


def checkpoint_id(path: str) -> str:
  # Path plus modification time: a rewritten checkpoint never reuses a cached classifier.
  if storage.is_remote(path):  # an object store: the newest time of its top-level entries
    import fsspec  # pylint: disable=g-import-not-at-top
    fs, root = fsspec.core.url_to_fs(path)
    entries = fs.ls(root, detail=True)
    stamp = max((str(e.get("updated") or e.get("mtime") or "") for e in entries), default="")
    return f"{path}@{len(entries)}:{stamp}"
  path = os.path.abspath(path)
  return f"{path}@{os.path.getmtime(path)}"


def _first_name(name) -> str:
  return name if isinstance(name, str) else name[0]


class Evaluator:
  """Evaluates tasks on datasets with one checkpoint."""

  def __init__(self, path: str, cache_dir: Optional[str] = None, weights: str = "auto"):
    import jax
    from jax.sharding import Mesh

    from clip_jax.checkpoint import restore_params
    from clip_jax.evaluate import zeroshot
    from clip_jax.models import create_model

    self.path = path
    self.params, self.model_config = restore_params(path, weights)
    self.model = create_model(self.model_config)
    self.mesh = Mesh(np.asarray(jax.devices()), ("data",))
    self.image_size = self.model_config.vision.image_size
    self.cache = zeroshot.ClassifierCache(cache_dir)
    # The trained weights of a checkpoint with an EMA are another model: another cache key.
    self.checkpoint_id = checkpoint_id(path) + ("#params" if weights == "params" else "")
    self._features: dict = {}

  def _local_batch(self, batch_size: int) -> int:
    import jax
    local = -(-batch_size // jax.process_count())
    return -(-local // jax.local_device_count()) * jax.local_device_count()

  def _stream(self, dataset: str, split: str, num: Optional[int], opts: Options,
              classnames=None) -> dict:
    """Image features and labels of one pass, kept for the next task on the same data."""
    from clip_jax.evaluate import datasets, features
    key = (dataset, split, num, opts.data_dir, opts.seed)
    if key not in self._features:
      batches = datasets.eval_batches(
          dataset, split, opts.data_dir, image_size=self.image_size,
          local_batch=self._local_batch(opts.batch_size), num_examples=num, seed=opts.seed,
          classnames=[_first_name(c) for c in classnames] if classnames else None)
      batches = _with_progress(batches, f"{dataset} {split}", opts.progress)
      self._features[key] = features.compute_features_from_batches(
          self.model, self.params, self.mesh, batches, encode={"images": "encode_image"})
    return self._features[key]

  def _synthetic_set(self, num: int, seed: int):
    from clip_jax.data.synthetic import zeroshot_eval_set
    return zeroshot_eval_set(num, self.image_size, seed)

  def classifier(self, space, batch_size: int) -> np.ndarray:
    """The zero-shot classifier of a label space, its columns restricted (cached)."""
    from clip_jax.evaluate import features, zeroshot
    full = self.cache.get_or_build(
        self.checkpoint_id, space.prompts_key, space.classnames, space.templates,
        lambda: zeroshot.build_classifier(
            features.encode_text_fn(self.model, self.params, self.mesh, batch_size),
            space.classnames, space.templates))
    return space.restrict(full)

  def run(self, task: str, dataset: str, opts: Options) -> dict:
    """The CLIP_benchmark-shaped result of one task on one dataset."""
    from clip_jax.evaluate import datasets
    kind = datasets.dataset_kind(dataset)
    split = opts.split or datasets.default_split(dataset)
    num_examples = opts.num_examples
    if kind == "synthetic" and num_examples is None:
      num_examples = SYNTHETIC_DEFAULT_EXAMPLES
    extra = {}
    if task == "zeroshot":
      metrics, num_examples = self._zeroshot(dataset, kind, split, num_examples, opts)
    elif task == "retrieval":
      metrics, num_examples, extra["num_texts"] = self._retrieval(dataset, split, num_examples,
                                                                  opts)
    elif task == "linear_probe":
      metrics, num_examples, fewshot = self._linear_probe(dataset, kind, split, num_examples,
                                                          opts)
      if fewshot is not None:
        extra["fewshot"] = fewshot
    else:
      raise ValueError(f"unknown task {task!r}; known: {', '.join(TASKS)}")
    return {"dataset": dataset, "model": self.model_config.name, "task": TASKS[task],
            "metrics": metrics,
            "checkpoint": storage.absolute(self.path),
            "split": "synthetic" if kind == "synthetic" else split,
            "num_examples": int(num_examples), **extra}

  def _zeroshot(self, dataset, kind, split, num_examples, opts):
    from clip_jax.evaluate import datasets, zeroshot
    space = datasets.label_space(dataset, split, opts.data_dir, opts.classnames)
    classifier = self.classifier(space, opts.batch_size)
    if kind == "synthetic":
      from clip_jax.evaluate import features
      images, labels, _, _ = self._synthetic_set(num_examples, opts.seed)
      image_features = features.compute_features(self.model, self.params, self.mesh, images,
                                                 opts.batch_size)
    else:
      out = self._stream(dataset, split, num_examples, opts, space.names)
      image_features, labels = out["images"], space.map_labels(out["labels"], dataset)
      num_examples = len(labels)
    metrics = zeroshot.zeroshot_metrics(image_features, classifier, labels)
    return {"acc1": metrics["top1"], "acc5": metrics["top5"],
            "mean_per_class_recall": metrics["mean_per_class_recall"]}, num_examples

  def _retrieval(self, dataset, split, num_examples, opts):
    from clip_jax.evaluate import datasets, features, retrieval
    # Every caption of every image: text_to_image says which image each one describes.
    batches = datasets.eval_batches(
        dataset, split, opts.data_dir, image_size=self.image_size,
        local_batch=self._local_batch(opts.batch_size), num_examples=num_examples,
        seed=opts.seed, all_captions=True,
        captions_per_image=opts.captions_per_image or SYNTHETIC_DEFAULT_CAPTIONS)
    batches = _with_progress(batches, f"{dataset} {split}", opts.progress)
    out = features.compute_retrieval_features(
        self.model, self.params, self.mesh, batches, opts.batch_size,
        context_length=self.model_config.text.context_length)
    metrics = retrieval.retrieval_metrics(out["images"], out["texts"], out["text_to_image"])
    return metrics, len(out["images"]), len(out["texts"])

  def _linear_probe(self, dataset, kind, split, num_examples, opts):
    from clip_jax.evaluate import datasets, features
    from clip_jax.evaluate.fewshot import fewshot_probe
    from clip_jax.evaluate.linear_probe import linear_probe
    classnames = None
    if kind == "synthetic":
      num_train = opts.num_train_examples or num_examples
      train_images, train_labels, classnames, _ = self._synthetic_set(num_train, opts.seed + 1)
      test_images, test_labels, _, _ = self._synthetic_set(num_examples, opts.seed)
      train_features = features.compute_features(self.model, self.params, self.mesh,
                                                 train_images, opts.batch_size)
      test_features = features.compute_features(self.model, self.params, self.mesh,
                                                test_images, opts.batch_size)
      num_classes = len(classnames)
    else:
      if kind == "imagefolder":
        classnames = datasets.label_space(dataset, split, opts.data_dir, opts.classnames).names
      train = self._stream(dataset, opts.train_split, opts.num_train_examples, opts, classnames)
      test = self._stream(dataset, split, num_examples, opts, classnames)
      train_features, train_labels = train["images"], train["labels"]
      test_features, test_labels = test["images"], test["labels"]
      num_classes = len(classnames) if classnames else None
    if not opts.shots:
      metrics = linear_probe(train_features, train_labels, test_features, test_labels,
                             num_classes=num_classes, seed=opts.seed)
      return metrics, len(test_labels), None
    if num_classes is None:
      num_classes = int(max(np.max(train_labels), np.max(test_labels))) + 1
    seeds = [opts.seed + i for i in range(opts.seeds)]
    metrics, per_seed = fewshot_probe(train_features, train_labels, test_features, test_labels,
                                      shots=opts.shots, seeds=seeds, num_classes=num_classes,
                                      classnames=classnames)
    return metrics, len(test_labels), {"shots": list(opts.shots), "seeds": seeds,
                                       "per_seed": per_seed}


def _with_progress(batches, description: str, enabled: bool):
  if not enabled:
    return batches
  import jax
  from tqdm import tqdm
  return tqdm(batches, desc=description, unit="batch", leave=False,
              disable=jax.process_index() != 0)
