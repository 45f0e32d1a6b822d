"""Contrastive losses: numpy references, and chunked (ring) == global on several meshes."""
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from clip_jax import losses
from clip_jax.sharding import create_mesh

B, D = 16, 8
LOGIT_SCALE = np.log(10.0)
LOGIT_BIAS = -3.0


def features(seed):
  rng = np.random.default_rng(seed)
  x = rng.normal(size=(B, D))
  y = x + 0.8 * rng.normal(size=(B, D))  # correlated pairs, so top-1 is neither 0 nor 1
  x /= np.linalg.norm(x, axis=1, keepdims=True)
  y /= np.linalg.norm(y, axis=1, keepdims=True)
  return x, y


def numpy_reference(x, y, loss, logit_scale, logit_bias):
  """The loss and metrics written plainly on the whole float64 matrix."""
  logits = np.exp(logit_scale) * x @ y.T + (logit_bias if loss == "sigmoid" else 0.0)
  n = len(x)
  eye = np.eye(n, dtype=bool)
  if loss == "softmax":
    def ce(l):
      lse = np.log(np.sum(np.exp(l - l.max(1, keepdims=True)), 1)) + l.max(1)
      return np.mean(lse - np.diag(l))
    value = 0.5 * (ce(logits) + ce(logits.T))
  else:
    labels = 2 * np.eye(n) - 1
    value = np.sum(np.log1p(np.exp(-labels * logits))) / n
  negatives = np.where(eye, -np.inf, logits)
  pos = np.diag(logits)
  return value, {
      "i2t_top1": np.mean(pos > negatives.max(1)),
      "t2i_top1": np.mean(pos > negatives.max(0)),
      "pos_logit_mean": pos.mean(),
      "neg_logit_mean": logits[~eye].mean(),
  }


def mesh_of(**axes):
  return create_mesh(ml_collections.ConfigDict({"mesh": axes, "dcn_mesh": {}}))


def run(loss, impl, mesh=None, chunk_size=0, seed=0):
  x, y = features(seed)
  bias = jnp.float32(LOGIT_BIAS) if loss == "sigmoid" else None

  def f(x, y, scale, bias):
    return losses.contrastive_loss(x, y, scale, bias, loss=loss, impl=impl, mesh=mesh,
                                   chunk_size=chunk_size)

  argnums = (0, 1, 2, 3) if bias is not None else (0, 1, 2)
  fn = jax.jit(jax.value_and_grad(f, argnums=argnums, has_aux=True))
  (value, metrics), grads = fn(jnp.float32(x), jnp.float32(y), jnp.float32(LOGIT_SCALE), bias)
  return float(value), {k: float(v) for k, v in metrics.items()}, [np.asarray(g) for g in grads]


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
@pytest.mark.parametrize("impl,chunk", [("global", 0), ("chunked", 0), ("chunked", 4)])
def test_matches_numpy_reference(loss, impl, chunk):
  x, y = features(0)
  ref_value, ref_metrics = numpy_reference(x, y, loss, LOGIT_SCALE, LOGIT_BIAS)
  value, metrics, _ = run(loss, impl, chunk_size=chunk)
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  assert 0 < ref_metrics["i2t_top1"] < 1
  for key, ref in ref_metrics.items():
    np.testing.assert_allclose(metrics[key], ref, rtol=1e-5, atol=1e-6, err_msg=key)


def test_softmax_closed_form():
  # Identical one-hot pairs: logits are s on the diagonal and 0 elsewhere.
  n, s = 4, 5.0
  x = jnp.eye(n, dtype=jnp.float32)
  expected = np.log(np.exp(s) + n - 1) - s
  for impl in ("global", "chunked"):
    value, metrics = losses.contrastive_loss(x, x, jnp.log(s), impl=impl)
    np.testing.assert_allclose(float(value), expected, rtol=1e-6, atol=1e-6)
    assert float(metrics["i2t_top1"]) == 1.0 and float(metrics["t2i_top1"]) == 1.0


@pytest.mark.parametrize("loss", ["softmax", "sigmoid"])
@pytest.mark.parametrize("mesh_axes,chunk", [
    (None, 4), ({"data": 8}, 0), ({"data": 2, "fsdp": 4}, 0),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 2)])
def test_chunked_equals_global(loss, mesh_axes, chunk):
  ref_value, ref_metrics, ref_grads = run(loss, "global")
  mesh = mesh_of(**mesh_axes) if mesh_axes else None
  for impl in ("global", "chunked"):
    value, metrics, grads = run(loss, impl, mesh=mesh, chunk_size=chunk)
    np.testing.assert_allclose(value, ref_value, rtol=1e-5)
    for key in ref_metrics:
      np.testing.assert_allclose(metrics[key], ref_metrics[key], rtol=1e-5, atol=1e-6)
    for g, ref in zip(grads, ref_grads):
      # Scalars (logit scale, bias) are sums of B^2 O(1) terms that cancel: compare absolutely.
      atol = 1e-5 * (np.abs(ref).max() if ref.ndim else 1.0)
      np.testing.assert_allclose(g, ref, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("impl", ["global", "chunked"])
def test_logit_scale_grad_matches_float64(impl):
  x, y = features(0)
  scale = np.exp(LOGIT_SCALE)
  logits = scale * x @ y.T
  p_rows = np.exp(logits - logits.max(1, keepdims=True))
  p_rows /= p_rows.sum(1, keepdims=True)
  p_cols = np.exp(logits - logits.max(0, keepdims=True))
  p_cols /= p_cols.sum(0, keepdims=True)
  grad_logits = (p_rows + p_cols) / (2 * B) - np.eye(B) / B
  expected = np.sum(grad_logits * logits)  # d loss / d log(scale)
  _, _, grads = run("softmax", impl, chunk_size=4)
  np.testing.assert_allclose(grads[2], expected, atol=5e-6)
  expected_dx = scale * grad_logits @ y
  np.testing.assert_allclose(grads[0], expected_dx, rtol=1e-4, atol=1e-6)


def test_auto_chunk_bounds_block():
  assert losses.auto_chunk(4096) == 4096          # 4096 x 4096 = 2^24 logits: one block
  assert losses.auto_chunk(32768) == 512          # 32768 x 512 = 2^24
  assert losses.auto_chunk(96) == 96
  with pytest.raises(ValueError, match="loss_chunk_size=5"):
    losses.auto_chunk(16, 5)


def test_unknown_loss_raises():
  x = jnp.ones((2, 2))
  with pytest.raises(ValueError, match="unknown loss"):
    losses.contrastive_loss(x, x, 0.0, loss="hinge")
  with pytest.raises(ValueError, match="unknown loss_impl"):
    losses.contrastive_loss(x, x, 0.0, impl="ring")
