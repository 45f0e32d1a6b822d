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
  """name -> (output dims, opcode, the whole line) for every HLO instruction (of a tuple
  output, like a cuBLAS call's (result, workspace), the first element's dims)."""
  import re
  pattern = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = \(?" + _SHAPE +
                       r"\S*(?:, \S+)*\)? ([\w\-]+)\(.*$", re.M)
  return {m.group(1): (m.group(2), m.group(3), m.group(0)) for m in pattern.finditer(hlo_text)}


def _computations(hlo_text: str) -> dict[str, str]:
  import re
  return {m.group(1): m.group(2) for m in
          re.finditer(r"^%?([\w.\-]+) [^\n]*\{\n(.*?)\n\}", hlo_text, re.M | re.S)}


def _dims(text: str) -> list[int]:
  return [int(d) for d in text.split(",") if d]


def _matmul_flops(out: list[int], lhs: list[int], contracting: list[int]) -> int:
  k = 1
  for d in contracting:
    k *= lhs[d]
  n = 1
  for d in out:
    n *= d
  return 2 * n * k


def _dot_flops(body: str, instructions: dict) -> int:
  """2 * output elements * contracted size, summed over the dots of an HLO computation."""
  import re
  total = 0
  for m in re.finditer(r"%?[\w.\-]+ = " + _SHAPE + r"\S* dot\(([^)]*)\)([^\n]*)", body):
    lhs_name = m.group(2).split(",")[0].strip().lstrip("%")
    local = re.search(r"%?" + re.escape(lhs_name) + r" = " + _SHAPE, body)
    lhs = _dims(local.group(1)) if local else _dims(instructions.get(lhs_name, ("",))[0])
    contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", m.group(3))
    if lhs and contracting:
      total += _matmul_flops(_dims(m.group(1)), lhs, _dims(contracting.group(1)))
  return total


def _library_call(line: str, instructions: dict) -> tuple[str, int]:
  """(category, FLOPs) of a custom call into a GPU library: cuBLAS matmuls (FLOPs from
  their dot dimension numbers), else `_kernel_category` of its target (cuDNN attention)."""
  import re
  target = re.search(r'custom_call_target="([^"]+)"', line)
  if not target:
    return "", 0
  if "cublas" in target.group(1):
    operands = re.search(r"custom-call\(([^)]*)\)", line)
    contracting = re.search(r'"lhs_contracting_dimensions":\[([^\]]*)\]', line)
    lhs_name = operands.group(1).split(",")[0].strip().lstrip("%") if operands else ""
    lhs = _dims(instructions.get(lhs_name, ("",))[0])
    out = _dims(re.search(_SHAPE, line.split("=", 1)[1]).group(1))
    if lhs and contracting:
      dims = [int(d) for d in re.findall(r"\d+", contracting.group(1))]
      return "matmul", _matmul_flops(out, lhs, dims)
    return "matmul", 0
  return _kernel_category(target.group(1)), 0


def _kernel_category(name: str) -> str:
  """The category of a GPU library kernel or custom-call target known by its name alone
  (cuBLAS/CUTLASS matmuls, cuDNN attention, cuDNN LayerNorm from XLA's
  xla_gpu_enable_cudnn_layer_norm rewrite: target `__cudnn$norm`); '' for others."""
  lowered = name.lower()
  if "cudnn" in lowered and "norm" in lowered or lowered.startswith(("ln_fwd", "ln_bwd")):
    return "layer_norm"
  if any(m in lowered for m in ("sdpa", "fmha", "flash", "cudnn")):
    return "fused_attention"
  if lowered.startswith(("nvjet", "sm90_xmma", "sm80_xmma", "cutlass")) or "gemm" in lowered:
    return "matmul"
  return ""


# Parts of a JAX op name that are transformations or control flow, not model scopes.
_SCOPE_NOISE = ("jit(", "jvp(", "transpose(", "checkpoint", "remat", "rematted_computation",
                "while", "body", "cond", "closed_call", "pjit", "vmap(", "eval_jaxpr")


