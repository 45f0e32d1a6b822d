"""Embed a dataset, partition by partition, over the whole mesh: `clip_jax.embed.embed`.

Partition k (the dataset's samples [k * P, (k + 1) * P)) is cut into global batches; each
process reads and decodes its share of every batch (in threads), the model runs once per
batch on all devices (clip_jax.evaluate.features), and process 0 writes the partition's
embeddings and metadata and commits it to the manifest. A rerun skips the committed
partitions and computes the others exactly as an uninterrupted run would (the same rows
in the same batches), so its files are byte-identical to that run's.

A sample that cannot be read or decoded, or that has no caption when text is embedded, is
left out of the partition and named (key, reason) in the manifest.
"""
from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import re
import sys
import time
from typing import Optional, Sequence

import numpy as np

from clip_jax import storage
from clip_jax.embed import sources, store

MODALITIES = ("image", "text")
DTYPES = ("float16", "float32")
_ENCODE = {"image": ("images", "encode_image"), "text": ("tokens", "encode_text")}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError)

log = logging.getLogger("clip_jax.embed")


def parse_modalities(modalities) -> tuple[str, ...]:
  names = modalities.split(",") if isinstance(modalities, str) else list(modalities)
  names = [n.strip() for n in names if n.strip()]
  if not names or any(n not in MODALITIES for n in names) or len(set(names)) != len(names):
    raise ValueError(f"--modalities {','.join(names) or repr(modalities)}: expected image, "
                     f"text or image,text")
  return tuple(m for m in MODALITIES if m in names)


def _check_args(batch_size: int, partition_size: int, dtype: str) -> None:
  if batch_size < 1:
    raise ValueError(f"--batch_size {batch_size}: must be >= 1")
  if partition_size < 1:
    raise ValueError(f"--partition_size {partition_size}: must be >= 1")
  if dtype not in DTYPES:
    raise ValueError(f"--dtype {dtype}: expected one of {', '.join(DTYPES)}")


def _settings(checkpoint, dataset, modalities, partition_size, dtype) -> dict:
  checkpoint = str(checkpoint)  # a path made absolute; a pretrained name or URL as it is
  if os.path.exists(checkpoint):
    checkpoint = os.path.abspath(checkpoint)
  return {"checkpoint": checkpoint, "dataset": dataset,
          "modalities": list(modalities), "partition_size": int(partition_size),
          "dtype": dtype}


def _open_manifest(output_dir: str, settings: dict) -> dict:
  """The manifest to continue (a rerun with other settings is one error line)."""
  manifest = store.read_manifest(output_dir)
  if manifest is None:
    return dict(settings, format=store.FORMAT_VERSION, partitions=[], complete=False)
  for name in store.SETTINGS:
    if manifest.get(name) != settings[name]:
      raise ValueError(f"--output_dir {output_dir} holds a run with {name}="
                       f"{manifest.get(name)!r}, not {settings[name]!r}; rerun with the same "
                       "settings to continue it, or use a new --output_dir")
  return manifest


def _committed(output_dir: str, manifest: dict) -> dict[int, dict]:
  """The manifest's partitions whose files are all still there."""
  committed = {}
  for entry in manifest["partitions"]:
    if all(storage.exists(storage.join(output_dir, p)) for p in entry["files"].values()):
      committed[entry["index"]] = entry
    else:
      log.warning("partition %05d is in the manifest but a file is missing: recomputing it",
                  entry["index"])
  return committed


class _Reader:
  """Reads and prepares this process's samples: image pixels (the model's preprocessing,
  as clip_jax.load applies it) and caption tokens."""

  def __init__(self, modalities, image_size: int, context_length: int, workers: int):
    self.modalities = modalities
    self.image_size, self.context_length = image_size, context_length
    self.pool = concurrent.futures.ThreadPoolExecutor(workers, "clip_jax-embed")

  def _prepare(self, loader) -> tuple[dict, Optional[np.ndarray]]:
    sample = loader()
    if sample["error"] is None and "text" in self.modalities and not sample["caption"]:
      sample["error"] = "missing or empty caption"
    if sample["error"] is not None or "image" not in self.modalities:
      return sample, None
    try:
      return sample, _pixels(sample["image"], self.image_size)
    except (*_DECODE_ERRORS, *storage.errors()) as e:
      # (without the object addresses some messages name: the manifest is reproducible)
      sample["error"] = re.sub(r" at 0x[0-9a-fA-F]+", "", f"undecodable image: "
                               f"{storage.describe(e)}")
      return sample, None

  def batch(self, loaders: list, first_row: int, local_batch: int):
    """(device batch of `local_batch` rows, the samples' records) of these loaders."""
    from clip_jax.data.transforms import tokenize_caption  # pylint: disable=g-import-not-at-top
    prepared = list(self.pool.map(self._prepare, loaders))
    batch = {"mask": np.zeros(local_batch, bool),
             "row": np.arange(first_row, first_row + local_batch, dtype=np.int32)}
    if "image" in self.modalities:
      batch["images"] = np.zeros((local_batch, self.image_size, self.image_size, 3), np.uint8)
    if "text" in self.modalities:
      batch["tokens"] = np.zeros((local_batch, self.context_length), np.int32)
    records = []
    for i, (sample, pixels) in enumerate(prepared):
      records.append({"row": first_row + i, "key": str(sample["key"]),
                      "caption": sample["caption"], "meta": sample["meta"],
                      "error": sample["error"]})
      if sample["error"] is not None:
        continue
      batch["mask"][i] = True
      if pixels is not None:
        batch["images"][i] = pixels
      if "text" in self.modalities:
        batch["tokens"][i] = tokenize_caption(sample["caption"], self.context_length)
    return batch, records


