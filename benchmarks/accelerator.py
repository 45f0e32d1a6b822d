"""One prepared run for a lent GPU/TPU: per model, the largest batch that fits on the chip,
the bf16 train step's throughput and MFU there, and where its time goes.

  python benchmarks/accelerator.py --models vitb16,vitl14 --out "$OUT"

For each model: compiles the step on abstract inputs at two batch sizes and reads XLA's
memory analysis (bytes = fixed + per_sample * batch), takes the largest multiple of
--batch_multiple whose estimate fits in --memory_fraction of the device's memory, times
--steps rounds of --block steps there (benchmarks/train_step.py; a batch that still runs out
of memory is retried 25% smaller), then traces --profile_steps steps with the JAX profiler
(benchmarks/step_profile.py's per-op summary; on a GPU of a second build of the step without
XLA's command buffers, so that every kernel names its op). `--variants` times several step variants
(attention kernel, remat policy, scan, XLA options) at the one fitted batch; on a GPU,
cuDNN attention is first checked against ours. Each result is printed as a JSON
line and appended to OUT/accelerator.jsonl as soon as it is known, so a run cut short keeps
what it measured; the last line printed holds all of them. --deadline_s skips what would
start after that many seconds. Needs jax, flax, optax and ml_collections only (no data
stack, no torch); benchmarks/README.md has the device command.
"""
from __future__ import annotations

import copy
import gc
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
  p = train_step.build_parser(" ".join(__doc__.split("\n\n")[0].split()))
  p.set_defaults(dtype="bfloat16", steps=5, warmup=2, threads=0)
  p.add_argument("--models", default="vitb16,vitl14")
  p.add_argument("--out", default="", help="folder for accelerator.jsonl (default: none)")
  p.add_argument("--probe_batch", type=int, default=32,
                 help="the memory fit compiles at this batch and twice it")
  p.add_argument("--batch_multiple", type=int, default=32)
  p.add_argument("--max_batch", type=int, default=4096)
  p.add_argument("--memory_fraction", type=float, default=0.85,
                 help="of the device's memory limit the chosen batch may use (estimate; on an "
                      "H100 0.9 was once too much: the allocator needs room beyond XLA's plan)")
  p.add_argument("--memory_gb", type=float, default=0.0,
                 help="the device's memory in GiB (default: its bytes_limit; CPU needs this)")
  p.add_argument("--profile_steps", type=int, default=3, help="0: no profile")
  p.add_argument("--deadline_s", type=float, default=480.0)
  p.add_argument("--variants", default="",
                 help="';'-separated step variants timed in turn at one batch, each a ','-list "
                      "of NAME=VALUE: a train_step.py option (attention_impl, remat_policy, "
                      "scan_layers, loss_impl) or an XLA compiler option (xla_...). The batch "
                      "is fitted for the first variant that compiles. Default: the flags alone")
  p.add_argument("--profile_all", action="store_true",
                 help="profile every variant (default: the one the batch is fitted for)")
  p.add_argument("--profile_command_buffers", default="auto", choices=("auto", "off", "keep"),
                 help="off: profile a second build of the step without XLA's command buffers, "
                      "so the trace names the op of every cuBLAS/cuDNN kernel and copy (one "
                      "more compile); keep: profile the timed step; auto: off on a GPU")
  p.add_argument("--check_attention", default="auto", choices=("auto", "yes", "no"),
                 help="compare cuDNN fused attention with ours before timing (auto: on GPU)")
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
  options = train_step.compiler_options(args.xla_option)
  if jax.devices()[0].platform == "gpu":
    options["xla_gpu_autotune_level"] = 0  # the buffers do not depend on the kernels chosen
  compiled, _ = st.compile_train_step(config, mesh, compiler_options=options or None)
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
    rebuild = rebuild_for_profile(args)
    try:  # A profiler failure keeps the timings above.
      if rebuild:
        # The timed step (with command buffers) goes first, to free its memory.
        del step
        gc.collect()
        profile_args = copy.copy(args)
        profile_args.xla_option = [*args.xla_option, step_profile.NO_COMMAND_BUFFERS]
        step, _, _, _ = train_step.build_ours(profile_args)
        for _ in range(max(args.warmup, 1)):
          step()
      _, record["profile"] = step_profile.profile(step, args.profile_steps, top=15)
      record["profile"]["command_buffers"] = not rebuild
    except Exception as e:  # noqa: BLE001
      record["profile_error"] = f"{type(e).__name__}: {str(e)[:2000]}"
  return record


def rebuild_for_profile(args) -> bool:
  if args.profile_command_buffers == "auto":
    import jax
    return jax.default_backend() == "gpu"
  return args.profile_command_buffers == "off"


def failed(record: dict, e: Exception) -> dict:
  record["error"] = f"{type(e).__name__}: {str(e)[:2000]}"
  record["traceback"] = traceback.format_exc()[-3000:]
  return record


STEP_OPTIONS = {"attention_impl": str, "remat_policy": str, "loss_impl": str,
                "scan_layers": lambda v: v.lower() == "true"}


