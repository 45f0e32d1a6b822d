"""python -m clip_jax.evaluate --suite: per-dataset JSONs, summary.{json,md,png}, --compare,
skipped datasets, and single tasks on class folders."""
import json

import jax
import numpy as np
import pytest
from PIL import Image

from clip_jax.assets import asset_path
from clip_jax.evaluate import suite, summary
from clip_jax.evaluate.__main__ import main
from clip_jax.evaluate.runner import Options
from clip_jax.models import create_model, init_params

SMOKE_ARGS = ["--num_examples", "24", "--batch_size", "8", "--shots", "1", "--seeds", "2",
              "--no_progress"]


def _random_params(model):
  """Parameters of the model's shapes drawn with numpy: no init to run (~20 s on 2 cores)."""
  rng = np.random.default_rng(0)
  shapes = jax.eval_shape(lambda key: init_params(model, key), jax.random.PRNGKey(0))

  def draw(path, leaf):
    name = str(getattr(path[-1], "key", path[-1]))
    if name == "scale":
      return np.ones(leaf.shape, leaf.dtype)
    if name == "bias":
      return np.zeros(leaf.shape, leaf.dtype)
    if name == "logit_scale":
      return np.full(leaf.shape, np.log(1 / 0.07), leaf.dtype)
    return (0.02 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  # A converted-model dir of the tiny model with random parameters (no training needed).
  from clip_jax.params_io import save_params
  model = create_model("tiny")
  path = tmp_path_factory.mktemp("ckpt") / "tiny"
  save_params(path, _random_params(model), model.config)
  return str(path)


@pytest.fixture(scope="module")
def smoke_dir(checkpoint, tmp_path_factory):
  out = tmp_path_factory.mktemp("smoke")
  assert main(["--checkpoint", checkpoint, "--suite", "smoke", "--output_dir", str(out)]
              + SMOKE_ARGS) == 0
  return out


def _folders(root, classes, per_class=2):
  rng = np.random.default_rng(0)
  for c in classes:
    (root / c).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, (20, 28, 3), np.uint8)).save(root / c / f"{i}.png")
  return root


def test_smoke_suite_end_to_end(smoke_dir):
  files = {"synthetic_zeroshot.json": "zeroshot_classification",
           "synthetic_linear_probe.json": "linear_probe",
           "synthetic_retrieval.json": "zeroshot_retrieval"}
  for name, task in files.items():
    result = json.loads((smoke_dir / name).read_text())
    assert result["task"] == task and result["dataset"] == "synthetic"
    assert result["num_examples"] == 24 and result["model"] == "tiny"
  zeroshot = json.loads((smoke_dir / "synthetic_zeroshot.json").read_text())
  # The single-task command's JSON, unchanged.
  assert set(zeroshot) == {"dataset", "model", "task", "metrics", "checkpoint", "split",
                           "num_examples"}
  retrieval = json.loads((smoke_dir / "synthetic_retrieval.json").read_text())
  assert retrieval["num_texts"] == 5 * 24
  probe = json.loads((smoke_dir / "synthetic_linear_probe.json").read_text())
  assert probe["fewshot"]["shots"] == [1] and probe["fewshot"]["seeds"] == [0, 1]
  runs = probe["fewshot"]["per_seed"]["1"]
  accs = [r["lp_acc1"] for r in runs]
  assert probe["metrics"]["1shot_lp_acc1"] == pytest.approx(np.mean(accs))
  assert probe["metrics"]["1shot_lp_acc1_std"] == pytest.approx(np.std(accs))

  data = json.loads((smoke_dir / "summary.json").read_text())
  assert data["suite"] == "smoke" and data["model"] == "tiny" and data["skipped"] == []
  assert [r["file"] for r in data["results"]] == list(files)
  rows = {(r["task"], r["metric"]): r for r in data["rows"]}
  assert rows[("zeroshot_classification", "acc1")]["value"] == zeroshot["metrics"]["acc1"]
  assert rows[("zeroshot_retrieval", "text_retrieval_recall@5")]["value"] == (
      retrieval["metrics"]["text_retrieval_recall@5"])
  assert rows[("linear_probe", "lp_acc1 (1-shot)")]["std"] == probe["metrics"]["1shot_lp_acc1_std"]

  table = (smoke_dir / "summary.md").read_text().splitlines()
  assert "| dataset | task | metric | value | examples |" in table
  acc1 = zeroshot["metrics"]["acc1"]
  assert f"| synthetic | zeroshot_classification | acc1 | {acc1:.4f} | 24 |" in table
  assert any(line.startswith("| synthetic | linear_probe | lp_acc1 (1-shot) |") and " ± " in line
             for line in table)
  assert len([line for line in table if line.startswith("| synthetic |")]) == 2 + 1 + 4
  with Image.open(smoke_dir / "summary.png") as png:
    png.load()
    assert png.format == "PNG" and png.size[0] > 100 and png.size[1] > 100


