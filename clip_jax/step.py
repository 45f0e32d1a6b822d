"""The train state and the one jitted train step (both towers, global-batch loss, update).

    mesh = sharding.create_mesh(config)
    state, shardings = create_train_state(config, mesh, jax.random.PRNGKey(config.seed))
    train_step = make_train_step(config, mesh, shardings)
    state, metrics = train_step(state, batch)   # batch: global arrays on batch_sharding(mesh)

The state is built from its abstract shape and initialised by a jitted function whose
outputs are already sharded, so no device or host ever holds a whole large model.
`config.accum_steps > 1` runs exact GradCache accumulation (`make_loss_and_grad`).

BatchNorm (the ResNet image towers): the step normalises with the statistics of the whole
global batch (the model's means run over the global batch axis, whatever the mesh), and the
running averages live in the state (`TrainState.batch_stats`, empty for the ViTs), sharded
by their logical axes, checkpointed and restored with it. Under GradCache the statistics are
those of each micro-batch (a micro-batch is a batch as far as BatchNorm knows): the
embedding pass normalises micro-batch k with its own statistics and updates the running
averages once per micro-batch, in order; the backward pass recomputes micro-batch k with the
same statistics (they depend only on its rows), so the gradient is exact for that
definition. A frozen image tower (LiT) runs in evaluation mode: running statistics used and
left as they are.

Patch dropout (FLIP, `config.patch_dropout` > 0, ViTs): each step draws, per image of the
global batch, the patches it keeps from a key that is a pure function of (config.seed, the
step number), so a resumed run drops exactly the patches the uninterrupted one did, and
GradCache's micro-batches take their rows' subsets of the same draw (accumulated equals
unaccumulated). `config.unmasked_tuning_steps` = N runs the last N steps unmasked (FLIP's
tuning phase): a second compiled step, chosen by the step number (`patch_dropout_at`).

uint8 batches (`config.data.image_dtype="uint8"`) are normalised inside the step with
OpenAI's mean/std, the same multiply-add the input pipeline would have done on the host.

EMA of the weights (`config.ema_decay` > 0, timm's ModelEmaV3): `TrainState.ema` holds
{"params", "batch_stats"} in float32, sharded like the params, checkpointed with the state.
It starts as a copy of the initial weights; after each update to step t,
ema = d * ema + (1 - d) * weights with d = ema_decay, or d = 0 (a copy) while t <
config.ema_start_step. A ResNet's BatchNorm running averages are averaged the same way.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Callable, Optional

import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from clip_jax import sharding as shd
from clip_jax.losses import contrastive_loss
from clip_jax.models.clip import abstract_variables, count_params, create_model, l2_normalize
from clip_jax.models.configs import CLIPConfig, get_model_config
from clip_jax.models.flops import train_flops_per_step
from clip_jax.models.vit import kept_patches, patch_keep_indices
from clip_jax.optim import make_optimizer, make_schedule
from clip_jax.preprocess import uint8_affine

LOGIT_SCALE_MAX = math.log(100.0)
SIGLIP_LOGIT_SCALE_INIT = math.log(10.0)
SIGLIP_LOGIT_BIAS_INIT = -10.0
TOWER_PARAMS = {"image": "visual", "text": "text"}
PATCH_DROPOUT_STREAM = 0x9A7C4  # folded into the seed: the patch-dropout key stream


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  batch_stats: Any = flax.struct.field(default_factory=dict)  # BatchNorm running averages
  ema: Any = flax.struct.field(default_factory=dict)  # {} or {"params", "batch_stats"} (f32)


EMA_DTYPE = jnp.float32


def ema_settings(config) -> tuple[float, int]:
  """(config.ema_decay, config.ema_start_step), checked; decay 0 is off."""
  decay, start = float(config.get("ema_decay", 0.0)), int(config.get("ema_start_step", 0))
  if not 0.0 <= decay < 1.0:
    raise ValueError(f"config.ema_decay={decay} must be in [0, 1) (0: no EMA; e.g. 0.9999)")
  if start < 0:
    raise ValueError(f"config.ema_start_step={start} must be >= 0")
  return decay, start


def _ema_of(tree):
  """The EMA's copy of `tree` (params or batch_stats) in EMA_DTYPE: new arrays, never the
  inputs themselves (jit forwards an unchanged input, and the step donates both)."""
  return jax.tree_util.tree_map(lambda x: jnp.array(x, EMA_DTYPE, copy=True), tree)


def initial_ema(params, batch_stats) -> dict:
  """The EMA at the start: a copy of the weights."""
  return _ema_of({"params": params, "batch_stats": batch_stats})


def abstract_ema(params, batch_stats, param_shardings, stats_shardings):
  """(the EMA's ShapeDtypeStructs, its shardings: those of the weights it averages)."""
  return (jax.eval_shape(initial_ema, params, batch_stats),
          {"params": param_shardings, "batch_stats": stats_shardings})


def update_ema(ema: dict, params, batch_stats, step, decay: float, start_step: int) -> dict:
  """The EMA after the update to `step`: decay * ema + (1 - decay) * weights, a copy before
  start_step."""
  d = jnp.where(step < start_step, 0.0, decay).astype(EMA_DTYPE)
  return jax.tree_util.tree_map(lambda e, x: d * e + (1.0 - d) * jnp.asarray(x, EMA_DTYPE),
                                ema, {"params": params, "batch_stats": batch_stats})


def model_config_from(config) -> CLIPConfig:
  """The model config of a run: config.model plus the run's numerics and loss head."""
  overrides = dict(dtype=config.dtype, param_dtype=config.param_dtype,
                   scan_layers=bool(config.scan_layers), remat_policy=config.remat_policy,
                   attention_impl=config.get("attention_impl", "xla"))
  if config.get("act", None):
    overrides["act"] = config.act
  if config.get("image_size", None):
    overrides["vision"] = {"image_size": int(config.image_size)}
  if config.loss == "sigmoid":
    overrides.update(logit_scale_init=SIGLIP_LOGIT_SCALE_INIT,
                     logit_bias_init=SIGLIP_LOGIT_BIAS_INIT)
  return get_model_config(config.model, **overrides)


@contextlib.contextmanager
def mesh_context(config, mesh: Mesh):
  """The mesh and logical axis rules the model's sharding constraints resolve against."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(shd.logical_axis_rules(config)):
    yield


def validate_patch_dropout(config, model_config: Optional[CLIPConfig] = None) -> None:
  """One-line ValueError for a patch dropout the run cannot use."""
  rate = float(config.get("patch_dropout", 0.0))
  tuning = int(config.get("unmasked_tuning_steps", 0))
  if not 0.0 <= rate < 1.0:
    raise ValueError(f"config.patch_dropout={rate} must be in [0, 1) (the fraction of image "
                     "patches dropped per image in training)")
  if tuning < 0:
    raise ValueError(f"config.unmasked_tuning_steps={tuning} must be >= 0")
  if rate and (model_config or model_config_from(config)).is_resnet:
    raise ValueError(f"config.patch_dropout={rate} applies to ViT image towers; "
                     f"config.model={config.model!r} is a ResNet")


def patch_dropout_at(config, step: int, total_steps: Optional[int] = None) -> float:
  """The patch dropout of the step that starts from state.step == `step`: config.patch_dropout,
  except in the last config.unmasked_tuning_steps steps of `total_steps` (0 there)."""
  rate = float(config.get("patch_dropout", 0.0))
  tuning = int(config.get("unmasked_tuning_steps", 0))
  total = int(config.total_steps if total_steps is None else total_steps)
  return 0.0 if tuning and step >= total - tuning else rate


def patch_dropout_key(seed: int, step):
  """The key of a step's patch choice: a pure function of (seed, step)."""
  key = jax.random.fold_in(jax.random.key(int(seed)), PATCH_DROPOUT_STREAM)
  return jax.random.fold_in(key, step)


def normalize_uint8(images):
  """uint8 [.., 3] pixels -> float32 normalised with OpenAI's mean/std (as the pipeline)."""
  scale, offset = uint8_affine()
  return images.astype(jnp.float32) * jnp.asarray(scale) + jnp.asarray(offset)


def _unbox(tree):
  """Plain values of a boxed tree, without applying sharding constraints."""
  is_box = lambda x: isinstance(x, nn.meta.AxisMetadata)  # noqa: E731
  return jax.tree_util.tree_map(lambda x: x.value if is_box(x) else x, tree, is_leaf=is_box)


def _with_shardings(tree, shardings):
  return jax.tree_util.tree_map(
      lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), tree, shardings)


