"""The text tower: OpenAI's causal text Transformer in Flax."""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from clip_jax.models.configs import CLIPConfig
from clip_jax.models.layers import LayerNorm, Transformer, normal, param_with_axes


class TextTransformer(nn.Module):
  """Token + pos embedding -> causal blocks -> ln_final -> pool at EOT (argmax id) -> proj."""
  config: CLIPConfig

  @nn.compact
  def __call__(self, tokens):
    cfg, tcfg = self.config, self.config.text
    dtype, param_dtype = jnp.dtype(cfg.dtype), jnp.dtype(cfg.param_dtype)
    if tokens.ndim != 2 or tokens.shape[1] != tcfg.context_length:
      raise ValueError(
          f"tokens must be [batch, {tcfg.context_length}], got shape {tokens.shape}")
    width = tcfg.width
    embedding = param_with_axes(self, "token_embedding", normal(0.02),
                                (tcfg.vocab_size, width), param_dtype, ("vocab", "embed"))
    # Gather the (fsdp-sharded) table before the lookup, as FSDP does for every weight: a
    # lookup into an embed-sharded table gives embed-sharded rows, which XLA can only turn
    # into batch-sharded activations by replicating them ("involuntary full remat").
    embedding = nn.with_logical_constraint(embedding, (None, None))
    x = jnp.take(embedding, tokens, axis=0).astype(dtype)
    pos = param_with_axes(self, "positional_embedding", normal(0.01),
                          (tcfg.context_length, width), param_dtype, ("pos", "embed"))
    x = x + pos.astype(dtype)[None]
    x = nn.with_logical_constraint(x, ("batch", "seq", "embed"))
    # The end-of-text token has the largest id, so argmax finds it (as in openai/CLIP); the
    # last block computes that token's row only.
    eot = jnp.argmax(tokens, axis=-1)
    pooled = Transformer(tcfg.layers, tcfg.heads, tcfg.mlp_ratio, causal=True, act=cfg.act,
                         ln_eps=cfg.ln_eps, dtype=dtype, param_dtype=param_dtype,
                         scan_layers=cfg.scan_layers, remat_policy=cfg.remat_policy,
                         attention_impl=cfg.attention_impl, name="transformer")(x, pool_index=eot)
    pooled = LayerNorm(cfg.ln_eps, jnp.float32, param_dtype, name="ln_final")(pooled)
    proj = param_with_axes(self, "text_projection", normal(width ** -0.5),
                           (width, cfg.embed_dim), param_dtype, ("embed", "proj"))
    return pooled @ proj.astype(jnp.float32)
