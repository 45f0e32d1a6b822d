"""The grain input pipeline: sources -> per-sample transforms -> batches -> global arrays.

    records of this process (shuffled per epoch)  ->  decode, crop, tokenize (uint8 images)
    -> drop bad samples (counted)  ->  local batch  ->  worker processes / prefetch thread
    -> jax.make_array_from_process_local_data(sharding, local batch)  ->  normalise on device

Images stay uint8 until they are on the devices: 4x less to move between processes and
to the accelerators, and the mean/std normalisation costs the hosts nothing. With
config.data.image_dtype "uint8" they stay uint8 there too, for the jitted step to normalise.

Sources: synthetic (a seed stream), wds (tar shards, streamed) and the random-access record
sources (tfds, csv, files, imagefolder; see record_source), which share RecordSchedule and
RecordLoader: per-process parts, a new order per epoch, exact resume on any process count;
and "mix", a weighted mixture of them (clip_jax.data.mixture). Several captions per sample
(config.data.caption_keys): clip_jax.data.captions.

Every sample carries (epoch, index); its augmentation randomness is derived from
(seed, epoch, index), so restoring the grain iterator state replays the stream exactly.
"""
from __future__ import annotations

import functools
import json
import sys
from typing import Any, Iterator, Optional, Sequence

from absl import flags
from absl import logging
import grain
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax.data import captions
from clip_jax.data import mixture
from clip_jax.data import synthetic
from clip_jax.data import transforms
from clip_jax.data import wds
from clip_jax.models.configs import OPENAI_MEAN, OPENAI_STD

SOURCES = ("synthetic", "tfds", "wds", "csv", "files", "imagefolder", "mix")
# Random-access sources: a record index space, sharded, shuffled and resumed by RecordSchedule.
RECORD_SOURCES = ("tfds", "csv", "files", "imagefolder")
IMAGE_DTYPES = ("float32", "bfloat16", "uint8")
_SKIPPED = "__skipped__"
_STATE_VERSION = 1
_SKIPS_NAMED = 5  # bad samples named in the log per process; the rest are only counted


def _data_option(config, name: str, default):
  return config.data.get(name, default) if hasattr(config.data, "get") else default


def validate_data_config(config, cache_dir: Optional[str] = None) -> None:
  """Checks config.data before anything compiles; raises ValueError with one clear line.

  cache_dir: where the files source keeps its index (so the tree is listed once).
  """
  data = config.data
  if data.source not in SOURCES:
    raise ValueError(f"config.data.source={data.source!r} is not one of {SOURCES}")
  if not 0.0 < data.min_scale <= data.max_scale <= 1.0:
    raise ValueError(f"config.data.min_scale={data.min_scale} / max_scale={data.max_scale}: "
                     f"need 0 < min_scale <= max_scale <= 1")
  if data.image_dtype not in IMAGE_DTYPES:
    raise ValueError(f"config.data.image_dtype={data.image_dtype!r}: use one of {IMAGE_DTYPES}")
  if data.num_workers < 0:
    raise ValueError(f"config.data.num_workers={data.num_workers} must be >= 0")
  samples_per_epoch = _data_option(config, "samples_per_epoch", None)
  if samples_per_epoch is not None and int(samples_per_epoch) <= 0:
    raise ValueError(f"config.data.samples_per_epoch={samples_per_epoch} must be positive")
  picker = captions.picker(config, data.source)  # checks caption_keys / caption_probs
  keys = str(_data_option(config, "caption_keys", captions.DEFAULT_KEYS))
  if data.source in ("synthetic", "tfds", "imagefolder") and keys != captions.DEFAULT_KEYS:
    raise ValueError(f"config.data.caption_keys={keys!r} is for wds, files and csv sources "
                     f"(and mixtures of them); config.data.source={data.source!r} has its own "
                     "captions")
  if data.source == "mix":
    mixture.validate(config, cache_dir, _csv_options(config))
  elif data.source == "wds":
    wds.validate_shards(data.path)
  elif data.source == "tfds":
    from clip_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    tfds_source.validate(data.name, data.split, data.data_dir)
  elif data.source == "csv":
    from clip_jax.data import csv_source  # pylint: disable=g-import-not-at-top
    csv_source.validate(data.path, *_csv_options(config), picker=picker)
  elif data.source == "files":
    from clip_jax.data import files_source  # pylint: disable=g-import-not-at-top
    files_source.validate(data.path, cache_dir)
  elif data.source == "imagefolder":
    from clip_jax.data import imagefolder  # pylint: disable=g-import-not-at-top
    imagefolder.validate(data.path)


