"""Analytic FLOPs of CLIP (XLA's cost analysis counts a scanned layer body once).

Counts 2 FLOPs per multiply-accumulate of every matmul (patch embedding, QKV, attention
scores and values, output projection, MLP, final projections), as the published
open_clip / OpenAI figures do; LayerNorm, softmax and activations are not counted.
"""
from __future__ import annotations

from clip_jax.models.configs import CLIPConfig, get_model_config


def _transformer_macs(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
  per_layer = tokens * (4 * width * width + 2 * int(width * mlp_ratio) * width)  # qkv+out, mlp
  per_layer += 2 * tokens * tokens * width                                     # scores + values
  return layers * per_layer


def image_flops(config: "str | CLIPConfig") -> int:
  cfg = get_model_config(config)
  v = cfg.vision
  patches = v.grid_size ** 2
  macs = patches * v.patch_size ** 2 * 3 * v.width
  macs += _transformer_macs(v.num_tokens, v.width, v.layers, v.mlp_ratio)
  macs += v.width * cfg.embed_dim
  return 2 * macs


def text_flops(config: "str | CLIPConfig") -> int:
  cfg = get_model_config(config)
  t = cfg.text
  macs = _transformer_macs(t.context_length, t.width, t.layers, t.mlp_ratio)
  macs += t.width * cfg.embed_dim
  return 2 * macs


def forward_flops_per_pair(config: "str | CLIPConfig") -> int:
  """Forward FLOPs of one image and one caption through both towers."""
  return image_flops(config) + text_flops(config)


def train_flops_per_pair(config: "str | CLIPConfig") -> int:
  """Forward + backward (2x forward) = 3x forward."""
  return 3 * forward_flops_per_pair(config)


def loss_flops(global_batch: int, embed_dim: int) -> int:
  """The B x B similarity matrix, forward and backward (3x)."""
  return 3 * 2 * global_batch * global_batch * embed_dim


def train_flops_per_step(config: "str | CLIPConfig", global_batch: int) -> int:
  cfg = get_model_config(config)
  return global_batch * train_flops_per_pair(cfg) + loss_flops(global_batch, cfg.embed_dim)
