"""Weighted mixtures of training sources: config.data.source = "mix".

    config.data.path = "wds:gs://b/laion/{00000..41407}.tar::csv:/data/cc12m.tsv::tfds:coco_captions"
    #                  (also "synthetic", the built-in shapes, e.g. for a smoke test)
    config.data.mix_weights = "4::1::1"          # relative; default equal
    config.data.mix_names = "laion::cc12m::coco"  # optional; default the kinds (wds, csv...)

Each global batch draws the source of each of its positions: the number of positions per
source is multinomial(global batch, weights) and their arrangement a random permutation
(together, the same as drawing every position independently with those probabilities),
all a pure function of (seed, step, position). Process p reads positions [p*L, (p+1)*L)
of every global batch (L the local batch), so the draw does not depend on the process count.

Random-access sources (csv, files, tfds, synthetic) are read as one stream each: the n-th
draw of a source globally reads position n of its own order (each epoch a new permutation
of its records, seeded per source), so a mixture of them resumes exactly on any number of
processes. A wds source is a per-process stream of its shards (as when read alone): its
draws take the next sample of this process's stream, and its read position is part of the
iterator state; a mixture with wds resumes on the process count that wrote the checkpoint.

grain's own `mix` interleaves per process in fixed proportions; this draw is over the global
batch, so every process count sees the same batches.
"""
from __future__ import annotations

import dataclasses
import functools
import re
import sys
import threading
from typing import Callable, Optional, Sequence

import grain
import numpy as np

from clip_jax.data import captions

KINDS = ("wds", "csv", "files", "tfds", "synthetic")
RANDOM_ACCESS = ("csv", "files", "tfds", "synthetic")
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")
_STREAM = "__mix_stream__"  # a position that takes the next sample of a streamed (wds) source
_SALT_COUNTS, _SALT_ORDER = 0x6D697863, 0x6D69786F  # "mixc", "mixo"


@dataclasses.dataclass(frozen=True)
class Component:
  """One source of a mixture: its kind, path (tfds: the dataset name), name and weight."""
  kind: str
  path: str
  name: str
  weight: float
  split: str = "train"  # tfds

  @property
  def entry(self) -> str:
    return f"{self.kind}:{self.path}" + (f":{self.split}" if self.kind == "tfds" else "")


def _option(config, name: str, default):
  return config.data.get(name, default) if hasattr(config.data, "get") else default


def parse(config) -> list[Component]:
  """The components of config.data.path / mix_weights / mix_names; ValueError (one line) for
  an empty list, an unknown kind, or weights or names that do not fit the sources."""
  spec = str(config.data.path)
  entries = captions.split_list(spec)
  if not entries:
    raise ValueError("config.data.path is empty; for config.data.source='mix' give "
                     "'KIND:PATH::KIND:PATH...' with KIND one of " + ", ".join(KINDS))
  parsed = []
  for entry in entries:
    kind, sep, rest = entry.partition(":")
    if (not sep and kind != "synthetic") or kind not in KINDS:
      raise ValueError(f"config.data.path entry {entry!r}: unknown kind {kind!r}; write "
                       f"KIND:PATH with KIND one of {', '.join(KINDS)} (tfds:NAME[:SPLIT])")
    split = "train"
    if kind == "tfds":
      rest, _, split = rest.partition(":")
      split = split or "train"
    if not rest and kind != "synthetic":
      raise ValueError(f"config.data.path entry {entry!r}: the {kind} source has no path")
    parsed.append((kind, rest, split))
  weights = captions.parse_weights(str(_option(config, "mix_weights", "")), len(parsed),
                                   "mix_weights", "sources")
  names = captions.split_list(str(_option(config, "mix_names", "")))
  if names and len(names) != len(parsed):
    raise ValueError(f"config.data.mix_names={_option(config, 'mix_names', '')!r} has "
                     f"{len(names)} names for {len(parsed)} sources")
  if not names:
    kinds = [k for k, _, _ in parsed]
    seen: dict[str, int] = {}
    for kind in kinds:
      names.append(kind if kinds.count(kind) == 1 else f"{kind}{seen.get(kind, 0)}")
      seen[kind] = seen.get(kind, 0) + 1
  for name in names:
    if not _NAME.match(name):
      raise ValueError(f"config.data.mix_names: {name!r} is not a metric name (letters, "
                       "digits, '_', '.', '-')")
  if len(set(names)) != len(names):
    raise ValueError(f"config.data.mix_names: {names} are not unique")
  return [Component(kind, path, name, float(w), split)
          for (kind, path, split), name, w in zip(parsed, names, weights)]


