"""A JAX profiler trace over a window of train steps, for the trainer's `--profile`.

    profiler = StepProfiler.from_config(config, workdir)   # None when profiling is off
    for step in range(start, total):
      if profiler:
        profiler.before_step(step, last_outputs)
      state, metrics = train_step(state, batch)
      last_outputs = metrics
    if profiler:
      profiler.close(last_outputs)

Steps [profile_start_step, profile_start_step + profile_steps) are traced into
WORKDIR/profile (view with TensorBoard's profile plugin, XProf or Perfetto). The default
start skips the first steps so compilation and warm-up stay out of the trace. Each process
writes its own trace (under its host name), as on a TPU pod.
"""
from __future__ import annotations

import os
from typing import Any, Optional

import jax

DEFAULT_START_STEP = 10


class StepProfiler:
  """Starts `jax.profiler.start_trace(logdir)` before step `start_step`; stops after
  `num_steps` steps, once the device has finished them."""

  def __init__(self, logdir: str, start_step: int = DEFAULT_START_STEP, num_steps: int = 5):
    if start_step < 0 or num_steps < 1:
      raise ValueError(f"profile_start_step={start_step} must be >= 0 and profile_steps="
                       f"{num_steps} >= 1")
    self.logdir = os.fspath(logdir)
    self.start_step = int(start_step)
    self.stop_step = int(start_step) + int(num_steps)
    self.active = False
    self.done = False

  @classmethod
  def from_config(cls, config, workdir: str) -> Optional["StepProfiler"]:
    """From `config.profile_steps` (0 or absent: None) and `config.profile_start_step`."""
    num_steps = int(config.get("profile_steps", 0) or 0)
    if num_steps <= 0:
      return None
    start = config.get("profile_start_step", DEFAULT_START_STEP)
    start = DEFAULT_START_STEP if start is None else int(start)
    return cls(os.path.join(os.fspath(workdir), "profile"), start, num_steps)

  def before_step(self, step: int, pending: Any = None) -> None:
    """Call with the step about to run and the previous step's outputs (to wait on)."""
    if self.done:
      return
    if not self.active and self.start_step <= step < self.stop_step:
      # Dispatch is asynchronous: let earlier steps finish so they stay out of the trace.
      jax.block_until_ready(pending)
      jax.profiler.start_trace(self.logdir)
      self.active = True
    elif self.active and step >= self.stop_step:
      self.close(pending)

  def close(self, pending: Any = None) -> None:
    """Stops an active trace after `pending` (the last traced step's outputs) is ready."""
    if not self.active:
      return
    jax.block_until_ready(pending)
    jax.profiler.stop_trace()
    self.active = False
    self.done = True


# ---------------------------------------------------------------------------------------
# where the time goes: per-op totals of a trace
# ---------------------------------------------------------------------------------------

# Events that wrap or wait for other events rather than doing work themselves.
_WRAPPER_EVENTS = ("ThunkExecutor", "SlinkyThreadPool", "ThreadpoolListener", "end: ", "while",
                   "conditional", "call")
_SHAPE = r"[a-z]+\d*\[([\d,]*)\]"


def _hlo_instructions(hlo_text: str) -> dict[str, tuple[str, str, str]]:
  """name -> (output dims, opcode, the whole line) for every HLO instruction."""
  import re
  pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = " + _SHAPE + r"\S* ([\w\-]+)\(.*$", re.M)
  return {m.group(1): (m.group(2), m.group(3), m.group(0)) for m in pattern.finditer(hlo_text)}


def _computations(hlo_text: str) -> dict[str, str]:
  import re
  return {m.group(1): m.group(2) for m in
          re.finditer(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.M | re.S)}


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def _dot_flops(body: str, instructions: dict) -> int:
  """2 * output elements * contracted size, summed over the dots of an HLO computation."""
  import re
  total = 0
  for m in re.finditer(r"%?[\w.\-]+ = " + _SHAPE + r"\S* dot\(([^)]*)\)([^\n]*)", body):
    out = _dims(m.group(1))
    lhs_name = m.group(2).split(",")[0].strip().lstrip("%")
    local = re.search(r"%?" + re.escape(lhs_name) + r" = " + _SHAPE, body)
    lhs = _dims(local.group(1)) if local else _dims(instructions.get(lhs_name, ("",))[0])
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", m.group(3))
    if not lhs or not contracting:
      continue
    k = 1
    for d in _dims(contracting.group(1)):
      k *= lhs[d]
    n = 1
    for d in out:
      n *= d
    total += 2 * n * k
  return total


def summarize_trace(trace_dir: str, hlo_text: str = "", steps: int = 1, top: int = 25) -> dict:
  """Seconds per step by op and by op category from a JAX profiler trace directory.

  Reads the newest `*.xplane.pb` under `trace_dir`. Device planes (GPU/TPU) are used when
  present, otherwise the CPU runtime's worker threads (on CPU, trace with XLA_FLAGS
  `--xla_cpu_enable_xprof_traceme=true` so every thunk is an event). With the compiled
  module's text (`compiled.as_text()`), ops get their output shape and kind, and matmul
  fusions their FLOPs and achieved GFLOP/s. Categories: "matmul" (ops containing a dot),
  else the op's name without its number (`copy_bitcast_fusion`, `wrapped_broadcast`, ...).
  Concurrent ops on different threads both count, so the total can exceed the wall time.
  """
  import collections
  import glob
  import re
  files = sorted(glob.glob(os.path.join(os.fspath(trace_dir), "**", "*.xplane.pb"),
                           recursive=True), key=os.path.getmtime)
  if not files:
    raise FileNotFoundError(f"no *.xplane.pb under {trace_dir}")
  data = jax.profiler.ProfileData.from_file(files[-1])
  planes = list(data.planes)
  device_planes = [p for p in planes if p.name.startswith(("/device:GPU", "/device:TPU"))]
  seconds: collections.Counter = collections.Counter()
  calls: collections.Counter = collections.Counter()
  for plane in device_planes or planes:
    for line in plane.lines:
      if not device_planes and "XLAEigen" not in line.name:
        continue
      for event in line.events:
        if event.name.startswith(_WRAPPER_EVENTS):
          continue
        seconds[event.name] += event.duration_ns / 1e9 / steps
        calls[event.name] += 1
  instructions = _hlo_instructions(hlo_text) if hlo_text else {}
  computations = _computations(hlo_text) if hlo_text else {}
  ops, categories = [], collections.Counter()
  for name, secs in seconds.items():
    shape, opcode, flops = None, None, 0
    if name in instructions:
      dims, opcode, line = instructions[name]
      shape = _dims(dims)
      called = re.search(r"calls=%?([\w.\-]+)", line)
      if opcode == "dot":
        flops = _dot_flops(line, instructions)
      elif called and called.group(1) in computations:
        flops = _dot_flops(computations[called.group(1)], instructions)
    per_step_calls = calls[name] / steps
    flops_per_step = flops * per_step_calls
    category = "matmul" if flops else re.sub(r"\.\d+$", "", name)
    categories[category] += secs
    ops.append({"name": name, "s_per_step": round(secs, 5), "calls_per_step": per_step_calls,
                "opcode": opcode, "shape": shape, "category": category,
                "gflops_per_s": round(flops_per_step / secs / 1e9, 1) if flops and secs else None})
  ops.sort(key=lambda o: -o["s_per_step"])
  return {"trace": files[-1], "steps": steps, "source": "device" if device_planes else "cpu",
          "op_s_per_step": round(sum(seconds.values()), 4),
          "categories": {k: round(v, 4) for k, v in categories.most_common()},
          "top_ops": ops[:top]}
