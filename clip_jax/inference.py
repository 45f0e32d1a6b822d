"""Inference with a converted or trained CLIP: `clip_jax.load(path)`.

Example (after `python -m clip_jax.convert --source openai --input ViT-B-32.pt --output /ckpt/b32`):

  import clip_jax
  import jax

  clip = clip_jax.load("/ckpt/b32")
  image_features = clip.encode_image(["cat.jpg", "dog.jpg"])    # [2, 512], not normalised
  text_features = clip.encode_text(["a photo of a cat", "a photo of a dog"])
  logits_per_image, logits_per_text = clip(["cat.jpg"], ["a photo of a cat", "a photo of a dog"])
  probs = jax.nn.softmax(logits_per_image, axis=-1)             # [[p_cat, p_dog]]

`encode_image` takes preprocessed float NHWC arrays as they are, and runs PIL images, uint8
arrays or file paths through `clip_jax.preprocess`; `encode_text` takes int token ids
[N, context_length] or strings (tokenized with `clip_jax.tokenize`). Calls are jitted and
batched; results are float32 numpy arrays.

The on-disk format of a converted checkpoint is `clip_jax.params_io`'s; trainer checkpoints
are read by `clip_jax.checkpoint.restore_params`, other weights by `clip_jax.convert`.
"""
from __future__ import annotations

import pathlib
from typing import Any, Optional

from etils import epath
import jax
import jax.numpy as jnp
import numpy as np

from clip_jax import checkpoint, convert
from clip_jax.models import CLIPConfig, create_model, model_variables
from clip_jax.params_io import is_converted_dir

def _bucket(n: int, batch_size: int) -> int:
  """Padded batch size for n items: a power of two up to `batch_size`, so few shapes compile."""
  return min(batch_size, 1 << max(0, n - 1).bit_length())


class CLIPInference:
  """A CLIP model with its parameters: `encode_image`, `encode_text` and `__call__`.

  Mirrors openai/CLIP's model: encoders return projected, un-normalised features;
  `clip(images, tokens)` returns (logits_per_image, logits_per_text).
  """

  def __init__(self, model, params, config: CLIPConfig, batch_size: int = 256):
    if batch_size < 1:
      raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    self.model = model
    self.config = config
    # On the device once: host (numpy) params would be copied over at every call.
    self.params = jax.device_put(params, jax.local_devices()[0])
    self.batch_size = batch_size

    def encode_image(params, images):
      return model.apply(model_variables(params), images, method="encode_image")

    def encode_text(params, tokens):
      return model.apply(model_variables(params), tokens, method="encode_text")

    # jax.jit caches one executable per input shape; batches are padded to few shapes.
    self._encode_image = jax.jit(encode_image)
    self._encode_text = jax.jit(encode_text)

  def __repr__(self):
    return f"CLIPInference(model={self.config.name!r}, batch_size={self.batch_size})"

  @property
  def image_size(self) -> int:
    return self.config.vision.image_size

  @property
  def context_length(self) -> int:
    return self.config.text.context_length

  @property
  def logit_scale(self) -> float:
    """The (exponentiated) temperature multiplying cosine similarities."""
    return float(np.exp(np.asarray(self.params["logit_scale"], np.float32)))

  def _run_batched(self, fn, inputs: np.ndarray) -> np.ndarray:
    outputs = []
    for start in range(0, inputs.shape[0], self.batch_size):
      chunk = inputs[start:start + self.batch_size]
      n = chunk.shape[0]
      padded = _bucket(n, self.batch_size)
      if padded > n:
        pad = np.zeros((padded - n,) + chunk.shape[1:], chunk.dtype)
        chunk = np.concatenate([chunk, pad])
      outputs.append((fn(self.params, chunk), n))  # dispatch all batches before fetching any
    if not outputs:
      return np.zeros((0, self.config.embed_dim), np.float32)
    return np.concatenate([np.asarray(out, np.float32)[:n] for out, n in outputs])

  def image_inputs(self, images) -> np.ndarray:
    """Float32 NHWC model inputs from float arrays (as they are) or images (preprocessed)."""
    if isinstance(images, (np.ndarray, jax.Array)) and jnp.issubdtype(images.dtype, jnp.floating):
      images = np.asarray(images, np.float32)
      if images.ndim == 3:
        images = images[None]
      size = self.image_size
      if images.ndim != 4 or images.shape[1:] != (size, size, 3):
        raise ValueError(f"float images must be preprocessed [N, {size}, {size}, 3] arrays, "
                         f"got shape {images.shape}; pass uint8 arrays, PIL images or paths to "
                         "have them preprocessed")
      return images
    from clip_jax.preprocess import preprocess  # pylint: disable=import-outside-toplevel
    return np.asarray(preprocess(images, self.image_size), np.float32)

  def text_inputs(self, tokens_or_texts) -> np.ndarray:
    """Int32 [N, context_length] token ids from ids (as they are) or strings (tokenized)."""
    if isinstance(tokens_or_texts, str) or (
        isinstance(tokens_or_texts, (list, tuple)) and tokens_or_texts
        and all(isinstance(t, str) for t in tokens_or_texts)):
      from clip_jax.tokenizer import tokenize  # pylint: disable=import-outside-toplevel
      return np.asarray(tokenize(tokens_or_texts, context_length=self.context_length), np.int32)
    tokens = np.asarray(tokens_or_texts)
    if tokens.ndim == 1:
      tokens = tokens[None]
    if (tokens.ndim != 2 or tokens.shape[1] != self.context_length
        or not np.issubdtype(tokens.dtype, np.integer)):
      raise ValueError(f"tokens must be integer ids [N, {self.context_length}] or strings, got "
                       f"{tokens.dtype} array of shape {tokens.shape}")
    return tokens.astype(np.int32)

  def encode_image(self, images) -> np.ndarray:
    """Projected image features [N, embed_dim], float32, not normalised."""
    return self._run_batched(self._encode_image, self.image_inputs(images))

  def encode_text(self, tokens_or_texts) -> np.ndarray:
    """Projected text features [N, embed_dim], float32, not normalised."""
    return self._run_batched(self._encode_text, self.text_inputs(tokens_or_texts))

  def __call__(self, images, tokens_or_texts):
    """(logits_per_image [N_images, N_texts], logits_per_text [N_texts, N_images])."""
    image_features = self.encode_image(images)
    text_features = self.encode_text(tokens_or_texts)
    image_features /= np.linalg.norm(image_features, axis=-1, keepdims=True)
    text_features /= np.linalg.norm(text_features, axis=-1, keepdims=True)
    logits_per_image = self.logit_scale * image_features @ text_features.T
    if "logit_bias" in self.params:
      logits_per_image = logits_per_image + np.float32(np.asarray(self.params["logit_bias"]))
    return logits_per_image, logits_per_image.T


