r"""Evaluates a checkpoint: zero-shot classification, retrieval or linear probe.

  python -m clip_jax.evaluate --checkpoint DIR --task zeroshot --dataset imagenet2012 \
      --split validation --data_dir ~/tensorflow_datasets --output results.json
  python -m clip_jax.evaluate --workdir runs/demo --task zeroshot --dataset synthetic

Datasets: "synthetic", a TFDS name, or wds shards ("wds:/data/val-{00000..00007}.tar").
Retrieval uses every caption of each image (TFDS caption sequences such as coco_captions',
the lines of a wds key.txt or a "captions" list in key.json, --captions_per_image for the
synthetic set) and reports "num_texts" beside "num_examples".
The JSON has CLIP_benchmark's shape: {"dataset", "model", "task", "metrics", ...}.
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

import jax

from clip_jax import distributed

TASKS = {"zeroshot": "zeroshot_classification", "retrieval": "zeroshot_retrieval",
         "linear_probe": "linear_probe"}
SYNTHETIC_DEFAULT_EXAMPLES = 1000
SYNTHETIC_DEFAULT_CAPTIONS = 5


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m clip_jax.evaluate", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  where = parser.add_mutually_exclusive_group(required=True)
  where.add_argument("--checkpoint", help="a converted model dir, a workdir or a checkpoint step dir")
  where.add_argument("--workdir", help="a training workdir: its latest checkpoint")
  parser.add_argument("--task", required=True, help=f"one of {', '.join(TASKS)}")
  parser.add_argument("--dataset", required=True, help="synthetic, a TFDS name, or wds:PATTERN")
  parser.add_argument("--split", default=None, help="evaluation split (default: test)")
  parser.add_argument("--train_split", default="train", help="linear probe: the training split")
  parser.add_argument("--data_dir", default=None, help="TFDS data_dir")
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
  # Multi-host: as for the trainer (also CLIP_JAX_* env, SLURM and TPU pods, see launch/).
  parser.add_argument("--coordinator_address", default=None, help="HOST:PORT of process 0")
  parser.add_argument("--num_processes", type=int, default=None)
  parser.add_argument("--process_id", type=int, default=None)
  return parser.parse_args(argv)


def validate_args(args) -> None:
  """Every user error, one line each, before anything heavy is imported or loaded."""
  if args.task not in TASKS:
    raise ValueError(f"unknown task {args.task!r}; known: {', '.join(TASKS)}")
  path = args.checkpoint or args.workdir
  if not os.path.exists(path):
    flag = "--checkpoint" if args.checkpoint else "--workdir"
    raise ValueError(f"{flag} {path} does not exist; pass a converted model dir, a training "
                     "workdir or a checkpoints/<step> dir")
  if args.batch_size < 1:
    raise ValueError(f"--batch_size must be positive, got {args.batch_size}")
  for flag in ("num_examples", "num_train_examples"):
    value = getattr(args, flag)
    if value is not None and value < 1:
      raise ValueError(f"--{flag} must be positive, got {value}")
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
  if args.task == "zeroshot" and kind != "wds":
    from clip_jax.evaluate import registry
    registry.resolve(args.dataset)
  if kind == "wds" and args.task != "retrieval":
    raise ValueError(f"--task {args.task} needs class labels; wds shards hold captions only "
                     "(use --task retrieval)")
  if kind != "synthetic":
    datasets.validate_dataset(args.dataset, args.split or "test", args.data_dir)
    if args.task == "linear_probe":
      datasets.validate_dataset(args.dataset, args.train_split, args.data_dir)


def _checkpoint_id(path: str) -> str:
  # Path plus modification time: a rewritten checkpoint never reuses a cached classifier.
  path = os.path.abspath(path)
  return f"{path}@{os.path.getmtime(path)}"


def evaluate(args) -> dict:
  import jax
  import numpy as np
  from jax.sharding import Mesh

  from clip_jax.checkpoint import restore_params
  from clip_jax.evaluate import datasets, features, registry, retrieval, zeroshot
  from clip_jax.evaluate.linear_probe import linear_probe
  from clip_jax.models import create_model

  path = args.checkpoint or args.workdir
  params, model_config = restore_params(path)
  model = create_model(model_config)
  mesh = Mesh(np.asarray(jax.devices()), ("data",))
  image_size = model_config.vision.image_size
  kind = datasets.dataset_kind(args.dataset)
  split = args.split or "test"
  local_batch = -(-args.batch_size // jax.process_count())
  local_batch = -(-local_batch // jax.local_device_count()) * jax.local_device_count()

  def stream(split_name, num):
    return features.compute_features_from_batches(
        model, params, mesh,
        datasets.eval_batches(args.dataset, split_name, args.data_dir, image_size=image_size,
                              local_batch=local_batch, num_examples=num, seed=args.seed),
        encode={"images": "encode_image"})

  def synthetic_set(num, seed):
    from clip_jax.data.synthetic import zeroshot_eval_set
    return zeroshot_eval_set(num, image_size, seed)

  num_examples = args.num_examples
  extra = {}
  if kind == "synthetic" and num_examples is None:
    num_examples = SYNTHETIC_DEFAULT_EXAMPLES

  if args.task == "zeroshot":
    prompts = registry.get_prompts(args.dataset)
    classnames = list(prompts.classnames)
    cache = zeroshot.ClassifierCache(args.cache_dir)
    key = registry.resolve(args.dataset)
    if kind == "synthetic":
      images, labels, _, _ = synthetic_set(num_examples, args.seed)
      metrics = features.run_zeroshot(model, params, mesh, images, labels, classnames,
                                      prompts.templates, args.batch_size, cache=cache,
                                      checkpoint_id=_checkpoint_id(path), dataset=key)
    else:
      label_names = datasets.tfds_classnames(args.dataset, split, args.data_dir)
      if label_names is None:
        raise ValueError(f"TFDS dataset {args.dataset!r} has no class labels; use --task retrieval")
      classnames = registry.align_classnames(classnames, label_names)
      classifier = cache.get_or_build(
          _checkpoint_id(path), key, classnames, prompts.templates,
          lambda: zeroshot.build_classifier(
              features.encode_text_fn(model, params, mesh, args.batch_size), classnames,
              prompts.templates))
      out = stream(split, num_examples)
      metrics = zeroshot.zeroshot_metrics(out["images"], classifier, out["labels"])
      num_examples = len(out["labels"])
    metrics = {"acc1": metrics["top1"], "acc5": metrics["top5"],
               "mean_per_class_recall": metrics["mean_per_class_recall"]}
  elif args.task == "retrieval":
    # Every caption of every image: text_to_image says which image each one describes.
    batches = datasets.eval_batches(
        args.dataset, split, args.data_dir, image_size=image_size, local_batch=local_batch,
        num_examples=num_examples, seed=args.seed, all_captions=True,
        captions_per_image=args.captions_per_image or SYNTHETIC_DEFAULT_CAPTIONS)
    out = features.compute_retrieval_features(model, params, mesh, batches, args.batch_size,
                                              context_length=model_config.text.context_length)
    metrics = retrieval.retrieval_metrics(out["images"], out["texts"], out["text_to_image"])
    num_examples = len(out["images"])
    extra["num_texts"] = len(out["texts"])
  else:
    if kind == "synthetic":
      num_train = args.num_train_examples or num_examples
      train_images, train_labels, classnames, _ = synthetic_set(num_train, args.seed + 1)
      test_images, test_labels, _, _ = synthetic_set(num_examples, args.seed)
      train_features = features.compute_features(model, params, mesh, train_images, args.batch_size)
      test_features = features.compute_features(model, params, mesh, test_images, args.batch_size)
      num_classes = len(classnames)
    else:
      train = stream(args.train_split, args.num_train_examples)
      test = stream(split, num_examples)
      train_features, train_labels = train["images"], train["labels"]
      test_features, test_labels = test["images"], test["labels"]
      num_classes = None
    metrics = linear_probe(train_features, train_labels, test_features, test_labels,
                           num_classes=num_classes, seed=args.seed)
    num_examples = len(test_labels)
  return {"dataset": args.dataset, "model": model_config.name, "task": TASKS[args.task],
          "metrics": metrics, "checkpoint": os.path.abspath(path),
          "split": "synthetic" if kind == "synthetic" else split, "num_examples": int(num_examples),
          **extra}


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
    validate_args(args)
    results = evaluate(args)
  except (ValueError, FileNotFoundError) as e:
    # User errors: one line, no traceback.
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 2
  text = json.dumps(results, indent=2)
  print(text)
  if args.output and jax.process_index() == 0:
    output = pathlib.Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(text + "\n")
  return 0


if __name__ == "__main__":
  sys.exit(main())
