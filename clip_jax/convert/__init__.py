"""Import CLIP weights from OpenAI, open_clip or Hugging Face checkpoints.

  python -m clip_jax.convert --source openai --input ViT-B-32.pt --model vitb32 --output /ckpt/b32
  python -m clip_jax.convert --source open_clip --input open_clip_pytorch_model.bin \
      --model ViT-B-32-quickgelu --output /ckpt/b32_laion400m
  python -m clip_jax.convert --source hf --input model.safetensors --output /ckpt/b32

Reads OpenAI TorchScript archives, plain PyTorch state dicts (.pt/.pth/.bin, loaded with
`weights_only=True`, so no arbitrary object is ever unpickled), .safetensors files and
sharded Hugging Face checkpoints (`*.index.json` and the shards its weight_map lists); writes
`DIR/model_config.json` + `DIR/params/` (see `clip_jax.params_io`), atomically.

Two key layouts are understood: OpenAI's (also open_clip's: `visual.conv1.weight`,
`transformer.resblocks.N...`) and Hugging Face `CLIPModel`'s (`vision_model...`,
`text_model...`). Both image families are read: the ViTs, and the paper's ResNets (OpenAI's
and open_clip's ModifiedResNet, RN50 ... RN50x64, BatchNorm running statistics included; in
OpenAI's layout only). The checkpoint is checked against the model before anything is written:
missing, unexpected and mis-shaped keys are all reported in one ValueError. Without
`--model`, the architecture is read off the tensor shapes (heads from a `config.json`
beside the file, else width / 64 as in OpenAI's models). `--model` also takes open_clip's
names (`ViT-B-32-quickgelu`, ...), which fix the activation too; open_clip weights converted
with neither such a name nor `--act` get exact GELU, open_clip's default, and a note says so.

The package: `readers` turns files into {name: array}; `text` maps the text tower's keys, shared
by every image family, `vit` the ViT image tower's (both are `blocks.TransformerTower`s) and
`resnet` the ResNet's;
this module detects the layout and the image family (`IMAGE_FAMILIES`: a new family is one
module beside vit.py, with the functions vit.py has), checks the keys and writes the result;
`params_to_openai` and `openai_to_hf` are the inverse maps, for `clip_jax.export`;
`main` is the command line (`python -m clip_jax.convert`; `__main__` only calls it).

PyTorch is needed only to read .pt/.bin files, and is imported only then.
"""
from __future__ import annotations

import argparse
import pathlib
import re
import sys
from typing import Callable, Optional

import jax
import numpy as np
from absl import logging

from clip_jax.convert import readers, resnet, text, vit
from clip_jax.convert.readers import (HF_ACTS, _is_torchscript, read_sharded,  # noqa: F401
                                      read_state_dict, weights_in_dir)
from clip_jax.params_io import output_dir_path, save_params
from clip_jax.models import (BATCH_STATS, MODEL_CONFIGS, OPEN_CLIP_NAMES, CLIPConfig,
                             abstract_loaded_params, create_model, get_model_config,
                             open_clip_name, resolve_model_name, scan_params, unscan_params)

SOURCES = ("openai", "open_clip", "hf")
LAYOUTS = ("openai", "hf")
# OpenAI's weights use quick_gelu; open_clip's own (LAION, DataComp) use exact gelu unless the
# model name ends in -quickgelu; transformers' CLIPConfig defaults to quick_gelu.
DEFAULT_ACT = {"openai": "quick_gelu", "open_clip": "gelu", "hf": "quick_gelu"}
# The image towers, by family: each module maps its own keys; the text tower is shared.
IMAGE_FAMILIES = {"vit": vit, "resnet": resnet}
# Buffers that are not parameters: OpenAI's TorchScript metadata, masks, HF position ids.
# BatchNorm's num_batches_tracked (a counter) too.
_IGNORED = re.compile(r"^(input_resolution|context_length|vocab_size)$|(^|\.)attn_mask$|"
                      r"(^|\.)position_ids$|(^|\.)num_batches_tracked$")
_MAX_LISTED = 20


def _log_note(note: str) -> None:
  logging.warning("%s", note)


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


def detect_family(state, layout: str) -> str:
  """The image family whose keys `state` holds; "vit" if none (its errors name what is missing)."""
  for family, image in IMAGE_FAMILIES.items():
    if any(k.startswith(image.KEY_PREFIXES.get(layout, ())) for k in state):
      return family
  return "vit"


