"""Features on a mesh: 1 device == 8 devices == plain model.apply; zero-shot end to end."""
import jax
import numpy as np
import pytest
from jax.sharding import Mesh

from clip_jax.data.synthetic import zeroshot_eval_set
from clip_jax.evaluate import features, zeroshot
from clip_jax.models import OPENAI_MEAN, OPENAI_STD, create_model, init_params


@pytest.fixture(scope="module")
def tiny():
  model = create_model("tiny")
  return model, init_params(model, jax.random.PRNGKey(0))


@pytest.fixture(scope="module")
def meshes():
  one = Mesh(np.asarray(jax.devices()[:1]).reshape(1, 1), ("data", "fsdp"))
  eight = Mesh(np.asarray(jax.devices()).reshape(4, 2), ("data", "fsdp"))
  return one, eight


@pytest.fixture(scope="module")
def eval_set():
  return zeroshot_eval_set(21, 32, seed=0)  # 21: the last batch needs padding


def _reference(model, params, x, method):
  out = np.asarray(model.apply({"params": params}, x, method=method), np.float64)
  return out / np.linalg.norm(out, axis=1, keepdims=True)


def test_image_features_same_on_1_and_8_devices_and_as_plain_apply(tiny, meshes, eval_set):
  model, params = tiny
  images = eval_set[0]
  one = features.compute_features(model, params, meshes[0], images, batch_size=8)
  eight = features.compute_features(model, params, meshes[1], images, batch_size=8)
  assert one.shape == eight.shape == (21, 64) and one.dtype == np.float32
  np.testing.assert_allclose(one, eight, atol=1e-6)
  # Independent reference: the model on the whole (host-normalised) set at once.
  pixels = (images / 255.0 - np.asarray(OPENAI_MEAN)) / np.asarray(OPENAI_STD)
  np.testing.assert_allclose(eight, _reference(model, params, pixels.astype(np.float32),
                                               "encode_image"), atol=2e-5)
  # Preprocessed float input gives the same features as raw uint8.
  floats = features.compute_features(model, params, meshes[1], pixels.astype(np.float32), 8)
  np.testing.assert_allclose(floats, eight, atol=2e-5)


def test_text_features_same_on_1_and_8_devices(tiny, meshes):
  model, params = tiny
  from clip_jax.tokenizer import tokenize
  tokens = tokenize([f"a photo of {i} red circles." for i in range(11)])
  one = features.compute_features(model, params, meshes[0], tokens, 4, method="encode_text")
  eight = features.compute_features(model, params, meshes[1], tokens, 4, method="encode_text")
  np.testing.assert_allclose(one, eight, atol=1e-6)
  np.testing.assert_allclose(eight, _reference(model, params, tokens, "encode_text"), atol=2e-5)


def test_run_zeroshot_end_to_end_on_the_synthetic_set(tiny, meshes, eval_set):
  model, params = tiny
  images, labels, classnames, templates = eval_set
  got = [features.run_zeroshot(model, params, mesh, images, labels, classnames, templates, 16)
         for mesh in meshes]
  assert got[0] == got[1]
  assert set(got[0]) == {"top1", "top5", "mean_per_class_recall"}
  # Reference: classifier and metrics from plain model.apply outputs.
  from clip_jax.tokenizer import tokenize
  encode = lambda tokens: _reference(model, params, tokens, "encode_text")
  classifier = zeroshot.build_classifier(encode, classnames, templates, tokenize_fn=tokenize)
  pixels = ((images / 255.0 - np.asarray(OPENAI_MEAN)) / np.asarray(OPENAI_STD)).astype(np.float32)
  expected = zeroshot.zeroshot_metrics(_reference(model, params, pixels, "encode_image"),
                                       classifier, labels)
  assert got[1] == pytest.approx(expected, abs=1e-12)


def test_run_zeroshot_reuses_the_cached_classifier(tiny, meshes, eval_set, monkeypatch):
  model, params = tiny
  images, labels, classnames, templates = eval_set
  cache = zeroshot.ClassifierCache()
  first = features.run_zeroshot(model, params, meshes[1], images, labels, classnames, templates,
                                16, cache=cache, checkpoint_id="step1", dataset="synthetic")
  monkeypatch.setattr(zeroshot, "build_classifier", lambda *a, **k: pytest.fail("rebuilt"))
  again = features.run_zeroshot(model, params, meshes[1], images, labels, classnames, templates,
                                16, cache=cache, checkpoint_id="step1", dataset="synthetic")
  assert first == again


def test_batches_stream_drops_padding_and_keeps_order(tiny, meshes, eval_set):
  model, params = tiny
  images, labels = eval_set[0], eval_set[1]
  batches = []
  for start in range(0, 21, 8):  # process-local batches of 8, the last one padded
    chunk = images[start:start + 8]
    pad = 8 - len(chunk)
    batches.append({
        "images": np.concatenate([chunk, np.zeros((pad,) + chunk.shape[1:], np.uint8)]),
        "labels": np.concatenate([labels[start:start + 8], -np.ones(pad, np.int64)]),
        "mask": np.arange(8) < len(chunk)})
  out = features.compute_features_from_batches(model, params, meshes[1], batches,
                                               encode={"images": "encode_image"})
  np.testing.assert_array_equal(out["labels"], labels)
  expected = features.compute_features(model, params, meshes[0], images, 8)
  np.testing.assert_allclose(out["images"], expected, atol=1e-6)


def test_mesh_without_batch_axis_is_a_clear_error(tiny):
  model, params = tiny
  mesh = Mesh(np.asarray(jax.devices()[:2]), ("tensor",))
  with pytest.raises(ValueError, match="include no batch axis"):
    features.compute_features(model, params, mesh, np.zeros((2, 32, 32, 3), np.uint8), 2)
