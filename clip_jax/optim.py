"""The optimizer: AdamW with CLIP's defaults, the paper's decay rule, schedules, per-tower rates, LiT.

Parameters fall in three groups by their top-level key: `image` (params["visual"]),
`text` (params["text"]) and `head` (logit_scale, logit_bias). Each group gets its own AdamW
with the learning rate times the group's multiplier; a frozen tower gets
`optax.set_to_zero()` (no update and no optimizer moments).
"""
from __future__ import annotations

import math
import re
from typing import Callable, Optional

import jax
import jax.numpy as jnp
import numpy as np
import optax

# Weight decay (config.optimizer.decay_rule, plus config.optimizer.no_decay):
#   paper:   the CLIP paper's "all weights that are not gains or biases", as open_clip decays:
#            every weight of two or more dimensions (per layer: a scanned stack's layer axis
#            does not count), token and positional embeddings included; never a norm's scale
#            or bias, any bias, a one-dimensional weight (the ViT class embedding), the logit
#            scale or bias.
#   kernels: big_vision's: only the kernels of dense and conv layers (and the patch embedding
#            and projection matrices); no embedding, gain, bias or logit parameter.
DECAY_RULES = ("paper", "kernels")
GAIN_AND_BIAS_NAMES = frozenset({"bias", "scale", "logit_scale", "logit_bias"})
EMBEDDING_NAMES = frozenset({"class_embedding", "positional_embedding", "token_embedding"})
SCANNED_KEY = "resblocks"  # a scanned stack of blocks: its leaves carry a leading layer axis
TOWER_KEYS = {"visual": "image", "text": "text"}
DEFAULT_RSQRT_TIMESCALE = 10_000


def _path_keys(path) -> list[str]:
  return [str(k.key) for k in path if isinstance(k, jax.tree_util.DictKey)]


def _leaf_name(path) -> str:
  keys = _path_keys(path)
  return keys[-1] if keys else ""


def param_path(path) -> str:
  """A leaf's path as the no_decay patterns see it: "text/token_embedding"."""
  return "/".join(_path_keys(path))


def _no_decay_patterns(no_decay) -> list[re.Pattern]:
  if isinstance(no_decay, str):
    no_decay = [p for p in (x.strip() for x in no_decay.split(",")) if p]
  patterns = []
  for pattern in no_decay or ():
    try:
      patterns.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"config.optimizer.no_decay: {pattern!r} is not a regular expression "
                       f"({e})") from None
  return patterns


def _check_rule(rule: str) -> None:
  if rule not in DECAY_RULES:
    raise ValueError(f"config.optimizer.decay_rule={rule!r} is unknown; use "
                     f"{' or '.join(DECAY_RULES)}")


def decay_mask(params, rule: str = "paper", no_decay=()):
  """True for the leaves that get weight decay under `rule` (see DECAY_RULES), except those
  whose path ("visual/transformer/resblocks/attn/qkv/kernel") matches a `no_decay` regex
  (re.search; a list, or one comma-separated string)."""
  _check_rule(rule)
  patterns = _no_decay_patterns(no_decay)

  def decays(path, leaf) -> bool:
    keys, name = _path_keys(path), _leaf_name(path)
    if name in GAIN_AND_BIAS_NAMES:
      decay = False
    elif rule == "paper":
      decay = np.ndim(leaf) - (SCANNED_KEY in keys) >= 2
    else:
      decay = name not in EMBEDDING_NAMES
    return decay and not any(p.search(param_path(path)) for p in patterns)
  return jax.tree_util.tree_map_with_path(decays, params)


def decay_mask_from(config) -> Callable:
  """params -> decay mask, by config.optimizer.decay_rule and config.optimizer.no_decay."""
  opt = config.optimizer
  rule, no_decay = opt.get("decay_rule", "paper"), opt.get("no_decay", "")
  _check_rule(rule)  # a bad rule or pattern raises now, not inside jit
  _no_decay_patterns(no_decay)
  return lambda params: decay_mask(params, rule, no_decay)


def tower_labels(params):
  """"image" / "text" / "head" for every leaf, by its top-level key."""
  def label(path, _):
    top = path[0].key if path and isinstance(path[0], jax.tree_util.DictKey) else None
    return TOWER_KEYS.get(top, "head")
  return jax.tree_util.tree_map_with_path(label, params)


