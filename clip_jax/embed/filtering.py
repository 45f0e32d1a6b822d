"""Keep the samples whose CLIP score (image-text cosine) passes: `clip_jax.embed.filter_embeddings`.

LAION kept clip_score >= 0.28 (ViT-B/32; 0.3 for LAION-400M), DataComp's best baselines the
top 30% by ViT-L/14 score. The kept samples are written in dataset order as open_clip's
TSV, which the trainer reads as csv data as it is (`--config.data.source=csv
--config.data.path=FILTERED.tsv`):

    filepath<TAB>title<TAB>key<TAB>clip_score[<TAB>url]

with absolute image paths. Data without image paths (wds shards) gives the same TSV without
the filepath column, and FILTERED_keys.json: {shard: [kept keys]}. A histogram of all the
scores with the threshold marked goes to FILTERED_scores.png.
"""
from __future__ import annotations

import csv
import io
import json
import os
from typing import Optional

import numpy as np

from clip_jax import storage
from clip_jax.embed import store


def kept_rows(scores: np.ndarray, *, min_score: Optional[float] = None,
              top_fraction: Optional[float] = None) -> np.ndarray:
  """Indices (ascending) of the rows kept: score >= min_score, or the round(fraction * N)
  highest scores (ties: the earlier row first)."""
  if (min_score is None) == (top_fraction is None):
    raise ValueError("pass exactly one of --min_score and --top_fraction")
  if min_score is not None:
    return np.flatnonzero(scores >= min_score)
  if not 0.0 < top_fraction <= 1.0:
    raise ValueError(f"--top_fraction {top_fraction}: must be in (0, 1]")
  count = int(round(top_fraction * len(scores)))
  return np.sort(np.argsort(-scores, kind="stable")[:count])


def _tsv(table, rows: np.ndarray, scores: np.ndarray) -> str:
  columns = table.column_names
  paths = table.column("image_path").to_pylist() if "image_path" in columns else None
  header = (["filepath"] if paths else []) + ["title", "key", "clip_score"]
  extra = [c for c in ("url", "shard") if c in columns]
  values = {c: table.column(c).to_pylist() for c in ["caption", "key"] + extra}
  buffer = io.StringIO()
  writer = csv.writer(buffer, delimiter="\t", lineterminator="\n")
  writer.writerow(header + extra)
  for i in rows.tolist():
    writer.writerow(([paths[i]] if paths else []) + [values["caption"][i], values["key"][i],
                                                     f"{scores[i]:.6f}"]
                    + [values[c][i] for c in extra])
  return buffer.getvalue()


def _histogram_png(scores: np.ndarray, threshold: float, kept: int) -> bytes:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  figure, axes = plt.subplots(figsize=(7, 4), dpi=100)
  axes.hist(scores, bins=min(100, max(10, len(scores) // 20)), color="#4c72b0")
  axes.axvline(threshold, color="#c44e52", linestyle="--",
               label=f"threshold {threshold:.4f}: {kept} of {len(scores)} kept")
  axes.set_xlabel("clip_score (image-text cosine)")
  axes.set_ylabel("samples")
  axes.legend()
  figure.tight_layout()
  buffer = io.BytesIO()
  figure.savefig(buffer, format="png", metadata={"Software": None})
  plt.close(figure)
  return buffer.getvalue()


def filter_embeddings(embeddings_dir: str, output: str, *, min_score: Optional[float] = None,
                      top_fraction: Optional[float] = None,
                      histogram: Optional[str] = None) -> dict:
  """Writes the kept samples of an embedder's output as a TSV (see the module doc) and the
  scores' histogram; returns {"kept", "total", "threshold", "output", "histogram", ...}."""
  kept_rows(np.zeros(1), min_score=min_score, top_fraction=top_fraction)  # the flags, early
  tables = [table for _, _, table in store.iter_partitions(embeddings_dir)]
  table = store.concat_tables(tables)
  if "clip_score" not in table.column_names:
    raise ValueError(f"--embeddings {embeddings_dir} has no clip_score (it needs both image "
                     "and text embeddings); rerun clip_jax.embed with --modalities image,text")
  scores = np.asarray(table.column("clip_score").to_numpy(), np.float32)
  if not len(scores):
    raise ValueError(f"--embeddings {embeddings_dir} holds no embedded samples")
  rows = kept_rows(scores, min_score=min_score, top_fraction=top_fraction)
  threshold = float(min_score if min_score is not None else
                    (scores[rows].min() if len(rows) else np.inf))
  storage.write_text(output, _tsv(table, rows, scores))
  stem = os.path.splitext(output)[0]
  result = {"kept": int(len(rows)), "total": int(len(scores)), "threshold": threshold,
            "output": output}
  if "image_path" not in table.column_names and "shard" in table.column_names:
    shards, keys = table.column("shard").to_pylist(), table.column("key").to_pylist()
    per_shard: dict[str, list[str]] = {}
    for i in rows.tolist():
      per_shard.setdefault(shards[i], []).append(keys[i])
    result["keys"] = f"{stem}_keys.json"
    storage.write_text(result["keys"], json.dumps(per_shard, indent=1) + "\n")
  result["histogram"] = histogram or f"{stem}_scores.png"
  storage.write_bytes(result["histogram"], _histogram_png(scores, threshold, len(rows)))
  return result