def test_compare_adds_the_other_checkpoints_scores(checkpoint, smoke_dir, tmp_path, capsys):
  out = tmp_path / "second"
  assert main(["--checkpoint", checkpoint, "--suite", "zeroshot:synthetic", "--output_dir",
               str(out), "--compare", str(smoke_dir), "--num_examples", "24", "--batch_size",
               "8", "--no_progress"]) == 0
  table = (out / "summary.md").read_text()
  assert ("| dataset | task | metric | value: tiny (tiny) | value: tiny (tiny) | difference |"
          in table)
  # Same checkpoint, same data: the difference is zero.
  assert "| synthetic | zeroshot_classification | acc1 |" in table and "| +0.0000 |" in table
  assert "compare" in json.loads((out / "summary.json").read_text())
  with Image.open(out / "summary.png") as png:
    png.load()
  assert "| synthetic | zeroshot_classification | acc1 |" in capsys.readouterr().out


def test_missing_datasets_are_listed_as_skipped(checkpoint, tmp_path):
  out = tmp_path / "out"
  empty = tmp_path / "data"
  empty.mkdir()
  code = main(["--checkpoint", checkpoint, "--suite",
               f"zeroshot:imagefolder:{tmp_path}/nope,zeroshot:imagenet_a",
               "--data_dir", str(empty), "--output_dir", str(out), "--no_progress"])
  assert code == 0
  data = json.loads((out / "summary.json").read_text())
  assert data["rows"] == [] and [s["dataset"] for s in data["skipped"]] == [
      f"imagefolder:{tmp_path}/nope", "imagenet_a"]
  folder, tfds = data["skipped"]
  assert "does not exist" in folder["reason"] and "/<class>/" in folder["how_to"]
  assert "imagenet_a" in tfds["reason"] and tfds["how_to"].startswith("tfds build imagenet_a")
  table = (out / "summary.md").read_text()
  assert "## Skipped" in table and "| imagenet_a | zeroshot_classification |" in table


def test_robustness_suite_finds_folders_and_skips_the_rest(tmp_path):
  # Resolution only (no model): ImageNet val and ImageNet-R as WordNet-id folders; a sketch
  # folder of plain names is no ImageNet set; the rest absent.
  wnids = json.loads(asset_path("imagenet_wnids.json").read_text())
  _folders(tmp_path / "imagenet" / "val", wnids["imagenet"][:2], per_class=1)
  _folders(tmp_path / "imagenet" / "train", wnids["imagenet"][:2], per_class=1)
  _folders(tmp_path / "imagenet-r", wnids["imagenet_r"][:3], per_class=1)
  _folders(tmp_path / "imagenet-sketch", ["a", "b"], per_class=1)
  items = [suite.resolve(task, entry, Options(data_dir=str(tmp_path)))
           for task, entry in suite.parse_suite("robustness")]
  assert [i.name for i in items] == ["imagenet2012", "imagenet_v2", "imagenet_sketch",
                                     "imagenet_a", "imagenet_r"]
  assert items[0].dataset == f"imagefolder:{tmp_path}/imagenet/val"
  assert items[-1].dataset == f"imagefolder:{tmp_path}/imagenet-r"
  assert items[0].classnames is None and items[-1].classnames is None
  for item in items[1:-1]:
    assert item.dataset is None and "tfds build" in item.how_to and "class folders" in item.how_to


def test_robustness_suite_on_folders_encodes_imagenets_prompts_once(checkpoint, tmp_path,
                                                                   monkeypatch):
  # ImageNet val and ImageNet-R as WordNet-id folders (V2, Sketch, A absent: skipped). Both
  # score against one 1000-class classifier: the text tower runs once for the suite. Its
  # 80,000 prompts are too many for the tiny model on CPU, so the classifier is stubbed.
  from clip_jax.evaluate import zeroshot
  calls = []

  def build_classifier(encode_text_fn, classnames, templates, tokenize_fn=None):
    calls.append((len(classnames), len(templates)))
    dim = encode_text_fn(np.zeros((1, 77), np.int32)).shape[1]
    return np.random.default_rng(0).normal(size=(dim, len(classnames))).astype(np.float32)

  monkeypatch.setattr(zeroshot, "build_classifier", build_classifier)
  wnids = json.loads(asset_path("imagenet_wnids.json").read_text())
  _folders(tmp_path / "data" / "imagenet" / "val", wnids["imagenet"][:3], per_class=1)
  _folders(tmp_path / "data" / "imagenet-r", wnids["imagenet_r"][:2], per_class=2)
  out = tmp_path / "out"
  assert main(["--checkpoint", checkpoint, "--suite", "robustness", "--data_dir",
               str(tmp_path / "data"), "--output_dir", str(out), "--batch_size", "8",
               "--no_progress"]) == 0
  assert calls == [(1000, 80)]
  data = json.loads((out / "summary.json").read_text())
  assert [r["dataset"] for r in data["results"]] == ["imagenet2012", "imagenet_r"]
  assert [s["dataset"] for s in data["skipped"]] == ["imagenet_v2", "imagenet_sketch",
                                                     "imagenet_a"]
  result = json.loads((out / "imagenet_r_zeroshot.json").read_text())
  assert result["num_examples"] == 4
  assert result["dataset"] == f"imagefolder:{tmp_path / 'data' / 'imagenet-r'}"
  shift = data["distribution_shift"]
  assert shift["variants"] == {"imagenet_r": result["metrics"]["acc1"]}
  assert "## Distribution shift (zero-shot top-1)" in (out / "summary.md").read_text()


