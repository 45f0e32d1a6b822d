r"""Evaluates a checkpoint: zero-shot classification, retrieval or linear probe, or a suite.

  python -m clip_jax.evaluate --checkpoint DIR --task zeroshot --dataset imagenet2012 \
      --split validation --data_dir ~/tensorflow_datasets --output results.json
  python -m clip_jax.evaluate --workdir runs/demo --task zeroshot --dataset synthetic
  python -m clip_jax.evaluate --checkpoint DIR --task zeroshot \
      --dataset imagefolder:/data/imagenet/val
  python -m clip_jax.evaluate --checkpoint DIR --task linear_probe --dataset cifar10 \
      --shots 1,2,4,8,16 --seeds 3
  python -m clip_jax.evaluate --checkpoint DIR --suite robustness --data_dir /data \
      --output_dir results/robustness [--compare results/other_model]

Datasets: "synthetic", a TFDS name, wds shards ("wds:/data/val-{00000..00007}.tar"),
class folders ("imagefolder:/data/imagenet/val": one sub-folder per class; ImageNet WordNet
ids map to OpenAI's class names, other folder names are the class names unless
--classnames names a prompt-registry entry), an open_clip-style CSV/TSV of image paths and
captions ("csv:/data/val.tsv", columns filepath and title) or an img2dataset `files` tree
("files:/data/val": 000000123.jpg beside 000000123.txt).
Retrieval uses every caption of each image (TFDS caption sequences such as coco_captions',
the lines of a wds key.txt or a "captions" list in key.json, the lines of a files .txt,
--captions_per_image for the synthetic set) and reports "num_texts" beside "num_examples".
The JSON has CLIP_benchmark's shape: {"dataset", "model", "task", "metrics", ...}.
Suites (--suite): paper_zeroshot, robustness, smoke, or "task:dataset,task:dataset";
each dataset's JSON, then summary.json, summary.md (a table) and summary.png (a chart) in
--output_dir; a dataset that is not available is listed there as skipped.
"""
from __future__ import annotations

import argparse
import json
import sys

import jax

from clip_jax import distributed, storage
from clip_jax.evaluate.runner import (SYNTHETIC_DEFAULT_CAPTIONS, SYNTHETIC_DEFAULT_EXAMPLES,
                                      TASKS, Options)


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m clip_jax.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--checkpoint", help="a converted model dir, a workdir, a checkpoint step "
                     "dir or a pretrained name (openai:ViT-B/32, open_clip:ARCH/TAG, "
                     "hf-hub:ORG/REPO, local-dir:PATH)")
  where.add_argument("--workdir", help="a training workdir: its latest checkpoint")
  parser.add_argument("--weights", default="auto", choices=("auto", "ema", "params"),
                      help="a training checkpoint's EMA weights (auto: when it has them) or its "
                      "trained params")
  parser.add_argument("--task", default=None, help=f"one of {', '.join(TASKS)}")
  parser.add_argument("--dataset", default=None,
                      help="synthetic, a TFDS name, wds:PATTERN, imagefolder:DIR, "
                           "csv:FILE or files:DIR")
  parser.add_argument("--suite", default=None,
                      help="paper_zeroshot, robustness, smoke, or task:dataset,task:dataset,...")
  parser.add_argument("--output_dir", default=None,
                      help="--suite: where the per-dataset JSONs and summary.{json,md,png} go")
  parser.add_argument("--compare", default=None,
                      help="--suite: the --output_dir of another checkpoint's run, shown beside")
  parser.add_argument("--split", default=None,
                      help="evaluation split (default: test; imagenet2012: validation)")
  parser.add_argument("--train_split", default="train", help="linear probe: the training split")
  parser.add_argument("--data_dir", default=None,
                      help="TFDS data_dir; for --suite also where class folders are looked for")
  parser.add_argument("--classnames", default=None,
                      help="image folders: the prompt-registry entry whose classes (in order) "
                           "the sorted folders are")
  parser.add_argument("--shots", default=None,
                      help="linear probe: few-shot, k examples per class, e.g. 1,2,4,8,16")
  parser.add_argument("--seeds", type=int, default=1, help="few-shot: draws per k")
  parser.add_argument("--batch_size", type=int, default=256, help="global batch")
  parser.add_argument("--num_examples", type=int, default=None,
                      help=f"limit (synthetic: default {SYNTHETIC_DEFAULT_EXAMPLES})")
  parser.add_argument("--num_train_examples", type=int, default=None,
                      help="linear probe: limit on the training split")
  parser.add_argument("--captions_per_image", type=int, default=None,
                      help="retrieval on synthetic: distinct captions per image "
                           f"(default {SYNTHETIC_DEFAULT_CAPTIONS}); other sets use all theirs")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--cache_dir", default=None, help="cache of zero-shot text classifiers")
  parser.add_argument("--output", default=None, help="results JSON (default: stdout only)")
  parser.add_argument("--no_progress", action="store_true", help="--suite: no progress bars")
  # Multi-host: as for the trainer (also CLIP_JAX_* env, SLURM and TPU pods, see launch/).
  parser.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  return parser.parse_args(argv)


