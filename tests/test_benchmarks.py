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
  result = _last_json("benchmarks/train_step.py", "--model", "tiny", "--batch", "4", "--steps",
                      "2", "--warmup", "1", "--peer", "torch", "--malloc_retain")
  for key in ("samples_per_s", "step_time_s", "compile_s", "flops_per_step", "achieved_tflops",
              "mfu", "peak_tflops", "peer_samples_per_s", "ratio"):
    assert key in result, key
  assert result["malloc_retain"] is True  # The script restarted itself with the glibc settings.
  assert result["samples_per_s"] > 0 and result["peer_samples_per_s"] > 0
  assert 0 < result["mfu"] and result["peak_tflops"] > 0
  # The analytic count of clip_jax.models.flops for this model and batch.
  from clip_jax.models.flops import train_flops_per_step
  assert result["flops_per_step"] == train_flops_per_step("tiny", 4)
  assert abs(result["ratio"] - result["samples_per_s"] / result["peer_samples_per_s"]) < 0.01 * result["ratio"]


def test_compile_time_prints_one_line_per_case():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  out = subprocess.run([sys.executable, "benchmarks/compile_time.py", "--models", "tiny",
                        "--scan", "true,false", "--batch", "4"], cwd=REPO, env=env,
                       capture_output=True, text=True, timeout=600)
  assert out.returncode == 0, out.stderr[-3000:]
  rows = [json.loads(line) for line in out.stdout.strip().splitlines()]
  assert [(r["model"], r["scan_layers"]) for r in rows] == [("tiny", True), ("tiny", False)]
  assert all(r["total_s"] >= r["compile_s"] > 0 for r in rows)


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
