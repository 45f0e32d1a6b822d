"""Import CLIP weights from OpenAI, open_clip or Hugging Face checkpoints.

  python -m clip_jax.convert --source openai --input ViT-B-32.pt --model vitb32 --output /ckpt/b32
  python -m clip_jax.convert --source hf --input model.safetensors --output /ckpt/b32

Reads OpenAI TorchScript archives, plain PyTorch state dicts (.pt/.pth/.bin, loaded with
`weights_only=True`, so no arbitrary object is ever unpickled), .safetensors files and
sharded Hugging Face checkpoints (`*.index.json` and the shards its weight_map lists); writes
`DIR/model_config.json` + `DIR/params/` (see `clip_jax.params_io`), atomically.

Two key layouts are understood: OpenAI's (also open_clip's: `visual.conv1.weight`,
`transformer.resblocks.N...`) and Hugging Face `CLIPModel`'s (`vision_model...`,
`text_model...`). The checkpoint is checked against the model before anything is written:
missing, unexpected and mis-shaped keys are all reported in one ValueError. Without
`--model`, the architecture is read off the tensor shapes (heads from a `config.json`
beside the file, else width / 64 as in OpenAI's models).

PyTorch is needed only to read .pt/.bin files, and is imported only then.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import re
import sys
import zipfile
from typing import Optional

import flax.linen as nn
import jax
import numpy as np
from absl import logging

from clip_jax.params_io import save_params
from clip_jax.models import (MODEL_CONFIGS, CLIPConfig, TextConfig, VisionConfig, abstract_params,
                             create_model, get_model_config, scan_params)

SOURCES = ("openai", "open_clip", "hf")
# OpenAI's weights use quick_gelu; open_clip's own (LAION, DataComp) use exact gelu unless the
# model name ends in -quickgelu; transformers' CLIPConfig defaults to quick_gelu.
DEFAULT_ACT = {"openai": "quick_gelu", "open_clip": "gelu", "hf": "quick_gelu"}
HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
# Buffers that are not parameters: OpenAI's TorchScript metadata, masks, HF position ids.
_IGNORED = re.compile(r"^(input_resolution|context_length|vocab_size)$|(^|\.)attn_mask$|"
                      r"(^|\.)position_ids$")
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "params")
_MAX_LISTED = 20


# ------------------------------------------------------------------------------ reading

def _is_torchscript(path: pathlib.Path) -> bool:
  """TorchScript archives are zips with code/ and constants.pkl; torch.save zips have neither."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def _import_torch(path):
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f"reading {path} needs PyTorch (pip install 'clip_jax[convert]'), or convert "
                     "the file to .safetensors") from e
  return torch


def _torch_to_numpy(tensor) -> np.ndarray:
  if tensor.is_floating_point():
    return tensor.detach().float().cpu().numpy()  # float16/bfloat16 -> float32
  return tensor.detach().cpu().numpy()


def _unwrap(obj, path) -> dict:
  """Finds the flat {name: tensor} dict inside common training-checkpoint wrappers."""
  for _ in range(3):
    if not isinstance(obj, dict):
      break
    if any(isinstance(k, str) and "." in k for k in obj):
      break
    inner = [k for k in _WRAPPERS if isinstance(obj.get(k), dict)]
    if not inner:
      break
    obj = obj[inner[0]]
  if not isinstance(obj, dict) or not obj:
    raise ValueError(f"{path} does not hold a state dict (a non-empty mapping of names to tensors)")
  keys = list(obj)
  for prefix in ("module.", "_orig_mod."):  # DistributedDataParallel / torch.compile wrappers
    if all(isinstance(k, str) and k.startswith(prefix) for k in keys):
      obj = {k[len(prefix):]: v for k, v in obj.items()}
  return obj


