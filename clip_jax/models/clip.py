"""CLIP: both towers and the contrastive head."""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from clip_jax.models.configs import CLIPConfig, get_model_config
from clip_jax.models.text import TextTransformer
from clip_jax.models.vit import VisionTransformer


def l2_normalize(x, eps: float = 1e-12):
  x = x.astype(jnp.float32)
  return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps))


class CLIP(nn.Module):
  """`__call__` returns L2-normalised float32 features and the (log-space) logit scale.

  Towers alone: `model.apply(variables, images, method="encode_image")` and
  `method="encode_text"` return projected, un-normalised features (as openai/CLIP).
  """
  config: CLIPConfig

  def setup(self):
    cfg = self.config
    self.visual = VisionTransformer(cfg)
    self.text = TextTransformer(cfg)
    self.logit_scale = self.param(
        "logit_scale", nn.with_logical_partitioning(nn.initializers.constant(cfg.logit_scale_init), ()),
        (), jnp.float32)
    if cfg.logit_bias_init is not None:
      self.logit_bias = self.param(
          "logit_bias", nn.with_logical_partitioning(nn.initializers.constant(cfg.logit_bias_init), ()),
          (), jnp.float32)

  def encode_image(self, images):
    return self.visual(images)

  def encode_text(self, tokens):
    return self.text(tokens)

  def __call__(self, images, tokens) -> dict[str, Optional[jax.Array]]:
    return {
        "image_features": l2_normalize(self.encode_image(images)),
        "text_features": l2_normalize(self.encode_text(tokens)),
        "logit_scale": self.logit_scale,
        "logit_bias": self.logit_bias if self.config.logit_bias_init is not None else None,
    }


def create_model(name_or_config: "str | CLIPConfig | dict", **overrides) -> CLIP:
  """The Flax module of a variant (`vitb32`, `vitb16`, `vitl14`, `vitl14_336`, `tiny`)."""
  return CLIP(get_model_config(name_or_config, **overrides))


def dummy_inputs(config: CLIPConfig, batch: int = 1):
  images = jnp.zeros((batch, config.vision.image_size, config.vision.image_size, 3), jnp.float32)
  tokens = jnp.zeros((batch, config.text.context_length), jnp.int32)
  return images, tokens


def abstract_params(model: CLIP):
  """Boxed (logically partitioned) parameter shapes, without allocating anything."""
  images, tokens = dummy_inputs(model.config)
  return jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), images, tokens))["params"]


def init_params(model: CLIP, rng) -> dict:
  """Unboxed parameters (plain arrays). For sharded init see `clip_jax.sharding`."""
  images, tokens = dummy_inputs(model.config)
  return nn.meta.unbox(model.init(rng, images, tokens)["params"])


def count_params(params) -> int:
  return int(sum(x.size for x in jax.tree_util.tree_leaves(nn.meta.unbox(params))))
