"""Image and text features over a device mesh, and the zero-shot evaluation built on them.

Every process holds the same evaluation arrays; each global batch is split over the
mesh's batch axes (every device of every host computes a slice), the last batch is
padded to full size and the padding dropped, and the features are gathered back to
every process. Per-example results therefore do not depend on the number of devices.
"""
from __future__ import annotations

import functools
from typing import Iterable, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import NamedSharding, PartitionSpec as P

from clip_jax import distributed
from clip_jax.models import CLIP, OPENAI_MEAN, OPENAI_STD, l2_normalize, model_variables
from clip_jax.evaluate import zeroshot as zs

METHODS = ("encode_image", "encode_text")


def batch_sharding(mesh: jax.sharding.Mesh) -> NamedSharding:
  """The leading dim split over the mesh's batch axes (those of `clip_jax.sharding.BATCH_AXES` it has)."""
  from clip_jax.sharding import BATCH_AXES
  axes = tuple(a for a in BATCH_AXES if a in mesh.axis_names)
  if not axes:
    raise ValueError(f"mesh axes {mesh.axis_names} include no batch axis; expected one of {BATCH_AXES}")
  return NamedSharding(mesh, P(axes))


def num_batch_shards(sharding: NamedSharding) -> int:
  """How many pieces the leading (batch) dimension is cut into."""
  axes = sharding.spec[0] if len(sharding.spec) else None
  if axes is None:
    return 1
  axes = (axes,) if isinstance(axes, str) else tuple(axes)
  return int(np.prod([sharding.mesh.shape[a] for a in axes]))


@functools.lru_cache(maxsize=32)
def _encoder(model: CLIP, method: str, normalize: bool, sharding: NamedSharding):
  mean = np.asarray(OPENAI_MEAN, np.float32)
  std = np.asarray(OPENAI_STD, np.float32)

  def encode(params, inputs):
    if method == "encode_image" and inputs.dtype == jnp.uint8:
      # Raw pixels: scale to [0, 1] and standardise with the OpenAI statistics.
      inputs = (inputs.astype(jnp.float32) / 255.0 - mean) / std
    features = model.apply(model_variables(params), inputs, method=method)
    return l2_normalize(features) if normalize else features.astype(jnp.float32)

  return jax.jit(encode, out_shardings=sharding)


def _place_params(params, mesh: jax.sharding.Mesh):
  """Leaves already on the mesh's devices stay put; others are replicated over the mesh."""
  mesh_devices = set(mesh.devices.flat)
  replicated = NamedSharding(mesh, P())

  def place(x):
    if isinstance(x, jax.Array) and x.sharding.device_set == mesh_devices:
      return x
    return jax.device_put(x, replicated)

  return jax.tree_util.tree_map(place, nn.meta.unbox(params))


def _local_rows(sharding: NamedSharding, global_shape: tuple) -> np.ndarray:
  """Rows of a global batch that this process feeds (in the order make_array_from_process_local_data expects)."""
  rows = set()
  for index in sharding.addressable_devices_indices_map(global_shape).values():
    rows.update(range(*index[0].indices(global_shape[0])))
  return np.asarray(sorted(rows), np.int64)


