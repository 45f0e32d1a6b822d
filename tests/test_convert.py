"""The converter's checks and errors, the checkpoint layout, and the inference API."""
import json
import math
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

import clip_jax
from clip_jax import convert, inference, params_io
from clip_jax.convert.__main__ import main as convert_main
from clip_jax.models import (MODEL_CONFIGS, OPEN_CLIP_NAMES, configs, create_model, open_clip_name,
                             resolve_model_name, unscan_params)

from test_convert_utils import SMALL, hf_clip, hf_state_dict, openai_state_dict, random_tokens

REPO = pathlib.Path(__file__).resolve().parents[1]
PUBLISHED_PARAMS = {"vitb32": 151_277_313, "vitb16": 149_620_737, "vitl14": 427_616_513,
                    "vitl14_336": 427_944_193}


def _numpy_state(layout: str) -> dict:
  """The tiny model's weights as a {name: numpy} state dict in the given layout."""
  pytest.importorskip("transformers")
  state = hf_state_dict(hf_clip(SMALL, seed=0))
  if layout == "openai":
    state = openai_state_dict(state)
  return {k: v.numpy() for k, v in state.items()}


@pytest.fixture(scope="module")
def hf_numpy():
  return _numpy_state("hf")


@pytest.fixture(scope="module")
def openai_numpy():
  return _numpy_state("openai")


@pytest.fixture(scope="module")
def tiny_params(openai_numpy):
  # Converted random weights: much faster here than a Flax init of the model.
  return convert.convert_state_dict(openai_numpy, source="openai", model="tiny")[0]


@pytest.fixture(scope="module")
def tiny_clip(tiny_params, tmp_path_factory):
  directory = tmp_path_factory.mktemp("tiny") / "ckpt"
  params_io.save_params(directory, tiny_params, MODEL_CONFIGS["tiny"])
  return clip_jax.load(directory, batch_size=4)


def _leftovers(parent: pathlib.Path):
  return sorted(p.name for p in parent.iterdir())


@pytest.mark.parametrize("name", sorted(PUBLISHED_PARAMS))
@pytest.mark.parametrize("layout", ["openai", "hf"])
def test_expected_keys_hold_the_published_parameter_count(name, layout):
  # Nothing allocated: the key table of each layout must add up to OpenAI's exact counts.
  shapes = convert.expected_shapes(MODEL_CONFIGS[name], layout)
  assert sum(math.prod(s) for s in shapes.values()) == PUBLISHED_PARAMS[name]


@pytest.mark.parametrize("name", sorted(MODEL_CONFIGS))
def test_config_inferred_from_shapes(name):
  config = MODEL_CONFIGS[name]
  dims = convert._config_dims(config)
  # Heads are not in the shapes: width / 64 holds for OpenAI's models; tiny's come from a hint.
  heads = {} if name in PUBLISHED_PARAMS else dict(vision_heads=config.vision.heads,
                                                    text_heads=config.text.heads)
  inferred = convert.config_from_dims(dims, family=convert.config_family(config), **heads)
  assert inferred.name == name
  assert (inferred.vision, inferred.text, inferred.embed_dim) == (
      config.vision, config.text, config.embed_dim)


def test_missing_and_unexpected_keys_listed_together(openai_numpy):
  state = dict(openai_numpy)
  del state["visual.transformer.resblocks.1.mlp.c_fc.bias"]
  state["visual.extra_head.weight"] = np.zeros(3, np.float32)
  with pytest.raises(ValueError) as error:
    convert.convert_state_dict(state, source="openai", model="tiny")
  message = str(error.value)
  assert "missing keys: visual.transformer.resblocks.1.mlp.c_fc.bias" in message
  assert "unexpected keys: visual.extra_head.weight" in message
  assert "\n" not in message


def test_misshaped_key_named_with_shapes(hf_numpy):
  state = dict(hf_numpy)
  state["text_model.encoder.layers.0.mlp.fc2.bias"] = np.zeros(65, np.float32)
  with pytest.raises(ValueError, match=r"mis-shaped keys: text_model\.encoder\.layers\.0\.mlp\."
                                       r"fc2\.bias \(65,\) \(expected \(64,\)\)"):
    convert.convert_state_dict(state, source="hf", model="tiny")


def test_wrong_model_names_the_differing_sizes(openai_numpy):
  with pytest.raises(ValueError, match=r"does not fit model 'vitb32': vision\.width 64 "
                                       r"\(model: 768\), vision\.patch_size 8 \(model: 32\)"):
    convert.convert_state_dict(openai_numpy, source="openai", model="vitb32")


def test_layout_must_match_source(hf_numpy):
  with pytest.raises(ValueError, match="has hf key names but --source is openai; use --source hf"):
    convert.convert_state_dict(hf_numpy, source="openai", model="tiny")


