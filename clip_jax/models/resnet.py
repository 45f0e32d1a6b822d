"""The paper's ResNet image tower: OpenAI's ModifiedResNet in Flax.

Differences from torchvision's ResNet (as in openai/CLIP `model.py`):
- a stem of three 3x3 convolutions (the first with stride 2), each with BatchNorm and ReLU,
  then a 2x2 average pool instead of a max pool;
- anti-aliased strided blocks: where a block has stride > 1, an average pool placed before
  its third convolution does the striding, and its shortcut is an average pool, then a 1x1
  convolution and BatchNorm;
- the final global average pool is an attention pool: the feature map flattened to tokens,
  their mean prepended as the query token, a learned position embedding added, one
  multi-head attention (q, k, v and output projections with biases) read at the first token.

Layout NHWC. Convolutions and attention compute in `dtype`; BatchNorm computes its
statistics and normalisation in float32. BatchNorm follows PyTorch: in training it
normalises with the batch's biased variance and updates the running averages (collection
`batch_stats`: `mean`, `var`) with momentum 0.1 and the unbiased variance; in evaluation it
uses the running averages. Under `jax.jit` on a mesh the batch mean is over the whole global
batch (every device and host), as on one device.
"""
from __future__ import annotations

from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.layers import REMAT_POLICIES, dot_product_attention, normal, param_with_axes

Dtype = Any
EXPANSION = 4  # a Bottleneck's output has 4x its inner width


class BatchNorm(nn.Module):
  """BatchNorm2d over [N, H, W, C] with PyTorch's semantics (see the module docstring)."""
  momentum: float = 0.1
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  scale_init: Any = nn.initializers.ones

  @nn.compact
  def __call__(self, x, train: bool):
    features = x.shape[-1]
    scale = param_with_axes(self, "scale", self.scale_init, (features,), self.param_dtype,
                            ("norm",))
    bias = param_with_axes(self, "bias", nn.initializers.zeros, (features,), self.param_dtype,
                           ("norm",))
    ra_mean = self.variable("batch_stats", "mean", jnp.zeros, (features,), jnp.float32)
    ra_var = self.variable("batch_stats", "var", jnp.ones, (features,), jnp.float32)
    x32 = x.astype(jnp.float32)
    if train:
      axes = tuple(range(x.ndim - 1))
      mean = jnp.mean(x32, axis=axes)
      var = jnp.mean(jnp.square(x32 - mean), axis=axes)
      if not self.is_initializing():
        n = x32.size // features
        unbiased = var * (n / max(n - 1, 1))
        m = self.momentum
        ra_mean.value = (1 - m) * ra_mean.value + m * jax.lax.stop_gradient(mean)
        ra_var.value = (1 - m) * ra_var.value + m * jax.lax.stop_gradient(unbiased)
    else:
      mean, var = ra_mean.value, ra_var.value
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    y = y * scale.astype(jnp.float32) + bias.astype(jnp.float32)
    return y.astype(self.dtype)


class Conv(nn.Module):
  """A bias-free convolution, kernel [kh, kw, in, out] (PyTorch's padding: symmetric)."""
  features: int
  kernel_size: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    k = self.kernel_size
    fan_in_init = nn.initializers.variance_scaling(2.0, "fan_in", "normal",
                                                   in_axis=(0, 1, 2), out_axis=3)
    kernel = param_with_axes(self, "kernel", fan_in_init, (k, k, x.shape[-1], self.features),
                             self.param_dtype, ("conv_h", "conv_w", "conv_in", "conv_out"))
    pad = (k - 1) // 2
    return jax.lax.conv_general_dilated(
        x.astype(self.dtype), kernel.astype(self.dtype), (self.stride, self.stride),
        ((pad, pad), (pad, pad)), dimension_numbers=("NHWC", "HWIO", "NHWC"))


def avg_pool(x, size: int):
  """PyTorch's AvgPool2d(size): window = stride = size, no padding (floor)."""
  if size == 1:
    return x
  return nn.avg_pool(x, (size, size), strides=(size, size), padding="VALID")


class Bottleneck(nn.Module):
  """1x1 -> 3x3 -> [avg pool if strided] -> 1x1 (x4), each with BatchNorm; ReLU after the sum.

  The last BatchNorm's scale starts at 0 (openai/CLIP's initialisation), so every residual
  block starts as the identity on its shortcut.
  """
  planes: int
  stride: int = 1
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, train: bool):
    conv = lambda f, k, name: Conv(f, k, dtype=self.dtype, param_dtype=self.param_dtype,
                                   name=name)
    bn = lambda name, **kw: BatchNorm(dtype=self.dtype, param_dtype=self.param_dtype,
                                      name=name, **kw)
    out = nn.relu(bn("bn1")(conv(self.planes, 1, "conv1")(x), train))
    out = nn.relu(bn("bn2")(conv(self.planes, 3, "conv2")(out), train))
    out = avg_pool(out, self.stride)
    out = bn("bn3", scale_init=nn.initializers.zeros)(
        conv(self.planes * EXPANSION, 1, "conv3")(out), train)
    if self.stride > 1 or x.shape[-1] != self.planes * EXPANSION:
      shortcut = conv(self.planes * EXPANSION, 1, "downsample_conv")(avg_pool(x, self.stride))
      x = bn("downsample_bn")(shortcut, train)
    return nn.relu(out + x)


