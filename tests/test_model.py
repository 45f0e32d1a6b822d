"""The model's shapes, sizes, FLOPs and numerical options (parity with PyTorch: test_parity.py)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import (CLIPConfig, MODEL_CONFIGS, abstract_params, count_params, create_model,
                             forward_flops_per_pair, get_model_config, init_params,
                             interpolate_pos_embed, scan_params, unscan_params)
from clip_jax.models.layers import Transformer, dot_product_attention, fused_attention, quick_gelu

# OpenAI's published parameter counts (sum of numel over the state dict, logit_scale included).
PARAM_COUNTS = {"vitb32": 151_277_313, "vitb16": 149_620_737, "vitl14": 427_616_513,
                "vitl14_336": 427_944_193}
# Published forward GFLOPs per image-text pair (open_clip's model profile).
GFLOPS = {"vitb32": 14.78, "vitb16": 41.09, "vitl14": 175.33, "vitl14_336": 395.22}


@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_counts_match_openai(name):
  assert count_params(abstract_params(create_model(name))) == PARAM_COUNTS[name]


@pytest.mark.parametrize("name", sorted(GFLOPS))
def test_flops_match_published(name):
  assert forward_flops_per_pair(name) / 1e9 == pytest.approx(GFLOPS[name], rel=0.01)


def test_every_param_has_logical_axes():
  boxed = abstract_params(create_model("tiny"))
  leaves = jax.tree_util.tree_leaves(boxed, is_leaf=lambda x: hasattr(x, "names"))
  for leaf in leaves:
    assert hasattr(leaf, "names"), leaf
    assert len(leaf.names) == len(leaf.value.shape)
  scanned = boxed["visual"]["transformer"]["resblocks"]["attn"]["qkv"]["kernel"]
  assert scanned.names == ("layers", "embed", "qkv", "heads", "kv")


def _inputs(cfg, batch=3, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(batch, cfg.vision.image_size, cfg.vision.image_size, 3)).astype(np.float32)
  tokens = np.zeros((batch, cfg.text.context_length), np.int32)
  for i in range(batch):
    n = 3 + 4 * i
    tokens[i, 0] = 49406
    tokens[i, 1:n] = rng.integers(1, 49000, n - 1)
    tokens[i, n] = 49407
  return jnp.asarray(images), jnp.asarray(tokens)


def test_scanned_and_unrolled_layers_agree():
  model = create_model("tiny")
  params = init_params(model, jax.random.PRNGKey(0))
  images, tokens = _inputs(model.config)
  out = model.apply({"params": params}, images, tokens)
  unrolled = create_model("tiny", scan_layers=False)
  out2 = unrolled.apply({"params": unscan_params(params)}, images, tokens)
  np.testing.assert_allclose(out["image_features"], out2["image_features"], atol=1e-6)
  np.testing.assert_allclose(out["text_features"], out2["text_features"], atol=1e-6)
  restacked = scan_params(unscan_params(params))
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(np.array_equal, restacked, params))


@pytest.mark.parametrize("policy", [pytest.param("full", marks=pytest.mark.slow), "dots",
                                    pytest.param("save_attn_out", marks=pytest.mark.slow)])
def test_remat_changes_nothing_numerically(policy):
  base = create_model("tiny")
  params = init_params(base, jax.random.PRNGKey(1))
  images, tokens = _inputs(base.config)

  def grads(model):
    def loss(p):
      out = model.apply({"params": p}, images, tokens)
      return jnp.sum(out["image_features"] @ out["text_features"].T)
    return jax.grad(loss)(params)

  g0, g1 = grads(base), grads(create_model("tiny", remat_policy=policy))
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(a, b, atol=1e-6, rtol=1e-5)


def test_features_are_normalised_and_pool_at_eot():
  model = create_model("tiny")
  params = init_params(model, jax.random.PRNGKey(2))
  images, tokens = _inputs(model.config)
  out = model.apply({"params": params}, images, tokens)
  np.testing.assert_allclose(jnp.linalg.norm(out["text_features"], axis=-1), 1.0, atol=1e-5)
  assert out["image_features"].dtype == jnp.float32
  assert float(out["logit_scale"]) == pytest.approx(np.log(1 / 0.07))
  # Tokens after the end-of-text token are causally invisible to it: changing them changes nothing.
  changed = tokens.at[0, -1].set(123)
  a = model.apply({"params": params}, tokens, method="encode_text")
  b = model.apply({"params": params}, changed, method="encode_text")
  np.testing.assert_allclose(a[0], b[0], atol=1e-6)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("scan_layers,remat_policy", [(True, "none"), (False, "none"),
                                                      (True, "full")])
def test_pooled_last_block_equals_full_stack_then_pick(causal, scan_layers, remat_policy):
  """The last block computing one row per sequence gives that row of the full stack, and its
  gradients; XLA's cost analysis shows the work it saves."""
  layer = Transformer(layers=3, heads=4, causal=causal, scan_layers=scan_layers,
                      remat_policy=remat_policy)
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(3, 11, 32)).astype(np.float32))
  index = jnp.asarray([10, 0, 6])
  params = nn.meta.unbox(layer.init(jax.random.PRNGKey(0), x, index))

  def full(p, x):
    return jnp.take_along_axis(layer.apply(p, x), index[:, None, None], axis=1)[:, 0]

  def pooled(p, x):
    return layer.apply(p, x, pool_index=index)

  np.testing.assert_allclose(pooled(params, x), full(params, x), atol=2e-6, rtol=1e-5)
  g_full = jax.grad(lambda p, x: jnp.sum(jnp.sin(full(p, x))), argnums=(0, 1))(params, x)
  g_pool = jax.grad(lambda p, x: jnp.sum(jnp.sin(pooled(p, x))), argnums=(0, 1))(params, x)
  for a, b in zip(jax.tree_util.tree_leaves(g_full), jax.tree_util.tree_leaves(g_pool)):
    np.testing.assert_allclose(a, b, atol=2e-6, rtol=1e-5)
  if not scan_layers:  # XLA counts a scanned body once; unrolled, the saving is visible.
    def flops(fn):
      return jax.jit(fn).lower(params, x).compile().cost_analysis()["flops"]
    # The last of 3 layers keeps its k/v projection and scores for one query: well under 3/3.
    assert flops(pooled) < 0.8 * flops(full)