def parse_variants(text: str) -> list[dict]:
  """'attention_impl=cudnn;attention_impl=cudnn,xla_gpu_enable_triton_gemm=false' ->
  [{"attention_impl": "cudnn"}, {...}]. [{}] (the flags as given) for ''."""
  variants = []
  for spec in filter(None, (v.strip() for v in text.split(";"))):
    variant = {}
    for pair in filter(None, spec.split(",")):
      name, sep, value = pair.partition("=")
      if not sep or not (name in STEP_OPTIONS or name.startswith("xla_")):
        raise ValueError(f"--variants: {pair!r} is not NAME=VALUE with NAME one of "
                         f"{sorted(STEP_OPTIONS)} or an xla_ option")
      variant[name] = value
    variants.append(variant)
  return variants or [{}]


def with_variant(args, variant: dict):
  out = copy.copy(args)
  out.xla_option = list(args.xla_option)
  for name, value in variant.items():
    if name.startswith("xla_"):
      out.xla_option.append(f"{name}={value}")
    else:
      setattr(out, name, STEP_OPTIONS[name](value))
  return out


def measure_model(args, limit: int, started: float, variants=None):
  """Yields one record per variant (default: the flags as given), all at the batch fitted for
  the first variant whose step compiles; the records come as they are measured."""
  variants = list(variants or [{}])
  fit, fitted_for = None, None
  for variant in variants:
    record = {"model": args.model, "variant": variant}
    try:
      fit, fitted_for = fit_batch(with_variant(args, variant), limit), variant
      break
    except Exception as e:  # noqa: BLE001  (record it; the next variant may compile)
      yield failed(record, e)
  if fit is None:
    return
  for variant in variants[variants.index(fitted_for):]:
    record = {"model": args.model, "variant": variant,
              "memory_fit": dict(fit, fitted_for=fitted_for)}
    if variant is not fitted_for and time.perf_counter() - started > args.deadline_s:
      yield dict(record, error=f"skipped: past --deadline_s={args.deadline_s}")
      continue
    run_args = with_variant(args, variant)
    run_args.batch = fit["batch"]
    if variant is not fitted_for and not args.profile_all:
      run_args.profile_steps = 0
    try:
      yield time_and_profile(run_args, record, started)
    except Exception as e:  # noqa: BLE001
      yield failed(record, e)


def check_attention() -> dict:
  """cuDNN fused attention (clip_jax.models.layers.fused_attention, odd lengths padded) vs
  our XLA attention at CLIP's shapes in bfloat16: relative error of the output and of the
  three input gradients (float32 reference)."""
  import jax
  import jax.numpy as jnp
  from clip_jax.models.layers import dot_product_attention, fused_attention
  result = {}
  for name, (t, heads, causal) in {"vitb16": (197, 12, False), "vitl14": (257, 16, False),
                                   "text": (77, 8, True)}.items():
    try:
      keys = jax.random.split(jax.random.PRNGKey(t), 4)
      q, k, v, ct = (jax.random.normal(key, (4, t, heads, 64)) for key in keys)

      def loss(fn, dtype, q, k, v):
        return (fn(q.astype(dtype), k.astype(dtype), v.astype(dtype), causal=causal)
                .astype(jnp.float32) * ct).sum()
      got = jax.jit(jax.value_and_grad(
          lambda *a: loss(fused_attention, jnp.bfloat16, *a), argnums=(0, 1, 2)))(q, k, v)
      ref = jax.jit(jax.value_and_grad(
          lambda *a: loss(dot_product_attention, jnp.float32, *a), argnums=(0, 1, 2)))(q, k, v)
      rel = lambda a, b: float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b))
      result[name] = {"grads_rel_err": [round(rel(a, b), 5) for a, b in zip(got[1], ref[1])],
                      "finite": bool(all(jnp.isfinite(g).all() for g in got[1]))}
    except Exception as e:  # noqa: BLE001
      result[name] = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
  return result


def main(argv=None):
  args = build_parser().parse_args(argv)
  started = time.perf_counter()
  import jax
  limit = device_memory_bytes(args.memory_gb)
  header = {"device": jax.devices()[0].device_kind, "platform": jax.devices()[0].platform,
            "jax": jax.__version__, "limit_gib": round(limit / GIB, 3)}
  variants = parse_variants(args.variants)
  if args.check_attention == "yes" or (args.check_attention == "auto" and
                                       header["platform"] == "gpu"):
    print(json.dumps({"attention_check": check_attention()}), flush=True)
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
    for record in measure_model(model_args, limit, started, variants):
      records.append(dict(record, **header))
      print(json.dumps(records[-1]), flush=True)
      if out_path:
        with open(out_path, "a") as f:
          f.write(json.dumps(records[-1]) + "\n")
  keys = ("model", "variant", "batch", "samples_per_s", "step_time_s", "compile_s", "mfu",
          "error")
  summary = {"results": [{k: r.get(k) for k in keys} for r in records],
             "elapsed_s": round(time.perf_counter() - started, 1), **header}
  print(json.dumps(summary), flush=True)
  return records


if __name__ == "__main__":
  main()
