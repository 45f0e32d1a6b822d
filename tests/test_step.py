"""The train step: same loss/grads on every mesh, GradCache exactness, LiT, clamp, dry run."""
import math

import jax
import numpy as np
import pytest

from clip_jax import sharding as shd
from clip_jax import step as st
from clip_jax.models import count_params, create_model, init_params
from clip_jax.optim import make_optimizer
from configs.common import get_config

B = 16


def config(**kw):
  c = get_config()
  c.model = "tiny"
  c.batch_size = B
  c.total_steps = 10
  c.optimizer.warmup_steps = 0
  for k, v in kw.items():
    setattr(c, k, v)
  return c


def mesh_for(c, devices=None):
  return shd.create_mesh(c, devices=devices)


@pytest.fixture(scope="module")
def host_batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 49000, size=(B, 77)).astype(np.int32)
  tokens[:, 10] = 49407  # EOT
  tokens[:, 11:] = 0
  return {"images": rng.normal(size=(B, 32, 32, 3)).astype(np.float32), "tokens": tokens}


def on_mesh(batch, mesh):
  return {k: jax.device_put(v, shd.batch_sharding(mesh)) for k, v in batch.items()}


def host_params(c):
  return init_params(create_model(st.model_config_from(c)), jax.random.PRNGKey(1))


def loss_and_grads(c, mesh, batch, params):
  _, shardings = st.abstract_train_state(c, mesh)
  params = jax.device_put(params, shardings.params)
  loss, metrics, grads, _ = st.make_grad_fn(c, mesh, shardings.params)(params, on_mesh(batch, mesh))
  return float(loss), jax.tree_util.tree_map(np.asarray, grads)


def assert_grads_close(a, b):
  for (path, x), y in zip(jax.tree_util.tree_flatten_with_path(a)[0], jax.tree_util.tree_leaves(b)):
    atol = 1e-5 * max(float(np.abs(y).max()), 1e-3)
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol, err_msg=jax.tree_util.keystr(path))


@pytest.fixture(scope="module")
def reference(host_batch):
  c = config(mesh={"data": -1})
  params = host_params(c)
  return params, loss_and_grads(c, mesh_for(c, jax.devices()[:1]), host_batch, params)


slow = pytest.mark.slow


@pytest.mark.parametrize("mesh_axes,impl", [
    pytest.param({"data": 8}, "global", marks=slow),
    pytest.param({"data": 2, "fsdp": 4}, "chunked", marks=slow),
    pytest.param({"data": 2, "fsdp": 2, "tensor": 2}, "global", marks=slow),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "chunked")])
