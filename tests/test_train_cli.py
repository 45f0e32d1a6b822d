"""`python -m clip_jax.train` as users run it (subprocesses): config errors, --dry_run, exact
resume after SIGTERM and SIGKILL (of a mixture of synthetic data and wds shards, with virtual
epochs and the EMA of the weights), resume onto a different device count."""
import json
import os
import pathlib
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from clip_jax import checkpoint as ckpt_lib
from clip_jax import metrics as metrics_lib

REPO = pathlib.Path(__file__).resolve().parents[1]
# Long enough that a signal sent around step 5 lands mid-run; every step logged; an EMA of the
# weights (from step 3) that the resume must continue exactly; the data a mixture of the
# synthetic shapes and wds shards (resume_flags adds them), whose every stream must continue.
RESUME_FLAGS = ["--config.total_steps=24", "--config.eval_every=-1", "--config.keep_every=4",
                "--config.ema_decay=0.8", "--config.ema_start_step=3",
                "--config.data.source=mix", "--config.data.mix_weights=3::1",
                "--config.data.samples_per_epoch=64"]
MIX_COUNTERS = ("data/synthetic/samples", "data/wds/samples", "data/skipped_samples", "epoch")


def _env(devices=8):
  return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
              JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))


def _command(workdir, *flags, config="configs/tiny.py"):
  return [sys.executable, "-m", "clip_jax.train", f"--config={config}", f"--workdir={workdir}",
          *flags]


def _run(workdir, *flags, devices=8, timeout=240, config="configs/tiny.py"):
  return subprocess.run(_command(workdir, *flags, config=config), cwd=REPO, env=_env(devices),
                        capture_output=True, text=True, timeout=timeout)


def _losses(workdir) -> dict[int, float]:
  return {r["step"]: r["loss"] for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl")
          if "loss" in r}