def validate(config, cache_dir: Optional[str], csv_options: Sequence[str]) -> list[Component]:
  """parse(config), then each source as its own source checks it (a path that matches
  nothing, a missing column...), the message naming the entry; ValueError (one line)."""
  from clip_jax.data import csv_source, files_source, tfds_source, wds  # pylint: disable=g-import-not-at-top
  components = parse(config)
  for c in components:
    picker = captions.picker(config, c.kind)
    try:
      if c.kind == "wds":
        wds.validate_shards(c.path)
      elif c.kind == "csv":
        csv_source.validate(c.path, *csv_options, picker=picker)
      elif c.kind == "files":
        files_source.validate(c.path, cache_dir)
      elif c.kind == "tfds":
        tfds_source.validate(c.path, c.split, config.data.data_dir)
    except ValueError as e:
      raise ValueError(f"config.data.path entry {c.entry!r} (source {c.name!r}): {e}") from None
  return components


def source_seed(seed: int, source: int) -> int:
  """The seed of source `source` of a mixture: its record order, augmentation, captions."""
  return int(np.random.SeedSequence([int(seed) & 0xFFFFFFFF, source]).generate_state(1)[0])


class MixDraw:
  """The source of every position of every global batch, and which draw of that source it is.

  counts(step) ~ multinomial(global_batch, probs), drawn 1024 steps at a time; the positions
  of step `step` are a permutation of those counts. `source_index(step, j)` -> (source, n):
  position j reads the n-th draw of its source (counted over all earlier positions and
  steps), a pure function of (seed, step, j); resuming at step 10^6 sums 10^3 blocks.
  """

  BLOCK = 1024

  def __init__(self, probs: Sequence[float], global_batch: int, seed: int):
    self.probs = np.asarray(probs, np.float64)
    self.global_batch = int(global_batch)
    self._seed = int(seed) & 0xFFFFFFFF
    self._block_prefix = [np.zeros(len(self.probs), np.int64)]  # counts before block k
    self._lock = threading.Lock()
    # Per instance (not functools on methods): caches die with the draw.
    self._block = functools.lru_cache(maxsize=4)(self._compute_block)
    self.arrangement = functools.lru_cache(maxsize=8)(self._compute_arrangement)

  def __reduce__(self):  # grain's worker processes get a copy without the caches or lock
    return MixDraw, (self.probs, self.global_batch, self._seed)

  def _compute_block(self, block: int) -> np.ndarray:
    rng = np.random.default_rng([self._seed, _SALT_COUNTS, block])
    return rng.multinomial(self.global_batch, self.probs, size=self.BLOCK)

  def counts(self, step: int) -> np.ndarray:
    """[sources] positions of global batch `step` per source."""
    block, offset = divmod(int(step), self.BLOCK)
    return self._block(block)[offset]

  def counts_before(self, step: int) -> np.ndarray:
    """[sources] draws of each source in global batches 0 .. step-1."""
    block, offset = divmod(int(step), self.BLOCK)
    with self._lock:
      while len(self._block_prefix) <= block:
        k = len(self._block_prefix) - 1
        self._block_prefix.append(self._block_prefix[-1] + self._compute_block(k).sum(0))
      prefix = self._block_prefix[block]
    return prefix + self._block(block)[:offset].sum(0)

  def _compute_arrangement(self, step: int) -> tuple[np.ndarray, np.ndarray]:
    """(source [B], n [B]) of every position of global batch `step`."""
    counts = self.counts(step)
    order = np.random.default_rng([self._seed, _SALT_ORDER, int(step)]).permutation(
        self.global_batch)
    sources = np.repeat(np.arange(len(counts)), counts)[order]
    ranks = np.empty(self.global_batch, np.int64)
    for s, count in enumerate(counts):
      ranks[sources == s] = np.arange(count)
    return sources, ranks + self.counts_before(step)[sources]

  def source_index(self, step: int, position: int) -> tuple[int, int]:
    sources, draws = self.arrangement(int(step))
    return int(sources[position]), int(draws[position])


