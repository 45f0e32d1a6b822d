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
_OPENAI_BLOCK_RENAMES = {openai: hf for hf, openai in _HF_BLOCK_RENAMES.items()}
_QKV = ("q", "k", "v")


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


def layer_norm_state(params: dict, prefix: str) -> dict:
  """The inverse of `layer_norm`: `{prefix}.weight` and `{prefix}.bias`."""
  return {prefix + ".weight": params["scale"], prefix + ".bias": params["bias"]}


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


def block_state(params: dict, prefix: str) -> dict:
  """The inverse of `block_params`: one block's OpenAI-named tensors (after `prefix`)."""
  qkv, out = params["attn"]["qkv"], params["attn"]["out"]
  width = qkv["kernel"].shape[0]
  mlp = params["mlp"]
  return {
      **layer_norm_state(params["ln_1"], prefix + "ln_1"),
      # [w, 3, heads, head_dim] -> torch's [3 * w, w], rows (q|k|v, head, head_dim).
      prefix + "attn.in_proj_weight": qkv["kernel"].transpose(1, 2, 3, 0).reshape(-1, width),
      prefix + "attn.in_proj_bias": qkv["bias"].reshape(-1),
      prefix + "attn.out_proj.weight": out["kernel"].reshape(-1, width).T,
      prefix + "attn.out_proj.bias": out["bias"],
      **layer_norm_state(params["ln_2"], prefix + "ln_2"),
      prefix + "mlp.c_fc.weight": mlp["c_fc"]["kernel"].T,
      prefix + "mlp.c_fc.bias": mlp["c_fc"]["bias"],
      prefix + "mlp.c_proj.weight": mlp["c_proj"]["kernel"].T,
      prefix + "mlp.c_proj.bias": mlp["c_proj"]["bias"],
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


def _block_tensors(state, prefix: str):
  """(block index, name inside the block, tensor) of every `{prefix}{i}.{name}` in `state`."""
  pattern = re.compile(re.escape(prefix) + r"(\d+)\.(.+)$")
  for key, value in state.items():
    if m := pattern.match(key):
      yield m.group(1), m.group(2), value


def _rename(name: str, renames: dict[str, str]) -> Optional[str]:
  """`name` with the first prefix of `renames` it starts with replaced; None if none."""
  for old, new in renames.items():
    if name.startswith(old + "."):
      return new + name[len(old):]
  return None


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

  def _outside_blocks(self, state, to: str) -> dict[str, np.ndarray]:
    """The tensors outside the blocks, renamed to layout `to` (the projection transposed)."""
    renames = [*self.hf_names.items(), self.hf_projection]
    if to == "hf":
      renames = [(openai, hf) for hf, openai in renames]
    projection = self.hf_projection[0 if to == "hf" else 1]
    return {new: state[old].T if new == projection else state[old] for old, new in renames}

  def hf_to_openai(self, state) -> dict[str, np.ndarray]:
    """The tower's tensors of a (checked) Hugging Face state dict, under OpenAI's names."""
    out = self._outside_blocks(state, to="openai")
    hf_prefix, openai_prefix = self.blocks["hf"], self.blocks["openai"]
    for i, rest, value in _block_tensors(state, hf_prefix):
      prefix = f"{openai_prefix}{i}."
      if rest.startswith("self_attn.q_proj."):  # fuse q, k, v as OpenAI's in_proj (rows q;k;v)
        kind = rest.rsplit(".", 1)[1]
        out[prefix + f"attn.in_proj_{kind}"] = np.concatenate(
            [state[f"{hf_prefix}{i}.self_attn.{n}_proj.{kind}"] for n in _QKV])
      elif (name := _rename(rest, _HF_BLOCK_RENAMES)) is not None:
        out[prefix + name] = value
    return out

  def openai_to_hf(self, state) -> dict[str, np.ndarray]:
    """The inverse of `hf_to_openai`: the tower's tensors of an OpenAI-layout state dict, under
    Hugging Face's names."""
    out = self._outside_blocks(state, to="hf")
    hf_prefix, openai_prefix = self.blocks["hf"], self.blocks["openai"]
    for i, rest, value in _block_tensors(state, openai_prefix):
      prefix = f"{hf_prefix}{i}."
      if rest.startswith("attn.in_proj_"):  # split OpenAI's fused in_proj (rows q;k;v)
        kind = rest[len("attn.in_proj_"):]
        out.update({prefix + f"self_attn.{n}_proj.{kind}": part
                    for n, part in zip(_QKV, np.split(value, 3))})
      elif (name := _rename(rest, _OPENAI_BLOCK_RENAMES)) is not None:
        out[prefix + name] = value
    return out

  def params(self, state, layers: int, heads: int) -> dict:
    """Our (unscanned) transformer params, resblocks_0..L-1, from a checked OpenAI-layout dict."""
    prefix = self.blocks["openai"]
    return {f"resblocks_{i}": block_params(state, f"{prefix}{i}.", heads) for i in range(layers)}

  def state(self, params: dict) -> dict:
    """The inverse of `params`: OpenAI-named tensors from unscanned transformer params."""
    prefix, state = self.blocks["openai"], {}
    for i in range(len(params)):
      state.update(block_state(params[f"resblocks_{i}"], f"{prefix}{i}."))
    return state
