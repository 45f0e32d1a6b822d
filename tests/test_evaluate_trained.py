"""A briefly trained tiny CLIP: zero-shot far above chance; the notebook runs on its checkpoint."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
  workdir = tmp_path_factory.mktemp("run") / "demo"
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1")
  # 200 demo steps (about 80 s on 2 cores) reach ~36% top-1 on the 20 synthetic classes.
  subprocess.run([sys.executable, "-m", "clip_jax.train", "--config=configs/demo.py",
                  f"--workdir={workdir}", "--config.total_steps=200",
                  "--config.optimizer.warmup_steps=20", "--config.checkpoint_every=200",
                  "--config.eval_every=200", "--config.progress_bar=False"],
                 cwd=REPO, env=env, check=True, capture_output=True, text=True, timeout=1500)
  return workdir


def test_trained_checkpoint_zeroshot_far_above_chance(trained_workdir, tmp_path):
  output = tmp_path / "results.json"
  subprocess.run([sys.executable, "-m", "clip_jax.evaluate", "--workdir", str(trained_workdir),
                  "--task", "zeroshot", "--dataset", "synthetic", "--num_examples", "400",
                  "--output", str(output)], cwd=REPO, check=True, capture_output=True, text=True)
  metrics = json.loads(output.read_text())["metrics"]
  # 20 balanced classes: chance is 5% top-1.
  assert metrics["acc1"] > 0.25, metrics


def test_notebook_runs_on_the_trained_checkpoint(trained_workdir, monkeypatch):
  nbformat = pytest.importorskip("nbformat")
  nbclient = pytest.importorskip("nbclient")
  monkeypatch.setenv("CLIP_JAX_CHECKPOINT", str(trained_workdir))
  notebook = nbformat.read(REPO / "notebooks" / "zero_shot.ipynb", as_version=4)
  nbclient.NotebookClient(notebook, timeout=600, kernel_name="python3",
                          resources={"metadata": {"path": str(REPO)}}).execute()
  outputs = [o for cell in notebook.cells if cell.cell_type == "code" for o in cell.outputs]
  assert not [o for o in outputs if o.output_type == "error"]
  assert sum(o.output_type == "display_data" for o in outputs) >= 2  # the grid and the heatmap
