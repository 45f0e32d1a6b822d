r"""Trains CLIP: `python -m clip_jax.train --config=configs/NAME.py --workdir=DIR`.

  python -m clip_jax.train --config=configs/demo.py --workdir=runs/demo
  python -m clip_jax.train --config=configs/vitl14.py --workdir=gs://bucket/run \
      --config.batch_size=4096 --config.data.path='gs://bucket/shards/{00000..41407}.tar'
  python -m clip_jax.train --config=configs/vitb32.py --dry_run   # compile only, one JSON line
  python -m clip_jax.train --config=configs/vitl14.py --dry_run --topology=v5e-256  # for a TPU

Run the same command on every host of a pod. A workdir with checkpoints resumes from the
latest one (onto any mesh). SIGTERM (preemption) saves the current step and exits 0.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging as pylogging
import math
import os
import re
import signal
import sys
import threading
import time
from typing import Any, Optional

from absl import app, flags, logging
from etils import epath
import jax
import jax.numpy as jnp
import ml_collections
from ml_collections import config_flags
import numpy as np

from clip_jax import storage
from clip_jax import distributed  # also defines --coordinator_address/--num_processes/--process_id
from clip_jax.profiling import StepProfiler

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, events.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step, print one JSON line of "
                             "parameter count, FLOPs and per-device memory, and exit.")
_TOPOLOGY = flags.DEFINE_string(
    "topology", None, "With --dry_run: compile the step for this TPU slice on this host (an "
    "accelerator type: v5e-256, v5litepod-256, v4-128, v5p-128, v6e-256; or a topology: "
    "v5e:16x16, v4:4x4x8) and report its HBM per chip; needs pip install 'clip_jax[tpu]'. "
    "Exit 0: fits; 4: does not fit; 2: a user error.")
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "With --topology: slices joined over DCN "
                                   "(set config.dcn_mesh to match).")
_FIT = flags.DEFINE_bool("fit", False, "With --topology: search the cheapest overrides (remat "
                         "policy, then accum_steps) that make the step fit, printed as "
                         "--config flags in fit_overrides.")
_PROFILE = flags.DEFINE_bool("profile", False, "Write a JAX profiler trace of config."
                             "profile_steps steps (5 when unset) from config.profile_start_step "
                             "into WORKDIR/profile.")

INIT_TOWERS = ("both", "image", "text")
NAN_EXIT_CODE = 3
SAVE_FAILED_EXIT_CODE = 5  # the run's last checkpoint could not be saved (storage)
# The longest run: TrainState.step and optax's step counts are int32.
MAX_STEPS = int(np.iinfo(np.int32).max)

# Set by SIGTERM (a preemption notice): the loop saves the current step and exits 0.
_PREEMPTED = threading.Event()


class NonFiniteLossError(RuntimeError):
  """A step produced a NaN/inf loss or gradient: the run stops before saving it."""


class SetupError(ValueError):
  """A user error found while setting the run up (config, data, checkpoints, init_from)."""


# ----------------------------------------------------------------------------------------------
# Config: resolve and validate before anything compiles.
# ----------------------------------------------------------------------------------------------
def _flat_keys(config: ml_collections.ConfigDict, prefix: str = "") -> set[str]:
  keys = set()
  for key, value in config.items():
    path = f"{prefix}{key}"
    if isinstance(value, ml_collections.ConfigDict) and key not in ("evals",):
      keys |= _flat_keys(value, path + ".")
    else:
      keys.add(path)
  return keys


def resolve_total_steps(config) -> int:
  """config.total_steps, or epochs * (data.samples_per_epoch or num_train_examples) /
  batch_size (rounded up)."""
  from clip_jax import optim  # pylint: disable=g-import-not-at-top
  total_steps = optim.total_steps_from(config)
  if total_steps is None:
    raise ValueError("set config.total_steps, or config.epochs and the epoch's size "
                     "(config.num_train_examples, or config.data.samples_per_epoch)")
  return total_steps


def _validate_step_counts(config) -> None:
  """total_steps positive; it, warmup and cooldown within the int32 step of the state."""
  from clip_jax import optim  # pylint: disable=g-import-not-at-top
  total_steps = resolve_total_steps(config)
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps} must be positive (config.total_steps or "
                     f"config.epochs * {optim.epoch_size_fields(config)} / config.batch_size)")
  too_many = f"exceeds {MAX_STEPS}, the largest step the train state holds (int32)"
  if total_steps > MAX_STEPS:
    if config.total_steps is not None:
      raise ValueError(f"total_steps={total_steps} (config.total_steps) {too_many}")
    raise ValueError(f"total_steps={total_steps} (config.epochs * "
                     f"{optim.epoch_size_fields(config)} / "
                     f"config.batch_size) {too_many}; raise config.batch_size or set "
                     "config.total_steps")
  for field in ("warmup_steps", "cooldown_steps"):
    if config.optimizer.get(field, 0) > MAX_STEPS:
      raise ValueError(f"config.optimizer.{field}={config.optimizer[field]} {too_many}")


def validate_config(config, *, check_data: bool = True, check_mesh: bool = True) -> None:
  """Raises ValueError (one line naming the field) for a config that cannot train.

  check_mesh: against this job's devices (the TPU preflight checks against its slice).
  """
  try:
    from configs import common  # pylint: disable=g-import-not-at-top
  except ImportError:  # run from outside the repo: the locked config already refuses typos
    common = None
  if common is not None:
    unknown = sorted(_flat_keys(config) - _flat_keys(common.get_config()))
    if unknown:
      raise ValueError(f"unknown config field(s) {unknown}; see configs/common.py for the fields")
  _validate_step_counts(config)
  for field, minimum in (("log_every", 1), ("checkpoint_every", 1), ("keep_checkpoints", 1),
                         ("keep_every", 0), ("eval_every", -1), ("debug_nan_at_step", 0),
                         ("optimizer.warmup_steps", 0)):
    value = config[field] if "." not in field else config.optimizer[field.split(".")[1]]
    if value < minimum:
      raise ValueError(f"config.{field}={value} must be >= {minimum}")
  if config.optimizer.learning_rate < 0:
    raise ValueError(f"config.optimizer.learning_rate={config.optimizer.learning_rate} must be "
                     ">= 0")
  if config.init_towers not in INIT_TOWERS:
    raise ValueError(f"config.init_towers={config.init_towers!r} is unknown; use one of "
                     f"{INIT_TOWERS}")
  if config.init_from:
    from clip_jax import pretrained  # pylint: disable=g-import-not-at-top
    if pretrained.is_name(config.init_from):  # openai:..., open_clip:..., hf-hub:..., local-dir:
      pretrained.check_name(config.init_from)
  if config.init_towers != "both" and not config.init_from:
    raise ValueError(f"config.init_towers={config.init_towers!r} needs config.init_from")
  for name, eval_config in config.evals.items():
    if name not in EVALUATORS:
      raise ValueError(f"config.evals.{name} is not a known evaluator; known: "
                       f"{sorted(EVALUATORS)}")
    for field in ("num_examples", "batch_size"):
      if eval_config.get(field, 1) <= 0:
        raise ValueError(f"config.evals.{name}.{field}={eval_config.get(field)} must be positive")
  from clip_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from clip_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  checkpoint_lib.check_weights(config.get("init_weights", "auto"), "config.init_weights")
  step_lib.ema_settings(config)
  step_lib.validate_patch_dropout(config)
  tuning = int(config.get("unmasked_tuning_steps", 0))
  if tuning and tuning >= (total_steps := resolve_total_steps(config)):
    raise ValueError(f"config.unmasked_tuning_steps={tuning} must be below total_steps="
                     f"{total_steps}")
  if check_mesh:
    from clip_jax import sharding  # pylint: disable=g-import-not-at-top
    sharding.validate_config(config)
  if check_data:
    from clip_jax import data  # pylint: disable=g-import-not-at-top
    data.validate_data_config(config)


# ----------------------------------------------------------------------------------------------
# Evaluators: name -> fn(model, params, mesh, eval_config, image_size) -> {metric: float}.
# ----------------------------------------------------------------------------------------------
class _SyntheticZeroshot:
  """Zero-shot classification of the held-out synthetic shapes (clip_jax.data.synthetic)."""

  def __init__(self):
    self._cache = {}

  def __call__(self, model, params, mesh, eval_config, image_size):
    from clip_jax.data import synthetic  # pylint: disable=g-import-not-at-top
    from clip_jax.evaluate import run_zeroshot  # pylint: disable=g-import-not-at-top
    key = (eval_config.get("num_examples", 512), image_size, eval_config.get("seed", 0))
    if key not in self._cache:  # rendered once per run
      self._cache[key] = synthetic.zeroshot_eval_set(*key)
    images, labels, classnames, templates = self._cache[key]
    return run_zeroshot(model, params, mesh, images, labels, classnames, templates,
                        batch_size=eval_config.get("batch_size", 256))


EVALUATORS = {"synthetic": _SyntheticZeroshot}


# ----------------------------------------------------------------------------------------------
# Set up: the run, its mesh and its input.
# ----------------------------------------------------------------------------------------------
def use_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache at `path` (config.compilation_cache_dir); compiles
  that take 1 s or more are saved there and loaded by the next run that needs them.

  A local dir that cannot be created is a config error; an object store that fails now
  is only warned about (it may be back later; JAX warns and compiles when a cache read or
  write fails)."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  try:  # JAX itself would only warn, at every compile
    epath.Path(path).mkdir(parents=True, exist_ok=True)
  except storage.errors() as e:
    if not storage.is_remote(path):
      raise ValueError(f"compilation_cache_dir={path} cannot be created: {e}") from e
    logging.warning("compilation cache %s is unreachable now (%s); compiling as needed",
                    path, storage.describe(e))
  if jax.config.jax_compilation_cache_dir != path:
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()  # JAX opens its cache once, at the first compile
  logging.info("compilation cache: %s", path)


def _banner(title: str) -> None:
  logging.info("==== %s %s", title, "=" * max(0, 70 - len(title)))


class _setup_errors:  # pylint: disable=invalid-name
  """Re-raises a ValueError of the setup as SetupError: one line for the user, no traceback."""

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None and issubclass(exc_type, ValueError) and exc_type is not SetupError:
      raise SetupError(str(exc)) from exc
    return False


@dataclasses.dataclass(frozen=True)
class Run:
  """What every stage reads: the config (total_steps resolved), workdir, model config, mesh."""
  config: ml_collections.ConfigDict
  workdir: str
  model_config: Any  # clip_jax.models.CLIPConfig
  mesh: jax.sharding.Mesh

  @property
  def total_steps(self) -> int:
    return self.config.total_steps

  @property
  def image_size(self) -> int:
    return self.model_config.vision.image_size

  @property
  def is_primary(self) -> bool:
    return jax.process_index() == 0


def set_up(config: ml_collections.ConfigDict, workdir: str) -> Run:
  """Validates the config, resolves total_steps (the schedules read it), turns on the
  compilation cache and builds the mesh."""
  from clip_jax import sharding  # pylint: disable=g-import-not-at-top
  from clip_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  _banner("config")
  validate_config(config)
  config.total_steps = resolve_total_steps(config)
  model_config = step_lib.model_config_from(config)
  storage.configure_from(config)  # timeouts, before anything reads or writes gs://
  if config.compilation_cache_dir:
    use_compilation_cache(config.compilation_cache_dir)
  logging.info("model %s %s, global batch %d, %d steps, workdir %s", config.model,
               model_config.vision, config.batch_size, config.total_steps, workdir)

  _banner("mesh")
  mesh = sharding.create_mesh(config)
  logging.info("mesh %s over %d devices (%s), %d processes", dict(mesh.shape),
               jax.device_count(), jax.devices()[0].device_kind, jax.process_count())
  return Run(config, workdir, model_config, mesh)


def make_train_input(run: Run, start_step: int = 0):
  """This process's part of the training stream as global batches on the mesh, starting
  where `start_step` global batches end."""
  from clip_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from clip_jax import sharding  # pylint: disable=g-import-not-at-top
  return data_lib.make_train_iterator(run.config, sharding.batch_sharding(run.mesh),
                                      image_size=run.image_size, start_step=start_step,
                                      cache_dir=run.workdir)  # the files source's index


def open_input(run: Run):
  """The training stream from its start (a resume moves it on, see restore_state)."""
  _banner("input")
  train_iter = make_train_input(run)
  logging.info("data.source=%s at %dpx", run.config.data.source, run.image_size)
  return train_iter


# ----------------------------------------------------------------------------------------------
# Build or restore the state: a fresh init, init_from, or the workdir's latest checkpoint.
# ----------------------------------------------------------------------------------------------
def build_or_restore_state(run: Run, train_iter):
  """The state the loop starts from: the workdir's latest checkpoint, else a fresh one.

  Returns (state, state_shardings, rng, train_iter, checkpointer); train_iter is rebuilt
  when the checkpoint's input states were written by another number of processes.
  """
  from clip_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from clip_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  config = run.config
  _banner("model / state")
  abstract_state, state_shardings = step_lib.abstract_train_state(config, run.mesh)
  checkpointer = checkpoint_lib.Checkpointer(
      run.workdir, checkpoint_every=config.checkpoint_every,
      keep_checkpoints=config.keep_checkpoints, keep_every=config.keep_every,
      save_wait_s=config.storage.save_wait_s, save_timeout_s=config.storage.save_timeout_s)

  _banner("checkpoint restore")
  rng = jax.random.key(config.seed)
  latest = checkpointer.latest_step()
  if latest is None:
    state, state_shardings = init_state(run, jax.random.fold_in(rng, 0), abstract_state)
  else:
    state, rng, train_iter = restore_state(run, checkpointer, latest, abstract_state,
                                           state_shardings, train_iter)
  return state, state_shardings, rng, train_iter, checkpointer


def init_state(run: Run, rng: jax.Array, abstract_state) -> tuple[Any, Any]:
  """(state, shardings) of a fresh run: random, or config.init_from's towers over it (a
  ResNet's image tower with its BatchNorm running statistics).

  init_from is read and checked before anything is initialised: a mismatch fails in
  seconds, and loading every parameter skips the random init.
  """
  from clip_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from clip_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from clip_jax.models import BATCH_STATS  # pylint: disable=g-import-not-at-top
  config, mesh, abstract_params = run.config, run.mesh, abstract_state.params
  loaded = (checkpoint_lib.load_init_params(config, run.model_config, abstract_params,
                                            abstract_state.batch_stats)
            if config.init_from else {})
  batch_stats = loaded.pop(BATCH_STATS, None)
  if set(loaded) == set(abstract_params):
    state, shardings = step_lib.create_train_state(config, mesh, rng, params=loaded,
                                                   batch_stats=batch_stats)
    logging.info("initialised from %s", config.init_from)
    return state, shardings
  state, shardings = step_lib.create_train_state(config, mesh, rng)
  if loaded:
    params = dict(jax.device_get(state.params), **loaded)
    del state
    state, shardings = step_lib.create_train_state(config, mesh, rng, params=params,
                                                   batch_stats=batch_stats)
  logging.info("initialised from scratch%s",
               f", then {config.init_towers} from {config.init_from}" if loaded else "")
  return state, shardings


def restore_state(run: Run, checkpointer, step: int, abstract_state, state_shardings,
                  train_iter):
  """(state, rng, train_iter) of checkpoint `step`, onto this run's mesh whatever mesh or
  device count wrote it; the input continues after that step's batches."""
  state, data_state, rng = checkpointer.restore(step, abstract_state, state_shardings)
  if data_state is not None:
    train_iter.set_state(data_state)
  elif run.config.data.source != "wds":  # Written by another number of processes.
    train_iter.close()
    train_iter = make_train_input(run, start_step=step)
    logging.info("input continues after the %d global batches of step %d (the checkpoint "
                 "was written by another number of processes)", step, step)
  logging.info("resumed from %s at step %d", checkpointer.directory, step)
  return state, rng, train_iter


