"""The exporter (clip_jax.export): inverse key maps, bit-identical round trips through every
format, a trained checkpoint served by transformers' CLIPModel, the tokenizer files, errors and
atomicity.

open_clip itself is not installed here (it needs torchvision): its layout is checked by key
names and shapes against the importer's, and by reading the export back with clip_jax.convert.
"""
import json
import os
import pathlib
import subprocess
import sys

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import clip_jax  # noqa: E402
from clip_jax import convert, export, params_io  # noqa: E402
from clip_jax.models import MODEL_CONFIGS, unscan_params  # noqa: E402

from test_convert_utils import (SMALL, assert_close, hf_clip, hf_state_dict,  # noqa: E402
                                openai_state_dict, random_images, random_tokens)

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
CAPTIONS = ["a photo of a cat", "Two dogs, playing in the snow!", "naïve café", "x"]


def _numpy(state: dict) -> dict:
  return {k: v.numpy() for k, v in state.items()}


def _assert_same_tensors(actual: dict, expected: dict) -> None:
  assert sorted(actual) == sorted(expected)
  for key in expected:
    a, e = np.asarray(actual[key]), np.asarray(expected[key])
    assert a.shape == e.shape and a.dtype == e.dtype, (key, a.shape, e.shape, a.dtype, e.dtype)
    np.testing.assert_array_equal(a, e, err_msg=key)


def _without_ignored(state: dict) -> dict:
  """Without the buffers that are no parameters (HF position ids, BatchNorm's counter)."""
  return {k: v for k, v in state.items()
          if not k.endswith(("position_ids", "num_batches_tracked"))}


@pytest.fixture(scope="module")
def hf_model():
  return hf_clip(SMALL, seed=0)


@pytest.fixture(scope="module")
def tiny_dir(hf_model, tmp_path_factory):
  """The random HF model converted in: a clip_jax model dir (model tiny)."""
  params, config = convert.convert_state_dict(_numpy(hf_state_dict(hf_model)), source="hf",
                                              model="tiny")
  directory = tmp_path_factory.mktemp("tiny") / "model"
  params_io.save_params(directory, params, config)
  return directory


@pytest.fixture(scope="module")
def rn_state():
  from test_resnet import reference_clip  # pylint: disable=import-outside-toplevel
  state, _, _ = reference_clip("tiny_rn", seed=0)
  return _numpy(state)


def _run(argv, capsys):
  code = export.main([str(a) for a in argv])
  out, err = capsys.readouterr()
  return code, out, err


# ------------------------------------------------------------------------------ inverse maps

def test_inverse_maps_undo_the_forward_ones(hf_model, rn_state):
  hf_state = _without_ignored(_numpy(hf_state_dict(hf_model)))
  _assert_same_tensors(convert.openai_to_hf(convert.hf_to_openai(hf_state)), hf_state)
  vit_state = _numpy(openai_state_dict(hf_state_dict(hf_model)))
  for state, name in ((vit_state, "tiny"), (rn_state, "tiny_rn")):
    config = MODEL_CONFIGS[name]
    back = convert.params_to_openai(convert.openai_to_params(state, config), config)
    _assert_same_tensors(_without_ignored(back), _without_ignored(state))


@pytest.mark.parametrize("name", ["vitb32", "vitl14_336"])
def test_hf_config_builds_the_model_of_every_key(name):
  config = MODEL_CONFIGS[name]
  with torch.device("meta"):  # shapes only, nothing allocated
    model = transformers.CLIPModel(transformers.CLIPConfig(**export.hf_config(config, "float32")))
  shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
  assert _without_ignored(shapes) == convert.expected_shapes(config, "hf")


# ------------------------------------------------------------------------------ round trips

