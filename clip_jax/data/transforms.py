"""Per-sample image and text transforms, run inside the input workers.

Every random choice comes from `sample_rng(seed, epoch, index)`, so a resumed run draws
exactly the crops it would have drawn without the interruption.
"""
from __future__ import annotations

import functools
import importlib.metadata
import io
import math
from typing import Optional, Sequence

import numpy as np
import PIL
from PIL import Image

from clip_jax.preprocess import uint8_affine

# A truncated JPEG must fail to decode (and be skipped), not decode half-grey.
Image.LOAD_TRUNCATED_IMAGES = False

_RATIO_RANGE = (3.0 / 4.0, 4.0 / 3.0)


@functools.lru_cache(maxsize=1)
def pillow_build() -> str:
  """Which PIL decodes and resizes here: "Pillow-SIMD 12.1.1.post0" or "Pillow 13.0.0".

  Pillow's bicubic resize is scalar C; Pillow-SIMD's (same API, same filter) is about 5x
  faster and makes the resize a small part of the input pipeline (benchmarks/RESULTS.md;
  launch/install_pillow_simd.sh installs it in place of Pillow).
  """
  try:
    simd = importlib.metadata.version("pillow-simd")
  except importlib.metadata.PackageNotFoundError:
    simd = None
  # Both distributions install the same `PIL` package: the imported one is the last installed.
  if simd is not None and simd == PIL.__version__:
    return f"Pillow-SIMD {simd}"
  return f"Pillow {PIL.__version__}"


def sample_rng(seed: int, epoch: int, *index: int) -> np.random.Generator:
  """The augmentation generator of one sample: a pure function of (seed, epoch, index...)."""
  return np.random.default_rng([int(seed) & 0xFFFFFFFF, int(epoch)] + [int(i) for i in index])


def to_pil(image) -> Image.Image:
  """Decodes encoded bytes (JPEG/PNG/WebP) or wraps a uint8 HWC array, as RGB.

  Raises OSError/ValueError on undecodable or truncated input.
  """
  if isinstance(image, (bytes, bytearray, memoryview)):
    pil = Image.open(io.BytesIO(image))
    return pil
  array = np.asarray(image)
  if array.dtype != np.uint8 or array.ndim not in (2, 3):
    raise ValueError(f"expected a uint8 HW or HWC image, got {array.dtype} {array.shape}")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  return Image.fromarray(array)


def random_resized_crop_box(width: int, height: int, rng: np.random.Generator,
                            scale: Sequence[float]) -> tuple[int, int, int, int]:
  """torchvision's RandomResizedCrop box: area in `scale`, aspect ratio in [3/4, 4/3]."""
  area = width * height
  log_ratio = (math.log(_RATIO_RANGE[0]), math.log(_RATIO_RANGE[1]))
  for _ in range(10):
    target_area = area * rng.uniform(scale[0], scale[1])
    aspect = math.exp(rng.uniform(*log_ratio))
    w = int(round(math.sqrt(target_area * aspect)))
    h = int(round(math.sqrt(target_area / aspect)))
    if 0 < w <= width and 0 < h <= height:
      x0 = int(rng.integers(0, width - w + 1))
      y0 = int(rng.integers(0, height - h + 1))
      return x0, y0, x0 + w, y0 + h
  # Fallback (extreme aspect ratios): the central crop with the ratio clamped.
  ratio = width / height
  if ratio < _RATIO_RANGE[0]:
    w, h = width, int(round(width / _RATIO_RANGE[0]))
  elif ratio > _RATIO_RANGE[1]:
    h, w = height, int(round(height * _RATIO_RANGE[1]))
  else:
    w, h = width, height
  x0, y0 = (width - w) // 2, (height - h) // 2
  return x0, y0, x0 + w, y0 + h


def center_crop_box(width: int, height: int) -> tuple[int, int, int, int]:
  """The central square: resize-shorter-side-then-center-crop as one resize with a box."""
  side = min(width, height)
  x0, y0 = (width - side) // 2, (height - side) // 2
  return x0, y0, x0 + side, y0 + side


def draft_scale(box: Sequence[float], size: int) -> int:
  """The largest JPEG decode reduction (8, 4, 2, else 1) that keeps `box` >= size on both sides."""
  box_w, box_h = box[2] - box[0], box[3] - box[1]
  for scale in (8, 4, 2):
    if box_w >= size * scale and box_h >= size * scale:
      return scale
  return 1


