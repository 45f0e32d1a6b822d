"""Schedules (exact), decay mask, per-tower multipliers and the frozen tower."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from clip_jax import optim
from clip_jax.models import create_model, init_params
from configs.common import get_config


def lr(step, **kw):
  return float(optim.schedule_value(step, **kw))


def test_cosine_with_warmup():
  kw = dict(schedule="cosine", learning_rate=1.0, warmup_steps=10, total_steps=110,
            end_lr_factor=0.1)
  assert lr(0, **kw) == 0.0
  assert lr(5, **kw) == pytest.approx(0.5)
  assert lr(10, **kw) == pytest.approx(1.0)
  assert lr(60, **kw) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-6)
  assert lr(35, **kw) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)), abs=1e-6)
  assert lr(110, **kw) == pytest.approx(0.1)
  assert lr(500, **kw) == pytest.approx(0.1)


def test_linear_constant_rsqrt():
  assert lr(30, schedule="linear", learning_rate=2.0, warmup_steps=0,
            total_steps=40) == pytest.approx(0.5)
  assert lr(3, schedule="constant", learning_rate=0.3, warmup_steps=4) == pytest.approx(0.225)
  assert lr(1000, schedule="constant", learning_rate=0.3, warmup_steps=4) == pytest.approx(0.3)
  kw = dict(schedule="rsqrt", learning_rate=1.0, warmup_steps=100, rsqrt_timescale=100)
  assert lr(100, **kw) == pytest.approx(1.0)
  assert lr(400, **kw) == pytest.approx(0.5)          # 1 / sqrt(1 + 300 / 100)
  # Linear cooldown over the last 100 of 1000 steps, to 0.
  kw.update(total_steps=1000, cooldown_steps=100)
  at_900 = 1 / math.sqrt(1 + 800 / 100)
  assert lr(900, **kw) == pytest.approx(at_900, rel=1e-6)
  assert lr(950, **kw) == pytest.approx(1 / math.sqrt(1 + 850 / 100) * 0.5, rel=1e-6)
  assert lr(1000, **kw) == pytest.approx(0.0)


MAX_STEPS = 2**31 - 1  # the train state's step is int32


def closed_form(step, *, schedule, learning_rate, warmup_steps=0, total_steps=None,
                end_lr_factor=0.0, cooldown_steps=0,
                rsqrt_timescale=optim.DEFAULT_RSQRT_TIMESCALE):
  """The schedules' definitions in float64 numpy."""
  step = np.asarray(step, np.float64)
  lr, end = learning_rate, learning_rate * end_lr_factor
  if schedule in ("cosine", "linear"):
    t = np.clip((step - warmup_steps) / max(total_steps - warmup_steps, 1), 0.0, 1.0)
    value = end + (lr - end) * (0.5 * (1 + np.cos(np.pi * t)) if schedule == "cosine" else 1 - t)
  elif schedule == "constant":
    value = np.full_like(step, lr)
  else:
    value = lr / np.sqrt(1 + np.maximum(step - warmup_steps, 0) / rsqrt_timescale)
  if cooldown_steps:
    value = end + (value - end) * np.clip((total_steps - step) / cooldown_steps, 0.0, 1.0)
  return np.where(step < warmup_steps, lr * step / max(warmup_steps, 1), value)


HUGE_RUNS = [
    dict(schedule="cosine", total_steps=MAX_STEPS, warmup_steps=10_000, end_lr_factor=0.1),
    dict(schedule="cosine", total_steps=2**31 - 1000, warmup_steps=0),
    dict(schedule="linear", total_steps=MAX_STEPS, warmup_steps=2**30 + 1, end_lr_factor=0.01),
    dict(schedule="linear", total_steps=123_456_789, warmup_steps=2000),
    dict(schedule="constant", total_steps=MAX_STEPS, warmup_steps=5, cooldown_steps=1000,
         end_lr_factor=0.1),
    dict(schedule="constant", total_steps=MAX_STEPS, warmup_steps=0, cooldown_steps=MAX_STEPS),
    dict(schedule="rsqrt", total_steps=MAX_STEPS, warmup_steps=10_000, cooldown_steps=2**30,
         rsqrt_timescale=10_000),
]