class Projection(nn.Module):
  """y = x . kernel + bias over the trailing `in_shape` dims, kernel [*in_shape, *out_shape]
  (nn.DenseGeneral, with logical axis names on the unflattened kernel)."""
  in_shape: tuple[int, ...]
  out_shape: tuple[int, ...]
  in_axes: tuple[str, ...]
  out_axes: tuple[str, ...]
  std: float
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    kernel = param_with_axes(self, "kernel", normal(self.std), self.in_shape + self.out_shape,
                             self.param_dtype, self.in_axes + self.out_axes)
    bias = param_with_axes(self, "bias", nn.initializers.zeros, self.out_shape, self.param_dtype,
                           self.out_axes)
    n = len(self.in_shape)
    y = jax.lax.dot_general(x.astype(self.dtype), kernel.astype(self.dtype),
                            ((tuple(range(x.ndim - n, x.ndim)), tuple(range(n))), ((), ())))
    return y + bias.astype(self.dtype)


class AttentionPool(nn.Module):
  """Multi-head attention of the mean token over [mean; tokens] + position embedding."""
  heads: int
  output_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    b, h, w, width = x.shape
    if width % self.heads:
      raise ValueError(f"attention pool width {width} is not divisible by {self.heads} heads")
    head_dim = width // self.heads
    x = x.reshape(b, h * w, width).astype(jnp.float32)
    x = jnp.concatenate([jnp.mean(x, axis=1, keepdims=True), x], axis=1)
    pos = param_with_axes(self, "positional_embedding", normal(width ** -0.5),
                          (h * w + 1, width), self.param_dtype, ("pos", "embed"))
    x = (x + pos.astype(jnp.float32)[None]).astype(self.dtype)
    std = width ** -0.5  # openai/CLIP's initialize_parameters
    heads_kv = (self.heads, head_dim)

    def project(name, inputs):
      return Projection((width,), heads_kv, ("embed",), ("heads", "kv"), std, self.dtype,
                        self.param_dtype, name=name)(inputs)

    q = project("q_proj", x[:, :1])
    k, v = project("k_proj", x), project("v_proj", x)
    out = dot_product_attention(q, k, v, causal=False)  # [B, 1, heads, head_dim]
    out = Projection(heads_kv, (self.output_dim,), ("heads", "kv"), ("proj",), std, self.dtype,
                     self.param_dtype, name="c_proj")(out)
    return out[:, 0].astype(jnp.float32)


class ModifiedResNet(nn.Module):
  """Stem -> 4 stages of Bottlenecks (widths w, 2w, 4w, 8w; x4 out) -> attention pool.

  layers: blocks per stage, e.g. (3, 4, 6, 3) for RN50. width: the stem's output width.
  heads: attention-pool heads (openai/CLIP: width * 32 // 64).
  """
  layers: Sequence[int]
  width: int
  heads: int
  output_dim: int
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  remat_policy: str = "none"   # per Bottleneck; see clip_jax.models.layers.REMAT_POLICIES

  @nn.compact
  def __call__(self, images, train: bool = False):
    if len(self.layers) != 4:
      raise ValueError(f"a ModifiedResNet has 4 stages, got layers={tuple(self.layers)}")
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = images.astype(self.dtype)
    for i, (features, stride) in enumerate(
        ((self.width // 2, 2), (self.width // 2, 1), (self.width, 1)), start=1):
      x = Conv(features, 3, stride, name=f"conv{i}", **kw)(x)
      x = nn.relu(BatchNorm(name=f"bn{i}", **kw)(x, train))
    x = avg_pool(x, 2)
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"unknown remat_policy {self.remat_policy!r}; known: "
                       f"{sorted(REMAT_POLICIES)}")
    block_cls = Bottleneck
    if self.remat_policy != "none":  # `train` (argument 2, counting self) is static
      block_cls = nn.remat(Bottleneck, policy=REMAT_POLICIES[self.remat_policy],
                           static_argnums=(2,))
    for stage, blocks in enumerate(self.layers):
      planes = self.width * 2 ** stage
      for block in range(blocks):
        stride = 2 if stage > 0 and block == 0 else 1
        x = block_cls(planes, stride, name=f"layer{stage + 1}_{block}", **kw)(x, train)
    return AttentionPool(self.heads, self.output_dim, name="attnpool", **kw)(x)
