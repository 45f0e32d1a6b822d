"""Tokenizer throughput on one core: captions per second of `clip_jax.tokenize`.

  python benchmarks/tokenizer.py [--runs 7] [--batch 1024] [--append_results]

Captions: every ImageNet class in every one of the 80 templates (80,000), plus the shared
tokenizer test texts when ../shared is present. Tokenized in batches as a data pipeline would.
"captions_per_s" is the median over runs after one untimed pass (word cache warm, the steady
state of a pipeline); "captions_per_s_cold" is one pass of a fresh Tokenizer (empty cache);
"long_captions_per_s" is the warm median on 20,000 web-length captions (4 random prompts joined,
~24 words each).
The process is pinned to one CPU core. Prints one JSON line.
"""
import os

os.environ.setdefault("OMP_NUM_THREADS", "1")  # numpy must not spread over cores either

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import pathlib  # noqa: E402
import random  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run as a script from a checkout, installed or not

from clip_jax import tokenizer  # noqa: E402
from clip_jax.assets import asset_path  # noqa: E402

SHARED_CASES = REPO.parent / "shared/testdata/tokenizer_cases.jsonl"


def realistic_captions() -> list[str]:
  imagenet = json.loads(asset_path("imagenet_zeroshot.json").read_text())
  captions = [t.format(c) for c in imagenet["classes"] for t in imagenet["templates"]]
  if SHARED_CASES.exists():
    captions += [json.loads(line)["text"] for line in SHARED_CASES.read_text().splitlines() if line.strip()]
  return captions


def long_captions(count=20000, seed=0) -> list[str]:
  imagenet = json.loads(asset_path("imagenet_zeroshot.json").read_text())
  rng = random.Random(seed)
  def prompt():
    return rng.choice(imagenet["templates"]).format(rng.choice(imagenet["classes"]))
  return [" ".join(prompt() for _ in range(4)) for _ in range(count)]


def one_pass(tok, captions, batch):
  start = time.perf_counter()
  for i in range(0, len(captions), batch):
    tok(captions[i:i + batch])
  return time.perf_counter() - start


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", type=int, default=7)
  parser.add_argument("--batch", type=int, default=1024)
  parser.add_argument("--append_results", action="store_true", help="append a row to benchmarks/RESULTS.md")
  args = parser.parse_args()
  os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
  captions = realistic_captions()

  cold = one_pass(tokenizer.Tokenizer(), captions, args.batch)
  tok = tokenizer.default_tokenizer()
  one_pass(tok, captions, args.batch)  # untimed: fills the word cache
  times = [one_pass(tok, captions, args.batch) for _ in range(args.runs)]
  long = long_captions()
  one_pass(tok, long, args.batch)
  long_times = [one_pass(tok, long, args.batch) for _ in range(args.runs)]
  result = {
      "captions_per_s": round(len(captions) / statistics.median(times)),
      "captions_per_s_cold": round(len(captions) / cold),
      "cases": len(captions),
      "long_captions_per_s": round(len(long) / statistics.median(long_times)),
      "runs": args.runs,
      "batch": args.batch,
      "threads": 1,
  }
  print(json.dumps(result))
  if args.append_results:
    path = REPO / "benchmarks/RESULTS.md"
    if not path.exists():
      path.write_text("| date | benchmark | result | command |\n|---|---|---|---|\n")
    with path.open("a") as f:
      command = "`python benchmarks/tokenizer.py`"
      f.write(f"| {datetime.date.today()} | tokenizer | {json.dumps(result)} | {command} |\n")


if __name__ == "__main__":
  main()
