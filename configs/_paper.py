"""The CLIP paper's pre-training recipe (Radford et al. 2021, Table 19/20), shared by the
ViT and ResNet variants: 32 epochs over 400M pairs at a global batch of 32,768, AdamW (b2 0.98,
eps 1e-6, wd 0.2; the ResNets b2 0.999 and eps 1e-8), 2,000 warmup steps then
cosine decay, bfloat16 compute.
"""
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from configs import common  # noqa: E402


def get_config(model: str, learning_rate: float):
  c = common.get_config()
  c.model = model
  c.dtype = "bfloat16"               # f32 params/optimizer state, bf16 matmuls
  c.param_dtype = "float32"
  c.batch_size = 32_768
  c.num_train_examples = 400_000_000
  c.epochs = 32.0                    # total_steps = 32 * 400M / 32768 = 390,625
  c.optimizer.learning_rate = learning_rate
  c.optimizer.b1, c.optimizer.b2, c.optimizer.eps = 0.9, 0.98, 1e-6
  if model.startswith("rn"):  # Table 19: Adam beta2 0.999 and eps 1e-8 for the ResNets
    c.optimizer.b2, c.optimizer.eps = 0.999, 1e-8
  c.optimizer.weight_decay = 0.2
  c.optimizer.schedule = "cosine"
  c.optimizer.warmup_steps = 2000
  # Pods: parameters and optimizer state sharded over every chip (FSDP), batch over the same
  # chips; the chunked ring loss never materialises the 32768 x 32768 logits.
  c.mesh.data, c.mesh.fsdp, c.mesh.tensor = 1, -1, 1
  c.loss_impl = "chunked"
  # Per TPU kind (v4, v5e, v5p, v6e), what the step needs to fit that kind's HBM at this batch
  # (16 GiB a v5e chip, 32 a v6e, 95 a v5p): --config flags without the prefix, applied on
  # such a slice by the trainer and by the preflight (`--dry_run --topology=v5e-256`); a
  # --config flag for the same field wins. Each recipe sets them from the compiler's figures
  # (README "TPU preflight"); `--dry_run --topology=... --fit` finds them for other settings.
  c.data.source = "wds"
  c.data.path = "gs://YOUR_BUCKET/laion400m/{00000..41407}.tar"  # img2dataset shards
  # uint8 batches, normalised inside the step (fused into the patch embedding; the same
  # bfloat16 inputs as normalising on the host, half the bytes of a bfloat16 batch).
  c.data.image_dtype = "uint8"
  c.data.num_workers = 16
  c.log_every = 100
  c.checkpoint_every = 2000
  c.keep_checkpoints = 3
  c.keep_every = 50_000
  c.eval_every = 10_000
  return c
