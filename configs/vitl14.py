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
  c.lock()
  return c