@pytest.mark.parametrize("scan", [True, False])
def test_hf_round_trip_is_bit_identical(hf_model, tiny_dir, tmp_path, capsys, scan):
  source = tiny_dir
  if not scan:  # a checkpoint of an unscanned model reads the same
    params, config = params_io.load_params(tiny_dir)
    source = tmp_path / "unscanned"
    params_io.save_params(source, params, config.replace(scan_layers=False))
  out = tmp_path / "hf"
  code, stdout, err = _run(["--checkpoint", source, "--format", "hf", "--output", out], capsys)
  assert code == 0, err
  assert "CLIPModel.from_pretrained" in stdout
  model, info = transformers.CLIPModel.from_pretrained(out, output_loading_info=True)
  assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys")), info
  _assert_same_tensors(_numpy(model.state_dict()), _numpy(hf_state_dict(hf_model)))
  assert model.config.vision_config.hidden_act == "quick_gelu"


def test_bfloat16_export_and_bfloat16_params(tiny_dir, tmp_path, capsys):
  from safetensors.torch import load_file  # pylint: disable=import-outside-toplevel
  params, config = params_io.load_params(tiny_dir)
  want = convert.params_to_openai(jax.tree.map(np.asarray, params), config)
  code, _, err = _run(["--checkpoint", tiny_dir, "--format", "open_clip", "--dtype", "bfloat16",
                       "--output", tmp_path / "oc"], capsys)
  assert code == 0, err
  exported = load_file(tmp_path / "oc" / export.OPEN_CLIP_WEIGHTS)
  rounded = {k: torch.from_numpy(np.array(v, np.float32)).to(torch.bfloat16)
             for k, v in want.items()}
  for key, value in rounded.items():
    assert exported[key].dtype == torch.bfloat16, key
    assert torch.equal(exported[key], value.reshape(exported[key].shape)), key
  # A model stored in bfloat16 exports its values exactly, in float32 by default.
  bf16 = jax.tree.map(lambda x: np.asarray(x, jax.numpy.bfloat16), params)
  params_io.save_params(tmp_path / "bf16", bf16, config.replace(param_dtype="bfloat16"))
  code, _, err = _run(["--checkpoint", tmp_path / "bf16", "--format", "open_clip",
                       "--output", tmp_path / "oc32"], capsys)
  assert code == 0, err
  exported = load_file(tmp_path / "oc32" / export.OPEN_CLIP_WEIGHTS)
  for key, value in rounded.items():
    assert exported[key].dtype == torch.float32, key
    assert torch.equal(exported[key], value.float().reshape(exported[key].shape)), key


def _assert_params_equal(actual, expected):
  jax.tree.map(np.testing.assert_array_equal, unscan_params(jax.tree.map(np.asarray, actual)),
               unscan_params(jax.tree.map(np.asarray, expected)))


def test_open_clip_layout_round_trip(tiny_dir, tmp_path, capsys):
  out = tmp_path / "oc"
  code, stdout, err = _run(["--checkpoint", tiny_dir, "--format", "open_clip", "--pt",
                            "--output", out], capsys)
  assert code == 0, err
  assert "no built-in model name for 'tiny'" in stdout  # open_clip has no tiny model
  params, config = params_io.load_params(tiny_dir)
  for name in (export.OPEN_CLIP_WEIGHTS, export.OPEN_CLIP_PT):
    state = convert.read_state_dict(out / name)
    assert {k: v.shape for k, v in state.items()} == convert.expected_shapes(config, "openai")
    back, back_config = convert.convert_file(out / name, source="open_clip", model="tiny")
    _assert_params_equal(back, params)
    assert back_config.act == "quick_gelu"  # from the open_clip_config.json beside it
  model_cfg = json.loads((out / export.OPEN_CLIP_CONFIG).read_text())["model_cfg"]
  assert model_cfg["quick_gelu"] and model_cfg["vision_cfg"]["head_width"] == 16
  # Without --model the heads come from open_clip's vision head_width (16 here, so 4 heads,
  # not the 1 that a 64-wide head would give) and the text heads beside it.
  back, back_config = convert.convert_file(out / export.OPEN_CLIP_WEIGHTS, source="open_clip")
  assert (back_config.vision.heads, back_config.text.heads) == (4, 4) == (
      config.vision.heads, config.text.heads)
  _assert_params_equal(back, params)


