"""Contrastive losses over the global batch: CLIP's softmax and SigLIP's sigmoid.

Inputs are L2-normalised features [B, D] (global arrays, rows split over the batch axes),
the log-space `logit_scale` and an optional `logit_bias`; logits are
`exp(logit_scale) * x @ y.T + bias`, always in float32.

Two implementations with the same value, gradients and metrics:
  global   written on the global arrays; the logits are constrained to be sharded by rows,
           so a device holds (B / batch shards) x B of them, never B x B.
  chunked  a ring over the batch axes (`jax.shard_map` + `ppermute` of the text block and
           its running column statistics), an online log-sum-exp, and a custom VJP that
           recomputes each block; a device never holds more than local_batch x chunk
           logits. On one device it is the same code with one block cut in column chunks.

Metrics (all without a B x B buffer in the chunked path): in-batch image->text and
text->image top-1 (the positive beats every negative), and the mean positive and negative
logits.
"""
from __future__ import annotations

import functools
from typing import Optional

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clip_jax.sharding import BATCH_AXES, batch_axis_size

# Auto chunk: at most this many logits in one block (64 MiB of float32).
MAX_BLOCK_ELEMENTS = 1 << 24
_HIGHEST = jax.lax.Precision.HIGHEST


def _dot_t(a, b):
  """a @ b.T in float32 at full precision (TPUs otherwise use bf16 passes for f32)."""
  return jnp.einsum("id,jd->ij", a, b, precision=_HIGHEST, preferred_element_type=jnp.float32)


def _scale_bias(logit_scale, logit_bias):
  scale = jnp.exp(jnp.asarray(logit_scale, jnp.float32))
  bias = jnp.zeros((), jnp.float32) if logit_bias is None else jnp.asarray(logit_bias, jnp.float32)
  return scale, bias


def _pair_metrics(pos_sum, x_sum, y_sum, scale, bias, global_batch):
  """Mean positive and negative logits; the sum of all logits is scale * (sum x).(sum y) + B^2 b."""
  # Python floats: B^2 overflows int32 (a jit argument) from a global batch of 46,341.
  total = scale * jnp.dot(x_sum, y_sum, precision=_HIGHEST) + bias * float(global_batch) ** 2
  num_neg = float(max(global_batch * (global_batch - 1), 1))
  return pos_sum / global_batch, (total - pos_sum) / num_neg


# ---------------------------------------------------------------------------------------
# global
# ---------------------------------------------------------------------------------------


def global_loss(image_features, text_features, logit_scale, logit_bias=None, *,
                loss: str = "softmax", mesh: Optional[Mesh] = None):
  """The loss on global arrays, logits sharded by rows over the batch axes of `mesh`."""
  x = image_features.astype(jnp.float32)
  y = text_features.astype(jnp.float32)
  scale, bias = _scale_bias(logit_scale, logit_bias)
  batch = x.shape[0]
  logits = scale * _dot_t(x, y) + bias
  if mesh is not None:
    logits = jax.lax.with_sharding_constraint(logits, NamedSharding(mesh, P(BATCH_AXES, None)))
  pos = scale * jnp.sum(x * y, axis=-1) + bias
  eye = jax.lax.broadcasted_iota(jnp.int32, logits.shape, 0) == jax.lax.broadcasted_iota(
      jnp.int32, logits.shape, 1)
  if loss == "softmax":
    lse_rows = jax.nn.logsumexp(logits, axis=1)
    lse_cols = jax.nn.logsumexp(logits, axis=0)
    value = 0.5 * (jnp.mean(lse_rows - pos) + jnp.mean(lse_cols - pos))
  elif loss == "sigmoid":
    signs = jnp.where(eye, 1.0, -1.0)
    value = -jnp.sum(jax.nn.log_sigmoid(signs * logits)) / batch
  else:
    raise ValueError(f"unknown loss {loss!r}; use softmax or sigmoid")
  negatives = jnp.where(eye, -jnp.inf, logits)
  pos_mean, neg_mean = _pair_metrics(jnp.sum(pos), jnp.sum(x, 0), jnp.sum(y, 0), scale, bias,
                                     batch)
  metrics = {
      "i2t_top1": jnp.mean(pos > jnp.max(negatives, axis=1)),
      "t2i_top1": jnp.mean(pos > jnp.max(negatives, axis=0)),
      "pos_logit_mean": pos_mean,
      "neg_logit_mean": neg_mean,
  }
  return value, metrics


