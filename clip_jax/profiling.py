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
