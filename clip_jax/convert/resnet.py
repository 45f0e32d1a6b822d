"""The ResNet image tower's checkpoint keys (OpenAI's and open_clip's ModifiedResNet), and their
mapping to `params["visual"]` and the BatchNorm running statistics.

Names: the stem `visual.conv{1,2,3}.weight` and `visual.bn{1,2,3}.*`; Bottleneck `b` of stage
`s` under `visual.layer{s}.{b}.` (`conv1..3`, `bn1..3`, and where it strides or widens
`downsample.0.weight` (the 1x1 conv) and `downsample.1.*` (its BatchNorm)); the attention pool
`visual.attnpool.positional_embedding`, `visual.attnpool.{q,k,v,c}_proj.{weight,bias}`. A
BatchNorm has `weight`, `bias`, `running_mean`, `running_var` and `num_batches_tracked` (a
counter, not needed). Hugging Face has no CLIP ResNet, so there is one layout.

See `clip_jax.convert.vit` for what an image family's module provides; `from_batch_stats`
inverts `to_batch_stats` too.
"""
from __future__ import annotations

import re
from typing import Optional

import numpy as np

from clip_jax.models import CLIPConfig, ResNetConfig
from clip_jax.models.resnet import EXPANSION

CONFIG_TYPE = ResNetConfig
KEY_PREFIXES = {"openai": ("visual.layer1.", "visual.attnpool.")}
_BN = ("weight", "bias", "running_mean", "running_var")
_STAGE_BLOCK = re.compile(r"^visual\.layer([1-4])\.(\d+)\.")


def _bottlenecks(v: ResNetConfig):
  """(stage 1-4, block, inplanes, planes, stride, has_downsample) of every Bottleneck."""
  inplanes = v.width
  for stage, blocks in enumerate(v.layers, start=1):
    planes = v.width * 2 ** (stage - 1)
    for block in range(blocks):
      stride = 2 if stage > 1 and block == 0 else 1
      yield stage, block, inplanes, planes, stride, stride > 1 or inplanes != planes * EXPANSION
      inplanes = planes * EXPANSION


