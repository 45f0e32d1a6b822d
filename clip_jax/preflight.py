r"""TPU pod preflight: compile the real train step for a named TPU slice on any host.

  python -m clip_jax.train --config=configs/vitl14.py --dry_run --topology=v5e-256
  python -m clip_jax.train --config=configs/vitl14.py --dry_run --topology=v5p-128 --fit
  python -m clip_jax.train --config=configs/vitb16.py --dry_run --topology=v6e-256 \
      --num_slices=2 --config.dcn_mesh.data=2

XLA's TPU compiler (libtpu, the `[tpu]` extra) compiles for TPU devices described by a
topology (`jax.experimental.topologies`), so a CPU host builds the exact program a slice
would run and reads its buffer assignment per chip. Nothing opens a local TPU: JAX runs on
its CPU backend here and libtpu only compiles.

Output: the dry run's JSON line plus topology, device_kind, num_slices, hbm_per_device,
fits and compile_s (and fit_overrides with --fit). Exit codes: 0 the step fits,
EXIT_DOES_NOT_FIT (4) it does not (the line still comes, with the bytes the compiler
asked for), 2 a user error (one `error: ...` line on stderr). With --fit the line is the
first fitting candidate's (exit 0, its overrides in fit_overrides; each try is logged as a
JSON line on stderr), or the given config's with fit_overrides null (exit 4).

Slice kinds differ in HBM (v5e: 16 GiB a chip, v5p: 95 GiB), so a recipe may need other
settings per kind: `config.slice_overrides.<kind>` holds them as --config flags without
the prefix ("remat_policy=full accum_steps=2"); `apply_slice_overrides` applies them in the
preflight and in the trainer on a real slice, except fields the user set on the command line.
"""
from __future__ import annotations

import ast
import contextlib
import dataclasses
import json
import math
import os
import re
import sys
import tempfile
import time
from typing import Iterable, Optional, Sequence

EXIT_DOES_NOT_FIT = 4
EXIT_USAGE = 2
GiB = 1 << 30

# What XLA's SPMD partitioner logs when a resharding falls back to replicating a tensor.
INVOLUNTARY_REMAT = "Involuntary full rematerialization"
# Remat policies from least to most recomputation (clip_jax.models.layers.REMAT_POLICIES).
REMAT_LADDER = ("none", "dots", "dots_no_batch", "save_attn_out", "full")
MAX_FIT_COMPILES = 10


@dataclasses.dataclass(frozen=True)
class TpuKind:
  name: str                  # JAX's topology prefix and the slice_overrides key
  device_kind: str           # jax Device.device_kind
  accelerator: str           # Cloud TPU accelerator-type prefix
  hbm_bytes: int             # HBM per chip
  cores_per_chip: int        # TensorCores counted by the accelerator type's number
  ndims: int                 # torus dimensions
  aliases: tuple = ()


TPU_KINDS = {k.name: k for k in (
    TpuKind("v4", "TPU v4", "v4", 32 * GiB, 2, 3),
    TpuKind("v5e", "TPU v5 lite", "v5litepod", 16 * GiB, 1, 2, aliases=("v5litepod",)),
    TpuKind("v5p", "TPU v5", "v5p", 95 * GiB, 2, 3),
    TpuKind("v6e", "TPU v6 lite", "v6e", 32 * GiB, 1, 2),
)}
_ALIASES = {a: k for k in TPU_KINDS.values() for a in (k.name, *k.aliases)}
EXAMPLES = "v4-128, v5litepod-256 (or v5e-256), v5p-128, v6e-256, v5e:16x16, v4:4x4x8"


class PreflightError(ValueError):
  """A user error: bad topology name, missing libtpu, a mesh or batch the slice cannot hold."""


