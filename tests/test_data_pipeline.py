"""The grain pipeline: exact resume, per-process parts, global arrays on the mesh."""
import json

import jax
import ml_collections
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clip_jax.data import pipeline
from clip_jax.data import wds

from data_testing import check_resume_is_exact, global_batches as _global_batches


def _config(source="synthetic", **data):
  c = ml_collections.ConfigDict({
      "seed": 7, "batch_size": 8,
      "data": {"source": source, "path": "", "name": "", "split": "train", "data_dir": None,
               "num_workers": 0, "shuffle_buffer": 4, "resample_shards": False,
               "min_scale": 0.5, "max_scale": 1.0, "image_dtype": "float32", "cycle_length": 2,
               "num_threads": 2}})
  c.data.update(data)
  return c


def _shards(tmp_path, num_shards=4, per_shard=5):
  rng = np.random.default_rng(0)
  for s in range(num_shards):
    wds.write_shard(str(tmp_path / f"{s:05d}.tar"), [
        (f"{s}_{i}", rng.integers(0, 255, (24, 24, 3), np.uint8), f"sample {s} {i}", None)
        for i in range(per_shard)])
  return str(tmp_path / ("{00000..%05d}.tar" % (num_shards - 1)))


def _take(it, n):
  return [next(it) for _ in range(n)]


def _assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(np.asarray(x[k]), np.asarray(y[k]))


@pytest.mark.parametrize("source", ["synthetic", "wds"])
def test_resume_is_exact(tmp_path, source):
  # wds: crosses an epoch boundary (20 samples, 8 per batch).
  first = check_resume_is_exact(_config(source, path=_shards(tmp_path) if source == "wds" else ""))
  # The random crops really differ between samples (the resume check is not vacuous).
  assert not np.array_equal(first[0]["images"], first[1]["images"])


def test_resume_is_exact_with_worker_processes(tmp_path):
  config = _config("wds", path=_shards(tmp_path), num_workers=2)
  it = pipeline.make_train_iterator(config, None, image_size=16)
  _take(it, 2)
  state = json.loads(json.dumps(it.get_state()))
  expected = _take(it, 3)
  it.close()
  resumed = pipeline.make_train_iterator(config, None, image_size=16)
  resumed.set_state(state)
  _assert_same(expected, _take(resumed, 3))
  resumed.close()


def test_two_processes_read_disjoint_parts_covering_the_epoch(tmp_path):
  config = _config("wds", path=_shards(tmp_path, 4, 5), shuffle_buffer=1)
  config.batch_size = 10
  token_rows = []
  for p in range(2):
    dataset = pipeline.build_dataset(config, image_size=8, local_batch=5, train=False,
                                     process_index=p, process_count=2)
    rows = [tuple(r) for b in dataset for r in b["tokens"]]
    assert len(rows) == 10
    token_rows.append(set(rows))
  from clip_jax.tokenizer import tokenize
  everything = {tuple(r) for r in tokenize([f"sample {s} {i}" for s in range(4) for i in range(5)])}
  assert not token_rows[0] & token_rows[1]
  assert token_rows[0] | token_rows[1] == everything
  # Record-level sources split the same way.
  schedules = [pipeline.RecordSchedule(11, seed=1, process_index=p, process_count=2,
                                       shuffle=True) for p in range(2)]
  parts = [{schedules[p][i][1] for i in range(count)} for p, count in ((0, 5), (1, 6))]
  assert not parts[0] & parts[1] and parts[0] | parts[1] == set(range(11))
  epoch1 = [schedules[0][5 + i] for i in range(5)]
  assert {r for e, r in epoch1} == parts[0] and {e for e, _ in epoch1} == {1}


def _rows(batches):
  """The global batches' (image, tokens) rows as a sorted list: a set with multiplicity."""
  return sorted(b["images"][i].tobytes() + b["tokens"][i].tobytes()
                for b in batches for i in range(len(b["tokens"])))


