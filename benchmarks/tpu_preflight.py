r"""The TPU preflight of every paper recipe on named slices, and the loss alone (compile only).

  python benchmarks/tpu_preflight.py --recipes vitb32,vitl14 --slices v5p-128,v5e-256 [--fit]
  python benchmarks/tpu_preflight.py --loss --slices v5e-256     # global vs chunked loss
  python benchmarks/tpu_preflight.py --recipes vitl14 --slices v5e-256 \
      --set remat_policy=full --set accum_steps=2                 # one setting, by hand

One JSON line per case: the preflight's report (`clip_jax.preflight`: GiB per chip, fits,
the overrides, compile seconds, involuntary rematerialisations), plus `replicated_param_bytes`
(parameter bytes a chip holds unsharded) and `padding` (the token counts and how much TPU
tiling pads them: the minor dim of an array is laid out in 128 lanes, the second-minor in
8 sublanes (16 for bfloat16)). Needs libtpu (`pip install 'clip_jax[tpu]'`); runs on a CPU.
"""
import argparse
import importlib
import json
import math
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # as a script too

from clip_jax import preflight  # noqa: E402

RECIPES = ("vitb32", "vitb16", "vitl14", "vitl14_336")
SLICES = ("v5p-128", "v5e-256", "v6e-256")


def _pad(n: int, tile: int) -> int:
  return -(-n // tile) * tile


def padding(model_config) -> dict:
  """Token counts of both towers and their padded sizes as TPU tiles lay them out."""
  out = {}
  for name, tokens in (("image", model_config.vision.num_tokens),
                       ("text", model_config.text.context_length)):
    out[name] = {"tokens": tokens,
                 "as_second_minor_bf16": _pad(tokens, 16),     # [B, T, D] activations
                 "as_minor": _pad(tokens, 128),                 # the key axis of [B, H, T, T]
                 "attention_logits_waste": round(_pad(tokens, 128) / tokens - 1, 3)}
  return out


def replicated_param_bytes(config, devices) -> int:
  """Parameter bytes each chip holds whole (no mesh axis shards them)."""
  from clip_jax import sharding as shd, step  # pylint: disable=g-import-not-at-top
  mesh = shd.create_mesh(config, devices)
  abstract, shardings = step.abstract_train_state(config, mesh)
  import jax  # pylint: disable=g-import-not-at-top
  total = 0
  for x, s in zip(jax.tree_util.tree_leaves(abstract.params),
                  jax.tree_util.tree_leaves(shardings.params)):
    if all(a is None for a in s.spec):
      total += math.prod(x.shape) * x.dtype.itemsize
  return total


def recipe_case(recipe: str, slice_name: str, fit: bool, sets: list) -> dict:
  config = importlib.import_module(f"configs.{recipe}").get_config()
  explicit = []
  for item in sets:
    field, value = item.split("=", 1)
    preflight._set_field(config, field, value)  # pylint: disable=protected-access
    explicit.append(field)
  slice_ = preflight.parse_topology(slice_name)
  applied = preflight.apply_slice_overrides(config, slice_.topology, explicit)
  devices = preflight.topology_devices(slice_)
  report = preflight.compile_for_topology(config, devices, slice_)
  overrides = []
  if fit and not report["fits"]:
    found, report = preflight.search_fit(config, devices, slice_)
    overrides = None if found is None else preflight._flags(found)  # pylint: disable=protected-access
  total = (report["memory_per_device"] or {}).get("total")
  from clip_jax import step  # pylint: disable=g-import-not-at-top
  return dict(report, recipe=recipe, slice=slice_name, slice_overrides=applied, set=sets,
              fit_overrides=overrides, gib_per_chip=None if total is None else round(total / 2**30, 2),
              replicated_param_bytes=replicated_param_bytes(config, devices),
              padding=padding(step.model_config_from(config)))


def loss_case(slice_name: str, impl: str, batch: int, embed_dim: int) -> dict:
  """The contrastive loss alone (forward and backward) on the slice's mesh."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from jax.sharding import NamedSharding, PartitionSpec as P  # pylint: disable=g-import-not-at-top
  from clip_jax import sharding as shd  # pylint: disable=g-import-not-at-top
  from clip_jax.losses import contrastive_loss  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  slice_ = preflight.parse_topology(slice_name)
  devices = preflight.topology_devices(slice_)
  config = common.get_config()
  config.mesh.data, config.mesh.fsdp = 1, -1
  mesh = shd.create_mesh(config, devices)
  rows = NamedSharding(mesh, P(shd.BATCH_AXES))
  feats = jax.ShapeDtypeStruct((batch, embed_dim), jnp.float32, sharding=rows)
  scale = jax.ShapeDtypeStruct((), jnp.float32, sharding=shd.replicated(mesh))

  def loss_and_grads(x, y, s):
    def f(x, y, s):
      return contrastive_loss(x, y, s, None, loss="softmax", impl=impl, mesh=mesh)[0]
    return jax.value_and_grad(f, argnums=(0, 1, 2))(x, y, s)

  start = time.perf_counter()
  with jax.set_mesh(mesh):
    compiled = jax.jit(loss_and_grads).lower(feats, feats, scale).compile()
  m = compiled.memory_analysis()
  return {"loss": "softmax", "loss_impl": impl, "slice": slice_name, "topology": slice_.topology,
          "global_batch": batch, "embed_dim": embed_dim, "num_devices": len(devices),
          "temp_per_chip": int(m.temp_size_in_bytes),
          "temp_mib": round(m.temp_size_in_bytes / 2**20, 1),
          "compile_s": round(time.perf_counter() - start, 1)}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--recipes", default=",".join(RECIPES))
  parser.add_argument("--slices", default=",".join(SLICES))
  parser.add_argument("--fit", action="store_true", help="search overrides when a case does "
                      "not fit (clip_jax.preflight.search_fit)")
  parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                      help="a config override for every case (wins over slice_overrides)")
  parser.add_argument("--loss", action="store_true", help="the loss alone, global vs chunked")
  parser.add_argument("--batch", type=int, default=32768)
  parser.add_argument("--embed_dim", type=int, default=768)
  args = parser.parse_args()
  preflight.setup_host()
  for slice_name in args.slices.split(","):
    if args.loss:
      for impl in ("global", "chunked"):
        print(json.dumps(loss_case(slice_name, impl, args.batch, args.embed_dim)), flush=True)
      continue
    for recipe in args.recipes.split(","):
      print(json.dumps(recipe_case(recipe, slice_name, args.fit, args.set)), flush=True)


if __name__ == "__main__":
  main()
