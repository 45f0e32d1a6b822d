"""Throughput and MFU of the real train step (clip_jax.step), optionally beside a PyTorch peer.

  python benchmarks/train_step.py --model vitb32 --batch 16 --steps 10 --threads 2 --peer torch

Synthetic batches already on the device; one device. The last line printed is one JSON
object: samples_per_s, step_time_s (median), compile_s, flops_per_step (analytic, see
clip_jax.models.flops), achieved_tflops, mfu and peak_tflops. On CPU the peak is a jitted
float32 matmul measured in the same run; on GPU/TPU it is the chip's published bf16 peak.

`--peer torch` builds the same architecture in PyTorch (transformers' CLIPModel, quick_gelu,
AdamW with the same hyper-parameters, the same symmetric contrastive loss, float32) and
times it alternately with ours, `--block` steps at a time, so both see the same machine
load; the line then carries peer_samples_per_s and ratio (clip_jax / peer). Both sides are
pinned to the same `--threads` cores. `--patch_dropout 0.5` (FLIP) drops that fraction of
each image's patches in our step (config.patch_dropout) and in the peer's (a hook on its
patch embeddings keeping a random subset per image); flops_per_step then counts the kept
tokens. `--malloc_retain` restarts the script with glibc
settings that stop per-step page faults of XLA's fresh CPU buffers (see MALLOC_RETAIN_ENV).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

# Runnable as a script from anywhere: the repo root holds clip_jax/ and configs/.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

PEAK_MATMUL_SIZE = 2048  # CPU peak: a jitted n^3 float32 matmul timed in the same rounds
# glibc settings read at process start: large blocks from one never-trimmed heap, not mmap.
# XLA's CPU runtime allocates each step's temporaries afresh; with mmap'd blocks every step
# page-faults and zeroes them again (ViT-B/32, batch 16: ~2.5 GB, ~1.2 s of kernel time).
MALLOC_RETAIN_ENV = {"MALLOC_MMAP_MAX_": "0", "MALLOC_TRIM_THRESHOLD_": str(1 << 40),
                     "MALLOC_ARENA_MAX": "1"}


MODELS = ("vitb32", "vitb16", "vitl14", "vitl14_336", "rn50", "rn101", "rn50x4", "rn50x16",
          "rn50x64", "tiny", "tiny_rn")  # clip_jax.models.MODEL_CONFIGS (tests check)


def build_parser(description: str = __doc__.split("\n")[0]) -> argparse.ArgumentParser:
  p = argparse.ArgumentParser(description=description)
  p.add_argument("--model", default="vitb32", choices=MODELS)
  p.add_argument("--batch", type=int, default=16)
  p.add_argument("--steps", type=int, default=10,
                 help="timed rounds (after warm-up); each times --block steps of each side")
  p.add_argument("--warmup", type=int, default=2, help="untimed steps after compilation")
  p.add_argument("--block", type=int, default=2,
                 help="consecutive steps per timing (each side), so work a step does after its "
                      "outputs are ready lands in the same timing")
  p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
  p.add_argument("--loss_impl", default="global", choices=("global", "chunked"))
  p.add_argument("--attention_impl", default="auto", choices=("auto", "xla", "cudnn"),
                 help="auto: cudnn on a GPU in bfloat16, else xla")
  p.add_argument("--remat_policy", default=None,
                 help="default: the model's recipe (configs/MODEL.py), 'none' for tiny")
  p.add_argument("--scan_layers", dest="scan_layers", action="store_true", default=True)
  p.add_argument("--noscan_layers", dest="scan_layers", action="store_false")
  p.add_argument("--xla_option", action="append", default=[], metavar="NAME=VALUE",
                 help="an XLA compiler option for our step (e.g. xla_gpu_enable_triton_gemm="
                      "false); repeatable")
  p.add_argument("--threads", type=int, default=0,
                 help="CPU cores both sides are pinned to (0: all of this process's cores)")
  p.add_argument("--peer", default="", choices=("", "torch"))
  p.add_argument("--patch_dropout", type=float, default=0.0,
                 help="FLIP: fraction of image patches dropped per image (ViTs), both sides")
  p.add_argument("--malloc_retain", action="store_true",
                 help="re-run under MALLOC_RETAIN_ENV (both sides: they share the process)")
  return p


def parse_args(argv=None):
  return build_parser().parse_args(argv)


def reexec_with_malloc_retain() -> None:
  """Restarts this script with MALLOC_RETAIN_ENV (glibc reads it only at start-up)."""
  if all(os.environ.get(k) == v for k, v in MALLOC_RETAIN_ENV.items()):
    return
  os.execve(sys.executable, [sys.executable, os.path.abspath(__file__), *sys.argv[1:]],
            dict(os.environ, **MALLOC_RETAIN_ENV))


def pin_threads(threads: int) -> int:
  """Pins this process (XLA's and torch's pools size themselves from it) to `threads` cores."""
  cores = sorted(os.sched_getaffinity(0))
  if threads <= 0:
    return len(cores)
  if threads > len(cores):
    raise ValueError(f"--threads={threads} exceeds the {len(cores)} cores this process may use")
  os.sched_setaffinity(0, cores[:threads])
  return threads


# ---------------------------------------------------------------------------------------
# ours
# ---------------------------------------------------------------------------------------


def recipe_remat_policy(model: str) -> str:
  """The remat policy of the model's training recipe (configs/MODEL.py), else the default."""
  import importlib
  try:
    recipe = importlib.import_module(f"configs.{model}").get_config()
  except ModuleNotFoundError:
    from configs.common import get_config
    recipe = get_config()
  return recipe.remat_policy