def _drafted(pil: Image.Image, box: Sequence[int], size: int) -> tuple[Image.Image, tuple]:
  """JPEGs: decode at a reduced scale where `box` stays >= size; the box in its coordinates.

  libjpeg's 1/s scaled decode maps original pixels [s*i, s*i + s) to pixel i, so the same
  region is box / s: only the resampling differs, not which pixels the crop covers.
  """
  scale = draft_scale(box, size) if pil.format == "JPEG" else 1
  if scale == 1:
    return pil, tuple(box)
  width, height = pil.size
  # PIL picks the largest scale whose output is >= the requested size: exactly `scale`.
  pil.draft("RGB", (width // scale, height // scale))
  actual = next((s for s in (8, 4, 2, 1) if pil.size == (-(-width // s), -(-height // s))), None)
  if actual is None:  # unexpected: fall back to the box scaled by the size ratio
    return pil, (box[0] * pil.size[0] / width, box[1] * pil.size[1] / height,
                 box[2] * pil.size[0] / width, box[3] * pil.size[1] / height)
  return pil, tuple(v / actual for v in box)


def crop_box(width: int, height: int, *, train: bool, rng: Optional[np.random.Generator] = None,
             scale: Sequence[float] = (0.9, 1.0)) -> tuple[int, int, int, int]:
  """The crop of crop_and_resize, in the image's full-resolution coordinates."""
  if train:
    return random_resized_crop_box(width, height, rng, scale)
  return center_crop_box(width, height)


def crop_and_resize(image, size: int, *, train: bool, rng: Optional[np.random.Generator] = None,
                    scale: Sequence[float] = (0.9, 1.0), draft: bool = True) -> np.ndarray:
  """Decodes `image`, crops (random for training, central for evaluation), resizes bicubically.

  Returns uint8 [size, size, 3]. The crop box is drawn in full-resolution coordinates; with
  `draft`, a JPEG much larger than the crop is decoded at 1/2, 1/4 or 1/8 scale when the
  box stays >= size there (the same region, resampled from fewer pixels).
  """
  pil = to_pil(image)
  width, height = pil.size  # the full size, before any draft
  box = crop_box(width, height, train=train, rng=rng, scale=scale)
  if draft:
    pil, box = _drafted(pil, box, size)
  if pil.mode != "RGB":
    pil = pil.convert("RGB")
  out = pil.resize((size, size), Image.BICUBIC, box=box)
  return np.asarray(out, dtype=np.uint8)


class Normalizer:
  """uint8 HWC -> (x / 255 - mean) / std as one multiply-add, in float32 or bfloat16.

  dtype "uint8": the identity (the images are normalised later, in the jitted step).
  """

  def __init__(self, mean: Sequence[float], std: Sequence[float], dtype: str = "float32"):
    # The same constants as the train step's on-device normalisation of uint8 batches.
    self.scale, self.offset = uint8_affine(mean, std)
    if dtype not in ("float32", "bfloat16", "uint8"):
      raise ValueError(f"config.data.image_dtype={dtype!r} is not supported; use float32, "
                       f"bfloat16 or uint8")
    self.dtype = dtype

  def __call__(self, image_uint8: np.ndarray) -> np.ndarray:
    if self.dtype == "uint8":
      return image_uint8
    out = image_uint8.astype(np.float32) * self.scale + self.offset
    if self.dtype == "bfloat16":
      import ml_dtypes  # pylint: disable=g-import-not-at-top
      out = out.astype(ml_dtypes.bfloat16)
    return out


def tokenize_caption(caption: str, context_length: int = 77) -> np.ndarray:
  """One caption -> int32 [context_length] with CLIP's BPE (truncated, EOT kept).

  The row is built directly from the tokenizer's ids: `tokenize`'s batch path costs ~4x
  more for a single caption (same ids; tests/test_data_pipeline.py checks them).
  """
  from clip_jax import tokenizer  # pylint: disable=g-import-not-at-top
  ids = tokenizer.default_tokenizer().encode(caption)[:context_length - 2]
  row = np.zeros(context_length, np.int32)
  row[0] = tokenizer.SOT
  row[1:len(ids) + 1] = ids
  row[len(ids) + 1] = tokenizer.EOT
  return row
