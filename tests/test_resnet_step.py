"""BatchNorm in the sharded, accumulated, resumable train step (the ResNet image towers).

- On 8 simulated devices the step's loss, gradients and new running statistics equal the
  1-device step's: statistics over the whole global batch.

The multi-device ResNet steps are marked slow (`pytest -m slow tests/test_resnet_step.py`):
XLA:CPU's simulated devices now and then deadlock in the unscanned ResNet step, whose image
and text towers issue collectives over different device groups at the same time (each device
waits in a different one; XLA aborts after its rendezvous timeout). It has never been a wrong
result. The default suite runs the same checks of the BatchNorm definitions on one device.
- GradCache (accum_steps > 1) is exact for its definition: each micro-batch normalised with its
  own statistics, the running averages updated once per micro-batch in order; the reference
  computes that directly (one differentiable function over all micro-batches).
- A frozen image tower (LiT) keeps its running statistics; the trainer resumes them exactly.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import sharding as shd
from clip_jax import step as st
from clip_jax.losses import contrastive_loss
from clip_jax.models import MODEL_CONFIGS, create_model, init_variables, l2_normalize

from test_step import B, assert_grads_close, on_mesh
from test_step import config as step_config

REPO = pathlib.Path(__file__).resolve().parents[1]
SIZE = MODEL_CONFIGS["tiny_rn"].vision.image_size


def config(**kw):
  return step_config(model="tiny_rn", **kw)


@pytest.fixture(scope="module")
def batch():
  rng = np.random.default_rng(0)
  tokens = rng.integers(1, 49000, size=(B, 77)).astype(np.int32)
  tokens[:, 10] = 49407
  tokens[:, 11:] = 0
  # Rows of different scales: per-device statistics would differ clearly from global ones.
  images = rng.normal(size=(B, SIZE, SIZE, 3)) * np.linspace(0.5, 2.0, B)[:, None, None, None]
  return {"images": images.astype(np.float32), "tokens": tokens}


@pytest.fixture(scope="module")
def variables():
  """Initial params with every BatchNorm's scale and running statistics moved off 1/0."""
  v = init_variables(create_model("tiny_rn"), jax.random.PRNGKey(1))
  rng = np.random.default_rng(2)

  def perturb(path, x):
    name = path[-1].key
    if name == "scale":
      return (1.0 + 0.2 * rng.standard_normal(x.shape)).astype(np.float32)
    if name == "mean":
      return (0.1 * rng.standard_normal(x.shape)).astype(np.float32)
    if name == "var":
      return (0.5 + rng.random(x.shape)).astype(np.float32)
    return np.asarray(x)
  return {k: jax.tree_util.tree_map_with_path(perturb, t) for k, t in v.items()}


def step_once(c, mesh, variables, batch):
  """(loss, grads, new batch_stats, new params) of one train step, as host arrays."""
  state, shardings = st.create_train_state(c, mesh, None, params=variables["params"],
                                           batch_stats=variables["batch_stats"])
  grad_fn = st.make_grad_fn(c, mesh, shardings.params)
  # Each program runs to its end before the next starts: two programs with collectives in
  # flight at once on XLA:CPU's simulated devices can deadlock in its rendezvous.
  loss, _, grads, stats = jax.block_until_ready(
      grad_fn(state.params, on_mesh(batch, mesh), state.batch_stats))
  new_state, metrics = st.make_train_step(c, mesh, shardings)(state, on_mesh(batch, mesh))
  np.testing.assert_allclose(float(metrics["loss"]), float(loss), rtol=1e-6)
  to_host = lambda t: jax.tree_util.tree_map(np.asarray, t)  # noqa: E731
  jax.tree_util.tree_map(np.testing.assert_array_equal, to_host(new_state.batch_stats),
                         to_host(stats))
  return float(loss), to_host(grads), to_host(stats), to_host(new_state.params)


def assert_tree_close(a, b, rtol=1e-5, atol=1e-6):
  jax.tree_util.tree_map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=atol),
                         a, b)


@pytest.fixture(scope="module")
def one_device(variables, batch):
  c = config(mesh={"data": -1})
  return step_once(c, shd.create_mesh(c, jax.devices()[:1]), variables, batch)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_axes,impl", [({"data": 2, "fsdp": 4}, "chunked"),
                                            ({"data": 2, "fsdp": 2, "tensor": 2}, "global")])
def test_global_batch_statistics_on_every_mesh(one_device, variables, batch, mesh_axes, impl):
  c = config(mesh=mesh_axes, loss_impl=impl)
  loss, grads, stats, _ = step_once(c, shd.create_mesh(c), variables, batch)
  ref_loss, ref_grads, ref_stats, _ = one_device
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_grads_close(grads, ref_grads)
  assert_tree_close(stats, ref_stats)
  # (The new params are not compared: Adam's first update is lr * g / (|g| + eps), which turns
  # a rounding difference in a gradient near 0 into any difference up to lr.)
  # The statistics moved: momentum 0.1 towards the global batch's.
  before = variables["batch_stats"]["visual"]["bn1"]["mean"]
  assert np.abs(stats["visual"]["bn1"]["mean"] - before).max() > 1e-3


