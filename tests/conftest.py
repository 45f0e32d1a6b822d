"""Test setup: 8 simulated CPU devices (a small pod) unless the caller set XLA_FLAGS."""
import os
import pathlib

# XLA:CPU aborts the process when a collective's participants do not all arrive within 40 s;
# 8 simulated devices on 2 busy cores (the unscanned ResNet's many collectives) can take longer.
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8 "
                      "--xla_cpu_collective_call_terminate_timeout_seconds=600")
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# tests/test_gcs.py's local GCS server has no hierarchical namespaces: without this, gcsfs
# (which reads it when first imported, by any test module) probes each bucket for them.
os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import pytest  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"


@pytest.fixture(scope="session")
def shared_dir():
  if not SHARED.exists():
    pytest.skip(f"{SHARED} (the shared material beside the repo) is not present")
  return SHARED
