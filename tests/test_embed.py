"""`python -m clip_jax.embed` and its filter on small datasets made here, with a tiny random
CLIP: shapes, normalisation, rows aligned with the metadata, clip_score against clip_jax.load,
bad samples named, a SIGKILLed run resumed byte for byte, the filter against numpy, and the
trainer on the filter's TSV."""
import csv
import functools
import io
import json
import os
import pathlib
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image, ImageDraw

import clip_jax
from clip_jax import embed as embed_lib
from clip_jax import params_io
from clip_jax.data import wds
from clip_jax.models import create_model, init_params
from test_gcs import BUCKET, gcs  # noqa: F401  (the local GCS server fixture)

REPO = pathlib.Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 70, 220),
          "yellow": (235, 200, 40), "purple": (140, 60, 170), "orange": (240, 130, 30)}
SHAPES = ("circle", "square", "triangle")


def make_checkpoint(directory) -> str:
  """A converted dir of the tiny model with random weights (what clip_jax.load takes): the
  parameter shapes from jax.eval_shape, drawn with numpy (a real init takes ~15 s here)."""
  model = create_model("tiny")
  rng = np.random.default_rng(0)

  def draw(path, leaf):
    name = jax.tree_util.keystr(path)
    if name.endswith("['scale']"):
      return np.ones(leaf.shape, leaf.dtype)
    if name.endswith("['bias']"):
      return np.zeros(leaf.shape, leaf.dtype)
    if name == "['logit_scale']":
      return np.asarray(np.log(1 / 0.07), leaf.dtype)
    return (0.05 * rng.standard_normal(leaf.shape)).astype(leaf.dtype)

  shapes = jax.eval_shape(functools.partial(init_params, model), jax.random.PRNGKey(0))
  params_io.save_params(directory, jax.tree_util.tree_map_with_path(draw, shapes), model.config)
  return str(directory)


def shape_image(i: int, size: int = 48) -> tuple[np.ndarray, str]:
  """Image i: a coloured shape on a grey ground, and its caption."""
  color, shape = list(COLORS)[i % len(COLORS)], SHAPES[(i // len(COLORS)) % len(SHAPES)]
  image = Image.new("RGB", (size + 8 * (i % 3), size), (200 + i % 40, 200, 200))
  draw = ImageDraw.Draw(image)
  box = (8 + i % 5, 8, size - 8, size - 8 - i % 4)
  if shape == "circle":
    draw.ellipse(box, fill=COLORS[color])
  elif shape == "square":
    draw.rectangle(box, fill=COLORS[color])
  else:
    draw.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])],
                 fill=COLORS[color])
  return np.asarray(image), f"a {color} {shape} number {i}"


def make_files_dataset(root, num: int, *, broken=(), uncaptioned=(), with_json=()) -> str:
  """img2dataset's files layout: root/00000/00000i.jpg + .txt (+ .json)."""
  folder = pathlib.Path(root) / "00000"
  folder.mkdir(parents=True)
  for i in range(num):
    pixels, caption = shape_image(i)
    name = folder / f"{i:06d}"
    if i in broken:
      name.with_suffix(".jpg").write_bytes(b"not a jpeg")
    else:
      Image.fromarray(pixels).save(name.with_suffix(".jpg"), quality=95)
    if i not in uncaptioned:
      name.with_suffix(".txt").write_text(caption)
    if i in with_json:
      name.with_suffix(".json").write_text(json.dumps({"url": f"https://example.com/{i}.jpg",
                                                       "width": 48, "caption": "ignored"}))
  return str(root)


def read_output(output_dir) -> dict:
  """All partitions concatenated: {"image", "text": float32 [N, d], "metadata": [row dicts]}."""
  manifest = json.loads((pathlib.Path(output_dir) / "manifest.json").read_text())
  out = {m: [] for m in manifest["modalities"]}
  out["metadata"] = []
  for entry in manifest["partitions"]:
    for modality in manifest["modalities"]:
      out[modality].append(np.load(pathlib.Path(output_dir) / entry["files"][modality]))
    table = pq.read_table(pathlib.Path(output_dir) / entry["files"]["metadata"])
    out["metadata"] += table.to_pylist()
  for modality in manifest["modalities"]:
    out[modality] = np.concatenate(out[modality]).astype(np.float32)
  return out