def test_same_loss_and_grads_on_every_mesh(reference, host_batch, mesh_axes, impl):
  params, (ref_loss, ref_grads) = reference
  c = config(mesh=mesh_axes, loss_impl=impl)
  loss, grads = loss_and_grads(c, mesh_for(c), host_batch, params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_grads_close(grads, ref_grads)


@pytest.mark.parametrize("loss,impl,mesh_axes", [
    ("softmax", "chunked", {"data": 2, "fsdp": 2, "tensor": 2}),
    pytest.param("sigmoid", "global", {"data": -1}, marks=slow)])
def test_gradcache_equals_full_batch(host_batch, loss, impl, mesh_axes):
  c = config(mesh=mesh_axes, loss=loss, loss_impl=impl)
  devices = jax.devices()[:1] if mesh_axes == {"data": -1} else None
  mesh = mesh_for(c, devices)
  params = host_params(c)
  ref_loss, ref_grads = loss_and_grads(c, mesh, host_batch, params)
  c.accum_steps = 2
  loss, grads = loss_and_grads(c, mesh, host_batch, params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_grads_close(grads, ref_grads)


def test_sigmoid_head_init():
  mc = st.model_config_from(config(loss="sigmoid"))
  assert mc.logit_bias_init == -10.0 and mc.logit_scale_init == pytest.approx(math.log(10))
  mc = st.model_config_from(config(dtype="bfloat16", remat_policy="full", scan_layers=False))
  assert (mc.dtype, mc.remat_policy, mc.scan_layers) == ("bfloat16", "full", False)


def test_train_step_lit_clamp_and_metrics(host_batch):
  c = config(mesh={"data": 2, "fsdp": 2, "tensor": 2}, loss="sigmoid", dtype="bfloat16")
  c.optimizer.freeze = "image"
  mesh = mesh_for(c)
  params = host_params(c)
  params["logit_scale"] = np.float32(5.0)  # above ln(100): the step clamps it
  state, shardings = st.create_train_state(c, mesh, jax.random.PRNGKey(0), params=params)
  before = jax.tree_util.tree_map(np.asarray, state.params)
  train_step = st.make_train_step(c, mesh, shardings)
  state, metrics = train_step(state, on_mesh(host_batch, mesh))
  assert set(metrics) == {"loss", "i2t_top1", "t2i_top1", "logit_scale", "logit_bias", "grad_norm",
                          "param_norm", "pos_logit_mean", "neg_logit_mean", "learning_rate"}
  assert int(state.step) == 1
  assert float(metrics["logit_scale"]) == pytest.approx(math.exp(5.0), rel=1e-5)
  assert float(state.params["logit_scale"]) == pytest.approx(math.log(100), rel=1e-6)
  assert float(metrics["logit_bias"]) == pytest.approx(-10.0)
  assert np.isfinite(float(metrics["loss"]))
  # bf16 compute keeps float32 parameters and optimizer state.
  assert all(x.dtype == np.float32 for x in jax.tree_util.tree_leaves(state.params))
  for a, b in zip(jax.tree_util.tree_leaves(before["visual"]),
                  jax.tree_util.tree_leaves(state.params["visual"])):
    np.testing.assert_array_equal(a, np.asarray(b))
  changed = [not np.array_equal(a, np.asarray(b)) for a, b in zip(
      jax.tree_util.tree_leaves(before["text"]), jax.tree_util.tree_leaves(state.params["text"]))]
  assert all(changed)


def global_norm(tree):
  return math.sqrt(sum(float(np.sum(np.square(np.asarray(x, np.float64))))
                       for x in jax.tree_util.tree_leaves(tree)))


@pytest.mark.parametrize("grad_clip_norm", [pytest.param(0.0, marks=slow), 0.5])
def test_step_norm_metrics(host_batch, grad_clip_norm):
  """The norms the step logs (computed behind optimization barriers) are those of the
  gradients, the new parameters and the update (log_update_norm)."""
  c = config(mesh={"data": 2, "fsdp": 4}, log_update_norm=True)
  c.optimizer.grad_clip_norm = grad_clip_norm
  mesh = mesh_for(c)
  params = host_params(c)
  state, shardings = st.create_train_state(c, mesh, jax.random.PRNGKey(0), params=params)
  _, _, grads, _ = st.make_grad_fn(c, mesh, shardings.params)(state.params, on_mesh(host_batch, mesh))
  updates, _ = make_optimizer(c).update(grads, state.opt_state, state.params)
  grads, updates = jax.device_get((grads, updates))
  state, metrics = st.make_train_step(c, mesh, shardings)(state, on_mesh(host_batch, mesh))
  assert float(metrics["grad_norm"]) == pytest.approx(global_norm(grads), rel=1e-5)
  assert float(metrics["update_norm"]) == pytest.approx(global_norm(updates), rel=1e-5)
  assert float(metrics["param_norm"]) == pytest.approx(global_norm(state.params), rel=1e-5)
  if grad_clip_norm:  # Clipped gradients make a smaller update than unclipped ones would.
    assert global_norm(grads) > grad_clip_norm


@pytest.mark.parametrize("mesh_axes", [{"data": 2, "fsdp": 4}, {"data": 2, "fsdp": 2, "tensor": 2}])
def test_fsdp_step_has_no_involuntary_full_rematerialization(host_batch, mesh_axes, capfd):
  """XLA's SPMD partitioner warns (on stderr, from C++) when a sharding change makes it
  replicate a whole array; the token-embedding lookup did so before it gathered its table."""
  c = config(mesh=mesh_axes)
  mesh = mesh_for(c)
  state, shardings = st.abstract_train_state(c, mesh)
  batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=shd.batch_sharding(mesh))
           for k, v in host_batch.items()}
  capfd.readouterr()
  st.make_train_step(c, mesh, shardings).lower(state, batch).compile()
  assert "Involuntary full rematerialization" not in capfd.readouterr().err