def abstract_train_state(config, mesh: Mesh):
  """(abstract TrainState of sharded ShapeDtypeStructs, TrainState of NamedShardings)."""
  shd.validate_config(config, num_devices=mesh.devices.size, num_slices=shd.mesh_slices(mesh))
  model = create_model(model_config_from(config))
  boxed_variables = abstract_variables(model)
  rules = shd.logical_axis_rules(config)
  boxed, boxed_stats = boxed_variables["params"], boxed_variables.get("batch_stats", {})
  param_shardings = shd.logical_to_shardings(boxed, mesh, rules)
  params = _unbox(boxed)
  shd.check_fsdp(params, param_shardings, mesh)
  opt_state = jax.eval_shape(make_optimizer(config).init, params)
  opt_shardings = shd.match_shardings(opt_state, params, param_shardings, mesh)
  stats_shardings = shd.logical_to_shardings(boxed_stats, mesh, rules)
  batch_stats = _unbox(boxed_stats)
  ema, ema_shardings = {}, {}
  if ema_settings(config)[0]:
    ema, ema_shardings = abstract_ema(params, batch_stats, param_shardings, stats_shardings)
  shardings = TrainState(step=shd.replicated(mesh), params=param_shardings,
                         opt_state=opt_shardings, batch_stats=stats_shardings, ema=ema_shardings)
  abstract = TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                        opt_state=opt_state, batch_stats=batch_stats, ema=ema)
  return _with_shardings(abstract, shardings), shardings