def read_sharded(index_path: pathlib.Path) -> dict[str, np.ndarray]:
  """The state dict of a sharded checkpoint: every shard named in the index's weight_map."""
  try:
    weight_map = json.loads(index_path.read_text()).get("weight_map")
  except (json.JSONDecodeError, AttributeError) as e:
    raise ValueError(f"--input {index_path} is not a sharded checkpoint index: {e}") from e
  if not isinstance(weight_map, dict) or not weight_map:
    raise ValueError(f"--input {index_path} has no weight_map (a sharded checkpoint index maps "
                     "each tensor name to its shard file)")
  state = {}
  for shard in sorted(set(weight_map.values())):
    shard_path = index_path.parent / shard
    if not shard_path.is_file():
      raise ValueError(f"{index_path}: shard {shard} (in its weight_map) is missing")
    state.update(read_state_dict(shard_path))
  missing = sorted(k for k in weight_map if k not in state)
  if missing:
    raise ValueError(f"{index_path}: {len(missing)} tensors of its weight_map are in none of "
                     f"its shards, e.g. {missing[:3]}")
  return state


def read_state_dict(path) -> dict[str, np.ndarray]:
  """{name: numpy array} from a .safetensors file, a TorchScript archive, a torch.save file or
  a sharded checkpoint's index (*.index.json)."""
  path = pathlib.Path(path)
  if not path.is_file():
    raise ValueError(f"--input {path} is not a file")
  if path.name.endswith(".index.json"):
    return read_sharded(path)
  if path.suffix == ".safetensors":
    from safetensors import safe_open  # pylint: disable=import-outside-toplevel
    state = {}
    # The flax backend reads bfloat16 too (plain numpy cannot), and needs no torch.
    with safe_open(str(path), framework="flax") as f:
      for key in f.keys():
        array = f.get_tensor(key)
        floating = np.issubdtype(array.dtype, np.floating) or array.dtype.name == "bfloat16"
        state[key] = np.asarray(array, np.float32 if floating else array.dtype)
    return state
  torch = _import_torch(path)
  if _is_torchscript(path):
    module = torch.jit.load(str(path), map_location="cpu")
    raw = module.state_dict()
  else:
    try:
      raw = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:  # pylint: disable=broad-except
      # weights_only refuses pickled code; never fall back to a full unpickle.
      reason = " ".join(str(e).split())[:300]
      raise ValueError(f"cannot read {path} as a PyTorch state dict with weights_only=True "
                       f"(it must hold only tensors and plain containers): {reason}") from e
  state = _unwrap(raw, path)
  out = {}
  for key, value in state.items():
    if isinstance(value, torch.Tensor):
      out[str(key)] = _torch_to_numpy(value)
    elif isinstance(value, (int, float)):
      out[str(key)] = np.asarray(value)
    else:
      raise ValueError(f"{path}: entry {key!r} is a {type(value).__name__}, not a tensor")
  return out


# ------------------------------------------------------------------------------ layouts

def detect_layout(state) -> str:
  """"hf" for transformers CLIPModel key names, "openai" for OpenAI / open_clip ones."""
  if any(k.startswith(("vision_model.", "text_model.")) for k in state):
    return "hf"
  if any(k.startswith("visual.") for k in state) or "token_embedding.weight" in state:
    return "openai"
  raise ValueError(f"unrecognised checkpoint keys (e.g. {sorted(state)[:3]}): expected OpenAI / "
                   "open_clip names (visual.conv1.weight, ...) or Hugging Face CLIPModel names "
                   "(vision_model..., text_model...)")


def _block_shapes(prefix: str, width: int, hidden: int, layout: str) -> dict[str, tuple]:
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


def _mlp_hidden(width: int, ratio: float) -> int:
  return int(width * ratio)


