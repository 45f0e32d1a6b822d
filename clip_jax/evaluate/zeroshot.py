"""Zero-shot classification: prompt-ensemble classifiers and their metrics."""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
from typing import Callable, Optional, Sequence

import numpy as np

from clip_jax.evaluate.registry import ClassName


def _normalize(x: np.ndarray, axis: int = -1) -> np.ndarray:
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=axis, keepdims=True), 1e-12)


def _synonyms(name: ClassName) -> list[str]:
  return [name] if isinstance(name, str) else list(name)


def prompt_texts(classnames: Sequence[ClassName], templates: Sequence[str]):
  """All prompts, and for each the index of its class (synonyms x templates per class)."""
  texts, owner = [], []
  for c, name in enumerate(classnames):
    for synonym in _synonyms(name):
      for template in templates:
        texts.append(template.format(synonym))
        owner.append(c)
  return texts, np.asarray(owner, np.int64)


def classifier_from_text_features(text_features: np.ndarray, owner: np.ndarray,
                                  num_classes: int) -> np.ndarray:
  """[embed, classes]: per class, the renormalised mean of its normalised prompt embeddings."""
  feats = _normalize(text_features)
  sums = np.zeros((num_classes, feats.shape[1]), np.float64)
  np.add.at(sums, owner, feats)
  counts = np.bincount(owner, minlength=num_classes)[:, None]
  return _normalize(sums / counts).T.astype(np.float32)


def build_classifier(encode_text_fn: Callable[[np.ndarray], np.ndarray],
                     classnames: Sequence[ClassName], templates: Sequence[str],
                     tokenize_fn: Optional[Callable] = None) -> np.ndarray:
  """The zero-shot classifier [embed, num_classes] of a prompt ensemble.

  Args:
    encode_text_fn: tokens [N, context] int32 -> text embeddings [N, embed].
    classnames: one name per class, or a list of synonyms (FER2013), each averaged over.
    templates: prompt strings with "{}" for the class name.
    tokenize_fn: texts -> tokens; default `clip_jax.tokenizer.tokenize`.
  """
  if not classnames or not templates:
    raise ValueError(f"need class names and templates, got {len(classnames)} class names "
                     f"and {len(templates)} templates")
  for template in templates:
    if "{}" not in template:
      raise ValueError(f"template {template!r} has no '{{}}' placeholder for the class name")
  if tokenize_fn is None:
    from clip_jax.tokenizer import tokenize as tokenize_fn
  texts, owner = prompt_texts(classnames, templates)
  text_features = np.asarray(encode_text_fn(np.asarray(tokenize_fn(texts), np.int32)))
  if text_features.shape[0] != len(texts):
    raise ValueError(f"encode_text_fn returned {text_features.shape[0]} embeddings for "
                     f"{len(texts)} prompts")
  return classifier_from_text_features(text_features, owner, len(classnames))


def topk_hits(logits: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
  """Whether each label is among the k largest logits (ties: lower class index first, as argmax)."""
  k = min(k, logits.shape[1])
  order = np.argsort(-logits, axis=1, kind="stable")[:, :k]
  return np.any(order == labels[:, None], axis=1)


def classification_metrics(logits: np.ndarray, labels: np.ndarray) -> dict[str, float]:
  """top1, top5 (capped at the number of classes) and mean per-class recall."""
  logits = np.asarray(logits)
  labels = np.asarray(labels).astype(np.int64)
  if logits.ndim != 2 or logits.shape[0] != labels.shape[0]:
    raise ValueError(f"logits {logits.shape} and labels {labels.shape} disagree")
  if labels.size == 0:
    raise ValueError("no examples to evaluate")
  if labels.min() < 0 or labels.max() >= logits.shape[1]:
    raise ValueError(f"labels must be in [0, {logits.shape[1]}), got [{labels.min()}, {labels.max()}]")
  top1 = topk_hits(logits, labels, 1)
  # Balanced accuracy over the classes present, as sklearn / CLIP_benchmark.
  present = np.unique(labels)
  recalls = [top1[labels == c].mean() for c in present]
  return {
      "top1": float(top1.mean()),
      "top5": float(topk_hits(logits, labels, 5).mean()),
      "mean_per_class_recall": float(np.mean(recalls)),
  }


def zeroshot_metrics(image_features: np.ndarray, classifier: np.ndarray,
                     labels: np.ndarray) -> dict[str, float]:
  """Metrics of image features [N, embed] against a classifier [embed, classes]."""
  image_features = np.asarray(image_features)
  classifier = np.asarray(classifier)
  if image_features.shape[1] != classifier.shape[0]:
    raise ValueError(f"image features have dim {image_features.shape[1]} but the classifier "
                     f"expects {classifier.shape[0]}")
  logits = _normalize(image_features) @ classifier.astype(np.float64)
  return classification_metrics(logits, labels)


class ClassifierCache:
  """Text classifiers per (checkpoint id, dataset), in memory and optionally on disk.

  The key also hashes the class names and templates, so edited prompts never hit a
  stale entry.
  """

  def __init__(self, directory: Optional[str | os.PathLike] = None):
    self.directory = pathlib.Path(directory) if directory else None
    self._memory: dict[str, np.ndarray] = {}

  @staticmethod
  def key(checkpoint_id: str, dataset: str, classnames, templates) -> str:
    prompts = json.dumps([[_synonyms(c) for c in classnames], list(templates)])
    digest = hashlib.sha256(prompts.encode()).hexdigest()[:16]
    return hashlib.sha256(f"{checkpoint_id}\0{dataset}\0{digest}".encode()).hexdigest()[:32]

  def get_or_build(self, checkpoint_id: str, dataset: str, classnames, templates,
                   build: Callable[[], np.ndarray]) -> np.ndarray:
    key = self.key(checkpoint_id, dataset, classnames, templates)
    if key in self._memory:
      return self._memory[key]
    path = self.directory / f"classifier_{key}.npy" if self.directory else None
    if path is not None and path.exists():
      classifier = np.load(path)
    else:
      classifier = np.asarray(build(), np.float32)
      if path is not None:
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}.npy")
        np.save(tmp, classifier)
        os.replace(tmp, path)  # atomic: concurrent readers never see half a file
    self._memory[key] = classifier
    return classifier