def _csv_options(config) -> tuple[str, str, str]:
  return (str(_data_option(config, "csv_image_key", "filepath")),
          str(_data_option(config, "csv_caption_key", "title")),
          str(_data_option(config, "csv_separator", "\t")))


def record_source(config, cache_dir: Optional[str] = None, *, kind: Optional[str] = None,
                  path: Optional[str] = None, split: Optional[str] = None, picker=None):
  """The random-access source of config.data (one of RECORD_SOURCES): `len`, `.name` and
  `.record(index, rng)` -> {"image": bytes | uint8 HWC | path, "caption", "captions",
  "label", "key"}; `.draws_captions` False: `record` uses no rng and gets None.

  kind/path/split (a mixture's component) replace config.data.source/path (tfds: name)/split;
  picker: the captions.CaptionPicker of config.data.caption_keys (csv, files; training).
  """
  data = config.data
  kind = data.source if kind is None else kind
  if kind == "tfds":
    from clip_jax.data import tfds_source  # pylint: disable=g-import-not-at-top
    return tfds_source.TfdsSource(data.name if path is None else path,
                                  data.split if split is None else split, data.data_dir)
  path = data.path if path is None else path
  if kind == "csv":
    from clip_jax.data import csv_source  # pylint: disable=g-import-not-at-top
    return csv_source.CsvSource(path, *_csv_options(config), picker=picker)
  if kind == "files":
    from clip_jax.data import files_source  # pylint: disable=g-import-not-at-top
    return files_source.FilesSource(path, cache_dir, picker=picker)
  if kind == "imagefolder":
    from clip_jax.data import imagefolder  # pylint: disable=g-import-not-at-top
    classnames = _data_option(config, "classnames", None) or None
    return imagefolder.ImageFolderSource(path, classnames=classnames)
  raise ValueError(f"config.data.source={kind!r} is not one of {RECORD_SOURCES}")


# ----------------------------------------------------------------------------- samples

_skips_logged = 0


def _skip(key: str, shard: Optional[str], reason: str) -> dict:
  """A skip marker; the first few bad samples of each process are named in the log."""
  global _skips_logged
  if _skips_logged < _SKIPS_NAMED:
    _skips_logged += 1
    logging.warning("Skipping sample %s%s: %s%s", key, f" of shard {shard}" if shard else "",
                    reason, " (further skips are only counted, in data/skipped_samples)"
                    if _skips_logged == _SKIPS_NAMED else "")
  return {_SKIPPED: True}


def _caption_tuple(captions: Sequence[str]) -> np.ndarray:
  """A 0-d object array holding a tuple: batches of them stack into [b] object arrays."""
  out = np.empty((), object)
  out[()] = tuple(captions)
  return out