def op_scope(op_name: str) -> str:
  """Where in the model an op comes from, from its metadata op_name: 'fwd:' (forward),
  'bwd:' (backward, recomputation included) or 'other:' (loss, optimizer, metrics), then the
  module path from the tower on, cut after two modules below `resblocks`, e.g.
  'jit(step_fn)/transpose(jvp(CLIP.encode_image))/visual/transformer/while/body/closed_call/
  resblocks/attn/qkv/dot_general' -> 'bwd:visual/resblocks/attn/qkv'."""
  if not op_name:
    return "?"
  direction = "bwd" if "transpose(" in op_name else "fwd" if "jvp(" in op_name else "other"
  parts = [p for p in op_name.split("/")
           if p and not p.startswith(_SCOPE_NOISE) and "->" not in p]  # "->": einsum specs
  towers = [i for i, p in enumerate(parts) if p in ("visual", "text")]
  if not towers:
    return f"{direction}:step"
  path = [p for p in parts[towers[0]:-1] if p != "transformer"]  # [-1]: the primitive
  if "resblocks" in path:
    path = path[:path.index("resblocks") + 3]
  return f"{direction}:{'/'.join(path)}"


def summarize_trace(trace_dir: str, hlo_text: str = "", steps: int = 1, top: int = 25) -> dict:
  """Seconds per step by op, op category and model scope from a JAX profiler trace directory.

  Reads the newest `*.xplane.pb` under `trace_dir`. Device planes (GPU/TPU) are used when
  present, otherwise the CPU runtime's worker threads (on CPU, trace with XLA_FLAGS
  `--xla_cpu_enable_xprof_traceme=true` so every thunk is an event). Events are keyed by the
  HLO instruction that launched them (their `hlo_op` stat; a GPU op's kernels, a cuBLAS
  call or a copy, sum into their op). With the compiled module's text (`compiled.as_text()`)
  ops get their output shape, kind and scope (`op_scope` of their metadata), and matmuls
  their FLOPs and achieved GFLOP/s. Categories: "matmul" (dots, fusions holding one, cuBLAS
  calls), "fused_attention" (cuDNN), else the op's name without its number
  (`copy_bitcast_fusion`, `wrapped_broadcast`, ...). Concurrent ops on different threads
  both count, so the total can exceed the wall time.
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
  kernels: dict[str, str] = {}
  for plane in device_planes or planes:
    for line in plane.lines:
      if not device_planes and "XLAEigen" not in line.name:
        continue
      for event in line.events:
        if event.name.startswith(_WRAPPER_EVENTS):
          continue
        op = dict(event.stats).get("hlo_op") or event.name
        if op.startswith("command_buffer"):  # a GPU command buffer (graph) of many ops
          op = event.name
        seconds[op] += event.duration_ns / 1e9 / steps
        calls[op] += 1
        kernels.setdefault(op, event.name)
  instructions = _hlo_instructions(hlo_text) if hlo_text else {}
  computations = _computations(hlo_text) if hlo_text else {}
  ops, categories, scopes = [], collections.Counter(), collections.Counter()
  for name, secs in seconds.items():
    shape, opcode, flops, category, scope = None, None, 0, _kernel_category(name), "?"
    # A GPU fusion's kernel is named after its instruction, '.' written '_'.
    hlo_name = name if name in instructions else re.sub(r"_(\d+)$", r".\1", name)
    if hlo_name in instructions:
      dims, opcode, line = instructions[hlo_name]
      shape = _dims(dims)
      called = re.search(r"calls=%?([\w.\-]+)", line)
      if opcode == "dot":
        flops = _dot_flops(line, instructions)
      elif opcode == "custom-call":
        library_category, flops = _library_call(line, instructions)
        category = library_category or category
      elif called and called.group(1) in computations:
        flops = _dot_flops(computations[called.group(1)], instructions)
      op_names = re.findall(r'op_name="([^"]*)"', line)
      if not op_names and called and called.group(1) in computations:  # a fusion: its root's
        op_names = re.findall(r'op_name="([^"]*)"', computations[called.group(1)])
      scope = op_scope(op_names[-1] if op_names else "")
    per_step_calls = calls[name] / steps
    flops_per_step = flops * per_step_calls
    # A C++ kernel's name without its argument list; an op's without its number.
    category = category or ("matmul" if flops else re.sub(r"[._]\d+$", "", name.split("(")[0]))
    categories[category] += secs
    scopes[scope] += secs
    ops.append({"name": name, "s_per_step": round(secs, 5), "calls_per_step": per_step_calls,
                "opcode": opcode, "shape": shape, "category": category, "scope": scope,
                "kernel": kernels[name] if kernels[name] != name else None,
                "gflops_per_s": round(flops_per_step / secs / 1e9, 1) if flops and secs else None})
  ops.sort(key=lambda o: -o["s_per_step"])
  return {"trace": files[-1], "steps": steps, "source": "device" if device_planes else "cpu",
          "op_s_per_step": round(sum(seconds.values()), 4),
          "categories": {k: round(v, 4) for k, v in categories.most_common()},
          "scopes": {k: round(v, 4) for k, v in scopes.most_common(top)},
          "top_ops": ops[:top]}
