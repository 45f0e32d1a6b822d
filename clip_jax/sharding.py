"""Device mesh, logical axis rules, and the shardings of the train state and the batch.

The mesh has three axes, in this order:
  data    pure data parallelism (parameters replicated),
  fsdp    data parallelism with parameters and optimizer state sharded (ZeRO-3 style),
  tensor  tensor parallelism over attention heads and MLP hidden units.
The global batch is split over ("data", "fsdp"). Model code only names logical axes
(see clip_jax.models.layers); the rules below map those names onto mesh axes.
"""
from __future__ import annotations

import math
from typing import Any, Optional, Sequence

import flax.linen as nn
import jax
import numpy as np
from jax.experimental import mesh_utils
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "tensor")
BATCH_AXES = ("data", "fsdp")

# Priority-ordered (logical name, mesh axes). A mesh axis already used by an earlier rule for
# the same array is skipped, so activations ("batch", "seq", "embed") keep `embed` unsharded
# while parameters shard `embed` over fsdp.
DEFAULT_LOGICAL_AXIS_RULES = (
    ("batch", BATCH_AXES),
    ("embed", "fsdp"),
    ("heads", "tensor"),
    ("mlp", "tensor"),
    ("vocab", None),       # a vocab-sharded embedding lookup makes XLA replicate the gather
    ("seq", None),
    ("kv", None),
    ("qkv", None),
    ("norm", None),
    ("layers", None),
    ("pos", None),
    ("proj", None),
    ("conv_out", "fsdp"),  # a ResNet's convolutions: output channels over fsdp
    ("conv_in", None),
    ("conv_h", None),
    ("conv_w", None),
    ("patch_h", None),
    ("patch_w", None),
    ("channels", None),
)

LOSSES = ("softmax", "sigmoid")
LOSS_IMPLS = ("global", "chunked")
DTYPES = ("float32", "bfloat16")
SCHEDULES = ("cosine", "linear", "constant", "rsqrt")
FREEZE = ("", "image", "text")

# Refuse fsdp > 1 when more than this fraction of parameter bytes is not sharded over fsdp.
FSDP_MAX_REPLICATED_FRACTION = 0.5


def logical_axis_rules(config) -> tuple:
  """The config's rules (list of [name, axes]) as a tuple of tuples, or the defaults."""
  rules = config.get("logical_axis_rules", None)
  if rules is None:
    return DEFAULT_LOGICAL_AXIS_RULES
  out = []
  for rule in rules:
    if len(rule) != 2:
      raise ValueError(f"logical_axis_rules entry {rule!r} must be (logical_name, mesh_axes)")
    name, axes = rule
    axes = tuple(axes) if isinstance(axes, (list, tuple)) else axes
    for a in (axes if isinstance(axes, tuple) else (axes,)):
      if a is not None and a not in MESH_AXES:
        raise ValueError(f"logical_axis_rules maps {name!r} to unknown mesh axis {a!r}; "
                         f"mesh axes are {MESH_AXES}")
    out.append((name, axes))
  return tuple(out)


