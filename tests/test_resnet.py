"""The ResNet image towers against an independent PyTorch ModifiedResNet (written here, after
openai/CLIP's model.py), sizes, FLOPs and BatchNorm semantics.

The reference CLIP: this file's torch ModifiedResNet as the image tower, transformers'
CLIPTextModel (random weights, OpenAI's names via test_convert_utils) as the text tower.
Weights, BatchNorm affine parameters and running statistics are all perturbed away from
their initial values, so a dropped or misplaced one changes the outputs.
"""
import collections
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from clip_jax.models import (MODEL_CONFIGS, abstract_variables, count_params, create_model,
                             init_variables, model_variables)
from clip_jax.models.flops import image_flops

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

import clip_jax  # noqa: E402
from clip_jax import convert  # noqa: E402

from test_convert_utils import (assert_close, hf_clip, hf_state_dict,  # noqa: E402
                                openai_state_dict, random_images, random_tokens)

# Parameter counts (BatchNorm running statistics are buffers, not counted), from the issue.
PARAM_COUNTS = {"rn50": 102_007_137, "rn101": 119_688_033, "rn50x4": 178_300_601,
                "rn50x16": 290_979_217, "rn50x64": 623_258_305}
TINY_RN = MODEL_CONFIGS["tiny_rn"]


