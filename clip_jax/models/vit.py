"""The image tower: OpenAI's VisionTransformer in Flax, with FLIP's patch dropout.

Patch dropout (Li et al., "Scaling Language-Image Pre-training via Masking", 2023; open_clip's
`--force-patch-dropout`): in training, each image keeps a random subset of its patch tokens
(the class token always), so the transformer runs on 1 + keep tokens instead of 1 + patches.
`keep_indices` ([B, keep] patch indices, from `patch_keep_indices`) selects them; without it
(evaluation, inference) every patch is used and the computation is unchanged.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.configs import CLIPConfig
from clip_jax.models.layers import LayerNorm, Transformer, normal, param_with_axes


def kept_patches(num_patches: int, patch_dropout: float) -> int:
  """Patch tokens an image keeps at `patch_dropout` (open_clip's count: int((1 - p) * n), at
  least 1); static, so a masked step's shapes are fixed."""
  if not 0.0 <= patch_dropout < 1.0:
    raise ValueError(f"patch_dropout={patch_dropout} must be in [0, 1)")
  return max(1, int(num_patches * (1.0 - patch_dropout)))


def patch_keep_indices(rng, batch: int, num_patches: int, keep: int):
  """[batch, keep] int32: per image, a uniformly random `keep`-subset of range(num_patches)
  (a random permutation's first `keep`), in increasing order."""
  noise = jax.random.uniform(rng, (batch, num_patches))
  return jnp.sort(jnp.argsort(noise, axis=-1)[:, :keep], axis=-1).astype(jnp.int32)


class VisionTransformer(nn.Module):
  """Patchify (conv without bias) -> [CLS] + pos -> ln_pre -> blocks -> ln_post[CLS] -> proj.

  With `keep_indices` ([B, keep] ints in [0, patches)) only those patches enter (after their
  position embedding): the kept patches are gathered before the patch projection, which is
  the same as gathering the embedded tokens (the projection acts on each patch alone) and
  skips the dropped ones' projection.
  """
  config: CLIPConfig

  @nn.compact
  def __call__(self, images, keep_indices=None):
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
    cls = param_with_axes(self, "class_embedding", normal(scale), (width,), param_dtype, ("embed",))
    pos = param_with_axes(self, "positional_embedding", normal(scale), (gh * gw + 1, width),
                          param_dtype, ("pos", "embed"))
    if keep_indices is None:
      x = jnp.einsum("bhpwqc,pqcd->bhwd", x, kernel.astype(dtype)).reshape(b, gh * gw, width)
      x = jnp.concatenate([jnp.broadcast_to(cls.astype(dtype), (b, 1, width)), x], axis=1)
      x = x + pos.astype(dtype)[None]
    else:
      keep = keep_indices.shape[-1]
      if keep_indices.shape != (b, keep) or not 0 < keep <= gh * gw:
        raise ValueError(f"keep_indices must be [batch={b}, keep <= {gh * gw}], got "
                         f"{keep_indices.shape}")
      patches = x.transpose(0, 1, 3, 2, 4, 5).reshape(b, gh * gw, p, p, 3)
      patches = jnp.take_along_axis(patches, keep_indices[:, :, None, None, None], axis=1)
      patches = nn.with_logical_constraint(patches, ("batch", "seq", None, None, None))
      x = jnp.einsum("bkpqc,pqcd->bkd", patches, kernel.astype(dtype))
      x = x + jnp.take(pos[1:].astype(dtype), keep_indices, axis=0)
      first = cls.astype(dtype) + pos[0].astype(dtype)
      x = jnp.concatenate([jnp.broadcast_to(first, (b, 1, width)), x], axis=1)
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