def finish_sample(raw: dict, *, image_size: int, train: bool, scale: Sequence[float],
                  seed: int, with_labels: bool, all_captions: bool = False,
                  picker: Optional[captions.CaptionPicker] = None) -> dict:
  """Raw record -> {"images" uint8, "tokens"[, "labels"]}, or a skip marker for bad input.

  With all_captions, "captions" (a 0-d object array holding the tuple of every non-empty
  caption of the image, from raw["captions"]) replaces "tokens". With a picker and the
  record's "caption_options" (wds, csv), the caption is drawn among them from the sample's
  own stream (seed + 1, epoch, index); "caption_fallback" 1 marks a drawn key that was absent.
  """
  key, shard = raw.get("key", "?"), raw.get("shard")
  if raw.get("error"):
    return _skip(key, shard, raw["error"])
  index = raw["index"] if isinstance(raw["index"], tuple) else (raw["index"],)
  fell_back = int(raw.get(captions.FALLBACK, 0))
  if all_captions:
    texts = [c.strip() for c in raw.get("captions", ()) if c and c.strip()]
    caption = texts[0] if texts else None
  elif picker is not None and "caption_options" in raw:
    caption, fell_back = picker.pick(raw["caption_options"].get,
                                     transforms.sample_rng(seed + 1, raw["epoch"], *index))
  else:
    caption = raw.get("caption")
  if not caption or not caption.strip():
    return _skip(key, shard, "missing or empty caption")
  rng = transforms.sample_rng(seed, raw["epoch"], *index)
  try:
    image = transforms.crop_and_resize(raw["image"], image_size, train=train, rng=rng, scale=scale)
  except Exception as e:  # pylint: disable=broad-except
    # PIL raises many types (OSError, SyntaxError, ValueError, DecompressionBombError...).
    return _skip(key, shard, f"undecodable image: {type(e).__name__}: {e}")
  if all_captions:
    out = {"images": image, "captions": _caption_tuple(texts)}
  else:
    out = {"images": image, "tokens": transforms.tokenize_caption(caption)}
  if with_labels:
    out["labels"] = np.int32(raw.get("label", -1))
  if fell_back:
    out[captions.FALLBACK] = 1
  return out


class RecordSchedule:
  """Position -> (epoch, record index) for random-access sources, for one process.

  Each epoch visits the N records in a new order (grain's index_shuffle seeded by
  seed + epoch; no shuffle: in order), as one global stream of positions.

  Training (local_batch given, endless): global batch b is stream positions [b*B, (b+1)*B)
  (B = local_batch * process_count) and process p reads its slice [b*B + p*L, b*B + (p+1)*L),
  so every process count reads the same global batches, rows in the same order: a run
  resumes exactly onto another number of processes (first_position = step * local_batch).
  The processes' records are disjoint within every global batch and epoch.

  Evaluation (local_batch None): process p owns records [p*N//P, (p+1)*N//P), num_epochs
  passes over them (endless if None).
  """

  def __init__(self, num_records: int, *, seed: int, process_index: int, process_count: int,
               shuffle: bool, num_epochs: Optional[int] = None, first_position: int = 0,
               local_batch: Optional[int] = None):
    self._local_batch = local_batch
    self._process_index, self._process_count = process_index, process_count
    if local_batch is None:
      self._start = process_index * num_records // process_count
      self._count = (process_index + 1) * num_records // process_count - self._start
    else:
      self._start, self._count = 0, num_records
    if self._count == 0:
      raise ValueError(f"the dataset has {num_records} records, fewer than the "
                       f"{process_count} processes reading it")
    self._seed, self._shuffle = seed, shuffle
    self._first = int(first_position)
    self._len = sys.maxsize
    if num_epochs is not None:
      if local_batch is not None:
        raise ValueError("RecordSchedule: num_epochs is for the per-process (evaluation) order")
      self._len = num_epochs * self._count - self._first

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, position: int) -> tuple[int, int]:
    position = int(position) + self._first
    if self._local_batch is not None:  # this process's slice of each global batch
      step, row = divmod(position, self._local_batch)
      position = (step * self._process_count + self._process_index) * self._local_batch + row
    epoch, i = divmod(position, self._count)
    if self._shuffle and self._count > 1:
      i = grain.experimental.index_shuffle(
          i, max_index=self._count - 1, seed=(self._seed + epoch) % 2**32, rounds=4)
    return epoch, self._start + i


class SyntheticSchedule:
  """Endless synthetic stream: process p takes sample indices p, p+P, p+2P, ...

  `first_position` skips that many of this process's samples, i.e. the stream starts at
  global index first_position * P: how a run resumes on another number of processes.
  """

  def __init__(self, process_index: int, process_count: int, num_examples: Optional[int] = None,
               first_position: int = 0):
    self._p, self._count, self._first = process_index, process_count, int(first_position)
    self._len = sys.maxsize if num_examples is None else len(
        range(process_index, num_examples, process_count))

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, position: int) -> tuple[int, int]:
    return 0, (int(position) + self._first) * self._count + self._p


