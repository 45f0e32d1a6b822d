"""Where the train step's time goes: a profiler trace of a few steps, summed per op.

  python benchmarks/step_profile.py --model vitb32 --batch 16 --steps 3 --threads 2

Builds the same step as train_step.py (synthetic batch on the device, the model's recipe
remat policy unless --remat_policy), traces --steps steps after warm-up with the JAX
profiler and prints clip_jax.profiling.summarize_trace's table: seconds per step by
category ("matmul" = ops containing a dot; the rest by op name: copies, transposes,
scan's dynamic-(update-)slices, zero-filled buffers, optimizer fusions), then the top ops
with shapes and achieved GFLOP/s. The last line is the JSON. On CPU the script turns on
XLA's per-thunk trace events (--xla_cpu_enable_xprof_traceme); on a GPU it compiles the step
without command buffers (see --keep_command_buffers) so every kernel names its op.
"""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # train_step adds the repo root
# Read when XLA's CPU backend starts: every thunk becomes a trace event.
os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_cpu_enable_xprof_traceme=true").strip()

import train_step  # noqa: E402  (benchmarks/train_step.py: the step and its options)

# An XLA option (empty: no command types) compiling a GPU step without command buffers, in
# which the profiler names the buffer instead of the op that launched each library kernel.
NO_COMMAND_BUFFERS = "xla_gpu_enable_command_buffer="


def main(argv=None):
  parser = train_step.build_parser(__doc__.split("\n")[0])
  parser.set_defaults(steps=3)
  parser.add_argument("--trace_dir", default="", help="keep the trace here (default: a temp dir)")
  parser.add_argument("--top", type=int, default=25, help="how many of the slowest ops to list")
  parser.add_argument("--keep_command_buffers", action="store_true",
                      help="GPU: keep XLA's command buffers (CUDA graphs), under which the "
                           "profiler cannot tell which op launched a cuBLAS/cuDNN kernel or copy")
  args = parser.parse_args(argv)
  threads = train_step.pin_threads(args.threads)
  import jax
  if jax.default_backend() == "gpu" and not args.keep_command_buffers:
    args.xla_option.append(NO_COMMAND_BUFFERS)

  step, compile_s, _, _ = train_step.build_ours(args)
  for _ in range(max(args.warmup, 1)):
    step()
  times, summary = profile(step, args.steps, args.trace_dir, args.top)
  for name, secs in summary["categories"].items():
    print(f"{secs:8.4f} s  {name}")
  print("---- by model scope")
  for scope, secs in summary["scopes"].items():
    print(f"{secs:8.4f} s  {scope}")
  print("---- top ops (s/step, calls/step, name, scope, shape, GFLOP/s)")
  for op in summary["top_ops"]:
    print(f"{op['s_per_step']:8.4f} {op['calls_per_step']:5.1f} {op['name'][:60]:40s} "
          f"{op['scope']} {op['shape']} {op['gflops_per_s'] or ''}")
  result = {"model": args.model, "batch": args.batch, "steps": args.steps,
            "remat_policy": args.remat_policy, "scan_layers": args.scan_layers,
            "threads": threads, "device": jax.devices()[0].device_kind,
            "step_time_s": round(statistics.median(times), 4), "compile_s": round(compile_s, 2),
            **summary}
  print(json.dumps(result), flush=True)
  return result


def profile(step, steps: int, trace_dir: str = "", top: int = 25):
  """(seconds of each step, summarize_trace's summary) for `steps` traced calls of `step`
  (train_step.build_ours's, already warm)."""
  import jax
  from clip_jax.profiling import summarize_trace
  trace_dir = trace_dir or tempfile.mkdtemp(prefix="clip_jax_step_profile_")
  times = []
  jax.profiler.start_trace(trace_dir)
  for _ in range(steps):
    start = time.perf_counter()
    step()
    times.append(time.perf_counter() - start)
  jax.profiler.stop_trace()
  return times, summarize_trace(trace_dir, step.compiled.as_text(), steps=steps, top=top)


if __name__ == "__main__":
  main()
