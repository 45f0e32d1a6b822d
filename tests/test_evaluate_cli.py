"""python -m clip_jax.evaluate: results JSON and one-line user errors."""
import json
import subprocess
import sys

import jax
import numpy as np
import pytest

from clip_jax.evaluate.__main__ import main
from clip_jax.models import create_model, init_params


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  from clip_jax.params_io import save_params
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


RECALL_KEYS = {f"{d}_retrieval_recall@{k}" for d in ("image", "text") for k in (1, 5, 10)}


def test_retrieval_synthetic_uses_every_caption(checkpoint, capsys):
  code, out, err = _run(["--checkpoint", checkpoint, "--task", "retrieval", "--dataset",
                         "synthetic", "--num_examples", "24", "--batch_size", "8",
                         "--captions_per_image", "3"], capsys)
  assert code == 0, err
  results = json.loads(out)
  assert results["task"] == "zeroshot_retrieval"
  assert results["num_examples"] == 24 and results["num_texts"] == 3 * 24
  metrics = results["metrics"]
  assert set(metrics) == RECALL_KEYS
  for direction in ("image", "text"):
    recalls = [metrics[f"{direction}_retrieval_recall@{k}"] for k in (1, 5, 10)]
    assert 0 <= recalls[0] <= recalls[1] <= recalls[2] <= 1


def test_retrieval_on_wds_captions_lines_and_json_lists(checkpoint, tmp_path, capsys):
  from clip_jax.data import wds
  rng = np.random.default_rng(0)
  # Two captions as lines of key.txt, or three in key.json's "captions": 5 images, 12 texts.
  samples = [(f"{i:03d}", rng.integers(0, 255, (20, 20, 3), np.uint8),
              f"photo {i}\nanother view {i}" if i % 2 else None,
              None if i % 2 else {"captions": [f"a {i}", f"b {i}", f"c {i}"]})
             for i in range(5)]
  wds.write_shard(str(tmp_path / "val-00000.tar"), samples)
  code, out, err = _run(["--checkpoint", checkpoint, "--task", "retrieval", "--dataset",
                         f"wds:{tmp_path}/val-{{00000..00000}}.tar", "--batch_size", "8"], capsys)
  assert code == 0, err
  results = json.loads(out)
  assert results["num_examples"] == 5 and results["num_texts"] == 2 * 2 + 3 * 3
  assert set(results["metrics"]) == RECALL_KEYS
  # 5 images: every image is among the top 5 for every caption.
  assert results["metrics"]["image_retrieval_recall@5"] == 1.0


@pytest.mark.parametrize("kind", ["csv", "files"])
def test_retrieval_on_csv_and_files(checkpoint, tmp_path, capsys, kind):
  from PIL import Image
  rng = np.random.default_rng(0)
  rows = ["filepath\ttitle"]
  for i in range(6):
    Image.fromarray(rng.integers(0, 255, (24, 20, 3), np.uint8)).save(tmp_path / f"{i:09d}.jpg")
    (tmp_path / f"{i:09d}.txt").write_text(f"picture number {i}")
    rows.append(f"{i:09d}.jpg\tpicture number {i}")
  (tmp_path / "val.tsv").write_text("\n".join(rows) + "\n")
  dataset = f"csv:{tmp_path}/val.tsv" if kind == "csv" else f"files:{tmp_path}"
  code, out, err = _run(["--checkpoint", checkpoint, "--task", "retrieval", "--dataset", dataset,
                         "--batch_size", "4"], capsys)
  assert code == 0, err
  results = json.loads(out)
  assert results["num_examples"] == 6 and results["num_texts"] == 6
  assert set(results["metrics"]) == RECALL_KEYS
  assert results["metrics"]["text_retrieval_recall@10"] == 1.0
  code, _, err = _run(["--checkpoint", checkpoint, "--task", "zeroshot", "--dataset", dataset],
                      capsys)
  assert code == 2 and "--task zeroshot needs class labels" in err


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
    (["--task", "zeroshot", "--dataset", "synthetic", "--captions_per_image", "3"],
     "--captions_per_image applies to --task retrieval --dataset synthetic only"),
    (["--task", "retrieval", "--dataset", "synthetic", "--captions_per_image", "99"],
     "--captions_per_image must be in [1, 19], got 99"),
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