class SyntheticLoader:
  """(epoch, index) -> finished sample from the training (or evaluation) seed stream."""

  def __init__(self, finish, *, seed: int, image_size: int, held_out: bool,
               num_captions: Optional[int] = None):
    self._finish, self._seed, self._size, self._held_out = finish, seed, image_size, held_out
    self._num_captions = num_captions

  def __call__(self, element: tuple[int, int]) -> dict:
    epoch, index = element
    if self._held_out:
      raw = synthetic.eval_sample(self._seed, index, self._size, num_captions=self._num_captions)
    else:
      raw = synthetic.train_sample(self._seed, index, self._size)
    raw.update(key=f"synthetic/{index}", epoch=epoch, index=index)
    return self._finish(raw)


class RecordLoader:
  """(epoch, record) -> finished sample of a random-access source (see record_source).

  A record's image may be a path: it is read here, in the worker, so that a missing or
  unreadable file (like any error of `.record`) becomes a counted skip.
  """

  def __init__(self, finish, source, *, seed: int):
    self._finish, self._source, self._seed = finish, source, seed

  def __call__(self, element: tuple[int, int]) -> dict:
    epoch, index = element
    # Caption choice (for multi-caption or label datasets) has its own stream per sample;
    # sources with one caption per record (csv, files, imagefolder) skip building it.
    rng = (transforms.sample_rng(self._seed + 1, epoch, index)
           if self._source.draws_captions else None)
    key = f"{self._source.name}/{index}"
    try:
      raw = self._source.record(index, rng)
      key = raw.get("key", key)
      if isinstance(raw["image"], str):
        raw["image"] = wds.read_bytes(raw["image"])
    except Exception as e:  # pylint: disable=broad-except
      return _skip(key, None, f"unreadable record: {type(e).__name__}: {e}")
    raw.update(epoch=epoch, index=index)
    return self._finish(raw)


TfdsLoader = RecordLoader  # the name before csv/files/imagefolder shared it


# ----------------------------------------------------------------------------- skip counting

class _CountSkipsIterator(grain.DatasetIterator):

  def __init__(self, parent: grain.DatasetIterator, num_sources: int):
    super().__init__(parent)
    self._num_sources = num_sources

  def __next__(self) -> dict:
    skipped = np.zeros(max(self._num_sources, 1), np.int32)
    while True:
      element = next(self._parent)
      source = int(element.pop("source", 0))
      if _SKIPPED in element:
        skipped[source] += 1
        continue
      element["num_skipped"] = np.int32(skipped.sum())
      element["num_fallbacks"] = np.int32(element.pop(captions.FALLBACK, 0))
      if self._num_sources:
        element["source"] = np.int32(source)
        element["source_skipped"] = skipped
      return element

  def get_state(self):
    return self._parent.get_state()

  def set_state(self, state):
    self._parent.set_state(state)


class CountSkipsIterDataset(grain.IterDataset):
  """Drops skip markers and adds their number to the next good sample (`num_skipped`), and
  whether its caption fell back to another key (`num_fallbacks`). With num_sources (a
  mixture's), also the sample's `source` and the skips per source (`source_skipped`).

  The counts ride inside the batch, so they survive worker processes and checkpoints.
  """

  def __init__(self, parent: grain.IterDataset, num_sources: int = 0):
    super().__init__(parent)
    self._num_sources = num_sources

  def __iter__(self):
    return _CountSkipsIterator(self._parent.__iter__(), self._num_sources)


_COUNTS = ("num_skipped", "num_fallbacks", "source", "source_skipped")


def pop_counts(batch: dict) -> dict:
  """The counting fields of a batch (see CountSkipsIterDataset), removed from it."""
  return {k: batch.pop(k) for k in _COUNTS if k in batch}


# ----------------------------------------------------------------------------- datasets