def test_open_clip_name_is_printed_for_a_known_variant():
  config = MODEL_CONFIGS["vitb32"]
  assert export.open_clip_model_name(config) == "ViT-B-32-quickgelu"
  assert export.open_clip_model_name(config.replace(act="gelu")) == "ViT-B-32"
  assert export.open_clip_model_name(MODEL_CONFIGS["rn50"]) == "RN50-quickgelu"
  assert export.open_clip_model_name(config.replace(logit_bias_init=-10.0)) is None
  assert "create_model('ViT-B-32-quickgelu', pretrained='o/open_clip_model.safetensors')" in \
      export.how_to_load("o", config, "open_clip")


def test_resnet_open_clip_round_trip_keeps_batchnorm_statistics(rn_state, tmp_path, capsys):
  params, config = convert.convert_state_dict(rn_state, source="openai", model="tiny_rn")
  params_io.save_params(tmp_path / "rn", params, config)
  out = tmp_path / "oc"
  code, stdout, err = _run(["--checkpoint", tmp_path / "rn", "--format", "open_clip",
                            "--output", out], capsys)
  assert code == 0, err
  state = convert.read_state_dict(out / export.OPEN_CLIP_WEIGHTS)
  np.testing.assert_array_equal(state["visual.layer1.0.bn2.running_var"],
                                rn_state["visual.layer1.0.bn2.running_var"])
  assert int(state["visual.bn1.num_batches_tracked"]) == 0  # strict torch loading wants it
  _assert_same_tensors(_without_ignored(state), _without_ignored(rn_state))
  back, _ = convert.convert_file(out / export.OPEN_CLIP_WEIGHTS, source="open_clip",
                                 model="tiny_rn")
  _assert_params_equal(back, params)


def test_openai_layout_round_trip(tmp_path, capsys):
  # OpenAI's clip.load reads heads as width / 64: a model it can express.
  hf = hf_clip(dict(SMALL, vision_heads=1, text_heads=1), seed=4)
  params, config = convert.convert_state_dict(_numpy(hf_state_dict(hf)), source="hf")
  params_io.save_params(tmp_path / "model", params, config)
  out = tmp_path / "openai"
  code, stdout, err = _run(["--checkpoint", tmp_path / "model", "--format", "openai",
                            "--output", out], capsys)
  assert code == 0, err
  assert "clip.load(" in stdout
  state = torch.load(out / export.OPENAI_WEIGHTS, weights_only=True)
  assert {k: tuple(v.shape) for k, v in state.items()} == convert.expected_shapes(config,
                                                                                  "openai")
  _assert_same_tensors(_numpy(state), _numpy(openai_state_dict(hf_state_dict(hf))))
  back, back_config = convert.convert_file(out / export.OPENAI_WEIGHTS, source="openai")
  _assert_params_equal(back, params)
  assert back_config.vision == config.vision and back_config.text == config.text


# ------------------------------------------------------------------------------ Hugging Face use

def test_processor_tokenizes_like_clip_jax(tiny_dir, tmp_path, capsys):
  out = tmp_path / "hf"
  assert _run(["--checkpoint", tiny_dir, "--format", "hf", "--output", out], capsys)[0] == 0
  processor = transformers.CLIPProcessor.from_pretrained(out)
  ours = clip_jax.tokenize(CAPTIONS)
  for caption, row in zip(CAPTIONS, ours):
    ids = processor.tokenizer(caption)["input_ids"]
    assert ids == [int(i) for i in row[:len(ids)]] and int(row[len(ids) - 1]) == 49407, caption
  image = np.random.default_rng(0).integers(0, 255, (40, 50, 3), np.uint8)
  pixels = processor(images=image, return_tensors="np")["pixel_values"]
  assert pixels.shape == (1, 3, 32, 32)


def test_trained_checkpoint_served_by_transformers(tmp_path, capsys):
  from configs import tiny  # pylint: disable=import-outside-toplevel
  from clip_jax import train as train_lib  # pylint: disable=import-outside-toplevel
  config = tiny.get_config()
  with config.unlocked():
    config.total_steps, config.checkpoint_every, config.eval_every = 2, 2, -1
  workdir = tmp_path / "run"
  train_lib.train(config, str(workdir))
  out = tmp_path / "hf"
  code, _, err = _run(["--checkpoint", workdir, "--format", "hf", "--output", out], capsys)
  assert code == 0, err
  clip = clip_jax.load(workdir)
  images, tokens = random_images(3, 32, seed=5), random_tokens(4, seed=6)
  model = transformers.CLIPModel.from_pretrained(out).eval()
  with torch.no_grad():
    pixels = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
    image = model.get_image_features(pixel_values=pixels)
    text = model.get_text_features(input_ids=torch.from_numpy(tokens.astype(np.int64)))
  image, text = (getattr(x, "pooler_output", x).numpy() for x in (image, text))
  assert_close(image, clip.encode_image(images), what="image features")
  assert_close(text, clip.encode_text(tokens), what="text features")