def normalized_features(checkpoint, paths, captions):
  clip = clip_jax.load(checkpoint)
  image = clip.encode_image(paths)
  text = clip.encode_text(captions)
  return (image / np.linalg.norm(image, axis=1, keepdims=True),
          text / np.linalg.norm(text, axis=1, keepdims=True))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def embedded(checkpoint, tmp_path_factory):
  """21 samples (one undecodable, one without caption, two with img2dataset json), embedded
  in float32 into partitions of 8 with a global batch of 8 (8 devices)."""
  root = make_files_dataset(tmp_path_factory.mktemp("files"), 21, broken={5}, uncaptioned={12},
                            with_json={0, 9})
  out = tmp_path_factory.mktemp("embedded") / "out"
  manifest = embed_lib.embed(checkpoint, f"files:{root}", str(out), batch_size=8,
                             partition_size=8, dtype="float32", progress_bar=False)
  return root, out, manifest


def test_embeddings_align_with_metadata_and_match_clip_jax_load(embedded, checkpoint):
  root, out, manifest = embedded
  assert [(e["index"], e["start"], e["stop"], e["rows"]) for e in manifest["partitions"]] == [
      (0, 0, 8, 7), (1, 8, 16, 7), (2, 16, 21, 5)]
  assert manifest["rows"] == 19 and manifest["skipped_samples"] == 2 and manifest["complete"]
  skipped = {s["key"]: s["reason"] for e in manifest["partitions"] for s in e["skipped"]}
  assert skipped.keys() == {"00000/000005.jpg", "00000/000012.jpg"}
  assert skipped["00000/000005.jpg"].startswith("undecodable image")
  assert skipped["00000/000012.jpg"] == "missing or empty caption"
  assert (out / "img_emb/img_emb_00002.npy").is_file() and (
      out / "text_emb/text_emb_00002.npy").is_file() and (
      out / "metadata/metadata_00002.parquet").is_file()

  got = read_output(out)
  kept = [i for i in range(21) if i not in (5, 12)]
  assert got["image"].shape == got["text"].shape == (19, 64)
  np.testing.assert_allclose(np.linalg.norm(got["image"], axis=1), 1.0, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(got["text"], axis=1), 1.0, atol=1e-5)
  rows = got["metadata"]
  assert [r["key"] for r in rows] == [f"00000/{i:06d}.jpg" for i in kept]
  assert [r["caption"] for r in rows] == [shape_image(i)[1] for i in kept]
  assert rows[0]["url"] == "https://example.com/0.jpg" and rows[0]["width"] == 48
  assert rows[1]["url"] is None
  # Independent reference: clip_jax.load's features of the same files and captions.
  image, text = normalized_features(checkpoint, [r["image_path"] for r in rows],
                                    [r["caption"] for r in rows])
  np.testing.assert_allclose(got["image"], image, atol=2e-5)
  np.testing.assert_allclose(got["text"], text, atol=2e-5)
  np.testing.assert_allclose([r["clip_score"] for r in rows], np.sum(image * text, axis=1),
                             atol=2e-5)


