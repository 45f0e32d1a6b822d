"""Starting JAX's multi-controller runtime: TPU VM pods, SLURM, explicit flags, or one process.

Every host of a job runs the same command and calls `initialize()` before anything touches a
device. Where the process group comes from, first match wins:

  1. explicit arguments, or the absl flags --coordinator_address --num_processes --process_id
  2. environment: CLIP_JAX_COORDINATOR_ADDRESS, CLIP_JAX_NUM_PROCESSES, CLIP_JAX_PROCESS_ID
     (set by launch/local.py and launch/slurm.sbatch)
  3. SLURM with more than one task (SLURM_JOB_ID, SLURM_NTASKS > 1, inside an `srun` step)
  4. a Cloud TPU VM (libtpu and TPU chips present): jax reads the pod's workers from the
     TPU metadata server; a single-host TPU VM becomes a group of one
  5. otherwise one process: nothing to start.

On CPU the collectives between processes go through gloo (`jax_cpu_collectives_implementation`),
which is what the local multi-process rehearsal (launch/local.py) runs on.

`check_same_config(config)` then makes sure every host runs the same config.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import Any, Mapping, Optional

from absl import flags
import jax
import numpy as np

ENV_COORDINATOR = "CLIP_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "CLIP_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CLIP_JAX_PROCESS_ID"

_FLAG_HELP = {
    "coordinator_address": "host:port of process 0's coordinator (multi-process runs; "
                           f"or ${ENV_COORDINATOR}).",
    "num_processes": f"Number of processes in the job (or ${ENV_NUM_PROCESSES}).",
    "process_id": f"This process's index in [0, num_processes) (or ${ENV_PROCESS_ID}).",
}

_initialized_by_us = False


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """Defines --coordinator_address --num_processes --process_id once (safe to call again)."""
  if "coordinator_address" not in flag_values:
    flags.DEFINE_string("coordinator_address", None, _FLAG_HELP["coordinator_address"],
                        flag_values=flag_values)
  if "num_processes" not in flag_values:
    flags.DEFINE_integer("num_processes", None, _FLAG_HELP["num_processes"],
                         flag_values=flag_values)
  if "process_id" not in flag_values:
    flags.DEFINE_integer("process_id", None, _FLAG_HELP["process_id"], flag_values=flag_values)


# Entry points that import this module get the flags (importing it twice defines nothing twice).
define_flags()


def _from_flags() -> dict[str, Any]:
  if not flags.FLAGS.is_parsed():
    return {}
  return {name: flags.FLAGS[name].value
          for name in ("coordinator_address", "num_processes", "process_id")
          if name in flags.FLAGS and flags.FLAGS[name].value is not None}


def _int_env(env: Mapping[str, str], name: str) -> Optional[int]:
  value = env.get(name)
  if value in (None, ""):
    return None
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"${name}={value!r} must be an integer") from None


def _from_env(env: Mapping[str, str]) -> dict[str, Any]:
  values = {"coordinator_address": env.get(ENV_COORDINATOR) or None,
            "num_processes": _int_env(env, ENV_NUM_PROCESSES),
            "process_id": _int_env(env, ENV_PROCESS_ID)}
  return {k: v for k, v in values.items() if v is not None}


def _in_slurm_job(env: Mapping[str, str]) -> bool:
  # Inside an srun step (SLURM_STEP_NODELIST) of a job with several tasks; the batch script
  # itself runs as one task and must not wait for the others.
  return ("SLURM_JOB_ID" in env and "SLURM_STEP_NODELIST" in env
          and (_int_env(env, "SLURM_NTASKS") or 1) > 1)


def _on_cloud_tpu_vm() -> bool:
  from jax._src import cloud_tpu_init  # pylint: disable=g-import-not-at-top
  if cloud_tpu_init.running_in_cloud_tpu_vm:
    return True
  try:  # before the backend loads, the flag above is not set yet: look for chips directly
    from jax._src import hardware_utils  # pylint: disable=g-import-not-at-top
    num_chips, _ = hardware_utils.num_available_tpu_chips_and_device_id()
    return num_chips > 0 and cloud_tpu_init.get_tpu_library_path() is not None
  except Exception:  # pylint: disable=broad-except  # an internal API that moved: no TPU path
    return False


def resolve(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
            process_id: Optional[int] = None,
            env: Optional[Mapping[str, str]] = None) -> tuple[str, dict[str, Any]]:
  """Which way this process joins a job: (mode, kwargs for jax.distributed.initialize).

  mode is "explicit" (arguments, flags or CLIP_JAX_* env), "slurm", "tpu" or "single".
  Raises ValueError (one line) for an incomplete or inconsistent explicit setting.
  """
  env = os.environ if env is None else env
  given = {k: v for k, v in (("coordinator_address", coordinator_address),
                             ("num_processes", num_processes),
                             ("process_id", process_id)) if v is not None}
  explicit = {**_from_env(env), **_from_flags(), **given}  # arguments win over flags over env
  if explicit:
    num = explicit.get("num_processes")
    if num is not None and num < 1:
      raise ValueError(f"--num_processes={num} must be >= 1")
    if num == 1 and explicit.get("process_id", 0) == 0:
      return "single", {}
    missing = [f"--{k}" for k in ("coordinator_address", "num_processes", "process_id")
               if k not in explicit]
    if missing:
      raise ValueError(f"multi-process run needs {' '.join(missing)} too (given: "
                       f"{', '.join(f'--{k}={v}' for k, v in explicit.items())})")
    if not 0 <= explicit["process_id"] < num:
      raise ValueError(f"--process_id={explicit['process_id']} must be in [0, {num}) for "
                       f"--num_processes={num}")
    if ":" not in explicit["coordinator_address"]:
      raise ValueError(f"--coordinator_address={explicit['coordinator_address']!r} must be "
                       "HOST:PORT")
    return "explicit", explicit
  if _in_slurm_job(env):
    # jax's SLURM detection finds the coordinator (first node of the step) and the rank.
    return "slurm", {}
  if _on_cloud_tpu_vm():
    return "tpu", {}
  return "single", {}


def initialize(coordinator_address: Optional[str] = None, num_processes: Optional[int] = None,
               process_id: Optional[int] = None) -> bool:
  """Starts jax.distributed for a multi-process job; returns whether it did (False: one process).

  Call it before anything touches a device (jax.devices(), creating arrays, compiling).
  Calling it again after a successful start does nothing.
  """
  global _initialized_by_us
  if _initialized_by_us or jax.distributed.is_initialized():
    return True
  mode, kwargs = resolve(coordinator_address, num_processes, process_id)
  if mode == "single":
    return False
  if _cpu_only():
    # Cross-process collectives on CPU (the local rehearsal, CPU clusters) run over gloo.
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
  logging.info("jax.distributed.initialize (%s): %s", mode, kwargs or "auto-detected")
  jax.distributed.initialize(**kwargs)
  _initialized_by_us = True
  logging.info("process %d of %d, %d local / %d global devices", jax.process_index(),
               jax.process_count(), jax.local_device_count(), jax.device_count())
  return True


def _cpu_only() -> bool:
  platforms = os.environ.get("JAX_PLATFORMS", "") or (jax.config.jax_platforms or "")
  if platforms:
    return platforms.split(",")[0].strip() == "cpu"
  # No platform forced: CPU unless an accelerator plugin is installed.
  import importlib.util  # pylint: disable=g-import-not-at-top
  return not any(importlib.util.find_spec(name) for name in
                 ("libtpu", "jax_cuda12_plugin", "jax_cuda13_plugin", "jax_rocm60_plugin"))


# ----------------------------------------------------------------------------------------------
# Every host runs the same config.
# ----------------------------------------------------------------------------------------------
def config_json(config, **flags_to_match) -> str:
  """Canonical JSON (sorted keys) of a ConfigDict or mapping, plus flags as "--name" keys."""
  if hasattr(config, "to_json_best_effort"):
    text = config.to_json_best_effort(sort_keys=True)
  else:
    text = json.dumps(config, sort_keys=True, default=repr)
  if not flags_to_match:
    return text
  merged = json.loads(text)
  merged.update({f"--{name}": value for name, value in flags_to_match.items()})
  return json.dumps(merged, sort_keys=True, default=repr)


def config_hash(config, **flags_to_match) -> str:
  return hashlib.sha256(config_json(config, **flags_to_match).encode()).hexdigest()


def _flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
  if isinstance(tree, dict):
    out = {}
    for key, value in tree.items():
      out.update(_flatten(value, f"{prefix}{key}."))
    return out
  return {prefix[:-1]: tree}


def allgather_bytes(data: bytes) -> list[bytes]:
  """Every process's `data`, in process order (a host collective; any lengths)."""
  if jax.process_count() == 1:
    return [data]
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  array = np.frombuffer(data, np.uint8)
  lengths = np.asarray(multihost_utils.process_allgather(np.array([array.size], np.int32)))
  padded = np.zeros(int(lengths.max()), np.uint8)
  padded[:array.size] = array
  gathered = np.asarray(multihost_utils.process_allgather(padded))
  return [bytes(row[:int(n)]) for row, n in zip(gathered, lengths.ravel())]


