"""The README's demo: `python -m clip_jax.train --config=configs/demo.py --workdir=runs/demo`
finishes within 10 minutes on 2 CPU cores and reaches >= 90% zero-shot top-1 on the held-out
synthetic set. Slow (minutes): run with `pytest -m slow tests/test_train_demo.py`."""
import os
import pathlib
import subprocess
import sys
import time

import pytest

from clip_jax import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_demo_learns_the_synthetic_set_within_ten_minutes(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}  # one CPU device, as users run it
  env["PYTHONPATH"] = str(REPO)
  start = time.time()
  proc = subprocess.run([sys.executable, "-m", "clip_jax.train", "--config=configs/demo.py",
                         f"--workdir={tmp_path}", "--config.progress_bar=False"],
                        cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  wall = time.time() - start
  assert proc.returncode == 0, proc.stderr[-3000:]
  records = metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")
  final = [r for r in records if "eval/synthetic/top1" in r][-1]
  print(f"demo: {wall:.0f}s, eval/synthetic/top1={final['eval/synthetic/top1']:.4f}")
  assert final["eval/synthetic/top1"] >= 0.90, final
  assert wall < 600, f"demo took {wall:.0f}s (load {os.getloadavg()})"