def build_dataset(config, *, image_size: int, local_batch: int, train: bool,
                  process_index: int = 0, process_count: int = 1,
                  num_examples: Optional[int] = None,
                  all_captions: bool = False, first_position: int = 0,
                  cache_dir: Optional[str] = None) -> grain.IterDataset:
  """The grain IterDataset of local batches {"images", "tokens", "num_skipped"[, "labels"]}.

  "images" are uint8 [b, H, W, 3] (normalised later, by DataIterator / make_eval_iterator).

  train=True: endless, shuffled, RandomResizedCrop. train=False: one pass (num_examples
  for the unlimited synthetic source), in order, center crop, last batch kept, labels added.
  all_captions (evaluation only): "captions" [b] object (tuples of str) instead of "tokens";
  the synthetic source gives config.data.captions_per_image (default 5) per image.
  first_position (training on synthetic / record sources): this process's stream starts
  that many samples in (see make_train_iterator's start_step).
  cache_dir: where the files source caches its index.
  """
  data = config.data
  seed = int(config.seed)
  if all_captions and train:
    raise ValueError("all_captions is for evaluation; the training stream uses one caption")

  def finisher(seed, kind):
    return functools.partial(
        finish_sample, image_size=image_size, train=train,
        scale=(float(data.min_scale), float(data.max_scale)), seed=seed, with_labels=not train,
        all_captions=all_captions, picker=captions.picker(config, kind) if train else None)

  finish = finisher(seed, data.source)
  num_threads = int(_data_option(config, "num_threads", 8))
  read_options = grain.ReadOptions(num_threads=num_threads,
                                   prefetch_buffer_size=max(2 * local_batch, 16))
  num_sources = 0  # not a mixture: no per-source counts
  if data.source == "mix":
    if not train:
      raise ValueError("config.data.source='mix' is for training; evaluate on one source")
    components = mixture.parse(config)
    num_sources = len(components)
    dataset = _mixture_dataset(config, components, finisher, local_batch=local_batch,
                               process_index=process_index, process_count=process_count,
                               first_position=first_position, cache_dir=cache_dir,
                               image_size=image_size, read_options=read_options)
  elif data.source == "synthetic" or data.source in RECORD_SOURCES:
    if data.source == "synthetic":
      if not train and num_examples is None:
        raise ValueError("make_eval_iterator on the synthetic source needs num_examples")
      schedule = SyntheticSchedule(process_index, process_count, None if train else num_examples,
                                   first_position=first_position)
      num_captions = int(_data_option(config, "captions_per_image", 5)) if all_captions else None
      loader = SyntheticLoader(finish, seed=seed, image_size=image_size, held_out=not train,
                               num_captions=num_captions)
    else:
      source = record_source(config, cache_dir,
                             picker=captions.picker(config, data.source) if train else None)
      schedule = RecordSchedule(len(source), seed=seed, process_index=process_index,
                                process_count=process_count, shuffle=train,
                                num_epochs=None if train else 1, first_position=first_position,
                                local_batch=local_batch if train else None)
      loader = RecordLoader(finish, source, seed=seed)
    dataset = grain.MapDataset.source(schedule).map(loader)
    if not train and num_examples is not None and data.source != "synthetic":
      dataset = dataset[:len(range(process_index, num_examples, process_count))]
    dataset = dataset.to_iter_dataset(read_options)
  elif data.source == "wds":
    if first_position:
      raise ValueError("config.data.source='wds' streams shards and cannot start at a sample "
                       "position; resume it on the number of processes that wrote the checkpoint")
    dataset = _wds_dataset(config, data.path, finish, seed=seed, process_index=process_index,
                           process_count=process_count, train=train)
  else:
    raise ValueError(f"config.data.source={data.source!r} is not one of {SOURCES}")
  dataset = CountSkipsIterDataset(dataset, num_sources)
  dataset = dataset.batch(local_batch, drop_remainder=train)
  if data.num_workers > 0:
    if not flags.FLAGS.is_parsed():
      # grain's worker processes read its absl flags; outside absl.app (notebooks, tests)
      # nothing parsed them, so take their defaults.
      flags.FLAGS.mark_as_parsed()
    dataset = dataset.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=int(data.num_workers), per_worker_buffer_size=2))
  else:
    dataset = grain.experimental.ThreadPrefetchIterDataset(
        dataset, prefetch_buffer_size=int(_data_option(config, "prefetch_batches", 2)))
  return dataset