def load(path, *, batch_size: int = 256, dtype: Optional[str] = None, weights: str = "auto",
         **convert_kwargs: Any) -> CLIPInference:
  """Loads a CLIP for inference from a pretrained name (`openai:ViT-B/32`,
  `open_clip:ViT-B-32/laion2b_s34b_b79k`, `hf-hub:ORG/REPO`, `local-dir:PATH`: downloaded and
  converted once, see clip_jax.pretrained), a converted dir, a trainer workdir or step dir, or
  PyTorch/safetensors weights (a file or a Hugging Face model dir, converted in memory;
  `convert_kwargs` go to `clip_jax.convert.convert_file`, e.g. source="open_clip", act="gelu").

  `dtype` overrides the compute dtype (e.g. "bfloat16" on TPU); parameters keep theirs.
  `weights`: of a trainer checkpoint kept with an EMA (config.ema_decay), "auto" (default)
  and "ema" load the EMA weights, "params" the trained ones (see
  `clip_jax.checkpoint.restore_params`).
  """
  from clip_jax import pretrained, storage  # pylint: disable=g-import-not-at-top
  if pretrained.is_name(path):  # openai:NAME, open_clip:ARCH/TAG, hf-hub:ORG/REPO, local-dir:
    path = pretrained.resolve(path)
  remote = storage.is_remote(path)  # gs://: a converted dir or a trainer workdir/step dir
  path = epath.Path(path) if remote else pathlib.Path(path)
  to_convert = not remote and (path.is_file() or (
      path.is_dir() and not is_converted_dir(path) and convert.weights_in_dir(path) is not None))
  if convert_kwargs and not to_convert:
    raise ValueError(f"{sorted(convert_kwargs)} only apply when loading PyTorch or safetensors "
                     f"weights, and {path} holds none")
  checkpoint.check_weights(weights)
  if to_convert and weights == "ema":
    raise ValueError(f"{path} holds one set of PyTorch/safetensors weights (no EMA); "
                     "weights='ema' needs a training checkpoint of a run with config.ema_decay")
  if is_converted_dir(path) or (path.is_dir() and not to_convert):
    params, config = checkpoint.restore_params(path, weights)
  elif to_convert:
    params, config = convert.convert_file(path, **convert_kwargs)
  else:
    raise ValueError(f"{path} does not exist; pass a converted checkpoint dir, a trainer "
                     "workdir or step dir, a Hugging Face model dir or a .pt/.bin/.safetensors "
                     "file")
  if dtype is not None:
    config = config.replace(dtype=dtype)
  return CLIPInference(create_model(config), params, config, batch_size=batch_size)
