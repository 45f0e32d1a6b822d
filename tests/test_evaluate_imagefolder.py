"""Class-folder datasets: the source, their class names (WordNet ids, plain, a registry
entry) and their batches (the command line on them: tests/test_evaluate_suite.py)."""
import json

import numpy as np
import pytest
from PIL import Image

from clip_jax.assets import asset_path
from clip_jax.data import imagefolder
from clip_jax.evaluate import datasets, registry


def make_folders(root, classes, per_class=2, size=(20, 28)):
  rng = np.random.default_rng(0)
  for c in classes:
    (root / c).mkdir(parents=True)
    for i in range(per_class):
      Image.fromarray(rng.integers(0, 255, size + (3,), np.uint8)).save(root / c / f"{i}.png")
  return root


def test_source_records_in_folder_then_file_order(tmp_path):
  root = make_folders(tmp_path / "val", ["dog", "cat"], per_class=2)
  (root / "cat" / "notes.txt").write_text("not an image")
  (root / "cat" / "2.JPEG").write_bytes((root / "cat" / "0.png").read_bytes())
  source = imagefolder.ImageFolderSource(str(root))
  assert imagefolder.class_folders(str(root)) == ["cat", "dog"]
  assert len(source) == 5 and source.name == "val" and source.classnames == ["cat", "dog"]
  keys = [source.record(i, np.random.default_rng(0))["key"] for i in range(5)]
  assert keys == ["cat/0.png", "cat/1.png", "cat/2.JPEG", "dog/0.png", "dog/1.png"]
  record = source.record(3, np.random.default_rng(0))
  assert record["label"] == 1 and record["caption"] == "a photo of a dog."
  assert record["captions"] == ["a photo of a dog."]
  assert record["image"] == (root / "dog" / "0.png").read_bytes()
  named = imagefolder.ImageFolderSource(str(root), classnames=["kitten", "puppy"])
  assert named.record(0, None)["caption"] == "a photo of a kitten."


def test_source_errors_are_one_line(tmp_path):
  with pytest.raises(ValueError, match=r"image folder .*nope does not exist"):
    imagefolder.validate(str(tmp_path / "nope"))
  (tmp_path / "flat").mkdir()
  with pytest.raises(ValueError, match=r"has no class sub-folders"):
    imagefolder.validate(str(tmp_path / "flat"))
  (tmp_path / "flat" / "empty_class").mkdir()
  with pytest.raises(ValueError, match=r"hold no images"):
    imagefolder.validate(str(tmp_path / "flat"))
  root = make_folders(tmp_path / "two", ["a", "b"], per_class=1)
  with pytest.raises(ValueError, match=r"has 2 class sub-folders but 3 class names were given"):
    imagefolder.ImageFolderSource(str(root), classnames=["x", "y", "z"])


def test_wordnet_id_folders_take_openais_imagenet_names(tmp_path):
  wnids = registry.imagenet_wnids()
  # Three classes of ImageNet (tench, goldfish, toilet paper), in any folder subset.
  root = make_folders(tmp_path / "val", [wnids[0], wnids[1], wnids[999]], per_class=1)
  space = datasets.label_space(f"imagefolder:{root}", "test", None)
  assert space.names == ["tench", "goldfish", "toilet paper"]
  assert space.prompts_key == "imagenet" and list(space.columns) == [0, 1, 999]
  np.testing.assert_array_equal(space.map_labels(np.asarray([2, 0]), "x"), [2, 0])


def test_imagenet_a_folders_use_the_imagenet_a_columns(tmp_path):
  subset = json.loads(asset_path("imagenet_wnids.json").read_text())["imagenet_a"]
  root = make_folders(tmp_path / "imagenet-a", subset, per_class=0)
  (root / subset[0] / "x.png").write_bytes(b"")  # validate needs one image somewhere
  space = datasets.label_space(f"imagefolder:{root}", "test", None)
  assert list(space.columns) == list(registry.imagenet_subset_columns("imagenet_a"))
  assert space.names == list(registry.get_prompts("imagenet_a").classnames)


def test_plain_folders_are_the_class_names(tmp_path):
  root = make_folders(tmp_path / "pets", ["golden_retriever", "tabby cat"], per_class=1)
  space = datasets.label_space(f"imagefolder:{root}", "test", None)
  assert space.names == ["golden retriever", "tabby cat"] and space.columns is None
  assert space.templates == registry.get_prompts("imagenet").templates


def test_registry_classnames_apply_in_order_to_the_sorted_folders(tmp_path):
  root = make_folders(tmp_path / "digits", [f"{d}" for d in range(10)], per_class=1)
  space = datasets.label_space(f"imagefolder:{root}", "test", None, "mnist")
  assert space.names == list(registry.get_prompts("mnist").classnames)
  assert space.templates == registry.get_prompts("mnist").templates


def test_split_subfolders_are_used_when_present(tmp_path):
  make_folders(tmp_path / "set" / "train", ["a", "b"], per_class=2)
  make_folders(tmp_path / "set" / "test", ["a", "b"], per_class=1)
  assert datasets.imagefolder_root(f"imagefolder:{tmp_path / 'set'}", "train") == str(
      tmp_path / "set" / "train")
  batches = list(datasets.eval_batches(f"imagefolder:{tmp_path / 'set'}", "train", None,
                                       image_size=16, local_batch=8, num_examples=None))
  labels = np.concatenate([b["labels"][b["mask"]] for b in batches])
  np.testing.assert_array_equal(labels, [0, 0, 1, 1])
  assert batches[0]["images"].shape == (8, 16, 16, 3)


def test_a_probe_on_folders_needs_a_training_split_folder(tmp_path):
  root = make_folders(tmp_path / "val", ["a", "b"], per_class=1)
  with pytest.raises(ValueError, match=r"trains on .*/val/train/<class>/, which does not exist"):
    datasets.validate_dataset(f"imagefolder:{root}", "train", None, train=True)
  make_folders(tmp_path / "set" / "train", ["a", "b"], per_class=1)
  datasets.validate_dataset(f"imagefolder:{tmp_path / 'set'}", "train", None, train=True)
  # The evaluation split must be one of the split folders too.
  with pytest.raises(ValueError, match=r"split folders \(train\) but no 'test'; pass --split"):
    datasets.validate_dataset(f"imagefolder:{tmp_path / 'set'}", "test", None)
