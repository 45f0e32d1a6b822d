r"""Input pipeline throughput: images per second of clip_jax.data's training stream on this host.

  python benchmarks/data_pipeline.py --make_shards /tmp/shards            # 4 x 512 256px JPEGs
  python benchmarks/data_pipeline.py --source wds --path '/tmp/shards/{00000..00003}.tar' \\
      --image_size 224 --batch_size 64 --batches 20 [--num_workers N] [--append_results]
  python benchmarks/data_pipeline.py --make_files /tmp/files --jpeg_size 1024  # files + index.tsv
  python benchmarks/data_pipeline.py --source files --path /tmp/files --image_dtype uint8
  python benchmarks/data_pipeline.py --source csv --path /tmp/files/index.tsv --image_dtype uint8
  python benchmarks/data_pipeline.py --source mix --image_dtype uint8 --compare_alone \\
      --path 'wds:/tmp/shards/{00000..00003}.tar::csv:/tmp/files/index.tsv' --mix_weights 1::1

Times `--batches` local batches after `--warmup` untimed ones (worker start-up, first shuffle
window) through the full training transform: JPEG decode, RandomResizedCrop(bicubic),
tokenization, batching, then the global arrays on this host's devices and the mean/std
normalisation there (as in training; with --image_dtype uint8 the images stay uint8, for the
train step to normalise). Prints one JSON line with images_per_s, the worker
count, images_per_s_per_core (cores = the CPUs this process may use) and images_per_cpu_s
(images per CPU-second the pipeline actually used: the per-core figure on a shared machine)
and which PIL did the work ("pillow": Pillow or Pillow-SIMD, see launch/install_pillow_simd.sh).

--source mix --compare_alone reads the mixture and each of its sources alone (interleaved,
--repeats times) and reports mixing_cost: 1 - the mixture's images per CPU-second over what
its sources read alone cost in the mixture's proportions.
"""
import argparse
import datetime
import json
import os
import pathlib
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, installed or not

import jax  # noqa: E402
import numpy as np  # noqa: E402
import psutil  # noqa: E402

from clip_jax.data import pipeline  # noqa: E402
from clip_jax.data import synthetic  # noqa: E402
from clip_jax.data import transforms  # noqa: E402
from clip_jax.data import wds  # noqa: E402
from configs.common import get_config  # noqa: E402


def _cpu_seconds() -> float:
  """User + system CPU time of this process and its live worker processes."""
  me = psutil.Process()
  total = 0.0
  for proc in [me] + me.children(recursive=True):
    try:
      times = proc.cpu_times()
      total += times.user + times.system
    except psutil.NoSuchProcess:
      pass
  return total