@dataclasses.dataclass(frozen=True)
class Slice:
  """One TPU slice: its kind and torus shape in chips (JAX runs one device per chip)."""
  kind: TpuKind
  dims: tuple

  @property
  def chips(self) -> int:
    return math.prod(self.dims)

  @property
  def topology(self) -> str:  # JAX's name, e.g. v5e:16x16
    return f"{self.kind.name}:{'x'.join(map(str, self.dims))}"

  @property
  def accelerator_type(self) -> str:  # Cloud TPU's name, e.g. v5litepod-256
    return f"{self.kind.accelerator}-{self.chips * self.kind.cores_per_chip}"

  @property
  def chips_per_host(self) -> tuple:
    """Chips per host as (x, y, z): 2x2 on multi-host slices, the whole slice below that."""
    dims = tuple(self.dims) + (1,) * (3 - len(self.dims))
    return tuple(min(d, b) for d, b in zip(dims, (2, 2, 1)))

  @property
  def hosts(self) -> int:
    return self.chips // math.prod(self.chips_per_host)


def _default_dims(chips: int, ndims: int) -> tuple:
  """Cloud TPU's default torus for a chip count: double the smallest axis (ties: the last)
  from 1x1 (2D) or 2x2x1 (3D), e.g. 256 chips: 16x16, 4x8x8; 64 chips: 8x8, 4x4x4."""
  dims = [1, 1] if ndims == 2 else [2, 2, 1]
  while math.prod(dims) < chips:
    smallest = min(dims)
    dims[max(i for i, d in enumerate(dims) if d == smallest)] *= 2
  return tuple(dims)


def parse_topology(name: str) -> Slice:
  """A Cloud TPU accelerator type (v5litepod-256, v5e-256, v4-128: v4/v5p count TensorCores,
  two per chip; v5e/v6e count chips) or a JAX topology string (v5e:16x16, v4:4x4x8)."""
  text = str(name).strip().lower()
  match = re.fullmatch(r"([a-z0-9]+)(?::(\d+(?:x\d+)*)|-(\d+))", text)
  kind = _ALIASES.get(match.group(1)) if match else None
  if kind is None:
    raise PreflightError(f"unknown TPU topology {name!r}; use an accelerator type or a "
                         f"topology, e.g. {EXAMPLES} (kinds: {', '.join(sorted(_ALIASES))})")
  if match.group(2):
    dims = tuple(int(d) for d in match.group(2).split("x"))
    if len(dims) != kind.ndims or min(dims) < 1:
      example = "16x16" if kind.ndims == 2 else "4x4x8"
      raise PreflightError(f"topology {name!r}: {kind.name} is a {kind.ndims}D torus, e.g. "
                           f"{kind.name}:{example}")
    return Slice(kind, dims)
  count = int(match.group(3))
  chips, rest = divmod(count, kind.cores_per_chip)
  unit = "TensorCores (2 per chip)" if kind.cores_per_chip == 2 else "chips"
  smallest = 8 if kind.ndims == 3 else 1
  if rest or count < smallest or chips & (chips - 1):
    raise PreflightError(f"accelerator type {name!r}: {kind.accelerator}-N counts {unit}; N "
                         f"must be a power of two >= {smallest}, e.g. {kind.accelerator}-"
                         f"{128 if kind.ndims == 3 else 256}")
  return Slice(kind, _default_dims(chips, kind.ndims))


def tpu_kind(device_kind_or_topology: str) -> Optional[str]:
  """The slice_overrides key ("v5e", ...) of a jax device_kind ("TPU v5 lite"), an
  accelerator type or a topology; None for anything that is not a known TPU."""
  text = str(device_kind_or_topology).strip()
  for kind in TPU_KINDS.values():
    if text == kind.device_kind:
      return kind.name
  if text in ("TPU v5p", "TPU v6e", "TPU v5e"):  # spellings of newer runtimes
    return text.split()[-1]
  try:
    return parse_topology(text).kind.name
  except PreflightError:
    return None


# ---------------------------------------------------------------------------------------
# per-slice overrides
# ---------------------------------------------------------------------------------------


def parse_overrides(text: str) -> list[tuple[str, str]]:
  """"remat_policy=full accum_steps=2" (or --config.X=Y flags) -> [(field, value), ...]."""
  pairs = []
  for item in str(text or "").split():
    field, sep, value = item.removeprefix("--config.").partition("=")
    if not sep or not field:
      raise PreflightError(f"slice override {item!r} must read field=value, e.g. "
                           "remat_policy=full")
    pairs.append((field, value))
  return pairs