def run_config(args):
  from configs.common import get_config
  c = get_config()
  if args.remat_policy is None:
    args.remat_policy = recipe_remat_policy(args.model)
  c.model, c.batch_size, c.total_steps = args.model, args.batch, 1000
  c.mesh = {"data": -1, "fsdp": 1, "tensor": 1}
  c.dtype, c.loss_impl, c.attention_impl = args.dtype, args.loss_impl, args.attention_impl
  c.remat_policy, c.scan_layers = args.remat_policy, args.scan_layers
  c.optimizer.warmup_steps = 10
  c.patch_dropout = args.patch_dropout
  return c


def compiler_options(pairs) -> dict:
  """["name=value", ...] -> {name: value} with true/false and integers typed."""
  options = {}
  for pair in pairs or ():
    name, sep, value = pair.partition("=")
    if not sep or not name:
      raise ValueError(f"--xla_option {pair!r}: expected NAME=VALUE")
    lowered = value.lower()
    options[name] = (lowered == "true" if lowered in ("true", "false") else
                     int(value) if value.lstrip("-").isdigit() else value)
  return options


def synthetic_tokens(rng, batch: int, context: int, vocab: int):
  """Random ids, an end-of-text token (the largest id) at a random position, zeros after."""
  import numpy as np
  tokens = rng.integers(1, vocab - 2, size=(batch, context), dtype=np.int64)
  tokens[:, 0] = vocab - 2  # start of text
  ends = rng.integers(2, context, size=batch)
  for i, e in enumerate(ends):
    tokens[i, e] = vocab - 1
    tokens[i, e + 1:] = 0
  return tokens


def build_ours(args):
  """(step() running one train step to completion, compile seconds, model config)."""
  import jax
  import jax.numpy as jnp
  import numpy as np
  from clip_jax import sharding as shd
  from clip_jax import step as st

  config = run_config(args)
  mesh = shd.create_mesh(config, devices=jax.devices()[:1])
  model_config = st.model_config_from(config)
  state, shardings = st.create_train_state(config, mesh, jax.random.PRNGKey(0))
  train_step = st.make_train_step(config, mesh, shardings)
  rng = np.random.default_rng(0)
  size = model_config.vision.image_size
  image_dtype = jnp.bfloat16 if args.dtype == "bfloat16" else jnp.float32
  images = rng.standard_normal((args.batch, size, size, 3), dtype=np.float32)
  tokens = synthetic_tokens(rng, args.batch, model_config.text.context_length,
                            model_config.text.vocab_size).astype(np.int32)
  batch = {"images": jax.device_put(jnp.asarray(images, image_dtype), shd.batch_sharding(mesh)),
           "tokens": jax.device_put(jnp.asarray(tokens), shd.batch_sharding(mesh))}
  start = time.perf_counter()
  compiled = train_step.lower(state, batch).compile(
      compiler_options=compiler_options(args.xla_option) or None)
  compile_s = time.perf_counter() - start
  holder = {"state": state}

  def step():
    holder["state"], metrics = compiled(holder["state"], batch)
    return float(metrics["loss"])  # Waits for the step and fetches one scalar, as a trainer would.

  step.compiled = compiled  # benchmarks/step_profile.py reads its HLO

  return step, compile_s, model_config, (images, tokens)


