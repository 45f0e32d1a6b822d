"""Image-text retrieval recall@k on sets with several captions per image (COCO, Flickr)."""
from __future__ import annotations

from typing import Sequence

import numpy as np

RECALL_KS = (1, 5, 10)


def _normalize(x):
  x = np.asarray(x, np.float64)
  return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), 1e-12)


def _positions(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
  """0-based rank of scores[i, targets[i]] in row i (ties: lower index ranks first, as a stable sort)."""
  target_scores = np.take_along_axis(scores, targets[:, None], axis=1)
  columns = np.arange(scores.shape[1])[None]
  ahead = (scores > target_scores) | ((scores == target_scores) & (columns < targets[:, None]))
  return ahead.sum(axis=1)


def retrieval_metrics(image_features: np.ndarray, text_features: np.ndarray,
                      text_to_image: np.ndarray, ks: Sequence[int] = RECALL_KS,
                      chunk_size: int = 1024) -> dict[str, float]:
  """Recall@k both ways, named as CLIP_benchmark does.

  Args:
    image_features: [num_images, embed].
    text_features: [num_texts, embed].
    text_to_image: [num_texts] int, the index of the image each caption describes.
    ks: the k of recall@k.
    chunk_size: query rows scored at once (bounds memory on large sets).

  Returns:
    "image_retrieval_recall@k": fraction of captions whose image is among the k images
    most similar to it (text->image); "text_retrieval_recall@k": fraction of images with
    at least one of their captions among the k most similar captions (image->text).
  """
  images = _normalize(image_features)
  texts = _normalize(text_features)
  text_to_image = np.asarray(text_to_image, np.int64)
  num_images, num_texts = images.shape[0], texts.shape[0]
  if text_to_image.shape != (num_texts,):
    raise ValueError(f"text_to_image must have one image index per text ({num_texts}), "
                     f"got shape {text_to_image.shape}")
  if num_texts and (text_to_image.min() < 0 or text_to_image.max() >= num_images):
    raise ValueError(f"text_to_image indices must be in [0, {num_images})")
  captions_per_image = np.bincount(text_to_image, minlength=num_images)
  if np.any(captions_per_image == 0):
    missing = int(np.flatnonzero(captions_per_image == 0)[0])
    raise ValueError(f"image {missing} has no caption; every image needs at least one")

  # text -> image: the rank of each caption's own image.
  t2i_rank = np.concatenate([
      _positions(texts[s:s + chunk_size] @ images.T, text_to_image[s:s + chunk_size])
      for s in range(0, num_texts, chunk_size)])
  # image -> text: the rank of each image's best caption (the best rank among its captions).
  i2t_rank = []
  for s in range(0, num_images, chunk_size):
    scores = images[s:s + chunk_size] @ texts.T
    own = text_to_image[None] == np.arange(s, s + scores.shape[0])[:, None]
    best_caption = np.argmax(np.where(own, scores, -np.inf), axis=1)  # first of ties
    i2t_rank.append(_positions(scores, best_caption))
  i2t_rank = np.concatenate(i2t_rank)

  metrics = {}
  for k in ks:
    metrics[f"image_retrieval_recall@{k}"] = float(np.mean(t2i_rank < k))
    metrics[f"text_retrieval_recall@{k}"] = float(np.mean(i2t_rank < k))
  return metrics