def test_float16_and_image_only_from_wds_with_json_metadata(checkpoint, tmp_path, capsys):
  """A wds shard without captions: text asked is one error line; images only works, with
  the json's url, and stores float16 rows of norm 1; the progress bar counts samples/s."""
  samples = [(f"{i:04d}", shape_image(i)[0], None, {"url": f"https://example.com/{i}.jpg"})
             for i in range(6)]
  wds.write_shard(str(tmp_path / "shard-0.tar"), samples)
  dataset = f"wds:{tmp_path}/shard-*.tar"
  with pytest.raises(ValueError, match=r"none of the first 8 samples has a caption.*"
                                       r"--modalities image"):
    embed_lib.embed(checkpoint, dataset, str(tmp_path / "text"), batch_size=8,
                    progress_bar=False)
  assert not (tmp_path / "text" / "manifest.json").exists()
  capsys.readouterr()
  manifest = embed_lib.embed(checkpoint, dataset, str(tmp_path / "out"), modalities="image",
                             batch_size=8, partition_size=4)
  assert manifest["rows"] == 6 and manifest["skipped_samples"] == 0
  assert re.search(r"embed: 6 samples \[[^]]*, +[0-9.]+ samples/s\]", capsys.readouterr().err)
  assert not (tmp_path / "out" / "text_emb").exists()
  image = np.load(tmp_path / "out/img_emb/img_emb_00001.npy")
  assert image.dtype == np.float16 and image.shape == (2, 64)
  np.testing.assert_allclose(np.linalg.norm(image.astype(np.float32), axis=1), 1.0, atol=2e-3)
  table = pq.read_table(tmp_path / "out/metadata/metadata_00001.parquet")
  assert table.column_names[:3] == ["key", "url", "caption"]
  assert table.column("key").to_pylist() == ["0004", "0005"]
  assert table.column("url").to_pylist()[0] == "https://example.com/4.jpg"
  assert "clip_score" not in table.column_names


def test_csv_and_imagefolder_sources_keep_their_columns(checkpoint, tmp_path):
  images = tmp_path / "images"
  for i, name in enumerate(("cat", "cat", "dog")):
    (images / name).mkdir(parents=True, exist_ok=True)
    Image.fromarray(shape_image(i)[0]).save(images / name / f"{i}.png")
  tsv = tmp_path / "train.tsv"  # relative paths resolve against the TSV's folder
  tsv.write_text("filepath\ttitle\tsource_id\nimages/cat/0.png\ta cat\t17\n"
                 "images/cat/1.png\ta second cat\t18\nimages/dog/2.png\ta dog\tx\n")
  embed_lib.embed(checkpoint, f"csv:{tsv}", str(tmp_path / "csv"), batch_size=8,
                  progress_bar=False)
  rows = read_output(tmp_path / "csv")["metadata"]
  assert [r["image_path"] for r in rows] == [str(images / p) for p in
                                             ("cat/0.png", "cat/1.png", "dog/2.png")]
  assert [r["source_id"] for r in rows] == ["17", "18", "x"]
  assert [r["key"] for r in rows] == [f"{tsv}:{line}" for line in (2, 3, 4)]
  embed_lib.embed(checkpoint, f"imagefolder:{images}", str(tmp_path / "folder"), batch_size=8,
                  progress_bar=False)
  got = read_output(tmp_path / "folder")
  assert [(r["key"], r["class"], r["label"], r["caption"]) for r in got["metadata"]] == [
      ("cat/0.png", "cat", 0, "a photo of a cat."), ("cat/1.png", "cat", 0, "a photo of a cat."),
      ("dog/2.png", "dog", 1, "a photo of a dog.")]
  csv_image = read_output(tmp_path / "csv")["image"]
  np.testing.assert_array_equal(got["image"], csv_image)  # the same files, the same rows


@pytest.mark.parametrize("argv, expected", [
    (["--dataset", "parquet:x"], "--dataset 'parquet:x': expected KIND:LOCATION"),
    (["--dataset", "files:{missing}"], "--dataset 'files:"),
    (["--modalities", "image,audio"], "--modalities image,audio: expected image, text"),
    (["--batch_size", "0"], "--batch_size 0: must be >= 1"),
    (["--partition_size", "4"], "holds a run with partition_size=8, not 4"),
])
def test_user_errors_are_one_line(embedded, checkpoint, tmp_path, capsys, argv, expected):
  root, out, _ = embedded
  flags = {"--checkpoint": checkpoint, "--dataset": f"files:{root}", "--output_dir": str(out),
           "--partition_size": "8", "--batch_size": "8"}
  flags.update(dict(zip(argv[::2], argv[1::2])))
  flags["--dataset"] = flags["--dataset"].replace("{missing}", str(tmp_path / "missing"))
  assert embed_lib.main([x for kv in flags.items() for x in kv]) == 1
  err = capsys.readouterr().err.strip()
  assert err.startswith("error: ") and len(err.splitlines()) == 1 and expected in err, err


