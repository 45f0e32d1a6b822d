"""Data files shipped inside the package, so nothing is fetched at run time.

Files (see `asset_path`):
  bpe_simple_vocab_16e6.txt.gz  OpenAI CLIP's byte-level BPE merges (gzip text; line 0 is a header).
  imagenet_zeroshot.json        {"source": str, "classes": [1000 str], "templates": [80 str]}; "{}" in a
                                template is replaced by a class name.
  zeroshot_prompts.json         The 26 datasets of openai/CLIP data/prompts.md:
                                {dataset_key: {"name": str, "classes": [...], "templates": [str, ...]}}.
                                dataset_key is the prompts.md heading lowercased ("cifar10",
                                "sun397", "facialemotionrecognition2013", ...), in file order. A class
                                is a str, or, where the source gives several names for one class
                                (FacialEmotionRecognition2013: ["happy", "smiling"]), a list of str
                                whose prompts are all averaged into that class's embedding; that
                                dataset lists every class as a list, as the source does. Regenerate:
                                `python -m clip_jax.assets.make_zeroshot_prompts prompts.md`.
  LICENSE_openai_clip           The MIT notice covering the three files above (Copyright (c) 2021 OpenAI).
  imagenet_wnids.json           {"source": str, "imagenet": [1000 WordNet ids, sorted: the class order of
                                imagenet_zeroshot.json], "imagenet_a": [200], "imagenet_r": [200]}: the
                                class subsets of ImageNet-A (hendrycks/natural-adv-examples) and
                                ImageNet-R (hendrycks/imagenet-r), both MIT (c) Dan Hendrycks.
"""
import pathlib

_ASSET_DIR = pathlib.Path(__file__).resolve().parent
ASSET_NAMES = (
    "bpe_simple_vocab_16e6.txt.gz",
    "imagenet_zeroshot.json",
    "zeroshot_prompts.json",
    "LICENSE_openai_clip",
    "imagenet_wnids.json",
)


def asset_path(name: str) -> pathlib.Path:
  """Path of a packaged data file, e.g. asset_path("bpe_simple_vocab_16e6.txt.gz")."""
  if name not in ASSET_NAMES:
    raise ValueError(f"unknown asset {name!r}; known assets: {', '.join(ASSET_NAMES)}")
  path = _ASSET_DIR / name
  if not path.is_file():
    raise FileNotFoundError(f"asset {name!r} is missing from {_ASSET_DIR}; reinstall clip_jax")
  return path