def _wds_dataset(config, path: str, finish, *, seed: int, process_index: int,
                 process_count: int, train: bool) -> grain.IterDataset:
  """This process's stream of finished samples of the wds shards of `path`."""
  data = config.data
  schedule = wds.ShardSchedule(wds.validate_shards(path), seed=seed, process_index=process_index,
                               process_count=process_count,
                               resample=bool(data.resample_shards) and train,
                               num_epochs=None if train else 1,
                               picker=captions.picker(config, "wds") if train else None)
  dataset = grain.experimental.InterleaveIterDataset(
      grain.MapDataset.source(schedule), cycle_length=int(_data_option(config, "cycle_length", 4)))
  if train and data.shuffle_buffer > 1:
    dataset = grain.experimental.WindowShuffleIterDataset(
        dataset, window_size=int(data.shuffle_buffer), seed=seed)
  return dataset.map(finish)


def _mixture_dataset(config, components, finisher, *, local_batch: int, process_index: int,
                     process_count: int, first_position: int, cache_dir: Optional[str],
                     image_size: int, read_options: grain.ReadOptions) -> grain.IterDataset:
  """The training stream of a mixture (clip_jax.data.mixture): each position's source drawn
  over the global batch; random-access sources read by position, wds ones as streams."""
  streamed = [i for i, c in enumerate(components) if c.kind not in mixture.RANDOM_ACCESS]
  if first_position and streamed:
    raise ValueError(f"config.data.source='mix' with wds sources "
                     f"({', '.join(components[i].name for i in streamed)}) cannot start at a "
                     "sample position; resume it on the number of processes that wrote the "
                     "checkpoint")
  loaders, streams = [], {}
  for i, c in enumerate(components):
    seed = mixture.source_seed(int(config.seed), i)
    finish = finisher(seed, c.kind)
    if c.kind == "wds":
      loaders.append(None)
      streams[i] = _wds_dataset(config, c.path, finish, seed=seed, process_index=process_index,
                                process_count=process_count, train=True)
    elif c.kind == "synthetic":
      loaders.append(mixture.StreamLoader(
          SyntheticSchedule(0, 1), SyntheticLoader(finish, seed=seed, image_size=image_size,
                                                   held_out=False)))
    else:
      source = record_source(config, cache_dir, kind=c.kind, path=c.path, split=c.split,
                             picker=captions.picker(config, c.kind))
      order = RecordSchedule(len(source), seed=seed, process_index=0, process_count=1,
                             shuffle=True)
      loaders.append(mixture.StreamLoader(order, RecordLoader(finish, source, seed=seed)))
  logging.info("Mixture of %d sources: %s", len(components), ", ".join(
      f"{c.name} {c.weight:.3f} ({c.entry})" for c in components))
  draw = mixture.MixDraw([c.weight for c in components], local_batch * process_count,
                         int(config.seed))
  positions = grain.MapDataset.source(mixture.MixSchedule(
      draw, local_batch=local_batch, process_index=process_index,
      first_position=first_position)).map(mixture.MixLoader(loaders))
  return mixture.MixIterDataset(positions.to_iter_dataset(read_options), streams)


def _jsonable(tree: Any) -> Any:
  """grain states hold numpy scalars and tuples; make them plain JSON (what a restore sees)."""
  def default(x):
    if isinstance(x, np.generic):
      return x.item()
    if isinstance(x, bytes):
      return x.decode("latin-1")
    raise TypeError(f"unexpected {type(x)} in the data iterator state")
  return json.loads(json.dumps(tree, default=default))


