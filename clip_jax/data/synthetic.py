"""A built-in image-caption set a tiny CLIP learns in minutes: coloured shapes on noise.

Each image holds one shape (circle, square, triangle, cross) in one of five colours, small
or large, somewhere in the frame, over a tinted, gradient, noisy background. Its caption
names the colour and shape in varied words and often the size and position. A sample is a
pure function of (seed, index): the set is unlimited and reproducible. The zero-shot set
classifies colour x shape ("red circle") and is drawn from a separate seed stream, so it
never repeats a training image.
"""
from __future__ import annotations

import math
from typing import Optional

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (215, 35, 35),
    "green": (35, 170, 55),
    "blue": (40, 75, 225),
    "yellow": (235, 215, 35),
    "purple": (150, 50, 200),
}
SHAPES = ("circle", "square", "triangle", "cross")
SHAPE_SYNONYMS = {
    "circle": ("circle", "circle", "round disc", "round shape"),
    "square": ("square", "square", "box", "block"),
    "triangle": ("triangle", "triangle", "three-sided shape", "wedge"),
    "cross": ("cross", "cross", "plus sign", "plus shape"),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
CLASSNAMES = [f"{color} {shape}" for color in COLORS for shape in SHAPES]
TEMPLATES = ["a photo of a {}.", "a {} on a plain background.", "a picture of a {}.", "a {}."]
_CAPTIONS = (
    "a photo of a {color} {shape}.",
    "a {size} {color} {shape} in the {pos}.",
    "a {color} {shape} on a {bg} background.",
    "{color} {shape}",
    "a {size} {shape} in {color}, {pos}.",
    "there is a {color} {synonym} near the {pos}.",
    "a picture of a {size} {color} {shape}.",
    "a {color} {synonym}.",
    "the {shape} is {color}.",
    "a {color} {shape}.",
)
# Seed streams: the training set and the zero-shot set never share a generator.
_TRAIN_STREAM, _EVAL_STREAM = 0x7A11, 0xE7A1


def num_classes() -> int:
  return len(CLASSNAMES)


def _position_words(cx: float, cy: float) -> str:
  row = ("top", "middle", "bottom")[min(int(cy * 3), 2)]
  col = ("left", "center", "right")[min(int(cx * 3), 2)]
  if row == "middle" and col == "center":
    return "center"
  if row == "middle":
    return col
  if col == "center":
    return row
  return f"{row} {col}"


def _shape_polygon(shape: str, cx: float, cy: float, radius: float, angle: float):
  if shape == "square":
    corners = [(1, 1), (-1, 1), (-1, -1), (1, -1)]
    pts = [(x * radius * 0.8, y * radius * 0.8) for x, y in corners]
  elif shape == "triangle":
    # Slightly enlarged and lowered so its area is comparable to the other shapes.
    pts = [(1.15 * radius * math.cos(a), 1.15 * radius * math.sin(a) + 0.15 * radius)
           for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
  else:  # cross: a plus sign with arms one third of the width
    a, b = radius, radius / 3
    pts = [(-b, -a), (b, -a), (b, -b), (a, -b), (a, b), (b, b), (b, a), (-b, a), (-b, b),
           (-a, b), (-a, -b), (-b, -b)]
  cos, sin = math.cos(angle), math.sin(angle)
  return [(cx + x * cos - y * sin, cy + x * sin + y * cos) for x, y in pts]


def render(rng: np.random.Generator, image_size: int, label: int):
  """Draws one image of class `label` (colour-major index into CLASSNAMES) and its caption."""
  image, caption, _ = _render(rng, image_size, label)
  return image, caption


def _render(rng: np.random.Generator, image_size: int, label: int):
  """(image, caption, facts): facts are the caption-relevant parameters of the image."""
  color_name = list(COLORS)[label // len(SHAPES)]
  shape = SHAPES[label % len(SHAPES)]
  # Supersample so edges stay clean at 32px; the canvas stays small for big images.
  factor = max(1, min(4, 256 // image_size))
  canvas = image_size * factor
  base = rng.uniform(60, 150)
  tint = rng.uniform(-12, 12, size=3)
  background = np.clip(base + tint, 0, 255)
  size_name = "small" if rng.random() < 0.5 else "large"
  diameter = rng.uniform(0.38, 0.5) if size_name == "small" else rng.uniform(0.6, 0.8)
  radius = diameter / 2
  cx, cy = rng.uniform(radius, 1 - radius, size=2)
  angle = math.radians(rng.uniform(-20, 20))
  color = np.clip(np.asarray(COLORS[color_name]) + rng.uniform(-20, 20, size=3), 0, 255)

  img = Image.new("RGB", (canvas, canvas), tuple(int(v) for v in background))
  draw = ImageDraw.Draw(img)
  fill = tuple(int(v) for v in color)
  if shape == "circle":
    r = radius * canvas
    draw.ellipse([cx * canvas - r, cy * canvas - r, cx * canvas + r, cy * canvas + r], fill=fill)
  else:
    draw.polygon(_shape_polygon(shape, cx * canvas, cy * canvas, radius * canvas, angle), fill=fill)
  if factor > 1:
    img = img.resize((image_size, image_size), Image.BOX)
  pixels = np.asarray(img, dtype=np.float32)
  # A gentle gradient and pixel noise: texture the model must learn to ignore.
  ramp = np.linspace(-1.0, 1.0, image_size, dtype=np.float32)
  gx, gy = rng.uniform(-15, 15, size=2)
  pixels += gx * ramp[None, :, None] + gy * ramp[:, None, None]
  pixels += rng.normal(0.0, 6.0, size=pixels.shape).astype(np.float32)
  image = np.clip(np.rint(pixels), 0, 255).astype(np.uint8)

  words = dict(
      color=color_name, shape=shape, size=rng.choice(SIZE_WORDS[size_name]),
      pos=_position_words(cx, cy), synonym=rng.choice(SHAPE_SYNONYMS[shape]),
      bg="dark" if base < 90 else ("light" if base > 125 else "grey"))
  caption = _CAPTIONS[rng.integers(len(_CAPTIONS))].format(**words)
  facts = dict(color=color_name, shape=shape, size=size_name, pos=words["pos"], bg=words["bg"])
  return image, caption, facts


def _caption_variants(facts: dict) -> list[str]:
  """Every distinct caption of an image with these facts, in a fixed order."""
  variants = {}
  for template in _CAPTIONS:
    for size in SIZE_WORDS[facts["size"]]:
      for synonym in SHAPE_SYNONYMS[facts["shape"]]:
        words = dict(facts, size=size, synonym=synonym)
        variants.setdefault(template.format(**words), None)
  return list(variants)


# The most distinct captions every synthetic image has (eval_sample's num_captions limit).
MAX_CAPTIONS = min(len(_caption_variants(dict(color="red", shape=shape, size="small",
                                              pos="center", bg="grey")))
                   for shape in SHAPES)


def train_sample(seed: int, index: int, image_size: int) -> dict:
  """Training sample `index` of the set with `seed`: {"image" uint8 HWC, "caption", "label"}."""
  rng = np.random.default_rng([_TRAIN_STREAM, int(seed) & 0xFFFFFFFF, int(index)])
  label = int(rng.integers(num_classes()))
  image, caption = render(rng, image_size, label)
  return {"image": image, "caption": caption, "label": label}


def eval_sample(seed: int, index: int, image_size: int,
                num_captions: Optional[int] = None) -> dict:
  """Held-out sample `index` (class index mod num_classes) from the evaluation seed stream.

  With num_captions, "captions" lists that many distinct captions of the image (the
  first is "caption"; the others are drawn from its other phrasings by (seed, index)).
  """
  rng = np.random.default_rng([_EVAL_STREAM, int(seed) & 0xFFFFFFFF, int(index)])
  label = int(index) % num_classes()
  image, caption, facts = _render(rng, image_size, label)
  sample = {"image": image, "caption": caption, "label": label}
  if num_captions is not None:
    others = [c for c in _caption_variants(facts) if c != caption]
    if not 1 <= num_captions <= MAX_CAPTIONS:
      raise ValueError(f"num_captions={num_captions}: a synthetic image has between 1 and "
                       f"{MAX_CAPTIONS} distinct captions")
    # Its own stream: the extra captions never change the image or its first caption.
    extra = np.random.default_rng([_EVAL_STREAM, int(seed) & 0xFFFFFFFF, int(index), 1])
    picks = extra.choice(len(others), size=num_captions - 1, replace=False)
    sample["captions"] = [caption] + [others[i] for i in picks]
  return sample


def zeroshot_eval_set(num_examples: int, image_size: int, seed: int = 0):
  """The held-out zero-shot set: (images uint8 [N,H,W,3], labels int [N], classnames, templates).

  Classes are balanced (label = i mod num_classes) and every image comes from the
  evaluation seed stream, disjoint from the training stream for every seed.
  """
  images = np.empty((num_examples, image_size, image_size, 3), np.uint8)
  labels = np.arange(num_examples, dtype=np.int64) % num_classes()
  for i in range(num_examples):
    images[i] = eval_sample(seed, i, image_size)["image"]
  return images, labels, list(CLASSNAMES), list(TEMPLATES)
