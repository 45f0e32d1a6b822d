"""No libtpu start-up lines on a host without a TPU (clip_jax.platforms), with libtpu
installed, and the user's JAX_PLATFORMS respected."""
import importlib.util
import os
import pathlib
import subprocess
import sys

import pytest

from clip_jax import platforms

REPO = pathlib.Path(__file__).resolve().parents[1]
LIBTPU_LINES = ("libtpu", "TPU accelerator type", "InitGoogle", "unexpected worker hostname",
                "E0000", "Source Location Trace")

needs_libtpu_and_no_tpu = pytest.mark.skipif(
    importlib.util.find_spec("libtpu") is None or platforms.host_has_tpu(),
    reason="needs libtpu installed on a host without TPU chips")


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in ("JAX_PLATFORMS", "XLA_FLAGS")}
  env.update(PYTHONPATH=str(REPO), **extra)
  return env


def _libtpu_lines(stderr: str) -> list[str]:
  return [line for line in stderr.splitlines() if any(s in line for s in LIBTPU_LINES)]


@needs_libtpu_and_no_tpu
@pytest.mark.parametrize("command", [
    ["-c", "import clip_jax, jax; print(jax.devices())"],
    ["-c", "import jax, clip_jax; print(jax.devices())"],   # jax imported first
    ["-m", "clip_jax.evaluate", "--help"],
    ["-m", "clip_jax.convert", "--help"],
    ["-m", "clip_jax.export", "--help"],
    ["benchmarks/memory.py", "--help"],
], ids=["import", "import_jax_first", "evaluate", "convert", "export", "benchmark"])
def test_commands_print_no_libtpu_lines(command):
  proc = subprocess.run([sys.executable, *command], cwd=REPO, env=_env(), capture_output=True,
                        text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert not _libtpu_lines(proc.stderr), proc.stderr[-3000:]


@needs_libtpu_and_no_tpu
def test_the_demo_trains_without_libtpu_lines(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "clip_jax.train", "--config=configs/demo.py",
       f"--workdir={tmp_path}", "--config.total_steps=2", "--config.eval_every=-1",
       "--config.batch_size=16", "--config.checkpoint_every=2"],
      cwd=REPO, env=_env(), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "==== done" in proc.stderr
  assert not _libtpu_lines(proc.stderr), proc.stderr[-3000:]


@needs_libtpu_and_no_tpu
def test_an_explicit_jax_platforms_is_respected():
  # The user's empty JAX_PLATFORMS (JAX's own choice: every installed plugin) reaches JAX,
  # which then starts libtpu: its lines show that only our default kept them away.
  script = "import os, clip_jax, jax; jax.devices(); print(repr(os.environ['JAX_PLATFORMS']))"
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(JAX_PLATFORMS=""),
                        capture_output=True, text=True, timeout=180)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert proc.stdout.strip() == "''"
  assert _libtpu_lines(proc.stderr)
  script = "import clip_jax, jax; print(jax.config.jax_platforms, jax.devices()[0].platform)"
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                        env=_env(JAX_PLATFORMS="cpu"), capture_output=True, text=True,
                        timeout=180)
  assert proc.stdout.split() == ["cpu", "cpu"]


def test_platform_choice(monkeypatch):
  """No TPU: the host's platforms; a TPU, a user's choice, or started backends: untouched."""
  monkeypatch.delenv("JAX_PLATFORMS", raising=False)
  monkeypatch.setattr(platforms, "host_has_tpu", lambda: True)
  assert platforms.skip_absent_tpu() is None and "JAX_PLATFORMS" not in os.environ
  monkeypatch.setattr(platforms, "host_has_tpu", lambda: False)
  monkeypatch.setattr(platforms, "host_platforms", lambda: ["cuda", "cpu"])
  # This process's JAX has started its backends (conftest, other tests): left alone.
  import jax  # pylint: disable=import-outside-toplevel
  jax.devices()
  assert platforms.skip_absent_tpu() is None
  monkeypatch.delitem(sys.modules, "jax")  # as before JAX is imported
  assert platforms.skip_absent_tpu() == "cuda,cpu" and os.environ["JAX_PLATFORMS"] == "cuda,cpu"
  monkeypatch.setenv("JAX_PLATFORMS", "tpu")
  assert platforms.skip_absent_tpu() is None and os.environ["JAX_PLATFORMS"] == "tpu"


def test_tpu_detection_reads_device_files_and_pci(monkeypatch, tmp_path):
  files = {"/dev/accel0": False}
  monkeypatch.setattr(platforms.glob, "glob", lambda pattern: [])
  assert not platforms.host_has_tpu()
  # A GCE VM's gVNIC has Google's vendor id but is no TPU; a TPU chip's PCI function is.
  pci = tmp_path / "0000:00:04.0"
  pci.mkdir()
  (pci / "vendor").write_text("0x1ae0\n")
  (pci / "device").write_text("0x0042\n")
  monkeypatch.setattr(platforms.glob, "glob",
                      lambda pattern: [str(pci / "vendor")] if pattern.endswith("vendor") else [])
  assert not platforms.host_has_tpu()
  (pci / "device").write_text("0x0063\n")  # v5e
  assert platforms.host_has_tpu()
  monkeypatch.setattr(platforms.glob, "glob",
                      lambda pattern: list(files) if pattern == "/dev/accel*" else [])
  assert platforms.host_has_tpu()
  monkeypatch.setattr(platforms.glob, "glob",
                      lambda pattern: ["/dev/vfio/vfio", "/dev/vfio/0"] if "vfio" in pattern
                      else [])
  assert platforms.host_has_tpu()
  monkeypatch.setattr(platforms.glob, "glob",
                      lambda pattern: ["/dev/vfio/vfio"] if "vfio" in pattern else [])
  assert not platforms.host_has_tpu()
