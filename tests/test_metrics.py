"""metrics.jsonl, TensorBoard events (read back by TensorBoard itself), MFU and the peak table."""
import json
import math
import time

import pytest

from clip_jax import metrics as metrics_lib


@pytest.mark.parametrize("kind, peak", [
    ("TPU v4", 275e12), ("TPU v5 lite", 197e12), ("TPU v5", 459e12), ("TPU v5p", 459e12),
    ("TPU v6 lite", 918e12), ("NVIDIA A100-SXM4-80GB", 312e12),
    ("NVIDIA H100 80GB HBM3", 989e12), ("NVIDIA H200", 989e12), ("cpu", None)])
def test_peak_flops_table(kind, peak):
  assert metrics_lib.peak_flops_per_device(kind) == peak


def test_mfu_closed_form():
  # 8 H100s doing 1e15 FLOPs per step in 0.5 s: 2e15 / (8 * 989e12).
  mfu = metrics_lib.model_flops_utilization(1e15, 0.5, 8, "NVIDIA H100 80GB HBM3")
  assert mfu == pytest.approx(2e15 / (8 * 989e12), rel=1e-12)
  assert metrics_lib.model_flops_utilization(1e15, 0.5, 8, "cpu") is None


def _write_run(workdir, steps, start_step=0, loss_scale=1.0):
  writer = metrics_lib.MetricsWriter(str(workdir), total_steps=10, start_step=start_step,
                                     progress_bar=False)
  for step in steps:
    writer.write(step, {"loss": loss_scale / step, "learning_rate": 1e-3 * step, "logit_scale": 14.3,
                        "samples_per_s": 100.0, "step_time_s": 0.1, "grad_norm": 2.0,
                        "data/skipped_samples": 0})
  writer.write(steps[-1], {"eval/synthetic/top1": 0.5})
  writer.close()


def test_jsonl_and_tensorboard_carry_named_keys(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  _write_run(tmp_path, [1, 2, 3])
  records = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  assert [r["step"] for r in records] == [1, 2, 3, 3]
  assert records[1]["loss"] == 0.5 and records[1]["learning_rate"] == pytest.approx(2e-3)
  assert records[-1] == {"step": 3, "eval/synthetic/top1": 0.5}

  events = EventAccumulator(str(tmp_path))
  events.Reload()
  tags = set(events.Tags()["scalars"])
  assert {"loss", "learning_rate", "logit_scale", "samples_per_s", "step_time_s", "grad_norm",
          "data/skipped_samples", "eval/synthetic/top1"} <= tags
  loss = events.Scalars("loss")
  assert [e.step for e in loss] == [1, 2, 3]
  assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 1 / 3])


def test_resume_rewinds_the_jsonl_and_tensorboard(tmp_path):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  _write_run(tmp_path, [1, 2, 3, 4])
  time.sleep(1.05)  # tensorboardX names event files by the second; a restart takes longer
  _write_run(tmp_path, [3, 4, 5], start_step=2, loss_scale=10.0)  # resumed at step 2
  steps = [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl") if "loss" in r]
  assert steps == [1, 2, 3, 4, 5]
  # TensorBoard shows each step once: the first run's steps 3 and 4 are purged.
  events = EventAccumulator(str(tmp_path))
  events.Reload()
  loss = events.Scalars("loss")
  assert [e.step for e in loss] == [1, 2, 3, 4, 5]
  assert [e.value for e in loss] == pytest.approx([1.0, 0.5, 10 / 3, 10 / 4, 10 / 5])


def test_non_finite_values_are_strict_json_nulls(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path), total_steps=2, progress_bar=False)
  writer.write(1, {"loss": math.nan, "grad_norm": math.inf})
  writer.close()
  line = (tmp_path / "metrics.jsonl").read_text().strip()
  assert json.loads(line) == {"step": 1, "loss": None, "grad_norm": None}


def test_only_the_primary_process_writes(tmp_path):
  writer = metrics_lib.MetricsWriter(str(tmp_path / "w"), total_steps=2, is_primary=False)
  writer.write(1, {"loss": 1.0})
  writer.close()
  assert not (tmp_path / "w").exists()


def test_wandb_missing_is_one_clear_error(tmp_path):
  pytest.importorskip("tensorboardX")
  try:
    import wandb  # noqa: F401
    pytest.skip("wandb is installed")
  except ImportError:
    pass
  with pytest.raises(ValueError, match="wandb is not installed"):
    metrics_lib.MetricsWriter(str(tmp_path), total_steps=2, progress_bar=False,
                              wandb_config={"project": "p"})


def test_object_store_workdirs_are_rewritten_not_appended(tmp_path, monkeypatch):
  # gs:// has no append: the records are written on local disk and copied whole to the
  # workdir in the background (tests/test_gcs.py runs this against a GCS server).
  monkeypatch.setattr(metrics_lib, "is_local", lambda path: False)
  writer = metrics_lib.MetricsWriter(str(tmp_path), total_steps=4, progress_bar=False,
                                     min_rewrite_interval_s=0.1)
  assert writer._mirror is not None and writer.jsonl_path != str(tmp_path / "metrics.jsonl")
  for step in (1, 2, 3):
    writer.write(step, {"loss": 1.0 / step})
  writer.close()
  path = tmp_path / "metrics.jsonl"
  assert [r["step"] for r in metrics_lib.read_jsonl(path)] == [1, 2, 3]
  resumed = metrics_lib.MetricsWriter(str(tmp_path), total_steps=4, start_step=2,
                                      progress_bar=False, min_rewrite_interval_s=0.1)
  resumed.write(3, {"loss": 0.5})
  resumed.close()
  assert [(r["step"], r["loss"]) for r in metrics_lib.read_jsonl(path)] == [
      (1, 1.0), (2, 0.5), (3, 0.5)]
