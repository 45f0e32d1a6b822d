"""Reference models for the converter and parity tests (no tests here).

An independent CLIP: the `transformers` CLIPModel in PyTorch, float32 on CPU, random weights with
every bias and LayerNorm parameter perturbed away from its 0/1 init (so a dropped or misplaced
one changes the outputs). `openai_state_dict` renames its weights to OpenAI's layout with code
separate from clip_jax.convert's.
"""
import numpy as np

SMALL = dict(image_size=32, patch_size=8, vision_width=64, vision_layers=2, vision_heads=4,
             text_width=64, text_layers=2, text_heads=4, embed_dim=64)
VITB32 = dict(image_size=224, patch_size=32, vision_width=768, vision_layers=12, vision_heads=12,
              text_width=512, text_layers=12, text_heads=8, embed_dim=512)
EOT = 49407


def hf_clip(dims: dict, seed: int = 0, logit_scale: float = 3.0):
  """A random-weight transformers CLIPModel (eval mode, float32)."""
  import torch
  import transformers
  vision = dict(image_size=dims["image_size"], patch_size=dims["patch_size"],
                hidden_size=dims["vision_width"], intermediate_size=4 * dims["vision_width"],
                num_hidden_layers=dims["vision_layers"], num_attention_heads=dims["vision_heads"],
                hidden_act="quick_gelu", layer_norm_eps=1e-5)
  text = dict(vocab_size=49408, max_position_embeddings=77, hidden_size=dims["text_width"],
              intermediate_size=4 * dims["text_width"], num_hidden_layers=dims["text_layers"],
              num_attention_heads=dims["text_heads"], hidden_act="quick_gelu",
              layer_norm_eps=1e-5, eos_token_id=EOT)
  config = transformers.CLIPConfig(text_config=text, vision_config=vision,
                                   projection_dim=dims["embed_dim"], initializer_factor=1.0)
  torch.manual_seed(seed)
  model = transformers.CLIPModel(config).eval().float()
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, p in model.named_parameters():
      if "norm" in name and name.endswith("weight"):
        p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=generator))  # LayerNorm scales
      elif name.endswith("bias"):
        p.copy_(0.1 * torch.randn(p.shape, generator=generator))        # every bias non-zero
    model.logit_scale.fill_(logit_scale)
  return model


def hf_state_dict(model) -> dict:
  return {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}


def hf_outputs(model, images_nhwc: np.ndarray, tokens: np.ndarray) -> dict:
  """Projected un-normalised embeddings and logits, as numpy float32."""
  import torch
  pixels = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  ids = torch.from_numpy(tokens.astype(np.int64))
  with torch.no_grad():
    image = model.visual_projection(model.vision_model(pixel_values=pixels).pooler_output)
    text = model.text_projection(model.text_model(input_ids=ids).pooler_output)
    out = model(input_ids=ids, pixel_values=pixels)
  return {"image": image.numpy(), "text": text.numpy(),
          "logits_per_image": out.logits_per_image.numpy(),
          "logits_per_text": out.logits_per_text.numpy()}