def expected_shapes(config: CLIPConfig, layout: str) -> dict[str, tuple]:
  """Every checkpoint key the model needs, with its shape, in the given layout."""
  v, t, e = config.vision, config.text, config.embed_dim
  vw, tw, p = v.width, t.width, v.patch_size
  vm, tm = _mlp_hidden(vw, v.mlp_ratio), _mlp_hidden(tw, t.mlp_ratio)
  if layout == "openai":
    shapes = {"visual.conv1.weight": (vw, 3, p, p), "visual.class_embedding": (vw,),
              "visual.positional_embedding": (v.num_tokens, vw),
              "visual.ln_pre.weight": (vw,), "visual.ln_pre.bias": (vw,),
              "visual.ln_post.weight": (vw,), "visual.ln_post.bias": (vw,),
              "visual.proj": (vw, e),
              "token_embedding.weight": (t.vocab_size, tw),
              "positional_embedding": (t.context_length, tw),
              "ln_final.weight": (tw,), "ln_final.bias": (tw,),
              "text_projection": (tw, e), "logit_scale": ()}
    vision_block, text_block = "visual.transformer.resblocks.{}.", "transformer.resblocks.{}."
  elif layout == "hf":
    shapes = {"vision_model.embeddings.patch_embedding.weight": (vw, 3, p, p),
              "vision_model.embeddings.class_embedding": (vw,),
              "vision_model.embeddings.position_embedding.weight": (v.num_tokens, vw),
              "vision_model.pre_layrnorm.weight": (vw,), "vision_model.pre_layrnorm.bias": (vw,),
              "vision_model.post_layernorm.weight": (vw,),
              "vision_model.post_layernorm.bias": (vw,),
              "visual_projection.weight": (e, vw),
              "text_model.embeddings.token_embedding.weight": (t.vocab_size, tw),
              "text_model.embeddings.position_embedding.weight": (t.context_length, tw),
              "text_model.final_layer_norm.weight": (tw,),
              "text_model.final_layer_norm.bias": (tw,),
              "text_projection.weight": (e, tw), "logit_scale": ()}
    vision_block, text_block = "vision_model.encoder.layers.{}.", "text_model.encoder.layers.{}."
  else:
    raise ValueError(f"unknown layout {layout!r}; known: openai, hf")
  if config.logit_bias_init is not None:
    shapes["logit_bias"] = ()
  for i in range(v.layers):
    shapes.update(_block_shapes(vision_block.format(i), vw, vm, layout))
  for i in range(t.layers):
    shapes.update(_block_shapes(text_block.format(i), tw, tm, layout))
  return shapes


# Where each architecture number can be read off a checkpoint: (key, axis), first present wins.
_DIM_SOURCES = {
    "openai": {
        "vision.width": [("visual.conv1.weight", 0)],
        "vision.patch_size": [("visual.conv1.weight", 2)],
        "vision.num_tokens": [("visual.positional_embedding", 0)],
        "vision.mlp_hidden": [("visual.transformer.resblocks.0.mlp.c_fc.weight", 0)],
        "text.width": [("token_embedding.weight", 1), ("positional_embedding", 1)],
        "text.vocab_size": [("token_embedding.weight", 0)],
        "text.context_length": [("positional_embedding", 0)],
        "text.mlp_hidden": [("transformer.resblocks.0.mlp.c_fc.weight", 0)],
        "embed_dim": [("visual.proj", 1), ("text_projection", 1)],
    },
    "hf": {
        "vision.width": [("vision_model.embeddings.patch_embedding.weight", 0)],
        "vision.patch_size": [("vision_model.embeddings.patch_embedding.weight", 2)],
        "vision.num_tokens": [("vision_model.embeddings.position_embedding.weight", 0)],
        "vision.mlp_hidden": [("vision_model.encoder.layers.0.mlp.fc1.weight", 0)],
        "text.width": [("text_model.embeddings.token_embedding.weight", 1)],
        "text.vocab_size": [("text_model.embeddings.token_embedding.weight", 0)],
        "text.context_length": [("text_model.embeddings.position_embedding.weight", 0)],
        "text.mlp_hidden": [("text_model.encoder.layers.0.mlp.fc1.weight", 0)],
        "embed_dim": [("visual_projection.weight", 0), ("text_projection.weight", 0)],
    },
}
_LAYER_PATTERNS = {
    "openai": {"vision.layers": r"^visual\.transformer\.resblocks\.(\d+)\.",
               "text.layers": r"^transformer\.resblocks\.(\d+)\."},
    "hf": {"vision.layers": r"^vision_model\.encoder\.layers\.(\d+)\.",
           "text.layers": r"^text_model\.encoder\.layers\.(\d+)\."},
}


def infer_dims(state, layout: str) -> dict[str, int]:
  """Architecture numbers readable from the tensor shapes (those whose keys are present)."""
  dims = {}
  for name, sources in _DIM_SOURCES[layout].items():
    for key, axis in sources:
      if key in state and np.ndim(state[key]) > axis:
        dims[name] = int(np.shape(state[key])[axis])
        break
  for name, pattern in _LAYER_PATTERNS[layout].items():
    found = [int(m.group(1)) for m in map(re.compile(pattern).match, state) if m]
    if found:
      dims[name] = max(found) + 1
  return dims