def _set_field(config, field: str, value: str) -> None:
  """Sets a dotted config field from text, typed like the field's current value."""
  *parents, leaf = field.split(".")
  node = config
  for p in parents:
    node = node[p]
  if leaf not in node:
    raise PreflightError(f"slice override {field}={value}: config has no field {field!r}")
  old = node[leaf]
  if isinstance(old, bool):
    new = value.lower() in ("1", "true", "yes")
  elif isinstance(old, (int, float)) and not isinstance(old, bool):
    new = type(old)(ast.literal_eval(value))
  elif isinstance(old, str):
    new = value
  else:  # None (a placeholder) or a container: a Python literal, else the text
    try:
      new = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      new = value
  with config.unlocked() if hasattr(config, "unlocked") else contextlib.nullcontext():
    node[leaf] = new


def apply_slice_overrides(config, device_kind_or_topology: str,
                          explicit: Iterable[str] = ()) -> list[str]:
  """Applies `config.slice_overrides.<kind>` for a slice (a jax device_kind, accelerator
  type or topology) in place, skipping fields in `explicit` (set by the user's flags: those
  win). Returns the applied overrides as --config flags; [] off TPU or without any."""
  kind = tpu_kind(device_kind_or_topology)
  table = config.get("slice_overrides", None)
  if kind is None or table is None or not table.get(kind, ""):
    return []
  explicit = {e.removeprefix("--config.").split("=")[0] for e in explicit}
  applied = []
  for field, value in parse_overrides(table[kind]):
    if field in explicit or any(field.startswith(e + ".") for e in explicit):
      continue
    _set_field(config, field, value)
    applied.append(f"--config.{field}={value}")
  return applied


# ---------------------------------------------------------------------------------------
# the host: CPU JAX, compile-only libtpu
# ---------------------------------------------------------------------------------------


def setup_host() -> None:
  """JAX on its CPU backend (never a local TPU) and libtpu loadable by several processes.

  Call before anything touches a device. libtpu takes /tmp/libtpu_lockfile (an fcntl lock
  held for the life of the process) so two processes never drive one TPU; a compile-only
  client drives nothing, and ALLOW_MULTIPLE_LIBTPU_LOAD=1 makes it neither take nor honour
  the lock, so two preflights (or a preflight beside a process holding it) both run.
  """
  os.environ["ALLOW_MULTIPLE_LIBTPU_LOAD"] = "1"
  os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")  # no GCE metadata server on this host
  os.environ.setdefault("GRPC_VERBOSITY", "ERROR")
  import jax  # pylint: disable=g-import-not-at-top
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
  if not xla_bridge.backends_are_initialized():
    jax.config.update("jax_platforms", "cpu")


def _require_libtpu() -> None:
  try:
    import libtpu  # noqa: F401  pylint: disable=g-import-not-at-top,unused-import
  except ImportError as e:
    raise PreflightError("the TPU preflight needs libtpu, the TPU compiler: pip install "
                         "'clip_jax[tpu]' (or pip install 'jax[tpu]')") from e


@contextlib.contextmanager
def _captured_stderr(sink: list):
  """Collects what C++ (libtpu, XLA) writes to fd 2 into sink[0] instead of the console."""
  sys.stderr.flush()
  saved = os.dup(2)
  with tempfile.TemporaryFile(mode="w+b") as tmp:
    os.dup2(tmp.fileno(), 2)
    try:
      yield
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      tmp.seek(0)
      sink.append(tmp.read().decode("utf-8", "replace"))


def topology_devices(slice_: Slice, num_slices: int = 1) -> list:
  """Compile-only TPU devices of `num_slices` slices, one per chip (v4 as megacore)."""
  _require_libtpu()
  setup_host()
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  kwargs = {"chip_config_name": "megacore"} if slice_.kind.cores_per_chip == 2 else {}
  log = []
  try:
    with _captured_stderr(log):
      desc = topologies.get_topology_desc(
          platform="tpu", topology_name=slice_.topology, num_slices=int(num_slices),
          chips_per_host_bounds=slice_.chips_per_host, **kwargs)
  except Exception as e:  # pylint: disable=broad-except
    raise PreflightError(f"libtpu cannot describe {slice_.topology} x {num_slices} slice(s): "
                         f"{_first_line(e)}") from e
  devices = list(desc.devices)
  want = slice_.chips * int(num_slices)
  if len(devices) != want:
    raise PreflightError(f"libtpu describes {slice_.topology} as {len(devices)} devices, not "
                         f"{want} (one per chip); this libtpu cannot preflight it")
  return devices


