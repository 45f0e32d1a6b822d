"""Export a clip_jax model for the PyTorch ecosystem: Hugging Face, open_clip or OpenAI's `clip`.

  python -m clip_jax.export --checkpoint /ckpt/b32 --format hf --output /out/b32_hf
  python -m clip_jax.export --checkpoint WORKDIR --format open_clip --output /out/b32_oc --pt
  python -m clip_jax.export --checkpoint WORKDIR/checkpoints/1000 --format openai --output /out/oa

`--checkpoint` takes what `clip_jax.load` takes from clip_jax: a converted model dir, a training
workdir (its latest step), its checkpoints/ dir or one checkpoints/<step> dir (scanned or not,
sharded or written by many hosts: it is read whole into this host's memory, no mesh needed).
`--output` is a directory, written atomically (`clip_jax.params_io.atomic_directory`):

  hf         config.json + model.safetensors (`transformers.CLIPModel.from_pretrained(OUT)`),
             and the tokenizer and image processor files (`CLIPProcessor.from_pretrained(OUT)`).
  open_clip  open_clip_model.safetensors (+ open_clip_pytorch_model.bin with --pt), a state dict
             for `open_clip.create_model(NAME, pretrained=FILE)`; NAME is printed (with
             -quickgelu for QuickGELU models); open_clip_config.json holds the model_cfg.
  openai     model.pt, a state dict in the layout of OpenAI's `clip` package (`clip.load(FILE)`).

The tensors are the inverse of the importer's maps (`clip_jax.convert.params_to_openai`,
`openai_to_hf`), so `python -m clip_jax.convert` reads every export back bit for bit (float32).
A model a format cannot express (a ResNet or a SigLIP logit bias in Hugging Face's CLIPModel;
in OpenAI's layout anything its `clip.load` would build differently) is one error line.
PyTorch is needed only for .pt/.bin files.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import sys
from typing import Optional

import jax
import ml_dtypes
import numpy as np

from clip_jax import checkpoint, convert
from clip_jax.convert import blocks
from clip_jax.convert.readers import import_torch
from clip_jax.models import MODEL_CONFIGS, OPENAI_MEAN, OPENAI_STD, CLIPConfig, open_clip_name
from clip_jax.params_io import atomic_directory, output_dir_path
from clip_jax.tokenizer import EOT, SOT, default_tokenizer

FORMATS = ("hf", "open_clip", "openai")
DTYPES = {"float32": np.float32, "bfloat16": ml_dtypes.bfloat16}
HF_WEIGHTS = "model.safetensors"
OPEN_CLIP_WEIGHTS = "open_clip_model.safetensors"
OPEN_CLIP_PT = "open_clip_pytorch_model.bin"
OPEN_CLIP_CONFIG = "open_clip_config.json"
OPENAI_WEIGHTS = "model.pt"
_DEFAULT_LN_EPS = 1e-5  # PyTorch's LayerNorm, as OpenAI's and open_clip's built-in models use
_SOT_TOKEN, _EOT_TOKEN = "<|startoftext|>", "<|endoftext|>"


# ------------------------------------------------------------------------------ reading

def read_checkpoint(path, weights: str = "auto") -> tuple[dict[str, np.ndarray], CLIPConfig]:
  """(OpenAI-layout float32 state dict, CLIPConfig) of anything `restore_params` reads;
  `weights`: a training checkpoint's EMA (auto: when it has one) or its params."""
  try:
    params, config = checkpoint.restore_params(str(path), weights)
  except (OSError, ValueError, KeyError) as e:
    raise ValueError(f"cannot read --checkpoint {path}: {' '.join(str(e).split())}") from e
  params = jax.tree.map(lambda x: np.asarray(x, np.float32), params)  # bfloat16 -> f32 is exact
  return convert.params_to_openai(params, config), config


def _cast(state: dict, dtype: str) -> dict[str, np.ndarray]:
  """Floating tensors in `dtype`, C-contiguous (safetensors writes raw buffers); ints as they are."""
  def cast(x):
    x = np.asarray(x)
    return np.array(x, DTYPES[dtype] if np.issubdtype(x.dtype, np.floating) else x.dtype,
                    order="C")
  return {k: cast(v) for k, v in state.items()}