def test_statistics_are_global_not_per_device(one_device, variables, batch):
  # What per-device statistics would give (each device's 2 rows alone) differs clearly.
  model = create_model("tiny_rn")
  per_device = []
  for rows in np.split(np.arange(B), 8):
    _, upd = model.apply(variables, batch["images"][rows], train=True, method="encode_image",
                         mutable=["batch_stats"])
    per_device.append(np.asarray(upd["batch_stats"]["visual"]["bn1"]["mean"]))
  global_stats = one_device[2]["visual"]["bn1"]["mean"]
  assert np.abs(np.mean(per_device, 0) - global_stats).max() < 1e-5  # means average out
  _, upd = model.apply(variables, batch["images"][:2], train=True, method="encode_image",
                       mutable=["batch_stats"])
  assert np.abs(np.asarray(upd["batch_stats"]["visual"]["bn1"]["var"])
                - one_device[2]["visual"]["bn1"]["var"]).max() > 1e-3


def gradcache_reference(c, variables, batch, accum):
  """The documented GradCache definition, computed directly: micro-batch k (rows k, k+accum,
  ...) normalised with its own statistics, one loss over the whole batch; the running
  averages updated per micro-batch in order."""
  model = create_model(st.model_config_from(c))
  micro = [np.arange(B)[k::accum] for k in range(accum)]

  def loss_fn(params):
    stats, image, text = variables["batch_stats"], [], []
    for rows in micro:
      out, upd = model.apply({"params": params, "batch_stats": stats}, batch["images"][rows],
                             train=True, method="encode_image", mutable=["batch_stats"])
      stats = upd["batch_stats"]
      image.append(l2_normalize(out))
      text.append(l2_normalize(model.apply({"params": params}, batch["tokens"][rows],
                                           method="encode_text")))
    order = np.argsort(np.concatenate(micro))
    loss, _ = contrastive_loss(jnp.concatenate(image)[order], jnp.concatenate(text)[order],
                               params["logit_scale"], None, loss="softmax", impl="global")
    return loss, stats

  (loss, stats), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(variables["params"])
  return float(loss), jax.tree_util.tree_map(np.asarray, grads), stats


@pytest.mark.parametrize("mesh_axes,impl", [
    ({"data": -1}, "global"),
    pytest.param({"data": 2, "fsdp": 2, "tensor": 2}, "chunked", marks=pytest.mark.slow)])
def test_gradcache_is_exact_for_per_micro_batch_statistics(variables, batch, mesh_axes, impl):
  c = config(mesh=mesh_axes, loss_impl=impl, accum_steps=2)
  devices = jax.devices()[:1] if mesh_axes == {"data": -1} else None
  loss, grads, stats, _ = step_once(c, shd.create_mesh(c, devices), variables, batch)
  ref_loss, ref_grads, ref_stats = gradcache_reference(c, variables, batch, accum=2)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_grads_close(grads, ref_grads)
  assert_tree_close(stats, jax.tree_util.tree_map(np.asarray, ref_stats))


def test_frozen_image_tower_keeps_its_statistics(variables, batch):
  c = config(mesh={"data": -1})
  c.optimizer.freeze = "image"
  _, grads, stats, params = step_once(c, shd.create_mesh(c, jax.devices()[:1]), variables, batch)
  jax.tree_util.tree_map(np.testing.assert_array_equal, stats, variables["batch_stats"])
  jax.tree_util.tree_map(np.testing.assert_array_equal, params["visual"],
                         variables["params"]["visual"])


_RESUME_SCRIPT = """
import sys
from clip_jax import train
from configs import tiny
workdir, total_steps, cache = sys.argv[1], int(sys.argv[2]), sys.argv[3]
c = tiny.get_config()
with c.unlocked():
  c.model, c.total_steps, c.checkpoint_every, c.eval_every = "tiny_rn", total_steps, 2, -1
  c.evals = {}
  c.compilation_cache_dir = cache  # one compile for the three runs
train.train(c, workdir)
"""


def test_trainer_resumes_batch_statistics_exactly(tmp_path):
  # The trainer on one device (see the module docstring), in a process of its own.
  from clip_jax import checkpoint as ckpt_lib
  env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=1",
             PYTHONPATH=str(REPO))

  def run(workdir, total_steps):
    proc = subprocess.run([sys.executable, "-c", _RESUME_SCRIPT, str(workdir), str(total_steps),
                           str(tmp_path / "compiled")], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]

  straight = run(tmp_path / "straight", 4)
  run(tmp_path / "resumed", 2)
  resumed = run(tmp_path / "resumed", 4)
  assert [r["step"] for r in resumed if "loss" in r][-2:] == [3, 4]
  losses = lambda records: {r["step"]: r["loss"] for r in records if "loss" in r}  # noqa: E731
  assert losses(resumed) == losses(straight)  # identical per-step losses
  a, _ = ckpt_lib.restore_params(str(tmp_path / "straight"))
  b, _ = ckpt_lib.restore_params(str(tmp_path / "resumed"))
  jax.tree_util.tree_map(np.testing.assert_array_equal, a["batch_stats"], b["batch_stats"])
  fresh = init_variables(create_model("tiny_rn"), jax.random.PRNGKey(0))["batch_stats"]
  assert np.abs(a["batch_stats"]["visual"]["bn1"]["var"]
                - fresh["visual"]["bn1"]["var"]).max() > 1e-3  # they were trained