class MixSchedule:
  """This process's positions -> (source, n): its slice of each global batch, in order.

  first_position: this process's stream starts that many samples in (step * local_batch
  to begin after `step` global batches, on any number of processes).
  """

  def __init__(self, draw: MixDraw, *, local_batch: int, process_index: int,
               first_position: int = 0):
    self._draw, self._local_batch = draw, int(local_batch)
    self._offset = int(process_index) * self._local_batch
    self._first = int(first_position)

  def __len__(self) -> int:
    return sys.maxsize

  def __getitem__(self, position: int) -> tuple[int, int]:
    step, row = divmod(int(position) + self._first, self._local_batch)
    return self._draw.source_index(step, self._offset + row)


class StreamLoader:
  """n -> sample of a random-access source: its order (n -> (epoch, index)), then its loader."""

  def __init__(self, order, loader: Callable[[tuple[int, int]], dict]):
    self._order, self._loader = order, loader

  def __call__(self, n: int) -> dict:
    return self._loader(self._order[n])


class MixLoader:
  """(source, n) -> that source's sample (tagged with "source"), or a placeholder that
  MixIterDataset fills from the source's stream (loaders[source] None: wds)."""

  def __init__(self, loaders: Sequence[Optional[StreamLoader]]):
    self._loaders = list(loaders)

  def __call__(self, element: tuple[int, int]) -> dict:
    source, n = element
    loader = self._loaders[source]
    if loader is None:
      return {_STREAM: source}
    out = loader(n)
    out["source"] = source
    return out


class _MixIterator(grain.DatasetIterator):

  def __init__(self, positions: grain.DatasetIterator, streams: dict[int, grain.DatasetIterator]):
    # All parents: grain closes them, starts their prefetch and shares its context with them.
    super().__init__([positions, *streams.values()])
    self._positions, self._streams = positions, streams

  def __next__(self) -> dict:
    element = next(self._positions)
    source = element.get(_STREAM)
    if source is not None:
      element = dict(next(self._streams[source]))
      element["source"] = source
    return element

  def get_state(self) -> dict:
    return {"positions": self._positions.get_state(),
            "streams": {str(s): it.get_state() for s, it in self._streams.items()}}

  def set_state(self, state: dict) -> None:
    self._positions.set_state(state["positions"])
    for s, it in self._streams.items():
      it.set_state(state["streams"][str(s)])


class MixIterDataset(grain.IterDataset):
  """The positions' samples in order, each wds placeholder replaced by the next sample of
  that source's stream; the state holds the position and every stream's read position.

  The streams are parents too, so grain's worker processes split their shards as when a
  wds source is read alone.
  """

  def __init__(self, positions: grain.IterDataset, streams: dict[int, grain.IterDataset]):
    self._stream_ids = sorted(streams)
    super().__init__([positions] + [streams[s] for s in self._stream_ids])

  def __iter__(self) -> _MixIterator:
    positions, *streams = self._parents
    return _MixIterator(positions.__iter__(),
                        {s: ds.__iter__() for s, ds in zip(self._stream_ids, streams)})

  def __str__(self) -> str:
    return f"MixIterDataset(streams={self._stream_ids})"