def _save_safetensors(state: dict, path: pathlib.Path) -> None:
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  save_file(state, str(path), metadata={"format": "pt"})  # transformers wants the "pt" tag


def _save_torch(state: dict, path: pathlib.Path, dtype: str) -> None:
  torch = import_torch(f"{path.name} (a PyTorch file)")
  # torch reads no ml_dtypes bfloat16: cast in torch, from float32.
  tensors = {k: torch.from_numpy(v) for k, v in _cast(state, "float32").items()}
  tensors = {k: v.to(getattr(torch, dtype)) if v.is_floating_point() else v
             for k, v in tensors.items()}
  torch.save(tensors, path)


# ------------------------------------------------------------------------------ formats

def format_problems(config: CLIPConfig, fmt: str) -> list[str]:
  """What `fmt` cannot express of the model (empty: it can)."""
  if fmt == "hf":
    problems = []
    if config.is_resnet:
      problems.append("a ResNet image tower (Hugging Face has no CLIP ResNet; use open_clip or "
                      "openai)")
    if config.logit_bias_init is not None:
      problems.append("a logit bias (SigLIP head; CLIPModel has none; use open_clip)")
    return problems
  if fmt == "openai":
    return _openai_problems(config)
  return []


def _openai_problems(config: CLIPConfig) -> list[str]:
  """What OpenAI's `clip.load` (build_model: QuickGELU, LayerNorm eps 1e-5, MLP ratio 4, heads
  read as width / 64) would build differently, or cannot hold."""
  v, t = config.vision, config.text
  problems = []
  if config.logit_bias_init is not None:
    problems.append("a logit bias (SigLIP head), which OpenAI's layout has no key for")
  if config.act != "quick_gelu":
    problems.append(f"act {config.act} (OpenAI's clip always uses QuickGELU)")
  if config.ln_eps != _DEFAULT_LN_EPS:
    problems.append(f"LayerNorm eps {config.ln_eps} (OpenAI's clip uses {_DEFAULT_LN_EPS})")
  vision_heads = v.width * 32 // 64 if config.is_resnet else v.width // 64
  towers = [("text", t.heads, t.width // 64, t.mlp_ratio)]
  towers.append(("vision", v.heads, vision_heads, getattr(v, "mlp_ratio", 4.0)))
  for tower, heads, assumed, ratio in towers:
    if heads != assumed:
      problems.append(f"{heads} {tower} heads (OpenAI's clip reads {assumed} from the width)")
    if ratio != 4.0:
      problems.append(f"{tower} mlp_ratio {ratio} (OpenAI's clip uses 4)")
  return problems


def hf_config(config: CLIPConfig, dtype: str) -> dict:
  """transformers' CLIPConfig (config.json) of a ViT model."""
  v, t = config.vision, config.text
  act = "quick_gelu" if config.act == "quick_gelu" else "gelu"  # HF's "gelu" is exact (erf)
  common = {"hidden_act": act, "layer_norm_eps": config.ln_eps,
            "projection_dim": config.embed_dim}
  return {
      "architectures": ["CLIPModel"], "model_type": "clip", "torch_dtype": dtype,
      "projection_dim": config.embed_dim, "logit_scale_init_value": config.logit_scale_init,
      "initializer_factor": 1.0,
      "text_config": {
          "model_type": "clip_text_model", "vocab_size": t.vocab_size,
          "max_position_embeddings": t.context_length, "hidden_size": t.width,
          "intermediate_size": blocks.mlp_hidden(t.width, t.mlp_ratio),
          "num_hidden_layers": t.layers, "num_attention_heads": t.heads,
          "bos_token_id": SOT, "eos_token_id": EOT, "pad_token_id": 1, **common},
      "vision_config": {
          "model_type": "clip_vision_model", "image_size": v.image_size,
          "patch_size": v.patch_size, "num_channels": 3, "hidden_size": v.width,
          "intermediate_size": blocks.mlp_hidden(v.width, v.mlp_ratio),
          "num_hidden_layers": v.layers, "num_attention_heads": v.heads, **common},
  }


def write_hf_tokenizer(directory: pathlib.Path, config: CLIPConfig) -> None:
  """CLIPTokenizer's vocab.json / merges.txt (our BPE vocabulary, the same ids as
  `clip_jax.tokenize`), its configs, and CLIPImageProcessor's preprocessor_config.json."""
  tokenizer = default_tokenizer()
  merges = sorted(tokenizer.bpe_ranks, key=tokenizer.bpe_ranks.get)
  (directory / "vocab.json").write_text(json.dumps(tokenizer.encoder, ensure_ascii=False))
  (directory / "merges.txt").write_text(
      "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges), encoding="utf-8")
  special = {"bos_token": _SOT_TOKEN, "eos_token": _EOT_TOKEN, "unk_token": _EOT_TOKEN,
             "pad_token": _EOT_TOKEN}
  _write_json(directory / "special_tokens_map.json", special)
  _write_json(directory / "tokenizer_config.json", {
      "tokenizer_class": "CLIPTokenizer", "model_max_length": config.text.context_length,
      "do_lower_case": True, "errors": "replace", "add_prefix_space": False, **special})
  size = config.vision.image_size
  _write_json(directory / "preprocessor_config.json", {
      "image_processor_type": "CLIPImageProcessor", "do_resize": True,
      "size": {"shortest_edge": size}, "resample": 3, "do_center_crop": True,
      "crop_size": {"height": size, "width": size}, "do_rescale": True,
      "rescale_factor": 1 / 255, "do_normalize": True, "image_mean": list(OPENAI_MEAN),
      "image_std": list(OPENAI_STD), "do_convert_rgb": True})


def open_clip_model_cfg(config: CLIPConfig) -> dict:
  """open_clip's model_cfg (as its model_configs/*.json spell them) of the model."""
  v, t = config.vision, config.text
  norm = {} if config.ln_eps == _DEFAULT_LN_EPS else {"norm_kwargs": {"eps": config.ln_eps}}
  if config.is_resnet:  # open_clip: heads = width * 32 // head_width
    vision = {"image_size": v.image_size, "layers": list(v.layers), "width": v.width,
              "head_width": v.width * 32 // v.heads}
  else:
    vision = {"image_size": v.image_size, "layers": v.layers, "width": v.width,
              "patch_size": v.patch_size, "head_width": v.width // v.heads,
              "mlp_ratio": v.mlp_ratio, **norm}
  cfg = {"embed_dim": config.embed_dim, "quick_gelu": config.act == "quick_gelu",
         "vision_cfg": vision,
         "text_cfg": {"context_length": t.context_length, "vocab_size": t.vocab_size,
                      "width": t.width, "heads": t.heads, "layers": t.layers,
                      "mlp_ratio": t.mlp_ratio, **norm}}
  if config.logit_bias_init is not None:
    cfg["init_logit_bias"] = config.logit_bias_init
  return cfg


def open_clip_model_name(config: CLIPConfig) -> Optional[str]:
  """open_clip's built-in model name for the model, or None where none builds it."""
  known = MODEL_CONFIGS.get(config.name)
  if (known is None or (known.vision, known.text, known.embed_dim)
      != (config.vision, config.text, config.embed_dim) or config.ln_eps != _DEFAULT_LN_EPS
      or config.logit_bias_init is not None):
    return None
  return open_clip_name(config.name, config.act)


def _write_json(path: pathlib.Path, obj) -> None:
  path.write_text(json.dumps(obj, indent=2) + "\n")


def _write(directory: pathlib.Path, state: dict, config: CLIPConfig, fmt: str, dtype: str,
           pt: bool) -> None:
  """Writes the files of `fmt` into `directory`."""
  if fmt == "hf":
    _save_safetensors(_cast(convert.openai_to_hf(state, convert.config_family(config)), dtype),
                      directory / HF_WEIGHTS)
    _write_json(directory / "config.json", hf_config(config, dtype))
    write_hf_tokenizer(directory, config)
  elif fmt == "openai":
    _save_torch(state, directory / OPENAI_WEIGHTS, dtype)
  else:
    _save_safetensors(_cast(state, dtype), directory / OPEN_CLIP_WEIGHTS)
    if pt:
      _save_torch(state, directory / OPEN_CLIP_PT, dtype)
    _write_json(directory / OPEN_CLIP_CONFIG, {
        "model_cfg": open_clip_model_cfg(config),
        "preprocess_cfg": {"mean": list(OPENAI_MEAN), "std": list(OPENAI_STD)}})


def how_to_load(output_dir, config: CLIPConfig, fmt: str) -> str:
  """The call that loads an export."""
  out = str(output_dir)
  if fmt == "hf":
    return f"transformers.CLIPModel.from_pretrained({out!r}) (and CLIPProcessor)"
  if fmt == "openai":
    return f"clip.load({out + '/' + OPENAI_WEIGHTS!r})"
  name = open_clip_model_name(config)
  if name is None:
    return (f"open_clip, which has no built-in model name for {config.name!r}: build it from "
            f"the model_cfg in {out}/{OPEN_CLIP_CONFIG}")
  return f"open_clip.create_model({name!r}, pretrained={out + '/' + OPEN_CLIP_WEIGHTS!r})"


# ------------------------------------------------------------------------------ entry points

def export(checkpoint_path, output_dir, *, fmt: str, dtype: str = "float32",
           overwrite: bool = False, pt: bool = False, weights: str = "auto") -> str:
  """Exports `checkpoint_path` to `output_dir` in format `fmt` (hf | open_clip | openai).

  dtype: float32 | bfloat16, the stored dtype of the floating tensors.
  pt: open_clip only: also write open_clip_pytorch_model.bin.
  weights: of a training checkpoint with EMA weights (config.ema_decay), auto and ema export
    the EMA, params the trained weights.
  Returns a line saying how to load the result. Raises ValueError (one line) on bad input.
  """
  if fmt not in FORMATS:
    raise ValueError(f"unknown --format {fmt!r}; known: {', '.join(FORMATS)}")
  if dtype not in DTYPES:
    raise ValueError(f"unknown --dtype {dtype!r}; known: {', '.join(DTYPES)}")
  if pt and fmt != "open_clip":
    raise ValueError(f"--pt applies to --format open_clip only (--format {fmt} writes "
                     f"{'model.pt always' if fmt == 'openai' else 'safetensors'})")
  output_dir = output_dir_path(output_dir, overwrite=overwrite)  # fail before the (slow) read
  if fmt == "openai" or pt:
    import_torch(f"{OPENAI_WEIGHTS if fmt == 'openai' else OPEN_CLIP_PT} (a PyTorch file)")
  checkpoint.check_weights(weights, "--weights")
  state, config = read_checkpoint(checkpoint_path, weights)
  if problems := format_problems(config, fmt):
    raise ValueError(f"--format {fmt} cannot express model {config.name!r} of "
                     f"{checkpoint_path}: it has " + "; ".join(problems))
  with atomic_directory(output_dir, overwrite=overwrite) as tmp:
    _write(tmp, state, config, fmt, dtype, pt)
  return how_to_load(output_dir, config, fmt)


def main(argv=None) -> int:
  """The command line, `python -m clip_jax.export`."""
  parser = argparse.ArgumentParser(
      prog="python -m clip_jax.export",
      description="Export a clip_jax model to Hugging Face CLIPModel, open_clip or OpenAI's clip.")
  parser.add_argument("--checkpoint", required=True,
                      help="converted model dir, training workdir (latest step), its "
                           "checkpoints/<step> dir, or a pretrained name (openai:ViT-B/32, "
                           "open_clip:ARCH/TAG, hf-hub:ORG/REPO, local-dir:PATH)")
  parser.add_argument("--format", required=True, choices=FORMATS,
                      help="hf: config.json + model.safetensors + tokenizer files; open_clip: "
                           f"{OPEN_CLIP_WEIGHTS} (+ .bin with --pt); openai: {OPENAI_WEIGHTS}")
  parser.add_argument("--output", required=True, help="directory to create")
  parser.add_argument("--dtype", default="float32", choices=tuple(DTYPES),
                      help="stored dtype of the weights (default: float32)")
  parser.add_argument("--pt", action="store_true",
                      help=f"open_clip: also write {OPEN_CLIP_PT} (torch.save; needs PyTorch)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
  parser.add_argument("--weights", default="auto", choices=checkpoint.WEIGHTS,
                      help="a training checkpoint's EMA weights (auto: when it has them) or its "
                           "trained params")
  args = parser.parse_args(argv)
  try:
    how = export(args.checkpoint, args.output, fmt=args.format, dtype=args.dtype,
                 overwrite=args.overwrite, pt=args.pt, weights=args.weights)
  except ValueError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
    return 1
  print(f"wrote {args.output} ({args.format}, {args.dtype}); load with {how}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
