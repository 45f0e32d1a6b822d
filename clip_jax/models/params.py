"""Parameter-tree utilities: scanned <-> unscanned layers, position-embedding interpolation."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np

_BLOCK = re.compile(r"^resblocks_(\d+)$")


def _map_transformers(params, fn):
  if not isinstance(params, dict):
    return params
  out = {}
  for key, value in params.items():
    if key == "transformer" and isinstance(value, dict):
      out[key] = fn(value)
    else:
      out[key] = _map_transformers(value, fn)
  return out


def scan_params(params):
  """Stacks `resblocks_0..N-1` into one `resblocks` tree with a leading layer axis."""
  def stack(tree):
    if "resblocks" in tree:
      return tree
    idx = sorted(int(_BLOCK.match(k).group(1)) for k in tree if _BLOCK.match(k))
    if idx != list(range(len(idx))):
      raise ValueError(f"non-contiguous transformer blocks: {idx}")
    blocks = [tree[f"resblocks_{i}"] for i in idx]
    return {"resblocks": jax.tree_util.tree_map(lambda *xs: jnp.stack(xs), *blocks)}
  return _map_transformers(params, stack)


def unscan_params(params):
  """Splits a stacked `resblocks` tree into `resblocks_0..N-1`."""
  def split(tree):
    if "resblocks" not in tree:
      return tree
    stacked = tree["resblocks"]
    n = jax.tree_util.tree_leaves(stacked)[0].shape[0]
    return {f"resblocks_{i}": jax.tree_util.tree_map(lambda x: x[i], stacked) for i in range(n)}
  return _map_transformers(params, split)


def interpolate_pos_embed(params, new_grid: int, method: str = "bicubic"):
  """Resizes the image tower's position embedding to a `new_grid` x `new_grid` patch grid.

  The class-token row is kept; the grid rows are resized as an image (e.g. L/14 at 224px,
  16x16, to L/14 at 336px, 24x24). A ResNet's is its attention pool's (the mean token's row
  kept, the feature map's rows resized). Returns a new params tree.
  """
  if "attnpool" in params["visual"]:
    attnpool = interpolate_pos_embed({"visual": params["visual"]["attnpool"]}, new_grid, method)
    return dict(params, visual=dict(params["visual"], attnpool=attnpool["visual"]))
  pos = np.asarray(params["visual"]["positional_embedding"])
  cls_pos, grid_pos = pos[:1], pos[1:]
  old_grid = int(round(np.sqrt(grid_pos.shape[0])))
  if old_grid * old_grid != grid_pos.shape[0]:
    raise ValueError(f"position embedding of {grid_pos.shape[0]} patches is not a square grid")
  if old_grid == new_grid:
    return params
  width = grid_pos.shape[-1]
  grid = jnp.asarray(grid_pos, jnp.float32).reshape(old_grid, old_grid, width)
  grid = jax.image.resize(grid, (new_grid, new_grid, width), method=method, antialias=False)
  new_pos = jnp.concatenate([jnp.asarray(cls_pos, jnp.float32),
                             grid.reshape(new_grid * new_grid, width)]).astype(pos.dtype)
  visual = dict(params["visual"], positional_embedding=new_pos)
  return dict(params, visual=visual)