def measure_peak_sample(n: int = PEAK_MATMUL_SIZE):
  """A closure timing one jitted n^3 float32 matmul (seconds); its FLOPs are 2 n^3."""
  import jax
  import jax.numpy as jnp
  a = jax.random.normal(jax.random.PRNGKey(1), (n, n), jnp.float32)
  b = jax.random.normal(jax.random.PRNGKey(2), (n, n), jnp.float32)
  matmul = jax.jit(lambda a, b: a @ b)
  matmul(a, b).block_until_ready()

  def sample():
    start = time.perf_counter()
    matmul(a, b).block_until_ready()
    return time.perf_counter() - start
  return sample, 2 * n ** 3


def accelerator_peak_tflops():
  import jax
  kind = jax.devices()[0].device_kind
  from clip_jax.metrics import peak_flops_per_device  # the trainer's table of chip peaks
  peak = peak_flops_per_device(kind)
  return (None if peak is None else peak / 1e12), kind


# ---------------------------------------------------------------------------------------
# the PyTorch peer
# ---------------------------------------------------------------------------------------


def build_peer(model_config, batch_size: int, images, tokens, threads: int,
               patch_dropout: float = 0.0):
  """One train step of transformers' CLIPModel with the same shapes, loss and AdamW; with
  patch_dropout, each image keeps a random subset of its patch tokens (and the class token)
  after the patch and position embeddings, as open_clip's PatchDropout does."""
  import torch
  import torch.nn.functional as F
  from transformers import CLIPConfig as HFConfig
  from transformers import CLIPModel

  torch.set_num_threads(threads)
  torch.manual_seed(0)
  v, t = model_config.vision, model_config.text
  hf = HFConfig(
      text_config=dict(vocab_size=t.vocab_size, hidden_size=t.width,
                       intermediate_size=int(t.width * t.mlp_ratio), num_hidden_layers=t.layers,
                       num_attention_heads=t.heads, max_position_embeddings=t.context_length,
                       hidden_act=model_config.act, layer_norm_eps=model_config.ln_eps,
                       eos_token_id=t.vocab_size - 1, bos_token_id=t.vocab_size - 2),
      vision_config=dict(hidden_size=v.width, intermediate_size=int(v.width * v.mlp_ratio),
                         num_hidden_layers=v.layers, num_attention_heads=v.heads,
                         image_size=v.image_size, patch_size=v.patch_size,
                         hidden_act=model_config.act, layer_norm_eps=model_config.ln_eps),
      projection_dim=model_config.embed_dim)
  model = CLIPModel(hf).train()
  if patch_dropout:
    from clip_jax.models.vit import kept_patches
    keep = kept_patches(v.grid_size ** 2, patch_dropout)

    def drop_patches(_, __, tokens):  # [B, 1 + patches, D] -> [B, 1 + keep, D]
      b, n = tokens.shape[0], tokens.shape[1] - 1
      kept = torch.rand(b, n).argsort(dim=1)[:, :keep].sort(dim=1).values + 1
      rows = torch.cat([torch.zeros(b, 1, dtype=kept.dtype), kept], dim=1)
      return tokens.gather(1, rows[:, :, None].expand(-1, -1, tokens.shape[2]))

    model.vision_model.embeddings.register_forward_hook(drop_patches)
  decay = [p for n, p in model.named_parameters() if p.ndim >= 2 and "embedding" not in n]
  no_decay = [p for n, p in model.named_parameters() if not (p.ndim >= 2 and "embedding" not in n)]
  opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.2},
                           {"params": no_decay, "weight_decay": 0.0}],
                          lr=5e-4, betas=(0.9, 0.98), eps=1e-6)
  pixel_values = torch.from_numpy(images).permute(0, 3, 1, 2).contiguous()
  input_ids = torch.from_numpy(tokens.astype("int64"))
  labels = torch.arange(batch_size)

  def step():
    out = model(input_ids=input_ids, pixel_values=pixel_values)
    logits = out.logits_per_image
    loss = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss.item()

  return step