def test_bfloat16_compute_keeps_float32_params_and_outputs():
  model = create_model("tiny", dtype="bfloat16")
  params = init_params(model, jax.random.PRNGKey(3))
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(params))
  images, tokens = _inputs(model.config)
  out = model.apply({"params": params}, images, tokens)
  ref = create_model("tiny").apply({"params": params}, images, tokens)
  assert out["image_features"].dtype == jnp.float32
  np.testing.assert_allclose(out["image_features"], ref["image_features"], atol=5e-2)
  # The residual stream between blocks (the scan carry) is bf16 too: float32 there would
  # double the memory traffic of every LayerNorm and residual add on an accelerator.
  carries = [str(e.outvars[0].aval) for e in jax.make_jaxpr(
      lambda p: model.apply({"params": p}, images, tokens))(params).jaxpr.eqns
             if e.primitive.name == "scan"]
  assert carries and all(c.startswith("bfloat16[") for c in carries), carries


def test_sigmoid_head_has_logit_bias():
  model = create_model("tiny", logit_bias_init=-10.0, logit_scale_init=float(np.log(10)))
  params = init_params(model, jax.random.PRNGKey(0))
  assert float(params["logit_bias"]) == -10.0


def test_attention_matches_numpy_reference():
  rng = np.random.default_rng(0)
  q, k, v = (rng.normal(size=(2, 5, 3, 4)).astype(np.float32) for _ in range(3))
  for causal in (False, True):
    logits = np.einsum("bqhd,bkhd->bhqk", q, k) / 2.0
    if causal:
      logits = np.where(np.tril(np.ones((5, 5), bool)), logits, -np.inf)
    w = np.exp(logits - logits.max(-1, keepdims=True))
    w /= w.sum(-1, keepdims=True)
    ref = np.einsum("bhqk,bkhd->bqhd", w, v)
    np.testing.assert_allclose(dot_product_attention(q, k, v, causal), ref, atol=1e-6)
  x = np.linspace(-4, 4, 9, dtype=np.float32)
  np.testing.assert_allclose(quick_gelu(x), x / (1 + np.exp(-1.702 * x)), rtol=1e-6)