def _axis_sizes(field: str, sizes: dict, num: int) -> tuple[int, ...]:
  """Resolves one -1 in `sizes` so the product is `num`; checks names and the product."""
  unknown = sorted(set(sizes) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.{field} has unknown axis {unknown}; axes are {MESH_AXES}")
  shape = [int(sizes.get(a, 1)) for a in MESH_AXES]
  if any(s == 0 or s < -1 for s in shape):
    raise ValueError(f"config.{field}={dict(sizes)}: sizes must be positive or -1 (fill)")
  if shape.count(-1) > 1:
    raise ValueError(f"config.{field}={dict(sizes)}: at most one axis may be -1")
  known = math.prod(s for s in shape if s != -1)
  if -1 in shape:
    if num % known:
      raise ValueError(f"config.{field}={dict(sizes)}: {num} devices are not divisible by the "
                       f"fixed axes' product {known}")
    shape[shape.index(-1)] = num // known
  if math.prod(shape) != num:
    raise ValueError(f"config.{field}={dict(sizes)} has {math.prod(shape)} devices but there are "
                     f"{num}; make the product match or set one axis to -1")
  return tuple(shape)


def _as_dict(x) -> dict:
  return dict(x.to_dict() if hasattr(x, "to_dict") else (x or {}))


def _num_slices(devices) -> int:
  return len({getattr(d, "slice_index", 0) for d in devices})


def mesh_slices(mesh: Mesh) -> int:
  """How many slices (TPU pods joined over DCN) the mesh's devices span."""
  return _num_slices(mesh.devices.flat)


def mesh_shape(config, num_devices: Optional[int] = None, num_slices: Optional[int] = None):
  """(ici_shape, dcn_shape) with -1 resolved, each in MESH_AXES order."""
  num_devices = jax.device_count() if num_devices is None else num_devices
  num_slices = _num_slices(jax.devices()) if num_slices is None else num_slices
  dcn = _as_dict(config.get("dcn_mesh", None))
  dcn_shape = _axis_sizes("dcn_mesh", dcn, num_slices) if dcn else (1,) * len(MESH_AXES)
  dcn_size = math.prod(dcn_shape)
  if num_devices % dcn_size:
    raise ValueError(f"config.dcn_mesh={dcn} spans {dcn_size} slices but {num_devices} devices "
                     "cannot be split evenly into that many")
  ici_shape = _axis_sizes("mesh", _as_dict(config.mesh), num_devices // dcn_size)
  return ici_shape, dcn_shape


def create_mesh(config, devices: Optional[Sequence[Any]] = None) -> Mesh:
  """The (data, fsdp, tensor) mesh of `config.mesh` (x `config.dcn_mesh` across slices)."""
  devices = list(jax.devices() if devices is None else devices)
  ici_shape, dcn_shape = mesh_shape(config, len(devices), _num_slices(devices))
  if math.prod(dcn_shape) > 1:
    device_array = mesh_utils.create_hybrid_device_mesh(
        ici_shape, dcn_shape, devices, allow_split_physical_axes=True)
  elif len(devices) == 1 or devices[0].platform == "cpu":
    device_array = np.array(devices).reshape(ici_shape)
  else:
    device_array = mesh_utils.create_device_mesh(ici_shape, devices,
                                                 allow_split_physical_axes=True)
  shape = tuple(a * b for a, b in zip(ici_shape, dcn_shape))
  return Mesh(np.asarray(device_array).reshape(shape), MESH_AXES,
              axis_types=(AxisType.Auto,) * len(MESH_AXES))


def batch_axis_size(mesh: Mesh) -> int:
  return math.prod(mesh.shape[a] for a in BATCH_AXES)


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """For arrays whose leading dim is the global batch (images, tokens, features)."""
  return NamedSharding(mesh, P(BATCH_AXES))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def validate_config(config, num_devices: Optional[int] = None,
                    process_count: Optional[int] = None, num_slices: Optional[int] = None) -> None:
  """Raises ValueError (one line naming the field) for a config that cannot run.

  num_devices, process_count, num_slices: of the target (default: this job's devices)."""
  # Local imports: sharding is imported by models-free code paths too.
  from clip_jax.models.configs import MODEL_CONFIGS
  from clip_jax.models.layers import REMAT_POLICIES

  num_devices = jax.device_count() if num_devices is None else num_devices
  process_count = jax.process_count() if process_count is None else process_count
  if isinstance(config.model, str) and config.model not in MODEL_CONFIGS:
    raise ValueError(f"config.model={config.model!r} is unknown; known: {sorted(MODEL_CONFIGS)}")
  ici, dcn = mesh_shape(config, num_devices, num_slices)
  shape = dict(zip(MESH_AXES, (a * b for a, b in zip(ici, dcn))))
  batch_shards = math.prod(shape[a] for a in BATCH_AXES)
  global_batch = int(config.batch_size)
  if global_batch <= 0:
    raise ValueError(f"config.batch_size={global_batch} must be positive")
  if global_batch % batch_shards:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the batch axes "
                     f"data*fsdp={batch_shards} of mesh {shape}")
  if global_batch % process_count:
    raise ValueError(f"config.batch_size={global_batch} is not divisible by the "
                     f"{process_count} processes")
  if config.loss not in LOSSES:
    raise ValueError(f"config.loss={config.loss!r} is unknown; use one of {LOSSES}")
  if config.loss_impl not in LOSS_IMPLS:
    raise ValueError(f"config.loss_impl={config.loss_impl!r} is unknown; use one of {LOSS_IMPLS}")
  local_batch = global_batch // batch_shards
  accum = int(config.accum_steps)
  if accum < 1 or local_batch % accum:
    raise ValueError(f"config.accum_steps={accum} must be >= 1 and divide the per-device batch "
                     f"{local_batch} (batch_size {global_batch} / data*fsdp {batch_shards})")
  chunk = int(config.loss_chunk_size)
  if chunk < 0 or (chunk and local_batch % chunk):
    raise ValueError(f"config.loss_chunk_size={chunk} must be 0 (auto) or divide the per-device "
                     f"batch {local_batch}")
  for field in ("dtype", "param_dtype"):
    if config[field] not in DTYPES:
      raise ValueError(f"config.{field}={config[field]!r} is unknown; use one of {DTYPES}")
  if config.remat_policy not in REMAT_POLICIES:
    raise ValueError(f"config.remat_policy={config.remat_policy!r} is unknown; "
                     f"use one of {sorted(REMAT_POLICIES)}")
  opt = config.optimizer
  if opt.schedule not in SCHEDULES:
    raise ValueError(f"config.optimizer.schedule={opt.schedule!r} is unknown; use one of "
                     f"{SCHEDULES}")
  if opt.freeze not in FREEZE:
    raise ValueError(f"config.optimizer.freeze={opt.freeze!r} is unknown; use one of {FREEZE}")
  logical_axis_rules(config)


def _fit_spec(spec: P, shape: Sequence[int], mesh: Mesh) -> P:
  """Drops the mesh axes of any dim whose size they do not divide (that dim is replicated)."""
  dims = list(spec) + [None] * (len(shape) - len(spec))
  out = []
  for size, axes in zip(shape, dims):
    names = axes if isinstance(axes, tuple) else ((axes,) if axes else ())
    n = math.prod(mesh.shape[a] for a in names)
    out.append(axes if n and size % n == 0 else None)
  return P(*out)


def logical_to_shardings(boxed_tree, mesh: Mesh, rules) -> Any:
  """NamedShardings for a tree of boxed (LogicallyPartitioned) arrays or shape structs.

  Unboxed leaves are replicated. A dim the mesh axes do not divide is replicated.
  """
  specs = nn.get_partition_spec(boxed_tree)
  shapes = nn.meta.unbox(boxed_tree)

  def one(spec, x):
    mesh_spec = nn.logical_to_mesh_axes(tuple(spec), rules) if len(spec) else P()
    return NamedSharding(mesh, _fit_spec(mesh_spec, x.shape, mesh))

  return jax.tree_util.tree_map(one, specs, shapes, is_leaf=lambda x: isinstance(x, P))


def _key_names(path) -> tuple:
  return tuple(k.key for k in path if isinstance(k, jax.tree_util.DictKey))


def match_shardings(tree, param_tree, param_shardings, mesh: Mesh) -> Any:
  """Shardings for a tree (e.g. optimizer state) whose leaves mirror parameters.

  A leaf whose dict-key path ends with a parameter's path and has its shape gets that
  parameter's sharding (Adam moments); anything else (counts, scalars) is replicated.
  """
  by_path = {}
  for (path, x), s in zip(jax.tree_util.tree_flatten_with_path(param_tree)[0],
                          jax.tree_util.tree_leaves(param_shardings)):
    by_path[_key_names(path)] = (tuple(x.shape), s)

  def one(path, x):
    names = _key_names(path)
    for start in range(len(names)):
      hit = by_path.get(names[start:])
      if hit and hit[0] == tuple(x.shape):
        return hit[1]
    return replicated(mesh)

  return jax.tree_util.tree_map_with_path(one, tree)


def check_fsdp(param_tree, param_shardings, mesh: Mesh) -> float:
  """Fraction of parameter bytes sharded over fsdp; ValueError if fsdp > 1 and it is low."""
  total = sharded = 0
  for x, s in zip(jax.tree_util.tree_leaves(param_tree), jax.tree_util.tree_leaves(param_shardings)):
    nbytes = math.prod(x.shape) * np.dtype(x.dtype).itemsize
    total += nbytes
    axes = set()
    for a in s.spec:
      axes.update(a if isinstance(a, tuple) else (a,))
    if "fsdp" in axes:
      sharded += nbytes
  fraction = sharded / max(total, 1)
  if mesh.shape["fsdp"] > 1 and 1 - fraction > FSDP_MAX_REPLICATED_FRACTION:
    raise ValueError(
        f"mesh fsdp={mesh.shape['fsdp']} but {100 * (1 - fraction):.0f}% of parameter bytes stay "
        "replicated over it (no logical_axis_rules entry maps a divisible dim to 'fsdp'); "
        "fix the rules or set mesh.fsdp=1")
  return fraction
