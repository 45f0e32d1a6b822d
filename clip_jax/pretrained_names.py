"""The pretrained names clip_jax knows (`clip_jax.pretrained` resolves them): OpenAI's and
open_clip's registries, and the forms of the names. Reads and imports nothing heavy, so the
converter's `--list` and the config checks use it without the download machinery.
"""
from __future__ import annotations

import dataclasses
import os
import re
from typing import Optional

PREFIXES = ("openai:", "open_clip:", "hf-hub:", "local-dir:")


@dataclasses.dataclass(frozen=True)
class Weights:
  """Where one set of pretrained weights is and how to convert them."""
  model: str                 # our variant (clip_jax.models.MODEL_CONFIGS)
  act: str                   # quick_gelu | gelu: what the weights were trained with
  source: str                # the converter's --source: openai | open_clip | hf
  url: str = ""              # a download URL ...
  sha256: str = ""           # ... and its SHA256 (or a prefix of >= 8 hex digits)
  hf_hub: str = ""           # or a Hugging Face repo, "org/repo"
  revision: str = ""         # its branch, tag or commit ("" : main)
  filename: str = ""         # the weights file in the repo ("": found by kind)


def _openai(model: str, sha256: str, filename: str) -> Weights:
  url = f"https://openaipublic.azureedge.net/clip/models/{sha256}/{filename}"
  return Weights(model=model, act="quick_gelu", source="openai", url=url, sha256=sha256)


# openai/CLIP's clip.load names and URLs; the second-to-last path part is the file's SHA256.
OPENAI: dict[str, Weights] = {
    "RN50": _openai("rn50", "afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762",
                    "RN50.pt"),
    "RN101": _openai("rn101", "8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599",
                     "RN101.pt"),
    "RN50x4": _openai("rn50x4", "7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd",
                      "RN50x4.pt"),
    "RN50x16": _openai("rn50x16",
                       "52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa",
                       "RN50x16.pt"),
    "RN50x64": _openai("rn50x64",
                       "be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c",
                       "RN50x64.pt"),
    "ViT-B/32": _openai("vitb32", "40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af",
                        "ViT-B-32.pt"),
    "ViT-B/16": _openai("vitb16", "5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f",
                        "ViT-B-16.pt"),
    "ViT-L/14": _openai("vitl14", "b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836",
                        "ViT-L-14.pt"),
    "ViT-L/14@336px": _openai("vitl14_336",
                              "3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02",
                              "ViT-L-14-336px.pt"),
}

_OC_RELEASES = "https://github.com/mlfoundations/open_clip/releases/download/v0.2-weights/"


def _release(model: str, act: str, filename: str) -> Weights:
  """open_clip's GitHub release weights: the file name ends in a SHA256 prefix."""
  prefix = os.path.splitext(filename)[0].rsplit("-", 1)[-1]
  return Weights(model=model, act=act, source="open_clip", url=_OC_RELEASES + filename,
                 sha256=prefix)


def _hub(model: str, repo: str, act: str = "gelu") -> Weights:
  return Weights(model=model, act=act, source="open_clip", hf_hub=repo)