@pytest.mark.parametrize("length,causal", [(7, False), (7, True), (8, True)])
def test_fused_attention_pads_odd_lengths_exactly(length, causal):
  """cuDNN trains only even lengths: an odd one is padded by a query row (sliced off) and a
  key hidden by the padding mask. The same padded call through the XLA kernel (any backend)
  gives our attention's outputs and input gradients."""
  keys = jax.random.split(jax.random.PRNGKey(length), 4)
  q, k, v, cotangent = (jax.random.normal(key, (2, length, 3, 8)) for key in keys)
  fused = lambda *a: (fused_attention(*a, causal=causal, implementation="xla") * cotangent).sum()
  ours = lambda *a: (dot_product_attention(*a, causal=causal) * cotangent).sum()
  (value, grads), (ref_value, ref_grads) = (jax.value_and_grad(f, argnums=(0, 1, 2))(q, k, v)
                                            for f in (fused, ours))
  np.testing.assert_allclose(value, ref_value, rtol=1e-5)
  for g, ref in zip(grads, ref_grads):
    assert g.shape == ref.shape
    np.testing.assert_allclose(g, ref, atol=2e-6)


@pytest.mark.parametrize("scan_layers,remat_policy", [
    (True, "dots"), pytest.param(False, "none", marks=pytest.mark.slow)])