class DataIterator:
  """Endless iterator of global batches; its state goes into the checkpoint.

  With image_dtype "uint8" the images stay uint8 (the jitted train step normalises them);
  float32/bfloat16 are normalised here, on the devices (on the host without a sharding).
  source_names: a mixture's sources, whose samples and skips it counts apiece.
  """

  def __init__(self, dataset: grain.IterDataset, sharding: Optional[jax.sharding.Sharding],
               normalizer: transforms.Normalizer, source_names: Sequence[str] = ()):
    self._iterator = iter(dataset)
    self._sharding = sharding
    self._normalizer = normalizer
    self._skipped = 0
    self._fallbacks = 0
    self._source_names = tuple(source_names)
    self._source_samples = np.zeros(len(self._source_names), np.int64)
    self._source_skipped = np.zeros(len(self._source_names), np.int64)
    if sharding is not None and normalizer.dtype == "uint8":
      self._normalize = lambda x: x
    elif sharding is not None:
      dtype = jnp.dtype(normalizer.dtype)
      scale, offset = jnp.asarray(normalizer.scale), jnp.asarray(normalizer.offset)
      self._normalize = jax.jit(
          lambda x: (x.astype(jnp.float32) * scale + offset).astype(dtype),
          out_shardings=sharding)

  def __iter__(self) -> "DataIterator":
    return self

  def __next__(self) -> dict:
    batch = next(self._iterator)
    self._count(pop_counts(batch))
    if self._sharding is None:
      batch["images"] = self._normalizer(batch["images"])
      return batch
    batch = {k: jax.make_array_from_process_local_data(self._sharding, v)
             for k, v in batch.items()}
    batch["images"] = self._normalize(batch["images"])
    return batch

  def _count(self, counts: dict) -> None:
    self._skipped += int(np.sum(counts["num_skipped"]))
    self._fallbacks += int(np.sum(counts["num_fallbacks"]))
    if self._source_names:
      num = len(self._source_names)
      self._source_samples += np.bincount(counts["source"], minlength=num)
      self._source_skipped += np.asarray(counts["source_skipped"], np.int64).sum(axis=0)

  @property
  def skipped_samples(self) -> int:
    """Bad samples this process has skipped since the start of the run (restored on resume)."""
    return self._skipped

  def counters(self) -> dict[str, int]:
    """This process's counts since the start of the run (restored on resume), by metric name:
    data/skipped_samples, data/caption_fallbacks (captions taken from another key than the
    drawn one) and, for a mixture, data/NAME/samples and data/NAME/skipped_samples."""
    out = {"data/skipped_samples": self._skipped, "data/caption_fallbacks": self._fallbacks}
    for name, samples, skipped in zip(self._source_names, self._source_samples,
                                      self._source_skipped):
      out[f"data/{name}/samples"] = int(samples)
      out[f"data/{name}/skipped_samples"] = int(skipped)
    return out

  def get_state(self) -> dict:
    state = {"version": _STATE_VERSION, "skipped_samples": self._skipped,
             "caption_fallbacks": self._fallbacks,
             "grain": _jsonable(self._iterator.get_state())}
    if self._source_names:
      state["sources"] = {name: {"samples": int(samples), "skipped_samples": int(skipped)}
                          for name, samples, skipped in zip(
                              self._source_names, self._source_samples, self._source_skipped)}
    return state

  def set_state(self, state: dict) -> None:
    if state.get("version") != _STATE_VERSION:
      raise ValueError(f"data iterator state version {state.get('version')!r} is not "
                       f"{_STATE_VERSION}; it was written by another clip_jax version")
    sources = state.get("sources", {})
    if self._source_names and set(sources) != set(self._source_names):
      raise ValueError(f"the checkpoint's data state has the sources {sorted(sources)}, this "
                       f"run's config.data.path has {sorted(self._source_names)}; resume with "
                       "the same mixture")
    self._iterator.set_state(state["grain"])
    self._skipped = int(state["skipped_samples"])
    self._fallbacks = int(state.get("caption_fallbacks", 0))  # absent before caption keys
    for i, name in enumerate(self._source_names):
      self._source_samples[i] = sources[name]["samples"]
      self._source_skipped[i] = sources[name]["skipped_samples"]

  def close(self) -> None:
    close = getattr(self._iterator, "close", None)
    if close is not None:
      close()


def _process_args(process_index, process_count):
  process_index = jax.process_index() if process_index is None else int(process_index)
  process_count = jax.process_count() if process_count is None else int(process_count)
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index={process_index} is outside [0, {process_count})")
  return process_index, process_count


