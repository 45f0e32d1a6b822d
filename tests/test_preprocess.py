"""Preprocessing against a PIL-only reference of openai/CLIP's torchvision transform."""
import math

import numpy as np
import pytest
from PIL import Image

import clip_jax
from clip_jax.models.configs import OPENAI_MEAN, OPENAI_STD
from clip_jax.preprocess import center_crop_box, normalize, preprocess, resized_size


def reference_preprocess(image, size):
  """Resize(size, BICUBIC), CenterCrop(size), RGB, ToTensor, Normalize, spelled out with PIL and float64."""
  w, h = image.size
  if w <= h:
    new_w, new_h = size, math.floor(size * h / w)
  else:
    new_w, new_h = math.floor(size * w / h), size
  if (new_w, new_h) != (w, h):
    image = image.resize((new_w, new_h), resample=Image.BICUBIC)
  pixels = np.array(image.convert("RGB"), dtype=np.float64)  # converting before the crop is the same per pixel
  top, left = round((new_h - size) / 2), round((new_w - size) / 2)  # Python rounds half to even, as torchvision
  pixels = pixels[top:top + size, left:left + size]
  return (pixels / 255.0 - np.array(OPENAI_MEAN)) / np.array(OPENAI_STD)


def random_image(width, height, mode="RGB", seed=0):
  rng = np.random.default_rng(seed)
  channels = {"RGB": 3, "RGBA": 4, "L": 1}[mode]
  # Smooth content plus noise, so resampling errors would show.
  yy, xx = np.mgrid[0:height, 0:width]
  base = (128 + 100 * np.sin(xx / 7.0)[..., None] * np.cos(yy / 5.0)[..., None]
          + rng.integers(-20, 21, (height, width, channels)))
  array = np.clip(base, 0, 255).astype(np.uint8)
  return Image.fromarray(array[..., 0] if mode == "L" else array)


@pytest.mark.parametrize("width,height", [(640, 480), (480, 640), (300, 300), (1000, 200), (225, 224),
                                          (227, 224), (224, 226), (10, 7), (33, 97)])
def test_matches_reference_on_aspect_ratios(width, height):
  image = random_image(width, height, seed=width * height)
  out = preprocess(image, 64 if min(width, height) != 224 else 224)
  size = out.shape[1]
  assert out.shape == (1, size, size, 3) and out.dtype == np.float32
  np.testing.assert_allclose(out[0], reference_preprocess(image, size), rtol=0, atol=1e-5)


@pytest.mark.parametrize("mode", ["L", "RGBA", "P", "LA", "CMYK", "I;16"])
def test_other_modes_become_rgb(mode):
  image = random_image(120, 90, "RGB", seed=3)
  if mode == "P":
    image = image.quantize(colors=64)
  elif mode == "I;16":
    image = image.convert("L").convert("I;16")
  else:
    image = image.convert(mode)
  out = preprocess(image, 48)
  assert out.shape == (1, 48, 48, 3)
  np.testing.assert_allclose(out[0], reference_preprocess(image, 48), rtol=0, atol=1e-5)
  if mode == "L":
    # Grey stays grey: the three channels hold the same pixel before normalisation.
    np.testing.assert_allclose(out[0, ..., 0] * OPENAI_STD[0] + OPENAI_MEAN[0],
                               out[0, ..., 1] * OPENAI_STD[1] + OPENAI_MEAN[1], atol=1e-6)


def test_rgba_drops_alpha_after_resizing():
  array = np.zeros((40, 40, 4), np.uint8)
  array[..., 0] = 200
  array[:, :20, 3] = 255  # left half opaque red, right half transparent red
  out = preprocess(Image.fromarray(array), 20)
  np.testing.assert_allclose(out[0], reference_preprocess(Image.fromarray(array), 20), atol=1e-5)


def test_sizes_and_crop_rounding_follow_torchvision():
  assert resized_size(640, 480, 224) == (298, 224)
  assert resized_size(480, 640, 224) == (224, 298)
  assert resized_size(1000, 200, 224) == (1120, 224)
  assert resized_size(224, 224, 224) == (224, 224)
  # torchvision: top/left = int(round((side - size) / 2.0)); round(0.5) == 0, round(1.5) == 2.
  assert center_crop_box(225, 224, 224) == (0, 0, 224, 224)
  assert center_crop_box(226, 224, 224) == (1, 0, 225, 224)
  assert center_crop_box(227, 224, 224) == (2, 0, 226, 224)
  # The crop on pixels whose value is their column: the short side is already 224, so no resize.
  columns = np.tile(np.arange(227, dtype=np.uint8)[None, :, None], (224, 1, 3))
  out = preprocess(columns, 224)
  first_column = out[0, 0, 0, 0] * OPENAI_STD[0] + OPENAI_MEAN[0]
  assert abs(first_column * 255 - 2) < 1e-3