# ------------------------------------------------------------------------ the torch reference
def torch_resnet(layers, width, heads, image_size, output_dim, seed=0):
  """openai/CLIP's ModifiedResNet, random weights, every BatchNorm buffer perturbed; eval."""
  nn, F = torch.nn, torch.nn.functional

  class Bottleneck(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
      super().__init__()
      self.conv1 = nn.Conv2d(inplanes, planes, 1, bias=False)
      self.bn1 = nn.BatchNorm2d(planes)
      self.conv2 = nn.Conv2d(planes, planes, 3, padding=1, bias=False)
      self.bn2 = nn.BatchNorm2d(planes)
      self.avgpool = nn.AvgPool2d(stride) if stride > 1 else nn.Identity()
      self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
      self.bn3 = nn.BatchNorm2d(planes * 4)
      self.downsample = None
      if stride > 1 or inplanes != planes * 4:
        self.downsample = nn.Sequential(collections.OrderedDict([
            ("-1", nn.AvgPool2d(stride)),
            ("0", nn.Conv2d(inplanes, planes * 4, 1, stride=1, bias=False)),
            ("1", nn.BatchNorm2d(planes * 4))]))

    def forward(self, x):
      out = F.relu(self.bn1(self.conv1(x)))
      out = F.relu(self.bn2(self.conv2(out)))
      out = self.bn3(self.conv3(self.avgpool(out)))
      identity = x if self.downsample is None else self.downsample(x)
      return F.relu(out + identity)

  class AttentionPool2d(nn.Module):
    def __init__(self, spacial_dim, embed_dim, num_heads, output_dim):
      super().__init__()
      self.positional_embedding = nn.Parameter(
          torch.randn(spacial_dim ** 2 + 1, embed_dim) / embed_dim ** 0.5)
      self.k_proj = nn.Linear(embed_dim, embed_dim)
      self.q_proj = nn.Linear(embed_dim, embed_dim)
      self.v_proj = nn.Linear(embed_dim, embed_dim)
      self.c_proj = nn.Linear(embed_dim, output_dim)
      self.num_heads = num_heads

    def forward(self, x):
      x = x.flatten(start_dim=2).permute(2, 0, 1)  # NCHW -> (HW)NC
      x = torch.cat([x.mean(dim=0, keepdim=True), x], dim=0)
      x = x + self.positional_embedding[:, None, :]
      x, _ = F.multi_head_attention_forward(
          query=x[:1], key=x, value=x, embed_dim_to_check=x.shape[-1],
          num_heads=self.num_heads, q_proj_weight=self.q_proj.weight,
          k_proj_weight=self.k_proj.weight, v_proj_weight=self.v_proj.weight,
          in_proj_weight=None,
          in_proj_bias=torch.cat([self.q_proj.bias, self.k_proj.bias, self.v_proj.bias]),
          bias_k=None, bias_v=None, add_zero_attn=False, dropout_p=0.0,
          out_proj_weight=self.c_proj.weight, out_proj_bias=self.c_proj.bias,
          use_separate_proj_weight=True, training=False, need_weights=False)
      return x.squeeze(0)

  class ModifiedResNet(nn.Module):
    def __init__(self):
      super().__init__()
      self.conv1 = nn.Conv2d(3, width // 2, 3, stride=2, padding=1, bias=False)
      self.bn1 = nn.BatchNorm2d(width // 2)
      self.conv2 = nn.Conv2d(width // 2, width // 2, 3, padding=1, bias=False)
      self.bn2 = nn.BatchNorm2d(width // 2)
      self.conv3 = nn.Conv2d(width // 2, width, 3, padding=1, bias=False)
      self.bn3 = nn.BatchNorm2d(width)
      self.avgpool = nn.AvgPool2d(2)
      self._inplanes = width
      self.layer1 = self._make_layer(width, layers[0])
      self.layer2 = self._make_layer(width * 2, layers[1], stride=2)
      self.layer3 = self._make_layer(width * 4, layers[2], stride=2)
      self.layer4 = self._make_layer(width * 8, layers[3], stride=2)
      self.attnpool = AttentionPool2d(image_size // 32, width * 32, heads, output_dim)

    def _make_layer(self, planes, blocks, stride=1):
      out = [Bottleneck(self._inplanes, planes, stride)]
      self._inplanes = planes * 4
      out += [Bottleneck(self._inplanes, planes) for _ in range(1, blocks)]
      return nn.Sequential(*out)

    def forward(self, x):
      for conv, bn in ((self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)):
        x = F.relu(bn(conv(x)))
      x = self.avgpool(x)
      x = self.layer4(self.layer3(self.layer2(self.layer1(x))))
      return self.attnpool(x)

  torch.manual_seed(seed)
  model = ModifiedResNet()
  generator = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for module in model.modules():
      if isinstance(module, nn.BatchNorm2d):
        c = module.num_features
        module.weight.copy_(1.0 + 0.2 * torch.randn(c, generator=generator))
        module.bias.copy_(0.1 * torch.randn(c, generator=generator))
        module.running_mean.copy_(0.1 * torch.randn(c, generator=generator))
        module.running_var.copy_(torch.rand(c, generator=generator) + 0.5)
        module.num_batches_tracked.fill_(7)
      elif isinstance(module, nn.Linear):
        module.bias.copy_(0.1 * torch.randn(module.bias.shape, generator=generator))
  return model.eval().float()


def reference_clip(name, seed=0):
  """(OpenAI-layout state dict, image tower, text model, logit scale) of a random ResNet CLIP."""
  cfg = MODEL_CONFIGS[name]
  v, t = cfg.vision, cfg.text
  visual = torch_resnet(v.layers, v.width, v.heads, v.image_size, cfg.embed_dim, seed)
  text_dims = dict(image_size=32, patch_size=16, vision_width=64, vision_layers=1,
                   vision_heads=1, text_width=t.width, text_layers=t.layers, text_heads=t.heads,
                   embed_dim=cfg.embed_dim)
  hf = hf_clip(text_dims, seed=seed + 2, logit_scale=3.0)
  state = {k: v for k, v in openai_state_dict(hf_state_dict(hf)).items()
           if not k.startswith("visual.")}
  state.update({f"visual.{k}": v.detach().clone() for k, v in visual.state_dict().items()})
  return state, visual, hf


def reference_outputs(visual, hf, images_nhwc, tokens):
  pixels = torch.from_numpy(np.ascontiguousarray(images_nhwc.transpose(0, 3, 1, 2)))
  ids = torch.from_numpy(tokens.astype(np.int64))
  with torch.no_grad():
    image = visual(pixels)
    text = hf.text_projection(hf.text_model(input_ids=ids).pooler_output)
    norm = lambda x: x / x.norm(dim=-1, keepdim=True)
    logits = hf.logit_scale.exp() * norm(image) @ norm(text).t()
  return {"image": image.numpy(), "text": text.numpy(), "logits_per_image": logits.numpy(),
          "logits_per_text": logits.t().numpy()}


def _check(clip, images, tokens, ref):
  assert_close(clip.encode_image(images), ref["image"], what="image embeddings")
  assert_close(clip.encode_text(tokens), ref["text"], what="text embeddings")
  logits_per_image, logits_per_text = clip(images, tokens)
  assert_close(logits_per_image, ref["logits_per_image"], what="logits_per_image")
  assert_close(logits_per_text, ref["logits_per_text"], what="logits_per_text")


# ------------------------------------------------------------------------ sizes
@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_param_counts(name):
  variables = abstract_variables(create_model(name))
  assert count_params(variables["params"]) == PARAM_COUNTS[name]
  assert count_params(variables["batch_stats"]) > 0  # buffers, counted apart


def test_flops_against_xla_cost_analysis():
  # XLA counts the convolutions' multiply-adds without the zero padding of the 3x3 borders
  # and adds the elementwise ops, so it lands a few percent below the analytic count.
  model = create_model("rn50")
  variables = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype),
                           abstract_variables(model))
  images = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
  import flax.linen as nn
  cost = jax.jit(lambda v, x: model.apply(v, x, method="encode_image")).lower(
      nn.meta.unbox(variables), images).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  assert image_flops("rn50") == pytest.approx(cost["flops"], rel=0.04)
  assert cost["flops"] < image_flops("rn50")


# ------------------------------------------------------------------------ parity
@pytest.fixture(scope="module")
def tiny_reference(tmp_path_factory):
  state, visual, hf = reference_clip("tiny_rn", seed=0)
  images, tokens = random_images(5, TINY_RN.vision.image_size, seed=1), random_tokens(6, seed=2)
  return state, visual, hf, images, tokens, reference_outputs(visual, hf, images, tokens)


def test_tiny_parity_openai_layout(tiny_reference, tmp_path):
  state, _, _, images, tokens, ref = tiny_reference
  torch.save(state, tmp_path / "rn.pt")
  assert convert.main(["--source", "openai", "--input", str(tmp_path / "rn.pt"),
                       "--model", "tiny_rn", "--output", str(tmp_path / "ckpt")]) == 0
  clip = clip_jax.load(tmp_path / "ckpt")
  assert clip.config.name == "tiny_rn" and clip.config.act == "quick_gelu"
  _check(clip, images, tokens, ref)
  # The running statistics came along (eval mode uses them): perturbing them changes features.
  stats = clip.params["batch_stats"]["visual"]["bn1"]
  np.testing.assert_allclose(stats["mean"], state["visual.bn1.running_mean"].numpy())
  np.testing.assert_allclose(stats["var"], state["visual.bn1.running_var"].numpy())


def test_tiny_parity_open_clip_layout_inferred(tiny_reference, tmp_path):
  # open_clip's ModifiedResNet has the same names; its training checkpoints wrap the state
  # dict and prefix DDP's "module.". Without --model the architecture comes from the shapes,
  # the text heads and the activation from the open_clip_config.json beside the weights.
  state, _, _, images, tokens, ref = tiny_reference
  wrapped = {"epoch": 3, "state_dict": {f"module.{k}": v for k, v in state.items()}}
  torch.save(wrapped, tmp_path / "epoch_3.pt")
  (tmp_path / "open_clip_config.json").write_text(json.dumps({"model_cfg": {
      "embed_dim": 64, "quick_gelu": True,
      "vision_cfg": {"image_size": 64, "layers": [1, 1, 1, 1], "width": 16},
      "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 64, "heads": 4,
                   "layers": 2}}}))
  assert convert.main(["--source", "open_clip", "--input", str(tmp_path / "epoch_3.pt"),
                       "--output", str(tmp_path / "ckpt")]) == 0
  clip = clip_jax.load(tmp_path / "ckpt")
  assert clip.config.name == "tiny_rn"
  _check(clip, images, tokens, ref)


def test_missing_and_misshaped_keys_are_one_error(tiny_reference):
  state = dict(tiny_reference[0])
  del state["visual.layer2.0.downsample.1.running_var"]
  state["visual.attnpool.c_proj.bias"] = torch.zeros(3)
  state["visual.layer9.0.conv1.weight"] = torch.zeros(1)
  numpy_state = {k: v.numpy() for k, v in state.items()}
  with pytest.raises(ValueError) as e:
    convert.convert_state_dict(numpy_state, source="openai", model="tiny_rn")
  message = str(e.value)
  assert "\n" not in message
  assert "missing keys: visual.layer2.0.downsample.1.running_var" in message
  assert "visual.layer9.0.conv1.weight" in message  # unexpected
  assert "visual.attnpool.c_proj.bias (3,) (expected (64,))" in message


def test_open_clip_resnet_name(tiny_reference):
  # open_clip's names carry the activation: RN50 is exact GELU there, RN50-quickgelu OpenAI's.
  numpy_state = {k: v.numpy() for k, v in tiny_reference[0].items()}
  with pytest.raises(ValueError, match="does not fit model 'rn50'"):
    convert.convert_state_dict(numpy_state, source="open_clip", model="RN50-quickgelu")


def test_wrong_model_is_named(tiny_reference):
  numpy_state = {k: v.numpy() for k, v in tiny_reference[0].items()}
  with pytest.raises(ValueError, match="does not fit model 'rn50'"):
    convert.convert_state_dict(numpy_state, source="openai", model="rn50")


def test_rn50_full_shape(tmp_path):
  state, visual, hf = reference_clip("rn50", seed=3)
  images, tokens = random_images(2, 224, seed=4), random_tokens(3, seed=5)
  ref = reference_outputs(visual, hf, images, tokens)
  params, config = convert.convert_state_dict({k: v.numpy() for k, v in state.items()},
                                              source="openai")
  assert config.name == "rn50"
  clip = clip_jax.inference.CLIPInference(create_model(config), params, config)
  _check(clip, images, tokens, ref)


# ------------------------------------------------------------------------ BatchNorm semantics
def test_batchnorm_training_matches_pytorch(tiny_reference):
  # Train mode: normalise with the batch's (biased) statistics; the running averages move by
  # momentum 0.1 towards the batch mean and the *unbiased* variance, as torch does.
  state, visual, _, images, _, _ = tiny_reference
  params, config = convert.convert_state_dict({k: v.numpy() for k, v in state.items()},
                                              source="openai", model="tiny_rn")
  model = create_model(config)
  variables = model_variables(params)
  features, updates = model.apply(variables, jnp.asarray(images), train=True,
                                  method="encode_image", mutable=["batch_stats"])
  trained = torch_resnet(TINY_RN.vision.layers, TINY_RN.vision.width, TINY_RN.vision.heads,
                         TINY_RN.vision.image_size, TINY_RN.embed_dim, seed=0)
  trained.load_state_dict({k[len("visual."):]: v for k, v in state.items()
                           if k.startswith("visual.")})
  trained.train()
  with torch.no_grad():
    expected = trained(torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2))))
  assert_close(features, expected.numpy(), what="train-mode image embeddings")
  new_stats = updates["batch_stats"]["visual"]
  for ours, theirs in ((new_stats["bn1"], trained.bn1),
                       (new_stats["layer3_0"]["downsample_bn"], getattr(trained.layer3[0].downsample, "1")),
                       (new_stats["layer4_0"]["bn3"], trained.layer4[0].bn3)):
    assert_close(ours["mean"], theirs.running_mean.numpy(), rtol=1e-5, what="running mean")
    assert_close(ours["var"], theirs.running_var.numpy(), rtol=1e-5, what="running var")
  # Eval mode does not touch the statistics.
  _, unchanged = model.apply(variables, jnp.asarray(images), method="encode_image",
                             mutable=["batch_stats"])
  jax.tree.map(np.testing.assert_array_equal, unchanged["batch_stats"], variables["batch_stats"])


def test_init_matches_openai():
  # Running means 0 and variances 1; each block's last BatchNorm scale starts at 0.
  variables = init_variables(create_model("tiny_rn"), jax.random.PRNGKey(0))
  stats = variables["batch_stats"]["visual"]
  assert np.all(stats["layer2_0"]["bn1"]["mean"] == 0)
  assert np.all(stats["layer2_0"]["bn1"]["var"] == 1)
  visual = variables["params"]["visual"]
  assert np.all(visual["layer2_0"]["bn3"]["scale"] == 0)
  assert np.all(visual["layer2_0"]["bn2"]["scale"] == 1)


def test_remat_and_bfloat16():
  model = create_model("tiny_rn")
  variables = init_variables(model, jax.random.PRNGKey(0))
  images = jnp.asarray(random_images(4, 64, seed=0))

  def loss(model, params):
    out, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, images,
                         train=True, method="encode_image", mutable=["batch_stats"])
    return jnp.sum(out ** 2)

  grads = jax.jit(jax.grad(lambda p: loss(model, p)))(variables["params"])
  remat_grads = jax.jit(jax.grad(
      lambda p: loss(create_model("tiny_rn", remat_policy="full"), p)))(variables["params"])
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), grads,
               remat_grads)
  bf16 = create_model("tiny_rn", dtype="bfloat16")
  out = jax.jit(lambda v: bf16.apply(v, images, method="encode_image"))(variables)
  ref = jax.jit(lambda v: model.apply(v, images, method="encode_image"))(variables)
  assert out.dtype == jnp.float32
  assert_close(out, ref, rtol=5e-2, what="bfloat16 image features")


