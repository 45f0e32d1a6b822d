"""open_clip's CSV/TSV source: relative paths, sharding, exact resume, bad rows, clear errors."""
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from clip_jax.data import csv_source
from clip_jax.data import pipeline

from data_testing import check_resume_is_exact, check_resume_onto_another_process_count
from data_testing import skips_before_good
from data_testing import pixel_ids as _ids


def _config(path, **data):
  c = ml_collections.ConfigDict({
      "seed": 3, "batch_size": 4,
      "data": {"source": "csv", "path": path, "name": "", "split": "train", "data_dir": None,
               "num_workers": 0, "min_scale": 0.5, "max_scale": 1.0, "image_dtype": "uint8",
               "num_threads": 2, "csv_image_key": "filepath", "csv_caption_key": "title",
               "csv_separator": "\t"}})
  c.data.update(data)
  return c


def _write_csv(directory, num_rows=10, separator="\t", extra_rows=()):
  """num_rows rows of flat PNGs (value 20*i identifies row i) in images/, paths relative."""
  os.makedirs(os.path.join(directory, "images"), exist_ok=True)
  lines = [separator.join(["id", "filepath", "title"])]
  for i in range(num_rows):
    Image.fromarray(np.full((24, 32, 3), 20 * i, np.uint8)).save(
        os.path.join(directory, "images", f"{i}.png"))
    lines.append(separator.join([str(i), f"images/{i}.png", f"a photo number {i}"]))
  lines += list(extra_rows)
  path = os.path.join(directory, "train.tsv")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path





def test_rows_are_read_with_relative_paths_and_one_caption_each(tmp_path):
  from clip_jax.tokenizer import tokenize
  path = _write_csv(str(tmp_path), 5)
  config = _config(path)
  batch = next(pipeline.make_eval_iterator(config, image_size=8, batch_size=6))
  assert batch["images"].dtype == np.uint8 and batch["images"].shape == (6, 8, 8, 3)
  assert batch["mask"].tolist() == [True] * 5 + [False]
  assert _ids(batch["images"][:5]) == [0, 1, 2, 3, 4]  # evaluation: file order
  np.testing.assert_array_equal(batch["tokens"][:5],
                                tokenize([f"a photo number {i}" for i in range(5)]))
  assert batch["labels"][:5].tolist() == [-1] * 5
  captions = next(pipeline.make_eval_iterator(config, image_size=8, batch_size=6,
                                              all_captions=True))["captions"]
  assert captions.tolist() == [(f"a photo number {i}",) for i in range(5)] + [()]
  # A comma-separated file with other column names, through the config fields.
  lines = ["path,caption", f"{tmp_path}/images/3.png,\"three, quoted\""]
  (tmp_path / "other.csv").write_text("\n".join(lines) + "\n")
  other = _config(str(tmp_path / "other.csv"), csv_separator=",", csv_image_key="path",
                  csv_caption_key="caption", image_dtype="float32")
  batch = next(pipeline.make_eval_iterator(other, image_size=8, batch_size=1))
  np.testing.assert_allclose(batch["images"][0, 0, 0, 0],
                             (60 / 255 - pipeline.OPENAI_MEAN[0]) / pipeline.OPENAI_STD[0],
                             atol=1e-6)
  np.testing.assert_array_equal(batch["tokens"], tokenize(["three, quoted"]))


def test_resume_is_exact(tmp_path):
  batches = check_resume_is_exact(_config(_write_csv(str(tmp_path), 10)))
  # Every epoch is a new order of all 10 rows (4 a batch: the stream crosses epochs).
  order = sum((_ids(b["images"]) for b in batches), [])
  assert sorted(order[:10]) == list(range(10)) and sorted(order[10:20]) == list(range(10))
  assert order[:10] != order[10:20]


@pytest.mark.parametrize("before,after", [(2, 1), (1, 4)])
def test_resume_on_another_process_count_sees_the_same_global_batches(tmp_path, before, after):
  config = _config(_write_csv(str(tmp_path), 10))
  config.batch_size = 4
  check_resume_onto_another_process_count(config, before, after)