# ---------------------------------------------------------------------------------------
# chunked: per-device kernels (n = ring size; n == 1 needs no collectives)
# ---------------------------------------------------------------------------------------


def _ring(n, axes):
  """Sends a pytree to the next device of the ring over `axes` (identity when n == 1)."""
  if n == 1:
    return lambda tree: tree
  perm = [(i, (i + 1) % n) for i in range(n)]
  return lambda tree: jax.tree_util.tree_map(lambda t: jax.lax.ppermute(t, axes, perm), tree)


def _forward_kernel(x, y, scale, bias, *, loss, n, axes, chunk, global_batch):
  """Local rows x all columns, one text block per ring step, `chunk` columns at a time."""
  b, d = x.shape
  nc = b // chunk
  me = jax.lax.axis_index(axes) if n > 1 else 0
  row_ids = me * b + jnp.arange(b)
  shift = _ring(n, axes)
  neg_inf = jnp.float32(-jnp.inf)

  def ring_step(carry, k):
    rows, (y_blk, col_m, col_s, col_neg) = carry
    owner = (me - k) % n

    def chunk_step(rows, xs):
      row_m, row_s, acc, row_neg = rows
      j, y_c, c_m, c_s, c_neg = xs
      logits = scale * _dot_t(x, y_c) + bias                        # [b, chunk]
      col_ids = owner * b + j * chunk + jnp.arange(chunk)
      negatives = jnp.where(row_ids[:, None] == col_ids[None, :], neg_inf, logits)
      row_neg = jnp.maximum(row_neg, jnp.max(negatives, axis=1))
      c_neg = jnp.maximum(c_neg, jnp.max(negatives, axis=0))
      if loss == "softmax":
        new_m = jnp.maximum(row_m, jnp.max(logits, axis=1))
        row_s = row_s * jnp.exp(row_m - new_m) + jnp.sum(jnp.exp(logits - new_m[:, None]), 1)
        row_m = new_m
        new_cm = jnp.maximum(c_m, jnp.max(logits, axis=0))
        c_s = c_s * jnp.exp(c_m - new_cm) + jnp.sum(jnp.exp(logits - new_cm[None, :]), 0)
        c_m = new_cm
      else:
        # Every pair as a negative (-log sigmoid(-l) = softplus(l)); the diagonal is fixed below.
        acc = acc + jnp.sum(jax.nn.softplus(logits))
      return (row_m, row_s, acc, row_neg), (c_m, c_s, c_neg)

    rows, cols = jax.lax.scan(chunk_step, rows,
                              (jnp.arange(nc), y_blk, col_m, col_s, col_neg))
    return (rows, shift((y_blk,) + cols)), None

  rows0 = (jnp.full((b,), neg_inf), jnp.zeros((b,), jnp.float32), jnp.zeros((), jnp.float32),
           jnp.full((b,), neg_inf))
  cols0 = (y.reshape(nc, chunk, d), jnp.full((nc, chunk), neg_inf),
           jnp.zeros((nc, chunk), jnp.float32), jnp.full((nc, chunk), neg_inf))
  (rows, (_, col_m, col_s, col_neg)), _ = jax.lax.scan(ring_step, (rows0, cols0), jnp.arange(n))
  row_m, row_s, acc, row_neg = rows
  psum = (lambda v: jax.lax.psum(v, axes)) if n > 1 else (lambda v: v)

  pos = scale * jnp.sum(x * y, axis=-1) + bias
  lse_rows = row_m + jnp.log(row_s)
  lse_cols = (col_m + jnp.log(col_s)).reshape(b)
  if loss == "softmax":
    local = 0.5 * (jnp.sum(lse_rows - pos) + jnp.sum(lse_cols - pos))
  else:
    local = acc + jnp.sum(jax.nn.softplus(-pos) - jax.nn.softplus(pos))
  value = psum(local) / global_batch
  pos_mean, neg_mean = _pair_metrics(psum(jnp.sum(pos)), psum(jnp.sum(x, 0)),
                                     psum(jnp.sum(y, 0)), scale, bias, global_batch)
  metrics = (psum(jnp.sum(pos > row_neg)) / global_batch,
             psum(jnp.sum(pos > col_neg.reshape(b))) / global_batch, pos_mean, neg_mean)
  return value, metrics, lse_rows, lse_cols


