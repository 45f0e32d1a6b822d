"""Flax modules of CLIP. Pure modules: no sharding code beyond logical axis names."""
from clip_jax.models.clip import (BATCH_STATS, CLIP, abstract_loaded_params, abstract_params,
                                  abstract_variables, count_params, create_model, init_params,
                                  init_variables, l2_normalize, model_variables, with_batch_stats)
from clip_jax.models.configs import (MODEL_CONFIGS, OPEN_CLIP_NAMES, OPENAI_MEAN, OPENAI_STD,
                                     CLIPConfig, ResNetConfig, TextConfig, VisionConfig, get_model_config,
                                     open_clip_name, resolve_model_name)
from clip_jax.models.flops import forward_flops_per_pair, train_flops_per_pair, train_flops_per_step
from clip_jax.models.params import interpolate_pos_embed, scan_params, unscan_params