# open_clip's pretrained tags (open_clip/pretrained.py) of the architectures clip_jax has, with
# the activation the weights were trained with (open_clip's "-quickgelu" models). Tags whose
# preprocessing differs from OpenAI's mean/std (ViT-L-14 laion2b_s32b_b82k: Inception's) are
# left out: clip_jax preprocesses as OpenAI does.
OPEN_CLIP: dict[str, Weights] = {
    **{f"{arch}/openai": OPENAI[name] for arch, name in (
        ("RN50", "RN50"), ("RN101", "RN101"), ("RN50x4", "RN50x4"), ("RN50x16", "RN50x16"),
        ("RN50x64", "RN50x64"), ("ViT-B-32", "ViT-B/32"), ("ViT-B-16", "ViT-B/16"),
        ("ViT-L-14", "ViT-L/14"), ("ViT-L-14-336", "ViT-L/14@336px"))},
    "RN50/yfcc15m": _release("rn50", "quick_gelu", "rn50-quickgelu-yfcc15m-455df137.pt"),
    "RN50/cc12m": _release("rn50", "quick_gelu", "rn50-quickgelu-cc12m-f000538c.pt"),
    "RN101/yfcc15m": _release("rn101", "quick_gelu", "rn101-quickgelu-yfcc15m-3e04b30e.pt"),
    "ViT-B-32/laion400m_e31": _release("vitb32", "quick_gelu",
                                       "vit_b_32-quickgelu-laion400m_e31-d867053b.pt"),
    "ViT-B-32/laion400m_e32": _release("vitb32", "quick_gelu",
                                       "vit_b_32-quickgelu-laion400m_e32-46683a32.pt"),
    "ViT-B-32/laion2b_e16": _release("vitb32", "gelu", "vit_b_32-laion2b_e16-af8dbd0c.pth"),
    "ViT-B-32/laion2b_s34b_b79k": _hub("vitb32", "laion/CLIP-ViT-B-32-laion2B-s34B-b79K"),
    "ViT-B-32/datacomp_xl_s13b_b90k": _hub("vitb32", "laion/CLIP-ViT-B-32-DataComp.XL-s13B-b90K"),
    "ViT-B-16/laion400m_e31": _release("vitb16", "gelu", "vit_b_16-laion400m_e31-00efa78f.pt"),
    "ViT-B-16/laion400m_e32": _release("vitb16", "gelu", "vit_b_16-laion400m_e32-55e67d44.pt"),
    "ViT-B-16/laion2b_s34b_b88k": _hub("vitb16", "laion/CLIP-ViT-B-16-laion2B-s34B-b88K"),
    "ViT-B-16/datacomp_xl_s13b_b90k": _hub("vitb16", "laion/CLIP-ViT-B-16-DataComp.XL-s13B-b90K"),
    "ViT-L-14/laion400m_e31": _release("vitl14", "gelu", "vit_l_14-laion400m_e31-69988bb6.pt"),
    "ViT-L-14/laion400m_e32": _release("vitl14", "gelu", "vit_l_14-laion400m_e32-3d133497.pt"),
    "ViT-L-14/datacomp_xl_s13b_b90k": _hub("vitl14", "laion/CLIP-ViT-L-14-DataComp.XL-s13B-b90K"),
}

class PretrainedError(ValueError):
  """A name that cannot be resolved: unknown, not cached offline, a failed download or hash."""


def is_name(path) -> bool:
  """Whether `path` is a pretrained name (one of PREFIXES) rather than a path."""
  return isinstance(path, str) and path.startswith(PREFIXES)


def known_names() -> list[str]:
  """Every registered name (what `python -m clip_jax.convert --list` prints)."""
  return [f"openai:{n}" for n in OPENAI] + [f"open_clip:{n}" for n in OPEN_CLIP]


def _listing(names: list[str], limit: int = 12) -> str:
  shown = ", ".join(names[:limit])
  return shown + (f", ... ({len(names)} in all; python -m clip_jax.convert --list)"
                  if len(names) > limit else "")


def lookup(name: str) -> Optional[Weights]:
  """The registry entry of an openai: or open_clip: name (PretrainedError if unknown); None
  for hf-hub: and local-dir: names, which name their own location."""
  kind, _, rest = name.partition(":")
  if kind == "openai":
    if rest not in OPENAI:
      raise PretrainedError(f"unknown pretrained name {name!r}; OpenAI's are "
                            f"{_listing([f'openai:{n}' for n in OPENAI])}")
    return OPENAI[rest]
  if kind == "open_clip":
    arch, _, tag = rest.partition("/")
    key = f"{arch.removesuffix('-quickgelu')}/{tag}"
    if key not in OPEN_CLIP:
      base = key.partition("/")[0]
      same_arch = [f"open_clip:{n}" for n in OPEN_CLIP if n.partition("/")[0] == base]
      archs = sorted({n.partition("/")[0] for n in OPEN_CLIP})
      known = (f"the tags of {base}: {', '.join(same_arch)}" if same_arch else
               f"architectures {', '.join(archs)} (python -m clip_jax.convert --list)")
      raise PretrainedError(f"unknown pretrained name {name!r} (open_clip:ARCH/TAG); known: "
                            f"{known}")
    return OPEN_CLIP[key]
  if kind == "hf-hub":
    repo = rest.partition("@")[0]
    if not re.fullmatch(r"[\w.-]+/[\w.-]+", repo):
      raise PretrainedError(f"{name!r}: expected hf-hub:ORG/REPO or hf-hub:ORG/REPO@REVISION")
    return None
  if kind == "local-dir":
    if not rest:
      raise PretrainedError(f"{name!r}: expected local-dir:PATH")
    return None
  raise PretrainedError(f"{name!r} is not a pretrained name; use one of "
                        f"{', '.join(p + '...' for p in PREFIXES)}")


def check_name(name: str) -> None:
  """Raises PretrainedError (one line) for a malformed or unknown name; reads nothing."""
  lookup(name)