def _check_params(params, abstract_params_tree):
  """One-line error for initial params whose tree or shapes differ from the model's."""
  want = jax.tree_util.tree_flatten_with_path(abstract_params_tree)[0]
  got = jax.tree_util.tree_flatten_with_path(params)[0]
  want_paths = [jax.tree_util.keystr(p) for p, _ in want]
  got_paths = [jax.tree_util.keystr(p) for p, _ in got]
  if want_paths != got_paths:
    missing = sorted(set(want_paths) - set(got_paths))[:3]
    extra = sorted(set(got_paths) - set(want_paths))[:3]
    raise ValueError(f"initial params do not match the model: missing {missing}, unexpected "
                     f"{extra} (scanned vs unscanned layers? see clip_jax.models.scan_params)")
  for path, (_, w), (_, g) in zip(want_paths, want, got):
    if tuple(w.shape) != tuple(np.shape(g)):
      raise ValueError(f"initial param {path} has shape {tuple(np.shape(g))}, the model "
                       f"expects {tuple(w.shape)}")


def create_train_state(config, mesh: Mesh, rng, params=None, batch_stats=None):
  """(TrainState, shardings): fresh params from `rng`, or `params` (e.g. init_from) placed
  on the mesh, with a new optimizer state. Initialised already sharded.

  batch_stats: BatchNorm running averages to start from (a ResNet's, with `params`; default:
  the fresh ones, means 0 and variances 1).
  """
  abstract, shardings = abstract_train_state(config, mesh)
  model = create_model(model_config_from(config))
  tx = make_optimizer(config)
  with_ema = bool(ema_settings(config)[0])
  if params is None:
    def init(rng):
      images = jnp.zeros((1, model.config.vision.image_size, model.config.vision.image_size, 3))
      tokens = jnp.zeros((1, model.config.text.context_length), jnp.int32)
      variables = _unbox(model.init(rng, images, tokens))
      p, stats = variables["params"], variables.get("batch_stats", {})
      return TrainState(step=jnp.zeros((), jnp.int32), params=p, opt_state=tx.init(p),
                        batch_stats=stats, ema=initial_ema(p, stats) if with_ema else {})
    return jax.jit(init, out_shardings=shardings)(rng), shardings
  params = _unbox(params)
  _check_params(params, abstract.params)
  place = lambda tree, target: jax.tree_util.tree_map(  # noqa: E731
      lambda x, a: jax.device_put(jnp.asarray(x, a.dtype), a.sharding), tree, target)
  params = place(params, abstract.params)
  if batch_stats is None:  # fresh running averages: means 0, variances 1 (as BatchNorm's init)
    batch_stats = jax.tree_util.tree_map_with_path(
        lambda path, a: (np.ones if path[-1].key == "var" else np.zeros)(a.shape, a.dtype),
        abstract.batch_stats)
  else:
    _check_params(batch_stats, abstract.batch_stats)
  batch_stats = place(batch_stats, abstract.batch_stats)
  opt_state = jax.jit(tx.init, out_shardings=shardings.opt_state)(params)
  ema = (jax.jit(initial_ema, out_shardings=shardings.ema)(params, batch_stats)
         if with_ema else {})
  step = jax.device_put(jnp.zeros((), jnp.int32), shardings.step)
  return TrainState(step=step, params=params, opt_state=opt_state,
                    batch_stats=batch_stats, ema=ema), shardings


