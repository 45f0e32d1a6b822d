"""Linear probe: multinomial L2-regularised logistic regression on frozen image features.

As in the CLIP paper, the regularisation strength is chosen on a held-out part of the
training split, then the probe is retrained on the whole training split and scored on
the test split. The solver is optax's L-BFGS, in JAX.
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax
import optax.tree_utils as otu

from clip_jax.evaluate.zeroshot import classification_metrics

# L2 strengths (on the mean loss) swept by default: wide enough for unit-norm features.
DEFAULT_L2_GRID = tuple(float(x) for x in np.logspace(-8, 0, 9))


def objective(weights, features, labels, l2):
  """Mean softmax cross-entropy + l2/2 * ||W||^2 (the bias is not penalised)."""
  w, b = weights
  logits = features @ w + b
  ce = optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
  return ce + 0.5 * l2 * jnp.sum(w * w)


@functools.partial(jax.jit, static_argnames=("num_classes", "max_iters"))
def _fit(features, labels, l2s, num_classes: int, max_iters: int, tol):
  """Solves one probe per entry of l2s (vmapped); returns stacked (W, b)."""
  dim = features.shape[1]

  def solve(l2):
    fun = functools.partial(objective, features=features, labels=labels, l2=l2)
    opt = optax.lbfgs()
    value_and_grad = optax.value_and_grad_from_state(fun)

    def step(carry):
      params, state = carry
      value, grad = value_and_grad(params, state=state)
      updates, state = opt.update(grad, state, params, value=value, grad=grad, value_fn=fun)
      return optax.apply_updates(params, updates), state

    def keep_going(carry):
      _, state = carry
      count = otu.tree_get(state, "count")
      grad_norm = otu.tree_norm(otu.tree_get(state, "grad"))
      return (count == 0) | ((count < max_iters) & (grad_norm >= tol))

    init = (jnp.zeros((dim, num_classes), jnp.float32), jnp.zeros((num_classes,), jnp.float32))
    params, _ = jax.lax.while_loop(keep_going, step, (init, opt.init(init)))
    return params

  return jax.vmap(solve)(l2s)


def fit_logistic_regression(features: np.ndarray, labels: np.ndarray, num_classes: int,
                            l2: float | Sequence[float], max_iters: int = 1000,
                            tol: float = 1e-6):
  """(W [dim, classes], b [classes]) minimising `objective`; a sequence of l2 gives stacked ones."""
  features = jnp.asarray(features, jnp.float32)
  labels = jnp.asarray(labels, jnp.int32)
  single = np.ndim(l2) == 0
  l2s = jnp.asarray(np.atleast_1d(l2), jnp.float32)
  w, b = _fit(features, labels, l2s, num_classes, max_iters, jnp.float32(tol))
  w, b = np.asarray(w), np.asarray(b)
  return (w[0], b[0]) if single else (w, b)


def predict_logits(weights, features: np.ndarray) -> np.ndarray:
  w, b = weights
  return np.asarray(features, np.float64) @ np.asarray(w, np.float64) + np.asarray(b, np.float64)


def split_train_val(num: int, val_fraction: float, seed: int):
  """A deterministic shuffled split of range(num) into (train indices, held-out indices)."""
  if not 0 < val_fraction < 1:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  num_val = min(max(1, int(round(num * val_fraction))), num - 1)
  if num < 2:
    raise ValueError(f"need at least 2 training examples for a held-out split, got {num}")
  order = np.random.default_rng(seed).permutation(num)
  return np.sort(order[num_val:]), np.sort(order[:num_val])


def linear_probe(train_features: np.ndarray, train_labels: np.ndarray,
                 test_features: np.ndarray, test_labels: np.ndarray,
                 num_classes: Optional[int] = None,
                 l2_grid: Sequence[float] = DEFAULT_L2_GRID, val_fraction: float = 0.2,
                 seed: int = 0, max_iters: int = 1000) -> dict[str, float]:
  """Sweeps l2 on a held-out part of train, retrains on all of train, scores test.

  Returns CLIP_benchmark's keys (lp_acc1, lp_acc5, lp_mean_per_class_recall) plus the
  chosen l2 and its held-out accuracy.
  """
  train_labels = np.asarray(train_labels, np.int64)
  test_labels = np.asarray(test_labels, np.int64)
  if num_classes is None:
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
  if not len(l2_grid):
    raise ValueError("l2_grid must hold at least one regularisation strength")
  fit_idx, val_idx = split_train_val(len(train_labels), val_fraction, seed)
  ws, bs = fit_logistic_regression(train_features[fit_idx], train_labels[fit_idx], num_classes,
                                   list(l2_grid), max_iters=max_iters)
  val_acc = [
      classification_metrics(predict_logits((w, b), train_features[val_idx]),
                             train_labels[val_idx])["top1"] for w, b in zip(ws, bs)]
  best = int(np.argmax(val_acc))  # ties: the smallest l2 of the grid order given
  weights = fit_logistic_regression(train_features, train_labels, num_classes, l2_grid[best],
                                    max_iters=max_iters)
  test = classification_metrics(predict_logits(weights, test_features), test_labels)
  return {
      "lp_acc1": test["top1"],
      "lp_acc5": test["top5"],
      "lp_mean_per_class_recall": test["mean_per_class_recall"],
      "best_l2": float(l2_grid[best]),
      "val_acc1": float(val_acc[best]),
  }