def _pixels(image, size: int) -> np.ndarray:
  from clip_jax.data import transforms, wds  # pylint: disable=g-import-not-at-top
  from clip_jax.preprocess import resize_and_crop  # pylint: disable=g-import-not-at-top
  data = image if isinstance(image, (bytes, bytearray)) else wds.read_bytes(image)
  return resize_and_crop(transforms.to_pil(data), size)


class Embedder:
  """The model on the mesh and the reader; `partition` embeds one partition's loaders."""

  def __init__(self, clip, modalities, global_batch: int, workers: int, dataset: str):
    import jax  # pylint: disable=g-import-not-at-top
    import ml_collections  # pylint: disable=g-import-not-at-top
    from clip_jax import sharding  # pylint: disable=g-import-not-at-top
    self.clip, self.modalities, self.dataset = clip, modalities, dataset
    self.mesh = sharding.create_mesh(ml_collections.ConfigDict(
        {"mesh": {"data": -1, "fsdp": 1, "tensor": 1}}))
    self.process, self.processes = jax.process_index(), jax.process_count()
    shards = jax.device_count()
    self.global_batch = -(-global_batch // shards) * shards
    self.local_batch = self.global_batch // self.processes
    self.reader = _Reader(modalities, clip.image_size, clip.context_length, workers)
    self.forward_passes = 0
    self.on_batch = lambda samples: None  # e.g. the progress bar's update

  def _batches(self, loaders, records: list):
    """This process's device batches of one partition; fills `records`."""
    for b in itertools.count():
      group = list(itertools.islice(loaders, self.global_batch))
      if not group:
        return
      start = self.process * self.local_batch
      batch, mine = self.reader.batch(group[start:start + self.local_batch],
                                      b * self.global_batch + start, self.local_batch)
      records.extend(mine)
      if self.forward_passes == 0:
        self._check_captions(mine)
      self.forward_passes += 1
      yield batch
      self.on_batch(len(group))
      if len(group) < self.global_batch:
        return

  def _check_captions(self, records: list[dict]) -> None:
    """Text asked of data without captions is one error line, not empty output."""
    from clip_jax import distributed  # pylint: disable=g-import-not-at-top
    if "text" in self.modalities and not any(distributed.allgather_json(
        any(r["caption"] for r in records))):
      raise ValueError(f"--dataset {self.dataset}: none of the first {self.global_batch} "
                       "samples has a caption (a .txt beside the image, a json 'caption', the "
                       "CSV's caption column), but --modalities asks for text; embed images "
                       "only with --modalities image")

  def partition(self, loaders) -> tuple[dict, list[dict]]:
    """({modality: embeddings [kept, d] float32}, every sample's record in row order)."""
    from clip_jax import distributed  # pylint: disable=g-import-not-at-top
    from clip_jax.evaluate import features  # pylint: disable=g-import-not-at-top
    records: list[dict] = []
    encode = dict(_ENCODE[m] for m in self.modalities)
    out = features.compute_features_from_batches(
        self.clip.model, self.clip.params, self.mesh, self._batches(loaders, records),
        encode=encode, keep=("row",))
    gathered = [r for part in distributed.allgather_json(records) for r in part]
    gathered.sort(key=lambda r: r["row"])
    embeddings = {m: np.asarray(out[_ENCODE[m][0]], np.float32) for m in self.modalities}
    kept = np.asarray(out["row"])
    assert [r["row"] for r in gathered if r["error"] is None] == kept.tolist(), "rows misaligned"
    return embeddings, gathered


def _metadata_table(records: list[dict], embeddings: dict):
  """key, image_path / url, caption, clip_score (both modalities), then the source's columns."""
  kept = [r for r in records if r["error"] is None]
  rows = [dict(r["meta"], key=r["key"], caption=r["caption"]) for r in kept]
  if "image" in embeddings and "text" in embeddings:
    scores = np.sum(embeddings["image"] * embeddings["text"], axis=1, dtype=np.float32)
    for row, score in zip(rows, scores.tolist()):
      row["clip_score"] = score
  first = ["key"] + [c for c in ("image_path", "url") if any(c in r for r in rows)] + ["caption"]
  first += ["clip_score"] if rows and "clip_score" in rows[0] else []
  rest = sorted({c for r in rows for c in r} - set(first))
  return store.table_from_rows(rows, first + rest)


def _write_partition(output_dir: str, k: int, start: int, embeddings: dict, records: list,
                     dtype: str) -> dict:
  files = {store.relative_paths(k, embeddings)[m]: store.npy_bytes(e.astype(dtype))
           for m, e in embeddings.items()}
  files[store.relative_paths(k, ())["metadata"]] = store.parquet_bytes(
      _metadata_table(records, embeddings))
  hashes = store.write_files(output_dir, files)
  skipped = [{"key": r["key"], "reason": r["error"]} for r in records if r["error"] is not None]
  return {"index": k, "start": start, "stop": start + len(records),
          "rows": len(records) - len(skipped), "skipped": skipped,
          "files": store.relative_paths(k, embeddings), "sha256": hashes}


def _progress_bar(enabled: bool, total: Optional[int], initial: int):
  if not enabled:
    return None
  from tqdm import tqdm  # pylint: disable=g-import-not-at-top
  # The rate as samples/s always (tqdm would turn a slow one into s/sample).
  shape = ("{l_bar}{bar}| {n_fmt}/{total_fmt} [{elapsed}<{remaining}, {rate_noinv_fmt}]"
           if total is not None else "{desc}: {n_fmt} samples [{elapsed}, {rate_noinv_fmt}]")
  return tqdm(total=total, initial=initial, unit=" samples", dynamic_ncols=True,
              file=sys.stderr, desc="embed", bar_format=shape)


def embed(checkpoint, dataset: str, output_dir: str, *, modalities: Sequence[str] = MODALITIES,
          batch_size: int = 256, partition_size: int = 100_000, dtype: str = "float16",
          csv_image_key: str = "filepath", csv_caption_key: str = "title",
          csv_separator: str = "\t", workers: Optional[int] = None,
          progress_bar: bool = True) -> dict:
  """Embeds `dataset` ("wds:PATTERN", "csv:PATH", "files:DIR", "imagefolder:DIR") with the
  model `checkpoint` (anything clip_jax.load takes) into `output_dir`; returns the manifest,
  with "embedded" (the partitions computed now), "reused" (those already committed) and
  "forward_passes" (global batches run now) added. ValueError (one line) for bad input."""
  modalities = parse_modalities(modalities)
  _check_args(batch_size, partition_size, dtype)
  data = sources.open_dataset(dataset, csv_image_key=csv_image_key,
                              csv_caption_key=csv_caption_key, csv_separator=csv_separator)
  settings = _settings(checkpoint, dataset, modalities, partition_size, dtype)
  manifest = _open_manifest(output_dir, settings)
  committed = _committed(output_dir, manifest)
  import jax  # pylint: disable=g-import-not-at-top
  from clip_jax.inference import load  # pylint: disable=g-import-not-at-top
  clip = load(settings["checkpoint"], batch_size=batch_size)
  embedder = Embedder(clip, modalities, batch_size, workers or min(32, (os.cpu_count() or 1) * 2),
                      dataset)
  primary = jax.process_index() == 0
  manifest.update(model=clip.config.name, embed_dim=int(clip.config.embed_dim),
                  images_root=data.images_root)
  try:
    total = len(data)
  except TypeError:
    total = None  # a stream (wds)
  bar = _progress_bar(progress_bar and primary, total,
                      sum(e["stop"] - e["start"] for e in committed.values()))
  if bar is not None:
    embedder.on_batch = bar.update
  embedded, start = [], 0
  for k, loaders in data.partitions(partition_size):
    if k in committed:
      start = committed[k]["stop"]
      continue  # (the partition's loaders are read past, never called)
    began = time.monotonic()
    passes = embedder.forward_passes
    embeddings, records = embedder.partition(loaders)
    if primary:
      committed[k] = _write_partition(output_dir, k, start, embeddings, records, dtype)
      manifest["partitions"] = [committed[i] for i in sorted(committed)]
      store.write_manifest(output_dir, manifest)
    embedded.append(k)
    start += len(records)
    seconds = time.monotonic() - began
    log.info("partition %05d: %d samples (%d skipped), %d forward passes, %.1f samples/s", k,
             len(records), sum(r["error"] is not None for r in records),
             embedder.forward_passes - passes, len(records) / max(seconds, 1e-9))
  if bar is not None:
    bar.close()
  manifest["partitions"] = [committed[i] for i in sorted(committed)]
  manifest.update(rows=sum(e["rows"] for e in manifest["partitions"]),
                  skipped_samples=sum(len(e["skipped"]) for e in manifest["partitions"]),
                  complete=True)
  if primary:
    store.write_manifest(output_dir, manifest)
  log.info("embedded %d partitions (%d forward passes), reused %d committed partitions; "
           "%d rows, %d skipped samples", len(embedded), embedder.forward_passes,
           len(committed) - len(embedded), manifest["rows"], manifest["skipped_samples"])
  return dict(manifest, embedded=embedded, forward_passes=embedder.forward_passes,
              reused=sorted(set(committed) - set(embedded)))