def schedule_value(step, *, schedule: str, learning_rate: float, warmup_steps: int = 0,
                   total_steps: Optional[int] = None, end_lr_factor: float = 0.0,
                   cooldown_steps: int = 0, rsqrt_timescale: int = DEFAULT_RSQRT_TIMESCALE):
  """The learning rate at `step` (int or int array): linear warmup from 0, then `schedule`.

  cosine / linear decay from `learning_rate` to `learning_rate * end_lr_factor` at
  `total_steps`; constant holds; rsqrt is lr / sqrt(1 + (step - warmup) / timescale).
  constant and rsqrt may end with a linear cooldown to the end value over the last
  `cooldown_steps`.

  Steps are int32, as the train state's and optax's counts: every step count up to
  2**31 - 1 works. The distances from the warmup end and to the last step are taken in
  int32, exactly, before they become float32 fractions, so the schedule is the learning rate
  at the warmup end and the end value at total_steps (float32 cannot tell a step near 2**31
  from its neighbours).
  """
  step = jnp.asarray(step, jnp.int32)
  lr, end = float(learning_rate), float(learning_rate) * float(end_lr_factor)
  after_warmup = jnp.maximum(step - warmup_steps, 0)
  if schedule in ("cosine", "linear"):
    if cooldown_steps:
      raise ValueError(f"optimizer.cooldown_steps={cooldown_steps} only applies to constant and "
                       f"rsqrt schedules; {schedule} already decays")
    t = _fraction(after_warmup, total_steps - warmup_steps)
    shape = 0.5 * (1.0 + jnp.cos(math.pi * t)) if schedule == "cosine" else 1.0 - t
    value = lr * shape + end * (1.0 - shape)  # exactly lr at t = 0 and end at t = 1
  elif schedule == "constant":
    value = jnp.full(step.shape, lr, jnp.float32)
  elif schedule == "rsqrt":
    value = lr * jax.lax.rsqrt(1.0 + after_warmup.astype(jnp.float32) / rsqrt_timescale)
  else:
    raise ValueError(f"optimizer.schedule={schedule!r} is unknown; use cosine, linear, constant "
                     "or rsqrt")
  if cooldown_steps:
    left = _fraction(total_steps - step, cooldown_steps)
    value = value * left + end * (1.0 - left)
  if warmup_steps:
    value = jnp.where(step < warmup_steps, lr * (step.astype(jnp.float32) / warmup_steps), value)
  return value


def _fraction(steps, of_steps: int):
  """int32 `steps` / `of_steps` as float32, clipped to [0, 1]."""
  return jnp.clip(steps.astype(jnp.float32) / max(of_steps, 1), 0.0, 1.0)


def epoch_samples(config) -> Optional[int]:
  """The samples of one epoch, for schedules and logging: config.data.samples_per_epoch (a
  virtual epoch: an endless mixture, resampled shards, a size not known), else
  config.num_train_examples, else None."""
  data = config.get("data", None)
  virtual = data.get("samples_per_epoch", None) if data is not None else None
  return int(virtual) if virtual else config.get("num_train_examples", None)


def epoch_size_fields(config) -> str:
  """The config fields epoch_samples read, as an error message names them."""
  data = config.get("data", None)
  if data is not None and data.get("samples_per_epoch", None):
    return "config.data.samples_per_epoch"
  return "config.num_train_examples"


def total_steps_from(config) -> Optional[int]:
  """config.total_steps, else ceil(epochs * epoch_samples / batch_size), else None."""
  if config.get("total_steps", None):
    return int(config.total_steps)
  if config.get("epochs", None) and epoch_samples(config):
    return int(math.ceil(config.epochs * epoch_samples(config) / config.batch_size))
  return None


def make_schedule(config, total_steps: Optional[int] = None) -> Callable:
  """step -> learning rate from `config.optimizer` (see `schedule_value`)."""
  opt = config.optimizer
  total_steps = total_steps or total_steps_from(config)
  needs_total = opt.schedule in ("cosine", "linear") or opt.get("cooldown_steps", 0)
  if needs_total and not total_steps:
    raise ValueError(f"optimizer.schedule={opt.schedule!r} needs config.total_steps (or epochs "
                     "and num_train_examples or data.samples_per_epoch)")
  kwargs = dict(schedule=opt.schedule, learning_rate=opt.learning_rate,
                warmup_steps=int(opt.warmup_steps), total_steps=total_steps,
                end_lr_factor=opt.get("end_lr_factor", 0.0),
                cooldown_steps=int(opt.get("cooldown_steps", 0)),
                rsqrt_timescale=int(opt.get("rsqrt_timescale", DEFAULT_RSQRT_TIMESCALE)))
  schedule_value(0, **kwargs)  # Raises now, not inside jit, for a bad schedule.
  return lambda step: schedule_value(step, **kwargs)


def make_optimizer(config, total_steps: Optional[int] = None) -> optax.GradientTransformation:
  """AdamW (decay masked) per tower group, optional global-norm clipping, frozen tower."""
  opt = config.optimizer
  schedule = make_schedule(config, total_steps)
  freeze = opt.get("freeze", "")
  if freeze not in ("", "image", "text"):
    raise ValueError(f"optimizer.freeze={freeze!r} is unknown; use '', 'image' or 'text'")

  mask = decay_mask_from(config)

  def adamw(mult: float):
    return optax.adamw(lambda step: schedule(step) * mult, b1=opt.b1, b2=opt.b2, eps=opt.eps,
                       weight_decay=opt.weight_decay, mask=mask)

  transforms = {"image": adamw(opt.get("image_lr_mult", 1.0)),
                "text": adamw(opt.get("text_lr_mult", 1.0)),
                "head": adamw(1.0)}
  if freeze:
    transforms[freeze] = optax.set_to_zero()
  tx = optax.multi_transform(transforms, tower_labels)
  if opt.get("grad_clip_norm", 0.0):
    tx = optax.chain(optax.clip_by_global_norm(opt.grad_clip_norm), tx)
  return tx
