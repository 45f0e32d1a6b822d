"""python -m clip_jax.evaluate: results JSON and one-line user errors."""
import json
import subprocess
import sys

import jax
import pytest

from clip_jax.evaluate.__main__ import main
from clip_jax.models import create_model, init_params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  from clip_jax.inference import save_params
  model = create_model("tiny")
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  save_params(path, init_params(model, jax.random.PRNGKey(0)), model.config)
  return str(path)


def _run(args, capsys):
  code = main(args)
  captured = capsys.readouterr()
  return code, captured.out, captured.err


def test_zeroshot_synthetic_writes_clip_benchmark_json(checkpoint, tmp_path, capsys):
  output = tmp_path / "results.json"
  code, _, err = _run(["--checkpoint", checkpoint, "--task", "zeroshot", "--dataset", "synthetic",
                       "--num_examples", "40", "--batch_size", "16", "--output", str(output)],
                      capsys)
  assert code == 0, err
  results = json.loads(output.read_text())
  assert results["dataset"] == "synthetic" and results["model"] == "tiny"
  assert results["task"] == "zeroshot_classification" and results["num_examples"] == 40
  assert set(results["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
  assert 0 <= results["metrics"]["acc1"] <= results["metrics"]["acc5"] <= 1


def test_retrieval_synthetic(checkpoint, capsys):
  code, out, err = _run(["--checkpoint", checkpoint, "--task", "retrieval", "--dataset",
                         "synthetic", "--num_examples", "24", "--batch_size", "8"], capsys)
  assert code == 0, err
  metrics = json.loads(out)["metrics"]
  assert set(metrics) == {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}
  assert metrics["image_retrieval_recall@1"] <= metrics["image_retrieval_recall@10"]


@pytest.mark.slow
def test_linear_probe_synthetic(checkpoint, capsys):
  code, out, err = _run(["--checkpoint", checkpoint, "--task", "linear_probe", "--dataset",
                         "synthetic", "--num_examples", "60", "--batch_size", "32"], capsys)
  assert code == 0, err
  metrics = json.loads(out)["metrics"]
  assert {"lp_acc1", "lp_acc5", "lp_mean_per_class_recall", "best_l2"} <= set(metrics)


@pytest.mark.parametrize("args, message", [
    (["--task", "classify", "--dataset", "synthetic"],
     "unknown task 'classify'; known: zeroshot, retrieval, linear_probe"),
    (["--task", "zeroshot", "--dataset", "coco"], "no zero-shot prompts for dataset 'coco'; known: "),
    (["--task", "retrieval", "--dataset", "no_such_dataset"],
     "unknown dataset 'no_such_dataset'; known: synthetic, a TFDS dataset name"),
    (["--task", "zeroshot", "--dataset", "wds:/x/{0..3}.tar"], "--task zeroshot needs class labels; wds shards"),
])
def test_user_errors_are_one_line(checkpoint, capsys, args, message):
  code, out, err = _run(["--checkpoint", checkpoint] + args, capsys)
  assert code == 2 and out == ""
  assert err.startswith(f"error: {message}") and err.count("\n") == 1


def test_missing_checkpoint_exits_without_traceback(tmp_path):
  result = subprocess.run(
      [sys.executable, "-m", "clip_jax.evaluate", "--workdir", str(tmp_path / "nope"),
       "--task", "zeroshot", "--dataset", "synthetic"], capture_output=True, text=True)
  assert result.returncode == 2
  assert result.stderr.strip() == (f"error: --workdir {tmp_path / 'nope'} does not exist; pass a "
                                   "converted model dir, a training workdir or a "
                                   "checkpoints/<step> dir")
