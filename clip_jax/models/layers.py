"""Transformer building blocks shared by the image and text towers.

Every parameter carries logical axis names (`nn.with_logical_partitioning`) and the main
activations carry logical constraints, so `clip_jax.sharding` can map them onto any mesh
by rules. Names used here:

  batch, seq, embed, heads, kv (head dim), qkv (the 3 of a fused projection), mlp,
  norm (LayerNorm params), layers (the scanned axis), vocab, pos, proj,
  patch_h, patch_w, channels; the ResNet (models/resnet.py): conv_h, conv_w, conv_in, conv_out.
"""
from __future__ import annotations

import functools
from typing import Any, Callable, Optional

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax.ad_checkpoint import checkpoint_name

Dtype = Any


def fused_attention_saveable(prim, *_, **__) -> bool:
  """A remat policy keeping cuDNN fused attention's forward outputs (the attention output
  and its softmax statistics, ~1/8 of a ViT block's saved matmul outputs): without them the
  backward pass runs the fused forward again (ViT-L/14 on an H100: 72 forward launches per
  step instead of 36)."""
  return prim.name.startswith("dot_product_attention_fwd")


# Rematerialisation policies for the residual blocks (`CLIPConfig.remat_policy`).
REMAT_POLICIES: dict[str, Optional[Callable]] = {
    "none": None,                                  # keep every activation
    "full": jax.checkpoint_policies.nothing_saveable,  # recompute the whole block
    # keep matmul outputs, fused attention's included
    "dots": jax.checkpoint_policies.save_from_both_policies(
        jax.checkpoint_policies.dots_saveable, fused_attention_saveable),
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "save_attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


def quick_gelu(x):
  """OpenAI's sigmoid approximation of GELU."""
  return x * jax.nn.sigmoid(1.702 * x)


ACTIVATIONS = {
    "quick_gelu": quick_gelu,
    "gelu": functools.partial(jax.nn.gelu, approximate=False),
}


def get_activation(name: str) -> Callable:
  if name not in ACTIVATIONS:
    raise ValueError(f"unknown activation {name!r}; known: {sorted(ACTIVATIONS)}")
  return ACTIVATIONS[name]


def normal(stddev: float):
  return nn.initializers.normal(stddev=stddev)


def param_with_axes(module: nn.Module, name: str, init, shape, dtype, axes):
  return module.param(name, nn.with_logical_partitioning(init, axes), shape, dtype)


class LayerNorm(nn.Module):
  """LayerNorm computed in float32 whatever the compute dtype; output in `dtype`."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    features = x.shape[-1]
    scale = param_with_axes(self, "scale", nn.initializers.ones, (features,), self.param_dtype,
                            ("norm",))
    bias = param_with_axes(self, "bias", nn.initializers.zeros, (features,), self.param_dtype,
                           ("norm",))
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class FusedQKV(nn.Module):
  """OpenAI's fused in_proj: kernel [embed, 3, heads, kv], bias [3, heads, kv].

  `__call__(x)` projects every token to q, k and v ([B, T, 3, H, K]); `project(x, parts)`
  only the given parts (a slice of the 3), so the pooled last block projects k and v of
  every token but q of the pooled token alone.
  """
  heads: int
  head_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  std: float = 0.02

  def setup(self):
    self.kernel = self.param(
        "kernel", nn.with_logical_partitioning(normal(self.std), ("embed", "qkv", "heads", "kv")),
        (self.width, 3, self.heads, self.head_dim), self.param_dtype)
    self.bias = self.param(
        "bias", nn.with_logical_partitioning(nn.initializers.zeros, ("qkv", "heads", "kv")),
        (3, self.heads, self.head_dim), self.param_dtype)

  @property
  def width(self) -> int:
    return self.heads * self.head_dim

  def project(self, x, parts: slice = slice(0, 3)):
    kernel, bias = self.kernel[:, parts], self.bias[parts]
    y = jnp.einsum("nd,dchk->nchk", tokens_2d(x).astype(self.dtype), kernel.astype(self.dtype))
    return (y + bias.astype(self.dtype)).reshape(*x.shape[:-1], *y.shape[1:])

  def __call__(self, x):
    return self.project(x)


class Attention(nn.Module):
  """Multi-head self-attention with a fused QKV projection (OpenAI's in_proj layout).

  `query_index` ([B] ints) computes the output of one query per sequence only (that
  token's row: [B, 1, D]), attending to every key; the pooled last block uses it.
  """
  heads: int
  causal: bool = False
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  qkv_std: float = 0.02
  out_std: float = 0.02
  impl: str = "xla"
  kv_length: Optional[int] = None  # keys past it are padding (the Transformer's, for cuDNN)

  @nn.compact
  def __call__(self, x, query_index=None):
    width = x.shape[-1]
    if width % self.heads:
      raise ValueError(f"width {width} is not divisible by heads {self.heads}")
    head_dim = width // self.heads
    proj = FusedQKV(self.heads, head_dim, self.dtype, self.param_dtype, self.qkv_std, name="qkv")
    if query_index is None:
      qkv = proj(x)
      q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
      q_positions = None
    else:
      kv = proj.project(x, slice(1, 3))
      k, v = kv[:, :, 0], kv[:, :, 1]
      q = proj.project(take_rows(x, query_index), slice(0, 1))[:, :, 0]
      q_positions = jnp.broadcast_to(jnp.asarray(query_index), (x.shape[0],))[:, None]
    q = nn.with_logical_constraint(q, ("batch", "seq", "heads", "kv"))
    k = nn.with_logical_constraint(k, ("batch", "seq", "heads", "kv"))
    v = nn.with_logical_constraint(v, ("batch", "seq", "heads", "kv"))
    impl = resolve_attention_impl(self.impl, self.dtype)
    if impl == "cudnn" and query_index is None:
      out = fused_attention(q, k, v, causal=self.causal, kv_length=self.kv_length)
    else:  # One query per sequence is a [B, H, 1, T] product: no fused kernel needed.
      if self.kv_length is not None and self.kv_length != k.shape[1]:
        raise ValueError("padded keys (kv_length) need attention_impl='cudnn'")
      out = dot_product_attention(q, k, v, causal=self.causal, q_positions=q_positions)
    out = nn.with_logical_constraint(out, ("batch", "seq", "heads", "kv"))
    y = nn.Einsum(
        (self.heads, head_dim, width), "nhk,hkd->nd", dtype=self.dtype,
        param_dtype=self.param_dtype,
        kernel_init=nn.with_logical_partitioning(normal(self.out_std), ("heads", "kv", "embed")),
        bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
        name="out")(tokens_2d(out, 2))
    return checkpoint_name(y.reshape(*out.shape[:2], width), "attn_out")


def tokens_2d(x, feature_dims: int = 1):
  """[B, T, *F] -> [B*T, *F] (a free reshape). Projections take their tokens this way: the
  weight gradient then contracts one axis, which XLA:CPU's dot takes as it is, where two
  (batch and sequence) made it transpose the activation, often fused with the LayerNorm
  gradient into one slow strided pass (ViT-B/32 on CPU: 0.32 -> 0.13 s of copies a step)."""
  return x.reshape(-1, *x.shape[x.ndim - feature_dims:])


def take_rows(x, index):
  """x[b, index[b]] for every b, keeping a length-1 sequence axis: [B, T, ...] -> [B, 1, ...].

  A Python int index (the ViT's CLS token, 0) is a static slice: no gather, whose gradient
  would scatter into a zero [B, T, ...] buffer.
  """
  if isinstance(index, int):
    return x[:, index:index + 1]
  index = index.reshape(index.shape[0], 1, *([1] * (x.ndim - 2)))
  return jnp.take_along_axis(x, index, axis=1)


ATTENTION_IMPLS = ("auto", "xla", "cudnn")
FUSED_ATTENTION_KERNEL = "cudnn"  # jax.nn.dot_product_attention's implementation; tests: "xla"


def resolve_attention_impl(impl: str, dtype=jnp.bfloat16) -> str:
  """"auto" -> "cudnn" (fused flash attention) on a GPU computing in bfloat16/float16, which
  cuDNN requires; else "xla". "xla" and "cudnn" stay as they are; "cudnn" where it cannot
  run is one clear error."""
  if impl not in ATTENTION_IMPLS:
    raise ValueError(f"unknown attention_impl {impl!r}; known: {', '.join(ATTENTION_IMPLS)}")
  half = jnp.dtype(dtype) in (jnp.dtype(jnp.bfloat16), jnp.dtype(jnp.float16))
  if impl == "auto":
    return "cudnn" if half and jax.default_backend() == "gpu" else "xla"
  if impl == "cudnn" and FUSED_ATTENTION_KERNEL == "cudnn":
    if jax.default_backend() != "gpu":
      raise ValueError(f"attention_impl='cudnn' needs a GPU with cuDNN (this backend: "
                       f"{jax.default_backend()}); use 'auto' or 'xla'")
    if not half:
      raise ValueError(f"attention_impl='cudnn' needs bfloat16 or float16 compute (dtype "
                       f"{jnp.dtype(dtype).name}); use 'auto' or 'xla'")
  return impl


def fused_attention(q, k, v, causal: bool, kv_length: Optional[int] = None,
                    implementation: Optional[str] = None):
  """jax.nn.dot_product_attention's fused (cuDNN flash) kernel at any sequence length.

  cuDNN's backward pass takes only even lengths, and CLIP's are odd (197 and 257 image
  tokens, 77 text tokens). `kv_length`: the sequence is already padded (the Transformer pads
  its tokens once, not every layer) and keys from kv_length on are hidden by the kernel's
  padding mask. Otherwise an odd length gets one zero query row, sliced off the output, and
  one masked zero key. Either way every real query attends to exactly its keys. q, k, v:
  [B, T, H, D]. `implementation` defaults to FUSED_ATTENTION_KERNEL.
  """
  implementation = implementation or FUSED_ATTENTION_KERNEL
  t = q.shape[1]
  if kv_length is None and t % 2 == 0:
    return jax.nn.dot_product_attention(q, k, v, is_causal=causal, implementation=implementation)
  if kv_length is None:
    pad = ((0, 0), (0, 1), (0, 0), (0, 0))
    q, k, v = (jnp.pad(a, pad) for a in (q, k, v))
  lengths = jnp.full((q.shape[0],), t if kv_length is None else kv_length, jnp.int32)
  out = jax.nn.dot_product_attention(q, k, v, is_causal=causal, query_seq_lengths=lengths,
                                     key_value_seq_lengths=lengths,
                                     implementation=implementation)
  return out if kv_length is not None else out[:, :t]


def dot_product_attention(q, k, v, causal: bool, q_positions=None):
  """softmax(q k^T / sqrt(d)) v with float32 logits and softmax. q: [B, Tq, H, D], k, v: [B, T, H, D].

  `q_positions` ([B, Tq] ints, default 0..Tq-1) are the queries' places in the sequence, which
  the causal mask needs when the queries are a subset of it.
  """
  scale = q.shape[-1] ** -0.5
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
  if causal:
    tq, tk = q.shape[1], k.shape[1]
    if q_positions is None:
      mask = jnp.tril(jnp.ones((tq, tk), dtype=bool))
    else:  # [B, 1, Tq, Tk]
      mask = (jnp.arange(tk)[None, None, :] <= q_positions[:, :, None])[:, None]
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v)


class MLP(nn.Module):
  hidden: int
  act: str = "quick_gelu"
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  fc_std: float = 0.02
  proj_std: float = 0.02

  @nn.compact
  def __call__(self, x):
    width = x.shape[-1]
    h = nn.Dense(self.hidden, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.with_logical_partitioning(normal(self.fc_std), ("embed", "mlp")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("mlp",)),
                 name="c_fc")(tokens_2d(x))
    h = get_activation(self.act)(h).reshape(*x.shape[:-1], self.hidden)
    h = nn.with_logical_constraint(h, ("batch", "seq", "mlp"))
    y = nn.Dense(width, dtype=self.dtype, param_dtype=self.param_dtype,
                 kernel_init=nn.with_logical_partitioning(normal(self.proj_std), ("mlp", "embed")),
                 bias_init=nn.with_logical_partitioning(nn.initializers.zeros, ("embed",)),
                 name="c_proj")(tokens_2d(h))
    return y.reshape(x.shape)


class ResidualBlock(nn.Module):
  """Pre-LN block: x + attn(ln_1(x)); x + mlp(ln_2(x)). Scan-compatible (carry, _) signature.

  With `pool_index` ([B] ints) the block computes and returns only that token's row of its
  output ([B, 1, D]): keys and values from every token, the query, residual, ln_2 and MLP
  from that row alone. The row equals the full block's (attention mixes tokens only through
  k and v).
  """
  heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  layers: int = 12
  attention_impl: str = "xla"
  kv_length: Optional[int] = None

  @nn.compact
  def __call__(self, x, _=None, pool_index=None):
    width = x.shape[-1]
    # OpenAI's initialisation of the text transformer, used for both towers.
    attn_std = width ** -0.5
    proj_std = width ** -0.5 * (2 * self.layers) ** -0.5
    fc_std = (2 * width) ** -0.5
    x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
    y = LayerNorm(self.ln_eps, self.dtype, self.param_dtype, name="ln_1")(x)
    y = Attention(self.heads, self.causal, self.dtype, self.param_dtype, attn_std, proj_std,
                  self.attention_impl, self.kv_length, name="attn")(y, pool_index)
    x = (x if pool_index is None else take_rows(x, pool_index)) + y
    y = LayerNorm(self.ln_eps, self.dtype, self.param_dtype, name="ln_2")(x)
    y = MLP(int(width * self.mlp_ratio), self.act, self.dtype, self.param_dtype, fc_std, proj_std,
            name="mlp")(y)
    x = x + y
    x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
    return x, None


class Transformer(nn.Module):
  """A stack of residual blocks, scanned (params stacked on a leading 'layers' axis) or not.

  Scanned params live under `resblocks`; unscanned under `resblocks_0` ... `resblocks_{L-1}`.
  `clip_jax.models.params.scan_params` / `unscan_params` convert between the two.

  `pool_index` ([B] ints, or one int for all rows): both towers keep one token (CLS,
  end-of-text) of the last block;
  the call returns that token's row, [B, D]. Unscanned, the last block computes only that
  row (see ResidualBlock: ~1/L fewer FLOPs for the tower). Scanned, all layers run in full:
  on XLA:CPU both ways of running the last layer apart (a scan over sliced params, or an
  `nn.cond` on the last iteration) cost more in copies than the FLOPs they save.
  """
  layers: int
  heads: int
  mlp_ratio: float = 4.0
  causal: bool = False
  act: str = "quick_gelu"
  ln_eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scan_layers: bool = True
  remat_policy: str = "none"
  attention_impl: str = "xla"

  @nn.compact
  def __call__(self, x, pool_index=None):
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(
          f"unknown remat_policy {self.remat_policy!r}; known: {sorted(REMAT_POLICIES)}")
    block_cls = ResidualBlock
    if self.remat_policy != "none":
      # Unscanned, an int pool_index (the CLS token) stays a static slice inside the last
      # remat'd block (argument 3, counting self).
      static = (3,) if isinstance(pool_index, int) and not self.scan_layers else ()
      block_cls = nn.remat(ResidualBlock, policy=REMAT_POLICIES[self.remat_policy],
                           prevent_cse=not self.scan_layers, static_argnums=static)
    impl = resolve_attention_impl(self.attention_impl, self.dtype)
    length = x.shape[1]
    # cuDNN trains even lengths only: pad an odd sequence once with a token every layer's
    # attention hides (kv_length), not q, k and v in every layer (5% of a ViT-L/14 step).
    padded = impl == "cudnn" and length % 2 == 1
    if padded:
      x = jnp.pad(x, ((0, 0), (0, 1), (0, 0)))
    kwargs = dict(heads=self.heads, mlp_ratio=self.mlp_ratio, causal=self.causal, act=self.act,
                  ln_eps=self.ln_eps, dtype=self.dtype, param_dtype=self.param_dtype,
                  layers=self.layers, attention_impl=impl,
                  kv_length=length if padded else None)
    if self.scan_layers:
      scanned = nn.scan(block_cls, variable_axes={"params": 0}, split_rngs={"params": True},
                        length=self.layers, metadata_params={nn.PARTITION_NAME: "layers"})
      x, _ = scanned(**kwargs, name="resblocks")(x, None)
      return x[:, :length] if pool_index is None else take_rows(x, pool_index)[:, 0]
    for i in range(self.layers):
      last = pool_index is not None and i == self.layers - 1
      if last and padded:  # the pooled block's one query takes the unpadded keys
        x, kwargs["kv_length"] = x[:, :length], None
      x, _ = block_cls(**kwargs, name=f"resblocks_{i}")(x, None, pool_index if last else None)
    return x[:, :length] if pool_index is None else x[:, 0]