def open_writer(run: Run, start_step: int):
  """The metrics writer (jsonl, TensorBoard, wandb, console) from `start_step` on."""
  from clip_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  config = run.config
  return metrics_lib.MetricsWriter(
      run.workdir, total_steps=run.total_steps, start_step=start_step,
      is_primary=run.is_primary, progress_bar=config.progress_bar,
      wandb_config=config.wandb.to_dict(), run_config=config.to_dict(),
      min_rewrite_interval_s=config.storage.min_rewrite_interval_s)


def write_config_json(run: Run) -> None:
  if run.is_primary:
    try:
      storage.write_text(str(epath.Path(run.workdir) / "config.json"),
                         run.config.to_json_best_effort(indent=2))
    except storage.errors() as e:  # the checkpoints carry the config too
      logging.warning("config.json could not be written to %s (%s)", run.workdir,
                      storage.describe(e))


# ----------------------------------------------------------------------------------------------
# The loop.
# ----------------------------------------------------------------------------------------------
def _poison(batch):
  """config.debug_nan_at_step: NaN images make that step's loss and gradients NaN."""
  return dict(batch, images=batch["images"] * jnp.array(jnp.nan, batch["images"].dtype))


def _next_batch(train_iter, step: int, config) -> tuple[dict, float]:
  """The batch of `step` and the seconds the loop waited for it."""
  start = time.perf_counter()
  batch = next(train_iter)
  waited = time.perf_counter() - start
  if config.debug_nan_at_step and step == config.debug_nan_at_step:
    batch = _poison(batch)
  return batch, waited


