"""FLIP patch dropout: the kept subsets, exactness against explicit gathering, GradCache and
sharding, the (seed, step) draw, FLOP accounting, and a run resumed across the unmasked
tuning phase."""
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax import metrics as metrics_lib
from clip_jax import sharding as shd
from clip_jax import step as st
from clip_jax import train as train_lib
from clip_jax.losses import contrastive_loss
from clip_jax.models import create_model, init_params
from clip_jax.models.clip import l2_normalize
from clip_jax.models.flops import image_flops, train_flops_per_step
from clip_jax.models.layers import LayerNorm, Transformer
from clip_jax.models.params import unscan_params
from clip_jax.models.vit import kept_patches, patch_keep_indices

from test_step import assert_grads_close, config, host_batch, loss_and_grads, on_mesh  # noqa: F401
from test_train import _config as tiny_config

B = 16
PATCHES = 16  # the tiny model: 32px images, 8px patches


def test_keep_indices_are_a_sorted_per_sample_subset():
  keep = kept_patches(PATCHES, 0.5)
  assert keep == 8 and kept_patches(196, 0.75) == 49 and kept_patches(49, 0.5) == 24
  assert kept_patches(49, 0.99) == 1
  idx = np.asarray(patch_keep_indices(st.patch_dropout_key(0, 3), 64, PATCHES, keep))
  assert idx.shape == (64, keep) and idx.dtype == np.int32
  for row in idx:
    assert len(set(row.tolist())) == keep and row.min() >= 0 and row.max() < PATCHES
    assert (np.diff(row) > 0).all()
  assert len({tuple(r) for r in idx.tolist()}) > 50  # a different subset per sample
  # Every patch equally likely: each is kept about half the time over many draws.
  many = np.asarray(patch_keep_indices(jax.random.key(1), 4000, PATCHES, keep))
  np.testing.assert_allclose(np.bincount(many.ravel(), minlength=PATCHES) / 4000, 0.5, atol=0.04)
  # The draw is a function of (seed, step) alone.
  again = patch_keep_indices(st.patch_dropout_key(0, 3), 64, PATCHES, keep)
  np.testing.assert_array_equal(idx, again)
  for other in (st.patch_dropout_key(0, 4), st.patch_dropout_key(1, 3)):
    assert not np.array_equal(idx, patch_keep_indices(other, 64, PATCHES, keep))
  with pytest.raises(ValueError, match=r"patch_dropout=1.0 must be in \[0, 1\)"):
    kept_patches(PATCHES, 1.0)


def test_all_patches_kept_is_the_unmasked_model_and_the_model_config_ignores_it():
  model = create_model("tiny")
  params = jax.jit(lambda key: init_params(model, key))(jax.random.PRNGKey(0))
  images = jax.random.normal(jax.random.PRNGKey(1), (4, 32, 32, 3))
  encode = jax.jit(lambda p, x, keep: model.apply({"params": p}, x, method="encode_image",
                                                  keep_indices=keep))
  every = jnp.tile(jnp.arange(PATCHES, dtype=jnp.int32), (4, 1))
  np.testing.assert_array_equal(encode(params, images, None), encode(params, images, every))
  # Evaluation and inference build the model from the model config: no trace of the dropout.
  assert st.model_config_from(config(patch_dropout=0.5)) == st.model_config_from(config())


def _reference_loss(c, params, batch, keep_indices):
  """The softmax loss with the image tower run by hand: every token embedded, the kept ones
  gathered explicitly (class token first), then the tower's own blocks."""
  cfg = st.model_config_from(c)
  model = create_model(cfg)
  v = cfg.vision
  p = params["visual"]
  images = batch["images"]
  b = images.shape[0]
  x = images.reshape(b, v.grid_size, v.patch_size, v.grid_size, v.patch_size, 3)
  x = jnp.einsum("bhpwqc,pqcd->bhwd", x, p["conv1"]).reshape(b, -1, v.width)
  x = jnp.concatenate([jnp.broadcast_to(p["class_embedding"], (b, 1, v.width)), x], axis=1)
  x = x + p["positional_embedding"][None]
  rows = jnp.concatenate([jnp.zeros((b, 1), jnp.int32), keep_indices + 1], axis=1)
  x = jnp.take_along_axis(x, rows[:, :, None], axis=1)
  x = LayerNorm(cfg.ln_eps).apply({"params": p["ln_pre"]}, x)
  x = Transformer(v.layers, v.heads, v.mlp_ratio, act=cfg.act, ln_eps=cfg.ln_eps,
                  scan_layers=cfg.scan_layers).apply({"params": p["transformer"]}, x,
                                                      pool_index=0)
  image = LayerNorm(cfg.ln_eps).apply({"params": p["ln_post"]}, x) @ p["proj"]
  text = model.apply({"params": params}, batch["tokens"], method="encode_text")
  loss, _ = contrastive_loss(l2_normalize(image), l2_normalize(text), params["logit_scale"],
                             None, loss="softmax", impl="global")
  return loss