@pytest.mark.parametrize("run", HUGE_RUNS, ids=lambda r: f"{r['schedule']}-{r['total_steps']}")
def test_schedules_at_huge_step_counts_match_the_closed_form(run):
  kw = dict(run, learning_rate=1e-3)
  total, warmup, cooldown = run["total_steps"], run["warmup_steps"], run.get("cooldown_steps", 0)
  steps = sorted({s for s in (0, 1, warmup - 1, warmup, warmup + 1, total // 2,
                              total - cooldown - 1, total - cooldown, total - cooldown // 2,
                              total - 500, total - 2, total - 1, total) if s >= 0})
  got = np.asarray(optim.schedule_value(np.asarray(steps, np.int32), **kw))
  np.testing.assert_allclose(got, closed_form(steps, **kw), rtol=0, atol=1e-9)
  # The ends exactly (float32 cannot tell these steps from their neighbours).
  assert lr(0, **kw) == (0.0 if warmup else np.float32(1e-3))
  if run["schedule"] != "rsqrt":  # rsqrt(1) need not be exactly 1
    assert lr(warmup, **kw) == np.float32(1e-3)
  assert lr(total, **kw) == np.float32(1e-3 * run.get("end_lr_factor", 0.0))


def test_optimizer_schedule_runs_to_the_largest_step_under_jit():
  c = get_config()
  c.total_steps = MAX_STEPS
  c.optimizer.update(schedule="cosine", learning_rate=1e-3, warmup_steps=2000,
                     end_lr_factor=0.1)
  schedule = jax.jit(optim.make_schedule(c))
  assert float(schedule(jnp.int32(2000))) == np.float32(1e-3)
  assert float(schedule(jnp.int32(MAX_STEPS))) == np.float32(1e-4)
  # optax's step count (int32) reaches the largest step without wrapping.
  tx = optim.make_optimizer(c)
  params = {"w": jnp.ones(3)}
  state = jax.tree.map(lambda x: jnp.full_like(x, MAX_STEPS - 1) if x.dtype == jnp.int32 else x,
                       tx.init(params))
  updates, state = tx.update({"w": jnp.ones(3)}, state, params)
  counts = [x for x in jax.tree.leaves(state) if x.dtype == jnp.int32]
  assert counts and all(int(x) == MAX_STEPS for x in counts)
  assert np.all(np.isfinite(updates["w"])) and np.all(np.asarray(updates["w"]) < 0)


def test_schedule_errors_are_one_line():
  c = get_config()
  c.optimizer.schedule = "cosine"
  with pytest.raises(ValueError, match="needs config.total_steps") as e:
    optim.make_schedule(c)
  assert "\n" not in str(e.value)
  c.total_steps = 10
  c.optimizer.cooldown_steps = 5
  with pytest.raises(ValueError, match="cooldown_steps"):
    optim.make_schedule(c)
  c.optimizer.schedule = "step"
  with pytest.raises(ValueError, match="schedule='step'"):
    optim.make_schedule(c)


def test_total_steps_from_epochs():
  c = get_config()
  c.batch_size, c.epochs, c.num_train_examples = 100, 2.5, 1010
  assert optim.total_steps_from(c) == 26


@pytest.fixture(scope="module")
def params():
  return init_params(create_model("tiny", logit_bias_init=-10.0), jax.random.PRNGKey(0))


