"""Embed a whole dataset with a CLIP, and filter it by CLIP score.

  python -m clip_jax.embed --checkpoint CKPT --dataset files:/data/cc3m --output_dir OUT \
      [--modalities image,text] [--batch_size 256] [--partition_size 100000] [--dtype float16]
  python -m clip_jax.embed filter --embeddings OUT --min_score 0.28 --output FILTERED.tsv
  python -m clip_jax.embed filter --embeddings OUT --top_fraction 0.3 --output FILTERED.tsv

CKPT is anything `clip_jax.load` takes; the dataset is wds:PATTERN, csv:PATH, files:DIR or
imagefolder:DIR (`sources`); OUT is clip-retrieval's layout (img_emb/, text_emb/,
metadata/ parquet, see `store`) plus a manifest of the committed partitions, on local disk
or gs://. A killed run, run again, skips what it committed and ends with the same bytes as
an uninterrupted run (`run`). The filter (`filtering`) writes a TSV the trainer reads as
csv data. Python: `clip_jax.embed.embed(...)`, `clip_jax.embed.filter_embeddings(...)`.
On a pod, every host runs the same command (`--coordinator_address` etc. as the trainer's,
or auto-detected).

`main` is the command line (`python -m clip_jax.embed`; `__main__` only calls it).
"""
from __future__ import annotations

import argparse
import json
import logging
import sys

from clip_jax.embed.filtering import filter_embeddings
from clip_jax.embed.run import DTYPES, embed

__all__ = ["embed", "filter_embeddings", "main"]


def _embed_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.embed",
      description="Embed a dataset with a CLIP model into OUT/img_emb, OUT/text_emb and "
                  "OUT/metadata (resumable). `python -m clip_jax.embed filter --help`: keep "
                  "the samples by CLIP score.")
  parser.add_argument("--checkpoint", required=True,
                      help="anything clip_jax.load takes: a converted dir, a trainer workdir, "
                           "a pretrained name (openai:ViT-B/32), weights")
  parser.add_argument("--dataset", required=True,
                      help="wds:PATTERN | csv:PATH | files:DIR | imagefolder:DIR")
  parser.add_argument("--output_dir", required=True, help="local folder or gs:// URL")
  parser.add_argument("--modalities", default="image,text", help="image, text or image,text")
  parser.add_argument("--batch_size", type=int, default=256,
                      help="global batch (rounded up to a multiple of the devices)")
  parser.add_argument("--partition_size", type=int, default=100_000,
                      help="samples per output partition (the unit a rerun skips)")
  parser.add_argument("--dtype", choices=DTYPES, default="float16",
                      help="of the stored embeddings (clip_score is computed in float32)")
  parser.add_argument("--csv_image_key", default="filepath", help="csv: the image column")
  parser.add_argument("--csv_caption_key", default="title", help="csv: the caption column")
  parser.add_argument("--csv_separator", default="\t", help="csv: the separator (tab)")
  parser.add_argument("--workers", type=int, default=None,
                      help="threads reading and decoding samples (default 2 per CPU, <= 32)")
  parser.add_argument("--progress_bar", action=argparse.BooleanOptionalAction, default=True)
  for flag in ("coordinator_address", "num_processes", "process_id"):
    parser.add_argument(f"--{flag}", type=int if flag != "coordinator_address" else str,
                        help="multi-host: as the trainer's (default: auto-detected)")
  return parser


def _filter_parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.embed filter",
      description="Keep the samples whose CLIP score passes; write them as an open_clip TSV "
                  "(filepath, title) that the trainer reads as csv data, and a histogram.")
  parser.add_argument("--embeddings", required=True, help="the embedder's --output_dir")
  threshold = parser.add_mutually_exclusive_group(required=True)
  threshold.add_argument("--min_score", type=float, help="keep clip_score >= this (LAION: 0.28)")
  threshold.add_argument("--top_fraction", type=float,
                         help="keep this fraction with the highest scores (DataComp: 0.3)")
  parser.add_argument("--output", required=True, help="the TSV to write (local or gs://)")
  parser.add_argument("--histogram", default=None,
                      help="the scores' histogram PNG (default: OUTPUT's stem + _scores.png)")
  return parser


def _log_to_stderr(name: str) -> None:
  """The package's INFO lines (one per partition, the summary) on stderr."""
  logger = logging.getLogger(name)
  if not logger.handlers:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s: %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


def _fail(error: Exception) -> int:
  print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
  return 1


def main(argv=None) -> int:
  """The command line, `python -m clip_jax.embed [filter]` (run by __main__.py)."""
  argv = list(sys.argv[1:] if argv is None else argv)
  _log_to_stderr("clip_jax.embed")
  if argv[:1] == ["filter"]:
    args = _filter_parser().parse_args(argv[1:])
    try:
      result = filter_embeddings(args.embeddings, args.output, min_score=args.min_score,
                                 top_fraction=args.top_fraction, histogram=args.histogram)
    except ValueError as e:
      return _fail(e)
    print(json.dumps(result))
    return 0
  args = _embed_parser().parse_args(argv)
  from clip_jax import distributed  # pylint: disable=g-import-not-at-top
  try:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    manifest = embed(args.checkpoint, args.dataset, args.output_dir, modalities=args.modalities,
                     batch_size=args.batch_size, partition_size=args.partition_size,
                     dtype=args.dtype, csv_image_key=args.csv_image_key,
                     csv_caption_key=args.csv_caption_key, csv_separator=args.csv_separator,
                     workers=args.workers, progress_bar=args.progress_bar)
  except ValueError as e:
    return _fail(e)
  print(json.dumps({k: manifest[k] for k in ("rows", "skipped_samples", "embedded", "reused",
                                              "forward_passes")} | {"output_dir": args.output_dir}))
  return 0