def test_distribution_shift_is_each_variant_and_their_mean():
  def result(name, acc1):
    return {"name": name, "file": f"{name}.json", "result": {
        "task": "zeroshot_classification", "num_examples": 10,
        "metrics": {"acc1": acc1, "acc5": 1.0, "mean_per_class_recall": acc1}}}
  built = summary.build([result("imagenet2012", 0.7), result("imagenet_v2", 0.6),
                         result("imagenet_a", 0.3)], [], suite="robustness", model="m",
                        checkpoint="/c")
  shift = built["distribution_shift"]
  assert shift["variants"] == {"imagenet_v2": 0.6, "imagenet_a": 0.3}
  assert shift["variant_mean_acc1"] == pytest.approx(0.45)
  assert shift["shift"] == pytest.approx(-0.25)
  table = summary.markdown(built)
  assert "| mean of 2 variants | 0.4500 | -0.2500 |" in table
  assert "| imagenet_a | 0.3000 | -0.4000 |" in table


@pytest.mark.parametrize("text, message", [
    ("zeroshot", "--suite item 'zeroshot' is not task:dataset"),
    ("classify:synthetic", "--suite item 'classify:synthetic': unknown task 'classify'"),
])
def test_bad_suite_items_are_one_line(text, message):
  with pytest.raises(ValueError, match=f"^{message}"):
    suite.parse_suite(text)


def test_suite_items_keep_brace_patterns_whole():
  items = suite.parse_suite("retrieval:wds:/d/{00000..00003}.tar,zeroshot:synthetic")
  assert [(t, e.name) for t, e in items] == [("retrieval", "wds:/d/{00000..00003}.tar"),
                                             ("zeroshot", "synthetic")]
  assert suite.split_items("a:{x,y},b:c") == ["a:{x,y}", "b:c"]


def test_zeroshot_on_folders_through_the_command_line(checkpoint, tmp_path, capsys):
  root = _folders(tmp_path / "val", ["cat", "dog", "bird"], per_class=2)
  output = tmp_path / "r.json"
  code = main(["--checkpoint", checkpoint, "--task", "zeroshot", "--dataset",
               f"imagefolder:{root}", "--batch_size", "8", "--output", str(output)])
  err = capsys.readouterr().err
  assert code == 0, err
  result = json.loads(output.read_text())
  assert result["dataset"] == f"imagefolder:{root}" and result["num_examples"] == 6
  assert result["task"] == "zeroshot_classification"
  assert set(result["metrics"]) == {"acc1", "acc5", "mean_per_class_recall"}
  assert result["metrics"]["acc5"] == 1.0  # 3 classes: always in the top 5


@pytest.mark.parametrize("args, message", [
    (["--task", "zeroshot", "--dataset", "imagefolder:{root}", "--classnames", "cifar10"],
     "image folder {root} has 3 class sub-folders but --classnames cifar10 has 10 classes"),
    (["--suite", "smoke"], "--suite needs --output_dir, where the results and the summary go"),
    (["--suite", "smoke", "--task", "zeroshot", "--output_dir", "x"],
     "--suite runs its own tasks and datasets; drop --task/--dataset"),
    (["--task", "zeroshot", "--dataset", "synthetic", "--shots", "1"],
     "--shots applies to --task linear_probe only"),
    (["--suite", "smoke", "--output_dir", "x", "--compare", "{root}"],
     "--compare {root} has no summary.json"),
])
def test_user_errors_are_one_line(checkpoint, tmp_path, capsys, args, message):
  root = _folders(tmp_path / "val", ["a", "b", "c"], per_class=1)
  code = main(["--checkpoint", checkpoint] + [a.format(root=root) for a in args])
  captured = capsys.readouterr()
  assert code == 2 and captured.out == ""
  assert captured.err.startswith(f"error: {message.format(root=root)}")
  assert captured.err.count("\n") == 1
