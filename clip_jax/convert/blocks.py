"""What the transformer towers share: one block's keys in both layouts, and `TransformerTower`,
the key names of a tower of blocks (the text tower, the ViT), with what they give.

OpenAI / open_clip name a block's tensors `ln_1`, `attn.in_proj_*` (q, k and v fused),
`attn.out_proj`, `ln_2`, `mlp.c_fc`, `mlp.c_proj`; Hugging Face's CLIPModel names them
`layer_norm1`, `self_attn.{q,k,v,out}_proj`, `layer_norm2`, `mlp.fc1`, `mlp.fc2`.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Optional

import numpy as np

_HF_BLOCK_RENAMES = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                     "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}


def mlp_hidden(width: int, ratio: float) -> int:
  """The MLP's hidden width, as layers.MLP computes it."""
  return int(width * ratio)


def mlp_ratio(hidden: int, width: int) -> float:
  """An mlp_ratio whose int(width * ratio) gives back `hidden` exactly (as layers.MLP computes)."""
  ratio = hidden / width
  return ratio if mlp_hidden(width, ratio) == hidden else (hidden + 0.5) / width


def block_shapes(prefix: str, width: int, hidden: int, layout: str) -> dict[str, tuple]:
  """A block's keys (after `prefix`) with their shapes, in the given layout."""
  w, m = width, hidden
  if layout == "openai":
    shapes = {"ln_1.weight": (w,), "ln_1.bias": (w,),
              "attn.in_proj_weight": (3 * w, w), "attn.in_proj_bias": (3 * w,),
              "attn.out_proj.weight": (w, w), "attn.out_proj.bias": (w,),
              "ln_2.weight": (w,), "ln_2.bias": (w,),
              "mlp.c_fc.weight": (m, w), "mlp.c_fc.bias": (m,),
              "mlp.c_proj.weight": (w, m), "mlp.c_proj.bias": (w,)}
  else:
    shapes = {f"self_attn.{n}_proj.{p}": (w, w) if p == "weight" else (w,)
              for n in ("q", "k", "v", "out") for p in ("weight", "bias")}
    shapes.update({"layer_norm1.weight": (w,), "layer_norm1.bias": (w,),
                   "layer_norm2.weight": (w,), "layer_norm2.bias": (w,),
                   "mlp.fc1.weight": (m, w), "mlp.fc1.bias": (m,),
                   "mlp.fc2.weight": (w, m), "mlp.fc2.bias": (w,)})
  return {prefix + k: v for k, v in shapes.items()}


def layer_norm(state, prefix: str) -> dict:
  return {"scale": state[prefix + ".weight"], "bias": state[prefix + ".bias"]}


def block_params(state, prefix: str, heads: int) -> dict:
  """Our params of one (OpenAI-named) block."""
  w = state[prefix + "ln_1.weight"].shape[0]
  hd = w // heads
  in_w, in_b = state[prefix + "attn.in_proj_weight"], state[prefix + "attn.in_proj_bias"]
  out_w = state[prefix + "attn.out_proj.weight"]
  return {
      "ln_1": layer_norm(state, prefix + "ln_1"),
      "attn": {
          # torch computes x @ W.T with W rows ordered (q|k|v, head, head_dim).
          "qkv": {"kernel": in_w.reshape(3, heads, hd, w).transpose(3, 0, 1, 2),
                  "bias": in_b.reshape(3, heads, hd)},
          "out": {"kernel": out_w.T.reshape(heads, hd, w),
                  "bias": state[prefix + "attn.out_proj.bias"]},
      },
      "ln_2": layer_norm(state, prefix + "ln_2"),
      "mlp": {"c_fc": {"kernel": state[prefix + "mlp.c_fc.weight"].T,
                       "bias": state[prefix + "mlp.c_fc.bias"]},
              "c_proj": {"kernel": state[prefix + "mlp.c_proj.weight"].T,
                         "bias": state[prefix + "mlp.c_proj.bias"]}},
  }