def _embed_command(checkpoint, root, out):
  return [sys.executable, "-m", "clip_jax.embed", "--checkpoint", checkpoint,
          "--dataset", f"files:{root}", "--output_dir", str(out), "--batch_size", "8",
          "--partition_size", "4", "--no-progress_bar"]


def _tree(directory) -> dict[str, bytes]:
  return {str(p.relative_to(directory)): p.read_bytes()
          for p in sorted(pathlib.Path(directory).rglob("*")) if p.is_file()}


def test_killed_run_resumes_byte_identical_without_recomputing(checkpoint, tmp_path):
  root = make_files_dataset(tmp_path / "files", 64, broken={9})
  reference = tmp_path / "reference"
  embed_lib.embed(checkpoint, f"files:{root}", str(reference), batch_size=8, partition_size=4,
                  progress_bar=False)
  out = tmp_path / "out"
  env = dict(os.environ, PYTHONPATH=str(REPO))
  proc = subprocess.Popen(_embed_command(checkpoint, root, out), cwd=REPO, env=env,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  manifest_path, committed = out / "manifest.json", []
  deadline = time.time() + 120
  while time.time() < deadline and proc.poll() is None:
    if manifest_path.exists():
      proc.send_signal(signal.SIGKILL)  # mid-run, right after a partition's commit
      break
    time.sleep(0.002)
  proc.communicate(timeout=60)
  assert proc.returncode == -signal.SIGKILL
  manifest = json.loads(manifest_path.read_text())
  committed = [e["index"] for e in manifest["partitions"]]
  assert not manifest["complete"] and 1 <= len(committed) < 16, committed

  rerun = subprocess.run(_embed_command(checkpoint, root, out), cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=240)
  assert rerun.returncode == 0, rerun.stderr
  summary = json.loads(rerun.stdout.strip().splitlines()[-1])
  assert summary["reused"] == committed
  assert summary["embedded"] == [k for k in range(16) if k not in committed]
  assert summary["forward_passes"] == 16 - len(committed)  # one batch per partition of 4
  embedded_lines = re.findall(r"partition (\d{5}): \d+ samples", rerun.stderr)
  assert [int(k) for k in embedded_lines] == summary["embedded"]
  assert _tree(out) == _tree(reference)  # manifest included


def test_filter_keeps_what_numpy_keeps(embedded, tmp_path, capsys):
  _, out, _ = embedded
  rows = read_output(out)["metadata"]
  scores = np.asarray([r["clip_score"] for r in rows], np.float32)
  threshold = float(np.median(scores))
  tsv = tmp_path / "kept.tsv"
  assert embed_lib.main(["filter", "--embeddings", str(out), "--min_score", str(threshold),
                         "--output", str(tsv)]) == 0
  result = json.loads(capsys.readouterr().out)
  with open(tsv, newline="") as f:
    kept = list(csv.DictReader(f, delimiter="\t"))
  expected = [r for r, s in zip(rows, scores) if s >= threshold]
  assert result["kept"] == len(kept) == len(expected) == 10 and result["total"] == 19
  assert [k["key"] for k in kept] == [r["key"] for r in expected]
  assert [k["filepath"] for k in kept] == [r["image_path"] for r in expected]
  assert [k["title"] for k in kept] == [r["caption"] for r in expected]
  png = pathlib.Path(result["histogram"])
  assert png == tmp_path / "kept_scores.png" and png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  # The trainer's input reads the TSV as csv data, with its defaults: one epoch is exactly
  # the kept images and captions, none skipped (the slow test below trains on it).
  from clip_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  from clip_jax.tokenizer import tokenize  # pylint: disable=import-outside-toplevel
  sys.path.insert(0, str(REPO))
  from configs import common  # pylint: disable=import-outside-toplevel
  config = common.get_config()
  config.batch_size, config.data.source, config.data.path = 10, "csv", str(tsv)
  config.data.image_dtype, config.data.num_threads = "uint8", 2
  pipeline.validate_data_config(config)
  it = pipeline.make_train_iterator(config, None, image_size=8, process_index=0, process_count=1)
  batch = next(it)
  assert it.skipped_samples == 0
  it.close()
  got = sorted(map(tuple, batch["tokens"].tolist()))
  assert got == sorted(map(tuple, tokenize([r["caption"] for r in expected]).tolist()))

  top = embed_lib.filter_embeddings(str(out), str(tmp_path / "top.tsv"), top_fraction=0.3)
  order = np.argsort(-scores, kind="stable")[:round(0.3 * 19)]
  with open(tmp_path / "top.tsv", newline="") as f:
    assert [k["key"] for k in csv.DictReader(f, delimiter="\t")] == [
        rows[i]["key"] for i in sorted(order)]
  assert top["threshold"] == pytest.approx(float(scores[order[-1]]), abs=1e-6)


@pytest.mark.slow  # the trainer's compile: ~50 s on 2 cores
def test_the_trainer_trains_on_the_filtered_tsv(embedded, tmp_path):
  _, out, _ = embedded
  tsv = tmp_path / "kept.tsv"
  result = embed_lib.filter_embeddings(str(out), str(tsv), top_fraction=0.5)
  assert result["kept"] == 10
  from clip_jax import metrics as metrics_lib
  from clip_jax import train as train_lib
  sys.path.insert(0, str(REPO))
  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  config.unlock()
  config.total_steps, config.batch_size, config.eval_every = 2, 8, -1
  config.data.source, config.data.path = "csv", str(tsv)
  workdir = tmp_path / "train"
  train_lib.train(config, str(workdir))
  records = [r for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl") if "loss" in r]
  assert [r["step"] for r in records] == [1, 2]
  assert all(np.isfinite(r["loss"]) for r in records)
  assert records[-1]["data/skipped_samples"] == 0  # every kept path was read


def test_gs_dataset_output_and_filter(gcs, checkpoint, tmp_path):  # noqa: F811
  """Data, output and the filter's TSV on gs:// (a local GCS server): the embeddings of a
  local run of the same images, byte for byte; a rerun there reuses every partition."""
  import fsspec  # pylint: disable=import-outside-toplevel
  root = make_files_dataset(tmp_path / "files", 6)
  fsspec.filesystem("gs").put(root, f"{BUCKET}/embed_files", recursive=True)
  remote = f"gs://{BUCKET}/embed_out"
  args = dict(batch_size=8, partition_size=4, progress_bar=False)
  manifest = embed_lib.embed(checkpoint, f"files:gs://{BUCKET}/embed_files", remote, **args)
  assert manifest["rows"] == 6 and len(manifest["partitions"]) == 2
  embed_lib.embed(checkpoint, f"files:{root}", str(tmp_path / "local"), **args)
  fs = fsspec.filesystem("gs")
  for name in ("img_emb/img_emb_00001.npy", "text_emb/text_emb_00000.npy"):
    assert fs.cat(f"{BUCKET}/embed_out/{name}") == (tmp_path / "local" / name).read_bytes()
  rows = pq.read_table(io.BytesIO(fs.cat(f"{BUCKET}/embed_out/metadata/metadata_00000.parquet")))
  assert rows.column("image_path").to_pylist()[0] == (
      f"gs://{BUCKET}/embed_files/00000/000000.jpg")
  again = embed_lib.embed(checkpoint, f"files:gs://{BUCKET}/embed_files", remote, **args)
  assert again["reused"] == [0, 1] and again["embedded"] == [] and again["forward_passes"] == 0
  result = embed_lib.filter_embeddings(remote, f"gs://{BUCKET}/kept.tsv", top_fraction=0.5)
  kept = fs.cat(f"{BUCKET}/kept.tsv").decode().splitlines()
  assert result["kept"] == 3 and len(kept) == 4 and kept[0].startswith("filepath\ttitle")
  assert fs.cat(f"{BUCKET}/kept_scores.png")[:4] == b"\x89PNG"
