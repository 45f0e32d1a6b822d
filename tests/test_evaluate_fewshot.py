"""Few-shot linear probes: k per class drawn per seed, mean and std over seeds."""
import numpy as np
import pytest

from clip_jax.evaluate import fewshot

# 4 classes, unbalanced (class 3 has only 3 examples), shuffled.
LABELS = np.random.default_rng(0).permutation(np.repeat(np.arange(4), [10, 7, 5, 3]))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_exactly_k_of_every_class(k):
  idx = fewshot.sample_k_shot(LABELS, k, seed=0, num_classes=4)
  assert len(idx) == len(set(idx.tolist())) == 4 * k and np.all(np.diff(idx) > 0)
  np.testing.assert_array_equal(np.bincount(LABELS[idx], minlength=4), [k] * 4)


def test_draws_differ_per_seed_and_repeat_per_seed():
  draws = [fewshot.sample_k_shot(LABELS, 2, seed=s, num_classes=4) for s in range(4)]
  assert len({tuple(d) for d in draws}) == 4
  for seed, draw in enumerate(draws):
    np.testing.assert_array_equal(fewshot.sample_k_shot(LABELS, 2, seed=seed, num_classes=4), draw)


def test_a_class_short_of_k_is_one_error_naming_it():
  with pytest.raises(ValueError, match=r"^class 3 \('zebra'\) has 3 training examples, fewer than "
                                       r"the 4 a 4-shot probe needs"):
    fewshot.sample_k_shot(LABELS, 4, seed=0, num_classes=4, classnames=["a", "b", "c", "zebra"])
  # A class with no training example at all.
  with pytest.raises(ValueError, match=r"^class 4 has 0 training examples"):
    fewshot.sample_k_shot(LABELS, 1, seed=0, num_classes=5)


@pytest.mark.parametrize("text, shots", [("1,2,4,8,16", [1, 2, 4, 8, 16]), ("4,1,4", [1, 4])])
def test_parse_shots(text, shots):
  assert fewshot.parse_shots(text) == shots


@pytest.mark.parametrize("text", ["", "0,1", "1,two"])
def test_parse_shots_rejects(text):
  with pytest.raises(ValueError, match="--shots must be a comma list of positive integers"):
    fewshot.parse_shots(text)


@pytest.mark.slow  # two L-BFGS compiles (~10 s); the smoke suite runs a 1-shot probe by default
def test_fewshot_probe_mean_and_std_over_seeds():
  # Separable clusters: every probe is perfect, so the mean is 1 and the spread 0.
  rng = np.random.default_rng(1)
  centers = np.eye(4, 8) * 4
  train_labels = np.repeat(np.arange(4), 5)
  test_labels = np.repeat(np.arange(4), 3)
  train = centers[train_labels] + 0.1 * rng.normal(size=(20, 8))
  test = centers[test_labels] + 0.1 * rng.normal(size=(12, 8))
  metrics, per_seed = fewshot.fewshot_probe(train, train_labels, test, test_labels, shots=[2],
                                            seeds=[0, 1], num_classes=4, max_iters=100)
  assert set(metrics) == {f"2shot_{k}{s}" for k in fewshot.PROBE_KEYS for s in ("", "_std")}
  assert metrics["2shot_lp_acc1"] == 1.0 and metrics["2shot_lp_acc1_std"] == 0.0
  assert [r["seed"] for r in per_seed["2"]] == [0, 1]
  # The std is the population std of the per-seed values.
  acc5 = [r["lp_acc5"] for r in per_seed["2"]]
  assert metrics["2shot_lp_acc5"] == pytest.approx(np.mean(acc5))
