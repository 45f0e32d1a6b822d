"""Model configurations: the exact OpenAI CLIP sizes (ViTs and ResNets) plus tiny variants for tests.

`OPEN_CLIP_NAMES` maps open_clip's model names (ViT-B-32-quickgelu, ...) to a variant and
an activation.

A `CLIPConfig` is a frozen dataclass, so it can be hashed (jit static args), written
beside a checkpoint as JSON (`to_dict`) and read back (`from_dict`).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclasses.dataclass(frozen=True)
class VisionConfig:
  image_size: int = 224
  patch_size: int = 32
  width: int = 768
  layers: int = 12
  heads: int = 12
  mlp_ratio: float = 4.0

  @property
  def grid_size(self) -> int:
    return self.image_size // self.patch_size

  @property
  def num_tokens(self) -> int:
    return self.grid_size ** 2 + 1


@dataclasses.dataclass(frozen=True)
class ResNetConfig:
  """OpenAI's ModifiedResNet image tower (clip_jax.models.resnet).

  layers: Bottleneck blocks in each of the 4 stages; width: the stem's output width (stage
  widths are width, 2w, 4w, 8w, each block's output 4x that); heads: the attention pool's
  (openai/CLIP: width * 32 // 64). The final feature map is image_size / 32 on a side.
  """
  image_size: int = 224
  layers: tuple[int, ...] = (3, 4, 6, 3)
  width: int = 64
  heads: int = 32

  def __post_init__(self):  # JSON gives a list; the config must stay hashable
    object.__setattr__(self, "layers", tuple(int(n) for n in self.layers))

  @property
  def grid_size(self) -> int:
    return self.image_size // 32

  @property
  def num_tokens(self) -> int:
    """Tokens of the attention pool: the feature map's positions plus the mean token."""
    return self.grid_size ** 2 + 1

  @property
  def feature_width(self) -> int:
    """Channels of the last stage, the attention pool's width."""
    return self.width * 32


def vision_config_from_dict(d: dict[str, Any]) -> "VisionConfig | ResNetConfig":
  """A ViT config, or a ResNet one when `layers` is a list of stage depths (as openai/CLIP
  tells them apart)."""
  if isinstance(d.get("layers"), (list, tuple)):
    return ResNetConfig(**d)
  return VisionConfig(**d)


@dataclasses.dataclass(frozen=True)
class TextConfig:
  context_length: int = 77
  vocab_size: int = 49408
  width: int = 512
  layers: int = 12
  heads: int = 8
  mlp_ratio: float = 4.0


@dataclasses.dataclass(frozen=True)
class CLIPConfig:
  """Architecture and numerics of a CLIP model.

  `dtype` is the compute dtype, `param_dtype` the storage dtype of parameters.
  LayerNorm, attention softmax and logits are always computed in float32.
  """
  embed_dim: int = 512
  vision: "VisionConfig | ResNetConfig" = VisionConfig()
  text: TextConfig = TextConfig()
  act: str = "quick_gelu"                  # "quick_gelu" (OpenAI weights) or "gelu" (exact erf)
  ln_eps: float = 1e-5
  logit_scale_init: float = 2.659260036932778  # ln(1 / 0.07)
  logit_bias_init: Optional[float] = None  # a float adds a learnable bias (SigLIP)
  dtype: str = "float32"
  param_dtype: str = "float32"
  scan_layers: bool = True
  remat_policy: str = "none"               # see clip_jax.models.layers.REMAT_POLICIES
  attention_impl: str = "xla"              # "xla" (einsum, f32 softmax), "cudnn" (fused, GPU) or "auto"
  name: str = "custom"

  def replace(self, **kwargs) -> "CLIPConfig":
    """Returns a copy; `vision`/`text` may be given as dicts of fields to change."""
    for tower in ("vision", "text"):
      if isinstance(kwargs.get(tower), dict):
        kwargs[tower] = dataclasses.replace(getattr(self, tower), **kwargs[tower])
    return dataclasses.replace(self, **kwargs)

  @property
  def is_resnet(self) -> bool:
    return isinstance(self.vision, ResNetConfig)

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: dict[str, Any]) -> "CLIPConfig":
    d = dict(d)
    known = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - known)
    if unknown:
      raise ValueError(f"unknown CLIPConfig field(s) {unknown}; known: {sorted(known)}")
    d["vision"] = vision_config_from_dict(d.get("vision", {}))
    d["text"] = TextConfig(**d.get("text", {}))
    return cls(**d)


