"""CLIP ViT-L/14 with the paper's recipe (lr 4e-4). Usage:

  python -m clip_jax.train --config=configs/vitl14.py --workdir=gs://BUCKET/runs/vitl14 \
      --config.data.path='gs://BUCKET/shards/{00000..41407}.tar'
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import _paper  # noqa: E402


def get_config():
  c = _paper.get_config("vitl14", learning_rate=4e-4)
  c.remat_policy = "dots"            # 257 tokens x 24 layers: activations dominate memory
  # TPU slices at 32,768 (compiled by the preflight, README "TPU preflight"): "dots" keeps
  # every layer's f32 attention logits (37.9 GiB a chip on v5e-256). v5p-128 (512 a chip):
  # 78.8 of 95 GiB; v6e-256: 22.7 of 32 GiB; v5e-256: only the attention output kept, 9.3 of
  # 16 GiB ("dots_no_batch" asks 17.7 GiB there).
  c.slice_overrides.v5p = "remat_policy=dots_no_batch"
  c.slice_overrides.v6e = "remat_policy=dots_no_batch"
  c.slice_overrides.v5e = "remat_policy=save_attn_out"
  c.lock()
  return c