def test_processes_read_disjoint_records(tmp_path):
  config = _config(_write_csv(str(tmp_path), 10))
  config.batch_size = 4
  ids = [[], []]
  for p in range(2):
    it = pipeline.make_train_iterator(config, None, image_size=8, process_index=p,
                                      process_count=2)
    for _ in range(5):  # 5 global batches of 4: two epochs of 10 rows
      ids[p] += _ids(next(it)["images"])
    it.close()
  for epoch in range(2):
    # Global positions 10e..10e+9: process 0 holds rows 0-1, 4-5, 8-9 of each 4, process 1 the rest.
    parts = [set(), set()]
    for step in range(5):
      for p in range(2):
        for row, record in enumerate(ids[p][2 * step:2 * step + 2]):
          if (4 * step + 2 * p + row) // 10 == epoch:
            parts[p].add(record)
    assert not parts[0] & parts[1] and parts[0] | parts[1] == set(range(10))
  # Evaluation splits the rows into contiguous parts.
  seen = [set(_ids(b["images"][b["mask"]])) for p in range(2) for b in pipeline.make_eval_iterator(
      config, image_size=8, batch_size=8, process_index=p, process_count=2)]
  assert seen == [{0, 1, 2, 3, 4}, {5, 6, 7, 8, 9}]


def test_bad_rows_are_skipped_and_counted(tmp_path):
  (tmp_path / "images").mkdir()
  (tmp_path / "images" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not a jpeg at all")
  bad = ["90\timages/missing.png\ta missing image", "91\timages/broken.jpg\tundecodable",
         "92\timages/1.png\t   ", "93\timages/2.png", "94\t\tno path"]
  config = _config(_write_csv(str(tmp_path), 4, extra_rows=bad))
  assert len(csv_source.CsvSource(config.data.path)) == 9
  config.batch_size = 4
  it = pipeline.make_train_iterator(config, None, image_size=8)
  batches = [next(it) for _ in range(2)]  # 2 epochs: 4 good rows each, 5 skipped each
  it.close()
  assert [sorted(_ids(b["images"])) for b in batches] == [[0, 1, 2, 3]] * 2
  # The skips are those read before the 8th good row (rows 4-8 are the bad ones).
  assert it.skipped_samples == skips_before_good(config, 9, 4, 8) >= 5
  # Evaluation drops them too.
  rows = [_ids(b["images"][b["mask"]]) for b in pipeline.make_eval_iterator(
      config, image_size=8, batch_size=4)]
  assert sum(rows, []) == [0, 1, 2, 3]


def test_config_errors_are_one_line(tmp_path):
  path = _write_csv(str(tmp_path), 2)
  cases = [
      (_config(""), "config.data.path is empty"),
      (_config(str(tmp_path / "nothing*.tsv")), "matches no CSV/TSV files"),
      (_config(str(tmp_path / "absent.tsv")), "cannot read .*absent.tsv"),
      (_config(path, csv_caption_key="caption"),
       r"config.data.csv_caption_key='caption' is not a column of .* \(columns: \['id', "
       r"'filepath', 'title'\]"),
      (_config(path, csv_separator=","), "csv_image_key='filepath' is not a column"),
  ]
  (tmp_path / "empty.tsv").write_text("")
  (tmp_path / "header.tsv").write_text("filepath\ttitle\n")
  cases += [(_config(str(tmp_path / "empty.tsv")), "empty.tsv' is empty"),
            (_config(str(tmp_path / "header.tsv")), "have a header but no rows")]
  for config, message in cases:
    with pytest.raises(ValueError, match=message) as error:
      pipeline.validate_data_config(config)
    assert "\n" not in str(error.value)
  # Several files by brace pattern, rows in file order.
  os.rename(path, tmp_path / "0.tsv")
  (tmp_path / "1.tsv").write_text("filepath\ttitle\nimages/1.png\tfrom the second file\n")
  source = csv_source.CsvSource(str(tmp_path / "{0..1}.tsv"))
  assert [source.record(i)["caption"] for i in range(3)] == [
      "a photo number 0", "a photo number 1", "from the second file"]


def test_fsspec_urls_and_relative_paths_in_them(tmp_path):
  import fsspec
  _write_csv(str(tmp_path), 3)
  for name in ["train.tsv"] + [f"images/{i}.png" for i in range(3)]:
    with fsspec.open(f"memory://csv_test/{name}", "wb") as f:
      f.write(open(os.path.join(tmp_path, name), "rb").read())
  source = csv_source.CsvSource("memory://csv_test/train.tsv")
  assert source.record(2)["image"] == "memory://csv_test/images/2.png"
  batch = next(pipeline.make_eval_iterator(_config("memory://csv_test/train.tsv"), image_size=8,
                                           batch_size=3))
  assert _ids(batch["images"]) == [0, 1, 2]