def allgather_json(value) -> list:
  """Every process's JSON-serialisable `value`, in process order (a host collective)."""
  return [json.loads(raw.decode("utf-8"))
          for raw in allgather_bytes(json.dumps(value).encode("utf-8"))]


def check_same_config(config, **flags_to_match) -> str:
  """Raises ValueError on every process unless all processes run the same config.

  Every process hashes the config's canonical JSON (with `flags_to_match`, e.g. workdir=...,
  as "--workdir") and the digests are all-gathered; on a mismatch the configs themselves are
  gathered so the message names the differing processes and fields. Returns the hex digest.
  A host collective: every process must call it.
  """
  digest = config_hash(config, **flags_to_match)
  if jax.process_count() == 1:
    return digest
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  mine = np.frombuffer(bytes.fromhex(digest), np.uint8)
  digests = np.asarray(multihost_utils.process_allgather(mine))
  differ = [p for p in range(len(digests)) if not np.array_equal(digests[p], digests[0])]
  if not differ:
    return digest
  configs = [json.loads(b) for b in
             allgather_bytes(config_json(config, **flags_to_match).encode())]
  reference = _flatten(configs[0])
  fields = set()
  for p in differ:
    other = _flatten(configs[p])
    fields |= {k for k in reference.keys() | other.keys()
               if reference.get(k, "<missing>") != other.get(k, "<missing>")}
  shown = sorted(fields)[:8]
  examples = "; ".join(
      f"{k}: p0={reference.get(k, '<missing>')!r} p{differ[0]}="
      f"{_flatten(configs[differ[0]]).get(k, '<missing>')!r}" for k in shown[:3])
  raise ValueError(
      f"the config differs across processes: process(es) {differ} differ from process 0 in "
      f"{shown}{' ...' if len(fields) > len(shown) else ''} ({examples}); run the same "
      "command and config on every host")
