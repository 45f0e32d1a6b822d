"""TFDS through data sources: a tiny dataset built locally (array_record, no TensorFlow)."""
import io

import ml_collections
import numpy as np
from PIL import Image
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

from clip_jax.data import pipeline  # pylint: disable=g-import-not-at-top
from clip_jax.data import tfds_source  # pylint: disable=g-import-not-at-top

_NAMES = ["red_thing", "blue_thing", "green_thing"]


class ClipJaxTinyLabels(tfds.core.GeneratorBasedBuilder):
  """12 flat-colour images with class labels; encoded bytes keep TensorFlow out of it."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "label": tfds.features.ClassLabel(names=_NAMES)}))

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(12), "test": self._generate_examples(4)}

  def _generate_examples(self, n):
    for i in range(n):
      buf = io.BytesIO()
      Image.fromarray(np.full((20, 30, 3), 20 * i, np.uint8)).save(buf, format="PNG")
      yield i, {"image": buf.getvalue(), "label": i % 3}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("tfds"))
  ClipJaxTinyLabels(data_dir=directory, file_format="array_record").download_and_prepare()
  return directory


def _config(data_dir, **data):
  c = ml_collections.ConfigDict({
      "seed": 0, "batch_size": 4,
      "data": {"source": "tfds", "path": "", "name": "clip_jax_tiny_labels", "split": "train",
               "data_dir": data_dir, "num_workers": 0, "min_scale": 0.9, "max_scale": 1.0,
               "image_dtype": "float32", "num_threads": 2}})
  c.data.update(data)
  return c


def test_labels_become_captions_and_images_are_center_cropped(data_dir):
  from clip_jax.tokenizer import tokenize
  config = _config(data_dir)
  batches = list(pipeline.make_eval_iterator(config, image_size=8, batch_size=5,
                                             process_index=0, process_count=1))
  assert [b["mask"].sum() for b in batches] == [5, 5, 2]
  labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
  images = np.concatenate([b["images"][b["mask"]] for b in batches])
  assert images.shape == (12, 8, 8, 3)
  # TFDS stores examples in its own order; the flat value 20 * i tells which one each is.
  mean, std = np.array(pipeline.OPENAI_MEAN), np.array(pipeline.OPENAI_STD)
  ids = np.rint((images[:, 0, 0, 0] * std[0] + mean[0]) * 255 / 20).astype(int)
  assert sorted(ids) == list(range(12))
  np.testing.assert_allclose(images, np.broadcast_to(((20 * ids / 255.0)[:, None, None, None] - mean) / std, images.shape),
                             atol=1e-5)
  np.testing.assert_array_equal(labels, ids % 3)
  tokens = np.concatenate([b["tokens"][b["mask"]] for b in batches])
  for i, row in zip(ids, tokens):
    name = _NAMES[i % 3].replace("_", " ")
    assert any(np.array_equal(row, tokenize(t.format(name))[0])
               for t in tfds_source.LABEL_TEMPLATES)


def test_train_stream_covers_the_epoch_across_processes(data_dir):
  config = _config(data_dir)
  seen = []
  for p in range(2):
    it = pipeline.make_train_iterator(config, None, image_size=8, process_index=p,
                                      process_count=2)
    # Flat images identify their record: value 20 * i before normalisation.
    batches = [next(it) for _ in range(3)]  # 6 records per process per epoch
    it.close()
    values = np.concatenate([b["images"][:, 0, 0, 0] for b in batches])
    records = np.rint((values * pipeline.OPENAI_STD[0] + pipeline.OPENAI_MEAN[0]) * 255 / 20)
    seen.append(set(records.astype(int)))
  assert len(seen[0]) == len(seen[1]) == 6  # each process sees its 6 records once per epoch
  assert not seen[0] & seen[1] and seen[0] | seen[1] == set(range(12))


def test_unknown_dataset_or_split_is_one_clear_error(data_dir):
  with pytest.raises(ValueError, match="config.data.name='no_such_dataset_xyz' is not a known"):
    pipeline.validate_data_config(_config(data_dir, name="no_such_dataset_xyz"))
  with pytest.raises(ValueError, match="config.data.split='validation'"):
    pipeline.validate_data_config(_config(data_dir, split="validation"))
  with pytest.raises(ValueError, match="config.data.name is empty"):
    pipeline.validate_data_config(_config(data_dir, name=""))


class ClipJaxTinyCaptions(tfds.core.GeneratorBasedBuilder):
  """3 images with coco_captions' layout: captions/text, a Sequence of i + 1 captions."""
  VERSION = tfds.core.Version("1.0.0")

  def _info(self):
    return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
        "image": tfds.features.Image(shape=(None, None, 3)),
        "captions": tfds.features.Sequence({"text": tfds.features.Text()})}))

  def _split_generators(self, dl_manager):
    return {"test": self._generate_examples(3)}

  def _generate_examples(self, n):
    for i in range(n):
      buf = io.BytesIO()
      Image.fromarray(np.full((12, 12, 3), 40 * i, np.uint8)).save(buf, format="PNG")
      yield i, {"image": buf.getvalue(),
                "captions": {"text": [f"image {i} caption {j}" for j in range(i + 1)]}}


def test_all_captions_of_a_caption_sequence(tmp_path):
  ClipJaxTinyCaptions(data_dir=str(tmp_path), file_format="array_record").download_and_prepare()
  config = _config(str(tmp_path), name="clip_jax_tiny_captions", split="test")
  batch = next(pipeline.make_eval_iterator(config, image_size=8, batch_size=4, process_index=0,
                                           process_count=1, all_captions=True))
  assert batch["mask"].tolist() == [True, True, True, False]
  values = (batch["images"][:3, 0, 0, 0] * pipeline.OPENAI_STD[0] + pipeline.OPENAI_MEAN[0]) * 255
  for image_id, row in zip(np.rint(values / 40).astype(int), batch["captions"][:3]):
    assert row == tuple(f"image {image_id} caption {j}" for j in range(image_id + 1))
  assert batch["captions"][3] == ()


def test_a_tfds_source_in_a_mixture(data_dir):
  from data_testing import check_resume_onto_another_process_count  # pylint: disable=g-import-not-at-top
  config = _config(data_dir, source="mix", path="tfds:clip_jax_tiny_labels:train::synthetic",
                   mix_weights="3::1", image_dtype="uint8")
  config.batch_size = 8
  pipeline.validate_data_config(config)
  it = pipeline.make_train_iterator(config, None, image_size=8, process_index=0, process_count=1)
  images = np.concatenate([next(it)["images"] for _ in range(6)]).reshape(48, -1).astype(int)
  counters = it.counters()
  it.close()
  flat = images.min(axis=1) == images.max(axis=1)  # the tfds images; synthetic ones are shapes
  assert counters["data/tfds/samples"] == int(flat.sum()) > 24
  assert counters["data/synthetic/samples"] == 48 - int(flat.sum()) > 0
  check_resume_onto_another_process_count(config, 1, 2)
  bad = _config(data_dir, source="mix", path="tfds:no_such_dataset::synthetic")
  with pytest.raises(ValueError, match=r"^config.data.path entry 'tfds:no_such_dataset:train' "
                                       r"\(source 'tfds'\): "):
    pipeline.validate_data_config(bad)
