"""The built-in synthetic set: deterministic, learnable structure, disjoint zero-shot set."""
import ml_collections
import numpy as np

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
