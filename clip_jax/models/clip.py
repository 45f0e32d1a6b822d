"""CLIP: both towers and the contrastive head."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.configs import CLIPConfig, get_model_config
from clip_jax.models.resnet import ModifiedResNet
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer


# A loaded ResNet's params (clip_jax.load, convert, params_io, checkpoint.restore_params) carry
# its BatchNorm running statistics under this top-level key; the train state keeps them apart.
BATCH_STATS = "batch_stats"


def model_variables(params) -> dict:
  """Flax variables for `model.apply` from loaded params: {"params": ...} and, when they carry
  running statistics (a ResNet), {"batch_stats": ...}."""
  params = dict(params)
  stats = params.pop(BATCH_STATS, None)
  return {"params": params} if stats is None else {"params": params, BATCH_STATS: stats}


def with_batch_stats(params, batch_stats) -> dict:
  """Loaded-params form: `params` with `batch_stats` (if any) under the top-level key."""
  return dict(params, **{BATCH_STATS: batch_stats}) if batch_stats else dict(params)


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class CLIP(nn.Module):
  """`__call__` returns L2-normalised float32 features and the (log-space) logit scale.

  Towers alone: `model.apply(variables, images, method="encode_image")` and
  `method="encode_text"` return projected, un-normalised features (as openai/CLIP).

  A ResNet image tower has BatchNorm: its running statistics are the `batch_stats`
  collection. `train=True` normalises with the batch's statistics and updates them (apply
  with `mutable=["batch_stats"]`); `train=False` (the default: evaluation, inference) uses
  them. The ViTs ignore `train`.

  `keep_indices` (ViTs, training with patch dropout): [B, keep] patch indices each image
  keeps (see clip_jax.models.vit); None, the default, keeps every patch.
  """
  config: CLIPConfig

  def setup(self):
    cfg = self.config
    if cfg.is_resnet:
      v = cfg.vision
      self.visual = ModifiedResNet(v.layers, v.width, v.heads, cfg.embed_dim,
                                   dtype=jnp.dtype(cfg.dtype),
                                   param_dtype=jnp.dtype(cfg.param_dtype),
                                   remat_policy=cfg.remat_policy)
    else:
      self.visual = VisionTransformer(cfg)
    self.text = TextTransformer(cfg)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(cfg.logit_scale_init), ()),
        (), jnp.float32)
    if cfg.logit_bias_init is not None:
      self.logit_bias = self.param(
          "logit_bias", nn.with_logical_partitioning(nn.initializers.constant(cfg.logit_bias_init), ()),
          (), jnp.float32)

  def encode_image(self, images, train: bool = False, keep_indices=None):
    if self.config.is_resnet:
      if keep_indices is not None:
        raise ValueError("patch dropout (keep_indices) applies to ViT image towers, not ResNets")
      return self.visual(images, train)
    return self.visual(images, keep_indices)

  def encode_text(self, tokens):
    return self.text(tokens)

  def __call__(self, images, tokens, train: bool = False) -> dict[str, Optional[jax.Array]]:
    return {
        "image_features": l2_normalize(self.encode_image(images, train)),
        "text_features": l2_normalize(self.encode_text(tokens)),
        "logit_scale": self.logit_scale,
        "logit_bias": self.logit_bias if self.config.logit_bias_init is not None else None,
    }


def create_model(name_or_config: "str | CLIPConfig | dict", **overrides) -> CLIP:
  """The Flax module of a variant (`vitb32` ... `vitl14_336`, `rn50` ... `rn50x64`, `tiny`,
  `tiny_rn`)."""
  return CLIP(get_model_config(name_or_config, **overrides))


def dummy_inputs(config: CLIPConfig, batch: int = 1):
  images = jnp.zeros((batch, config.vision.image_size, config.vision.image_size, 3), jnp.float32)
  tokens = jnp.zeros((batch, config.text.context_length), jnp.int32)
  return images, tokens


def abstract_variables(model: CLIP) -> dict:
  """Boxed (logically partitioned) shapes of every collection: `params`, and `batch_stats`
  for a ResNet image tower; nothing allocated."""
  images, tokens = dummy_inputs(model.config)
  return dict(jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, tokens)))


def abstract_loaded_params(model: CLIP) -> dict:
  """Unboxed shapes of the loaded-params form: params, plus `batch_stats` for a ResNet."""
  variables = nn.meta.unbox(abstract_variables(model))
  return with_batch_stats(variables["params"], variables.get(BATCH_STATS))


def abstract_params(model: CLIP):
  """Boxed (logically partitioned) parameter shapes, without allocating anything."""
  return abstract_variables(model)["params"]


def init_variables(model: CLIP, rng) -> dict:
  """Unboxed `params` (and a ResNet's `batch_stats`: means 0, variances 1)."""
  images, tokens = dummy_inputs(model.config)
  return nn.meta.unbox(dict(model.init(rng, images, tokens)))


def init_params(model: CLIP, rng) -> dict:
  """Unboxed parameters (plain arrays). For sharded init see `clip_jax.sharding`."""
  return init_variables(model, rng)["params"]


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(nn.meta.unbox(params))))
