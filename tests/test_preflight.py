"""TPU preflight (clip_jax.preflight): names, per-slice overrides, compiles for TPU topologies.

The compile tests need libtpu (the `[tpu]` extra; `[test]` pulls it) and run on a CPU host:
libtpu only compiles, JAX itself stays on its CPU backend.
"""
import importlib
import json
import os
import pathlib
import subprocess
import sys

import pytest

from clip_jax import preflight

REPO = pathlib.Path(__file__).resolve().parents[1]
RECIPES = ("vitb32", "vitb16", "vitl14", "vitl14_336")


def _has_libtpu() -> bool:
  try:
    importlib.import_module("libtpu")
    return True
  except ImportError:
    return False


needs_libtpu = pytest.mark.skipif(not _has_libtpu(), reason="libtpu (the [tpu] extra) missing")


def _tiny(batch=16, **fields):
  from configs import tiny
  config = tiny.get_config()
  with config.unlocked():
    config.mesh.data, config.mesh.fsdp = 1, -1
    config.batch_size = batch
    for k, v in fields.items():
      config[k] = v
  return config


# ---------------------------------------------------------------------------------- names
@pytest.mark.parametrize("name, topology, chips, accelerator", [
    ("v5e-256", "v5e:16x16", 256, "v5litepod-256"),     # v5e counts chips
    ("v5litepod-256", "v5e:16x16", 256, "v5litepod-256"),
    ("v5litepod-8", "v5e:2x4", 8, "v5litepod-8"),
    ("v6e-256", "v6e:16x16", 256, "v6e-256"),
    ("v6e-64", "v6e:8x8", 64, "v6e-64"),
    ("v4-8", "v4:2x2x1", 4, "v4-8"),                    # v4 and v5p count TensorCores
    ("v4-128", "v4:4x4x4", 64, "v4-128"),
    ("v4-256", "v4:4x4x8", 128, "v4-256"),
    ("v5p-128", "v5p:4x4x4", 64, "v5p-128"),
    ("v5p-256", "v5p:4x4x8", 128, "v5p-256"),
    ("v5p-512", "v5p:4x8x8", 256, "v5p-512"),
    ("v5e:16x16", "v5e:16x16", 256, "v5litepod-256"),   # JAX topology strings
    ("v4:4x4x8", "v4:4x4x8", 128, "v4-256"),
    ("V5P:2x2x1", "v5p:2x2x1", 4, "v5p-8"),
])
def test_parse_topology(name, topology, chips, accelerator):
  s = preflight.parse_topology(name)
  assert (s.topology, s.chips, s.accelerator_type) == (topology, chips, accelerator)


def test_hosts_match_cloud_tpu():
  assert preflight.parse_topology("v4-256").hosts == 32       # 4 chips a host
  assert preflight.parse_topology("v5e-256").hosts == 64
  assert preflight.parse_topology("v5e-4").hosts == 1


@pytest.mark.parametrize("name, says", [
    ("v7x-64", "unknown TPU topology 'v7x-64'"),
    ("tpu", "unknown TPU topology"),
    ("v4-12", "counts TensorCores (2 per chip)"),
    ("v5p-4", "power of two >= 8"),
    ("v5e-100", "counts chips"),
    ("v5e:4x4x4", "v5e is a 2D torus"),
    ("v4:4x4", "v4 is a 3D torus"),
])
def test_parse_topology_errors(name, says):
  with pytest.raises(preflight.PreflightError, match=None) as e:
    preflight.parse_topology(name)
  assert says in str(e.value)
  if "unknown" in says:
    assert "v5litepod-256" in str(e.value) and "v4:4x4x8" in str(e.value)  # lists known ones


def test_tpu_kind_from_device_kind_and_names():
  assert [preflight.tpu_kind(k) for k in ("TPU v4", "TPU v5 lite", "TPU v5", "TPU v6 lite")] == [
      "v4", "v5e", "v5p", "v6e"]
  assert preflight.tpu_kind("v5litepod-64") == "v5e"
  assert preflight.tpu_kind("v4:2x2x1") == "v4"
  assert preflight.tpu_kind("cpu") is None and preflight.tpu_kind("NVIDIA H100") is None


