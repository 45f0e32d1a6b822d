"""A suite's summary: summary.json, a markdown table and a bar chart, optionally beside a
second checkpoint's summary (--compare).

Rows are (dataset, task, metric, value[, std], examples): zero-shot top-1/top-5, linear
probe top-1 (per k with its standard deviation over seeds for few-shot probes), retrieval
recall@1/@5. With ImageNet and its variants, the distribution-shift section lists each
variant's top-1 and their mean against ImageNet's, as the CLIP paper reports them.
"""
from __future__ import annotations

import io
import json
import os
from typing import Optional

from clip_jax import storage

ROW_METRICS = {
    "zeroshot_classification": ("acc1", "acc5"),
    "linear_probe": ("lp_acc1",),
    "zeroshot_retrieval": ("image_retrieval_recall@1", "image_retrieval_recall@5",
                           "text_retrieval_recall@1", "text_retrieval_recall@5"),
}


def _rows(name: str, result: dict) -> list[dict]:
  metrics, task = result["metrics"], result["task"]
  base = {"dataset": name, "task": task, "examples": int(result["num_examples"])}
  if task == "linear_probe" and "fewshot" in result:
    return [{**base, "metric": f"lp_acc1 ({k}-shot)", "value": metrics[f"{k}shot_lp_acc1"],
             "std": metrics[f"{k}shot_lp_acc1_std"]} for k in result["fewshot"]["shots"]]
  return [{**base, "metric": m, "value": float(metrics[m])}
          for m in ROW_METRICS.get(task, ()) if m in metrics]


def distribution_shift(results: list[dict]) -> Optional[dict]:
  """ImageNet top-1, each variant's, their mean and the mean's change from ImageNet."""
  from clip_jax.evaluate.registry import IMAGENET, IMAGENET_VARIANTS
  acc = {r["name"]: r["result"]["metrics"]["acc1"] for r in results
         if r["result"]["task"] == "zeroshot_classification"}
  variants = {v: acc[v] for v in IMAGENET_VARIANTS if v in acc}
  if not variants:
    return None
  mean = sum(variants.values()) / len(variants)
  out = {"variants": variants, "variant_mean_acc1": mean}
  if IMAGENET in acc:
    out.update(imagenet_acc1=acc[IMAGENET], shift=mean - acc[IMAGENET])
  return out


def build(results: list[dict], skipped: list[dict], *, suite: str, model: str,
          checkpoint: str) -> dict:
  """summary.json's content from [{"name", "file", "result"}] and the skipped datasets."""
  rows = [row for r in results for row in _rows(r["name"], r["result"])]
  summary = {"suite": suite, "model": model, "checkpoint": checkpoint, "rows": rows,
             "results": [{"dataset": r["name"], "task": r["result"]["task"], "file": r["file"]}
                         for r in results],
             "skipped": skipped}
  shift = distribution_shift(results)
  if shift is not None:
    summary["distribution_shift"] = shift
  return summary


def _label(summary: dict) -> str:
  return f"{summary['model']} ({os.path.basename(summary['checkpoint'].rstrip('/'))})"


def _value(row: dict) -> str:
  text = f"{row['value']:.4f}"
  return f"{text} ± {row['std']:.4f}" if "std" in row else text


def _key(row: dict) -> tuple:
  return row["dataset"], row["task"], row["metric"]


