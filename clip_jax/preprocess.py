"""Image preprocessing of openai/CLIP, without torchvision: the same pixels in, the same floats out.

OpenAI's transform is Resize(size, BICUBIC) -> CenterCrop(size) -> convert("RGB") -> ToTensor ->
Normalize(mean, std). Here each step is the PIL call torchvision makes for a PIL image, in the
same order (so palette images are resized with PIL's nearest filter and RGBA images are resized
before their alpha is dropped, as there), and the output is NHWC float32 for JAX.
"""
from __future__ import annotations

import os
from typing import Sequence, Union

import numpy as np
from PIL import Image

from clip_jax.models.configs import OPENAI_MEAN, OPENAI_STD

ImageInput = Union[Image.Image, np.ndarray, str, os.PathLike]


def resized_size(width: int, height: int, size: int) -> tuple[int, int]:
  """(width, height) after torchvision's Resize(size): the short side becomes `size` exactly."""
  short, long = (width, height) if width <= height else (height, width)
  new_short, new_long = size, int(size * long / short)
  return (new_short, new_long) if width <= height else (new_long, new_short)


def center_crop_box(width: int, height: int, size: int) -> tuple[int, int, int, int]:
  """PIL crop box (left, top, right, bottom) of torchvision's CenterCrop(size), rounding included."""
  top = int(round((height - size) / 2.0))
  left = int(round((width - size) / 2.0))
  return left, top, left + size, top + size


def normalize(images: np.ndarray, mean: Sequence[float] = OPENAI_MEAN,
              std: Sequence[float] = OPENAI_STD) -> np.ndarray:
  """(x - mean) / std per channel (last axis) in float32; uint8 input is scaled by 1/255 first.

  Float input is taken to be in [0, 1] already. Works on HWC images and NHWC batches.
  """
  images = np.asarray(images)
  if images.dtype == np.uint8:
    # As torchvision's ToTensor: float32 division by 255.
    images = images.astype(np.float32) / np.float32(255)
  elif np.issubdtype(images.dtype, np.floating):
    images = images.astype(np.float32, copy=False)
  else:
    raise ValueError(f"normalize expects uint8 (0-255) or float (0-1) images, got dtype {images.dtype}")
  mean = np.asarray(mean, dtype=np.float32)
  std = np.asarray(std, dtype=np.float32)
  if mean.shape != (images.shape[-1],) or std.shape != mean.shape:
    raise ValueError(f"mean {tuple(mean.tolist())} and std {tuple(std.tolist())} need one value per "
                     f"channel; images have {images.shape[-1]} channels (shape {images.shape})")
  return (images - mean) / std


def uint8_affine(mean: Sequence[float] = OPENAI_MEAN,
                 std: Sequence[float] = OPENAI_STD) -> tuple[np.ndarray, np.ndarray]:
  """(scale, offset), float32 per channel: uint8 pixels x -> x * scale + offset is
  (x / 255 - mean) / std as one multiply-add; what the input pipeline and the train step
  (uint8 batches, normalised on the device) both compute, so the two agree bit for bit."""
  mean = np.asarray(mean, np.float32)
  std = np.asarray(std, np.float32)
  return (1.0 / (255.0 * std)).astype(np.float32), (-mean / std).astype(np.float32)


def _split_inputs(images) -> list:
  """A list of single images from one image, a list of them, or an NHWC uint8 batch."""
  if isinstance(images, (Image.Image, str, os.PathLike)):
    return [images]
  if isinstance(images, np.ndarray):
    if images.ndim == 4:
      return list(images)
    return [images]
  if isinstance(images, (list, tuple)):
    return list(images)
  raise ValueError(f"preprocess expects PIL images, uint8 arrays or file paths (one or a list), "
                   f"got {type(images).__name__}")


def _open_path(path) -> Image.Image:
  if not os.path.isfile(path):
    raise ValueError(f"image file {os.fspath(path)!r} does not exist")
  try:
    image = Image.open(path)
    image.load()  # decode now, so a broken file fails here and names itself
  except (OSError, SyntaxError, ValueError) as e:
    raise ValueError(f"image file {os.fspath(path)!r} cannot be decoded as an image: {e}") from None
  return image


def _array_to_pil(array: np.ndarray) -> Image.Image:
  if array.dtype != np.uint8:
    raise ValueError(f"image arrays must be uint8 HWC (0-255), got dtype {array.dtype} shape "
                     f"{array.shape}; for float images at the model size use clip_jax.preprocess.normalize")
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  if array.ndim == 2 or (array.ndim == 3 and array.shape[-1] in (3, 4)):
    # uint8 HW -> "L", HW3 -> "RGB", HW4 -> "RGBA".
    return Image.fromarray(np.ascontiguousarray(array))
  raise ValueError("image arrays must be HW, HWC with 1, 3 or 4 channels, or an NHWC batch; "
                   f"got shape {array.shape}")


def _to_pil(image) -> Image.Image:
  if isinstance(image, Image.Image):
    return image
  if isinstance(image, (str, os.PathLike)):
    return _open_path(image)
  if isinstance(image, np.ndarray):
    return _array_to_pil(image)
  raise ValueError(f"preprocess expects PIL images, uint8 arrays or file paths, got an element of type "
                   f"{type(image).__name__}")


def resize_and_crop(image: Image.Image, size: int) -> np.ndarray:
  """uint8 [size, size, 3]: bicubic resize of the short side to `size`, center crop, RGB."""
  new_size = resized_size(image.width, image.height, size)
  if new_size != image.size:
    image = image.resize(new_size, Image.Resampling.BICUBIC)
  image = image.crop(center_crop_box(image.width, image.height, size))
  return np.asarray(image.convert("RGB"))


def preprocess(images: Union[ImageInput, Sequence[ImageInput]], size: int,
               mean: Sequence[float] = OPENAI_MEAN, std: Sequence[float] = OPENAI_STD) -> np.ndarray:
  """openai/CLIP's image transform, batched: float32 [N, size, size, 3] (NHWC).

  Args:
    images: a PIL image, a uint8 array (HW, HWC with 1/3/4 channels, or an NHWC batch), a file
      path, or a list of these (mixed is fine). Any PIL mode is converted to RGB.
    size: output side, e.g. 224 (the model's image_size).
    mean, std: per-channel normalisation of the [0, 1] pixels (OpenAI's by default).
  """
  if not isinstance(size, (int, np.integer)) or size <= 0:
    raise ValueError(f"size must be a positive int (the model's image size), got {size!r}")
  items = _split_inputs(images)
  pixels = np.empty((len(items), size, size, 3), dtype=np.uint8)
  for i, item in enumerate(items):
    pixels[i] = resize_and_crop(_to_pil(item), size)
  return normalize(pixels, mean, std)
