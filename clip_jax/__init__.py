"""clip_jax: train and evaluate CLIP in JAX/Flax, from one chip to a pod."""
# First, before anything starts a JAX backend: no libtpu start-up on a host without a TPU.
from clip_jax import platforms as _platforms
_platforms.skip_absent_tpu()
from clip_jax.models import CLIP, CLIPConfig, MODEL_CONFIGS, create_model, get_model_config
# Imported eagerly: a lazy attribute named like its submodule would be replaced by the module
# as soon as anything imports clip_jax.preprocess.
from clip_jax.preprocess import preprocess

__version__ = "0.1.0"


def __getattr__(name):
  # Lazy imports keep `import clip_jax` light (no ftfy/orbax unless used).
  if name == "tokenize":
    from clip_jax.tokenizer import tokenize
    return tokenize
  if name == "load":
    from clip_jax.inference import load
    return load
  raise AttributeError(f"module 'clip_jax' has no attribute {name!r}")