def markdown(summary: dict, other: Optional[dict] = None) -> str:
  """The summary table (and the skipped datasets, and the distribution shift) as markdown."""
  header = ["dataset", "task", "metric", "value", "examples"]
  others = {}
  if other is not None:
    others = {_key(r): r for r in other["rows"]}
    header[3:4] = [f"value: {_label(summary)}", f"value: {_label(other)}", "difference"]
  lines = [f"# {summary['suite']}: {_label(summary)}", "",
           "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in summary["rows"]:
    cells = [row["dataset"], row["task"], row["metric"], _value(row), str(row["examples"])]
    if other is not None:
      theirs = others.get(_key(row))
      cells[4:4] = [_value(theirs) if theirs else "-",
                    f"{row['value'] - theirs['value']:+.4f}" if theirs else "-"]
    lines.append("| " + " | ".join(cells) + " |")
  shift = summary.get("distribution_shift")
  if shift:
    lines += ["", "## Distribution shift (zero-shot top-1)", "",
              "| dataset | acc1 | change from imagenet2012 |", "|---|---|---|"]
    base = shift.get("imagenet_acc1")
    if base is not None:
      lines.append(f"| imagenet2012 | {base:.4f} | |")
    for name, acc in shift["variants"].items():
      lines.append(f"| {name} | {acc:.4f} | "
                   f"{'' if base is None else f'{acc - base:+.4f}'} |")
    count = len(shift["variants"])
    lines.append(f"| mean of {count} variant{'s' if count > 1 else ''} | "
                 f"{shift['variant_mean_acc1']:.4f} | "
                 f"{'' if base is None else format(shift['shift'], '+.4f')} |")
  if summary["skipped"]:
    lines += ["", "## Skipped", "", "| dataset | task | reason | how to prepare |",
              "|---|---|---|---|"]
    for s in summary["skipped"]:
      lines.append(f"| {s['dataset']} | {s['task']} | {s['reason']} | {s['how_to']} |")
  return "\n".join(lines) + "\n"


def chart(summary: dict, path: str, other: Optional[dict] = None) -> None:
  """A bar chart of each (dataset, task)'s main score (other's beside it), as PNG."""
  import matplotlib
  matplotlib.use("Agg")  # headless
  import matplotlib.pyplot as plt
  import numpy as np

  chosen = {}
  for row in summary["rows"]:
    # The first metric; for few-shot probes the largest k (their last row).
    if row["task"] == "linear_probe" or (row["dataset"], row["task"]) not in chosen:
      chosen[(row["dataset"], row["task"])] = row
  rows = list(chosen.values())
  labels = [f"{r['dataset']}\n{r['metric']}" for r in rows]
  series = [(_label(summary), [r["value"] for r in rows])]
  if other is not None:
    theirs = {_key(r): r["value"] for r in other["rows"]}
    series.append((_label(other), [theirs.get(_key(r), np.nan) for r in rows]))
  x = np.arange(len(rows))
  width = 0.8 / len(series)
  fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(rows) + 2), 4.5))
  for i, (name, values) in enumerate(series):
    ax.bar(x + (i - (len(series) - 1) / 2) * width, values, width, label=name)
  ax.set_xticks(x)
  ax.set_xticklabels(labels, rotation=30, ha="right", fontsize=8)
  ax.set_ylim(0, 1)
  ax.set_ylabel("score")
  ax.set_title(f"{summary['suite']}")
  ax.legend(fontsize=8)
  fig.tight_layout()
  buffer = io.BytesIO()
  fig.savefig(buffer, format="png", dpi=100)
  plt.close(fig)
  storage.write_bytes(path, buffer.getvalue())


def load(output_dir: str) -> dict:
  """A previous suite's summary.json (for --compare); ValueError (one line) if absent."""
  path = storage.join(output_dir, "summary.json")
  if not storage.is_file(path):
    raise ValueError(f"--compare {output_dir} has no summary.json; pass the --output_dir of "
                     "an earlier --suite run")
  return json.loads(storage.read_text(path))


def write(summary: dict, output_dir: str, other: Optional[dict] = None) -> None:
  """OUT/summary.json, OUT/summary.md and OUT/summary.png."""
  if other is not None:
    summary = {**summary, "compare": {"checkpoint": other["checkpoint"], "model": other["model"],
                                      "rows": other["rows"]}}
  storage.write_text(storage.join(output_dir, "summary.json"),
                     json.dumps(summary, indent=2) + "\n")
  storage.write_text(storage.join(output_dir, "summary.md"), markdown(summary, other))
  chart(summary, storage.join(output_dir, "summary.png"), other)
