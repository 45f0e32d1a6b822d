"""Memory of the compiled step at global batch 32,768 with the tiny towers (compile only)."""
import pytest

from benchmarks.memory import measure

BATCH = 32768
GIB = 1 << 30


def test_one_device_chunked_accumulated_fits_4gib():
  r = measure("tiny", BATCH, devices=1, impl="chunked", accum=32)
  assert not r["bxb_buffer_in_hlo"]
  assert r["memory_per_device"]["total"] < 4 * GIB, r


@pytest.mark.slow
def test_eight_devices_no_bxb_and_chunked_below_global():
  glob = measure("tiny", BATCH, devices=8, impl="global", accum=1)
  chunk = measure("tiny", BATCH, devices=8, impl="chunked", accum=1)
  for r in (glob, chunk):
    assert not r["bxb_buffer_in_hlo"], r
  assert chunk["memory_per_device"]["temp"] < glob["memory_per_device"]["temp"]
