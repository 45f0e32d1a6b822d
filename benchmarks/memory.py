r"""Per-device memory of the compiled train step at a CLIP-sized global batch (compile only).

  XLA_FLAGS=--xla_force_host_platform_device_count=8 JAX_PLATFORMS=cpu \
      python -m benchmarks.memory [--batch 32768] [--model tiny]

Prints one JSON line per case: mesh, loss_impl, accum_steps, memory_per_device (bytes),
whether the optimised HLO holds a B x B buffer, and the compile time.
"""
import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script too

import jax  # noqa: E402

from clip_jax import sharding as shd  # noqa: E402
from clip_jax import step as st  # noqa: E402
from configs.common import get_config  # noqa: E402

CASES = (  # (devices, loss_impl, accum_steps)
    (8, "global", 1),
    (8, "chunked", 1),
    (1, "chunked", 32),
)


def measure(model: str, batch: int, devices: int, impl: str, accum: int) -> dict:
  c = get_config()
  c.model, c.batch_size, c.total_steps = model, batch, 1000
  c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
  c.loss_impl, c.accum_steps = impl, accum
  mesh = shd.create_mesh(c, devices=jax.devices()[:devices])
  start = time.time()
  compiled, _ = st.compile_train_step(c, mesh)
  hlo = compiled.as_text()
  return {"model": model, "global_batch": batch, "devices": devices, "loss_impl": impl,
          "accum_steps": accum, "memory_per_device": st.memory_per_device(compiled),
          "bxb_buffer_in_hlo": f"[{batch},{batch}]" in hlo,
          "compile_s": round(time.time() - start, 1)}


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batch", type=int, default=32768)
  parser.add_argument("--model", default="tiny")
  args = parser.parse_args()
  for devices, impl, accum in CASES:
    print(json.dumps(measure(args.model, args.batch, devices, impl, accum)), flush=True)


if __name__ == "__main__":
  main()
