"""Shared defaults of every clip_jax run. Variant configs start from `get_config()` here.

Field names other tools rely on: batch_size (global), total_steps (or epochs), seed, mesh,
loss, loss_impl, accum_steps, dtype, data.source, data.path, log_every, checkpoint_every,
eval_every, init_from.
"""
import ml_collections
from ml_collections import config_dict


def get_config() -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.model = "vitb32"                 # a name of clip_jax.models.MODEL_CONFIGS
  c.image_size = config_dict.placeholder(int)  # None: the model's own resolution
  c.act = config_dict.placeholder(str)         # None: the model's own (quick_gelu)
  c.dtype = "float32"                # compute dtype: float32 | bfloat16
  c.param_dtype = "float32"          # parameters and optimizer state
  c.scan_layers = True
  c.remat_policy = "none"            # none | full | dots | dots_no_batch | save_attn_out
  c.attention_impl = "auto"          # auto (cudnn on a GPU in bf16/f16, else xla) | xla | cudnn
  # FLIP patch dropout (ViTs): the fraction of image patches each training image drops, drawn
  # from (seed, step); evaluation and inference keep every patch. 0.5 halves the image tower.
  c.patch_dropout = 0.0
  c.unmasked_tuning_steps = 0        # the last N steps run with patch_dropout 0 (FLIP's tuning)

  c.seed = 0
  c.batch_size = 256                 # global batch, over all hosts and devices
  c.total_steps = config_dict.placeholder(int)  # or derive from epochs * num_train_examples
  c.epochs = config_dict.placeholder(float)
  c.num_train_examples = config_dict.placeholder(int)

  # Device mesh: axis -> size, -1 fills the remaining devices. dcn_mesh: across slices.
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "tensor": 1})
  c.dcn_mesh = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1})
  c.logical_axis_rules = config_dict.placeholder(tuple)  # None: clip_jax.sharding defaults
  # Per TPU kind, overrides applied on that kind of slice (by the trainer and the preflight,
  # `--dry_run --topology=...`), as --config flags without the prefix, e.g.
  # "remat_policy=full accum_steps=2". A field also set by a --config flag keeps the flag's.
  c.slice_overrides = ml_collections.ConfigDict({"v4": "", "v5e": "", "v5p": "", "v6e": ""})

  c.loss = "softmax"                 # softmax (CLIP) | sigmoid (SigLIP)
  c.loss_impl = "global"             # global | chunked
  c.loss_chunk_size = 0              # chunked on one device: columns per block (0: auto)
  c.accum_steps = 1                  # >1: exact GradCache accumulation

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.learning_rate = 5e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.98
  c.optimizer.eps = 1e-6
  c.optimizer.weight_decay = 0.2     # decoupled (AdamW), on the leaves decay_rule picks:
  c.optimizer.decay_rule = "paper"   # paper: every weight of >= 2 dims but gains and biases
                                     # (embeddings included, as open_clip) | kernels (big_vision)
  c.optimizer.no_decay = ""          # comma-separated regexes over param paths also exempted,
                                     # e.g. "token_embedding,positional_embedding"
  c.optimizer.grad_clip_norm = 0.0   # 0: no clipping
  c.optimizer.schedule = "cosine"    # cosine | linear | constant | rsqrt
  c.optimizer.warmup_steps = 2000
  c.optimizer.cooldown_steps = 0     # rsqrt: linear cooldown at the end
  c.optimizer.end_lr_factor = 0.0    # final lr = learning_rate * end_lr_factor
  c.optimizer.image_lr_mult = 1.0
  c.optimizer.text_lr_mult = 1.0
  c.optimizer.freeze = ""            # "" | image | text  (LiT: freeze the image tower)

  # EMA of the weights (timm's ModelEmaV3): 0 off, else e.g. 0.9999; a float32 copy in the
  # train state, checkpointed; evaluate/load/export/init_from take it by default (--weights).
  c.ema_decay = 0.0
  c.ema_start_step = 0               # the EMA copies the weights until this step

  c.data = ml_collections.ConfigDict()
  c.data.source = "synthetic"        # synthetic | tfds | wds | csv | files | mix
  c.data.path = ""                   # wds shards/{00000..00127}.tar, csv file(s), files folder;
  #                                    mix: "KIND:PATH::KIND:PATH..." (clip_jax.data.mixture)
  c.data.mix_weights = ""            # mix: relative weights "W1::W2..." (default equal)
  c.data.mix_names = ""              # mix: metric names "N1::N2..." (default the kinds)
  c.data.caption_keys = "txt"        # wds/files: "txt::recap.txt", "json:caption::json:recap";
  #                                    csv: column names (clip_jax.data.captions)
  c.data.caption_probs = ""          # the keys' relative probabilities "P1::P2..." (default equal)
  c.data.samples_per_epoch = config_dict.placeholder(int)  # epoch length for schedules/logging
  c.data.name = ""                   # tfds dataset name
  c.data.split = "train"
  c.data.data_dir = config_dict.placeholder(str)
  c.data.num_workers = 0             # grain worker processes per host (0: in-process)
  c.data.shuffle_buffer = 10_000
  c.data.resample_shards = False     # wds: endless stream, shards drawn with replacement
  c.data.min_scale = 0.9             # RandomResizedCrop scale range
  c.data.max_scale = 1.0
  c.data.image_dtype = "float32"     # float32 | bfloat16 | uint8 (normalised inside the step)
  c.data.num_threads = 16            # decode threads per process (synthetic/tfds reads)
  c.data.cycle_length = 4            # wds: shards interleaved at once per worker
  c.data.prefetch_batches = 2        # num_workers=0: batches prepared ahead in a thread
  c.data.csv_image_key = "filepath"  # csv: the image path column (open_clip's default)
  c.data.csv_caption_key = "title"   # csv: the caption column
  c.data.csv_separator = "\t"        # csv: the field separator (open_clip: tab)

  c.log_every = 50
  c.log_update_norm = False          # also log update_norm, the norm of each step's update
                                     # (costs ~5% of a ViT-B/32 step on XLA:CPU)
  c.checkpoint_every = 1000
  c.keep_checkpoints = 3             # keep the last K ...
  c.keep_every = 0                   # ... and every M-th step (0: none)
  c.eval_every = 1000
  c.evals = ml_collections.ConfigDict()  # name -> evaluator config (see clip_jax.evaluate)
  c.init_from = ""                   # a converted or trained checkpoint dir
  c.init_towers = "both"             # both | image | text
  c.init_weights = "auto"            # auto (the EMA if init_from has one) | ema | params
  c.wandb = ml_collections.ConfigDict({"project": "", "entity": "", "name": ""})

  # Trainer (clip_jax.train): console and safety knobs.
  c.progress_bar = True              # tqdm bar on process 0 (a plain line per log when False)
  c.profile_start_step = 10          # first step of a JAX profiler trace (--profile)
  c.profile_steps = 0                # >0: trace that many steps into WORKDIR/profile
  c.debug_nan_at_step = 0            # >0: poison that step's batch with NaN (tests the NaN stop)
  # JAX's persistent compilation cache (a local dir or gs://...; "" off): a resumed or
  # restarted run loads its compiled step instead of compiling it again (and on a GPU,
  # XLA's autotuning results).
  c.compilation_cache_dir = ""
  # Cloud Storage (gs://) and other object stores: timeouts on every platform (clip_jax.storage).
  c.storage = ml_collections.ConfigDict({
      "low_speed_time_s": 60,        # tensorstore (Orbax's arrays): a transfer below ...
      "low_speed_limit_bytes": 256,  # ... this many bytes/s for that long is cut off and retried
      "read_timeout_s": 60.0,        # gcsfs: a read waiting this long for data fails and retries
      "connect_timeout_s": 30.0,     # gcsfs: opening a connection
      "min_rewrite_interval_s": 2.0,  # metrics.jsonl/events on gs://: least time between rewrites
      "save_wait_s": 120.0,          # a save waits this long for the one before it, else skipped
      "save_timeout_s": 900.0,       # the last checkpoint save of a run: error if not done by then
  })
  return c