def openai_state_dict(hf_state: dict) -> dict:
  """OpenAI / open_clip key names and layouts for a transformers CLIPModel state dict."""
  import torch
  sd = {}
  renames = {
      "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
      "vision_model.embeddings.class_embedding": "visual.class_embedding",
      "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
      "vision_model.pre_layrnorm": "visual.ln_pre",
      "vision_model.post_layernorm": "visual.ln_post",
      "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
      "text_model.embeddings.position_embedding.weight": "positional_embedding",
      "text_model.final_layer_norm": "ln_final",
      "logit_scale": "logit_scale",
  }
  for hf_name, oa_name in renames.items():
    for suffix in ("", ".weight", ".bias"):
      if hf_name + suffix in hf_state:
        sd[oa_name + suffix] = hf_state[hf_name + suffix]
  sd["visual.proj"] = hf_state["visual_projection.weight"].t().contiguous()
  sd["text_projection"] = hf_state["text_projection.weight"].t().contiguous()
  for hf_tower, oa_tower in (("vision_model", "visual.transformer"), ("text_model", "transformer")):
    i = 0
    while f"{hf_tower}.encoder.layers.{i}.layer_norm1.weight" in hf_state:
      hf = lambda n: hf_state[f"{hf_tower}.encoder.layers.{i}.{n}"]  # noqa: E731
      oa = f"{oa_tower}.resblocks.{i}."
      for t in ("weight", "bias"):
        sd[oa + f"ln_1.{t}"] = hf(f"layer_norm1.{t}")
        sd[oa + f"ln_2.{t}"] = hf(f"layer_norm2.{t}")
        sd[oa + f"attn.out_proj.{t}"] = hf(f"self_attn.out_proj.{t}")
        sd[oa + f"mlp.c_fc.{t}"] = hf(f"mlp.fc1.{t}")
        sd[oa + f"mlp.c_proj.{t}"] = hf(f"mlp.fc2.{t}")
      sd[oa + "attn.in_proj_weight"] = torch.cat(
          [hf(f"self_attn.{n}_proj.weight") for n in "qkv"], 0)
      sd[oa + "attn.in_proj_bias"] = torch.cat([hf(f"self_attn.{n}_proj.bias") for n in "qkv"], 0)
      i += 1
  return sd


def torchscript_archive(state: dict, path, extra_buffers: dict):
  """A TorchScript archive whose state_dict() is `state` + `extra_buffers` (as OpenAI's .pt)."""
  import torch

  class Holder(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
      return x

  root = Holder()
  items = [(k, torch.nn.Parameter(v, requires_grad=False)) for k, v in state.items()]
  items += [(k, v) for k, v in extra_buffers.items()]
  for key, value in items:
    *parents, leaf = key.split(".")
    module = root
    for name in parents:
      if not hasattr(module, name):
        module.add_module(name, Holder())
      module = getattr(module, name)
    if isinstance(value, torch.nn.Parameter):
      module.register_parameter(leaf, value)
    else:
      module.register_buffer(leaf, value)
  torch.jit.save(torch.jit.script(root), str(path))


def random_tokens(n: int, seed: int = 0) -> np.ndarray:
  """Token ids [n, 77]: real tokenized captions when the tokenizer exists, else random ids
  with one EOT (the largest id) at varying positions."""
  try:
    from clip_jax.tokenizer import tokenize
  except ImportError:
    tokenize = None
  if tokenize is not None:
    captions = ["a photo of a cat", "a diagram", "two dogs playing in the snow near a red barn",
                "", "an extremely long caption " * 20, "x", "a photo of a dog"]
    return np.asarray(tokenize([captions[i % len(captions)] for i in range(n)]), np.int32)
  rng = np.random.default_rng(seed)
  tokens = np.zeros((n, 77), np.int32)
  for i in range(n):
    length = int(rng.integers(2, 77))
    tokens[i, 0] = 49406
    tokens[i, 1:length - 1] = rng.integers(0, 49405, length - 2)
    tokens[i, length - 1] = EOT
  return tokens


def random_images(n: int, size: int, seed: int = 0) -> np.ndarray:
  return np.random.default_rng(seed).standard_normal((n, size, size, 3)).astype(np.float32)


def assert_close(actual, expected, rtol=1e-4, what=""):
  """max |actual - expected| <= rtol * max |expected| (relative to the array's scale)."""
  actual, expected = np.asarray(actual, np.float64), np.asarray(expected, np.float64)
  assert actual.shape == expected.shape, (what, actual.shape, expected.shape)
  err = np.max(np.abs(actual - expected)) / np.max(np.abs(expected))
  assert err <= rtol, f"{what}: relative error {err:.2e} > {rtol:.0e}"