def test_create_train_state_sharded_and_from_params():
  c = config(mesh={"data": 2, "fsdp": 4})
  mesh = mesh_for(c)
  state, shardings = st.create_train_state(c, mesh, jax.random.PRNGKey(0))
  kernel = state.params["visual"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"]
  assert kernel.sharding.spec == shardings.params["visual"]["transformer"]["resblocks"]["mlp"][
      "c_fc"]["kernel"].spec
  assert kernel.addressable_shards[0].data.shape == (2, 16, 256)  # embed 64 over fsdp=4
  params = host_params(c)
  state2, _ = st.create_train_state(c, mesh, None, params=params)
  np.testing.assert_array_equal(np.asarray(state2.params["text"]["token_embedding"]),
                                params["text"]["token_embedding"])
  params.pop("logit_scale")
  with pytest.raises(ValueError, match="initial params do not match"):
    st.create_train_state(c, mesh, None, params=params)


def test_dry_run_report():
  c = config(mesh={"data": 4, "fsdp": 2}, loss_impl="chunked", accum_steps=2)
  report = st.dry_run_report(c)
  assert report["dry_run"] is True
  assert report["num_params"] == count_params(host_params(c))
  assert report["num_devices"] == 8 and report["global_batch"] == B
  mem = report["memory_per_device"]
  assert set(mem) == {"argument", "output", "temp", "total"}
  assert mem["argument"] > 0 and mem["temp"] > 0 and mem["total"] >= mem["temp"]


def test_dry_run_rejects_bad_config_before_compiling():
  with pytest.raises(ValueError, match="config.batch_size=12"):
    st.dry_run_report(config(batch_size=12))


def test_uint8_batches_normalised_in_the_step_equal_float32_batches(host_batch):
  """config.data.image_dtype="uint8": the step normalises on the device exactly as the input
  pipeline would have on the host (float32 batches), so the two steps agree."""
  from clip_jax.preprocess import uint8_affine
  c = config(mesh={"data": -1})
  mesh = mesh_for(c, jax.devices()[:1])
  pixels = np.random.default_rng(3).integers(0, 256, size=(B, 32, 32, 3), dtype=np.uint8)
  scale, offset = uint8_affine()
  batches = {"uint8": dict(host_batch, images=pixels),
             "float32": dict(host_batch, images=pixels.astype(np.float32) * scale + offset)}
  metrics, moments = {}, {}
  for name, batch in batches.items():
    state, shardings = st.create_train_state(c, mesh, None, params=host_params(c))
    state, metrics[name] = st.make_train_step(c, mesh, shardings)(state, on_mesh(batch, mesh))
    # Adam's first moment after one step is (1 - b1) * grad: the gradients, as the step saw
    # them. (Its first update is ~lr * sign(grad), too coarse a comparison.)
    moments[name] = [np.asarray(x) for x in jax.tree_util.tree_leaves(state.opt_state)
                     if np.ndim(x) > 0]
  for key in ("loss", "grad_norm", "param_norm"):
    np.testing.assert_allclose(metrics["uint8"][key], metrics["float32"][key], rtol=1e-6)
  assert len(moments["uint8"]) > 10
  assert_grads_close(moments["uint8"], moments["float32"])
