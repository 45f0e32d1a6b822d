"""One prepared run for a lent GPU/TPU: per model, the largest batch that fits on the chip,
the bf16 train step's throughput and MFU there, and where its time goes.

  python benchmarks/accelerator.py --models vitb16,vitl14 --out "$OUT"

For each model: compiles the step on abstract inputs at two batch sizes and reads XLA's
memory analysis (bytes = fixed + per_sample * batch), takes the largest multiple of
--batch_multiple whose estimate fits in --memory_fraction of the device's memory, times
--steps rounds of --block steps there (benchmarks/train_step.py; a batch that still runs out
of memory is retried 25% smaller), then traces --profile_steps steps with the JAX profiler
(benchmarks/step_profile.py's per-op summary). Each model's result is printed as a JSON
line and appended to OUT/accelerator.jsonl as soon as it is known, so a run cut short keeps
what it measured; the last line printed holds all of them. --deadline_s skips what would
start after that many seconds. Needs jax, flax, optax and ml_collections only (no data
stack, no torch); benchmarks/README.md has the device command.
"""
from __future__ import annotations

import copy
import json
import os
import sys
import time
import traceback

# Before JAX starts: let the GPU client take most of the memory (JAX's default is 75%).
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.92")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # train_step adds the repo root

import step_profile  # noqa: E402
import train_step  # noqa: E402

GIB = 1 << 30
OOM_MARKERS = ("RESOURCE_EXHAUSTED", "Out of memory", "out of memory", "OOM")


def build_parser():
  p = train_step.build_parser(__doc__.split("\n")[0])
  p.set_defaults(dtype="bfloat16", steps=5, warmup=2, threads=0)
  p.add_argument("--models", default="vitb16,vitl14")
  p.add_argument("--out", default="", help="folder for accelerator.jsonl (default: none)")
  p.add_argument("--probe_batch", type=int, default=32,
                 help="the memory fit compiles at this batch and twice it")
  p.add_argument("--batch_multiple", type=int, default=32)
  p.add_argument("--max_batch", type=int, default=4096)
  p.add_argument("--memory_fraction", type=float, default=0.9,
                 help="of the device's memory limit the chosen batch may use (estimate)")
  p.add_argument("--memory_gb", type=float, default=0.0,
                 help="the device's memory in GiB (default: its bytes_limit; CPU needs this)")
  p.add_argument("--profile_steps", type=int, default=3, help="0: no profile")
  p.add_argument("--deadline_s", type=float, default=480.0)
  p.add_argument("--attention_impls", default="",
                 help="comma list timed in turn at the batch fitted for the first "
                      "(default: --attention_impl alone)")
  return p


def device_memory_bytes(memory_gb: float) -> int:
  import jax
  if memory_gb:
    return int(memory_gb * GIB)
  stats = jax.devices()[0].memory_stats() or {}
  if "bytes_limit" not in stats:
    raise ValueError(f"{jax.devices()[0].device_kind} reports no memory limit; pass --memory_gb")
  return int(stats["bytes_limit"])


def estimated_bytes(args, batch: int) -> int:
  """Per-device bytes of the compiled step at `batch` (XLA's buffer assignment)."""
  import jax
  from clip_jax import sharding as shd
  from clip_jax import step as st
  probe = copy.copy(args)
  probe.batch = batch
  config = train_step.run_config(probe)
  mesh = shd.create_mesh(config, devices=jax.devices()[:1])
  options = {"xla_gpu_autotune_level": 0} if jax.devices()[0].platform == "gpu" else None
  compiled, _ = st.compile_train_step(config, mesh, compiler_options=options)
  return st.memory_per_device(compiled)["total"]


