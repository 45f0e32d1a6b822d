"""The on-disk format of a converted model: `DIR/model_config.json` + `DIR/params/`.

`model_config.json` is `CLIPConfig.to_dict()`; `params/` is an Orbax StandardCheckpointer save
of the plain (unboxed) parameters in the scanned layer layout (a ResNet's with its BatchNorm
running statistics under the top-level key `batch_stats`, see `clip_jax.models.BATCH_STATS`). The converter writes it
(`clip_jax.convert`), `clip_jax.load` and `init_from` read it (through
`clip_jax.checkpoint.restore_params`, which also reads trainer checkpoints). This module
imports none of them.
"""
from __future__ import annotations

import contextlib
import json
import os
import pathlib
import shutil
import tempfile
from typing import Iterator, Optional

from etils import epath
import flax.linen as nn
import jax
import orbax.checkpoint as ocp

from clip_jax import storage
from clip_jax.models import (CLIPConfig, abstract_loaded_params, create_model, scan_params,
                             unscan_params)

CONFIG_FILE = "model_config.json"
PARAMS_DIR = "params"


def is_converted_dir(path) -> bool:
  """Whether `path` (local or a gs:// / fsspec-style URL that etils.epath reads) holds one."""
  path = epath.Path(path)
  return (path / CONFIG_FILE).is_file() and (path / PARAMS_DIR).is_dir()


def output_dir_path(output_dir, *, overwrite: bool = False):
  """`output_dir` as a path (a URL stays a string); ValueError (one line) if it exists and
  not `overwrite`. For the CLIs, before their slow work: `atomic_directory` checks again."""
  path = str(output_dir) if storage.is_remote(output_dir) else pathlib.Path(output_dir)
  if epath.Path(path).exists() and not overwrite:
    raise ValueError(f"--output {path} already exists; remove it or pass --overwrite")
  return path


@contextlib.contextmanager
def atomic_directory(directory, *, overwrite: bool = False) -> Iterator[pathlib.Path]:
  """Yields a temporary dir beside `directory` to fill; renamed into place when the block ends,
  removed if it raises, so a failure leaves nothing at `directory`. Single-process only.

  Raises ValueError if `directory` exists and not `overwrite`.

  On an object store (gs://), the dir is filled on local disk, then uploaded with
  model_config.json last (`is_converted_dir` needs it), and removed if the upload fails.
  """
  if storage.is_remote(directory):
    if epath.Path(directory).exists() and not overwrite:
      raise ValueError(f"{directory} already exists; remove it or pass overwrite=True "
                       "(--overwrite)")
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="clip_jax_upload_"))
    try:
      yield tmp
      storage.upload_dir(str(tmp), str(directory), replace=overwrite, last=(CONFIG_FILE,))
    finally:
      shutil.rmtree(tmp, ignore_errors=True)
    return
  directory = pathlib.Path(directory).absolute()
  if directory.exists() and not overwrite:
    raise ValueError(f"{directory} already exists; remove it or pass overwrite=True (--overwrite)")
  directory.parent.mkdir(parents=True, exist_ok=True)
  tmp = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
  try:
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the result should read like any dir
    yield tmp
    if directory.exists():
      old = pathlib.Path(tempfile.mkdtemp(prefix=f".{directory.name}.old-", dir=directory.parent))
      os.rename(directory, old / "d")
      os.rename(tmp, directory)
      shutil.rmtree(old, ignore_errors=True)
    else:
      os.rename(tmp, directory)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def save_params(directory, params, model_config: CLIPConfig, *, overwrite: bool = False) -> None:
  """Writes `params` (scanned or not, boxed or not) and `model_config` to `directory`.

  Atomic (`atomic_directory`): a failure leaves nothing at `directory`. Single-process only.
  """
  params = scan_params(nn.meta.unbox(params))
  with atomic_directory(directory, overwrite=overwrite) as tmp:
    (tmp / CONFIG_FILE).write_text(json.dumps(model_config.to_dict(), indent=2) + "\n")
    with ocp.StandardCheckpointer() as checkpointer:
      checkpointer.save(tmp / PARAMS_DIR, params)


def load_params(directory, sharding: Optional[jax.sharding.Sharding] = None):
  """Reads a dir written by `save_params` (local or gs://). Returns (params, CLIPConfig).

  Params are jax arrays placed with `sharding` (one sharding for every leaf; default: the first
  local device), in the layout `config.scan_layers` asks for.
  """
  directory = epath.Path(directory)
  if not is_converted_dir(directory):
    raise ValueError(
        f"{directory} is not a converted checkpoint (expected {CONFIG_FILE} and {PARAMS_DIR}/ "
        "in it)")
  config = CLIPConfig.from_dict(json.loads((directory / CONFIG_FILE).read_text()))
  if sharding is None:
    sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  shapes = abstract_loaded_params(create_model(config.replace(scan_layers=True)))
  target = jax.tree_util.tree_map(
      lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), shapes)
  try:
    with ocp.StandardCheckpointer() as checkpointer:
      params = checkpointer.restore(directory / PARAMS_DIR, target)
  except ValueError as e:
    raise ValueError(f"{directory / PARAMS_DIR} does not hold the parameters of the model in "
                     f"{CONFIG_FILE}: {' '.join(str(e).split())}") from e
  if not config.scan_layers:
    params = unscan_params(params)
  return params, config
