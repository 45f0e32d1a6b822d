"""The built-in synthetic set: deterministic, learnable structure, disjoint zero-shot set."""
import ml_collections
import numpy as np
import pytest

from clip_jax.data import pipeline
from clip_jax.data import synthetic


def test_samples_are_a_function_of_seed_and_index():
  a, b = synthetic.train_sample(3, 17, 32), synthetic.train_sample(3, 17, 32)
  np.testing.assert_array_equal(a["image"], b["image"])
  assert a["caption"] == b["caption"] and a["label"] == b["label"]
  c = synthetic.train_sample(4, 17, 32)
  assert not np.array_equal(a["image"], c["image"])


def test_captions_name_the_colour_and_shape_of_the_image():
  for i in range(200):
    s = synthetic.train_sample(0, i, 32)
    color, shape = synthetic.CLASSNAMES[s["label"]].split()
    assert color in s["caption"]
    assert shape in s["caption"] or any(w in s["caption"] for w in synthetic.SHAPE_SYNONYMS[shape])
    # The shape's pixels carry its colour: the most saturated pixels are near the palette colour.
    image = s["image"].astype(np.float32)
    saturation = image.max(-1) - image.min(-1)
    shape_pixels = image[saturation > np.percentile(saturation, 90)]
    distances = {name: np.linalg.norm(shape_pixels.mean(0) - np.array(rgb))
                 for name, rgb in synthetic.COLORS.items()}
    assert min(distances, key=distances.get) == color, (i, s["caption"], distances)


def test_zeroshot_set_is_balanced_and_held_out():
  images, labels, classnames, templates = synthetic.zeroshot_eval_set(40, 32, seed=0)
  assert images.shape == (40, 32, 32, 3) and images.dtype == np.uint8
  assert classnames == synthetic.CLASSNAMES and len(classnames) == 20
  assert all("{}" in t for t in templates)
  np.testing.assert_array_equal(np.bincount(labels), np.full(20, 2))
  train = {synthetic.train_sample(0, i, 32)["image"].tobytes() for i in range(2000)}
  assert not train & {im.tobytes() for im in images}
  again = synthetic.zeroshot_eval_set(40, 32, seed=0)[0]
  np.testing.assert_array_equal(images, again)


def test_pipeline_batches_are_normalised():
  config = ml_collections.ConfigDict({
      "seed": 0, "batch_size": 64,
      "data": {"source": "synthetic", "num_workers": 0, "min_scale": 0.9, "max_scale": 1.0,
               "image_dtype": "float32", "num_threads": 2}})
  batch = next(pipeline.make_eval_iterator(config, image_size=32, batch_size=64, num_examples=64,
                                           mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)))
  assert batch["mask"].all()
  assert batch["images"].shape == (64, 32, 32, 3)
  # Eval transform at the native size is the identity crop: exactly (x/255 - 0.5)/0.25.
  raw = np.stack([synthetic.eval_sample(0, i, 32)["image"] for i in range(64)])
  np.testing.assert_allclose(batch["images"], (raw / 255.0 - 0.5) / 0.25, atol=1e-5)
  np.testing.assert_array_equal(batch["labels"], np.arange(64) % 20)


def _eval_config(captions_per_image):
  return ml_collections.ConfigDict({
      "seed": 0, "data": {"source": "synthetic", "num_workers": 0, "min_scale": 1.0,
                          "max_scale": 1.0, "image_dtype": "float32", "num_threads": 2,
                          "captions_per_image": captions_per_image}})


def test_eval_captions_are_distinct_deterministic_and_describe_the_image():
  for i in range(40):
    sample = synthetic.eval_sample(0, i, 32, num_captions=synthetic.MAX_CAPTIONS)
    captions = sample["captions"]
    assert len(captions) == len(set(captions)) == synthetic.MAX_CAPTIONS
    assert captions[0] == sample["caption"]
    assert synthetic.eval_sample(0, i, 32, num_captions=5)["captions"] == \
        synthetic.eval_sample(0, i, 32, num_captions=5)["captions"]
    # Asking for captions changes neither the image nor its first caption.
    plain = synthetic.eval_sample(0, i, 32)
    np.testing.assert_array_equal(plain["image"], sample["image"])
    assert plain["caption"] == captions[0] and "captions" not in plain
    color, shape = synthetic.CLASSNAMES[sample["label"]].split()
    for caption in captions:
      assert color in caption
      assert shape in caption or any(w in caption for w in synthetic.SHAPE_SYNONYMS[shape])
  assert len({tuple(synthetic.eval_sample(s, 0, 32, num_captions=4)["captions"])
              for s in range(10)}) > 1
  with pytest.raises(ValueError, match="a synthetic image has between 1 and 19 distinct"):
    synthetic.eval_sample(0, 0, 32, num_captions=synthetic.MAX_CAPTIONS + 1)


def test_eval_iterator_with_all_captions():
  batches = list(pipeline.make_eval_iterator(_eval_config(3), image_size=16, batch_size=4,
                                             num_examples=6, all_captions=True))
  assert [b["mask"].tolist() for b in batches] == [[True] * 4, [True] * 2 + [False] * 2]
  assert all("tokens" not in b and b["captions"].shape == (4,) for b in batches)
  rows = [row for b in batches for row in b["captions"]]
  assert rows[6:] == [(), ()]
  for i, row in enumerate(rows[:6]):
    assert row == tuple(synthetic.eval_sample(0, i, 16, num_captions=3)["captions"])
  again = list(pipeline.make_eval_iterator(_eval_config(3), image_size=16, batch_size=4,
                                           num_examples=6, all_captions=True))
  assert [r for b in again for r in b["captions"]] == rows
  # The default (one caption) stream is unchanged: the tokens of each sample's caption.
  from clip_jax.tokenizer import tokenize
  batch = next(pipeline.make_eval_iterator(_eval_config(3), image_size=16, batch_size=4,
                                           num_examples=4))
  np.testing.assert_array_equal(
      batch["tokens"], tokenize([synthetic.eval_sample(0, i, 16)["caption"] for i in range(4)]))
