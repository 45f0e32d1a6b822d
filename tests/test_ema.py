"""EMA of the weights (config.ema_decay): the update, its sharding and memory, the checkpoint,
the readers (restore_params, clip_jax.load, export, evaluate, init_from), turning it on or off
across a resume. Exact resume of the EMA after SIGTERM and SIGKILL: test_train_cli.py."""
import logging
import pathlib
import sys

import flax
import jax
import numpy as np
import pytest

import clip_jax
from clip_jax import checkpoint as ckpt_lib
from clip_jax import export as export_lib
from clip_jax import metrics as metrics_lib
from clip_jax import params_io
from clip_jax import sharding as shd
from clip_jax import step as st
from clip_jax import train as train_lib
from clip_jax.evaluate.runner import Evaluator
from test_step import B, config as step_config  # the tiny model at batch 16

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top

def batches(mesh, n, seed=0):
  rng = np.random.default_rng(seed)
  for _ in range(n):
    tokens = rng.integers(1, 49000, size=(B, 77)).astype(np.int32)
    tokens[:, 10], tokens[:, 11:] = 49407, 0
    images = rng.normal(size=(B, 32, 32, 3)).astype(np.float32)
    yield {"images": jax.device_put(images, shd.batch_sharding(mesh)),
           "tokens": jax.device_put(tokens, shd.batch_sharding(mesh))}


def leaves(tree):
  return [np.asarray(x) for x in jax.tree.leaves(tree)]


def assert_trees_close(a, b, atol=1e-6):
  for x, y in zip(leaves(a), leaves(b), strict=True):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol)


def test_ema_update_sharding_and_dtype():
  # decay 0.9 from step 2: a copy after step 1, then ema = 0.9 * ema + 0.1 * params.
  c = step_config(ema_decay=0.9, ema_start_step=2)
  # FSDP over all 8 devices: one device group for every collective (XLA:CPU's simulated
  # devices have deadlocked on a 2 x 4 mesh's two kinds of groups when the host was busy).
  c.mesh.data, c.mesh.fsdp = 1, 8
  mesh = shd.create_mesh(c)
  state, shardings = st.create_train_state(c, mesh, jax.random.PRNGKey(0))
  assert_trees_close(state.ema["params"], state.params, atol=0)  # starts as a copy
  train_step = st.make_train_step(c, mesh, shardings)
  history = []
  for batch in batches(mesh, 3):
    state, _ = train_step(state, batch)
    history.append(jax.device_get(state.params))
  expected = jax.tree.map(lambda p1, p2, p3: 0.9 * (0.9 * p1 + 0.1 * p2) + 0.1 * p3, *history)
  assert_trees_close(state.ema["params"], expected, atol=1e-6)
  assert not np.allclose(leaves(state.ema["params"])[3], leaves(state.params)[3])
  for ema, param in zip(jax.tree.leaves(state.ema["params"]), jax.tree.leaves(state.params)):
    assert ema.sharding == param.sharding and ema.dtype == np.float32
  assert any("fsdp" in str(x.sharding.spec) for x in jax.tree.leaves(state.ema["params"]))


def test_ema_with_bfloat16_params_is_float32_and_resnet_statistics_averaged():
  c = step_config(model="tiny_rn", param_dtype="bfloat16", ema_decay=0.5)
  abstract, _ = st.abstract_train_state(c, shd.create_mesh(c))
  assert {x.dtype for x in jax.tree.leaves(abstract.ema["params"])} == {np.dtype(np.float32)}
  assert jax.tree.structure(abstract.ema["batch_stats"]) == jax.tree.structure(
      abstract.batch_stats) and jax.tree.leaves(abstract.batch_stats)


def test_dry_run_counts_the_ema():
  # Parameters replicated over an 8-way data mesh: the EMA adds 4 bytes a parameter to every
  # device's arguments (and outputs), nothing to the temporaries.
  off = st.dry_run_report(step_config())
  on = st.dry_run_report(step_config(ema_decay=0.999))
  assert on["ema"] and not off["ema"]
  extra = 4 * on["num_params"]
  grown = on["memory_per_device"]["argument"] - off["memory_per_device"]["argument"]
  assert abs(grown - extra) <= 0.01 * extra, (grown, extra)