# ---------------------------------------------------------------------------------------
# loss and gradients
# ---------------------------------------------------------------------------------------


def _constrain(x, mesh: Mesh, spec: P):
  return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, spec))


def make_loss_and_grad(config, mesh: Mesh, param_shardings=None) -> Callable:
  """(params, images, tokens, batch_stats, keep_indices=None) -> (loss, metrics, grads, new
  batch_stats) over the global batch (not jitted). batch_stats: the BatchNorm running
  averages ({} for the ViTs); keep_indices: [B, keep] patches each image keeps (patch
  dropout; None keeps all); uint8 images are normalised first."""
  model = create_model(model_config_from(config))
  freeze = config.optimizer.get("freeze", "")
  accum = int(config.accum_steps)
  loss_kw = dict(loss=config.loss, impl=config.loss_impl, mesh=mesh,
                 chunk_size=int(config.loss_chunk_size))
  rows = P(shd.BATCH_AXES)
  has_batch_norm = model.config.is_resnet
  train_batch_norm = has_batch_norm and freeze != "image"  # a locked (LiT) tower: eval mode

  def embed_image(params, images, batch_stats, keep=None):
    """(normalised features, updated running averages)."""
    variables = {"params": params}
    if has_batch_norm:
      variables["batch_stats"] = batch_stats
    if images.dtype == jnp.uint8:
      images = normalize_uint8(images)
    if train_batch_norm:
      features, updates = model.apply(variables, images, train=True, method="encode_image",
                                      mutable=["batch_stats"])
      batch_stats = updates["batch_stats"]
    else:
      features = model.apply(variables, images, method="encode_image", keep_indices=keep)
    return _constrain(l2_normalize(features), mesh, rows), batch_stats

  def embed_text(params, tokens):
    return _constrain(l2_normalize(model.apply({"params": params}, tokens,
                                               method="encode_text")), mesh, rows)

  def loss_of_features(image_features, text_features, logit_scale, logit_bias):
    return contrastive_loss(image_features, text_features, logit_scale, logit_bias, **loss_kw)

  def constrain_grads(grads):
    if param_shardings is None:
      return grads
    return jax.tree_util.tree_map(jax.lax.with_sharding_constraint, grads, param_shardings)

  def direct(params, images, tokens, batch_stats, keep_indices=None):
    def loss_fn(params):
      if freeze:  # No gradient flows into (or is computed for) the frozen tower.
        key = TOWER_PARAMS[freeze]
        params = dict(params, **{key: jax.lax.stop_gradient(params[key])})
      image_features, new_stats = embed_image(params, images, batch_stats, keep_indices)
      loss, metrics = loss_of_features(image_features, embed_text(params, tokens),
                                       params["logit_scale"], params.get("logit_bias"))
      return loss, (metrics, new_stats)
    (loss, (metrics, new_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(params)
    return loss, metrics, constrain_grads(grads), new_stats

  def gradcache(params, images, tokens, batch_stats, keep_indices=None):
    """Exact accumulation: embed all micro-batches without gradients, take the loss's
    gradient w.r.t. every embedding over the global batch, then backpropagate it through
    each micro-batch in turn (a VJP per micro-batch). BatchNorm: see the module docstring."""
    global_batch = images.shape[0]

    def split(x):  # [B, ...] -> [accum, B/accum, ...]; micro k is rows k, k+accum, ... so
      # every device keeps its own rows and contributes to every micro-batch.
      x = x.reshape(global_batch // accum, accum, *x.shape[1:]).swapaxes(0, 1)
      return _constrain(x, mesh, P(None, shd.BATCH_AXES))

    def merge(x):
      x = x.swapaxes(0, 1).reshape(global_batch, *x.shape[2:])
      return _constrain(x, mesh, rows)

    images_m, tokens_m = split(images), split(tokens)
    # Patch dropout: micro-batch k takes its rows' subsets of the global batch's draw.
    keep_m = None if keep_indices is None else split(keep_indices)

    def embed_micro(stats, xs):  # the running averages move once per micro-batch, in order
      image_features, stats = embed_image(params, xs[0], stats, xs[2])
      return stats, (image_features, embed_text(params, xs[1]))

    new_stats, (image_m, text_m) = jax.lax.scan(embed_micro, batch_stats,
                                                (images_m, tokens_m, keep_m))
    has_bias = "logit_bias" in params
    args = (merge(image_m), merge(text_m), params["logit_scale"],
            params["logit_bias"] if has_bias else None)
    argnums = (0, 1, 2, 3) if has_bias else (0, 1, 2)
    (loss, metrics), feature_grads = jax.value_and_grad(
        loss_of_features, argnums=argnums, has_aux=True)(*args)
    d_image_m, d_text_m = split(feature_grads[0]), split(feature_grads[1])
    trainable = [t for t in ("image", "text") if t != freeze]
    # The recomputation normalises each micro-batch with its own statistics, as the embedding
    # pass did (in training mode the output does not read the running averages).
    embed = {"image": lambda p, x: embed_image(p, x[0], batch_stats, x[1])[0],
             "text": embed_text}

    def backprop_micro(acc, xs):
      inputs = {"image": (xs[0], xs[4]), "text": xs[1]}
      cotangents = {"image": xs[2], "text": xs[3]}
      out = {}
      for tower in trainable:
        key = TOWER_PARAMS[tower]
        _, vjp = jax.vjp(lambda sub: embed[tower](dict(params, **{key: sub}), inputs[tower]),
                         params[key])
        out[key] = jax.tree_util.tree_map(jnp.add, acc[key], vjp(cotangents[tower])[0])
      return out, None

    zeros = jax.tree_util.tree_map(jnp.zeros_like, params)
    zeros = constrain_grads(zeros)
    acc0 = {TOWER_PARAMS[t]: zeros[TOWER_PARAMS[t]] for t in trainable}
    tower_grads, _ = jax.lax.scan(backprop_micro, acc0,
                                  (images_m, tokens_m, d_image_m, d_text_m, keep_m))
    grads = dict(zeros, **tower_grads, logit_scale=feature_grads[2])
    if has_bias:
      grads["logit_bias"] = feature_grads[3]
    return loss, metrics, constrain_grads(grads), new_stats

  return direct if accum == 1 else gradcache


def make_grad_fn(config, mesh: Mesh, param_shardings=None) -> Callable:
  """Jitted (params, batch, batch_stats={}) -> (loss, metrics, grads, new batch_stats); what
  the train step differentiates. batch["keep_indices"] (optional): patch dropout's kept
  patches per image (see `patch_keep_indices`)."""
  fn = make_loss_and_grad(config, mesh, param_shardings)
  jitted = jax.jit(lambda params, batch, stats: fn(params, batch["images"], batch["tokens"],
                                                   stats, batch.get("keep_indices")))

  def grad_fn(params, batch, batch_stats=None):
    inputs = {k: batch[k] for k in ("images", "tokens", "keep_indices") if k in batch}
    with mesh_context(config, mesh):
      return jitted(params, inputs, {} if batch_stats is None else batch_stats)
  return grad_fn


# ---------------------------------------------------------------------------------------
# the step
# ---------------------------------------------------------------------------------------


def make_train_step(config, mesh: Mesh, state_shardings,
                    patch_dropout: Optional[float] = None) -> Callable:
  """train_step(state, batch) -> (new_state, metrics); one jit, the state donated.

  batch: {"images": [B, H, W, 3] float32|bfloat16|uint8, "tokens": [B, 77] int32} global
  arrays on `sharding.batch_sharding(mesh)` (other keys are ignored). Metrics are replicated
  scalars. patch_dropout: this step's (default config.patch_dropout; the keep count is
  static, the choice drawn from `patch_dropout_key(config.seed, state.step)`).
  """
  shd.validate_config(config, num_devices=mesh.devices.size, num_slices=shd.mesh_slices(mesh))
  model_config = model_config_from(config)
  validate_patch_dropout(config, model_config)
  loss_and_grad = make_loss_and_grad(config, mesh, state_shardings.params)
  tx = make_optimizer(config)
  schedule = make_schedule(config)
  rate = float(config.get("patch_dropout", 0.0) if patch_dropout is None else patch_dropout)
  num_patches = 0 if model_config.is_resnet else model_config.vision.grid_size ** 2
  keep = kept_patches(num_patches, rate) if rate else None
  seed = int(config.seed)
  ema_decay, ema_start_step = ema_settings(config)

  log_update_norm = bool(config.get("log_update_norm", False))

  def step_fn(state: TrainState, batch):
    keep_indices = None
    if keep is not None:
      keep_indices = _constrain(
          patch_keep_indices(patch_dropout_key(seed, state.step), batch["images"].shape[0],
                             num_patches, keep), mesh, P(shd.BATCH_AXES))
    loss, metrics, grads, batch_stats = loss_and_grad(state.params, batch["images"],
                                                      batch["tokens"], state.batch_stats,
                                                      keep_indices)
    # The norms read trees that exist anyway (the gradients, the new parameters) behind
    # optimization barriers. Without them XLA shares g*g between the gradient norm and Adam's
    # second moment and writes it out, and the parameter norm recomputes the update: on
    # XLA:CPU the three norms cost 8% of a ViT-B/32 step, with the barriers ~0.
    grad_norm = optax.global_norm(grads)
    grads, grad_norm = jax.lax.optimization_barrier((grads, grad_norm))
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    extra = {}
    if log_update_norm:  # Writes the whole update out on XLA:CPU (~5% of a ViT-B/32 step).
      extra["update_norm"] = optax.global_norm(updates)
    params = optax.apply_updates(state.params, updates)
    # CLIP clamps the temperature so logits never exceed 100.
    params = dict(params, logit_scale=jnp.clip(params["logit_scale"], 0.0, LOGIT_SCALE_MAX))
    params = jax.lax.optimization_barrier(params)
    metrics = dict(metrics, **extra, loss=loss,
                   logit_scale=jnp.exp(state.params["logit_scale"]),
                   grad_norm=grad_norm,
                   param_norm=optax.global_norm(params),
                   learning_rate=schedule(state.step))
    if "logit_bias" in state.params:
      metrics["logit_bias"] = state.params["logit_bias"]
    ema = state.ema
    if ema_decay:
      ema = update_ema(ema, params, batch_stats, state.step + 1, ema_decay, ema_start_step)
    new_state = TrainState(step=state.step + 1, params=params, opt_state=opt_state,
                           batch_stats=batch_stats, ema=ema)
    return new_state, jax.tree_util.tree_map(lambda m: jnp.asarray(m, jnp.float32), metrics)

  batch_shardings = {"images": shd.batch_sharding(mesh), "tokens": shd.batch_sharding(mesh)}
  jitted = jax.jit(step_fn, in_shardings=(state_shardings, batch_shardings),
                   out_shardings=(state_shardings, shd.replicated(mesh)), donate_argnums=0)

  def train_step(state, batch):
    with mesh_context(config, mesh):
      return jitted(state, {"images": batch["images"], "tokens": batch["tokens"]})

  def lower(state, batch):
    with mesh_context(config, mesh):
      return jitted.lower(state, {"images": batch["images"], "tokens": batch["tokens"]})

  train_step.lower = lower
  train_step.patch_dropout = rate
  return train_step


class PhasedTrainStep:
  """train_step(state, batch) for a run with an unmasked tuning phase: the masked step
  (config.patch_dropout) until the last config.unmasked_tuning_steps steps, then the unmasked
  one (compiled when first needed). Counts steps on the host from `start_step`, so a run
  resumed in either phase, or across the switch, takes the step the uninterrupted run took."""

  def __init__(self, config, mesh: Mesh, state_shardings, *, start_step: int,
               total_steps: Optional[int] = None):
    self._config, self._mesh, self._shardings = config, mesh, state_shardings
    self._total = int(config.total_steps if total_steps is None else total_steps)
    self._step = int(start_step)
    self._steps: dict[float, Callable] = {}

  def step_for(self, step: int) -> Callable:
    rate = patch_dropout_at(self._config, step, self._total)
    if rate not in self._steps:
      self._steps[rate] = make_train_step(self._config, self._mesh, self._shardings, rate)
    return self._steps[rate]

  @property
  def patch_dropout(self) -> float:
    """The patch dropout of the next step."""
    return patch_dropout_at(self._config, self._step, self._total)

  def __call__(self, state, batch):
    out = self.step_for(self._step)(state, batch)
    self._step += 1
    return out


# ---------------------------------------------------------------------------------------
# dry run
# ---------------------------------------------------------------------------------------


def abstract_batch(config, mesh: Mesh) -> dict:
  """ShapeDtypeStructs of one global batch on the mesh (nothing allocated)."""
  model_config = model_config_from(config)
  size, batch = model_config.vision.image_size, int(config.batch_size)
  sharding = shd.batch_sharding(mesh)
  image_dtype = jnp.dtype(config.data.get("image_dtype", "float32"))
  return {"images": jax.ShapeDtypeStruct((batch, size, size, 3), image_dtype, sharding=sharding),
          "tokens": jax.ShapeDtypeStruct((batch, model_config.text.context_length), jnp.int32,
                                         sharding=sharding)}


def compile_train_step(config, mesh: Mesh, compiler_options: Optional[dict] = None):
  """The compiled step for abstract state and batch: (compiled, abstract_state)."""
  abstract_state, shardings = abstract_train_state(config, mesh)
  train_step = make_train_step(config, mesh, shardings)
  compiled = train_step.lower(abstract_state, abstract_batch(config, mesh)).compile(
      compiler_options=compiler_options)
  return compiled, abstract_state


def memory_per_device(compiled) -> dict:
  """Bytes per device from XLA's buffer assignment; donated inputs alias their outputs."""
  m = compiled.memory_analysis()
  argument, output = int(m.argument_size_in_bytes), int(m.output_size_in_bytes)
  temp, alias = int(m.temp_size_in_bytes), int(m.alias_size_in_bytes)
  return {"argument": argument, "output": output, "temp": temp,
          "total": argument + output - alias + temp}


def dry_run_report(config, mesh: Optional[Mesh] = None) -> dict:
  """Compiles the step for the configured mesh and global batch; runs and allocates nothing."""
  shd.validate_config(config, num_devices=None if mesh is None else mesh.devices.size)
  mesh = shd.create_mesh(config) if mesh is None else mesh
  compiled, abstract_state = compile_train_step(config, mesh)
  return {
      "dry_run": True,
      "num_params": count_params(abstract_state.params),
      "ema": bool(abstract_state.ema),  # the EMA's float32 copy is in memory_per_device
      "num_devices": int(mesh.devices.size),
      "global_batch": int(config.batch_size),
      "flops_per_step": int(train_flops_per_step(model_config_from(config),
                                                 int(config.batch_size),
                                                 float(config.get("patch_dropout", 0.0)))),
      "memory_per_device": memory_per_device(compiled),
  }