def test_cudnn_path_pads_once_and_matches_xla(monkeypatch, scan_layers, remat_policy):
  """attention_impl='cudnn' pads an odd sequence (tiny: 17 image, 77 text tokens) once per
  tower, masks the pad key in every layer and slices it off. Run through the XLA kernel
  (FUSED_ATTENTION_KERNEL, as on CPU cuDNN does not exist), the model's features and every
  parameter gradient equal the plain attention's, scanned (remat) and unscanned (pooled
  last block)."""
  from clip_jax.models import layers
  monkeypatch.setattr(layers, "FUSED_ATTENTION_KERNEL", "xla")
  base = create_model("tiny", scan_layers=scan_layers, remat_policy=remat_policy)
  params = init_params(base, jax.random.PRNGKey(3))
  images, tokens = _inputs(base.config)
  seq = (base.config.vision.image_size // base.config.vision.patch_size) ** 2 + 1
  assert seq % 2 == 1 and base.config.text.context_length % 2 == 1

  def run(model):
    def loss(p):
      out = model.apply({"params": p}, images, tokens)
      return jnp.sum(out["image_features"] @ out["text_features"].T), out
    return jax.jit(jax.grad(loss, has_aux=True))(params)

  fused = create_model("tiny", scan_layers=scan_layers, remat_policy=remat_policy,
                       attention_impl="cudnn")
  jaxpr = str(jax.make_jaxpr(lambda p: fused.apply({"params": p}, images, tokens))(params))
  assert jaxpr.count("pad[") == 2  # once per tower, not q, k and v in every layer
  (g0, out0), (g1, out1) = run(base), run(fused)
  for key in ("image_features", "text_features"):
    np.testing.assert_allclose(out1[key], out0[key], atol=2e-6)
  for a, b in zip(jax.tree_util.tree_leaves(g0), jax.tree_util.tree_leaves(g1)):
    np.testing.assert_allclose(b, a, atol=1e-5, rtol=1e-4)


def test_dots_policy_keeps_the_cudnn_forward(monkeypatch):
  """Under remat `dots` the backward pass reuses cuDNN attention's forward outputs instead of
  running the fused forward again. Traced (not run) on CPU: jax's cuDNN availability checks
  are stubbed, and the gradient's jaxpr counts the fused forward launches."""
  fused_impl = pytest.importorskip("jax._src.cudnn.fused_attention_stablehlo")
  if not all(hasattr(fused_impl, f) for f in ("check_cudnn_version", "check_compute_capability")):
    pytest.skip("jax's cuDNN attention internals moved")
  monkeypatch.setattr(fused_impl, "check_cudnn_version", lambda: 91000)
  monkeypatch.setattr(fused_impl, "check_compute_capability", lambda capability: True)
  from clip_jax.models.layers import REMAT_POLICIES

  def block(q, k, v):  # an odd length: the padded path
    return jnp.sin(fused_attention(q, k, v, causal=True, implementation="cudnn")).sum()

  def forward_launches(policy):
    q = jnp.ones((2, 7, 2, 64), jnp.bfloat16)
    fn = jax.checkpoint(block, policy=policy) if policy else block
    return str(jax.make_jaxpr(jax.grad(fn, argnums=(0, 1, 2)))(q, q, q)).count(
        "dot_product_attention_fwd")
  assert forward_launches(None) == 1
  assert forward_launches(jax.checkpoint_policies.dots_saveable) == 2  # jax's plain `dots`
  assert forward_launches(REMAT_POLICIES["dots"]) == 1
  assert forward_launches(REMAT_POLICIES["full"]) == 2


def test_attention_impl_auto_resolves_by_backend_and_dtype():
  from clip_jax.models.layers import resolve_attention_impl
  assert resolve_attention_impl("auto", jnp.bfloat16) == (
      "cudnn" if jax.default_backend() == "gpu" else "xla")
  assert resolve_attention_impl("auto", jnp.float32) == "xla"
  assert resolve_attention_impl("xla", jnp.bfloat16) == "xla"
  with pytest.raises(ValueError, match="unknown attention_impl 'flash'"):
    resolve_attention_impl("flash")
  with pytest.raises(ValueError, match="attention_impl='cudnn' needs"):
    resolve_attention_impl("cudnn", jnp.float32)  # float32 anywhere, any dtype off a GPU


def test_position_embedding_interpolation():
  cfg = get_model_config("tiny")
  params = init_params(create_model(cfg), jax.random.PRNGKey(0))
  bigger = cfg.replace(vision={"image_size": 48})   # 4x4 -> 6x6 patches
  new = interpolate_pos_embed(params, bigger.vision.grid_size)
  pos = new["visual"]["positional_embedding"]
  assert pos.shape == (37, 64)
  np.testing.assert_array_equal(pos[0], params["visual"]["positional_embedding"][0])
  images = jnp.zeros((1, 48, 48, 3))
  feats = create_model(bigger).apply({"params": new}, images, method="encode_image")
  assert feats.shape == (1, 64) and bool(jnp.all(jnp.isfinite(feats)))
  # A constant grid stays constant under interpolation.
  const = dict(params, visual=dict(params["visual"], positional_embedding=jnp.ones((17, 64))))
  np.testing.assert_allclose(interpolate_pos_embed(const, 6)["visual"]["positional_embedding"], 1.0,
                             atol=1e-5)


def test_bad_inputs_and_names_raise_clear_errors():
  with pytest.raises(ValueError, match="unknown model 'vitz'"):
    get_model_config("vitz")
  model = create_model("tiny")
  params = init_params(model, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match="expects 32x32"):
    model.apply({"params": params}, jnp.zeros((1, 64, 64, 3)), method="encode_image")
  with pytest.raises(ValueError, match="unknown remat_policy"):
    create_model("tiny", remat_policy="bogus").init(jax.random.PRNGKey(0), *_inputs(model.config))


def test_config_json_round_trip():
  for cfg in MODEL_CONFIGS.values():
    assert CLIPConfig.from_dict(cfg.to_dict()) == cfg
  with pytest.raises(ValueError, match="unknown CLIPConfig field"):
    CLIPConfig.from_dict({"embed_dims": 3})