@pytest.mark.parametrize("field, value, message", [
    ("ema_decay", 1.0, "config.ema_decay=1.0 must be in [0, 1)"),
    ("ema_decay", -0.1, "config.ema_decay=-0.1 must be in [0, 1)"),
    ("ema_start_step", -1, "config.ema_start_step=-1 must be >= 0"),
    ("init_weights", "best", "config.init_weights='best' is unknown; use auto, ema, params"),
])
def test_config_errors_are_one_line(field, value, message):
  c = tiny.get_config()
  with c.unlocked():
    c[field] = value
  with pytest.raises(ValueError) as e:
    train_lib.validate_config(c, check_data=False)
  assert message in str(e.value) and "\n" not in str(e.value)


@pytest.fixture(scope="module")
def ema_run(tmp_path_factory):
  """8 tiny steps with ema_decay 0.5 (far from the params), checkpoints at 4 and 8, the
  synthetic zero-shot evaluation at the end."""
  workdir = tmp_path_factory.mktemp("ema_run")
  config = tiny.get_config()
  with config.unlocked():
    config.total_steps, config.ema_decay = 8, 0.5
  final = train_lib.train(config, str(workdir))
  return workdir, final


def test_evaluations_of_both_weights(ema_run):
  workdir, final = ema_run
  records = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
  evals = [r for r in records if any(k.startswith("eval_ema/") for k in r)]
  assert evals and evals[-1]["step"] == 8
  assert "eval_ema/synthetic/top1" in final and "eval/synthetic/top1" in final


def test_readers_take_the_ema_by_default(ema_run, tmp_path):
  workdir, _ = ema_run
  ema, config = ckpt_lib.restore_params(str(workdir))
  explicit, _ = ckpt_lib.restore_params(str(workdir), "ema")
  trained, _ = ckpt_lib.restore_params(str(workdir), "params")
  assert_trees_close(ema, explicit, atol=0)
  differ = [not np.allclose(a, b, atol=1e-6) for a, b in zip(leaves(ema), leaves(trained))]
  assert sum(differ) > len(differ) // 2
  # clip_jax.load: the EMA by default, the trained weights on request.
  images = np.random.default_rng(0).normal(size=(4, 32, 32, 3)).astype(np.float32)
  by_default = clip_jax.load(str(workdir)).encode_image(images)
  with_params = clip_jax.load(str(workdir), weights="params").encode_image(images)
  from_ema = clip_jax.inference.CLIPInference(
      clip_jax.models.create_model(config), ema, config).encode_image(images)
  np.testing.assert_allclose(by_default, from_ema, rtol=1e-6, atol=1e-6)
  assert not np.allclose(by_default, with_params, atol=1e-3)
  # export: the EMA unless --weights params.
  state_auto, _ = export_lib.read_checkpoint(workdir)
  state_params, _ = export_lib.read_checkpoint(workdir, "params")
  key = "visual.proj"
  assert not np.allclose(state_auto[key], state_params[key])
  assert export_lib.main(["--checkpoint", str(workdir), "--format", "hf", "--weights", "params",
                          "--output", str(tmp_path / "hf")]) == 0
  # evaluate: the trained weights of the same checkpoint are another classifier cache entry.
  assert Evaluator(str(workdir), weights="params").checkpoint_id.endswith("#params")
  # init_from: the EMA by default, or the trained weights.
  c = tiny.get_config()
  with c.unlocked():
    c.init_from = str(workdir)
  abstract, _ = st.abstract_train_state(c, shd.create_mesh(c))
  taken = ckpt_lib.load_init_params(c, st.model_config_from(c), abstract.params)
  assert_trees_close({k: taken[k] for k in ("visual", "text")},
                     {k: ema[k] for k in ("visual", "text")}, atol=0)
  with c.unlocked():
    c.init_weights = "params"
  taken = ckpt_lib.load_init_params(c, st.model_config_from(c), abstract.params)
  assert_trees_close(taken["visual"], trained["visual"], atol=0)


def test_ema_asked_of_weights_without_one_is_one_error(ema_run, tmp_path):
  workdir, _ = ema_run
  params, config = ckpt_lib.restore_params(str(workdir), "params")
  params_io.save_params(tmp_path / "converted", params, config)
  with pytest.raises(ValueError, match="converted model .one set of weights, no EMA."):
    ckpt_lib.restore_params(str(tmp_path / "converted"), "ema")
  with pytest.raises(ValueError, match="weights='bad' is unknown"):
    clip_jax.load(str(workdir), weights="bad")
  assert export_lib.main(["--checkpoint", str(tmp_path / "converted"), "--format", "hf",
                          "--weights", "ema", "--output", str(tmp_path / "out")]) == 1
  assert not (tmp_path / "out").exists()


