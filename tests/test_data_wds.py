"""Webdataset shards: patterns, per-process split, corrupt input skipped and counted."""
import io
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from clip_jax.data import pipeline
from clip_jax.data import wds


def _config(path, **data):
  c = ml_collections.ConfigDict({
      "seed": 0, "batch_size": 4,
      "data": {"source": "wds", "path": path, "name": "", "split": "train", "data_dir": None,
               "num_workers": 0, "shuffle_buffer": 1, "resample_shards": False,
               "min_scale": 0.9, "max_scale": 1.0, "image_dtype": "float32", "cycle_length": 1}})
  c.data.update(data)
  return c


def _image(value, size=40):
  return np.full((size, size, 3), value, np.uint8)


def _write_shards(directory, num_shards, per_shard):
  for s in range(num_shards):
    samples = [(f"{s:02d}{i:03d}", _image(10 * i + s), f"caption {s} {i}", {"i": i})
               for i in range(per_shard)]
    wds.write_shard(os.path.join(directory, f"{s:05d}.tar"), samples)
  return os.path.join(directory, "{00000..%05d}.tar" % (num_shards - 1))


def test_expand_braces():
  assert wds.expand_braces("a/{000..002}.tar") == ["a/000.tar", "a/001.tar", "a/002.tar"]
  assert wds.expand_braces("{a,b}/{8..10}.tar") == ["a/8.tar", "a/9.tar", "a/10.tar",
                                                     "b/8.tar", "b/9.tar", "b/10.tar"]
  assert wds.expand_braces("plain.tar") == ["plain.tar"]


def test_missing_shard_is_one_clear_error(tmp_path):
  _write_shards(tmp_path, 2, 1)
  with pytest.raises(ValueError, match=r"shard .*00002.tar.* does not exist"):
    pipeline.validate_data_config(_config(str(tmp_path / "{00000..00002}.tar")))
  with pytest.raises(ValueError, match="matches no shard files"):
    pipeline.validate_data_config(_config(str(tmp_path / "nothing*.tar")))
  with pytest.raises(ValueError, match="config.data.path is empty"):
    pipeline.validate_data_config(_config(""))


def test_batches_decode_normalise_and_tokenize(tmp_path):
  from clip_jax.tokenizer import tokenize
  path = _write_shards(tmp_path, 1, 4)
  config = _config(path)
  batch = next(pipeline.make_eval_iterator(config, image_size=16, batch_size=4))
  assert batch["images"].shape == (4, 16, 16, 3) and batch["images"].dtype == np.float32
  assert batch["tokens"].shape == (4, 77) and batch["tokens"].dtype == np.int32
  # Flat images: the normalised value is (v/255 - mean)/std up to JPEG rounding.
  mean, std = np.array(pipeline.OPENAI_MEAN), np.array(pipeline.OPENAI_STD)
  for i in range(4):
    expected = (10 * i / 255 - mean) / std
    np.testing.assert_allclose(batch["images"][i].mean(axis=(0, 1)), expected, atol=0.05)
  np.testing.assert_array_equal(batch["tokens"], tokenize([f"caption 0 {i}" for i in range(4)]))


def test_processes_read_disjoint_shards_covering_the_epoch(tmp_path):
  path = _write_shards(tmp_path, 4, 3)
  seen = []
  for p in range(2):
    schedule = wds.ShardSchedule(wds.list_shards(path), seed=0, process_index=p, process_count=2,
                                 resample=False)
    keys = [s["key"] for position in range(2) for s in schedule[position]]
    assert len(keys) == len(set(keys)) == 6
    seen.append(set(keys))
  assert not seen[0] & seen[1]
  assert seen[0] | seen[1] == {f"{s:02d}{i:03d}" for s in range(4) for i in range(3)}
  # A new epoch visits the same shards in another order (for some epoch).
  schedule = wds.ShardSchedule(wds.list_shards(path), seed=0, process_index=0, process_count=1,
                               resample=False)
  orders = {tuple(schedule[e * 4 + i]._shard for i in range(4)) for e in range(6)}
  assert len(orders) > 1 and all(len(set(o)) == 4 for o in orders)
  with pytest.raises(ValueError, match="4 shards but there are 5 processes"):
    wds.ShardSchedule(wds.list_shards(path), seed=0, process_index=0, process_count=5,
                      resample=False)


def test_resampled_shards_draw_with_replacement(tmp_path):
  path = _write_shards(tmp_path, 4, 1)
  schedule = wds.ShardSchedule(wds.list_shards(path), seed=3, process_index=1, process_count=2,
                               resample=True)
  draws = [schedule[i]._shard for i in range(40)]
  assert len(set(draws)) == 4  # all shards reachable from one process
  assert draws == [schedule[i]._shard for i in range(40)]  # deterministic
  assert any(a == b for a, b in zip(draws, draws[1:]))  # with replacement