def _backward_kernel(x, y, scale, bias, lse_rows, lse_cols, g, *, loss, n, axes, chunk,
                     global_batch):
  """Recomputes each block; dL/dy of a text block travels with it and comes home."""
  b, d = x.shape
  nc = b // chunk
  shift = _ring(n, axes)

  def ring_step(carry, _):
    (dx, dls, db), (y_blk, lse_c_blk, dy_blk) = carry

    def chunk_step(acc, xs):
      dx, dls, db = acc
      y_c, lse_c, dy_c = xs
      logits = scale * _dot_t(x, y_c) + bias
      if loss == "softmax":
        grad = (jnp.exp(logits - lse_rows[:, None]) + jnp.exp(logits - lse_c[None, :])) * (
            g / (2 * global_batch))
      else:
        grad = jax.nn.sigmoid(logits) * (g / global_batch)
      dx = dx + scale * jnp.einsum("ij,jd->id", grad, y_c, precision=_HIGHEST)
      dy_c = dy_c + scale * jnp.einsum("ij,id->jd", grad, x, precision=_HIGHEST)
      dls = dls + jnp.sum(grad * (logits - bias))
      db = db + jnp.sum(grad)
      return (dx, dls, db), dy_c

    acc, dy_blk = jax.lax.scan(chunk_step, (dx, dls, db), (y_blk, lse_c_blk, dy_blk))
    return (acc, shift((y_blk, lse_c_blk, dy_blk))), None

  zero = jnp.zeros((), jnp.float32)
  travel = (y.reshape(nc, chunk, d), lse_cols.reshape(nc, chunk), jnp.zeros((nc, chunk, d)))
  ((dx, dls, db), (_, _, dy)), _ = jax.lax.scan(
      ring_step, ((jnp.zeros_like(x), zero, zero), travel), None, length=n)
  dy = dy.reshape(b, d)
  # The positives: -l_ii / B in both losses (softmax's target term, sigmoid's sign flip).
  diag = -g / global_batch
  dx = dx + diag * scale * y
  dy = dy + diag * scale * x
  dls = dls + diag * scale * jnp.sum(x * y)
  db = db + diag * b
  if n > 1:
    dls, db = jax.lax.psum((dls, db), axes)
  return dx, dy, dls, db