def train_loop(run: Run, state, train_step, *, start_step: int, train_iter, checkpointer,
               rng: jax.Array, log: StepLog) -> None:
  """Steps from start_step to total_steps, evaluating and saving when due and at the end.

  A preemption saves the current step and stops; a step that goes non-finite raises
  NonFiniteLossError before anything evaluates or saves it.
  """
  from clip_jax.models import with_batch_stats  # pylint: disable=g-import-not-at-top
  config = run.config
  profiler = StepProfiler.from_config(config, run.workdir)
  step, metrics = start_step, None
  try:
    while step < run.total_steps:
      batch, waited = _next_batch(train_iter, step + 1, config)
      if profiler:
        profiler.before_step(step, metrics)
      state, metrics = train_step(state, batch)
      step += 1
      log.after_step(step, metrics, waited)
      preempted = _PREEMPTED.is_set() or checkpointer.reached_preemption(step)
      eval_due = config.eval_every > 0 and step % config.eval_every == 0
      save_due = step % config.checkpoint_every == 0 or step == run.total_steps or preempted
      if eval_due or save_due:
        log.flush()  # never evaluate or save a state whose step went non-finite
      if eval_due or (step == run.total_steps and config.eval_every >= 0):
        log.evaluate(step, with_batch_stats(state.params, state.batch_stats))
        if state.ema:  # the EMA weights too, logged as eval_ema/NAME/METRIC
          log.evaluate(step, with_batch_stats(state.ema["params"], state.ema["batch_stats"]),
                       prefix="eval_ema")
      if save_due:
        save_checkpoint(run, checkpointer, step, state, train_iter, rng,
                        final=preempted or step == run.total_steps)
      if preempted:
        logging.info("preempted: saved step %d, exiting", step)
        break
    log.flush()
  finally:
    if profiler:
      profiler.close(metrics)


