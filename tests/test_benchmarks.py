"""The benchmark scripts still run and print their JSON (numbers are not checked: no timing)."""
import json
import os
import pathlib
import subprocess
import sys

REPO = pathlib.Path(__file__).resolve().parents[1]


def _last_json(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, *args], cwd=REPO, env=env, capture_output=True,
                       text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  return json.loads(out.stdout.strip().splitlines()[-1])


def test_train_step_with_torch_peer():
  # With FLIP patch dropout on both sides (the peer through a hook on its patch embeddings).
  result = _last_json("benchmarks/train_step.py", "--model", "tiny", "--batch", "4", "--steps",
                      "2", "--warmup", "1", "--peer", "torch", "--malloc_retain",
                      "--patch_dropout", "0.5")
  for key in ("samples_per_s", "step_time_s", "compile_s", "flops_per_step", "achieved_tflops",
              "mfu", "peak_tflops", "peer_samples_per_s", "ratio"):
    assert key in result, key
  assert result["malloc_retain"] is True  # The script restarted itself with the glibc settings.
  assert result["samples_per_s"] > 0 and result["peer_samples_per_s"] > 0
  assert 0 < result["mfu"] and result["peak_tflops"] > 0
  # The analytic count of clip_jax.models.flops for this model and batch.
  from clip_jax.models.flops import train_flops_per_step
  assert result["patch_dropout"] == 0.5
  assert result["flops_per_step"] == train_flops_per_step("tiny", 4, 0.5) < train_flops_per_step(
      "tiny", 4)
  assert abs(result["ratio"] - result["samples_per_s"] / result["peer_samples_per_s"]) < 0.01 * result["ratio"]


def test_compile_time_prints_one_line_per_case(tmp_path):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "benchmarks/compile_time.py", "--models", "tiny",
                        "--scan", "true,false", "--batch", "4",
                        "--compilation_cache_dir", str(tmp_path / "cache")], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
  assert [(r["model"], r["scan_layers"]) for r in rows] == [("tiny", True), ("tiny", False)]
  assert all(r["total_s"] >= r["compile_s"] > 0 and r["compilation_cache"] for r in rows)


def test_step_profile_sums_the_trace_per_op():
  result = _last_json("benchmarks/step_profile.py", "--model", "tiny", "--batch", "4", "--steps",
                      "1", "--warmup", "1", "--top", "5")
  assert result["source"] == "cpu" and result["steps"] == 1
  categories = result["categories"]
  # Every matmul of the step is an op with a dot inside; the rest is named by op kind.
  assert categories["matmul"] > 0 and len(categories) > 3
  assert result["op_s_per_step"] >= categories["matmul"]
  assert len(result["top_ops"]) == 5
  assert all(op["s_per_step"] > 0 and op["calls_per_step"] > 0 for op in result["top_ops"])
  matmuls = [op for op in result["top_ops"] if op["category"] == "matmul"]
  assert all(op["gflops_per_s"] > 0 and op["shape"] for op in matmuls)


def test_accelerator_run_fits_a_batch_without_the_data_stack(tmp_path):
  """benchmarks/accelerator.py (the prepared GPU/TPU run) on CPU with a pretend memory size:
  the batch it picks fits its estimate, the step runs and is profiled, and it needs neither
  torch nor the data stack (the device image has neither grain nor tensorflow-datasets)."""
  blocked = ("grain", "tensorflow_datasets", "tensorflow", "torch", "transformers")
  argv = ["benchmarks/accelerator.py", "--models", "tiny", "--memory_gb", "0.15", "--steps", "1",
          "--warmup", "1", "--profile_steps", "1", "--probe_batch", "8", "--batch_multiple", "8",
          "--variants", "attention_impl=cudnn;remat_policy=dots", "--out", str(tmp_path / "out"),
          "--profile_command_buffers", "off"]  # the GPU default: a second build to profile
  code = (f"import sys, runpy\nfor m in {blocked!r}: sys.modules[m] = None\n"
          f"sys.argv = {argv!r}\nrunpy.run_path(sys.argv[0], run_name='__main__')")
  summary = _last_json("-c", code)
  assert summary["platform"] == "cpu" and summary["results"][1]["error"] is None
  lines = (tmp_path / "out" / "accelerator.jsonl").read_text().splitlines()
  cudnn, record = [json.loads(line) for line in lines]
  # cuDNN does not compile on CPU: recorded, and the batch is fitted for the next variant.
  assert cudnn["variant"] == {"attention_impl": "cudnn"} and "cuDNN" in cudnn["error"]
  assert record["variant"] == {"remat_policy": "dots"} and record["remat_policy"] == "dots"
  assert record["memory_fit"]["fitted_for"] == record["variant"]
  fit = record["memory_fit"]
  assert record["batch"] == fit["batch"] and fit["batch"] % 8 == 0 and fit["batch"] >= 8
  # The largest multiple of 8 within 85% (the default) of 0.15 GiB by the linear estimate.
  usable = 0.85 * 0.15
  assert fit["estimated_gib"] <= usable < fit["estimated_gib"] + 8 * fit["per_sample_gib"] + 1e-3
  assert record["dtype"] == "bfloat16" and record["samples_per_s"] > 0
  assert record["profile"]["categories"]["matmul"] > 0
  assert record["profile"]["command_buffers"] is False