@pytest.fixture(scope="module")
def masked_reference(host_batch):
  c = config(mesh={"data": -1}, patch_dropout=0.5)
  params = init_params(create_model(st.model_config_from(c)), jax.random.PRNGKey(1))
  keep = patch_keep_indices(st.patch_dropout_key(c.seed, 0), B, PATCHES, 8)
  batch = {k: jnp.asarray(v) for k, v in host_batch.items()}
  loss, grads = jax.jit(jax.value_and_grad(lambda *a: _reference_loss(c, *a)))(params, batch,
                                                                               keep)
  return c, params, np.asarray(keep), float(loss), jax.tree_util.tree_map(np.asarray, grads)


@pytest.mark.parametrize("mesh_axes,accum,layers", [
    ({"data": -1}, 1, {}),
    ({"data": 2, "fsdp": 2, "tensor": 2}, 2, {}),
    # Unscanned (the last block computes the class token's row only), rematerialised, FSDP.
    ({"data": 2, "fsdp": 4}, 1, {"scan_layers": False, "remat_policy": "full"}),
])
def test_masked_loss_and_grads_equal_explicit_gathering(masked_reference, host_batch,
                                                        mesh_axes, accum, layers):
  c, params, keep, ref_loss, ref_grads = masked_reference
  c = config(mesh=mesh_axes, patch_dropout=0.5, accum_steps=accum, **layers)
  if not c.scan_layers:
    params, ref_grads = unscan_params(params), unscan_params(ref_grads)
  mesh = shd.create_mesh(c, devices=jax.devices()[:1] if mesh_axes == {"data": -1} else None)
  loss, grads = loss_and_grads(c, mesh, dict(host_batch, keep_indices=keep), params)
  np.testing.assert_allclose(loss, ref_loss, rtol=1e-5)
  assert_grads_close(grads, ref_grads)


def test_train_step_draws_from_seed_and_step(masked_reference, host_batch):
  """The step's loss is the loss at the subsets of patch_dropout_key(seed, state.step): what
  makes a resumed run drop the same patches. A second step draws other subsets."""
  c, params, keep0, ref_loss, _ = masked_reference
  mesh = shd.create_mesh(c, devices=jax.devices()[:1])
  state, shardings = st.create_train_state(c, mesh, None, params=params)
  train_step = st.make_train_step(c, mesh, shardings)
  assert train_step.patch_dropout == 0.5
  state, metrics = train_step(state, on_mesh(host_batch, mesh))
  np.testing.assert_allclose(float(metrics["loss"]), ref_loss, rtol=1e-5)
  # Step 1's loss is that of step 1's draw on the updated params, not of step 0's draw.
  new_params = jax.device_get(state.params)
  grad_fn = st.make_grad_fn(c, mesh)
  keep1 = patch_keep_indices(st.patch_dropout_key(c.seed, 1), B, PATCHES, 8)
  assert not np.array_equal(keep0, keep1)
  _, metrics = train_step(state, on_mesh(host_batch, mesh))
  want = grad_fn(new_params, dict(host_batch, keep_indices=keep1))[0]
  not_this = grad_fn(new_params, dict(host_batch, keep_indices=keep0))[0]
  np.testing.assert_allclose(float(metrics["loss"]), float(want), rtol=1e-5)
  assert abs(float(want) - float(not_this)) > 1e-4