MODEL_CONFIGS: dict[str, CLIPConfig] = {
    "vitb32": CLIPConfig(
        name="vitb32", embed_dim=512,
        vision=VisionConfig(image_size=224, patch_size=32, width=768, layers=12, heads=12),
        text=TextConfig(width=512, layers=12, heads=8)),
    "vitb16": CLIPConfig(
        name="vitb16", embed_dim=512,
        vision=VisionConfig(image_size=224, patch_size=16, width=768, layers=12, heads=12),
        text=TextConfig(width=512, layers=12, heads=8)),
    "vitl14": CLIPConfig(
        name="vitl14", embed_dim=768,
        vision=VisionConfig(image_size=224, patch_size=14, width=1024, layers=24, heads=16),
        text=TextConfig(width=768, layers=12, heads=12)),
    "vitl14_336": CLIPConfig(
        name="vitl14_336", embed_dim=768,
        vision=VisionConfig(image_size=336, patch_size=14, width=1024, layers=24, heads=16),
        text=TextConfig(width=768, layers=12, heads=12)),
    # The paper's ResNets (Table 19/20): stage depths, stem width, image size, embed dim and
    # text width; attention-pool heads width * 32 / 64, text heads width / 64, 12 text layers.
    **{name: CLIPConfig(
        name=name, embed_dim=embed,
        vision=ResNetConfig(image_size=size, layers=layers, width=width, heads=width * 32 // 64),
        text=TextConfig(width=text_width, layers=12, heads=text_width // 64))
       for name, layers, width, size, embed, text_width in (
           ("rn50", (3, 4, 6, 3), 64, 224, 1024, 512),
           ("rn101", (3, 4, 23, 3), 64, 224, 512, 512),
           ("rn50x4", (4, 6, 10, 6), 80, 288, 640, 640),
           ("rn50x16", (6, 8, 18, 8), 96, 384, 768, 768),
           ("rn50x64", (3, 15, 36, 10), 128, 448, 1024, 1024))},
    # Small enough for CPU tests and the demo; same structure as the real ones.
    "tiny": CLIPConfig(
        name="tiny", embed_dim=64,
        vision=VisionConfig(image_size=32, patch_size=8, width=64, layers=2, heads=4),
        text=TextConfig(width=64, layers=2, heads=4)),
    # A ResNet of the same structure for CPU tests: 1 block per stage, 64px.
    "tiny_rn": CLIPConfig(
        name="tiny_rn", embed_dim=64,
        vision=ResNetConfig(image_size=64, layers=(1, 1, 1, 1), width=16, heads=8),
        text=TextConfig(width=64, layers=2, heads=4)),
}


# open_clip's names of the same variants. The name also fixes the activation, as open_clip builds
# them: "-quickgelu" is OpenAI's QuickGELU (OpenAI's and the LAION-400M weights), else exact GELU.
_OPEN_CLIP_BASES = {"vitb32": "ViT-B-32", "vitb16": "ViT-B-16", "vitl14": "ViT-L-14",
                    "vitl14_336": "ViT-L-14-336", "rn50": "RN50", "rn101": "RN101",
                    "rn50x4": "RN50x4", "rn50x16": "RN50x16", "rn50x64": "RN50x64"}
OPEN_CLIP_NAMES: dict[str, tuple[str, str]] = {
    base + suffix: (variant, act)
    for variant, base in _OPEN_CLIP_BASES.items()
    for suffix, act in (("", "gelu"), ("-quickgelu", "quick_gelu"))}


def resolve_model_name(name: str) -> tuple[str, Optional[str]]:
  """(variant, activation) for an open_clip name; (name, None) for one of MODEL_CONFIGS."""
  if name in OPEN_CLIP_NAMES:
    return OPEN_CLIP_NAMES[name]
  if name in MODEL_CONFIGS:
    return name, None
  raise ValueError(f"unknown model {name!r}; known: {', '.join(sorted(MODEL_CONFIGS))}, or "
                   f"open_clip's {', '.join(OPEN_CLIP_NAMES)}")


def open_clip_name(variant: str, act: str) -> Optional[str]:
  """open_clip's name of a variant with this activation, or None where it has none (tiny)."""
  return next((name for name, known in OPEN_CLIP_NAMES.items() if known == (variant, act)), None)


def get_model_config(name_or_config: "str | CLIPConfig | dict", **overrides) -> CLIPConfig:
  """Looks up a variant by name (or passes a config through) and applies overrides."""
  if isinstance(name_or_config, CLIPConfig):
    config = name_or_config
  elif isinstance(name_or_config, dict):
    config = CLIPConfig.from_dict(name_or_config)
  elif isinstance(name_or_config, str):
    if name_or_config not in MODEL_CONFIGS:
      raise ValueError(
          f"unknown model {name_or_config!r}; known: {', '.join(sorted(MODEL_CONFIGS))}")
    config = MODEL_CONFIGS[name_or_config]
  else:
    raise TypeError(f"expected a model name, CLIPConfig or dict, got {type(name_or_config)}")
  return config.replace(**overrides) if overrides else config