# ----------------------------------------------------------------------------------------------
# Evaluation and logging, one step behind the device.
# ----------------------------------------------------------------------------------------------
def _fetch(metrics) -> dict[str, float]:
  return {k: float(v) for k, v in jax.device_get(metrics).items() if v is not None}


def _check_finite(step: int, values: dict[str, float]) -> None:
  bad = [k for k in ("loss", "grad_norm", "param_norm", "update_norm")
         if k in values and not math.isfinite(values[k])]
  if bad:
    raise NonFiniteLossError(
        f"step {step}: non-finite {', '.join(f'{k}={values[k]}' for k in bad)}; stopped without "
        "saving this state (the latest checkpoint is the last good one); lower "
        "config.optimizer.learning_rate or set config.optimizer.grad_clip_norm")


def input_stats(counters: dict[str, int], wait_s: float) -> dict[str, float]:
  """The input's counters summed over the processes (data/skipped_samples,
  data/caption_fallbacks, a mixture's data/NAME/samples and data/NAME/skipped_samples: see
  DataIterator.counters) and data/wait_s (the slowest process's seconds per step waiting for
  a batch); a host collective when multi-process."""
  names = sorted(counters)
  # Each count as two int32 words: the allgather goes through jax arrays, int32 without x64.
  words = np.asarray([divmod(int(counters[n]), 2**31) for n in names], np.int32).reshape(-1, 2)
  data = {"counts": words, "wait": np.asarray([wait_s], np.float32)}
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    data = multihost_utils.process_allgather(data)
  summed = np.asarray(data["counts"], np.int64).reshape(-1, len(names), 2).sum(axis=0)
  out = {n: int(high) * 2**31 + int(low) for n, (high, low) in zip(names, summed)}
  out["data/wait_s"] = float(np.max(data["wait"]))
  return out


