"""Mesh construction, config validation (one-line errors), parameter shardings, FSDP guard."""
import jax
import ml_collections
import pytest
from jax.sharding import PartitionSpec as P

from clip_jax import sharding as shd
from clip_jax.models import abstract_params, create_model
from configs.common import get_config


def config(**kw):
  c = get_config()
  c.model = "tiny"
  c.batch_size = 16
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def test_create_mesh_shapes():
  assert dict(shd.create_mesh(config(mesh={"data": -1})).shape) == {"data": 8, "fsdp": 1, "tensor": 1}
  mesh = shd.create_mesh(config(mesh={"data": 2, "fsdp": -1, "tensor": 2}))
  assert mesh.axis_names == ("data", "fsdp", "tensor")
  assert dict(mesh.shape) == {"data": 2, "fsdp": 2, "tensor": 2}
  one = shd.create_mesh(config(mesh={"data": -1}), devices=jax.devices()[:1])
  assert one.devices.size == 1
  assert shd.batch_sharding(mesh).spec == P(("data", "fsdp"))


def test_dcn_mesh_shape():
  c = config(mesh={"data": -1, "fsdp": 2}, dcn_mesh={"data": 2})
  ici, dcn = shd.mesh_shape(c, num_devices=16, num_slices=2)
  assert ici == (4, 2, 1) and dcn == (2, 1, 1)


def one_line_error(c, match):
  with pytest.raises(ValueError, match=match) as e:
    shd.validate_config(c)
  assert "\n" not in str(e.value)


def test_bad_configs_raise_one_line():
  one_line_error(config(mesh={"data": 3}), r"config.mesh=.*8")
  one_line_error(config(mesh={"data": -1, "fsdp": -1}), "at most one axis")
  one_line_error(config(mesh={"data": 2, "model": 4}), "unknown axis")
  one_line_error(config(batch_size=12), "config.batch_size=12 is not divisible")
  one_line_error(config(loss="hinge"), "config.loss='hinge'")
  one_line_error(config(loss_impl="ring"), "config.loss_impl='ring'")
  one_line_error(config(accum_steps=3), "config.accum_steps=3")
  one_line_error(config(loss_chunk_size=3), "config.loss_chunk_size=3")
  one_line_error(config(dtype="float16"), "config.dtype='float16'")
  one_line_error(config(remat_policy="some"), "config.remat_policy='some'")
  one_line_error(config(model="vitx"), "config.model='vitx'")
  with pytest.raises(ValueError, match="processes"):
    shd.validate_config(config(), process_count=3)
  shd.validate_config(config(mesh={"data": 2, "fsdp": 2, "tensor": 2}, accum_steps=2))


def test_param_shardings_follow_rules():
  mesh = shd.create_mesh(config(mesh={"data": 2, "fsdp": 2, "tensor": 2}))
  boxed = abstract_params(create_model("tiny"))
  specs = jax.tree_util.tree_map(lambda s: s.spec,
                                 shd.logical_to_shardings(boxed, mesh, shd.DEFAULT_LOGICAL_AXIS_RULES))
  block = specs["visual"]["transformer"]["resblocks"]
  assert block["attn"]["qkv"]["kernel"] == P(None, "fsdp", None, "tensor", None)  # layers first
  assert block["mlp"]["c_fc"]["kernel"] == P(None, "fsdp", "tensor")
  assert block["mlp"]["c_proj"]["kernel"] == P(None, "tensor", "fsdp")
  assert specs["text"]["token_embedding"] == P(None, "fsdp")
  assert specs["logit_scale"] == P()


def test_indivisible_dim_is_replicated():
  mesh = shd.create_mesh(config(mesh={"data": 1, "fsdp": 8}))
  assert shd._fit_spec(P("fsdp", "tensor"), (12, 4), mesh) == P(None, "tensor")
  assert shd._fit_spec(P(("data", "fsdp")), (16,), mesh) == P(("data", "fsdp"))


def test_fsdp_guard():
  mesh = shd.create_mesh(config(mesh={"data": 2, "fsdp": 4}))
  boxed = abstract_params(create_model("tiny"))
  params = jax.tree_util.tree_map(lambda x: x, __import__("flax").linen.meta.unbox(boxed))
  good = shd.logical_to_shardings(boxed, mesh, shd.DEFAULT_LOGICAL_AXIS_RULES)
  assert shd.check_fsdp(params, good, mesh) > 0.9
  rules = tuple(r for r in shd.DEFAULT_LOGICAL_AXIS_RULES if r[0] != "embed")
  bad = shd.logical_to_shardings(boxed, mesh, rules)
  with pytest.raises(ValueError, match="replicated over it") as e:
    shd.check_fsdp(params, bad, mesh)
  assert "\n" not in str(e.value)


def test_logical_rules_from_config():
  c = config(logical_axis_rules=[["batch", ["data", "fsdp"]], ["embed", None]])
  assert shd.logical_axis_rules(c) == (("batch", ("data", "fsdp")), ("embed", None))
  with pytest.raises(ValueError, match="unknown mesh axis 'model'"):
    shd.logical_axis_rules(config(logical_axis_rules=[["embed", "model"]]))
