"""Few-shot linear probes: k training examples per class, several seeds, mean and std.

As in the CLIP paper's zero-shot vs k-shot comparison: for each k and seed, k examples of
every class are drawn from the training features and `linear_probe` (L-BFGS logistic
regression with its regularisation sweep) is fitted on them and scored on the test split.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np

from clip_jax.evaluate.linear_probe import linear_probe

PROBE_KEYS = ("lp_acc1", "lp_acc5", "lp_mean_per_class_recall")


def parse_shots(text: str) -> list[int]:
  """"1,2,4" -> [1, 2, 4]; ValueError (one line) for anything but positive integers."""
  try:
    shots = [int(s) for s in text.split(",") if s.strip()]
  except ValueError:
    raise ValueError(f"--shots must be a comma list of positive integers, got {text!r}") from None
  if not shots or min(shots) < 1:
    raise ValueError(f"--shots must be a comma list of positive integers, got {text!r}")
  return sorted(set(shots))


def sample_k_shot(labels: np.ndarray, k: int, seed: int, num_classes: int,
                  classnames: Optional[Sequence] = None) -> np.ndarray:
  """Sorted indices of exactly k examples of each class 0..num_classes-1, drawn by `seed`.

  A class with fewer than k examples is a ValueError naming it.
  """
  labels = np.asarray(labels, np.int64)
  rng = np.random.default_rng([int(seed), int(k)])
  chosen = []
  for c in range(num_classes):
    members = np.flatnonzero(labels == c)
    if len(members) < k:
      name = classnames[c] if classnames is not None else None
      name = name if name is None or isinstance(name, str) else name[0]
      label = f"class {c}" + (f" ({name!r})" if name is not None else "")
      raise ValueError(f"{label} has {len(members)} training examples, fewer than the "
                       f"{k} a {k}-shot probe needs; lower --shots or add training data")
    chosen.append(rng.choice(members, size=k, replace=False))
  return np.sort(np.concatenate(chosen))


def fewshot_probe(train_features: np.ndarray, train_labels: np.ndarray,
                  test_features: np.ndarray, test_labels: np.ndarray, *, shots: Sequence[int],
                  seeds: Sequence[int], num_classes: int,
                  classnames: Optional[Sequence] = None, max_iters: int = 1000):
  """(metrics, per_seed): metrics {"{k}shot_{key}": mean, "{k}shot_{key}_std": std} over
  seeds for each k and PROBE_KEYS; per_seed {k: [probe metrics with "seed"]}."""
  metrics, per_seed = {}, {}
  for k in shots:
    runs = []
    for seed in seeds:
      idx = sample_k_shot(train_labels, k, seed, num_classes, classnames)
      result = linear_probe(train_features[idx], np.asarray(train_labels)[idx], test_features,
                            test_labels, num_classes=num_classes, seed=seed,
                            max_iters=max_iters)
      runs.append({"seed": int(seed), **result})
    per_seed[str(k)] = runs
    for key in PROBE_KEYS:
      values = np.asarray([r[key] for r in runs], np.float64)
      metrics[f"{k}shot_{key}"] = float(values.mean())
      metrics[f"{k}shot_{key}_std"] = float(values.std())
  return metrics, per_seed
