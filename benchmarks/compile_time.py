"""Compile time of the full train step (lower + compile on abstract inputs; nothing runs).

  python benchmarks/compile_time.py [--models vitb16,vitl14] [--batch 16]
      [--compilation_cache_dir DIR]

One device. Prints one JSON line per (model, scan_layers): lower_s, compile_s (XLA only)
and total_s (both), for scanned and unscanned layers. With --compilation_cache_dir (the
trainer's config.compilation_cache_dir), a second run of the same command loads the step
from JAX's persistent cache: its compile_s is the restarted run's.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def measure(model: str, scan_layers: bool, batch: int) -> dict:
  import jax
  from clip_jax import sharding as shd
  from clip_jax import step as st
  from configs.common import get_config

  c = get_config()
  c.model, c.batch_size, c.total_steps = model, batch, 1000
  c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
  c.scan_layers = scan_layers
  mesh = shd.create_mesh(c, devices=jax.devices()[:1])
  start = time.perf_counter()
  abstract_state, shardings = st.abstract_train_state(c, mesh)
  train_step = st.make_train_step(c, mesh, shardings)
  lowered = train_step.lower(abstract_state, st.abstract_batch(c, mesh))
  lowered_at = time.perf_counter()
  lowered.compile()
  done = time.perf_counter()
  return {"model": model, "scan_layers": scan_layers, "batch": batch,
          "device": jax.devices()[0].platform, "lower_s": round(lowered_at - start, 2),
          "compile_s": round(done - lowered_at, 2), "total_s": round(done - start, 2),
          "compilation_cache": bool(jax.config.jax_compilation_cache_dir),
          "load_avg_1m": round(os.getloadavg()[0], 2)}


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--models", default="vitb16,vitl14")
  p.add_argument("--scan", default="true,false", help="scan_layers values to measure")
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--compilation_cache_dir", default="",
                 help="JAX's persistent compilation cache (default: none)")
  args = p.parse_args(argv)
  if args.compilation_cache_dir:
    from clip_jax.train import use_compilation_cache
    use_compilation_cache(args.compilation_cache_dir)
  results = []
  for model in args.models.split(","):
    for scan in args.scan.split(","):
      if scan not in ("true", "false"):
        raise ValueError(f"--scan values must be true or false, got {scan!r}")
      results.append(measure(model, scan == "true", args.batch))
      print(json.dumps(results[-1]), flush=True)
  return results


if __name__ == "__main__":
  main()