def auto_chunk(local_batch: int, chunk_size: int = 0) -> int:
  """Columns per block: `chunk_size`, or the largest divisor keeping blocks <= 2^24 logits."""
  if chunk_size:
    if local_batch % chunk_size:
      raise ValueError(f"loss_chunk_size={chunk_size} must divide the per-device batch "
                       f"{local_batch}")
    return chunk_size
  chunk = max(1, min(local_batch, MAX_BLOCK_ELEMENTS // local_batch))
  while local_batch % chunk:
    chunk -= 1
  return chunk


@functools.lru_cache(maxsize=None)
def _chunked_fn(loss: str, mesh: Optional[Mesh], global_batch: int, chunk_size: int):
  n = batch_axis_size(mesh) if mesh is not None else 1
  local_batch = global_batch // n
  kw = dict(loss=loss, n=n, axes=BATCH_AXES, chunk=auto_chunk(local_batch, chunk_size),
            global_batch=global_batch)
  fwd_kernel = functools.partial(_forward_kernel, **kw)
  bwd_kernel = functools.partial(_backward_kernel, **kw)
  if n > 1:
    rows, rep = P(BATCH_AXES, None), P()
    fwd_kernel = jax.shard_map(
        fwd_kernel, mesh=mesh, in_specs=(rows, rows, rep, rep),
        out_specs=(rep, (rep,) * 4, P(BATCH_AXES), P(BATCH_AXES)), check_vma=False)
    bwd_kernel = jax.shard_map(
        bwd_kernel, mesh=mesh,
        in_specs=(rows, rows, rep, rep, P(BATCH_AXES), P(BATCH_AXES), rep),
        out_specs=(rows, rows, rep, rep), check_vma=False)

  @jax.custom_vjp
  def fn(x, y, logit_scale, bias):
    value, metrics, _, _ = fwd_kernel(x, y, jnp.exp(logit_scale), bias)
    return value, metrics

  def fn_fwd(x, y, logit_scale, bias):
    scale = jnp.exp(logit_scale)
    value, metrics, lse_rows, lse_cols = fwd_kernel(x, y, scale, bias)
    return (value, metrics), (x, y, scale, bias, lse_rows, lse_cols)

  def fn_bwd(res, cotangents):
    g, _ = cotangents  # metrics are not differentiated
    x, y, scale, bias, lse_rows, lse_cols = res
    return bwd_kernel(x, y, scale, bias, lse_rows, lse_cols, g)

  fn.defvjp(fn_fwd, fn_bwd)
  return fn


def chunked_loss(image_features, text_features, logit_scale, logit_bias=None, *,
                 loss: str = "softmax", mesh: Optional[Mesh] = None, chunk_size: int = 0):
  """The ring / blockwise loss; same value, gradients and metrics as `global_loss`."""
  if loss not in ("softmax", "sigmoid"):
    raise ValueError(f"unknown loss {loss!r}; use softmax or sigmoid")
  x = image_features.astype(jnp.float32)
  y = text_features.astype(jnp.float32)
  n = batch_axis_size(mesh) if mesh is not None else 1
  if x.shape[0] % n:
    raise ValueError(f"global batch {x.shape[0]} is not divisible by the {n} batch shards")
  bias = jnp.zeros((), jnp.float32) if logit_bias is None else jnp.asarray(logit_bias, jnp.float32)
  fn = _chunked_fn(loss, mesh if n > 1 else None, x.shape[0], int(chunk_size))
  value, (i2t, t2i, pos_mean, neg_mean) = fn(x, y, jnp.asarray(logit_scale, jnp.float32), bias)
  return value, {"i2t_top1": i2t, "t2i_top1": t2i, "pos_logit_mean": pos_mean,
                 "neg_logit_mean": neg_mean}


def contrastive_loss(image_features, text_features, logit_scale, logit_bias=None, *,
                     loss: str = "softmax", impl: str = "global", mesh: Optional[Mesh] = None,
                     chunk_size: int = 0):
  """(loss, metrics) of `loss` (softmax | sigmoid) with `impl` (global | chunked)."""
  if impl == "global":
    return global_loss(image_features, text_features, logit_scale, logit_bias, loss=loss,
                       mesh=mesh)
  if impl == "chunked":
    return chunked_loss(image_features, text_features, logit_scale, logit_bias, loss=loss,
                        mesh=mesh, chunk_size=chunk_size)
  raise ValueError(f"unknown loss_impl {impl!r}; use global or chunked")
