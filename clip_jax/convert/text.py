"""The text tower's checkpoint keys in both layouts, and their mapping to `params["text"]`.

One text transformer serves every image family: OpenAI's and open_clip's names
(`token_embedding.weight`, `transformer.resblocks.N...`, `ln_final`, `text_projection`) and Hugging
Face CLIPModel's (`text_model...`, `text_projection.weight`).
"""
from __future__ import annotations

from typing import Optional

from clip_jax.convert import blocks
from clip_jax.models import CLIPConfig, TextConfig

TOWER = blocks.TransformerTower(
    blocks={"openai": "transformer.resblocks.", "hf": "text_model.encoder.layers."},
    hf_names={"text_model.embeddings.token_embedding.weight": "token_embedding.weight",
              "text_model.embeddings.position_embedding.weight": "positional_embedding",
              "text_model.final_layer_norm.weight": "ln_final.weight",
              "text_model.final_layer_norm.bias": "ln_final.bias"},
    hf_projection=("text_projection.weight", "text_projection"),
    dim_sources={
        "openai": {
            "text.width": [("token_embedding.weight", 1), ("positional_embedding", 1)],
            "text.vocab_size": [("token_embedding.weight", 0)],
            "text.context_length": [("positional_embedding", 0)],
            "text.mlp_hidden": [("transformer.resblocks.0.mlp.c_fc.weight", 0)],
            "embed_dim": [("text_projection", 1)],
        },
        "hf": {
            "text.width": [("text_model.embeddings.token_embedding.weight", 1)],
            "text.vocab_size": [("text_model.embeddings.token_embedding.weight", 0)],
            "text.context_length": [("text_model.embeddings.position_embedding.weight", 0)],
            "text.mlp_hidden": [("text_model.encoder.layers.0.mlp.fc1.weight", 0)],
            "embed_dim": [("text_projection.weight", 0)],
        },
    },
    layers_dim="text.layers")
# The sizes readable from the tensor shapes, and a (checked) HF state dict's text tower renamed
# (and back).
infer_dims = TOWER.infer_dims
hf_to_openai = TOWER.hf_to_openai
openai_to_hf = TOWER.openai_to_hf


def expected_shapes(config: CLIPConfig, layout: str) -> dict[str, tuple]:
  """Every text-tower key the model needs, with its shape, in the given layout."""
  t = config.text
  openai_shapes = {"token_embedding.weight": (t.vocab_size, t.width),
                   "positional_embedding": (t.context_length, t.width),
                   "ln_final.weight": (t.width,), "ln_final.bias": (t.width,),
                   "text_projection": (t.width, config.embed_dim)}
  return TOWER.shapes(openai_shapes, layout, t.layers, t.width, t.mlp_ratio)


def config_dims(config: CLIPConfig) -> dict[str, int]:
  """The sizes `infer_dims` reads, as the model config has them."""
  t = config.text
  return {"text.width": t.width, "text.vocab_size": t.vocab_size,
          "text.context_length": t.context_length, "text.layers": t.layers,
          "text.mlp_hidden": blocks.mlp_hidden(t.width, t.mlp_ratio)}


def tower_config(dims: dict[str, int], heads: Optional[int] = None) -> TextConfig:
  """The TextConfig of `infer_dims`'s sizes; heads default to width / 64 (OpenAI's rule)."""
  width = dims["text.width"]
  return TextConfig(context_length=dims["text.context_length"],
                    vocab_size=dims["text.vocab_size"], width=width, layers=dims["text.layers"],
                    heads=heads or max(1, width // 64),
                    mlp_ratio=blocks.mlp_ratio(dims["text.mlp_hidden"], width))


def to_params(state, config: CLIPConfig) -> dict:
  """`params["text"]` (unscanned: resblocks_0..L-1) from a checked OpenAI-layout state dict."""
  t = config.text
  return {
      "token_embedding": state["token_embedding.weight"],
      "positional_embedding": state["positional_embedding"],
      "transformer": TOWER.params(state, t.layers, t.heads),
      "ln_final": blocks.layer_norm(state, "ln_final"),
      "text_projection": state["text_projection"],
  }


def from_params(params: dict, config: CLIPConfig) -> dict:
  """The inverse of `to_params`: the text tower's OpenAI-layout tensors from unscanned params."""
  del config  # the tree has every size
  return {
      "token_embedding.weight": params["token_embedding"],
      "positional_embedding": params["positional_embedding"],
      **TOWER.state(params["transformer"]),
      **blocks.layer_norm_state(params["ln_final"], "ln_final"),
      "text_projection": params["text_projection"],
  }