class StepLog:
  """Logs each step's metrics one step behind the device, and the evaluations.

  The host fetches step N's metrics once step N+1 is dispatched, so the device never waits
  for it; `flush` fetches at once. Every fetch checks that the step stayed finite.
  """

  def __init__(self, run: Run, writer, train_iter, start_step: int):
    from clip_jax.models import create_model, train_flops_per_step  # pylint: disable=g-import-not-at-top
    self._run, self._writer, self._train_iter = run, writer, train_iter
    self._model = create_model(run.model_config)
    self._evaluators = {name: EVALUATORS[name]() for name in run.config.evals}
    # FLOPs per step of each patch dropout phase (FLIP: the tokens the step processes).
    self._flops = functools.lru_cache()(
        lambda rate: train_flops_per_step(run.model_config, run.config.batch_size, rate))
    self._device_kind = jax.devices()[0].device_kind
    from clip_jax import optim  # pylint: disable=g-import-not-at-top
    self._epoch_samples = optim.epoch_samples(run.config)
    self._pending: Optional[tuple] = None  # (step, metrics, data wait, input counters)
    self._last_time, self._last_step, self._data_wait = time.time(), start_step, 0.0
    self.last_metrics: dict[str, float] = {}  # the last logged values and evaluations

  def after_step(self, step: int, metrics, data_wait: float) -> None:
    """Queues `step`'s metrics and finishes the step before it."""
    self.flush()
    # The input's counters now: through the batches of steps 1 .. step.
    self._pending = (step, metrics, data_wait, self._train_iter.counters())

  def flush(self) -> None:
    """Finishes the queued step now (before an evaluation, a save, the end)."""
    if self._pending is not None:
      pending, self._pending = self._pending, None
      self._finish(*pending)

  def _finish(self, step: int, metrics, data_wait: float, counters: dict[str, int]) -> None:
    """Fetches a step's metrics, checks them, and logs them every config.log_every steps."""
    values = _fetch(metrics)
    _check_finite(step, values)
    self._data_wait += data_wait
    if step % self._run.config.log_every == 0 or step == self._run.total_steps:
      self._log(step, values, counters)

  def _log(self, step: int, values: dict[str, float], counters: dict[str, int]) -> None:
    from clip_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
    now = time.time()
    steps = max(step - self._last_step, 1)
    step_time = (now - self._last_time) / steps
    self._last_time, self._last_step = now, step
    values["step_time_s"] = step_time
    values["samples_per_s"] = self._run.config.batch_size / step_time
    # The host fetches a batch while the device computes the step before it, so a wait well
    # below step_time_s costs nothing; one near it means the input pipeline limits the run.
    values.update(input_stats(counters, self._data_wait / steps))
    self._data_wait = 0.0
    if self._epoch_samples:  # epochs seen, of config.data.samples_per_epoch or the dataset
      values["epoch"] = step * self._run.config.batch_size / self._epoch_samples
    from clip_jax.step import patch_dropout_at  # pylint: disable=g-import-not-at-top
    flops = self._flops(patch_dropout_at(self._run.config, step - 1, self._run.total_steps))
    values["flops_per_step"] = float(flops)
    mfu = metrics_lib.model_flops_utilization(flops, step_time, jax.device_count(),
                                              self._device_kind)
    if mfu is not None:
      values["mfu"] = mfu
    self._writer.write(step, values)
    self.last_metrics.update(values)

  def evaluate(self, step: int, params, prefix: str = "eval") -> None:
    """Runs config.evals on `params` and logs their results as PREFIX/NAME/METRIC."""
    run, results = self._run, {}
    for name, evaluator in self._evaluators.items():
      t0 = time.time()
      for metric, value in evaluator(self._model, params, run.mesh, run.config.evals[name],
                                     run.image_size).items():
        results[f"{prefix}/{name}/{metric}"] = float(value)
      logging.info("step %d %s %s: %s (%.1fs)", step, prefix, name,
                   {k: round(v, 4) for k, v in results.items() if f"/{name}/" in k},
                   time.time() - t0)
    if results:
      self._writer.write(step, results)
    self.last_metrics.update(results)