def test_decay_mask_paper_rule(params):
  # The paper's "all weights that are not gains or biases", as open_clip: every weight of >= 2
  # dimensions per layer (a scanned stack's layer axis does not count), embeddings included.
  mask = optim.decay_mask(params)
  v, t = mask["visual"], mask["text"]
  blocks = v["transformer"]["resblocks"]
  assert v["conv1"] and v["proj"] and t["text_projection"]
  assert blocks["attn"]["qkv"]["kernel"] and blocks["mlp"]["c_fc"]["kernel"]
  assert v["positional_embedding"]
  assert t["token_embedding"] and t["positional_embedding"]
  # Gains and biases: a scanned LayerNorm scale is [L, D] and a qkv bias [L, 3, H, hd], and
  # neither decays; the class embedding is one-dimensional.
  assert not blocks["attn"]["qkv"]["bias"]
  assert not blocks["mlp"]["c_proj"]["bias"]
  assert not blocks["ln_1"]["scale"] and not v["ln_post"]["bias"] and not t["ln_final"]["scale"]
  assert not v["class_embedding"]
  assert not mask["logit_scale"] and not mask["logit_bias"]


def test_decay_mask_paper_rule_unscanned_and_resnet():
  unscanned = jax.eval_shape(
      lambda: init_params(create_model("tiny", scan_layers=False), jax.random.PRNGKey(0)))
  mask = optim.decay_mask(unscanned)
  block = mask["visual"]["transformer"]["resblocks_0"]
  assert block["attn"]["qkv"]["kernel"] and not block["ln_1"]["scale"]
  assert not block["attn"]["qkv"]["bias"]
  abstract = jax.eval_shape(lambda: init_params(create_model("rn50"), jax.random.PRNGKey(0)))
  mask = optim.decay_mask(abstract)["visual"]
  assert mask["conv1"]["kernel"] and mask["layer1_0"]["downsample_conv"]["kernel"]
  assert mask["attnpool"]["positional_embedding"] and mask["attnpool"]["q_proj"]["kernel"]
  assert not mask["bn1"]["scale"] and not mask["layer1_0"]["bn3"]["bias"]
  assert not mask["attnpool"]["k_proj"]["bias"]