def _corrupt_shard(path):
  """6 good samples, a corrupt JPEG, an empty caption, then the archive cut mid-image."""
  good = [(f"g{i}", _image(20 * i), f"good {i}", None) for i in range(3)]
  jpeg = io.BytesIO()
  Image.fromarray(_image(99)).save(jpeg, format="JPEG")
  samples = good + [("corrupt", jpeg.getvalue()[:60] + b"\x00garbage" * 10, "bad image", None),
                    ("nocaption", _image(50), "   ", None)]
  samples += [(f"h{i}", _image(30 * i), f"more {i}", None) for i in range(3)]
  samples += [("cut", np.random.default_rng(0).integers(0, 255, (64, 64, 3), np.uint8),
               "truncated", None)]
  wds.write_shard(path, samples)
  raw = open(path, "rb").read()
  # Cut inside the last image's data: its header is complete, its bytes are not.
  cut_at = raw.rindex(b"cut.jpg") + 512 + 700
  with open(path, "wb") as f:
    f.write(raw[:cut_at])


def test_corrupt_shard_trains_through_with_the_right_skip_count(tmp_path):
  path = str(tmp_path / "bad.tar")
  _corrupt_shard(path)
  assert [k for k, _ in wds.iter_tar_samples(path)] == [
      "g0", "g1", "g2", "corrupt", "nocaption", "h0", "h1", "h2", "cut"]
  config = _config(path, shuffle_buffer=1)  # file order, so the count is exact
  config.batch_size = 6
  it = pipeline.make_train_iterator(config, None, image_size=16, process_index=0,
                                    process_count=1)
  try:
    batches = [next(it) for _ in range(3)]  # 6 good samples per epoch: three epochs
  finally:
    it.close()
  assert all(b["images"].shape == (6, 16, 16, 3) for b in batches)
  assert np.isfinite(np.stack([b["images"] for b in batches])).all()
  # Each epoch skips corrupt, nocaption and cut; the third epoch's `cut` (after its last
  # good sample) has not been reached yet: 3 + 3 + 2.
  assert it.skipped_samples == 8


def test_fsspec_urls_are_read(tmp_path):
  path = _write_shards(tmp_path, 2, 2)
  shards = [f"file://{s}" for s in wds.list_shards(path)]
  memory = ["memory://wds_test/00000.tar", "memory://wds_test/00001.tar"]
  import fsspec
  for src, dst in zip(shards, memory):
    with fsspec.open(dst, "wb") as f:
      f.write(open(src.removeprefix("file://"), "rb").read())
  assert wds.validate_shards("memory://wds_test/{00000..00001}.tar") == memory
  globbed = wds.list_shards("memory://wds_test/*.tar")
  assert [s.rsplit("/", 1)[1] for s in globbed] == ["00000.tar", "00001.tar"]
  assert [k for k, _ in wds.iter_tar_samples(memory[1])] == ["01000", "01001"]
  assert [k for k, _ in wds.iter_tar_samples(globbed[1])] == ["01000", "01001"]
  with pytest.raises(ValueError, match="no fsspec filesystem"):
    wds.validate_shards("nosuchproto://bucket/x.tar")


def test_several_captions_from_txt_lines_and_json_lists(tmp_path):
  path = str(tmp_path / "multi.tar")
  wds.write_shard(path, [
      ("lines", _image(10), "a red thing\n\n  a crimson object \n", {"caption": "a red thing"}),
      ("listed", _image(20), None, {"captions": ["one", " ", "two", "three"]}),
      ("both", _image(30), "from txt", {"captions": ["from json"]}),
      ("single", _image(40), None, {"caption": "only this"}),
  ])
  samples = dict(wds.iter_tar_samples(path))
  # An img2dataset json repeating the txt caption adds nothing.
  assert samples["lines"]["captions"] == ["a red thing", "a crimson object"]
  assert samples["listed"]["captions"] == ["one", "two", "three"]
  assert samples["listed"]["error"] is None
  assert samples["both"]["captions"] == ["from txt", "from json"]
  assert samples["single"]["captions"] == ["only this"]
  batch = next(pipeline.make_eval_iterator(_config(path), image_size=16, batch_size=6,
                                           all_captions=True))
  assert batch["mask"].tolist() == [True] * 4 + [False] * 2
  assert batch["captions"].tolist() == [("a red thing", "a crimson object"),
                                        ("one", "two", "three"), ("from txt", "from json"),
                                        ("only this",), (), ()]
  # The one-caption stream keeps reading the whole txt, and skips the txt-less "listed".
  from clip_jax.tokenizer import tokenize
  single = next(pipeline.make_eval_iterator(_config(path), image_size=16, batch_size=4))
  assert single["mask"].tolist() == [True, True, True, False]
  np.testing.assert_array_equal(
      single["tokens"][:3], tokenize(["a red thing\n\n  a crimson object", "from txt", "only this"]))
