"""CLIP ViT-B/16 with the paper's recipe (lr 5e-4). Usage:

  python -m clip_jax.train --config=configs/vitb16.py --workdir=gs://BUCKET/runs/vitb16 \
      --config.data.path='gs://BUCKET/shards/{00000..41407}.tar'
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import _paper  # noqa: E402


def get_config():
  c = _paper.get_config("vitb16", learning_rate=5e-4)
  c.remat_policy = "dots"            # 197 tokens/image: keep matmul outputs, recompute the rest
  c.lock()
  return c