@pytest.mark.parametrize("before,after", [(2, 1), (1, 4)])
def test_resume_on_another_process_count_continues_the_stream(before, after):
  # A checkpoint written by `before` processes, resumed by `after`: the per-process iterator
  # states do not apply, so the stream restarts at the step's position. Every later global
  # batch holds the samples an uninterrupted run would have read (rows in another order).
  config = _config("synthetic")
  uninterrupted = _global_batches(config, before, 5)
  resumed = _global_batches(config, after, 2, start_step=3)
  for want, got in zip(uninterrupted[3:], resumed):
    assert _rows([want]) == _rows([got])
  assert _rows(uninterrupted[3:4]) != _rows(uninterrupted[4:5])  # batches do differ
  # Record sources start each process that far into its part of the epoch.
  schedule = pipeline.RecordSchedule(11, seed=1, process_index=1, process_count=2, shuffle=True)
  later = pipeline.RecordSchedule(11, seed=1, process_index=1, process_count=2, shuffle=True,
                                  first_position=4)
  assert [later[i] for i in range(8)] == [schedule[4 + i] for i in range(8)]
  # A webdataset stream has no sample positions to start at.
  with pytest.raises(ValueError, match="cannot start at a sample position"):
    pipeline.build_dataset(_config("wds", path="x/{0..1}.tar"), image_size=16, local_batch=4,
                           train=True, first_position=8)


def test_per_process_batch_must_divide():
  config = _config()
  config.batch_size = 9
  with pytest.raises(ValueError, match="batch_size=9 is not divisible by the 2 processes"):
    pipeline.make_train_iterator(config, None, image_size=16, process_index=0, process_count=2)


def test_config_errors_are_one_line():
  with pytest.raises(ValueError, match="config.data.source='hdf5' is not one of"):
    pipeline.validate_data_config(_config("hdf5"))
  with pytest.raises(ValueError, match="min_scale"):
    pipeline.validate_data_config(_config(min_scale=0.0))


def test_global_arrays_are_sharded_over_the_mesh():
  devices = np.array(jax.devices()).reshape(4, 2)
  mesh = Mesh(devices, ("data", "fsdp"))
  sharding = NamedSharding(mesh, P(("data", "fsdp")))
  config = _config(image_dtype="bfloat16")
  it = pipeline.make_train_iterator(config, sharding, image_size=16)
  batch = next(it)
  it.close()
  assert batch["images"].shape == (8, 16, 16, 3) and batch["images"].dtype == jax.numpy.bfloat16
  assert batch["tokens"].shape == (8, 77) and batch["tokens"].dtype == np.int32
  for array in batch.values():
    assert array.sharding == sharding
    assert {s.data.shape[0] for s in array.addressable_shards} == {1}
  # The same stream as the host-side (numpy) iterator, normalised on the devices.
  local_it = pipeline.make_train_iterator(config, None, image_size=16)
  local = next(local_it)
  local_it.close()
  np.testing.assert_array_equal(np.asarray(batch["tokens"]), local["tokens"])
  np.testing.assert_array_equal(np.asarray(batch["images"]), local["images"])


def test_uint8_images_normalised_on_the_devices_equal_the_float32_stream():
  mesh = Mesh(np.array(jax.devices()), ("data",))
  sharding = NamedSharding(mesh, P("data"))
  streams = {}
  for dtype in ("uint8", "float32"):
    it = pipeline.make_train_iterator(_config(image_dtype=dtype), sharding, image_size=16)
    streams[dtype] = _take(it, 2)
    it.close()
  normalizer = pipeline.transforms.Normalizer(pipeline.OPENAI_MEAN, pipeline.OPENAI_STD)
  scale, offset = jax.numpy.asarray(normalizer.scale), jax.numpy.asarray(normalizer.offset)
  normalize = jax.jit(lambda x: x.astype(jax.numpy.float32) * scale + offset)
  for raw, want in zip(streams["uint8"], streams["float32"]):
    assert raw["images"].dtype == np.uint8 and raw["images"].sharding == sharding
    np.testing.assert_allclose(np.asarray(normalize(raw["images"])), np.asarray(want["images"]),
                               rtol=0, atol=1e-6)
    # The float32 reference is OpenAI's order: (x / 255 - mean) / std of the same uint8 crops.
    reference = (np.asarray(raw["images"]) / 255.0 - np.array(pipeline.OPENAI_MEAN)) / np.array(
        pipeline.OPENAI_STD)
    np.testing.assert_allclose(np.asarray(want["images"]), reference, rtol=0, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(raw["tokens"]), np.asarray(want["tokens"]))
  assert pipeline.transforms.Normalizer([0.5] * 3, [0.5] * 3, "uint8")(
      np.full((2, 2, 3), 7, np.uint8)).dtype == np.uint8