# ----------------------------------------------------------------------------------------------
# Save and close.
# ----------------------------------------------------------------------------------------------
def save_checkpoint(run: Run, checkpointer, step: int, state, train_iter, rng: jax.Array,
                    final: bool = False):
  """Starts saving `step` (every process calls it): the state, every process's input
  state, the rng, the config and the model config. `final`: the run's last save."""
  checkpointer.save(step, state, data_state=train_iter.get_state(), rng=rng,
                    config_json=run.config.to_json_best_effort(),
                    model_config=run.model_config, force=True, final=final)


def close_run(checkpointer, writer) -> None:
  try:
    checkpointer.close()  # lets the in-flight saves of good steps commit (bounded)
  finally:
    writer.close()


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------
def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains to config.total_steps, resuming from WORKDIR's latest checkpoint if any.

  Returns the last logged metrics (with the final evaluation). Raises SetupError for a user
  error found before the first step and NonFiniteLossError when a step goes NaN/inf.
  """
  from clip_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  with _setup_errors():
    run = set_up(config, workdir)
    train_iter = open_input(run)
    state, shardings, rng, train_iter, checkpointer = build_or_restore_state(run, train_iter)
    start_step = int(jax.device_get(state.step))
    writer = open_writer(run, start_step)
  if run.config.get("unmasked_tuning_steps", 0) and run.config.get("patch_dropout", 0.0):
    # FLIP: masked, then the last unmasked_tuning_steps unmasked (chosen by the step number).
    train_step = step_lib.PhasedTrainStep(run.config, run.mesh, shardings,
                                          start_step=start_step, total_steps=run.total_steps)
  else:
    train_step = step_lib.make_train_step(run.config, run.mesh, shardings)
  write_config_json(run)
  log = StepLog(run, writer, train_iter, start_step)

  _banner("loop")
  try:
    train_loop(run, state, train_step, start_step=start_step, train_iter=train_iter,
               checkpointer=checkpointer, rng=rng, log=log)
  finally:
    close_run(checkpointer, writer)
  _banner("done")
  return log.last_metrics


def dry_run(config: ml_collections.ConfigDict) -> dict:
  """The --dry_run report: the step compiled for the config's mesh and global batch."""
  from clip_jax import sharding, step  # pylint: disable=g-import-not-at-top
  validate_config(config, check_data=False)
  config.total_steps = resolve_total_steps(config)
  return step.dry_run_report(config, sharding.create_mesh(config))