def _config_dims(config: CLIPConfig) -> dict[str, int]:
  v, t = config.vision, config.text
  return {"vision.width": v.width, "vision.patch_size": v.patch_size,
          "vision.num_tokens": v.num_tokens, "vision.layers": v.layers,
          "vision.mlp_hidden": _mlp_hidden(v.width, v.mlp_ratio),
          "text.width": t.width, "text.vocab_size": t.vocab_size,
          "text.context_length": t.context_length, "text.layers": t.layers,
          "text.mlp_hidden": _mlp_hidden(t.width, t.mlp_ratio), "embed_dim": config.embed_dim}


def _ratio(hidden: int, width: int) -> float:
  """An mlp_ratio whose int(width * ratio) gives back `hidden` exactly (as layers.MLP computes)."""
  ratio = hidden / width
  return ratio if _mlp_hidden(width, ratio) == hidden else (hidden + 0.5) / width


def config_from_dims(dims: dict[str, int], *, vision_heads: Optional[int] = None,
                     text_heads: Optional[int] = None, **fields) -> CLIPConfig:
  """A CLIPConfig from `infer_dims`; named after a known variant when the architecture matches."""
  needed = sorted(set(_config_dims(MODEL_CONFIGS["tiny"])) - set(dims))
  if needed:
    raise ValueError(f"cannot infer the architecture: no tensor gives {needed}; pass --model")
  grid = int(round((dims["vision.num_tokens"] - 1) ** 0.5))
  if grid * grid + 1 != dims["vision.num_tokens"]:
    raise ValueError(f"the image position embedding has {dims['vision.num_tokens']} rows, not a "
                     "square grid plus a class token")
  vw, tw = dims["vision.width"], dims["text.width"]
  vision_ratio = _ratio(dims["vision.mlp_hidden"], vw)
  text_ratio = _ratio(dims["text.mlp_hidden"], tw)
  vision = VisionConfig(image_size=grid * dims["vision.patch_size"],
                        patch_size=dims["vision.patch_size"], width=vw,
                        layers=dims["vision.layers"], heads=vision_heads or max(1, vw // 64),
                        mlp_ratio=vision_ratio)
  text = TextConfig(context_length=dims["text.context_length"],
                    vocab_size=dims["text.vocab_size"], width=tw, layers=dims["text.layers"],
                    heads=text_heads or max(1, tw // 64), mlp_ratio=text_ratio)
  config = CLIPConfig(embed_dim=dims["embed_dim"], vision=vision, text=text, **fields)
  for name, known in MODEL_CONFIGS.items():
    if (known.vision, known.text, known.embed_dim) == (vision, text, config.embed_dim):
      return config.replace(name=name)
  return config


def check_dims(dims: dict[str, int], config: CLIPConfig, path) -> None:
  want = _config_dims(config)
  wrong = [f"{k} {dims[k]} (model: {want[k]})" for k in want if k in dims and dims[k] != want[k]]
  if wrong:
    raise ValueError(f"{path} does not fit model {config.name!r}: " + ", ".join(wrong)
                     + "; pass the matching --model, or leave --model out to infer it")


def _listed(keys) -> str:
  keys = list(keys)
  more = f" ... and {len(keys) - _MAX_LISTED} more" if len(keys) > _MAX_LISTED else ""
  return ", ".join(keys[:_MAX_LISTED]) + more


def check_keys(state, config: CLIPConfig, layout: str, path) -> None:
  """One ValueError listing every missing, unexpected and mis-shaped key, if there are any."""
  want = expected_shapes(config, layout)
  have = {k for k in state if not _IGNORED.search(k)}
  missing = sorted(set(want) - have)
  unexpected = sorted(have - set(want))
  misshaped = sorted(f"{k} {tuple(np.shape(state[k]))} (expected {want[k]})"
                     for k in set(want) & have
                     if tuple(np.shape(state[k])) != want[k]
                     and not (want[k] == () and np.size(state[k]) == 1))
  problems = []
  if missing:
    problems.append(f"missing keys: {_listed(missing)}")
  if unexpected:
    problems.append(f"unexpected keys: {_listed(unexpected)}")
  if misshaped:
    problems.append(f"mis-shaped keys: {_listed(misshaped)}")
  if problems:
    raise ValueError(f"{path} does not match model {config.name!r} ({layout} layout): "
                     + "; ".join(problems))


# ------------------------------------------------------------------------------ mapping

def hf_to_openai(state) -> dict[str, np.ndarray]:
  """Renames a (checked) Hugging Face CLIPModel state dict to OpenAI's names and layouts."""
  out = {}
  block = re.compile(r"^(vision_model|text_model)\.encoder\.layers\.(\d+)\.(.+)$")
  renames = {
      "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
      "vision_model.embeddings.class_embedding": "visual.class_embedding",
      "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
      "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",
      "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
      "vision_model.post_layernorm.weight": "visual.ln_post.weight",
      "vision_model.post_layernorm.bias": "visual.ln_post.bias",
      "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
      "text_model.embeddings.position_embedding.weight": "positional_embedding",
      "text_model.final_layer_norm.weight": "ln_final.weight",
      "text_model.final_layer_norm.bias": "ln_final.bias",
      "logit_scale": "logit_scale", "logit_bias": "logit_bias",
  }
  block_renames = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc",
                   "mlp.fc2": "mlp.c_proj", "self_attn.out_proj": "attn.out_proj"}
  for key, value in state.items():
    if key in renames:
      out[renames[key]] = value
    elif key == "visual_projection.weight":
      out["visual.proj"] = value.T  # nn.Linear stores [out, in]; OpenAI's proj is x @ proj
    elif key == "text_projection.weight":
      out["text_projection"] = value.T
    elif m := block.match(key):
      tower, i, rest = m.groups()
      tower_prefix = "visual.transformer" if tower == "vision_model" else "transformer"
      prefix = f"{tower_prefix}.resblocks.{i}."
      if rest.startswith(("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")):
        kind = rest.rsplit(".", 1)[1]
        if rest.startswith("self_attn.q_proj"):  # fuse q, k, v as OpenAI's in_proj (rows q;k;v)
          hf = f"{tower}.encoder.layers.{i}.self_attn.{{}}_proj.{kind}"
          out[prefix + f"attn.in_proj_{kind}"] = np.concatenate(
              [state[hf.format(n)] for n in ("q", "k", "v")])
        continue
      for old, new in block_renames.items():
        if rest.startswith(old + "."):
          out[prefix + new + rest[len(old):]] = value
          break
  return out


def _ln(state, prefix):
  return {"scale": state[prefix + ".weight"], "bias": state[prefix + ".bias"]}


def _block(state, prefix: str, heads: int) -> dict:
  w = state[prefix + "ln_1.weight"].shape[0]
  hd = w // heads
  in_w, in_b = state[prefix + "attn.in_proj_weight"], state[prefix + "attn.in_proj_bias"]
  out_w = state[prefix + "attn.out_proj.weight"]
  return {
      "ln_1": _ln(state, prefix + "ln_1"),
      "attn": {
          # torch computes x @ W.T with W rows ordered (q|k|v, head, head_dim).
          "qkv": {"kernel": in_w.reshape(3, heads, hd, w).transpose(3, 0, 1, 2),
                  "bias": in_b.reshape(3, heads, hd)},
          "out": {"kernel": out_w.T.reshape(heads, hd, w),
                  "bias": state[prefix + "attn.out_proj.bias"]},
      },
      "ln_2": _ln(state, prefix + "ln_2"),
      "mlp": {"c_fc": {"kernel": state[prefix + "mlp.c_fc.weight"].T,
                       "bias": state[prefix + "mlp.c_fc.bias"]},
              "c_proj": {"kernel": state[prefix + "mlp.c_proj.weight"].T,
                         "bias": state[prefix + "mlp.c_proj.bias"]}},
  }


def openai_to_params(state, config: CLIPConfig) -> dict:
  """Our params tree (unscanned: resblocks_0..L-1) from a checked OpenAI-layout state dict."""
  v, t = config.vision, config.text
  params = {
      "visual": {
          "conv1": state["visual.conv1.weight"].transpose(2, 3, 1, 0),  # [w,3,p,p] -> [p,p,3,w]
          "class_embedding": state["visual.class_embedding"],
          "positional_embedding": state["visual.positional_embedding"],
          "ln_pre": _ln(state, "visual.ln_pre"),
          "transformer": {f"resblocks_{i}": _block(state, f"visual.transformer.resblocks.{i}.",
                                                    v.heads) for i in range(v.layers)},
          "ln_post": _ln(state, "visual.ln_post"),
          "proj": state["visual.proj"],
      },
      "text": {
          "token_embedding": state["token_embedding.weight"],
          "positional_embedding": state["positional_embedding"],
          "transformer": {f"resblocks_{i}": _block(state, f"transformer.resblocks.{i}.", t.heads)
                          for i in range(t.layers)},
          "ln_final": _ln(state, "ln_final"),
          "text_projection": state["text_projection"],
      },
      "logit_scale": np.asarray(state["logit_scale"], np.float32).reshape(()),
  }
  if config.logit_bias_init is not None:
    params["logit_bias"] = np.asarray(state["logit_bias"], np.float32).reshape(())
  return params


def _check_tree(params, config: CLIPConfig) -> None:
  """The mapped tree must have exactly the model's parameter paths and shapes."""
  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in leaves}
  want = flat(nn.meta.unbox(abstract_params(create_model(config.replace(scan_layers=True)))))
  have = flat(params)
  if want != have:
    diff = sorted(f"{k}: {have.get(k)} vs model {want.get(k)}"
                  for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise ValueError(f"converted params do not match model {config.name!r}: {_listed(diff)}")


# ------------------------------------------------------------------------------ entry points

def _sidecar_config(path: pathlib.Path, layout: str) -> dict:
  """Hints from a config file beside the weights (HF config.json, open_clip_config.json)."""
  hints = {}
  hf_file, oc_file = path.parent / "config.json", path.parent / "open_clip_config.json"
  if layout == "hf" and hf_file.is_file():
    cfg = json.loads(hf_file.read_text())
    vision, text = cfg.get("vision_config", {}), cfg.get("text_config", {})
    acts = {c.get("hidden_act", "quick_gelu") for c in (vision, text)}
    if len(acts) == 1 and next(iter(acts)) in HF_ACTS:
      hints["act"] = HF_ACTS[acts.pop()]
    elif acts:
      raise ValueError(f"{hf_file}: hidden_act {sorted(acts)} not supported; known: "
                       f"{sorted(HF_ACTS)} (one for both towers)")
    hints["vision_heads"] = vision.get("num_attention_heads")
    hints["text_heads"] = text.get("num_attention_heads")
    eps = {c.get("layer_norm_eps") for c in (vision, text)} - {None}
    if len(eps) == 1:
      hints["ln_eps"] = eps.pop()
  elif layout == "openai" and oc_file.is_file():
    model_cfg = json.loads(oc_file.read_text()).get("model_cfg", {})
    if "quick_gelu" in model_cfg:
      hints["act"] = "quick_gelu" if model_cfg["quick_gelu"] else "gelu"
    for tower, key in (("vision_cfg", "vision_heads"), ("text_cfg", "text_heads")):
      if model_cfg.get(tower, {}).get("heads"):
        hints[key] = model_cfg[tower]["heads"]
  return {k: v for k, v in hints.items() if v is not None}


def convert_state_dict(state: dict, *, source: str, model: Optional[str] = None,
                       act: Optional[str] = None, hints: Optional[dict] = None, path="checkpoint"):
  """(params, CLIPConfig) from a {name: array} state dict. Raises ValueError on any mismatch.

  source: openai | open_clip | hf (decides the key layout and the default activation).
  model: a name of MODEL_CONFIGS to check against; None infers the architecture.
  act: quick_gelu | gelu, overriding the default of the source.
  hints: act / vision_heads / text_heads / ln_eps read from a config file beside the weights.
  """
  if source not in SOURCES:
    raise ValueError(f"unknown --source {source!r}; known: {', '.join(SOURCES)}")
  hints = dict(hints or {})
  layout = detect_layout(state)
  if (layout == "hf") != (source == "hf"):
    hint = "hf" if layout == "hf" else "openai or open_clip"
    raise ValueError(f"{path} has {layout} key names but --source is {source}; use --source {hint}")
  act = act or hints.get("act") or DEFAULT_ACT[source]
  dims = infer_dims(state, layout)
  if model is None:
    if not {"vision_heads", "text_heads"} <= set(hints):
      logging.warning("%s: attention heads not given by a config file beside it; assuming "
                      "width / 64 (OpenAI's rule); pass --model if that is wrong", path)
    config = config_from_dims(dims, vision_heads=hints.get("vision_heads"),
                              text_heads=hints.get("text_heads"), act=act,
                              ln_eps=hints.get("ln_eps", 1e-5))
  else:
    config = get_model_config(model, act=act)
    check_dims(dims, config, path)
    for tower, key in (("vision", "vision_heads"), ("text", "text_heads")):
      if key in hints and hints[key] != getattr(config, tower).heads:
        raise ValueError(f"{path}: the config beside it has {hints[key]} {tower} heads but model "
                         f"{model!r} has {getattr(config, tower).heads}")
    if "ln_eps" in hints:
      config = config.replace(ln_eps=hints["ln_eps"])
  if "logit_bias" in state:  # SigLIP-style heads (open_clip) keep their learned bias
    config = config.replace(logit_bias_init=float(np.asarray(state["logit_bias"]).reshape(())))
  config = config.replace(scan_layers=True)
  check_keys(state, config, layout, path)
  if layout == "hf":
    state = hf_to_openai(state)
  state = {k: np.asarray(v, np.float32) for k, v in state.items() if not _IGNORED.search(k)}
  params = scan_params(openai_to_params(state, config))
  _check_tree(params, config)
  return params, config


# The weights file inside a Hugging Face / open_clip model dir, in order of preference.
_DIR_WEIGHTS = ("model.safetensors", "model.safetensors.index.json",
                "open_clip_model.safetensors", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin")


def weights_in_dir(path) -> Optional[pathlib.Path]:
  """The weights file of a Hugging Face / open_clip model dir, or None."""
  path = pathlib.Path(path)
  for name in _DIR_WEIGHTS:
    if (path / name).is_file():
      return path / name
  return None


def _weights_file(path: pathlib.Path) -> pathlib.Path:
  if not path.is_dir():
    return path
  if weights := weights_in_dir(path):
    return weights
  raise ValueError(f"--input {path} is a directory without any of {', '.join(_DIR_WEIGHTS)}; "
                   "pass the weights file itself")


def convert_file(path, *, source: Optional[str] = None, model: Optional[str] = None,
                 act: Optional[str] = None):
  """(params, CLIPConfig) from a checkpoint file (or a Hugging Face / open_clip model dir).

  source None: openai or hf, from the key names.
  """
  path = _weights_file(pathlib.Path(path))
  state = read_state_dict(path)
  layout = detect_layout(state)
  if source is None:
    source = "hf" if layout == "hf" else "openai"
  return convert_state_dict(state, source=source, model=model, act=act,
                            hints=_sidecar_config(path, layout), path=path)


def convert(input_path, output_dir, *, source: str, model: Optional[str] = None,
            act: Optional[str] = None, overwrite: bool = False) -> CLIPConfig:
  """Converts `input_path` and writes `output_dir` atomically. Returns the model config."""
  output_dir = pathlib.Path(output_dir)
  if output_dir.exists() and not overwrite:  # fail before the (slow) conversion
    raise ValueError(f"--output {output_dir} already exists; remove it or pass --overwrite")
  params, config = convert_file(input_path, source=source, model=model, act=act)
  save_params(output_dir, params, config, overwrite=overwrite)
  return config


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.convert",
      description="Convert OpenAI / open_clip / Hugging Face CLIP weights to clip_jax.")
  parser.add_argument("--source", required=True, choices=SOURCES)
  parser.add_argument("--input", required=True,
                      help=".pt/.pth/.bin/.safetensors file, TorchScript archive, sharded "
                           "checkpoint index (*.index.json), or HF model dir")
  parser.add_argument("--output", required=True, help="checkpoint dir to create")
  parser.add_argument("--model", choices=sorted(MODEL_CONFIGS),
                      help="variant to check against (default: inferred from the shapes)")
  parser.add_argument("--act", choices=("quick_gelu", "gelu"),
                      help="activation (default: quick_gelu for openai/hf, gelu for open_clip, or "
                           "what a config file beside --input says)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  args = parser.parse_args(argv)
  try:
    config = convert(args.input, args.output, source=args.source, model=args.model, act=args.act,
                     overwrite=args.overwrite)
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print(f"wrote {args.output}: model {config.name!r}, act {config.act}, "
        f"image {config.vision.image_size}px, embed {config.embed_dim}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