def _jpeg(size):
  """A smooth gradient with mild noise (resampling error stays small), as JPEG bytes."""
  import io
  from PIL import Image
  x = np.linspace(0, 255, size)
  image = np.stack(list(np.meshgrid(x, x[::-1])) + [np.full((size, size), 128.0)], -1)
  image += np.random.default_rng(0).normal(0, 4, image.shape)
  buf = io.BytesIO()
  Image.fromarray(image.clip(0, 255).astype(np.uint8)[:, : size * 3 // 4]).save(
      buf, format="JPEG", quality=92)
  return buf.getvalue()


@pytest.mark.parametrize("train", [True, False])
def test_jpeg_draft_decoding_keeps_the_crop_geometry(train):
  from PIL import Image
  from clip_jax.data import transforms
  data = _jpeg(512)  # 384 x 512
  for seed in range(4):
    rng = lambda: np.random.default_rng(seed)  # noqa: E731
    # The box is drawn in full-resolution coordinates whether or not the decode is reduced.
    box = transforms.crop_box(384, 512, train=train, rng=rng(), scale=(0.3, 1.0))
    pil, drafted_box = transforms._drafted(  # pylint: disable=protected-access
        Image.open(__import__("io").BytesIO(data)), box, 32)
    factor = 384 / pil.size[0]
    assert factor == transforms.draft_scale(box, 32) > 1
    np.testing.assert_allclose(np.array(drafted_box) * factor, box)
    drafted = transforms.crop_and_resize(data, 32, train=train, rng=rng(), scale=(0.3, 1.0))
    full = transforms.crop_and_resize(data, 32, train=train, rng=rng(), scale=(0.3, 1.0),
                                      draft=False)
    # The same region, resampled from fewer pixels: a small difference, no shift (a gradient
    # image shows a shifted or rescaled box as a larger error).
    assert np.abs(drafted.astype(int) - full).mean() < 0.8  # a 4px shift: ~1.4
  # No reduction when the box is not at least twice the target size.
  assert transforms.draft_scale((0, 0, 63, 200), 32) == 1
  assert transforms.draft_scale((0, 0, 64, 200), 32) == 2
  assert transforms.draft_scale((10, 10, 10 + 8 * 32, 10 + 9 * 32), 32) == 8


def test_single_caption_rows_equal_the_batch_tokenizer():
  from clip_jax.data import transforms
  from clip_jax.tokenizer import tokenize
  captions = ["a dog.", "Caf\u00e9 &amp; cr\u00e8me\n  br\u00fbl\u00e9e", "word " * 100, ""]
  for caption in captions:
    for length in (77, 8):
      np.testing.assert_array_equal(transforms.tokenize_caption(caption, length),
                                    tokenize([caption], context_length=length, truncate=True)[0])


def test_pillow_build_names_the_imported_pil(monkeypatch):
  import importlib.metadata
  import PIL
  from clip_jax.data import transforms
  transforms.pillow_build.cache_clear()
  real = importlib.metadata.version

  def version(name, simd=None):
    if name == "pillow-simd":
      if simd is None:
        raise importlib.metadata.PackageNotFoundError(name)
      return simd
    return real(name)

  try:
    monkeypatch.setattr(importlib.metadata, "version", version)
    assert transforms.pillow_build() == f"Pillow {PIL.__version__}"
    transforms.pillow_build.cache_clear()
    # pillow-simd's metadata left behind while Pillow's PIL was installed over it: still Pillow.
    monkeypatch.setattr(importlib.metadata, "version", lambda n: version(n, "9.0.0.post1"))
    assert transforms.pillow_build() == f"Pillow {PIL.__version__}"
    transforms.pillow_build.cache_clear()
    monkeypatch.setattr(importlib.metadata, "version", lambda n: version(n, PIL.__version__))
    assert transforms.pillow_build() == f"Pillow-SIMD {PIL.__version__}"
  finally:
    transforms.pillow_build.cache_clear()