# ------------------------------------------------------------------------ everywhere a name is
@pytest.mark.parametrize("name", sorted(PARAM_COUNTS))
def test_recipe_configs(name):
  # configs/rnXX.py: the paper's recipe for the ResNets; what --dry_run counts as num_params.
  import importlib
  from clip_jax import sharding as shd
  from clip_jax import step as st
  config = importlib.import_module(f"configs.{name}").get_config()
  assert config.model == name and config.batch_size == 32_768
  assert (config.optimizer.b2, config.optimizer.eps) == (0.999, 1e-8)
  lr = {"rn50": 5e-4, "rn101": 5e-4, "rn50x4": 5e-4, "rn50x16": 4e-4, "rn50x64": 3.6e-4}[name]
  assert config.optimizer.learning_rate == lr
  mesh = shd.create_mesh(config, jax.devices()[:1])
  abstract, _ = st.abstract_train_state(config, mesh)
  assert count_params(abstract.params) == PARAM_COUNTS[name]
  assert count_params(abstract.batch_stats) > 0


def test_benchmarks_offer_every_model():
  import importlib.util
  import pathlib
  path = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "train_step.py"
  spec = importlib.util.spec_from_file_location("train_step_benchmark", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  assert sorted(module.MODELS) == sorted(MODEL_CONFIGS)