# ---------------------------------------------------------------------------------------


# Pause before each timed block: some of a step's work goes on for up to ~0.2 s after its
# outputs are ready (we believe XLA:CPU freeing its temporaries); without the pause it slows
# whatever is timed next (the first 2048^3 matmul after a ViT-B/32 step ran at half speed).
SETTLE_S = 0.3


def timed(fn, block: int = 1):
  """Seconds per call of `block` back-to-back calls, after a settling pause."""
  time.sleep(SETTLE_S)
  start = time.perf_counter()
  for _ in range(block):
    fn()
  return (time.perf_counter() - start) / block


def main(argv=None):
  args = parse_args(argv)
  if args.peer and args.model.startswith(("rn", "tiny_rn")):
    sys.exit(f"error: --peer {args.peer} builds transformers' CLIPModel, which has no ResNet "
             f"image tower; time --model {args.model} alone")
  if args.malloc_retain:
    reexec_with_malloc_retain()
  result, _ = run(args, pin_threads(args.threads))
  print(json.dumps(result), flush=True)
  return result


def run(args, threads: int):
  """(the JSON result, our step()) for parsed `args`; step.compiled is the compiled step."""
  import jax
  from clip_jax.models.flops import train_flops_per_step
  from clip_jax.models.layers import resolve_attention_impl

  step, compile_s, model_config, (images, tokens) = build_ours(args)
  on_cpu = jax.devices()[0].platform == "cpu"
  peak_sample = peak_flops = None
  if on_cpu:
    peak_sample, peak_flops = measure_peak_sample()
  peer_step = None
  if args.peer == "torch":
    peer_step = build_peer(model_config, args.batch, images, tokens, threads,
                           args.patch_dropout)

  for _ in range(args.warmup):
    step()
    if peer_step:
      peer_step()
  # Interleaved rounds: each round times the peak matmul, `block` steps of ours and `block`
  # of the peer's, each after a pause (SETTLE_S).
  ours, peer, peak = [], [], []
  for _ in range(args.steps):
    if peak_sample:
      time.sleep(SETTLE_S)
      peak.append(peak_sample())
    ours.append(timed(step, args.block))
    if peer_step:
      peer.append(timed(peer_step, args.block))

  step_time = statistics.median(ours)
  flops = train_flops_per_step(model_config, args.batch, args.patch_dropout)
  achieved = flops / step_time / 1e12
  if on_cpu:
    peak_tflops, device = peak_flops / statistics.median(peak) / 1e12, "cpu"
  else:
    peak_tflops, device = accelerator_peak_tflops()
  result = {
      "model": args.model, "batch": args.batch, "steps": args.steps, "block": args.block,
      "dtype": args.dtype,
      "loss_impl": args.loss_impl, "attention_impl": args.attention_impl,
      "attention_kernel": resolve_attention_impl(args.attention_impl, args.dtype),
      "remat_policy": args.remat_policy, "xla_options": compiler_options(args.xla_option),
      "scan_layers": args.scan_layers, "patch_dropout": args.patch_dropout,
      "threads": threads, "device": device,
      "samples_per_s": round(args.batch / step_time, 3),
      "step_time_s": round(step_time, 4),
      "compile_s": round(compile_s, 2),
      "flops_per_step": flops,
      "achieved_tflops": round(achieved, 4),
      "peak_tflops": None if peak_tflops is None else round(peak_tflops, 4),
      "mfu": None if peak_tflops is None else round(achieved / peak_tflops, 4),
      "load_avg_1m": round(os.getloadavg()[0], 2),
      "malloc_retain": all(os.environ.get(k) == v for k, v in MALLOC_RETAIN_ENV.items()),
  }
  if peer_step:
    peer_time = statistics.median(peer)
    result.update(peer="torch", peer_samples_per_s=round(args.batch / peer_time, 3),
                  peer_step_time_s=round(peer_time, 4),
                  peer_mfu=None if peak_tflops is None else round(
                      flops / peer_time / 1e12 / peak_tflops, 4),
                  ratio=round(peer_time / step_time, 3),
                  # Per-round ratios: robust to load changing between rounds.
                  ratio_median_of_rounds=round(statistics.median(
                      p / o for p, o in zip(peer, ours)), 3))
  return result, step


if __name__ == "__main__":
  main()