# ----------------------------------------------------------------------------------------------
# Entry point.
# ----------------------------------------------------------------------------------------------
def _fail(message: str, code: int = 2):
  print(f"error: {' '.join(str(message).split())}", file=sys.stderr, flush=True)
  sys.exit(code)


def _unknown_field_message(error: Exception, argv: list[str]) -> str:
  text = str(error)
  name = re.search(r"[A-Za-z_][A-Za-z_0-9]*", text)
  name = name.group(0) if name else text
  hint = re.search(r'Did you mean "([^"]+)"', text)
  flag = next((a.split("=")[0] for a in argv
               if a.startswith("--config.") and a.split("=")[0].split(".")[-1] == name),
              f"--config.{name}")
  return (f"unknown config field {flag[2:]!r}"
          + (f" (did you mean {hint.group(1)!r}?)" if hint else "; see configs/common.py"))


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that ends a bad flag or config field with one line, exit code 2."""
  try:
    return flags.FLAGS(argv)
  except (AttributeError, KeyError) as e:  # config_flags: a field the config does not have
    _fail(_unknown_field_message(e, argv))
  except flags.Error as e:
    _fail(e)
  except Exception as e:  # pylint: disable=broad-except  # a config file that does not load
    _fail(f"{type(e).__name__}: {e}")


class _OnlyOurInfo(pylogging.Filter):
  """Keeps library INFO chatter (orbax logs every save step) off the console."""

  def filter(self, record):
    return record.levelno >= pylogging.WARNING or "site-packages" not in record.pathname


def _on_sigterm(signum, frame):
  del signum, frame
  _PREEMPTED.set()


def _load_config() -> ml_collections.ConfigDict:
  """--config's ConfigDict; a file that is missing or does not load is one error line."""
  filename = config_flags.get_config_filename(flags.FLAGS["config"])
  if filename is None:
    _fail("--config=configs/NAME.py is required")
  path = filename.split(":")[0]
  if not os.path.isfile(path):
    _fail(f"--config={filename}: no such file (the recipes are in configs/, e.g. "
          "configs/demo.py)")
  try:
    config = _CONFIG.value
    config.keys()  # config_flags reports a config file that failed to load only when read
  except Exception as e:  # pylint: disable=broad-except
    _fail(f"--config={filename} does not load: {' '.join(str(e).split())}")
  return config


