"""Parity with an independent CLIP: transformers' CLIPModel in PyTorch (float32, CPU).

Random weights are written in each supported format, converted with clip_jax.convert, loaded
with clip_jax.load, and the image/text embeddings and logits compared within 1e-4 (relative).
"""
import shutil

import jax
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors_torch = pytest.importorskip("safetensors.torch")

import clip_jax  # noqa: E402
from clip_jax import convert  # noqa: E402

from test_convert_utils import (SMALL, VITB32, assert_close, hf_clip, hf_outputs,  # noqa: E402
                                hf_state_dict, openai_state_dict, random_images, random_tokens,
                                torchscript_archive)


@pytest.fixture(scope="module")
def small():
  model = hf_clip(SMALL, seed=0)
  images, tokens = random_images(5, SMALL["image_size"], seed=1), random_tokens(7, seed=2)
  return model, images, tokens, hf_outputs(model, images, tokens)


def _check(output_dir, images, tokens, ref, batch_size=256):
  clip = clip_jax.load(output_dir, batch_size=batch_size)
  image_features = clip.encode_image(images)
  text_features = clip.encode_text(tokens)
  logits_per_image, logits_per_text = clip(images, tokens)
  assert_close(image_features, ref["image"], what="image embeddings")
  assert_close(text_features, ref["text"], what="text embeddings")
  assert_close(logits_per_image, ref["logits_per_image"], what="logits_per_image")
  assert_close(logits_per_text, ref["logits_per_text"], what="logits_per_text")
  return clip


def _convert(args, output_dir):
  shutil.rmtree(output_dir, ignore_errors=True)
  assert convert.main(args + ["--output", str(output_dir)]) == 0


def test_reference_is_not_degenerate(small):
  # Guards the tests below: distinct inputs give clearly distinct embeddings and logits.
  _, _, _, ref = small
  for name in ("image", "text"):
    spread = ref[name].std(axis=0).mean() / np.abs(ref[name]).mean()
    assert spread > 0.1, (name, spread)
  assert np.ptp(ref["logits_per_image"]) > 1.0


def test_hf_safetensors_with_config_json(small, tmp_path):
  # save_pretrained writes config.json beside the weights: the architecture (heads included)
  # is inferred without --model, and named after the matching variant.
  model, images, tokens, ref = small
  model.save_pretrained(tmp_path / "hf", safe_serialization=True)
  _convert(["--source", "hf", "--input", str(tmp_path / "hf" / "model.safetensors")],
           tmp_path / "out")
  clip = _check(tmp_path / "out", images, tokens, ref)
  assert clip.config.name == "tiny" and clip.config.act == "quick_gelu"
  # The model dir itself loads too (converted in memory).
  assert_close(clip_jax.load(tmp_path / "hf").encode_image(images), ref["image"])


def test_hf_sharded_checkpoint(small, tmp_path):
  # Large HF models are saved in shards with model.safetensors.index.json naming each
  # tensor's shard: the dir, or the index itself, converts as the single file would.
  model, images, tokens, ref = small
  model.save_pretrained(tmp_path / "hf", safe_serialization=True, max_shard_size="1MB")
  index = tmp_path / "hf" / "model.safetensors.index.json"
  shards = sorted((tmp_path / "hf").glob("model-*.safetensors"))
  assert index.is_file() and len(shards) > 1 and not (tmp_path / "hf" / "model.safetensors").exists()
  _convert(["--source", "hf", "--input", str(tmp_path / "hf")], tmp_path / "out")
  clip = _check(tmp_path / "out", images, tokens, ref)
  assert clip.config.name == "tiny"  # config.json beside the index was read
  assert_close(clip_jax.load(index).encode_text(tokens), ref["text"])
  shards[-1].unlink()
  with pytest.raises(ValueError, match=f"shard {shards[-1].name} .* is missing"):
    convert.convert_file(tmp_path / "hf", source="hf")