# ---------------------------------------------------------------------------- overrides
def test_apply_slice_overrides_types_and_explicit_flags_win():
  config = _tiny()
  config.slice_overrides.v5e = "remat_policy=full accum_steps=2 mesh.fsdp=4 log_update_norm=true"
  assert preflight.apply_slice_overrides(config, "TPU v6 lite") == []  # another kind
  applied = preflight.apply_slice_overrides(config, "TPU v5 lite",
                                            explicit=["--config.accum_steps=1", "mesh"])
  assert applied == ["--config.remat_policy=full", "--config.log_update_norm=true"]
  assert (config.remat_policy, config.accum_steps, config.mesh.fsdp) == ("full", 1, -1)
  assert config.log_update_norm is True
  config.slice_overrides.v5e = "accum_steps=4"
  preflight.apply_slice_overrides(config, "v5e-256")
  assert config.accum_steps == 4 and isinstance(config.accum_steps, int)


def test_apply_slice_overrides_bad_field():
  config = _tiny()
  config.slice_overrides.v4 = "remat=full"
  with pytest.raises(preflight.PreflightError, match="no field 'remat'"):
    preflight.apply_slice_overrides(config, "v4-8")


@pytest.mark.parametrize("recipe", RECIPES)
def test_recipe_slice_overrides_name_real_fields(recipe):
  for kind in preflight.TPU_KINDS:
    config = importlib.import_module(f"configs.{recipe}").get_config()
    preflight.apply_slice_overrides(config, preflight.TPU_KINDS[kind].device_kind)
    from clip_jax import sharding
    chips = 64 if preflight.TPU_KINDS[kind].ndims == 3 else 256  # v4/v5p-128, v5e/v6e-256
    sharding.validate_config(config, num_devices=chips, process_count=chips // 4)


def test_fit_candidates_cheapest_first():
  config = _tiny(batch=64, remat_policy="dots")
  candidates = preflight.fit_candidates(config, num_devices=4)
  assert candidates[:4] == [{"remat_policy": "dots_no_batch"}, {"remat_policy": "save_attn_out"},
                            {"remat_policy": "full"}, {"accum_steps": 2}]
  assert {"remat_policy": "full", "accum_steps": 16} in candidates      # local batch 16
  assert not any(c.get("accum_steps", 1) > 16 for c in candidates)


def test_oom_bytes():
  assert preflight.oom_bytes("RESOURCE_EXHAUSTED: Ran out of memory on HBM, the total memory "
                             "required for HLO temporaries (37.89G) exceeds available HBM "
                             "(15.75G).") == int(37.89 * 2**30)
  assert preflight.oom_bytes("Used 20.5G of 15.75G hbm. Exceeded hbm capacity by 4.7G.") == int(
      20.5 * 2**30)


# ------------------------------------------------------------------------- user errors
def test_missing_libtpu_is_one_line(monkeypatch, capsys):
  monkeypatch.setitem(sys.modules, "libtpu", None)  # `import libtpu` raises ImportError
  assert preflight.run(_tiny(), "v5e-4") == preflight.EXIT_USAGE
  out, err = capsys.readouterr()
  assert out == ""
  assert err.count("\n") == 1 and err.startswith("error: ")
  assert "pip install 'clip_jax[tpu]'" in err


def test_unknown_topology_is_one_line(capsys):
  assert preflight.run(_tiny(), "v9-8") == preflight.EXIT_USAGE
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and "unknown TPU topology 'v9-8'" in err and "v6e-256" in err


@needs_libtpu
def test_mesh_the_slice_cannot_hold_is_one_line(capsys):
  with_mesh = _tiny()
  with_mesh.mesh.fsdp = 3
  assert preflight.run(with_mesh, "v5e:2x2") == preflight.EXIT_USAGE
  err = capsys.readouterr().err
  assert err.count("\n") == 1 and err.startswith("error: v5e:2x2") and "config.mesh" in err
  assert preflight.run(_tiny(batch=6), "v5e:2x2") == preflight.EXIT_USAGE
  assert "config.batch_size=6 is not divisible" in capsys.readouterr().err
  assert preflight.run(_tiny(), "v5e:2x2", num_slices=2) == preflight.EXIT_USAGE
  assert "--config.dcn_mesh.data=2" in capsys.readouterr().err


# ------------------------------------------------------------------------------ compiles
@needs_libtpu
@pytest.mark.parametrize("topology, kind, chips", [("v5e:2x2", "TPU v5 lite", 4),
                                                    ("v4:2x2x1", "TPU v4", 4)])
def test_tiny_model_compiles_and_fits(topology, kind, chips, capsys):
  assert preflight.run(_tiny(), topology) == 0
  out = capsys.readouterr().out
  assert out.count("\n") == 1
  report = json.loads(out)
  assert report["fits"] is True and report["dry_run"] is True
  assert report["topology"] == topology and report["device_kind"] == kind
  # v4 compiles one megacore device per chip, as a real slice runs, not one per TensorCore.
  assert report["num_devices"] == chips and report["mesh"]["fsdp"] == chips
  memory = report["memory_per_device"]
  assert 0 < memory["total"] < report["hbm_per_device"] and memory["temp"] > 0
  assert report["num_slices"] == 1 and report["compile_s"] > 0
  assert report["flops_per_step"] > 0 and report["num_params"] > 0


@needs_libtpu
def test_multislice_compiles_over_dcn(capsys):
  config = _tiny(batch=32)
  config.dcn_mesh.data = 2
  assert preflight.run(config, "v5e:2x2", num_slices=2) == 0
  report = json.loads(capsys.readouterr().out)
  assert report["num_slices"] == 2 and report["num_devices"] == 8
  assert report["mesh"] == {"data": 2, "fsdp": 4, "tensor": 1}


@needs_libtpu
def test_impossible_batch_does_not_fit_without_traceback():
  """The command line: one JSON line, fits false, the exit code, no traceback. A second
  process holding libtpu at the same time must not block it (libtpu's lockfile)."""
  command = [sys.executable, "-m", "clip_jax.train", "--config=configs/tiny.py", "--dry_run",
             "--topology=v5e:2x2", "--config.mesh.data=1", "--config.mesh.fsdp=-1",
             "--config.batch_size=262144"]
  env = dict(os.environ, JAX_PLATFORMS="", PYTHONPATH=str(REPO))
  env.pop("XLA_FLAGS", None)
  holder = subprocess.Popen(  # another libtpu user holding /tmp/libtpu_lockfile meanwhile
      [sys.executable, "-c", "import time; from jax.experimental import topologies; "
       "topologies.get_topology_desc(platform='tpu', topology_name='v5e:2x2', "
       "chips_per_host_bounds=(2, 2, 1), num_slices=1); print('ok', flush=True); time.sleep(60)"],
      cwd=REPO, env=dict(env, JAX_PLATFORMS="cpu"), stdout=subprocess.PIPE,
      stderr=subprocess.DEVNULL, text=True)
  try:
    assert holder.stdout.readline().strip() == "ok"
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True,
                            timeout=120)
  finally:
    holder.kill()
    holder.wait()
  assert result.returncode == preflight.EXIT_DOES_NOT_FIT, result.stderr[-2000:]
  assert "Traceback" not in result.stderr
  lines = result.stdout.strip().splitlines()
  assert len(lines) == 1
  report = json.loads(lines[0])
  assert report["fits"] is False and report["global_batch"] == 262144
  assert report["memory_per_device"]["total"] > report["hbm_per_device"]
  assert "RESOURCE_EXHAUSTED" in report["error"]


def test_topology_flags_need_the_dry_run():
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  for flags, says in ((["--topology=v5e-256"], "--topology needs --dry_run"),
                      (["--dry_run", "--fit"], "--fit and --num_slices need --topology")):
    result = subprocess.run([sys.executable, "-m", "clip_jax.train", "--config=configs/tiny.py",
                             "--workdir=/nonexistent", *flags], cwd=REPO, env=env,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and result.stderr.strip().splitlines() == [
        result.stderr.strip()], result.stderr
    assert says in result.stderr
