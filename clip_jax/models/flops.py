"""Analytic FLOPs of CLIP (XLA's cost analysis counts a scanned layer body once).

Counts 2 FLOPs per multiply-accumulate of every matmul and convolution (patch embedding,
QKV, attention scores and values, output projection, MLP, final projections; a ResNet's
convolutions and attention pool), as the published open_clip / OpenAI figures do;
LayerNorm, BatchNorm, softmax, pooling and activations are not counted.

With patch dropout (FLIP) the image tower processes 1 + kept patch tokens, and only the kept
patches go through the patch projection: `patch_dropout` counts those, not the unmasked ones.
"""
from __future__ import annotations

from clip_jax.models.configs import CLIPConfig, get_model_config


def _transformer_macs(tokens: int, width: int, layers: int, mlp_ratio: float) -> int:
  per_layer = tokens * (4 * width * width + 2 * int(width * mlp_ratio) * width)  # qkv+out, mlp
  per_layer += 2 * tokens * tokens * width                                     # scores + values
  return layers * per_layer


def _resnet_macs(cfg: CLIPConfig) -> int:
  """OpenAI's ModifiedResNet (clip_jax.models.resnet): stem, Bottlenecks, attention pool."""
  v = cfg.vision
  size, width = v.image_size, v.width
  conv = lambda side, k, cin, cout: side * side * k * k * cin * cout
  size = (size + 1) // 2                     # the stem's stride-2 conv (padding 1)
  macs = conv(size, 3, 3, width // 2) + conv(size, 3, width // 2, width // 2)
  macs += conv(size, 3, width // 2, width)
  size //= 2                                 # the stem's 2x2 average pool
  inplanes = width
  for stage, blocks in enumerate(v.layers):
    planes = width * 2 ** stage
    for block in range(blocks):
      stride = 2 if stage > 0 and block == 0 else 1
      out_size = size // stride              # the stride is an average pool before conv3
      macs += conv(size, 1, inplanes, planes) + conv(size, 3, planes, planes)
      macs += conv(out_size, 1, planes, 4 * planes)
      if stride > 1 or inplanes != 4 * planes:
        macs += conv(out_size, 1, inplanes, 4 * planes)  # the shortcut, after its pool
      inplanes, size = 4 * planes, out_size
  tokens, pool_width = size * size + 1, inplanes
  macs += pool_width * pool_width                # q of the mean token
  macs += 2 * tokens * pool_width * pool_width   # k and v of every token
  macs += 2 * tokens * pool_width                # one query's scores and values
  macs += pool_width * cfg.embed_dim             # c_proj
  return macs


def image_flops(config: "str | CLIPConfig", patch_dropout: float = 0.0) -> int:
  """Forward FLOPs of one image; a ViT with `patch_dropout` counts only the kept patches."""
  from clip_jax.models.vit import kept_patches  # pylint: disable=g-import-not-at-top
  cfg = get_model_config(config)
  if cfg.is_resnet:
    if patch_dropout:
      raise ValueError("patch dropout applies to ViT image towers, not ResNets")
    return 2 * _resnet_macs(cfg)
  v = cfg.vision
  patches = kept_patches(v.grid_size ** 2, patch_dropout)
  macs = patches * v.patch_size ** 2 * 3 * v.width
  macs += _transformer_macs(patches + 1, v.width, v.layers, v.mlp_ratio)
  macs += v.width * cfg.embed_dim
  return 2 * macs


def text_flops(config: "str | CLIPConfig") -> int:
  cfg = get_model_config(config)
  t = cfg.text
  macs = _transformer_macs(t.context_length, t.width, t.layers, t.mlp_ratio)
  macs += t.width * cfg.embed_dim
  return 2 * macs


def forward_flops_per_pair(config: "str | CLIPConfig", patch_dropout: float = 0.0) -> int:
  """Forward FLOPs of one image and one caption through both towers."""
  return image_flops(config, patch_dropout) + text_flops(config)


def train_flops_per_pair(config: "str | CLIPConfig", patch_dropout: float = 0.0) -> int:
  """Forward + backward (2x forward) = 3x forward."""
  return 3 * forward_flops_per_pair(config, patch_dropout)


def loss_flops(global_batch: int, embed_dim: int) -> int:
  """The B x B similarity matrix, forward and backward (3x)."""
  return 3 * 2 * global_batch * global_batch * embed_dim


def train_flops_per_step(config: "str | CLIPConfig", global_batch: int,
                         patch_dropout: float = 0.0) -> int:
  cfg = get_model_config(config)
  return (global_batch * train_flops_per_pair(cfg, patch_dropout)
          + loss_flops(global_batch, cfg.embed_dim))