def test_both_layouts_give_identical_params(hf_numpy, openai_numpy):
  from_hf, _ = convert.convert_state_dict(hf_numpy, source="hf", model="tiny")
  from_openai, _ = convert.convert_state_dict(openai_numpy, source="openai", model="tiny")
  jax.tree_util.tree_map(np.testing.assert_array_equal, from_hf, from_openai)
  # Spot-check one mapping by hand: torch's conv weight [w, 3, p, p] becomes [p, p, 3, w].
  conv = hf_numpy["vision_model.embeddings.patch_embedding.weight"]
  np.testing.assert_array_equal(from_hf["visual"]["conv1"][2, 5, 1, 7], conv[7, 1, 2, 5])


def test_logit_bias_is_kept(openai_numpy):
  state = dict(openai_numpy, logit_bias=np.float32(-10.0))
  params, config = convert.convert_state_dict(state, source="open_clip", model="tiny")
  assert config.logit_bias_init == -10.0 and float(params["logit_bias"]) == -10.0


def test_cli_error_is_one_line_and_leaves_nothing(openai_numpy, tmp_path):
  torch = pytest.importorskip("torch")
  state = {k: torch.from_numpy(v) for k, v in openai_numpy.items() if k != "ln_final.bias"}
  state["visual.unknown"] = torch.zeros(2)
  torch.save(state, tmp_path / "bad.pt")
  out = tmp_path / "out"
  result = subprocess.run(
      [sys.executable, "-m", "clip_jax.convert", "--source", "openai", "--model", "tiny",
       "--input", str(tmp_path / "bad.pt"), "--output", str(out)],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
  assert "missing keys: ln_final.bias" in errors[0]
  assert "unexpected keys: visual.unknown" in errors[0]
  assert _leftovers(tmp_path) == ["bad.pt"]


# open_clip's model names, as its src/open_clip/model_configs/*.json spell them.
# open_clip's src/open_clip/model_configs/<name>.json and <name>-quickgelu.json
OPEN_CLIP_BASE_NAMES = {"ViT-B-32": "vitb32", "ViT-B-16": "vitb16", "ViT-L-14": "vitl14",
                        "ViT-L-14-336": "vitl14_336", "RN50": "rn50", "RN101": "rn101",
                        "RN50x4": "rn50x4", "RN50x16": "rn50x16", "RN50x64": "rn50x64"}
# Notes name the matching open_clip model; tiny has none, so tests give it one.
TINY_NAMES = {"ViT-T-8": ("tiny", "gelu"), "ViT-T-8-quickgelu": ("tiny", "quick_gelu")}
TINY_NOTE = ("act gelu assumed (open_clip's default); for a QuickGELU checkpoint such as the "
             "OpenAI or LAION-400M ones pass --model ViT-T-8-quickgelu or --act quick_gelu")


@pytest.fixture
def tiny_open_clip_names(monkeypatch):
  for name, known in TINY_NAMES.items():
    monkeypatch.setitem(configs.OPEN_CLIP_NAMES, name, known)


@pytest.fixture
def tiny_file(openai_numpy, tmp_path):
  safetensors_numpy = pytest.importorskip("safetensors.numpy")
  (tmp_path / "weights").mkdir()
  path = tmp_path / "weights" / "open_clip_model.safetensors"
  safetensors_numpy.save_file(openai_numpy, path)
  return path


def test_open_clip_names_give_variant_and_act():
  expected = {}
  for base, variant in OPEN_CLIP_BASE_NAMES.items():
    expected[base] = (variant, "gelu")
    expected[base + "-quickgelu"] = (variant, "quick_gelu")
  assert OPEN_CLIP_NAMES == expected
  for name, (variant, act) in expected.items():
    assert resolve_model_name(name) == (variant, act)
    assert open_clip_name(variant, act) == name  # the exporter's way back
  assert resolve_model_name("vitb32") == ("vitb32", None)
  assert open_clip_name("tiny", "gelu") is None
  with pytest.raises(ValueError, match=r"unknown model 'ViT-B-32-gelu'; known: .*vitb32.*, or "
                                       r"open_clip's ViT-B-32, ViT-B-32-quickgelu"):
    resolve_model_name("ViT-B-32-gelu")


def test_open_clip_name_is_resolved_to_our_variant(openai_numpy):
  # The tiny weights do not fit ViT-B-32: the error shows which variant the name chose.
  with pytest.raises(ValueError, match=r"does not fit model 'vitb32': vision\.width 64"):
    convert.convert_state_dict(openai_numpy, source="open_clip", model="ViT-B-32-quickgelu")


@pytest.mark.parametrize("source, model, act, hints, expected_act", [
    ("open_clip", "ViT-T-8-quickgelu", None, {}, "quick_gelu"),
    ("open_clip", "ViT-T-8-quickgelu", "quick_gelu", {}, "quick_gelu"),
    ("openai", "ViT-T-8", None, {}, "gelu"),  # the name beats the source's default
    ("open_clip", "ViT-T-8", None, {"act": "gelu"}, "gelu"),
    ("open_clip", "tiny", None, {"act": "quick_gelu"}, "quick_gelu"),  # open_clip_config.json
    ("open_clip", "tiny", "gelu", {}, "gelu"),
])
def test_model_name_sets_the_activation(openai_numpy, tiny_open_clip_names, source, model, act,
                                        hints, expected_act):
  notes = []
  _, config = convert.convert_state_dict(openai_numpy, source=source, model=model, act=act,
                                         hints=hints, notify=notes.append)
  assert (config.name, config.act) == ("tiny", expected_act)
  assert notes == []  # the activation was given, not assumed


def test_open_clip_default_act_is_noted_and_logged(openai_numpy, tiny_open_clip_names, caplog):
  notes = []
  _, config = convert.convert_state_dict(openai_numpy, source="open_clip", model="tiny",
                                         notify=notes.append)
  assert config.act == "gelu"
  assert notes == [TINY_NOTE]
  convert.convert_state_dict(openai_numpy, source="open_clip", model="tiny")  # Python API: logged
  assert notes[0] in caplog.text


def test_model_name_contradicting_the_config_beside_it(openai_numpy, tiny_open_clip_names):
  with pytest.raises(ValueError, match=r"the config beside it says act quick_gelu but --model "
                                       r"ViT-T-8 means gelu; pass --model ViT-T-8-quickgelu"):
    convert.convert_state_dict(openai_numpy, source="open_clip", model="ViT-T-8",
                               hints={"act": "quick_gelu"})


HEADS = {"vision_cfg": {"heads": 4}, "text_cfg": {"heads": 4}}


@pytest.mark.parametrize("args, model_cfg_beside, expected_act, noted", [
    (["--model", "tiny"], None, "gelu", True),
    ([], HEADS, "gelu", True),  # inferred; the open_clip_config.json names no activation
    (["--model", "ViT-T-8-quickgelu"], None, "quick_gelu", False),
    (["--model", "ViT-T-8"], None, "gelu", False),
    (["--model", "tiny", "--act", "quick_gelu"], None, "quick_gelu", False),
    (["--model", "tiny"], dict(HEADS, quick_gelu=True), "quick_gelu", False),
])
def test_cli_open_clip_activation(tiny_file, tiny_open_clip_names, capsys, args, model_cfg_beside,
                                  expected_act, noted):
  if model_cfg_beside is not None:
    (tiny_file.parent / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": model_cfg_beside}))
  out = tiny_file.parent.parent / "out"
  code = convert_main(["--source", "open_clip", "--input", str(tiny_file), "--output", str(out)]
                      + args)
  captured = capsys.readouterr()
  assert code == 0, captured.err
  assert f": model 'tiny', act {expected_act}," in captured.out
  assert params_io.load_params(out)[1].act == expected_act
  notes = [line for line in captured.err.splitlines() if line.startswith("note: ")]
  assert notes == (["note: " + TINY_NOTE] if noted else [])


def test_cli_act_contradicting_model_name_is_one_error_line(tiny_file, capsys):
  out = tiny_file.parent.parent / "out"
  code = convert_main(["--source", "open_clip", "--input", str(tiny_file), "--output", str(out),
                       "--model", "ViT-B-32-quickgelu", "--act", "gelu"])
  assert code == 1
  assert capsys.readouterr().err.splitlines() == [
      "error: --act gelu contradicts --model ViT-B-32-quickgelu, which means act quick_gelu; drop "
      "--act, or pass --model ViT-B-32"]
  assert not out.exists()


def test_load_takes_open_clip_names(tiny_file, tiny_open_clip_names):
  clip = clip_jax.load(tiny_file, source="open_clip", model="ViT-T-8-quickgelu")
  assert (clip.config.name, clip.config.act) == ("tiny", "quick_gelu")


class _NotATensor:
  pass


def test_arbitrary_pickles_are_refused(openai_numpy, tmp_path):
  torch = pytest.importorskip("torch")
  state = {k: torch.from_numpy(v) for k, v in openai_numpy.items()}
  torch.save({"state_dict": state, "extra": _NotATensor()}, tmp_path / "pickled.pt")
  with pytest.raises(ValueError, match="weights_only=True"):
    convert.read_state_dict(tmp_path / "pickled.pt")


def test_failed_write_leaves_nothing(monkeypatch, tiny_params, tmp_path):
  def broken_save(self, *args, **kwargs):
    raise OSError("disk full")

  monkeypatch.setattr(params_io.ocp.StandardCheckpointer, "save", broken_save)
  with pytest.raises(OSError, match="disk full"):
    params_io.save_params(tmp_path / "ckpt", tiny_params, MODEL_CONFIGS["tiny"])
  assert _leftovers(tmp_path) == []


def test_save_load_round_trip_and_overwrite(tiny_params, tmp_path):
  config = MODEL_CONFIGS["tiny"]
  params_io.save_params(tmp_path / "ckpt", tiny_params, config)
  assert sorted(os.listdir(tmp_path / "ckpt")) == ["model_config.json", "params"]
  with pytest.raises(ValueError, match="already exists"):
    params_io.save_params(tmp_path / "ckpt", tiny_params, config)
  restored, restored_config = params_io.load_params(tmp_path / "ckpt")
  assert restored_config == config
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, tiny_params)

  other = jax.tree_util.tree_map(lambda x: x + 1, tiny_params)
  params_io.save_params(tmp_path / "ckpt", other, config, overwrite=True)
  restored, _ = params_io.load_params(tmp_path / "ckpt")
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, other)
  assert _leftovers(tmp_path) == ["ckpt"]


