"""CLIP RN101 (OpenAI's ModifiedResNet image tower) with the paper's recipe (lr 5e-4). Usage:

  python -m clip_jax.train --config=configs/rn101.py --workdir=gs://BUCKET/runs/rn101 \
      --config.data.path='gs://BUCKET/shards/{00000..41407}.tar'

BatchNorm normalises with the statistics of the whole global batch (per micro-batch with
accum_steps > 1); its running averages are part of the train state (clip_jax/step.py).
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import _paper  # noqa: E402


def get_config():
  c = _paper.get_config("rn101", learning_rate=5e-4)
  c.lock()
  return c
