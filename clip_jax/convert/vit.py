"""The ViT image tower's checkpoint keys in both layouts, and their mapping to `params["visual"]`.

OpenAI's and open_clip's names: `visual.conv1.weight`, `visual.class_embedding`,
`visual.positional_embedding`, `visual.ln_pre`, `visual.transformer.resblocks.N...`,
`visual.ln_post`, `visual.proj`; Hugging Face CLIPModel's: `vision_model...`,
`visual_projection.weight`.

An image family's module (see `clip_jax.convert.IMAGE_FAMILIES`) has what this one has:
CONFIG_TYPE, KEY_PREFIXES, expected_shapes, infer_dims, config_dims, tower_config, to_params and
its inverse from_params (for clip_jax.export), and hf_to_openai / openai_to_hf where Hugging Face
has the family.
"""
from __future__ import annotations

from typing import Optional

from clip_jax.convert import blocks
from clip_jax.models import CLIPConfig, VisionConfig

CONFIG_TYPE = VisionConfig  # the `vision` config of the models this family converts
# Key prefixes that only this family's checkpoints have, per layout.
KEY_PREFIXES = {"openai": ("visual.class_embedding", "visual.transformer."),
                "hf": ("vision_model.",)}
TOWER = blocks.TransformerTower(
    blocks={"openai": "visual.transformer.resblocks.", "hf": "vision_model.encoder.layers."},
    hf_names={"vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
              "vision_model.embeddings.class_embedding": "visual.class_embedding",
              "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
              "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
              "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
              "vision_model.post_layernorm.weight": "visual.ln_post.weight",
              "vision_model.post_layernorm.bias": "visual.ln_post.bias"},
    hf_projection=("visual_projection.weight", "visual.proj"),
    dim_sources={
        "openai": {
            "vision.width": [("visual.conv1.weight", 0)],
            "vision.patch_size": [("visual.conv1.weight", 2)],
            "vision.num_tokens": [("visual.positional_embedding", 0)],
            "vision.mlp_hidden": [("visual.transformer.resblocks.0.mlp.c_fc.weight", 0)],
            "embed_dim": [("visual.proj", 1)],
        },
        "hf": {
            "vision.width": [("vision_model.embeddings.patch_embedding.weight", 0)],
            "vision.patch_size": [("vision_model.embeddings.patch_embedding.weight", 2)],
            "vision.num_tokens": [("vision_model.embeddings.position_embedding.weight", 0)],
            "vision.mlp_hidden": [("vision_model.encoder.layers.0.mlp.fc1.weight", 0)],
            "embed_dim": [("visual_projection.weight", 0)],
        },
    },
    layers_dim="vision.layers")
# The sizes readable from the tensor shapes, and a (checked) HF state dict's image tower renamed
# (and back).
infer_dims = TOWER.infer_dims
hf_to_openai = TOWER.hf_to_openai
openai_to_hf = TOWER.openai_to_hf


def expected_shapes(config: CLIPConfig, layout: str) -> dict[str, tuple]:
  """Every image-tower key the model needs, with its shape, in the given layout."""
  v, p = config.vision, config.vision.patch_size
  openai_shapes = {"visual.conv1.weight": (v.width, 3, p, p),
                   "visual.class_embedding": (v.width,),
                   "visual.positional_embedding": (v.num_tokens, v.width),
                   "visual.ln_pre.weight": (v.width,), "visual.ln_pre.bias": (v.width,),
                   "visual.ln_post.weight": (v.width,), "visual.ln_post.bias": (v.width,),
                   "visual.proj": (v.width, config.embed_dim)}
  return TOWER.shapes(openai_shapes, layout, v.layers, v.width, v.mlp_ratio)


def config_dims(config: CLIPConfig) -> dict[str, int]:
  """The sizes `infer_dims` reads, as the model config has them."""
  v = config.vision
  return {"vision.width": v.width, "vision.patch_size": v.patch_size,
          "vision.num_tokens": v.num_tokens, "vision.layers": v.layers,
          "vision.mlp_hidden": blocks.mlp_hidden(v.width, v.mlp_ratio)}


def tower_config(dims: dict[str, int], heads: Optional[int] = None) -> VisionConfig:
  """The VisionConfig of `infer_dims`'s sizes; heads default to width / 64 (OpenAI's rule)."""
  grid = int(round((dims["vision.num_tokens"] - 1) ** 0.5))
  if grid * grid + 1 != dims["vision.num_tokens"]:
    raise ValueError(f"the image position embedding has {dims['vision.num_tokens']} rows, not a "
                     "square grid plus a class token")
  width, patch_size = dims["vision.width"], dims["vision.patch_size"]
  return VisionConfig(image_size=grid * patch_size, patch_size=patch_size, width=width,
                      layers=dims["vision.layers"], heads=heads or max(1, width // 64),
                      mlp_ratio=blocks.mlp_ratio(dims["vision.mlp_hidden"], width))


def to_params(state, config: CLIPConfig) -> dict:
  """`params["visual"]` (unscanned: resblocks_0..L-1) from a checked OpenAI-layout state dict."""
  v = config.vision
  return {
      "conv1": state["visual.conv1.weight"].transpose(2, 3, 1, 0),  # [w,3,p,p] -> [p,p,3,w]
      "class_embedding": state["visual.class_embedding"],
      "positional_embedding": state["visual.positional_embedding"],
      "ln_pre": blocks.layer_norm(state, "visual.ln_pre"),
      "transformer": TOWER.params(state, v.layers, v.heads),
      "ln_post": blocks.layer_norm(state, "visual.ln_post"),
      "proj": state["visual.proj"],
  }


def from_params(params: dict, config: CLIPConfig) -> dict:
  """The inverse of `to_params`: the image tower's OpenAI-layout tensors from unscanned params."""
  del config  # the tree has every size
  return {
      "visual.conv1.weight": params["conv1"].transpose(3, 2, 0, 1),  # [p,p,3,w] -> [w,3,p,p]
      "visual.class_embedding": params["class_embedding"],
      "visual.positional_embedding": params["positional_embedding"],
      **blocks.layer_norm_state(params["ln_pre"], "visual.ln_pre"),
      **TOWER.state(params["transformer"]),
      **blocks.layer_norm_state(params["ln_post"], "visual.ln_post"),
      "visual.proj": params["proj"],
  }