# ---------------------------------------------------------------------------------------
# compile
# ---------------------------------------------------------------------------------------


def _first_line(error: Exception) -> str:
  return " ".join(str(error).strip().splitlines()[0].split()) if str(error).strip() else repr(error)


_SIZE = r"([0-9.]+)\s*([KMGT]i?B?|B)?"
_UNITS = {"": 1, "B": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}


def _bytes(number: str, unit: Optional[str]) -> int:
  return int(float(number) * _UNITS[(unit or "")[:1].upper()])


def oom_bytes(message: str) -> Optional[int]:
  """The bytes per device a RESOURCE_EXHAUSTED compile error says the program needs."""
  patterns = (r"Used " + _SIZE + r" of " + _SIZE + r" hbm",
              r"total memory required for HLO temporaries \(" + _SIZE + r"\)",
              r"required[^0-9(]*\(?" + _SIZE)
  for pattern in patterns:
    m = re.search(pattern, message)
    if m:
      return _bytes(m.group(1), m.group(2))
  return None


def _mesh_shape(mesh) -> dict:
  return {a: int(s) for a, s in mesh.shape.items()}


def compile_for_topology(config, devices, slice_: Slice, num_slices: int = 1) -> dict:
  """Compiles the train step for `devices`; the dry-run report plus the preflight fields.

  A step that needs more HBM than a chip has comes back with fits False and
  memory_per_device {"total": bytes the compiler asked for}; other errors raise.
  """
  import jax  # pylint: disable=g-import-not-at-top
  from clip_jax import sharding as shd, step  # pylint: disable=g-import-not-at-top
  from clip_jax.models.clip import count_params  # pylint: disable=g-import-not-at-top
  from clip_jax.models.flops import train_flops_per_step  # pylint: disable=g-import-not-at-top

  num_devices = len(devices)
  try:
    if int(num_slices) > 1 and math.prod(shd._as_dict(config.dcn_mesh).values()) == 1:  # pylint: disable=protected-access
      raise ValueError(f"--num_slices={num_slices} needs config.dcn_mesh to span the slices, "
                       f"e.g. --config.dcn_mesh.data={num_slices}")
    shd.validate_config(config, num_devices=num_devices,
                        process_count=slice_.hosts * int(num_slices), num_slices=int(num_slices))
    mesh = shd.create_mesh(config, devices)
  except (ValueError, AssertionError) as e:
    raise PreflightError(f"{slice_.topology} x {num_slices} ({num_devices} chips): "
                         f"{_first_line(e)}") from e
  model_config = step.model_config_from(config)
  report = {
      "dry_run": True,
      "num_params": None,
      # The EMA's float32 copy of the weights (config.ema_decay) is in memory_per_device.
      "ema": bool(step.ema_settings(config)[0]),
      "num_devices": num_devices,
      "global_batch": int(config.batch_size),
      # Our analytic count: XLA's TPU cost_analysis counts a scanned layer once.
      "flops_per_step": int(train_flops_per_step(model_config, int(config.batch_size))),
      "memory_per_device": None,
      "topology": slice_.topology,
      "accelerator_type": slice_.accelerator_type,
      "device_kind": devices[0].device_kind,
      "num_slices": int(num_slices),
      "mesh": _mesh_shape(mesh),
      "hbm_per_device": slice_.kind.hbm_bytes,
      "fits": False,
      "compile_s": None,
  }
  log = []
  start = time.perf_counter()
  try:
    with _captured_stderr(log):
      compiled, abstract_state = step.compile_train_step(config, mesh)
  except jax.errors.JaxRuntimeError as e:
    report["compile_s"] = round(time.perf_counter() - start, 1)
    if "RESOURCE_EXHAUSTED" not in str(e):
      raise
    report["memory_per_device"] = {"total": oom_bytes(str(e))}
    report["error"] = _first_line(e)[:400]
    report["involuntary_remat"] = log[0].count(INVOLUNTARY_REMAT) if log else 0
    return report
  report["compile_s"] = round(time.perf_counter() - start, 1)
  report["num_params"] = count_params(abstract_state.params)
  memory = step.memory_per_device(compiled)
  report["memory_per_device"] = memory
  report["fits"] = memory["total"] <= slice_.kind.hbm_bytes
  report["involuntary_remat"] = log[0].count(INVOLUNTARY_REMAT) if log else 0
  return report