def _counters(workdir) -> dict[int, tuple]:
  """Each step's input counters of the mixture (and the epoch)."""
  return {r["step"]: tuple(r[k] for k in MIX_COUNTERS)
          for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl") if "loss" in r}


@pytest.fixture(scope="module")
def resume_flags(tmp_path_factory):
  """RESUME_FLAGS with the mixture's path: synthetic::wds over 2 shards of 8 images."""
  from clip_jax.data import wds  # pylint: disable=g-import-not-at-top
  directory = tmp_path_factory.mktemp("shards")
  rng = np.random.default_rng(0)
  for s in range(2):
    wds.write_shard(str(directory / f"{s}.tar"), [
        (f"{s}{i:02d}", rng.integers(0, 255, (32, 32, 3), dtype=np.uint8), f"a tile {s} {i}", None)
        for i in range(8)])
  return RESUME_FLAGS + [f"--config.data.path=synthetic::wds:{directory}/{{0..1}}.tar"]


def _run_and_signal(workdir, sig, ready, *flags):
  """Starts a run and sends `sig` once `ready(workdir)` holds; returns the process."""
  proc = subprocess.Popen(_command(workdir, *flags), cwd=REPO, env=_env(),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 240
  while time.time() < deadline and proc.poll() is None:
    if ready(workdir):
      proc.send_signal(sig)
      break
    time.sleep(0.02)
  out, err = proc.communicate(timeout=240)
  return proc, out, err


@pytest.mark.parametrize("flag, expected", [
    ("--config.batchsize=16", "unknown config field 'config.batchsize' (did you mean 'batch_size'?)"),
    ("--config.optimizer.lr=0.1", "unknown config field 'config.optimizer.lr'"),
    ("--config.batch_size=sixteen", "--config.batch_size=sixteen"),
    ("--config.batch_size=12", "config.batch_size=12 is not divisible"),
    ("--config.log_every=0", "config.log_every=0 must be >= 1"),
    ("--config.data.source=mix", "config.data.path is empty; for config.data.source='mix'"),
    ("--config.total_steps=2147483648",
     "total_steps=2147483648 (config.total_steps) exceeds 2147483647, the largest step"),
])
def test_config_errors_are_one_line(tmp_path, flag, expected):
  proc = _run(tmp_path, flag, timeout=120)
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ") and expected in last, proc.stderr
  assert not (tmp_path / "checkpoints").exists()


def test_run_longer_than_the_int32_step_is_one_line(tmp_path):
  # 32 epochs of 400M samples at batch 2: 6.4e9 steps.
  proc = _run(tmp_path, "--dry_run", "--config.batch_size=2", devices=1, timeout=120,
              config="configs/vitb32.py")
  assert proc.returncode == 2, proc.stderr
  assert "Traceback" not in proc.stderr
  assert proc.stderr.strip().splitlines()[-1] == (
      "error: total_steps=6400000000 (config.epochs * config.num_train_examples / "
      "config.batch_size) exceeds 2147483647, the largest step the train state holds (int32); "
      "raise config.batch_size or set config.total_steps")


def test_dry_run_prints_one_json_line(tmp_path):
  # The longest run the int32 step holds compiles (its schedules included).
  proc = _run(tmp_path, "--dry_run", "--config.batch_size=64", "--config.total_steps=2147483647",
              timeout=180)
  assert proc.returncode == 0, proc.stderr
  report = json.loads(proc.stdout.strip().splitlines()[-1])
  assert report["dry_run"] is True and report["num_devices"] == 8
  assert report["global_batch"] == 64
  assert report["num_params"] > 0 and report["flops_per_step"] > 0
  assert set(report["memory_per_device"]) == {"argument", "output", "temp", "total"}


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory, resume_flags):
  """24 uninterrupted steps on 8 devices; a checkpoint kept every 4 steps."""
  workdir = tmp_path_factory.mktemp("reference")
  proc = _run(workdir, *resume_flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  losses = _losses(workdir)
  assert sorted(losses) == list(range(1, 25))
  counters = _counters(workdir)
  assert counters[24][0] + counters[24][1] == 24 * 16 and counters[24][1] > 0
  assert counters[4][3] == 1.0 and counters[24][3] == 6.0  # 64-sample virtual epochs
  return workdir, losses


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_interrupted_run_resumes_exactly(reference_run, resume_flags, tmp_path, sig):
  reference_dir, reference = reference_run
  if sig == signal.SIGTERM:  # mid-way between two checkpoints
    ready = lambda w: (w / "metrics.jsonl").exists() and max(_losses(w), default=0) >= 5
  else:  # once one save has committed, so the restart has something to resume from
    ready = lambda w: (w / "checkpoints" / "4").is_dir() and max(_losses(w), default=0) >= 6
  proc, _, err = _run_and_signal(tmp_path, sig, ready, *resume_flags)
  if sig == signal.SIGTERM:
    assert proc.returncode == 0, err[-3000:]  # preemption: saved the current step, exit 0
    assert "preempted: saved step" in err
  else:
    assert proc.returncode == -signal.SIGKILL
  steps = sorted(int(p.name) for p in (tmp_path / "checkpoints").iterdir() if p.name.isdigit())
  assert steps and steps[-1] < 24, steps  # the signal landed mid-run
  resume_step = steps[-1]

  proc = _run(tmp_path, *resume_flags)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"at step {resume_step}" in proc.stderr
  resumed = _losses(tmp_path)
  assert sorted(resumed) == list(range(1, 25))
  np.testing.assert_allclose([resumed[s] for s in range(resume_step + 1, 25)],
                             [reference[s] for s in range(resume_step + 1, 25)], rtol=0, atol=1e-6)
  # Each source's count continued from the checkpoint (the steps that ran twice, between
  # the checkpoint and the kill, are logged once: by the resumed run).
  assert _counters(tmp_path) == _counters(reference_dir)
  for weights in ("ema", "params"):  # the EMA continued exactly, as the weights did
    ours, _ = ckpt_lib.restore_params(str(tmp_path), weights)
    theirs, _ = ckpt_lib.restore_params(str(reference_dir), weights)
    for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs), strict=True):
      np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)


@pytest.mark.slow  # test_checkpoint.py restores onto another mesh in-process by default
def test_resume_onto_one_device(reference_run, resume_flags, tmp_path):
  reference_dir, reference = reference_run
  (tmp_path / "checkpoints").mkdir()
  shutil.copytree(reference_dir / "checkpoints" / "8", tmp_path / "checkpoints" / "8")
  proc = _run(tmp_path, *resume_flags, devices=1)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "at step 8" in proc.stderr and "over 1 devices" in proc.stderr
  resumed = _losses(tmp_path)
  assert sorted(resumed) == list(range(9, 25))
  # Same state, same batches; only the reduction order differs between 8 devices and 1.
  np.testing.assert_allclose([resumed[s] for s in range(9, 25)],
                             [reference[s] for s in range(9, 25)], rtol=0, atol=1e-4)