def _explicit_fields() -> list[str]:
  """The config fields set by --config.X flags (slice overrides leave those alone)."""
  return list(config_flags.get_override_values(flags.FLAGS["config"]))


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_OnlyOurInfo())
  config = _load_config()
  storage.configure_from(config)  # before any storage client (tensorstore reads it once)
  if _TOPOLOGY.value:  # the TPU preflight: compile for a named slice on this host
    if not _DRY_RUN.value:
      _fail("--topology needs --dry_run (it compiles for the slice, it does not train)")
    from clip_jax import preflight  # pylint: disable=g-import-not-at-top
    preflight.setup_host()  # before anything touches a device: CPU JAX, compile-only libtpu
    try:
      validate_config(config, check_data=False, check_mesh=False)
      config.total_steps = resolve_total_steps(config)
    except ValueError as e:
      _fail(e)
    sys.exit(preflight.run(config, _TOPOLOGY.value, _NUM_SLICES.value, _FIT.value,
                           explicit=_explicit_fields()))
  if _FIT.value or _NUM_SLICES.value != 1:
    _fail("--fit and --num_slices need --topology=SLICE (and --dry_run)")
  try:  # before anything touches a device: pods, SLURM, flags or CLIP_JAX_* env; else a no-op
    distributed.initialize()
  except ValueError as e:
    _fail(e)
  from clip_jax import preflight  # pylint: disable=g-import-not-at-top
  try:  # on a TPU slice: the recipe's config.slice_overrides for its kind
    applied = preflight.apply_slice_overrides(config, jax.devices()[0].device_kind,
                                              _explicit_fields())
  except ValueError as e:
    _fail(e)
  if applied:
    logging.info("slice overrides for %s: %s", jax.devices()[0].device_kind, " ".join(applied))
  if _DRY_RUN.value:
    try:
      report = dry_run(config)
    except ValueError as e:
      _fail(e)
    print(json.dumps(report), flush=True)
    return
  if not _WORKDIR.value:
    _fail("--workdir=DIR is required (checkpoints, metrics.jsonl and TensorBoard events go there)")
  try:
    validate_config(config)
    distributed.check_same_config(config, workdir=_WORKDIR.value)  # same on every host
  except ValueError as e:
    _fail(e)
  if _PROFILE.value and not config.profile_steps:
    with config.unlocked():
      config.profile_steps = 5
  signal.signal(signal.SIGTERM, _on_sigterm)
  from clip_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  try:
    train(config, _WORKDIR.value)
  except SetupError as e:
    _fail(e)
  except NonFiniteLossError as e:
    _fail(e, code=NAN_EXIT_CODE)
  except checkpoint_lib.CheckpointSaveError as e:
    # A save may still hang in a storage client's thread: exit without waiting for it.
    print(f"error: {' '.join(str(e).split())}", file=sys.stderr, flush=True)
    pylogging.shutdown()
    os._exit(SAVE_FAILED_EXIT_CODE)  # pylint: disable=protected-access


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