# ---------------------------------------------------------------------------------------
# --fit: the cheapest overrides that fit
# ---------------------------------------------------------------------------------------


def fit_candidates(config, num_devices: int, num_slices: int = 1) -> list[dict]:
  """Overrides in the order tried, cheapest first: a remat policy that recomputes more,
  then doubling accum_steps (GradCache: one more forward pass) with each policy again."""
  from clip_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  ici, dcn = shd.mesh_shape(config, num_devices, num_slices)
  batch_shards = math.prod(a * b for a, b in zip(ici[:2], dcn[:2]))
  local_batch = int(config.batch_size) // batch_shards
  current = config.remat_policy
  start = REMAT_LADDER.index(current) if current in REMAT_LADDER else 0
  policies = REMAT_LADDER[start:]
  out = []
  accum = int(config.accum_steps)
  while accum <= local_batch and local_batch % accum == 0:
    for policy in policies:
      overrides = {}
      if policy != current:
        overrides["remat_policy"] = policy
      if accum != int(config.accum_steps):
        overrides["accum_steps"] = accum
      if overrides:
        out.append(overrides)
    accum *= 2
  return out


def _with_overrides(config, overrides: dict):
  new = config.copy_and_resolve_references()
  with new.unlocked():
    for field, value in overrides.items():
      new[field] = value
  return new


def search_fit(config, devices, slice_: Slice, num_slices: int = 1,
               max_compiles: int = MAX_FIT_COMPILES) -> tuple[Optional[dict], dict]:
  """(overrides, report) of the first candidate that fits; (None, last report) if none
  does within `max_compiles` compiles."""
  report = {}
  for overrides in fit_candidates(config, len(devices), num_slices)[:max_compiles]:
    report = compile_for_topology(_with_overrides(config, overrides), devices, slice_,
                                  num_slices)
    print(json.dumps({"fit_try": _flags(overrides), "fits": report["fits"],
                      "total": (report["memory_per_device"] or {}).get("total"),
                      "compile_s": report["compile_s"]}), file=sys.stderr, flush=True)
    if report["fits"]:
      return overrides, report
  return None, report


def _flags(overrides: dict) -> list[str]:
  return [f"--config.{k}={v}" for k, v in overrides.items()]


# ---------------------------------------------------------------------------------------
# entry point
# ---------------------------------------------------------------------------------------


def run(config, topology: str, num_slices: int = 1, fit: bool = False,
        explicit: Sequence[str] = ()) -> int:
  """The preflight of `python -m clip_jax.train --dry_run --topology=...`: prints one JSON
  line (stdout) or one `error: ...` line (stderr); returns the exit code (0 fits,
  EXIT_DOES_NOT_FIT, EXIT_USAGE). `explicit`: config fields the user set by flag."""
  try:
    setup_host()
    slice_ = parse_topology(topology)
    if int(num_slices) < 1:
      raise PreflightError(f"--num_slices={num_slices} must be >= 1")
    applied = apply_slice_overrides(config, slice_.topology, explicit)
    devices = topology_devices(slice_, num_slices)
    report = compile_for_topology(config, devices, slice_, num_slices)
    if applied:
      report["slice_overrides"] = applied
    if fit:
      if report["fits"]:
        report["fit_overrides"] = []
      else:
        overrides, fitted = search_fit(config, devices, slice_, num_slices)
        if overrides is not None:
          report = dict(fitted, fit_overrides=_flags(overrides),
                        slice_overrides=applied or None)
        else:
          report["fit_overrides"] = None
  except PreflightError as e:
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    return EXIT_USAGE
  print(json.dumps(report), flush=True)
  return 0 if report["fits"] else EXIT_DOES_NOT_FIT
