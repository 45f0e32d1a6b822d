"""Reading checkpoint files into {name: numpy array}, and the config files beside them.

Formats: .safetensors, OpenAI's TorchScript archives, plain PyTorch state dicts (.pt/.pth/.bin,
loaded with `weights_only=True`, so no arbitrary object is ever unpickled; training wrappers
such as open_clip's {"state_dict": {"module." + name: tensor}} are unwrapped) and sharded
Hugging Face checkpoints (`*.index.json` and the shards its weight_map lists). A Hugging Face /
open_clip model dir gives its weights file (`weights_in_dir`), and the `config.json` /
`open_clip_config.json` beside it hints at the activation, heads and LayerNorm epsilon.

PyTorch is needed only to read .pt/.bin files, and is imported only then.
"""
from __future__ import annotations

import json
import pathlib
import zipfile
from typing import Optional

import numpy as np

HF_ACTS = {"quick_gelu": "quick_gelu", "gelu": "gelu"}
_WRAPPERS = ("state_dict", "model_state_dict", "model", "module", "params")
# The weights file inside a Hugging Face / open_clip model dir, in order of preference.
_DIR_WEIGHTS = ("model.safetensors", "model.safetensors.index.json",
                "open_clip_model.safetensors", "pytorch_model.bin",
                "pytorch_model.bin.index.json", "open_clip_pytorch_model.bin")


def _is_torchscript(path: pathlib.Path) -> bool:
  """TorchScript archives are zips with code/ and constants.pkl; torch.save zips have neither."""
  if not zipfile.is_zipfile(path):
    return False
  with zipfile.ZipFile(path) as archive:
    return any(name.endswith("/constants.pkl") or "/code/" in name for name in archive.namelist())


def import_torch(what: str, alternative: str = ""):
  """torch, or one ValueError saying that `what` needs it (and `alternative`, if any)."""
  try:
    import torch  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise ValueError(f"{what} needs PyTorch (pip install 'clip_jax[convert]')"
                     + (f", {alternative}" if alternative else "")) from e
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
  torch = import_torch(f"reading {path}", "or convert the file to .safetensors")
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


def weights_in_dir(path) -> Optional[pathlib.Path]:
  """The weights file of a Hugging Face / open_clip model dir, or None."""
  path = pathlib.Path(path)
  for name in _DIR_WEIGHTS:
    if (path / name).is_file():
      return path / name
  return None


def weights_file(path: pathlib.Path) -> pathlib.Path:
  """`path` itself, or the weights file of the model dir it names."""
  if not path.is_dir():
    return path
  if weights := weights_in_dir(path):
    return weights
  raise ValueError(f"--input {path} is a directory without any of {', '.join(_DIR_WEIGHTS)}; "
                   "pass the weights file itself")


def sidecar_config(path: pathlib.Path, layout: str) -> dict:
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
    hints.update(_open_clip_heads(model_cfg))
  return {k: v for k, v in hints.items() if v is not None}


def _open_clip_heads(model_cfg: dict) -> dict:
  """Attention heads of an open_clip model_cfg, as open_clip derives them.

  vision_cfg names `head_width` (default 64), not heads: a ViT has width // head_width heads,
  a ModifiedResNet (`layers` a list) width * 32 // head_width in its attention pool
  (ViT-H/14: 1280 // 80 = 16, not the 20 a 64-wide head would give). text_cfg names `heads`
  (default 8). An explicit vision `heads` (some forks write it) is taken as it is.
  """
  hints = {}
  vision, text = model_cfg.get("vision_cfg") or {}, model_cfg.get("text_cfg") or {}
  if vision.get("heads"):
    hints["vision_heads"] = int(vision["heads"])
  elif vision.get("width"):
    width, head_width = int(vision["width"]), int(vision.get("head_width") or 64)
    if isinstance(vision.get("layers"), (list, tuple)):
      width *= 32  # the attention pool's width: 32x the stem width
    hints["vision_heads"] = width // head_width
  if text.get("heads"):
    hints["text_heads"] = int(text["heads"])
  elif text.get("width") and not text.get("hf_model_name"):
    hints["text_heads"] = 8
  return hints