def _read_dims(state, sources: dict[str, list[tuple[str, int]]]) -> dict[str, int]:
  """{dim: size} from `sources` ({dim: [(key, axis), ...]}, the first key present wins)."""
  dims = {}
  for name, keys in sources.items():
    for key, axis in keys:
      if key in state and np.ndim(state[key]) > axis:
        dims[name] = int(np.shape(state[key])[axis])
        break
  return dims


def _count_blocks(state, prefix: str) -> Optional[int]:
  """How many blocks `{prefix}{i}.` the state dict holds (the highest i + 1), or None."""
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
  found = [int(m.group(1)) for m in map(pattern.match, state) if m]
  return max(found) + 1 if found else None


@dataclasses.dataclass(frozen=True)
class TransformerTower:
  """A tower of blocks' key names in both layouts ("openai", "hf").

  blocks: the blocks' name prefix per layout; block i is `{prefix}{i}.`.
  hf_names: {Hugging Face name: OpenAI name} of the tensors outside the blocks (same shapes).
  hf_projection: (Hugging Face name, OpenAI name) of the projection: nn.Linear stores
    [out, in], OpenAI's is the matrix of x @ proj.
  dim_sources: per layout, where each size can be read off a checkpoint:
    {dim: [(key, axis), ...]}, the first key present wins.
  layers_dim: the name of the size the block count gives.
  """
  blocks: dict[str, str]
  hf_names: dict[str, str]
  hf_projection: tuple[str, str]
  dim_sources: dict[str, dict[str, list[tuple[str, int]]]]
  layers_dim: str

  def shapes(self, openai_shapes: dict[str, tuple], layout: str, layers: int, width: int,
             ratio: float) -> dict[str, tuple]:
    """Every key of the tower with its shape, from those outside the blocks in OpenAI's names."""
    if layout == "hf":
      shapes = {hf: openai_shapes[openai] for hf, openai in self.hf_names.items()}
      hf_projection, openai_projection = self.hf_projection
      shapes[hf_projection] = openai_shapes[openai_projection][::-1]
    else:
      shapes = dict(openai_shapes)
    for i in range(layers):
      shapes.update(block_shapes(f"{self.blocks[layout]}{i}.", width, mlp_hidden(width, ratio),
                                 layout))
    return shapes

  def infer_dims(self, state, layout: str) -> dict[str, int]:
    """The tower's sizes readable from the tensor shapes (those whose keys are present)."""
    dims = _read_dims(state, self.dim_sources[layout])
    if layers := _count_blocks(state, self.blocks[layout]):
      dims[self.layers_dim] = layers
    return dims

  def hf_to_openai(self, state) -> dict[str, np.ndarray]:
    """The tower's tensors of a (checked) Hugging Face state dict, under OpenAI's names."""
    out = {openai: state[hf] for hf, openai in self.hf_names.items()}
    hf_projection, openai_projection = self.hf_projection
    out[openai_projection] = state[hf_projection].T
    hf_prefix, openai_prefix = self.blocks["hf"], self.blocks["openai"]
    pattern = re.compile(re.escape(hf_prefix) + r"(\d+)\.(.+)$")
    for key, value in state.items():
      if not (m := pattern.match(key)):
        continue
      i, rest = m.groups()
      prefix = f"{openai_prefix}{i}."
      if rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
        kind = rest.rsplit(".", 1)[1]
        if rest.startswith("self_attn.q_proj"):  # fuse q, k, v as OpenAI's in_proj (rows q;k;v)
          hf = f"{hf_prefix}{i}.self_attn.{{}}_proj.{kind}"
          out[prefix + f"attn.in_proj_{kind}"] = np.concatenate(
              [state[hf.format(n)] for n in ("q", "k", "v")])
        continue
      for old, new in _HF_BLOCK_RENAMES.items():
        if rest.startswith(old + "."):
          out[prefix + new + rest[len(old):]] = value
          break
    return out

  def params(self, state, layers: int, heads: int) -> dict:
    """Our (unscanned) transformer params, resblocks_0..L-1, from a checked OpenAI-layout dict."""
    prefix = self.blocks["openai"]
    return {f"resblocks_{i}": block_params(state, f"{prefix}{i}.", heads) for i in range(layers)}