# ------------------------------------------------------------------------------ errors

def test_unreadable_checkpoint_is_one_error_line(tmp_path):
  (tmp_path / "empty").mkdir()
  result = subprocess.run(
      [sys.executable, "-m", "clip_jax.export", "--checkpoint", str(tmp_path / "empty"),
       "--format", "hf", "--output", str(tmp_path / "out")],
      cwd=REPO, capture_output=True, text=True, timeout=120,
      env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert result.returncode == 1
  errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
  assert len(errors) == 1 and "Traceback" not in result.stderr, result.stderr
  assert "cannot read --checkpoint" in errors[0] and "no complete checkpoint" in errors[0]
  assert sorted(p.name for p in tmp_path.iterdir()) == ["empty"]


def test_formats_that_cannot_express_the_model(rn_state, tiny_dir, tmp_path, capsys):
  params, config = convert.convert_state_dict(rn_state, source="openai", model="tiny_rn")
  params_io.save_params(tmp_path / "rn", params, config)
  code, _, err = _run(["--checkpoint", tmp_path / "rn", "--format", "hf", "--output",
                       tmp_path / "out"], capsys)
  assert code == 1 and err.count("\n") == 1 and "Hugging Face has no CLIP ResNet" in err
  params, config = params_io.load_params(tiny_dir)
  params = dict(params, logit_bias=np.float32(-10.0))
  params_io.save_params(tmp_path / "siglip", params, config.replace(logit_bias_init=-10.0))
  code, _, err = _run(["--checkpoint", tmp_path / "siglip", "--format", "openai", "--output",
                       tmp_path / "out"], capsys)
  assert code == 1 and err.count("\n") == 1, err
  assert "logit bias" in err and "4 text heads" in err
  assert sorted(p.name for p in tmp_path.iterdir()) == ["rn", "siglip"]
  # open_clip keeps the bias (its SigLIP models have one).
  code, _, err = _run(["--checkpoint", tmp_path / "siglip", "--format", "open_clip", "--output",
                       tmp_path / "oc"], capsys)
  assert code == 0, err
  assert convert.read_state_dict(tmp_path / "oc" / export.OPEN_CLIP_WEIGHTS)["logit_bias"] == -10
  model_cfg = json.loads((tmp_path / "oc" / export.OPEN_CLIP_CONFIG).read_text())["model_cfg"]
  assert model_cfg["init_logit_bias"] == -10.0


def test_failed_write_leaves_nothing_and_overwrite_replaces(tiny_dir, tmp_path, capsys,
                                                             monkeypatch):
  out = tmp_path / "hf"
  with monkeypatch.context() as patch:
    def broken(*args, **kwargs):
      raise OSError("disk full")
    patch.setattr(export, "write_hf_tokenizer", broken)
    with pytest.raises(OSError, match="disk full"):
      export.export(tiny_dir, out, fmt="hf")
  assert list(tmp_path.iterdir()) == []
  assert _run(["--checkpoint", tiny_dir, "--format", "hf", "--output", out], capsys)[0] == 0
  code, _, err = _run(["--checkpoint", tiny_dir, "--format", "hf", "--output", out], capsys)
  assert code == 1 and "already exists" in err and "--overwrite" in err
  (out / "stale").write_text("")
  assert _run(["--checkpoint", tiny_dir, "--format", "hf", "--output", out, "--overwrite"],
              capsys)[0] == 0
  assert not (out / "stale").exists() and (out / export.HF_WEIGHTS).is_file()
  assert sorted(p.name for p in tmp_path.iterdir()) == ["hf"]