def _convs_and_norms(v: ResNetConfig):
  """(torch prefix, our path, conv weight shape [out, in, k, k]) of every conv+BatchNorm pair;
  the norm is the conv's prefix with `conv` -> `bn` (downsample: `.0` -> `.1`)."""
  w = v.width
  stem = [("visual.conv1", "visual.bn1", ("conv1",), ("bn1",), (w // 2, 3, 3, 3)),
          ("visual.conv2", "visual.bn2", ("conv2",), ("bn2",), (w // 2, w // 2, 3, 3)),
          ("visual.conv3", "visual.bn3", ("conv3",), ("bn3",), (w, w // 2, 3, 3))]
  yield from stem
  for stage, block, inplanes, planes, _, downsample in _bottlenecks(v):
    prefix, ours = f"visual.layer{stage}.{block}.", f"layer{stage}_{block}"
    yield (prefix + "conv1", prefix + "bn1", (ours, "conv1"), (ours, "bn1"),
           (planes, inplanes, 1, 1))
    yield (prefix + "conv2", prefix + "bn2", (ours, "conv2"), (ours, "bn2"),
           (planes, planes, 3, 3))
    yield (prefix + "conv3", prefix + "bn3", (ours, "conv3"), (ours, "bn3"),
           (planes * EXPANSION, planes, 1, 1))
    if downsample:
      yield (prefix + "downsample.0", prefix + "downsample.1", (ours, "downsample_conv"),
             (ours, "downsample_bn"), (planes * EXPANSION, inplanes, 1, 1))


def expected_shapes(config: CLIPConfig, layout: str) -> dict[str, tuple]:
  """Every image-tower key the model needs, with its shape (OpenAI's layout only)."""
  if layout != "openai":
    raise ValueError(f"the ResNet image tower has no {layout!r} layout (Hugging Face has no "
                     "CLIP ResNet); use OpenAI or open_clip weights")
  v = config.vision
  shapes = {}
  for conv, norm, _, _, shape in _convs_and_norms(v):
    shapes[conv + ".weight"] = shape
    shapes.update({f"{norm}.{name}": (shape[0],) for name in _BN})
  pool = v.feature_width
  shapes["visual.attnpool.positional_embedding"] = (v.num_tokens, pool)
  for name in ("q", "k", "v"):
    shapes[f"visual.attnpool.{name}_proj.weight"] = (pool, pool)
    shapes[f"visual.attnpool.{name}_proj.bias"] = (pool,)
  shapes["visual.attnpool.c_proj.weight"] = (config.embed_dim, pool)
  shapes["visual.attnpool.c_proj.bias"] = (config.embed_dim,)
  return shapes


def infer_dims(state, layout: str) -> dict:
  """The sizes readable from the tensor shapes (those whose keys are present)."""
  del layout  # one layout
  dims = {}
  if "visual.conv3.weight" in state:
    dims["vision.width"] = int(np.shape(state["visual.conv3.weight"])[0])
  if "visual.attnpool.positional_embedding" in state:
    dims["vision.num_tokens"] = int(np.shape(state["visual.attnpool.positional_embedding"])[0])
  if "visual.attnpool.c_proj.weight" in state:
    dims["embed_dim"] = int(np.shape(state["visual.attnpool.c_proj.weight"])[0])
  blocks = {}
  for key in state:
    if m := _STAGE_BLOCK.match(key):
      stage, block = int(m.group(1)), int(m.group(2))
      blocks[stage] = max(blocks.get(stage, 0), block + 1)
  if blocks:
    dims["vision.layers"] = tuple(blocks.get(stage, 0) for stage in range(1, 5))
  return dims


def config_dims(config: CLIPConfig) -> dict:
  """The sizes `infer_dims` reads, as the model config has them."""
  v = config.vision
  return {"vision.width": v.width, "vision.num_tokens": v.num_tokens,
          "vision.layers": tuple(v.layers)}


def tower_config(dims: dict, heads: Optional[int] = None) -> ResNetConfig:
  """The ResNetConfig of `infer_dims`'s sizes; heads default to width * 32 / 64 (OpenAI's)."""
  grid = int(round((dims["vision.num_tokens"] - 1) ** 0.5))
  if grid * grid + 1 != dims["vision.num_tokens"]:
    raise ValueError(f"the attention pool's position embedding has {dims['vision.num_tokens']} "
                     "rows, not a square grid plus the mean token")
  width = dims["vision.width"]
  return ResNetConfig(image_size=grid * 32, layers=dims["vision.layers"], width=width,
                      heads=heads or max(1, width * 32 // 64))


def _set(tree: dict, path: tuple, value) -> None:
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def _get(tree: dict, path: tuple):
  for key in path:
    tree = tree[key]
  return tree


def to_params(state, config: CLIPConfig) -> dict:
  """`params["visual"]` from a checked OpenAI-layout state dict."""
  v = config.vision
  visual = {}
  for conv, norm, conv_path, norm_path, _ in _convs_and_norms(v):
    _set(visual, conv_path, {"kernel": state[conv + ".weight"].transpose(2, 3, 1, 0)})  # HWIO
    _set(visual, norm_path, {"scale": state[norm + ".weight"], "bias": state[norm + ".bias"]})
  pool, heads = v.feature_width, v.heads
  head_dim = pool // heads
  attnpool = {"positional_embedding": state["visual.attnpool.positional_embedding"]}
  for name in ("q", "k", "v"):  # torch: x @ W.T, W rows ordered (head, head_dim)
    weight = state[f"visual.attnpool.{name}_proj.weight"]
    attnpool[f"{name}_proj"] = {
        "kernel": weight.T.reshape(pool, heads, head_dim),
        "bias": state[f"visual.attnpool.{name}_proj.bias"].reshape(heads, head_dim)}
  attnpool["c_proj"] = {
      "kernel": state["visual.attnpool.c_proj.weight"].T.reshape(heads, head_dim, -1),
      "bias": state["visual.attnpool.c_proj.bias"]}
  visual["attnpool"] = attnpool
  return visual


def to_batch_stats(state, config: CLIPConfig) -> dict:
  """`batch_stats["visual"]`: every BatchNorm's running mean and variance."""
  stats = {}
  for _, norm, _, norm_path, _ in _convs_and_norms(config.vision):
    _set(stats, norm_path, {"mean": state[norm + ".running_mean"],
                            "var": state[norm + ".running_var"]})
  return stats


def from_params(params: dict, config: CLIPConfig) -> dict:
  """The inverse of `to_params`: the image tower's OpenAI-layout tensors (running statistics
  aside, see `from_batch_stats`)."""
  state = {}
  for conv, norm, conv_path, norm_path, _ in _convs_and_norms(config.vision):
    state[conv + ".weight"] = _get(params, conv_path)["kernel"].transpose(3, 2, 0, 1)  # OIHW
    bn = _get(params, norm_path)
    state.update({norm + ".weight": bn["scale"], norm + ".bias": bn["bias"]})
  attnpool = params["attnpool"]
  state["visual.attnpool.positional_embedding"] = attnpool["positional_embedding"]
  for name in ("q", "k", "v", "c"):
    proj = attnpool[f"{name}_proj"]
    kernel = proj["kernel"]  # q/k/v: [pool, heads, head_dim]; c: [heads, head_dim, out]
    kernel = kernel.reshape(-1, kernel.shape[-1]) if name == "c" else kernel.reshape(
        kernel.shape[0], -1)
    state[f"visual.attnpool.{name}_proj.weight"] = kernel.T
    state[f"visual.attnpool.{name}_proj.bias"] = proj["bias"].reshape(-1)
  return state


def from_batch_stats(stats: dict, config: CLIPConfig) -> dict:
  """The inverse of `to_batch_stats`: every BatchNorm's running_mean / running_var, and a zero
  num_batches_tracked (PyTorch's BatchNorm keeps the counter; strict loading wants it)."""
  state = {}
  for _, norm, _, norm_path, _ in _convs_and_norms(config.vision):
    bn = _get(stats, norm_path)
    state.update({norm + ".running_mean": bn["mean"], norm + ".running_var": bn["var"],
                  norm + ".num_batches_tracked": np.zeros((), np.int64)})
  return state