def compute_features(model: CLIP, params, mesh: jax.sharding.Mesh, inputs: np.ndarray,
                     batch_size: int, method: str = "encode_image",
                     normalize: bool = True) -> np.ndarray:
  """Features [N, embed] float32 of images (NHWC float, or uint8 pixels) or tokens [N, 77].

  Args:
    model: the CLIP module.
    params: its parameters (plain or boxed; sharded on the mesh or on the host).
    mesh: the device mesh; batches are split over its batch axes.
    inputs: the same full array on every process.
    batch_size: global batch, rounded up to a multiple of the batch shards.
    method: "encode_image" or "encode_text".
    normalize: L2-normalise the features.
  """
  if method not in METHODS:
    raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  inputs = np.asarray(inputs)
  num = inputs.shape[0]
  sharding = batch_sharding(mesh)
  shards = num_batch_shards(sharding)
  global_batch = -(-batch_size // shards) * shards
  global_batch = min(global_batch, -(-num // shards) * shards)  # no bigger than the data needs
  if num == 0:
    raise ValueError("no inputs to compute features of")
  encode = _encoder(model, method, normalize, sharding)
  params = _place_params(params, mesh)
  global_shape = (global_batch,) + inputs.shape[1:]
  rows = _local_rows(sharding, global_shape)

  outputs = []
  for start in range(0, num, global_batch):
    chunk = inputs[start:start + global_batch]
    if chunk.shape[0] < global_batch:
      pad = np.zeros((global_batch - chunk.shape[0],) + inputs.shape[1:], inputs.dtype)
      chunk = np.concatenate([chunk, pad])
    batch = jax.make_array_from_process_local_data(sharding, chunk[rows], global_shape)
    outputs.append(encode(params, batch))  # dispatched asynchronously; gathered below
  gathered = [np.asarray(multihost_utils.process_allgather(out, tiled=True)) for out in outputs]
  return np.concatenate(gathered)[:num]


def compute_features_from_batches(model: CLIP, params, mesh: jax.sharding.Mesh,
                                  batches: Iterable[dict], encode: dict[str, str],
                                  keep: Sequence[str] = ("labels",)) -> dict[str, np.ndarray]:
  """Features of a stream of process-local batches (e.g. `clip_jax.data.make_eval_iterator`).

  Each batch holds this process's rows of one global batch (all of the same size) and a
  "mask" [b] bool marking real rows. `encode` maps input keys to methods, e.g.
  {"images": "encode_image"}; the features come back under the same keys, with the `keep`
  arrays, gathered from every process in global order with the padding dropped.
  """
  sharding = batch_sharding(mesh)
  params = _place_params(params, mesh)
  outputs = {k: [] for k in list(encode) + list(keep) + ["mask"]}
  iterator = iter(batches)
  template = None
  while True:
    batch = next(iterator, None)
    # Processes may hold different numbers of batches: continue while any has one left.
    more = multihost_utils.process_allgather(np.int32(batch is not None))
    if not np.any(more):
      break
    if batch is None:  # this process is done: feed an all-padding batch
      batch = {k: np.zeros_like(v) for k, v in template.items()}
    template = batch
    local = len(batch["mask"])
    global_batch = local * jax.process_count()
    if global_batch % num_batch_shards(sharding):
      raise ValueError(f"the global eval batch {global_batch} is not a multiple of the "
                       f"{num_batch_shards(sharding)} batch shards of the mesh")
    for key, method in encode.items():
      fn = _encoder(model, method, True, sharding)
      array = jax.make_array_from_process_local_data(sharding, np.asarray(batch[key]))
      outputs[key].append(fn(params, array))
    for key in list(keep) + ["mask"]:
      outputs[key].append(jax.make_array_from_process_local_data(sharding, np.asarray(batch[key])))
  if not outputs["mask"]:
    raise ValueError("the evaluation data yielded no batches")
  gathered = {k: np.concatenate([np.asarray(multihost_utils.process_allgather(x, tiled=True))
                                 for x in v]) for k, v in outputs.items()}
  mask = gathered.pop("mask").astype(bool)
  return {k: v[mask] for k, v in gathered.items()}


def compute_retrieval_features(model: CLIP, params, mesh: jax.sharding.Mesh,
                               batches: Iterable[dict], batch_size: int,
                               context_length: int = 77) -> dict:
  """Image and text features of a retrieval set with any number of captions per image.

  Args:
    model, params, mesh: as for `compute_features`.
    batches: process-local batches with "images", "captions" ([b] object, each row the
      tuple of an image's captions) and "mask", e.g. `make_eval_iterator(all_captions=True)`.
    batch_size: global batch of the text encoder.
    context_length: tokens per caption.

  Returns:
    {"images" [num_images, embed], "texts" [num_texts, embed], "text_to_image" [num_texts]
    int (the image each caption describes), "captions" [num_texts] str}, the same on
    every process.
  """
  from clip_jax.tokenizer import tokenize  # pylint: disable=g-import-not-at-top
  process, processes = jax.process_index(), jax.process_count()
  local_captions = []

  def with_row_ids(stream):
    # Captions stay on the host; a row id (local row * processes + process) follows each
    # image through the device gather so its captions can be found again.
    for batch in stream:
      batch = dict(batch)
      rows = batch.pop("captions")
      start = len(local_captions)
      local_captions.extend(list(row) for row in rows)
      batch["caption_row"] = ((np.arange(start, start + len(rows)) * processes + process)
                              .astype(np.int32))
      yield batch

  out = compute_features_from_batches(model, params, mesh, with_row_ids(batches),
                                      encode={"images": "encode_image"}, keep=("caption_row",))
  captions_of = distributed.allgather_json(local_captions)
  captions, text_to_image = [], []
  for image, row in enumerate(out["caption_row"]):
    own = captions_of[row % processes][row // processes]
    captions.extend(own)
    text_to_image.extend([image] * len(own))
  if not captions:
    raise ValueError("the retrieval set has no captions")
  tokens = np.asarray(tokenize(captions, context_length=context_length, truncate=True), np.int32)
  texts = compute_features(model, params, mesh, tokens, batch_size, method="encode_text")
  return {"images": out["images"], "texts": texts,
          "text_to_image": np.asarray(text_to_image, np.int64), "captions": captions}


def encode_text_fn(model: CLIP, params, mesh: jax.sharding.Mesh, batch_size: int):
  """tokens -> normalised text features on the mesh (for `zeroshot.build_classifier`)."""
  return lambda tokens: compute_features(model, params, mesh, tokens, batch_size,
                                         method="encode_text")


def run_zeroshot(model: CLIP, params, mesh: jax.sharding.Mesh, images: np.ndarray,
                 labels: np.ndarray, classnames: Sequence, templates: Sequence[str],
                 batch_size: int, *, tokenize_fn=None,
                 cache: Optional[zs.ClassifierCache] = None, checkpoint_id: str = "",
                 dataset: str = "") -> dict[str, float]:
  """Zero-shot top1 / top5 / mean per-class recall of a prompt ensemble, on all devices.

  images: preprocessed float NHWC, or uint8 pixels (normalised with the OpenAI mean/std).
  With `cache`, the text classifier is reused per (checkpoint_id, dataset, prompts).
  """
  labels = np.asarray(labels)
  if labels.shape[0] != np.shape(images)[0]:
    raise ValueError(f"{np.shape(images)[0]} images but {labels.shape[0]} labels")

  def build():
    return zs.build_classifier(encode_text_fn(model, params, mesh, batch_size), classnames,
                               templates, tokenize_fn=tokenize_fn)

  if cache is not None:
    classifier = cache.get_or_build(checkpoint_id, dataset, classnames, templates, build)
  else:
    classifier = build()
  image_features = compute_features(model, params, mesh, images, batch_size)
  return zs.zeroshot_metrics(image_features, classifier, labels)
