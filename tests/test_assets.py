"""Packaged data files: present, readable without the shared folder, and equal to their sources."""
import gzip
import json
import pathlib
import re

import pytest

import clip_jax
from clip_jax.assets import ASSET_NAMES, asset_path

PACKAGE_DIR = pathlib.Path(clip_jax.__file__).resolve().parent


def test_every_asset_ships_inside_the_package():
  for name in ASSET_NAMES:
    path = asset_path(name)
    assert path.is_file() and path.parent == PACKAGE_DIR / "assets"


def test_unknown_asset_is_a_clear_error():
  with pytest.raises(ValueError, match=r"unknown asset 'vocab\.txt'.*bpe_simple_vocab_16e6\.txt\.gz"):
    asset_path("vocab.txt")


def test_vocab_loads_from_the_package():
  lines = gzip.open(asset_path("bpe_simple_vocab_16e6.txt.gz")).read().decode("utf-8").split("\n")
  assert "#version" in lines[0]  # the header line, skipped by the tokenizer
  merges = [tuple(line.split()) for line in lines[1:49152 - 256 - 2 + 1]]
  assert len(merges) == 48894 and all(len(m) == 2 for m in merges)
  assert merges[0] == ("i", "n")


def test_vocab_and_imagenet_are_byte_copies_of_the_shared_files(shared_dir):
  for name in ("bpe_simple_vocab_16e6.txt.gz", "imagenet_zeroshot.json"):
    assert asset_path(name).read_bytes() == (shared_dir / "data/openai_clip" / name).read_bytes()


def test_license_carries_the_mit_notice(shared_dir):
  text = asset_path("LICENSE_openai_clip").read_text()
  assert (shared_dir / "data/openai_clip/LICENSE").read_text().strip() in text
  for name in ("bpe_simple_vocab_16e6.txt.gz", "imagenet_zeroshot.json", "zeroshot_prompts.json"):
    assert name in text


def test_imagenet_has_1000_classes_and_80_templates():
  data = json.loads(asset_path("imagenet_zeroshot.json").read_text())
  assert len(data["classes"]) == 1000 and all(isinstance(c, str) and c for c in data["classes"])
  assert len(data["templates"]) == 80 and all("{}" in t for t in data["templates"])
  assert data["classes"][0] == "tench" and data["classes"][-1] == "toilet paper"


def _reparse_prompts_md(text):
  """A line-by-line reading of prompts.md, independent of the ast-based generator."""
  datasets, name, current = {}, None, None
  for line in text.splitlines():
    if line.startswith("## "):
      name = line[3:].strip()
      datasets[name.lower()] = {"name": name, "classes": [], "templates": []}
    elif line in ("classes = [", "templates = ["):
      current = datasets[name.lower()][line.split()[0]]
    elif line == "]":
      current = None
    elif current is not None:
      # One entry per line: 'x', "x" or ['x', 'y'] (several names for one class), with a trailing comma.
      strings = [a or b for a, b in re.findall(r"'([^']*)'|\"([^\"]*)\"", line)]
      current.append(strings if line.strip().startswith("[") else strings[0])
      assert len(strings) == 1 or line.strip().startswith("["), line
  return datasets


def test_zeroshot_prompts_match_prompts_md(shared_dir):
  expected = _reparse_prompts_md((shared_dir / "data/openai_clip/prompts.md").read_text(encoding="utf-8"))
  packaged = json.loads(asset_path("zeroshot_prompts.json").read_text(encoding="utf-8"))
  assert len(packaged) == 26
  assert packaged == expected
  assert list(packaged) == list(expected)


def test_zeroshot_prompts_shape():
  packaged = json.loads(asset_path("zeroshot_prompts.json").read_text(encoding="utf-8"))
  counts = {key: (len(d["classes"]), len(d["templates"])) for key, d in packaged.items()}
  assert counts["cifar10"] == (10, 18) and counts["cifar100"] == (100, 18)
  assert counts["sun397"] == (397, 2) and counts["kinetics700"] == (700, 28) and counts["birdsnap"] == (500, 1)
  fer = packaged["facialemotionrecognition2013"]["classes"]
  assert fer[3] == ["happy", "smiling"] and fer[5] == ["surprised", "shocked", "spooked"] and fer[0] == ["angry"]
  for d in packaged.values():
    assert all("{}" in t for t in d["templates"]), d["name"]