def make_train_iterator(config, sharding: Optional[jax.sharding.Sharding], *, image_size: int,
                        mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD,
                        process_index: Optional[int] = None,
                        process_count: Optional[int] = None,
                        start_step: int = 0, cache_dir: Optional[str] = None) -> DataIterator:
  """The training stream of this process, assembled into global arrays on `sharding`.

  Each process reads its own part; its local batch is config.batch_size / process_count.
  With sharding=None the iterator yields this process's numpy batches instead.

  start_step: begin where `start_step` global batches of this config end, whatever number
  of processes read them: how a run resumes from a checkpoint written by another number of
  processes (whose per-process iterator states do not apply). Synthetic: the very samples
  an uninterrupted run would read next (each global batch the same set, rows in another
  order; skipped samples would shift it, and synthetic has none). Record sources (TFDS, csv,
  files, imagefolder): the very global batches, rows in the same order, while no sample was
  skipped (a skip moves its process's later samples one on). Not for wds (shard streams).

  cache_dir: where the files source caches its index of the tree (train.py: the workdir).
  """
  validate_data_config(config, cache_dir)
  process_index, process_count = _process_args(process_index, process_count)
  if config.batch_size % process_count:
    raise ValueError(f"config.batch_size={config.batch_size} is not divisible by the "
                     f"{process_count} processes; use a multiple of {process_count}")
  local_batch = config.batch_size // process_count
  build = transforms.pillow_build()
  logging.info("Input pipeline: images decoded and resized by %s%s", build,
               "" if build.startswith("Pillow-SIMD") else
               " (its scalar bicubic resize is most of the CPU time per image; "
               "launch/install_pillow_simd.sh puts the ~5x faster Pillow-SIMD in its place)")
  dataset = build_dataset(config, image_size=image_size, local_batch=local_batch, train=True,
                          process_index=process_index, process_count=process_count,
                          first_position=int(start_step) * local_batch, cache_dir=cache_dir)
  names = ([c.name for c in mixture.parse(config)] if config.data.source == "mix" else ())
  return DataIterator(dataset, sharding,
                      transforms.Normalizer(mean, std, config.data.image_dtype), names)


def make_eval_iterator(config, *, image_size: int, batch_size: int,
                       mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD,
                       num_examples: Optional[int] = None, process_index: Optional[int] = None,
                       process_count: Optional[int] = None,
                       all_captions: bool = False,
                       cache_dir: Optional[str] = None) -> Iterator[dict]:
  """One pass over config.data (this process's part), center-cropped, as numpy batches.

  Yields {"images" [b,H,W,3], "tokens" [b,77] int32, "labels" [b] int32 (-1 without labels),
  "mask" [b] bool}; every batch has batch_size rows, the last one padded (mask False).
  The synthetic source is read from its held-out seed stream (num_examples of them);
  for record sources (TFDS, csv, files, imagefolder), num_examples (if given) limits the pass.
  With config.data.image_dtype "uint8" the images are not normalised.

  all_captions=True (retrieval on sets with several captions per image): "captions" [b]
  object, each row the tuple of all the image's captions (padding rows: empty tuples),
  replaces "tokens". Sources: every caption of a TFDS text feature (coco_captions'
  captions/text), the lines of a wds `key.txt` and/or a "captions" list in `key.json`,
  and config.data.captions_per_image (default 5) distinct captions per synthetic image;
  csv rows have one caption, files records the non-empty lines of their .txt.
  """
  validate_data_config(config, cache_dir)
  process_index, process_count = _process_args(process_index, process_count)
  dataset = build_dataset(config, image_size=image_size, local_batch=batch_size, train=False,
                          process_index=process_index, process_count=process_count,
                          num_examples=num_examples, all_captions=all_captions,
                          cache_dir=cache_dir)
  normalizer = transforms.Normalizer(mean, std, config.data.image_dtype)
  for batch in dataset:
    pop_counts(batch)
    batch["images"] = normalizer(batch["images"])
    size = len(batch["images"])
    batch["mask"] = np.arange(batch_size) < size
    if size < batch_size:
      batch = {k: v if k == "mask" else _pad_rows(v, batch_size - size) for k, v in batch.items()}
    yield batch


def _pad_rows(array: np.ndarray, count: int) -> np.ndarray:
  """`count` zero rows appended (empty tuples for the object arrays of captions)."""
  if array.dtype == object:
    pad = np.empty((count,), object)
    for i in range(count):
      pad[i] = ()
  else:
    pad = np.zeros((count,) + array.shape[1:], array.dtype)
  return np.concatenate([array, pad])
