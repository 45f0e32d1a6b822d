"""What a run reports: WORKDIR/metrics.jsonl, TensorBoard events, wandb, a console bar, MFU.

Only process 0 writes (`is_primary`); the others get a writer whose methods do nothing, so
the trainer calls it the same way on every host.
"""
from __future__ import annotations

import json
import math
import sys
import time
from typing import Any, Mapping, Optional

from etils import epath

from clip_jax import storage

# Peak dense bf16 FLOP/s of one device (a chip; a GPU), from the vendors' data sheets.
# Matched against jax's `device_kind` by the longest key it contains.
PEAK_BF16_FLOPS = {
    "TPU v3": 123e12,
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,   # v5e
    "TPU v5e": 197e12,
    "TPU v5": 459e12,        # v5p reports "TPU v5"
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,   # v6e (Trillium)
    "TPU v6e": 918e12,
    "A10": 125e12,           # "A100" also contains "A10": the longest key wins
    "A100": 312e12,
    "L4": 121e12,
    "H100": 989e12,
    "H200": 989e12,
}


def peak_flops_per_device(device_kind: str) -> Optional[float]:
  """Peak bf16 FLOP/s of a device kind, or None when it is not in the table (e.g. CPU)."""
  matches = [key for key in PEAK_BF16_FLOPS if key.lower() in device_kind.lower()]
  if not matches:
    return None
  return PEAK_BF16_FLOPS[max(matches, key=len)]


def model_flops_utilization(flops_per_step: float, step_time_s: float, num_devices: int,
                            device_kind: str) -> Optional[float]:
  """Achieved model FLOP/s over the devices' peak; None when the peak is unknown."""
  peak = peak_flops_per_device(device_kind)
  if peak is None or step_time_s <= 0:
    return None
  return flops_per_step / step_time_s / (num_devices * peak)


def is_local(path) -> bool:
  """A local filesystem path (not gs://, s3://, ...: those have no append or rename)."""
  return not storage.is_remote(path)


def read_jsonl(path) -> list[dict]:
  text = epath.Path(path).read_text()
  return [json.loads(line) for line in text.splitlines() if line.strip()]


def _jsonl_text(records) -> str:
  return "".join(json.dumps(record) + "\n" for record in records)


def records_through(path, last_step: int) -> list[dict]:
  """The records of `path` up to `last_step` (none if it does not exist)."""
  if not epath.Path(path).exists():
    return []
  return [r for r in read_jsonl(path) if r.get("step", 0) <= last_step]


def rewind_jsonl(path, last_step: int) -> None:
  """Drops records after `last_step`: a resumed run re-logs the steps it repeats."""
  if epath.Path(path).exists():
    storage.write_text(str(path), _jsonl_text(records_through(path, last_step)))


def _to_python(value):
  value = value.item() if hasattr(value, "item") else value
  return float(value) if isinstance(value, float) else value