def test_decay_mask_kernels_rule_and_no_decay_patterns(params):
  # big_vision's: kernels and projection matrices only.
  mask = optim.decay_mask(params, "kernels")
  assert mask["visual"]["conv1"] and mask["text"]["text_projection"]
  assert mask["text"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"]
  assert not mask["text"]["token_embedding"] and not mask["visual"]["positional_embedding"]
  assert not mask["visual"]["ln_pre"]["scale"] and not mask["logit_scale"]
  # Regexes over the "/"-joined path exempt leaves on top of the rule.
  mask = optim.decay_mask(params, "paper", "token_embedding, ^visual/transformer/.*/c_fc/")
  assert not mask["text"]["token_embedding"] and mask["text"]["positional_embedding"]
  assert not mask["visual"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"]
  assert mask["text"]["transformer"]["resblocks"]["mlp"]["c_fc"]["kernel"]
  assert mask["visual"]["transformer"]["resblocks"]["mlp"]["c_proj"]["kernel"]


def test_decay_rule_errors_are_one_line():
  c = get_config()
  c.total_steps = 10
  c.optimizer.decay_rule = "everything"
  with pytest.raises(ValueError, match=r"decay_rule='everything' is unknown; use paper or kernels"):
    optim.make_optimizer(c)
  c.optimizer.decay_rule = "paper"
  c.optimizer.no_decay = "token_(embedding"
  with pytest.raises(ValueError, match=r"no_decay: 'token_\(embedding' is not a regular"):
    optim.make_optimizer(c)


def test_unused_token_rows_decay(params):
  # The paper's rule, where clip_jax once differed from PyTorch: rows of the token embedding
  # that no batch uses (zero gradient) still shrink by lr * wd * p each step.
  updates, _ = first_update(config_for(), params, grad=0.0)
  tok = np.asarray(params["text"]["token_embedding"])
  np.testing.assert_allclose(updates["text"]["token_embedding"], -1e-2 * 0.2 * tok, rtol=1e-5)
  updates, _ = first_update(config_for(decay_rule="kernels"), params, grad=0.0)
  assert float(jnp.abs(updates["text"]["token_embedding"]).max()) == 0.0


def config_for(**opt):
  c = get_config()
  c.total_steps = 100
  c.optimizer.warmup_steps = 0
  c.optimizer.schedule = "constant"
  c.optimizer.learning_rate = 1e-2
  c.optimizer.update(opt)
  return c


def first_update(config, params, grad=0.1):
  tx = optim.make_optimizer(config)
  grads = jax.tree_util.tree_map(lambda p: jnp.ones_like(p) * grad, params)
  updates, state = tx.update(grads, tx.init(params), params)
  return updates, state


def test_adamw_first_step_matches_formula(params):
  updates, _ = first_update(config_for(), params)
  # Adam's first step is g / (|g| + eps) = ~1 per element; decay adds wd * p on matrices.
  k = params["visual"]["proj"]
  expected = -1e-2 * (0.1 / (0.1 + 1e-6) + 0.2 * k)
  np.testing.assert_allclose(updates["visual"]["proj"], expected, rtol=1e-5)
  b = params["visual"]["ln_post"]["bias"]
  np.testing.assert_allclose(updates["visual"]["ln_post"]["bias"],
                             -1e-2 * 0.1 / (0.1 + 1e-6) * np.ones_like(b), rtol=1e-5)


def test_tower_lr_multipliers(params):
  base, _ = first_update(config_for(), params)
  scaled, _ = first_update(config_for(image_lr_mult=0.5, text_lr_mult=2.0), params)
  for a, b in zip(jax.tree_util.tree_leaves(base["visual"]), jax.tree_util.tree_leaves(scaled["visual"])):
    np.testing.assert_allclose(b, 0.5 * a, rtol=1e-6)
  for a, b in zip(jax.tree_util.tree_leaves(base["text"]), jax.tree_util.tree_leaves(scaled["text"])):
    np.testing.assert_allclose(b, 2.0 * a, rtol=1e-6)
  np.testing.assert_allclose(scaled["logit_scale"], base["logit_scale"])


def test_frozen_tower_zero_update_and_no_moments(params):
  updates, state = first_update(config_for(freeze="image"), params)
  assert all(float(jnp.abs(u).max()) == 0 for u in jax.tree_util.tree_leaves(updates["visual"]))
  assert all(float(jnp.abs(u).max()) > 0 for u in jax.tree_util.tree_leaves(updates["text"]))
  assert float(jnp.abs(updates["logit_scale"])) > 0
  n_params = lambda tree: sum(x.size for x in jax.tree_util.tree_leaves(tree))  # noqa: E731
  _, full_state = first_update(config_for(), params)
  # The frozen group has no Adam moments (nor its Adam and schedule step counts).
  saved = n_params(full_state) - n_params(state)
  assert saved == 2 * n_params(params["visual"]) + 2


def test_grad_clipping_applies_before_adam(params):
  c = config_for(grad_clip_norm=1.0)
  tx = optim.make_optimizer(c)
  assert isinstance(tx, optax.GradientTransformation)
  grads = jax.tree_util.tree_map(lambda p: jnp.full_like(p, 100.0), params)
  state = tx.init(params)
  clip_state, _ = state
  clipped, _ = optax.clip_by_global_norm(1.0).update(grads, clip_state)
  assert float(optax.global_norm(clipped)) == pytest.approx(1.0, rel=1e-5)
  # Adam normalises, so clipping shows in the second moment: nu = (1 - b2) * g_clipped^2.
  _, new_state = tx.update(grads, state, params)
  nu = new_state[1].inner_states["image"].inner_state[0].nu["visual"]["proj"]
  g = clipped["visual"]["proj"]
  np.testing.assert_allclose(nu, 0.02 * np.square(g), rtol=1e-4)
