"""CLIP ViT-L/14@336px: the paper pre-trains L/14 at 224px, then one more epoch at 336px
(FixRes-style) starting from the L/14 weights, position embedding interpolated from a
16x16 to a 24x24 grid (clip_jax.models.params.interpolate_pos_embed, done by the trainer
whenever init_from's grid differs). Usage:

  python -m clip_jax.train --config=configs/vitl14_336.py --workdir=gs://BUCKET/runs/l14_336 \\
      --config.init_from=gs://BUCKET/runs/vitl14
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import _paper  # noqa: E402


def get_config():
  # Table 20: 2e-5 for the extra epoch (the 224px pre-training's is 4e-4).
  c = _paper.get_config("vitl14_336", learning_rate=2e-5)
  c.epochs = 1.0                     # one extra epoch at 336px: 12,207 steps
  c.init_from = "gs://YOUR_BUCKET/runs/vitl14"  # an L/14 workdir or converted checkpoint
  c.init_towers = "both"
  c.remat_policy = "full"            # 577 tokens/image
  # TPU slices at 32,768 (README "TPU preflight"): v5p-128 66.8 of 95 GiB a chip, v6e-256
  # fits as shipped; v5e-256 needs 16.5 GiB with full remat, so two GradCache micro-batches
  # (8.6 of 16 GiB).
  c.slice_overrides.v5e = "accum_steps=2"
  c.lock()
  return c