def _sample(s: int, i: int, per_shard: int, size: int):
  """A `size`px image (synthetic shapes with photo-like noise) and its caption."""
  sample = synthetic.train_sample(1234, s * per_shard + i, size)
  rng = np.random.default_rng([s, i])
  # Extra mid-frequency texture so the JPEGs are photo-sized (~20-30 KB at 256px), not flat.
  cell = max(4, size // 64)
  texture = rng.normal(0, 18, (size // cell, size // cell, 1)).repeat(cell, 0).repeat(cell, 1)
  return np.clip(sample["image"] + texture, 0, 255).astype(np.uint8), sample["caption"]


def make_shards(directory: str, num_shards: int, per_shard: int, size: int = 256):
  """Writes img2dataset-style shards of `size`px JPEGs."""
  os.makedirs(directory, exist_ok=True)
  for s in range(num_shards):
    samples = []
    for i in range(per_shard):
      image, caption = _sample(s, i, per_shard, size)
      samples.append((f"{s:05d}{i:04d}", image, caption, {"width": size}))
    wds.write_shard(os.path.join(directory, f"{s:05d}.tar"), samples)
  return os.path.join(directory, "{00000..%05d}.tar" % (num_shards - 1))


def make_files(directory: str, num_shards: int, per_shard: int, size: int = 256):
  """Writes img2dataset's `files` layout (DIR/00000/000000123.jpg + .txt + .json) of `size`px
  JPEGs, and DIR/index.tsv listing them for the csv source (open_clip's filepath/title)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rows = ["filepath\ttitle"]
  for s in range(num_shards):
    os.makedirs(os.path.join(directory, f"{s:05d}"), exist_ok=True)
    for i in range(per_shard):
      image, caption = _sample(s, i, per_shard, size)
      stem = f"{s:05d}/{s * per_shard + i:09d}"
      Image.fromarray(image).save(os.path.join(directory, stem + ".jpg"), quality=90)
      with open(os.path.join(directory, stem + ".txt"), "w") as f:
        f.write(caption)
      with open(os.path.join(directory, stem + ".json"), "w") as f:
        json.dump({"caption": caption, "width": size, "height": size}, f)
      rows.append(f"{stem}.jpg\t{caption}")
  with open(os.path.join(directory, "index.tsv"), "w") as f:
    f.write("\n".join(rows) + "\n")
  return directory


def _config(args, source: str, path: str):
  config = get_config()
  config.batch_size = args.batch_size
  config.data.source, config.data.path = source, path
  config.data.name, config.data.data_dir = args.name, args.data_dir
  config.data.num_workers = args.num_workers
  config.data.shuffle_buffer = args.shuffle_buffer
  config.data.image_dtype = args.image_dtype
  config.data.num_threads = args.num_threads
  config.data.mix_weights = args.mix_weights
  return config


def measure(args, source: str, path: str) -> dict:
  """Times args.batches batches of `source` at `path` (after args.warmup): the JSON result."""
  config = _config(args, source, path)
  # As in training: global arrays on this host's devices, normalised there.
  mesh = jax.sharding.Mesh(np.array(jax.devices()), ("data",))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  it = pipeline.make_train_iterator(config, sharding, image_size=args.image_size,
                                    process_index=0, process_count=1)
  for _ in range(args.warmup):
    next(it)
  cpu_start = _cpu_seconds()
  start = time.perf_counter()
  for _ in range(args.batches):
    batch = next(it)
  jax.block_until_ready(batch)
  elapsed = time.perf_counter() - start
  cpu = _cpu_seconds() - cpu_start
  counters = it.counters()
  it.close()
  cores = len(os.sched_getaffinity(0))
  images_per_s = args.batches * args.batch_size / elapsed
  result = {
      "images_per_s": round(images_per_s, 1),
      "images_per_s_per_core": round(images_per_s / cores, 1),
      # Load-independent: images per CPU-second used by this process and its workers.
      "images_per_cpu_s": round(args.batches * args.batch_size / cpu, 1),
      "cpu_utilisation": round(cpu / elapsed, 2),
      "num_workers": args.num_workers, "cores": cores, "source": source,
      "image_dtype": args.image_dtype, "num_threads": args.num_threads,
      "image_size": args.image_size, "batch_size": args.batch_size, "batches": args.batches,
      "image_shape": list(batch["images"].shape),
      "skipped_samples": counters["data/skipped_samples"],
      "pillow": transforms.pillow_build(),  # Pillow-SIMD resizes ~5x faster than Pillow
  }
  if source == "mix":
    result["mix_samples"] = {k.split("/")[1]: v for k, v in counters.items()
                             if k.endswith("/samples")}
  return result


def _draw_us_per_sample(components, global_batch: int, steps: int = 8) -> float:
  """CPU microseconds per position of MixSchedule (one process reading the whole batch)."""
  from clip_jax.data import mixture  # pylint: disable=g-import-not-at-top
  draw = mixture.MixDraw([c.weight for c in components], global_batch, seed=0)
  schedule = mixture.MixSchedule(draw, local_batch=global_batch, process_index=0,
                                 first_position=1000 * global_batch)  # a resumed run's steps
  schedule[0]  # the prefix of the first 1000 steps, once per run
  start = time.process_time()
  for i in range(steps * global_batch):
    schedule[i]
  return (time.process_time() - start) / (steps * global_batch) * 1e6


def compare_mixture(args) -> dict:
  """The mixture and each of its sources read alone, `--repeats` times interleaved; the cost
  of mixing: 1 - (the mixture's images per CPU-second) / (what reading its sources alone in
  the mixture's proportions costs: 1 / sum_i p_i / rate_i), from the medians."""
  from clip_jax.data import mixture  # pylint: disable=g-import-not-at-top
  components = mixture.parse(_config(args, "mix", args.path))
  runs = {"mix": []}
  runs.update({c.name: [] for c in components})
  for _ in range(args.repeats):
    for c in components:
      alone = argparse.Namespace(**dict(vars(args), name=c.path)) if c.kind == "tfds" else args
      runs[c.name].append(measure(alone, c.kind, c.path)["images_per_cpu_s"])
    mixed = measure(args, "mix", args.path)
    runs["mix"].append(mixed["images_per_cpu_s"])
  medians = {name: float(np.median(rates)) for name, rates in runs.items()}
  draw_us = {batch: round(_draw_us_per_sample(components, batch), 3)
             for batch in (args.batch_size, 32768)}
  probs = [c.weight for c in components]
  expected = 1.0 / sum(p / medians[c.name] for p, c in zip(probs, components))
  return {"images_per_cpu_s": runs, "median": medians,
          "expected_mix_images_per_cpu_s": round(expected, 1),
          "mixing_cost": round(1.0 - medians["mix"] / expected, 4),
          "weights": dict(zip([c.name for c in components], probs)),
          "mix_samples_last_run": mixed["mix_samples"],
          # The draw alone (which source and which of its samples, per position), in CPU
          # microseconds per sample, at this global batch and at the paper's 32,768.
          "draw_us_per_sample": draw_us,
          "num_workers": args.num_workers, "image_size": args.image_size,
          "batch_size": args.batch_size, "batches": args.batches, "repeats": args.repeats,
          "cores": len(os.sched_getaffinity(0)), "pillow": mixed["pillow"]}


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--make_shards", default="", help="write benchmark shards to DIR and exit")
  parser.add_argument("--make_files", default="",
                      help="write img2dataset's files layout and DIR/index.tsv to DIR and exit")
  parser.add_argument("--jpeg_size", type=int, default=256, help="--make_*: image side in px")
  parser.add_argument("--image_dtype", default="float32", choices=pipeline.IMAGE_DTYPES)
  parser.add_argument("--num_shards", type=int, default=4)
  parser.add_argument("--per_shard", type=int, default=512)
  parser.add_argument("--source", default="wds", choices=pipeline.SOURCES)
  parser.add_argument("--path", default="")
  parser.add_argument("--name", default="")
  parser.add_argument("--data_dir", default=None)
  parser.add_argument("--image_size", type=int, default=224)
  parser.add_argument("--batch_size", type=int, default=64)
  parser.add_argument("--batches", type=int, default=20)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--num_workers", type=int, default=len(os.sched_getaffinity(0)))
  parser.add_argument("--shuffle_buffer", type=int, default=256)
  parser.add_argument("--num_threads", type=int, default=16,
                      help="read threads per process (record sources: csv, files, tfds)")
  parser.add_argument("--mix_weights", default="",
                      help="--source mix: relative weights W1::W2... (default equal)")
  parser.add_argument("--compare_alone", action="store_true",
                      help="--source mix: also read each source alone and report the cost of "
                           "mixing (images per CPU-second against the sources' own)")
  parser.add_argument("--repeats", type=int, default=3,
                      help="--compare_alone: interleaved repetitions (medians are reported)")
  parser.add_argument("--append_results", action="store_true",
                      help="append a row to benchmarks/RESULTS.md")
  args = parser.parse_args()
  if args.make_shards:
    print(make_shards(args.make_shards, args.num_shards, args.per_shard, args.jpeg_size))
    return
  if args.make_files:
    print(make_files(args.make_files, args.num_shards, args.per_shard, args.jpeg_size))
    return

  if args.source == "mix" and args.compare_alone:
    result = compare_mixture(args)
  else:
    result = measure(args, args.source, args.path)
  print(json.dumps(result))
  if args.append_results:
    path = REPO / "benchmarks/RESULTS.md"
    if not path.exists():
      path.write_text("| date | benchmark | result | command |\n|---|---|---|---|\n")
    command = " ".join(["python benchmarks/data_pipeline.py"] + sys.argv[1:])
    with path.open("a") as f:
      f.write(f"| {datetime.date.today()} | data_pipeline | {json.dumps(result)} | `{command}` |\n")


if __name__ == "__main__":
  main()