def _validate_common(args) -> None:
  path = args.checkpoint or args.workdir
  from clip_jax import pretrained
  if args.checkpoint and pretrained.is_name(path):
    pretrained.check_name(path)  # downloaded and converted (once) when the evaluator starts
  elif not storage.exists(path):
    flag = "--checkpoint" if args.checkpoint else "--workdir"
    raise ValueError(f"{flag} {path} does not exist; pass a converted model dir, a training "
                     "workdir or a checkpoints/<step> dir")
  if args.batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
  for flag in ("num_examples", "num_train_examples", "seeds"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise ValueError(f"--{flag} must be positive, got {value}")
  if args.shots is not None:
    from clip_jax.evaluate.fewshot import parse_shots
    args.shots = parse_shots(args.shots)
  if args.classnames is not None:
    from clip_jax.evaluate import registry
    registry.resolve(args.classnames)


def validate_suite_args(args) -> None:
  if args.task is not None or args.dataset is not None:
    raise ValueError("--suite runs its own tasks and datasets; drop --task/--dataset or "
                     "list them as --suite task:dataset,...")
  if not args.output_dir:
    raise ValueError("--suite needs --output_dir, where the results and the summary go")
  if args.output:
    raise ValueError("--output is for one task; --suite writes into --output_dir")
  _validate_common(args)
  from clip_jax.evaluate import suite, summary
  suite.parse_suite(args.suite)
  if args.compare:
    summary.load(args.compare)


def validate_args(args) -> None:
  """Every user error, one line each, before anything heavy is imported or loaded."""
  if args.suite is not None:
    validate_suite_args(args)
    return
  for flag in ("output_dir", "compare"):
    if getattr(args, flag):
      raise ValueError(f"--{flag} goes with --suite; one task writes --output")
  if args.task is None or args.dataset is None:
    raise ValueError("pass --task and --dataset (one evaluation) or --suite (many)")
  if args.task not in TASKS:
    raise ValueError(f"unknown task {args.task!r}; known: {', '.join(TASKS)}")
  _validate_common(args)
  if args.shots is not None and args.task != "linear_probe":
    raise ValueError("--shots applies to --task linear_probe only")
  from clip_jax.evaluate import datasets
  kind = datasets.dataset_kind(args.dataset)
  if args.captions_per_image is not None:
    from clip_jax.data.synthetic import MAX_CAPTIONS
    if args.task != "retrieval" or kind != "synthetic":
      raise ValueError("--captions_per_image applies to --task retrieval --dataset synthetic "
                       "only; other sets use every caption they hold")
    if not 1 <= args.captions_per_image <= MAX_CAPTIONS:
      raise ValueError(f"--captions_per_image must be in [1, {MAX_CAPTIONS}], got "
                       f"{args.captions_per_image}")
  if args.classnames is not None and kind != "imagefolder":
    raise ValueError("--classnames applies to image folders (--dataset imagefolder:DIR)")
  captions_only = {"wds": "wds shards", "csv": "CSV/TSV files", "files": "files trees"}
  if args.task == "zeroshot" and kind not in ("imagefolder", *captions_only):
    from clip_jax.evaluate import registry
    registry.resolve(args.dataset)
  if kind in captions_only and args.task != "retrieval":
    raise ValueError(f"--task {args.task} needs class labels; {captions_only[kind]} hold "
                     "captions only (use --task retrieval)")
  if kind != "synthetic":
    datasets.validate_dataset(args.dataset, args.split or datasets.default_split(args.dataset),
                              args.data_dir)
    if args.task == "linear_probe":
      datasets.validate_dataset(args.dataset, args.train_split, args.data_dir, train=True)
    if args.task == "zeroshot" and kind == "imagefolder":
      datasets.label_space(args.dataset, args.split or "test", args.data_dir, args.classnames)


def options(args) -> Options:
  return Options(split=args.split, train_split=args.train_split, data_dir=args.data_dir,
                 batch_size=args.batch_size, num_examples=args.num_examples,
                 num_train_examples=args.num_train_examples,
                 captions_per_image=args.captions_per_image, seed=args.seed,
                 classnames=args.classnames, shots=args.shots, seeds=args.seeds)


def evaluate(args) -> dict:
  from clip_jax.evaluate.runner import Evaluator
  evaluator = Evaluator(args.checkpoint or args.workdir, args.cache_dir, args.weights)
  return evaluator.run(args.task, args.dataset, options(args))


def run_suite(args) -> dict:
  """Runs the suite, writes its files into --output_dir and returns the summary."""
  from clip_jax.evaluate import suite, summary
  from clip_jax.evaluate.runner import Evaluator
  other = summary.load(args.compare) if args.compare else None
  evaluator = Evaluator(args.checkpoint or args.workdir, args.cache_dir, args.weights)
  result = suite.run_suite(evaluator, args.suite, options(args), args.output_dir,
                           progress=not args.no_progress)
  if jax.process_index() == 0:
    summary.write(result, args.output_dir, other)
  return result


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    validate_args(args)
    if args.suite is not None:
      run_suite(args)
      print(storage.read_text(storage.join(args.output_dir, "summary.md"))
            if jax.process_index() == 0 else "", end="")
      return 0
    results = evaluate(args)
  except (ValueError, FileNotFoundError) as e:
    # User errors: one line, no traceback.
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  text = json.dumps(results, indent=2)
  print(text)
  if args.output and jax.process_index() == 0:
    storage.write_text(args.output, text + "\n")  # local (folders made) or gs://
  return 0


if __name__ == "__main__":
  sys.exit(main())
