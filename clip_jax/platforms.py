"""Which JAX platforms to start: no libtpu start-up on a host that has no TPU.

With libtpu installed (the `[tpu]` and `[test]` extras, for the TPU preflight), JAX starts
its TPU plugin on every host, and on a CPU or GPU machine libtpu prints five lines of
"E0000 ... INVALID_ARGUMENT: Error: unexpected worker hostname" before anything else.
`import clip_jax` therefore looks, before JAX starts a backend, whether this host has TPU
chips (their device files or PCI functions); if it has none, JAX is told to start only the
platforms the host has (a GPU's where its plugin and device are present, and the CPU).

Never on a TPU host, never when the user chose (`JAX_PLATFORMS`, or jax.config's
jax_platforms set before), and never once JAX has started its backends. The TPU preflight
compiles with libtpu's compiler through its topology API, which this does not touch.
"""
from __future__ import annotations

import glob
import importlib.util
import os
import sys

GOOGLE_PCI_VENDOR = "0x1ae0"  # TPU chips are PCI functions of Google's vendor id ...
GOOGLE_NON_TPU_DEVICES = ("0x0042",)  # ... and so is the gVNIC of every GCE VM
NVIDIA_DEVICES = ("/dev/nvidia0", "/dev/nvidiactl", "/dev/dxg")


def _read(path: str) -> str:
  try:
    with open(path) as f:
      return f.read().strip().lower()
  except OSError:
    return ""


def host_has_tpu() -> bool:
  """TPU chips on this host: /dev/accel* (v2-v4, v5p), /dev/vfio/N (v5e, v6e) or a PCI
  function of Google's vendor id other than the gVNIC. Errs towards True: any sign of a
  chip, a future one included, counts."""
  if glob.glob("/dev/accel*") or any(
      os.path.basename(p).isdigit() for p in glob.glob("/dev/vfio/*")):
    return True
  for vendor in glob.glob("/sys/bus/pci/devices/*/vendor"):
    if _read(vendor) == GOOGLE_PCI_VENDOR and _read(
        os.path.join(os.path.dirname(vendor), "device")) not in GOOGLE_NON_TPU_DEVICES:
      return True
  return False


def _has_plugin(*modules: str) -> bool:
  return any(importlib.util.find_spec(m) is not None for m in modules)


def host_platforms() -> list[str]:
  """The non-TPU platforms this host can run: a GPU's when its JAX plugin and its device
  files are present, then the CPU."""
  platforms = []
  if any(os.path.exists(d) for d in NVIDIA_DEVICES) and _has_plugin(
      "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_plugins.xla_cuda12",
      "jax_plugins.xla_cuda13"):
    platforms.append("cuda")
  if os.path.exists("/dev/kfd") and _has_plugin("jax_rocm60_plugin", "jax_rocm7_plugin",
                                                "jax_plugins.xla_rocm60",
                                                "jax_plugins.xla_rocm7"):
    platforms.append("rocm")
  return platforms + ["cpu"]


def skip_absent_tpu() -> str | None:
  """Restricts JAX to `host_platforms()` when this host has no TPU and nobody chose the
  platforms; returns what it set (None when it left JAX alone)."""
  if os.environ.get("JAX_PLATFORMS") is not None or host_has_tpu():
    return None
  platforms = ",".join(host_platforms())
  jax = sys.modules.get("jax")
  if jax is None:  # JAX reads the variable when it is imported
    os.environ["JAX_PLATFORMS"] = platforms
    return platforms
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if jax.config.jax_platforms or xla_bridge.backends_are_initialized():
    return None
  jax.config.update("jax_platforms", platforms)
  return platforms