class MetricsWriter:
  """Writes one record per logged step to every configured sink.

  Args:
    workdir: the run directory; metrics.jsonl and the TensorBoard events go there.
    total_steps: for the progress bar and the ETA.
    start_step: the step the run starts (or resumes) from.
    is_primary: False on processes other than 0: nothing is written.
    progress_bar: a tqdm bar on stderr; False prints one plain line per record.
    wandb_config: {"project", "entity", "name"}; wandb is used when project is set.
    run_config: logged to wandb as the run's config.
    min_rewrite_interval_s: on an object store (gs://), the least time between two uploads
      of metrics.jsonl or of an event file.
  """

  def __init__(self, workdir: str, *, total_steps: int, start_step: int = 0,
               is_primary: bool = True, progress_bar: bool = True,
               wandb_config: Optional[Mapping[str, str]] = None,
               run_config: Optional[Mapping[str, Any]] = None,
               min_rewrite_interval_s: float = storage.MIN_REWRITE_INTERVAL_S):
    self.is_primary = is_primary
    self.total_steps = total_steps
    self._start_step = start_step
    self._start_time = time.time()
    self._jsonl = self._tb = self._wandb = self._bar = self._mirror = None
    if not is_primary:
      return
    if is_local(workdir):
      epath.Path(workdir).mkdir(parents=True, exist_ok=True)
      self.jsonl_path = str(epath.Path(workdir) / "metrics.jsonl")
      rewind_jsonl(self.jsonl_path, start_step)
      self._jsonl = open(self.jsonl_path, "a")
      logdir = workdir
    else:
      # An object store cannot append, and its writes may fail or stall: the records and
      # the TensorBoard events are written on local disk and copied to the workdir in the
      # background (each object rewritten at most once per storage.min_rewrite_interval_s).
      self._mirror = storage.RemoteMirror(workdir, name="metrics",
                                          min_interval_s=min_rewrite_interval_s)
      self.jsonl_path = self._mirror.local_path("metrics.jsonl")
      kept = records_through(epath.Path(workdir) / "metrics.jsonl", start_step)
      self._jsonl = open(self.jsonl_path, "w")
      self._jsonl.write(_jsonl_text(kept))
      self._jsonl.flush()
      self._mirror.mark()
      logdir = self._mirror.local_dir
    from tensorboardX import SummaryWriter  # pylint: disable=g-import-not-at-top
    # A resumed run re-logs the steps after its checkpoint: TensorBoard hides the earlier
    # run's events from purge_step on (a SessionLog.START event), as rewind_jsonl drops them.
    self._tb = SummaryWriter(logdir=logdir, flush_secs=30,
                             purge_step=start_step + 1 if start_step else None)
    if wandb_config and wandb_config.get("project"):
      try:
        import wandb  # pylint: disable=g-import-not-at-top
      except ImportError:
        raise ValueError("config.wandb.project is set but wandb is not installed; "
                         "run `pip install wandb` or set --config.wandb.project=''") from None
      self._wandb = wandb.init(project=wandb_config["project"],
                               entity=wandb_config.get("entity") or None,
                               name=wandb_config.get("name") or None,
                               config=dict(run_config or {}), resume="allow")
    if progress_bar:
      from tqdm import tqdm  # pylint: disable=g-import-not-at-top
      self._bar = tqdm(total=total_steps, initial=start_step, unit="step", dynamic_ncols=True,
                       file=sys.stderr)
    self._bar_step = start_step

  def write(self, step: int, metrics: Mapping[str, Any]) -> None:
    """Appends {"step": step, **metrics} to every sink (non-finite floats become null)."""
    if not self.is_primary:
      return
    record = {"step": int(step)}
    for key, value in metrics.items():
      value = _to_python(value)
      if isinstance(value, float) and not math.isfinite(value):
        value = None  # strict JSON has no NaN/Infinity
      record[key] = value
    self._jsonl.write(json.dumps(record) + "\n")
    self._jsonl.flush()
    if self._mirror is not None:
      self._mirror.mark()
    for key, value in record.items():
      if key != "step" and isinstance(value, (int, float)) and not isinstance(value, bool):
        self._tb.add_scalar(key, value, global_step=step)
    if self._wandb is not None:
      self._wandb.log({k: v for k, v in record.items() if k != "step"}, step=int(step))
    if "loss" in record:
      self._progress(step, record)

  def _progress(self, step: int, record: Mapping[str, Any]) -> None:
    loss, rate = record.get("loss"), record.get("samples_per_s")
    if self._bar is not None:
      self._bar.update(step - self._bar_step)
      self._bar_step = step
      postfix = {"loss": f"{loss:.4f}" if loss is not None else "nan"}
      if rate:
        postfix["samples/s"] = f"{rate:.1f}"
      self._bar.set_postfix(postfix, refresh=False)
      return
    elapsed = time.time() - self._start_time
    done = max(step - self._start_step, 1)
    eta = elapsed / done * (self.total_steps - step)
    loss_text = f"{loss:.4f}" if loss is not None else "nan"
    rate_text = f"{rate:.1f}" if rate else "-"
    print(f"step {step}/{self.total_steps}  loss {loss_text}  samples/s {rate_text}  "
          f"eta {_format_seconds(eta)}", flush=True)

  def flush(self) -> None:
    if self._tb is not None:
      self._tb.flush()
    if self._mirror is not None:
      self._mirror.mark()

  def close(self) -> None:
    if self._jsonl is not None:
      self._jsonl.close()
      self._jsonl = None
    if self._tb is not None:
      self._tb.close()
      self._tb = None
    if self._bar is not None:
      self._bar.close()
      self._bar = None
    if self._wandb is not None:
      self._wandb.finish()
      self._wandb = None
    if self._mirror is not None:
      self._mirror.close()
      self._mirror = None


def _format_seconds(seconds: float) -> str:
  seconds = int(max(seconds, 0))
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}:{m:02d}:{s:02d}" if h else f"{m}:{s:02d}"
