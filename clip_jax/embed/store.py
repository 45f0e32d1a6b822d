"""The embedder's output folder, local or gs://, as the filter and the search index read it.

    OUT/img_emb/img_emb_00000.npy         [rows, embed_dim] L2-normalised image embeddings
    OUT/text_emb/text_emb_00000.npy       [rows, embed_dim] L2-normalised text embeddings
    OUT/metadata/metadata_00000.parquet   key, image_path or url, caption, clip_score, ...
    OUT/manifest.json                     the run's settings and its committed partitions

Row i of the three files of a partition is one sample. Each file is written whole (renamed
into place on local disk, one upload on an object store) and a partition counts as
committed only once the manifest lists it, with its rows, its skipped samples and the
sha256 of each of its files; the manifest is rewritten (atomically) after each partition.
"""
from __future__ import annotations

import hashlib
import io
import json
from typing import Iterator, Optional

import numpy as np

from clip_jax import storage

MANIFEST = "manifest.json"
FORMAT_VERSION = 1
# Modality -> (folder, file prefix) of its embeddings.
EMBEDDINGS = {"image": "img_emb", "text": "text_emb"}
# What a rerun must agree on with the run that wrote the folder.
SETTINGS = ("checkpoint", "dataset", "modalities", "partition_size", "dtype")


def relative_paths(k: int, modalities) -> dict[str, str]:
  """{"image"|"text"|"metadata": path relative to OUT} of partition k."""
  paths = {m: f"{EMBEDDINGS[m]}/{EMBEDDINGS[m]}_{k:05d}.npy" for m in modalities}
  paths["metadata"] = f"metadata/metadata_{k:05d}.parquet"
  return paths


def npy_bytes(array: np.ndarray) -> bytes:
  buffer = io.BytesIO()
  np.save(buffer, np.ascontiguousarray(array), allow_pickle=False)
  return buffer.getvalue()


def table_from_rows(rows: list[dict], columns: list[str]):
  """A pyarrow table of `rows` with `columns` in this order; a column whose values mix types
  (a CSV's or json's field) is written as strings."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  arrays = []
  for name in columns:
    values = [row.get(name) for row in rows]
    try:
      arrays.append(pa.array(values))
    except (pa.ArrowInvalid, pa.ArrowTypeError):
      arrays.append(pa.array([None if v is None else str(v) for v in values], pa.string()))
  return pa.Table.from_arrays(arrays, names=columns) if columns else pa.table({})


def parquet_bytes(table) -> bytes:
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  buffer = io.BytesIO()
  pq.write_table(table, buffer, compression="zstd")  # no timestamps: the same rows, same bytes
  return buffer.getvalue()


def write_files(output_dir: str, files: dict[str, bytes]) -> dict[str, str]:
  """Writes {relative path: bytes}, each atomically; returns {relative path: sha256}."""
  hashes = {}
  for relative, data in files.items():
    storage.write_bytes(storage.join(output_dir, relative), data)
    hashes[relative] = hashlib.sha256(data).hexdigest()
  return hashes


def read_manifest(output_dir: str) -> Optional[dict]:
  path = storage.join(output_dir, MANIFEST)
  if not storage.exists(path):
    return None
  try:
    return json.loads(storage.read_text(path))
  except ValueError:
    raise ValueError(f"{path} is not valid JSON; it was not written by clip_jax.embed "
                     "(which writes it atomically): use a new --output_dir") from None


def write_manifest(output_dir: str, manifest: dict) -> None:
  storage.write_text(storage.join(output_dir, MANIFEST),
                     json.dumps(manifest, indent=1, sort_keys=True) + "\n")


def load_manifest(embeddings_dir: str) -> dict:
  """The manifest of an embedder's output; ValueError (one line) if there is none."""
  manifest = read_manifest(embeddings_dir)
  if manifest is None:
    raise ValueError(f"--embeddings {embeddings_dir}: no {MANIFEST} there; pass the "
                     "--output_dir of `python -m clip_jax.embed`")
  return manifest


def read_bytes(path: str) -> bytes:
  from clip_jax.data import wds  # pylint: disable=g-import-not-at-top
  return wds.read_bytes(path)


def read_embeddings(embeddings_dir: str, entry: dict, modality: str) -> np.ndarray:
  """The [rows, embed_dim] embeddings of one manifest partition entry."""
  relative = entry["files"][modality]
  return np.load(io.BytesIO(read_bytes(storage.join(embeddings_dir, relative))),
                 allow_pickle=False)


def read_metadata(embeddings_dir: str, entry: dict):
  """The metadata table (pyarrow) of one manifest partition entry."""
  import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
  relative = entry["files"]["metadata"]
  return pq.read_table(io.BytesIO(read_bytes(storage.join(embeddings_dir, relative))))


def iter_partitions(embeddings_dir: str, modalities=()) -> Iterator[tuple[dict, dict, object]]:
  """(manifest entry, {modality: embeddings}, metadata table) of each committed partition,
  in order; ValueError (one line) for a modality the run did not embed."""
  manifest = load_manifest(embeddings_dir)
  for modality in modalities:
    if modality not in manifest["modalities"]:
      raise ValueError(f"--embeddings {embeddings_dir} holds {'+'.join(manifest['modalities'])}"
                       f" embeddings only, not {modality}; rerun clip_jax.embed with "
                       f"--modalities image,text")
  for entry in manifest["partitions"]:
    yield (entry, {m: read_embeddings(embeddings_dir, entry, m) for m in modalities},
           read_metadata(embeddings_dir, entry))


def concat_tables(tables: list):
  """One table of the partitions' metadata (a column missing from some is null there)."""
  import pyarrow as pa  # pylint: disable=g-import-not-at-top
  if not tables:
    return pa.table({})
  try:
    return pa.concat_tables(tables, promote_options="default")
  except (pa.ArrowInvalid, pa.ArrowTypeError):  # a column typed differently across partitions
    return pa.concat_tables([t.cast(pa.schema([(f.name, pa.string()) if f.name not in
                                               ("clip_score",) else f for f in t.schema]))
                             for t in tables], promote_options="default")