def test_unscanned_config_loads_unscanned_params(tiny_params, tmp_path):
  config = MODEL_CONFIGS["tiny"].replace(scan_layers=False)
  params = unscan_params(tiny_params)
  params_io.save_params(tmp_path / "ckpt", params, config)  # stored scanned
  restored, _ = params_io.load_params(tmp_path / "ckpt")
  assert "resblocks_1" in restored["visual"]["transformer"]
  jax.tree_util.tree_map(np.testing.assert_array_equal, restored, params)


def test_inference_batches_match_one_call(tiny_clip, tiny_params):
  clip, config = tiny_clip, MODEL_CONFIGS["tiny"]
  model = create_model(config)
  images = np.random.default_rng(0).standard_normal((9, 32, 32, 3)).astype(np.float32)
  tokens = random_tokens(6)
  # Reference: the Flax module applied once to everything, features normalised by hand.
  apply = jax.jit(model.apply, static_argnames="method")
  image_ref = np.asarray(apply({"params": tiny_params}, images, method="encode_image"))
  text_ref = np.asarray(apply({"params": tiny_params}, tokens, method="encode_text"))
  np.testing.assert_allclose(clip.encode_image(images), image_ref, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(clip.encode_text(tokens), text_ref, rtol=1e-5, atol=1e-6)
  logits_per_image, logits_per_text = clip(images, tokens)
  unit = lambda x: x / np.linalg.norm(x, axis=-1, keepdims=True)  # noqa: E731
  scale = np.exp(float(tiny_params["logit_scale"]))
  np.testing.assert_allclose(logits_per_image, scale * unit(image_ref) @ unit(text_ref).T,
                             rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(logits_per_text, logits_per_image.T)
  # One image (HWC) and one token row are accepted as a batch of one.
  np.testing.assert_allclose(clip.encode_image(images[0]), image_ref[:1], rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(clip.encode_text(tokens[0]), text_ref[:1], rtol=1e-5, atol=1e-6)
  assert inference._bucket(1, 256) == 1 and inference._bucket(5, 256) == 8
  assert inference._bucket(300, 256) == 256


def test_inference_accepts_texts_and_uint8_images(tiny_clip):
  tokenizer = pytest.importorskip("clip_jax.tokenizer")
  preprocess = pytest.importorskip("clip_jax.preprocess")
  texts = ["a photo of a cat", "a dog"]
  np.testing.assert_array_equal(tiny_clip.encode_text(texts),
                                tiny_clip.encode_text(tokenizer.tokenize(texts)))
  images = np.random.default_rng(0).integers(0, 256, (2, 40, 48, 3), dtype=np.uint8)
  np.testing.assert_array_equal(tiny_clip.encode_image(images),
                                tiny_clip.encode_image(preprocess.preprocess(images, 32)))


def test_bad_inputs_and_paths(tiny_clip, tmp_path):
  with pytest.raises(ValueError, match=r"preprocessed \[N, 32, 32, 3\]"):
    tiny_clip.encode_image(np.zeros((1, 64, 64, 3), np.float32))
  with pytest.raises(ValueError, match=r"integer ids \[N, 77\]"):
    tiny_clip.encode_text(np.zeros((1, 10), np.int32))
  with pytest.raises(ValueError, match="does not exist"):
    clip_jax.load(tmp_path / "nothing")


def test_no_torch_at_import():
  code = ("import sys, clip_jax, clip_jax.convert, clip_jax.inference; "
          "assert 'torch' not in sys.modules, 'torch imported'")
  subprocess.run([sys.executable, "-c", code], cwd=REPO, check=True, timeout=120,
                 env=dict(os.environ, JAX_PLATFORMS="cpu"))
