"""ImageNet-A / ImageNet-R: the packaged 200-class subsets against the lists published with
those datasets, and how their labels meet the 1000-class ImageNet classifier."""
import json

import numpy as np
import pytest

from clip_jax.assets import asset_path
from clip_jax.evaluate import datasets, registry

# indices_in_1k of https://github.com/hendrycks/natural-adv-examples/blob/master/eval.py
# ([k for k in thousand_k_to_200 if thousand_k_to_200[k] != -1]).
IMAGENET_A_INDICES_IN_1K = [
    6, 11, 13, 15, 17, 22, 23, 27, 30, 37, 39, 42, 47, 50, 57, 70, 71, 76, 79, 89, 90, 94, 96,
    97, 99, 105, 107, 108, 110, 113, 124, 125, 130, 132, 143, 144, 150, 151, 207, 234, 235,
    254, 277, 283, 287, 291, 295, 298, 301, 306, 307, 308, 309, 310, 311, 313, 314, 315, 317,
    319, 323, 324, 326, 327, 330, 334, 335, 336, 347, 361, 363, 372, 378, 386, 397, 400, 401,
    402, 404, 407, 411, 416, 417, 420, 425, 428, 430, 437, 438, 445, 456, 457, 461, 462, 470,
    472, 483, 486, 488, 492, 496, 514, 516, 528, 530, 539, 542, 543, 549, 552, 557, 561, 562,
    569, 572, 573, 575, 579, 589, 606, 607, 609, 614, 626, 627, 640, 641, 642, 643, 658, 668,
    677, 682, 684, 687, 701, 704, 719, 736, 746, 749, 752, 758, 763, 765, 768, 773, 774, 776,
    779, 780, 786, 792, 797, 802, 803, 804, 813, 815, 820, 823, 831, 833, 835, 839, 845, 847,
    850, 859, 862, 870, 879, 880, 888, 890, 897, 900, 907, 913, 924, 932, 933, 934, 937, 943,
    945, 947, 951, 954, 956, 957, 959, 971, 972, 980, 981, 984, 986, 987, 988,
]
# imagenet_r_indices, the comment under imagenet_r_mask in
# https://github.com/hendrycks/imagenet-r/blob/master/eval.py
IMAGENET_R_INDICES_IN_1K = [
    1, 2, 4, 6, 8, 9, 11, 13, 22, 23, 26, 29, 31, 39, 47, 63, 71, 76, 79, 84, 90, 94, 96, 97,
    99, 100, 105, 107, 113, 122, 125, 130, 132, 144, 145, 147, 148, 150, 151, 155, 160, 161,
    162, 163, 171, 172, 178, 187, 195, 199, 203, 207, 208, 219, 231, 232, 234, 235, 242, 245,
    247, 250, 251, 254, 259, 260, 263, 265, 267, 269, 276, 277, 281, 288, 289, 291, 292, 293,
    296, 299, 301, 308, 309, 310, 311, 314, 315, 319, 323, 327, 330, 334, 335, 337, 338, 340,
    341, 344, 347, 353, 355, 361, 362, 365, 366, 367, 368, 372, 388, 390, 393, 397, 401, 407,
    413, 414, 425, 428, 430, 435, 437, 441, 447, 448, 457, 462, 463, 469, 470, 471, 472, 476,
    483, 487, 515, 546, 555, 558, 570, 579, 583, 587, 593, 594, 596, 609, 613, 617, 621, 629,
    637, 657, 658, 701, 717, 724, 763, 768, 774, 776, 779, 780, 787, 805, 812, 815, 820, 824,
    833, 847, 852, 866, 875, 883, 889, 895, 907, 928, 931, 932, 933, 934, 936, 937, 943, 945,
    947, 948, 949, 951, 953, 954, 957, 963, 965, 967, 980, 981, 983, 988,
]


def _wnids():
  return json.loads(asset_path("imagenet_wnids.json").read_text())


def test_imagenet_wnids_are_the_1000_sorted_ids():
  wnids = _wnids()["imagenet"]
  assert len(wnids) == len(set(wnids)) == 1000 and wnids == sorted(wnids)
  assert wnids[0] == "n01440764" and wnids[-1] == "n15075141"
  assert registry.imagenet_wnids() == tuple(wnids)


def test_imagenet_wnids_equal_the_tfds_imagenet2012_labels():
  # An independent copy of the same list: TFDS's imagenet2012 ClassLabel names.
  common = pytest.importorskip("tensorflow_datasets.datasets.imagenet2012.imagenet_common")
  with open(common.label_names_file()) as f:
    assert f.read().split() == _wnids()["imagenet"]


@pytest.mark.parametrize("name, published", [("imagenet_a", IMAGENET_A_INDICES_IN_1K),
                                             ("imagenet_r", IMAGENET_R_INDICES_IN_1K)])
def test_subsets_match_the_published_indices(name, published):
  data = _wnids()
  subset = data[name]
  assert len(subset) == len(set(subset)) == 200 and subset == sorted(subset)
  assert set(subset) <= set(data["imagenet"])
  assert [data["imagenet"].index(w) for w in subset] == published
  assert list(registry.imagenet_subset_columns(name)) == published


def test_subset_prompts_are_imagenets_names_at_those_indices():
  imagenet = registry.get_prompts("imagenet")
  for name, published in (("imagenet_a", IMAGENET_A_INDICES_IN_1K),
                          ("imagenet_r", IMAGENET_R_INDICES_IN_1K)):
    prompts = registry.get_prompts(name)
    assert list(prompts.classnames) == [imagenet.classnames[i] for i in published]
    assert prompts.templates == imagenet.templates
  assert registry.get_prompts("imagenet_a").classnames[:3] == ("stingray", "goldfinch", "junco")


def test_tfds_imagenet_a_labels_in_1000_classes_map_onto_the_200_columns():
  # TFDS's imagenet_a / imagenet_r label in ImageNet's 1000 classes (their ClassLabel is
  # imagenet2012's names file): logits keep the 200 columns, labels move to them.
  space = datasets.label_space("imagenet_a", "test", None)
  assert space.prompts_key == "imagenet" and len(space.classnames) == 1000
  assert list(space.columns) == IMAGENET_A_INDICES_IN_1K and len(space.names) == 200
  labels = np.asarray([6, 988, 11])  # stingray, the last A class, goldfinch
  np.testing.assert_array_equal(space.map_labels(labels, "imagenet_a"), [0, 199, 1])
  with pytest.raises(ValueError, match=r"dataset 'imagenet_a' has labels \[0\] outside its 200"):
    space.map_labels(np.asarray([0, 6]), "imagenet_a")
  classifier = np.arange(3 * 1000, dtype=np.float32).reshape(3, 1000)
  np.testing.assert_array_equal(space.restrict(classifier),
                                classifier[:, IMAGENET_A_INDICES_IN_1K])


def test_imagenet_variants_share_the_imagenet_prompt_set():
  for name in ("imagenet2012", "imagenet_v2", "imagenet_sketch", "imagenet_r"):
    space = datasets.label_space(name, "test", None)
    assert space.prompts_key == "imagenet" and len(space.classnames) == 1000
  assert datasets.label_space("imagenet_v2", "test", None).columns is None
