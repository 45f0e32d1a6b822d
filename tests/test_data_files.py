"""img2dataset's `files` layout: the cached index, sharding, exact resume, bad pairs, errors."""
import glob
import json
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from clip_jax.data import files_source
from clip_jax.data import pipeline

from data_testing import check_resume_is_exact, check_resume_onto_another_process_count
from data_testing import skips_before_good
from data_testing import global_batches as _global_batches
from data_testing import pixel_ids as _ids


def _config(path, **data):
  c = ml_collections.ConfigDict({
      "seed": 5, "batch_size": 4,
      "data": {"source": "files", "path": path, "name": "", "split": "train", "data_dir": None,
               "num_workers": 0, "min_scale": 0.5, "max_scale": 1.0, "image_dtype": "uint8",
               "num_threads": 2}})
  c.data.update(data)
  return c


def _write_tree(directory, num_images=10, per_folder=4):
  """img2dataset's layout: 00000/000000000.jpg + .txt + .json, flat PNG value 20*i (as .jpg
  would round; PNG keeps the value exact) identifying image i."""
  for i in range(num_images):
    folder = os.path.join(directory, f"{i // per_folder:05d}")
    os.makedirs(folder, exist_ok=True)
    stem = os.path.join(folder, f"{i:09d}")
    Image.fromarray(np.full((20, 28, 3), 20 * i, np.uint8)).save(stem + ".png")
    with open(stem + ".txt", "w") as f:
      f.write(f"picture {i}\nsecond line {i}\n")
    with open(stem + ".json", "w") as f:
      json.dump({"key": f"{i:09d}"}, f)
  return directory





def test_pairs_are_read_in_path_order_with_their_captions(tmp_path):
  from clip_jax.tokenizer import tokenize
  config = _config(_write_tree(str(tmp_path / "data"), 5))
  batch = next(pipeline.make_eval_iterator(config, image_size=8, batch_size=6))
  assert batch["images"].dtype == np.uint8 and batch["mask"].tolist() == [True] * 5 + [False]
  assert _ids(batch["images"][:5]) == [0, 1, 2, 3, 4]
  np.testing.assert_array_equal(batch["tokens"][:5], tokenize(
      [f"picture {i}\nsecond line {i}" for i in range(5)]))
  captions = next(pipeline.make_eval_iterator(config, image_size=8, batch_size=6,
                                              all_captions=True))["captions"]
  assert captions[:5].tolist() == [(f"picture {i}", f"second line {i}") for i in range(5)]


def test_the_index_is_cached_in_the_workdir(tmp_path):
  data = _write_tree(str(tmp_path / "data"), 6)
  workdir = str(tmp_path / "workdir")
  first = _global_batches(_config(data), 1, 2, cache_dir=workdir)
  cached = glob.glob(os.path.join(workdir, "files_index_*.json"))
  assert len(cached) == 1
  index = json.load(open(cached[0]))
  assert index["images"] == [f"{i // 4:05d}/{i:09d}.png" for i in range(6)]
  # A restart reads the cache: the tree is not walked again (a new file stays unseen).
  files_source._list.cache_clear()  # pylint: disable=protected-access
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "data/00001/new.png")
  (tmp_path / "data/00001/new.txt").write_text("new")
  assert len(files_source.FilesSource(data, workdir)) == 6
  assert len(files_source.FilesSource(data)) == 7  # no cache: listed afresh
  again = _global_batches(_config(data), 1, 2, cache_dir=workdir)
  for want, got in zip(first, again):
    np.testing.assert_array_equal(want["images"], got["images"])


def test_resume_is_exact(tmp_path):
  batches = check_resume_is_exact(_config(_write_tree(str(tmp_path), 10)))
  order = sum((_ids(b["images"]) for b in batches), [])
  assert sorted(order[:10]) == list(range(10)) and order[:10] != order[10:20]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 4)])
def test_resume_on_another_process_count_sees_the_same_global_batches(tmp_path, before, after):
  config = _config(_write_tree(str(tmp_path), 10))
  check_resume_onto_another_process_count(config, before, after)


def test_processes_read_disjoint_records(tmp_path):
  config = _config(_write_tree(str(tmp_path), 12))
  seen = []
  for p in range(4):
    it = pipeline.make_train_iterator(config, None, image_size=8, process_index=p,
                                      process_count=4)
    seen.append(_ids(next(it)["images"]) + _ids(next(it)["images"]))  # 2 steps x 1 row
    it.close()
  # 2 global batches of 4 from 12 records: 8 distinct records, 2 per process.
  flat = sum(seen, [])
  assert len(set(flat)) == 8 and all(len(set(s)) == 2 for s in seen)


def test_bad_pairs_are_skipped_and_counted(tmp_path):
  data = _write_tree(str(tmp_path), 4)
  folder = tmp_path / "00000"
  (folder / "000000100.jpg").write_bytes(b"\xff\xd8\xff\xe0 truncated")  # undecodable
  (folder / "000000101.txt").write_text("a caption, no image")  # not a record: no image
  Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(folder / "000000102.png")  # no .txt
  Image.fromarray(np.full((8, 8, 3), 9, np.uint8)).save(folder / "000000103.png")
  (folder / "000000103.txt").write_text("  \n")  # empty caption
  (folder / "000000104.webp").write_bytes(b"RIFF")  # listed by extension; never decoded
  (folder / "000000104.txt").write_text("deleted after listing")
  source = files_source.FilesSource(data)
  assert len(source) == 8
  os.remove(folder / "000000104.webp")  # listed, then gone: unreadable
  config = _config(data)
  it = pipeline.make_train_iterator(config, None, image_size=8)
  batches = [next(it) for _ in range(2)]
  it.close()
  assert [sorted(_ids(b["images"])) for b in batches] == [[0, 1, 2, 3]] * 2
  assert it.skipped_samples == skips_before_good(config, 8, 4, 8) >= 4


def test_config_errors_are_one_line(tmp_path):
  (tmp_path / "only_images").mkdir()
  Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(tmp_path / "only_images/a.png")
  (tmp_path / "a_file").write_text("x")
  cases = [
      (_config(""), "config.data.path is empty"),
      (_config(str(tmp_path / "nothing*")), "matches no folders"),
      (_config(str(tmp_path / "absent")), "absent' is not a folder"),
      (_config(str(tmp_path / "a_file")), "a_file' is not a folder"),
      (_config(str(tmp_path / "only_images")), "holds no image with a same-named .txt"),
  ]
  for config, message in cases:
    with pytest.raises(ValueError, match=message) as error:
      pipeline.validate_data_config(config)
    assert "\n" not in str(error.value)


def test_fsspec_urls(tmp_path):
  import fsspec
  _write_tree(str(tmp_path), 3)
  for local in sorted(glob.glob(str(tmp_path / "*/*"))):
    with fsspec.open("memory://files_test/" + os.path.relpath(local, tmp_path), "wb") as f:
      f.write(open(local, "rb").read())
  config = _config("memory://files_test")
  batch = next(pipeline.make_eval_iterator(config, image_size=8, batch_size=3))
  assert _ids(batch["images"]) == [0, 1, 2]
  assert files_source.FilesSource("memory://files_test").record(1)["image"] == (
      "memory://files_test/00000/000000001.png")