def fit_batch(args, limit: int) -> dict:
  """The largest batch (a multiple of --batch_multiple) whose linear estimate fits."""
  b1, b2 = args.probe_batch, 2 * args.probe_batch
  m1, m2 = estimated_bytes(args, b1), estimated_bytes(args, b2)
  per_sample = max((m2 - m1) / (b2 - b1), 1.0)
  fixed = m1 - per_sample * b1
  budget = args.memory_fraction * limit
  batch = int((budget - fixed) // per_sample) // args.batch_multiple * args.batch_multiple
  batch = min(batch, args.max_batch)
  if batch < args.batch_multiple:
    raise ValueError(f"{args.model}: not even batch {args.batch_multiple} fits "
                     f"({fixed / GIB:.1f} GiB fixed + {per_sample / GIB:.3f} GiB/sample, "
                     f"{budget / GIB:.1f} GiB usable)")
  return {"batch": batch, "fixed_gib": round(fixed / GIB, 3),
          "per_sample_gib": round(per_sample / GIB, 5),
          "estimated_gib": round((fixed + per_sample * batch) / GIB, 3),
          "limit_gib": round(limit / GIB, 3), "memory_fraction": args.memory_fraction}


def time_and_profile(args, record: dict, started: float) -> dict:
  """train_step.py's figures at args.batch (25% smaller after an OOM), then a profile."""
  for _ in range(3):
    try:
      result, step = train_step.run(args, train_step.pin_threads(args.threads))
      break
    except Exception as e:  # noqa: BLE001  (XLA's error types differ by backend)
      if not any(m in str(e) for m in OOM_MARKERS) or args.batch <= args.batch_multiple:
        raise
      record.setdefault("oom_batches", []).append(args.batch)
      args.batch = max(args.batch * 3 // 4 // args.batch_multiple * args.batch_multiple,
                       args.batch_multiple)
  else:
    raise RuntimeError(f"out of memory down to batch {args.batch}")
  record.update(result)
  if args.profile_steps and time.perf_counter() - started < args.deadline_s:
    try:  # A profiler failure keeps the timings above.
      _, record["profile"] = step_profile.profile(step, args.profile_steps, top=15)
    except Exception as e:  # noqa: BLE001
      record["profile_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
  return record


def failed(record: dict, e: Exception) -> dict:
  record["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
  record["traceback"] = traceback.format_exc()[-3000:]
  return record


def measure_model(args, limit: int, started: float, impls=None):
  """Yields one record per attention implementation (default: args.attention_impl), all at
  the batch fitted for the first; the records come as they are measured."""
  impls = list(impls or [args.attention_impl])
  args.attention_impl = impls[0]
  record = {"model": args.model, "attention_impl": impls[0]}
  try:
    record["memory_fit"] = fit_batch(args, limit)
    args.batch = record["memory_fit"]["batch"]
  except Exception as e:  # noqa: BLE001  (record it; the next model still runs)
    yield failed(record, e)
    return
  for impl in impls:
    if impl != impls[0] and time.perf_counter() - started > args.deadline_s:
      yield {"model": args.model, "attention_impl": impl,
             "error": f"skipped: past --deadline_s={args.deadline_s}"}
      continue
    run_args = copy.copy(args)
    run_args.attention_impl = impl
    if impl != impls[0]:
      record = {"model": args.model, "attention_impl": impl,
                "memory_fit": dict(record["memory_fit"], fitted_for=impls[0])}
    try:
      yield time_and_profile(run_args, record, started)
    except Exception as e:  # noqa: BLE001
      yield failed(record, e)


def main(argv=None):
  args = build_parser().parse_args(argv)
  started = time.perf_counter()
  import jax
  limit = device_memory_bytes(args.memory_gb)
  header = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
            "jax": jax.__version__, "limit_gib": round(limit / GIB, 3)}
  print(json.dumps(header), flush=True)
  out_path = os.path.join(args.out, "accelerator.jsonl") if args.out else ""
  if args.out:
    os.makedirs(args.out, exist_ok=True)
  records = []
  for model in args.models.split(","):
    if time.perf_counter() - started > args.deadline_s:
      records.append({"model": model, "error": f"skipped: past --deadline_s={args.deadline_s}"})
      continue
    model_args = copy.copy(args)
    model_args.model = model
    impls = [i for i in args.attention_impls.split(",") if i]
    for record in measure_model(model_args, limit, started, impls):
      records.append(dict(record, **header))
      print(json.dumps(records[-1]), flush=True)
      if out_path:
        with open(out_path, "a") as f:
          f.write(json.dumps(records[-1]) + "\n")
  keys = ("model", "attention_impl", "batch", "samples_per_s", "step_time_s", "compile_s", "mfu",
          "error")
  summary = {"results": [{k: r.get(k) for k in keys} for r in records],
             "elapsed_s": round(time.perf_counter() - started, 1), **header}
  print(json.dumps(summary), flush=True)
  return records


if __name__ == "__main__":
  main()