def test_hf_bin_with_model_name(small, tmp_path):
  model, images, tokens, ref = small
  torch.save(hf_state_dict(model), tmp_path / "pytorch_model.bin")
  _convert(["--source", "hf", "--input", str(tmp_path / "pytorch_model.bin"), "--model", "tiny"],
           tmp_path / "out")
  # batch_size 2 splits 5 images into 2+2+1 and 7 texts into 2+2+2+1 (padded): same numbers.
  _check(tmp_path / "out", images, tokens, ref, batch_size=2)


def test_openai_layout_torch_save(small, tmp_path):
  model, images, tokens, ref = small
  torch.save(openai_state_dict(hf_state_dict(model)), tmp_path / "ViT-tiny.pt")
  assert not convert._is_torchscript(tmp_path / "ViT-tiny.pt")  # a zip too, but no code/
  _convert(["--source", "openai", "--input", str(tmp_path / "ViT-tiny.pt"), "--model", "tiny"],
           tmp_path / "out")
  _check(tmp_path / "out", images, tokens, ref)


def test_openai_torchscript_archive(small, tmp_path):
  # OpenAI's .pt files are TorchScript archives with metadata buffers beside the weights.
  model, images, tokens, ref = small
  extra = {"input_resolution": torch.tensor(32), "context_length": torch.tensor(77),
           "vocab_size": torch.tensor(49408)}
  torchscript_archive(openai_state_dict(hf_state_dict(model)), tmp_path / "jit.pt", extra)
  assert convert._is_torchscript(tmp_path / "jit.pt")
  _convert(["--source", "openai", "--input", str(tmp_path / "jit.pt"), "--model", "tiny"],
           tmp_path / "out")
  _check(tmp_path / "out", images, tokens, ref)


def test_open_clip_training_checkpoint(small, tmp_path):
  # open_clip's train.py saves {"epoch", "name", "state_dict": {"module." + key}} under DDP.
  model, images, tokens, ref = small
  state = openai_state_dict(hf_state_dict(model))
  state["attn_mask"] = torch.full((77, 77), float("-inf")).triu(1)
  wrapped = {"module." + k: v for k, v in state.items()}
  checkpoint = {"epoch": 3, "name": "run", "state_dict": wrapped}
  torch.save(checkpoint, tmp_path / "epoch_3.pt")
  _convert(["--source", "open_clip", "--input", str(tmp_path / "epoch_3.pt"), "--model", "tiny",
            "--act", "quick_gelu"], tmp_path / "out")
  _check(tmp_path / "out", images, tokens, ref)


def test_wrong_activation_is_visible(small, tmp_path):
  # open_clip's default activation is exact gelu; the quick_gelu reference must then differ,
  # which shows the activation matters and the comparison can fail.
  model, images, tokens, ref = small
  torch.save(openai_state_dict(hf_state_dict(model)), tmp_path / "w.pt")
  _convert(["--source", "open_clip", "--input", str(tmp_path / "w.pt"), "--model", "tiny"],
           tmp_path / "out")
  clip = clip_jax.load(tmp_path / "out")
  assert clip.config.act == "gelu"
  with pytest.raises(AssertionError, match="relative error"):
    assert_close(clip.encode_image(images), ref["image"])


def test_load_file_directly(small, tmp_path):
  model, images, tokens, ref = small
  safetensors_torch.save_file(hf_state_dict(model), tmp_path / "w.safetensors")
  clip = clip_jax.load(tmp_path / "w.safetensors", model="tiny")
  assert_close(clip.encode_image(images), ref["image"], what="image embeddings")
  assert_close(clip.encode_text(tokens), ref["text"], what="text embeddings")


def test_vitb32_full_shape(tmp_path):
  model = hf_clip(VITB32, seed=3)
  images, tokens = random_images(2, 224, seed=4), random_tokens(3, seed=5)
  ref = hf_outputs(model, images, tokens)
  safetensors_torch.save_file(hf_state_dict(model), tmp_path / "model.safetensors")
  del model
  _convert(["--source", "hf", "--input", str(tmp_path / "model.safetensors"), "--model", "vitb32"],
           tmp_path / "out")
  (tmp_path / "model.safetensors").unlink()
  clip = _check(tmp_path / "out", images, tokens, ref)
  assert clip.config.name == "vitb32"
  assert sum(np.size(x) for x in jax.tree_util.tree_leaves(clip.params)) == 151_277_313