def config_family(config: CLIPConfig) -> str:
  """The image family of a model config, by the type of its `vision` config."""
  for family, image in IMAGE_FAMILIES.items():
    if isinstance(config.vision, image.CONFIG_TYPE):
      return family
  raise ValueError(f"model {config.name!r}: no converter for a {type(config.vision).__name__} "
                   f"image tower; known families: {', '.join(IMAGE_FAMILIES)}")


def expected_shapes(config: CLIPConfig, layout: str) -> dict[str, tuple]:
  """Every checkpoint key the model needs, with its shape, in the given layout."""
  if layout not in LAYOUTS:
    raise ValueError(f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
  image = IMAGE_FAMILIES[config_family(config)]
  shapes = {**image.expected_shapes(config, layout), **text.expected_shapes(config, layout),
            "logit_scale": ()}
  if config.logit_bias_init is not None:
    shapes["logit_bias"] = ()
  return shapes


def infer_dims(state, layout: str, family: Optional[str] = None) -> dict[str, int]:
  """Architecture numbers readable from the tensor shapes (those whose keys are present).

  family: the image family (default: `detect_family`).
  """
  image = IMAGE_FAMILIES[family or detect_family(state, layout)]
  # Both projections give embed_dim: the image tower's wins, as it did when OpenAI's was read first.
  return {**text.infer_dims(state, layout), **image.infer_dims(state, layout)}


def _config_dims(config: CLIPConfig) -> dict[str, int]:
  image = IMAGE_FAMILIES[config_family(config)]
  return {**image.config_dims(config), **text.config_dims(config), "embed_dim": config.embed_dim}


def config_from_dims(dims: dict[str, int], *, family: str = "vit",
                     vision_heads: Optional[int] = None, text_heads: Optional[int] = None,
                     **fields) -> CLIPConfig:
  """A CLIPConfig from `infer_dims`; named after a known variant when the architecture matches."""
  image = IMAGE_FAMILIES[family]
  # A default config of the family names every number a config of it needs.
  needed = sorted(set(_config_dims(CLIPConfig(vision=image.CONFIG_TYPE()))) - set(dims))
  if needed:
    raise ValueError(f"cannot infer the architecture: no tensor gives {needed}; pass --model")
  vision = image.tower_config(dims, vision_heads)
  config = CLIPConfig(embed_dim=dims["embed_dim"], vision=vision,
                      text=text.tower_config(dims, text_heads), **fields)
  for name, known in MODEL_CONFIGS.items():
    if (known.vision, known.text, known.embed_dim) == (vision, config.text, config.embed_dim):
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

def hf_to_openai(state, family: Optional[str] = None) -> dict[str, np.ndarray]:
  """Renames a (checked) Hugging Face CLIPModel state dict to OpenAI's names and layouts."""
  image = IMAGE_FAMILIES[family or detect_family(state, "hf")]
  out = {**image.hf_to_openai(state), **text.hf_to_openai(state)}
  out.update({k: state[k] for k in ("logit_scale", "logit_bias") if k in state})
  return out


def openai_to_params(state, config: CLIPConfig) -> dict:
  """Our params tree (unscanned: resblocks_0..L-1) from a checked OpenAI-layout state dict; a
  ResNet's BatchNorm running statistics under its top-level `batch_stats` key."""
  image = IMAGE_FAMILIES[config_family(config)]
  params = {
      "visual": image.to_params(state, config),
      "text": text.to_params(state, config),
      "logit_scale": np.asarray(state["logit_scale"], np.float32).reshape(()),
  }
  if config.logit_bias_init is not None:
    params["logit_bias"] = np.asarray(state["logit_bias"], np.float32).reshape(())
  if hasattr(image, "to_batch_stats"):
    params[BATCH_STATS] = {"visual": image.to_batch_stats(state, config)}
  return params


def openai_to_hf(state, family: Optional[str] = None) -> dict[str, np.ndarray]:
  """The inverse of `hf_to_openai`: an OpenAI-layout state dict under Hugging Face CLIPModel's
  names and layouts. Raises ValueError for a family Hugging Face does not have (the ResNets)."""
  family = family or detect_family(state, "openai")
  image = IMAGE_FAMILIES[family]
  if not hasattr(image, "openai_to_hf"):
    raise ValueError(f"Hugging Face CLIPModel has no {family} image tower; export the "
                     "open_clip or openai layout instead")
  out = {**image.openai_to_hf(state), **text.openai_to_hf(state)}
  out.update({k: state[k] for k in ("logit_scale", "logit_bias") if k in state})
  return out


def params_to_openai(params, config: CLIPConfig) -> dict[str, np.ndarray]:
  """The inverse of `openai_to_params`: an OpenAI-layout state dict from our params (scanned
  or not, numpy; a ResNet's with its `batch_stats`, written as BatchNorm buffers)."""
  params = unscan_params(params)
  image = IMAGE_FAMILIES[config_family(config)]
  state = {**image.from_params(params["visual"], config),
           **text.from_params(params["text"], config), "logit_scale": params["logit_scale"]}
  if "logit_bias" in params:
    state["logit_bias"] = params["logit_bias"]
  if hasattr(image, "from_batch_stats"):
    state.update(image.from_batch_stats(params[BATCH_STATS]["visual"], config))
  return state


def _check_tree(params, config: CLIPConfig) -> None:
  """The mapped tree must have exactly the model's parameter paths and shapes."""
  def flat(tree):
    leaves = jax.tree_util.tree_flatten_with_path(tree)[0]
    return {jax.tree_util.keystr(p): tuple(np.shape(x)) for p, x in leaves}
  want = flat(abstract_loaded_params(create_model(config.replace(scan_layers=True))))
  have = flat(params)
  if want != have:
    diff = sorted(f"{k}: {have.get(k)} vs model {want.get(k)}"
                  for k in set(want) | set(have) if want.get(k) != have.get(k))
    raise ValueError(f"converted params do not match model {config.name!r}: {_listed(diff)}")


# ------------------------------------------------------------------------------ entry points

def _activation(source: str, model: Optional[str], act: Optional[str], hints: dict,
                path) -> tuple[str, bool]:
  """(act, whether it is only open_clip's default): --act, else what an open_clip model name
  means, else what a config file beside the weights says, else the source's default."""
  variant, name_act = resolve_model_name(model) if model is not None else (None, None)
  if act and name_act and act != name_act:
    raise ValueError(f"--act {act} contradicts --model {model}, which means act {name_act}; drop "
                     f"--act, or pass --model {open_clip_name(variant, act)}")
  if act:
    return act, False
  if name_act:
    if hints.get("act", name_act) != name_act:
      raise ValueError(f"{path}: the config beside it says act {hints['act']} but --model {model} "
                       f"means {name_act}; pass --model {open_clip_name(variant, hints['act'])}, "
                       "or --act to override the config")
    return name_act, False
  if "act" in hints:
    return hints["act"], False
  return DEFAULT_ACT[source], source == "open_clip"


def _gelu_note(config: CLIPConfig) -> str:
  quick_name = open_clip_name(config.name, "quick_gelu")
  how = f"--model {quick_name} or --act quick_gelu" if quick_name else "--act quick_gelu"
  return (f"act {config.act} assumed (open_clip's default); for a QuickGELU checkpoint such as "
          f"the OpenAI or LAION-400M ones pass {how}")


def convert_state_dict(state: dict, *, source: str, model: Optional[str] = None,
                       act: Optional[str] = None, hints: Optional[dict] = None, path="checkpoint",
                       notify: Callable[[str], None] = _log_note):
  """(params, CLIPConfig) from a {name: array} state dict. Raises ValueError on any mismatch.

  source: openai | open_clip | hf (decides the key layout and the default activation).
  model: a name of MODEL_CONFIGS to check against, or an open_clip name (OPEN_CLIP_NAMES:
    ViT-B-32-quickgelu, ...), which also sets the activation; None infers the architecture.
  act: quick_gelu | gelu, overriding the default of the source (must agree with an open_clip
    model name).
  hints: act / vision_heads / text_heads / ln_eps read from a config file beside the weights.
  notify: called with a note when open_clip's default activation was assumed (default: logged).
  """
  if source not in SOURCES:
    raise ValueError(f"unknown --source {source!r}; known: {', '.join(SOURCES)}")
  hints = dict(hints or {})
  layout = detect_layout(state)
  if (layout == "hf") != (source == "hf"):
    hint = "hf" if layout == "hf" else "openai or open_clip"
    raise ValueError(f"{path} has {layout} key names but --source is {source}; use --source {hint}")
  act, act_assumed = _activation(source, model, act, hints, path)
  if model is None:
    if not {"vision_heads", "text_heads"} <= set(hints):
      logging.warning("%s: attention heads not given by a config file beside it; assuming "
                      "width / 64 (OpenAI's rule); pass --model if that is wrong", path)
    family = detect_family(state, layout)
    config = config_from_dims(infer_dims(state, layout, family), family=family,
                              vision_heads=hints.get("vision_heads"),
                              text_heads=hints.get("text_heads"), act=act,
                              ln_eps=hints.get("ln_eps", 1e-5))
  else:
    config = get_model_config(resolve_model_name(model)[0], act=act)
    check_dims(infer_dims(state, layout, config_family(config)), config, path)
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
    state = hf_to_openai(state, config_family(config))
  state = {k: np.asarray(v, np.float32) for k, v in state.items() if not _IGNORED.search(k)}
  params = scan_params(openai_to_params(state, config))
  _check_tree(params, config)
  if act_assumed:
    notify(_gelu_note(config))
  return params, config


def convert_file(path, *, source: Optional[str] = None, model: Optional[str] = None,
                 act: Optional[str] = None, notify: Callable[[str], None] = _log_note):
  """(params, CLIPConfig) from a checkpoint file (or a Hugging Face / open_clip model dir).

  source None: openai or hf, from the key names. The rest as for `convert_state_dict`.
  """
  path = readers.weights_file(pathlib.Path(path))
  state = read_state_dict(path)
  layout = detect_layout(state)
  if source is None:
    source = "hf" if layout == "hf" else "openai"
  return convert_state_dict(state, source=source, model=model, act=act,
                            hints=readers.sidecar_config(path, layout), path=path, notify=notify)


def convert(input_path, output_dir, *, source: str, model: Optional[str] = None,
            act: Optional[str] = None, overwrite: bool = False,
            notify: Callable[[str], None] = _log_note) -> CLIPConfig:
  """Converts `input_path` and writes `output_dir` atomically. Returns the model config."""
  output_dir = output_dir_path(output_dir, overwrite=overwrite)  # before the slow conversion
  params, config = convert_file(input_path, source=source, model=model, act=act, notify=notify)
  save_params(output_dir, params, config, overwrite=overwrite)
  return config


def _print_note(note: str) -> None:
  print(f"note: {note}", file=sys.stderr)


def main(argv=None) -> int:
  """The command line, `python -m clip_jax.convert` (run by clip_jax/convert/__main__.py)."""
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.convert",
      description="Convert OpenAI / open_clip / Hugging Face CLIP weights to clip_jax.")
  parser.add_argument("--list", action="store_true",
                      help="print the pretrained names clip_jax.load and --checkpoint take "
                           "(openai:..., open_clip:...; also hf-hub:ORG/REPO and local-dir:PATH)")
  parser.add_argument("--source", choices=SOURCES)
  parser.add_argument("--input",
                      help=".pt/.pth/.bin/.safetensors file, TorchScript archive, sharded "
                           "checkpoint index (*.index.json), or HF model dir")
  parser.add_argument("--output", help="checkpoint dir to create")
  parser.add_argument("--model", choices=sorted(MODEL_CONFIGS) + list(OPEN_CLIP_NAMES),
                      metavar="NAME",
                      help="variant to check against (default: inferred from the shapes): one of "
                           f"{', '.join(sorted(MODEL_CONFIGS))}, or an open_clip name, which sets "
                           f"the activation too: {', '.join(OPEN_CLIP_NAMES)}")
  parser.add_argument("--act", choices=("quick_gelu", "gelu"),
                      help="activation (default: what an open_clip --model name or a config file "
                           "beside --input says, else quick_gelu for openai/hf and gelu for "
                           "open_clip)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  args = parser.parse_args(argv)
  if args.list:
    from clip_jax import pretrained_names  # pylint: disable=import-outside-toplevel
    for name in pretrained_names.known_names():
      print(name)
    print("hf-hub:ORG/REPO[@REVISION]  (an open_clip or transformers CLIP repo)")
    print("local-dir:PATH  (an open_clip or transformers CLIP model folder)")
    return 0
  missing = [f"--{flag}" for flag in ("source", "input", "output") if not getattr(args, flag)]
  if missing:
    parser.error(f"the following arguments are required: {', '.join(missing)}")
  try:
    config = convert(args.input, args.output, source=args.source, model=args.model, act=args.act,
                     overwrite=args.overwrite, notify=_print_note)
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print(f"wrote {args.output}: model {config.name!r}, act {config.act}, "
        f"image {config.vision.image_size}px, embed {config.embed_dim}")
  return 0