@flax.struct.dataclass
class StateBeforeEma:
  """TrainState as checkpoints written before the EMA field have it."""
  step: jax.Array
  params: object
  opt_state: object
  batch_stats: object = flax.struct.field(default_factory=dict)


def _save_and_restore(tmp_path, saved_state, restore_config, mesh):
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), checkpoint_every=1, keep_checkpoints=1,
                                       async_save=False)
  checkpointer.save(3, saved_state, data_state={}, rng=jax.random.key(0), config_json="{}",
                    model_config=st.model_config_from(restore_config), force=True)
  abstract, shardings = st.abstract_train_state(restore_config, mesh)
  state, _, _ = checkpointer.restore(3, abstract, shardings)
  checkpointer.close()
  return state


@pytest.mark.parametrize("saved_as", ["no_ema", "before_ema_field"])
def test_turning_the_ema_on_at_a_resume_starts_it_from_the_weights(tmp_path, saved_as, caplog):
  off, on = step_config(), step_config(ema_decay=0.99)
  mesh = shd.create_mesh(off)
  state, _ = st.create_train_state(off, mesh, jax.random.PRNGKey(0))
  if saved_as == "before_ema_field":
    state = StateBeforeEma(step=state.step, params=state.params, opt_state=state.opt_state,
                           batch_stats=state.batch_stats)
  with caplog.at_level(logging.WARNING):
    restored = _save_and_restore(tmp_path, state, on, mesh)
  assert "has no EMA weights: the EMA (config.ema_decay) starts from its weights" in caplog.text
  assert_trees_close(restored.ema["params"], restored.params, atol=0)
  assert_trees_close(restored.params, state.params, atol=0)
  if saved_as == "no_ema":  # ... and it trains on (the new EMA has the step's shardings)
    _, shardings = st.abstract_train_state(on, mesh)
    restored, _ = st.make_train_step(on, mesh, shardings)(restored, next(batches(mesh, 1)))
    assert int(restored.step) == 1


def test_turning_the_ema_off_at_a_resume_drops_it(tmp_path, caplog):
  on, off = step_config(ema_decay=0.99), step_config()
  mesh = shd.create_mesh(on)
  state, _ = st.create_train_state(on, mesh, jax.random.PRNGKey(0))
  with caplog.at_level(logging.WARNING):
    restored = _save_and_restore(tmp_path, state, off, mesh)
  assert "has EMA weights; config.ema_decay=0 drops them" in caplog.text
  assert restored.ema == {}
  assert_trees_close(restored.params, state.params, atol=0)


@pytest.mark.slow  # 30 s: a ResNet's train state; the ViT's EMA restore is in the default suite
def test_resnet_ema_restores_with_its_running_statistics(tmp_path):
  # restore_params(weights="ema") of a ResNet: the EMA params and the EMA of the BatchNorm
  # running averages, under batch_stats as clip_jax.load expects.
  c = step_config(model="tiny_rn", ema_decay=0.9)
  mesh = shd.create_mesh(c)
  state, _ = st.create_train_state(c, mesh, jax.random.PRNGKey(0))
  moved = jax.tree.map(lambda x: x + 1.0, state.ema)  # an EMA that differs from the weights
  state = state.replace(ema=moved)
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), checkpoint_every=1, keep_checkpoints=1,
                                       async_save=False)
  checkpointer.save(1, state, data_state={}, rng=jax.random.key(0), config_json="{}",
                    model_config=st.model_config_from(c), force=True)
  checkpointer.close()
  ema, _ = ckpt_lib.restore_params(str(tmp_path))
  trained, _ = ckpt_lib.restore_params(str(tmp_path), "params")
  assert_trees_close(ema["batch_stats"], moved["batch_stats"], atol=0)
  assert_trees_close({k: v for k, v in ema.items() if k != "batch_stats"}, moved["params"],
                     atol=0)
  assert_trees_close(trained["batch_stats"], state.batch_stats, atol=0)