def test_flops_count_the_kept_tokens():
  for name, rate, keep in (("vitb16", 0.5, 98), ("vitb16", 0.75, 49), ("vitb32", 0.5, 24)):
    cfg = st.get_model_config(name)
    v = cfg.vision
    tokens = keep + 1
    macs = keep * v.patch_size ** 2 * 3 * v.width + v.width * cfg.embed_dim
    macs += v.layers * (tokens * 12 * v.width ** 2 + 2 * tokens ** 2 * v.width)
    assert image_flops(name, rate) == 2 * macs
    assert image_flops(name, 0.0) == image_flops(name)
  # A ViT-B/16 step at 50% costs a bit over half the image tower's unmasked FLOPs.
  ratio = image_flops("vitb16", 0.5) / image_flops("vitb16")
  assert 0.45 < ratio < 0.5
  assert (train_flops_per_step("vitb16", 256, 0.5) - train_flops_per_step("vitb16", 256)
          == 256 * 3 * (image_flops("vitb16", 0.5) - image_flops("vitb16")))
  report_keys = st.dry_run_report(config(patch_dropout=0.5, mesh={"data": -1}),
                                  shd.create_mesh(config(mesh={"data": -1}),
                                                  devices=jax.devices()[:1]))
  assert report_keys["flops_per_step"] == train_flops_per_step("tiny", B, 0.5)
  with pytest.raises(ValueError, match="ViT image towers"):
    st.validate_patch_dropout(config(model="tiny_rn", patch_dropout=0.5))


def test_phase_switch_by_step():
  c = config(patch_dropout=0.5, unmasked_tuning_steps=3, total_steps=10)
  assert [st.patch_dropout_at(c, s) for s in range(10)] == [0.5] * 7 + [0.0] * 3
  assert [st.patch_dropout_at(config(patch_dropout=0.5), s) for s in (0, 9)] == [0.5, 0.5]
  # The phased step counts from the step it resumes at; a resumed run picks the same phase.
  mesh = shd.create_mesh(config(mesh={"data": -1}), devices=jax.devices()[:1])
  calls = []
  for start in (0, 6, 7, 9):
    phased = st.PhasedTrainStep(c, mesh, None, start_step=start)
    phased.step_for = lambda step: (lambda state, batch: calls.append(step) or (state, {}))
    rates = []
    for _ in range(start, 10):
      rates.append(phased.patch_dropout)
      phased(None, None)
    assert rates == [st.patch_dropout_at(c, s) for s in range(start, 10)]
  assert calls == list(range(0, 10)) + list(range(6, 10)) + list(range(7, 10)) + [9]
  with pytest.raises(ValueError, match="unmasked_tuning_steps=10 must be below total_steps=10"):
    train_lib.validate_config(config(patch_dropout=0.5, unmasked_tuning_steps=10,
                                     total_steps=10), check_data=False, check_mesh=False)


def _losses(workdir):
  return {r["step"]: (r["loss"], r["flops_per_step"])
          for r in metrics_lib.read_jsonl(workdir / "metrics.jsonl") if "loss" in r}


@pytest.mark.slow  # three tiny runs (~1 minute on 2 idle cores)
def test_resume_across_the_unmasked_tuning_phase_is_exact(tmp_path):
  """8 steps at patch_dropout 0.5, the last 3 unmasked; resumed from step 4 (before the
  switch) and from step 6 (after it), the per-step losses are the uninterrupted run's."""
  overrides = dict(total_steps=8, patch_dropout=0.5, unmasked_tuning_steps=3, checkpoint_every=2,
                   keep_checkpoints=4, eval_every=-1, mesh={"data": 2, "fsdp": 2, "tensor": 2})
  reference_dir = tmp_path / "reference"
  train_lib.train(tiny_config(**overrides), str(reference_dir))
  reference = _losses(reference_dir)
  assert sorted(reference) == list(range(1, 9))
  masked, unmasked = train_flops_per_step("tiny", 16, 0.5), train_flops_per_step("tiny", 16)
  assert [reference[s][1] for s in range(1, 9)] == [masked] * 5 + [unmasked] * 3
  for resume_step in (4, 6):
    workdir = tmp_path / f"from_{resume_step}"
    (workdir / "checkpoints").mkdir(parents=True)
    shutil.copytree(reference_dir / "checkpoints" / str(resume_step),
                    workdir / "checkpoints" / str(resume_step))
    train_lib.train(tiny_config(**overrides), str(workdir))
    resumed = _losses(workdir)
    assert sorted(resumed) == list(range(resume_step + 1, 9))
    np.testing.assert_allclose([resumed[s][0] for s in resumed],
                               [reference[s][0] for s in resumed], rtol=0, atol=1e-6)