def test_constant_image_is_exact_normalisation():
  out = preprocess(np.full((50, 70, 3), 128, np.uint8), 32)
  expected = (np.float32(128) / np.float32(255) - np.float32(OPENAI_MEAN)) / np.float32(OPENAI_STD)
  np.testing.assert_array_equal(out, np.broadcast_to(expected, (1, 32, 32, 3)))


def test_normalize_matches_torch_to_tensor_and_normalize():
  torch = pytest.importorskip("torch")
  pixels = np.random.default_rng(0).integers(0, 256, (2, 16, 16, 3), dtype=np.uint8)
  expected = torch.from_numpy(pixels).float().div(255)
  expected = (expected - torch.tensor(OPENAI_MEAN)) / torch.tensor(OPENAI_STD)
  np.testing.assert_array_equal(normalize(pixels), expected.numpy())
  np.testing.assert_array_equal(normalize(pixels[0].astype(np.float32) / 255, OPENAI_MEAN, OPENAI_STD),
                                expected.numpy()[0])
  with pytest.raises(ValueError, match="one value per channel"):
    normalize(pixels, (0.5,), (0.5,))
  with pytest.raises(ValueError, match="dtype int64"):
    normalize(pixels.astype(np.int64))


def test_uint8_arrays_batches_and_lists():
  image = random_image(80, 60, seed=5)
  array = np.asarray(image)
  expected = reference_preprocess(image, 32)
  for inputs in (array, array[None], [array], [image], (image, array)):
    out = preprocess(inputs, 32)
    assert out.shape[1:] == (32, 32, 3)
    for row in out:
      np.testing.assert_allclose(row, expected, atol=1e-5)
  gray = np.asarray(image.convert("L"))
  np.testing.assert_array_equal(preprocess(gray, 32), preprocess(gray[..., None], 32))
  np.testing.assert_allclose(preprocess(gray, 32)[0], reference_preprocess(Image.fromarray(gray), 32), atol=1e-5)
  assert preprocess([], 32).shape == (0, 32, 32, 3)
  assert clip_jax.preprocess is preprocess


def test_file_paths(tmp_path):
  image = random_image(90, 120, seed=7)
  png, jpg = tmp_path / "a.png", tmp_path / "b.jpg"
  image.save(png)
  image.save(jpg, quality=90)
  out = preprocess([str(png), jpg], 40)
  np.testing.assert_allclose(out[0], reference_preprocess(image, 40), atol=1e-5)
  np.testing.assert_allclose(out[1], reference_preprocess(Image.open(jpg), 40), atol=1e-5)
  np.testing.assert_array_equal(preprocess(png, 40), out[:1])


def test_bad_inputs_are_clear_errors(tmp_path):
  missing = tmp_path / "missing.jpg"
  with pytest.raises(ValueError, match=r"image file '.*missing\.jpg' does not exist"):
    preprocess([random_image(10, 10), missing], 8)
  broken = tmp_path / "broken.jpg"
  broken.write_text("not an image")
  with pytest.raises(ValueError, match=r"image file '.*broken\.jpg' cannot be decoded"):
    preprocess(str(broken), 8)
  truncated = tmp_path / "truncated.png"
  random_image(64, 64).save(truncated)
  truncated.write_bytes(truncated.read_bytes()[:200])
  with pytest.raises(ValueError, match=r"truncated\.png' cannot be decoded"):
    preprocess(truncated, 8)
  with pytest.raises(ValueError, match="uint8"):
    preprocess(np.zeros((8, 8, 3), np.float32), 8)
  with pytest.raises(ValueError, match=r"shape \(8, 8, 5\)"):
    preprocess(np.zeros((8, 8, 5), np.uint8), 8)
  with pytest.raises(ValueError, match="positive int"):
    preprocess(random_image(8, 8), 0)
  with pytest.raises(ValueError, match="got an element of type int"):
    preprocess([3], 8)
