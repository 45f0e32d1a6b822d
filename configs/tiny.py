"""A tiny run for tests: 2-layer towers at 32px, global batch 16, 12 steps on synthetic data.

Every step is logged (exact-resume tests compare per-step losses); a checkpoint every 4 steps.
"""
import os
import sys

import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402


def get_config():
  c = common.get_config()
  c.model = "tiny"
  c.batch_size = 16
  c.total_steps = 12
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 2
  c.data.source = "synthetic"
  c.data.shuffle_buffer = 64
  c.log_every = 1
  c.checkpoint_every = 4
  c.keep_checkpoints = 3
  c.eval_every = 0                   # 0: evaluate only at the end
  c.evals.synthetic = ml_collections.ConfigDict(
      {"num_examples": 64, "batch_size": 32, "seed": 0})
  c.progress_bar = False
  c.lock()
  return c
