"""The image tower: OpenAI's VisionTransformer in Flax."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.models.configs import CLIPConfig
from clip_jax.models.layers import LayerNorm, Transformer, normal, param_with_axes


class VisionTransformer(nn.Module):
  """Patchify (conv without bias) -> [CLS] + pos -> ln_pre -> blocks -> ln_post[CLS] -> proj."""
  config: CLIPConfig

  @nn.compact
  def __call__(self, images):
    cfg, vcfg = self.config, self.config.vision
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if images.ndim != 4 or images.shape[-1] != 3:
      raise ValueError(f"images must be [batch, height, width, 3], got shape {images.shape}")
    b, h, w, _ = images.shape
    p = vcfg.patch_size
    if (h, w) != (vcfg.image_size, vcfg.image_size):
      raise ValueError(
          f"images are {h}x{w} but the model expects {vcfg.image_size}x{vcfg.image_size} "
          "(interpolate the position embedding to change resolution)")
    width = vcfg.width
    scale = width ** -0.5

    # A stride-p convolution without bias, written as one matmul over flattened patches.
    kernel = param_with_axes(self, "conv1", nn.initializers.lecun_normal(in_axis=(0, 1, 2),
                                                                          out_axis=3),
                             (p, p, 3, width), param_dtype, ("patch_h", "patch_w", "channels", "embed"))
    gh, gw = h // p, w // p
    x = images.astype(dtype).reshape(b, gh, p, gw, p, 3)
    x = jnp.einsum("bhpwqc,pqcd->bhwd", x, kernel.astype(dtype)).reshape(b, gh * gw, width)

    cls = param_with_axes(self, "class_embedding", normal(scale), (width,), param_dtype, ("embed",))
    x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, width)), x], axis=1)
    pos = param_with_axes(self, "positional_embedding", normal(scale), (gh * gw + 1, width),
                          param_dtype, ("pos", "embed"))
    x = x + pos.astype(dtype)[None]
    x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))

    x = LayerNorm(cfg.ln_eps, dtype, param_dtype, name="ln_pre")(x)
    x = Transformer(vcfg.layers, vcfg.heads, vcfg.mlp_ratio, causal=False, act=cfg.act,
                    ln_eps=cfg.ln_eps, dtype=dtype, param_dtype=param_dtype,
                    scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy,
                    attention_impl=cfg.attention_impl, name="transformer")(
                        x, pool_index=0)  # the last block: [CLS] only
    pooled = LayerNorm(cfg.ln_eps, jnp.float32, param_dtype, name="ln_post")(x)
    proj = param_with_axes(self, "proj", normal(scale), (width, cfg.embed_dim), param_dtype,
                           ("embed", "proj"))
    return pooled @ proj.astype(jnp.float32)
