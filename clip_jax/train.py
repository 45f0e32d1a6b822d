r"""Trains CLIP: `python -m clip_jax.train --config=configs/NAME.py --workdir=DIR`.

  python -m clip_jax.train --config=configs/demo.py --workdir=runs/demo
  python -m clip_jax.train --config=configs/vitl14.py --workdir=gs://bucket/run \
      --config.batch_size=4096 --config.data.path='gs://bucket/shards/{00000..41407}.tar'
  python -m clip_jax.train --config=configs/vitb32.py --dry_run   # compile only, one JSON line

Run the same command on every host of a pod. A workdir with checkpoints resumes from the
latest one (onto any mesh). SIGTERM (preemption) saves the current step and exits 0.
"""
from __future__ import annotations

import json
import logging as pylogging
import math
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

from clip_jax import distributed  # also defines --coordinator_address/--num_processes/--process_id
from clip_jax.profiling import StepProfiler

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, events.")
_DRY_RUN = flags.DEFINE_bool("dry_run", False, "Compile the train step, print one JSON line of "
                             "parameter count, FLOPs and per-device memory, and exit.")
_PROFILE = flags.DEFINE_bool("profile", False, "Write a JAX profiler trace of config."
                             "profile_steps steps (5 when unset) from config.profile_start_step "
                             "into WORKDIR/profile.")

INIT_TOWERS = ("both", "image", "text")
TOWER_KEYS = {"image": ("visual",), "text": ("text",)}  # param subtrees of each tower
NAN_EXIT_CODE = 3

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
  """config.total_steps, or epochs * num_train_examples / batch_size (rounded up)."""
  if config.total_steps is not None:
    return int(config.total_steps)
  if config.epochs is None or config.num_train_examples is None:
    raise ValueError("set config.total_steps, or both config.epochs and "
                     "config.num_train_examples")
  return int(math.ceil(config.epochs * config.num_train_examples / config.batch_size))


def validate_config(config, *, check_data: bool = True) -> None:
  """Raises ValueError (one line naming the field) for a config that cannot train."""
  try:
    from configs import common  # pylint: disable=g-import-not-at-top
  except ImportError:  # run from outside the repo: the locked config already refuses typos
    common = None
  if common is not None:
    unknown = sorted(_flat_keys(config) - _flat_keys(common.get_config()))
    if unknown:
      raise ValueError(f"unknown config field(s) {unknown}; see configs/common.py for the fields")
  total_steps = resolve_total_steps(config)
  if total_steps <= 0:
    raise ValueError(f"total_steps={total_steps} must be positive (config.total_steps or "
                     "config.epochs * config.num_train_examples / config.batch_size)")
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
  if config.init_towers != "both" and not config.init_from:
    raise ValueError(f"config.init_towers={config.init_towers!r} needs config.init_from")
  for name, eval_config in config.evals.items():
    if name not in EVALUATORS:
      raise ValueError(f"config.evals.{name} is not a known evaluator; known: "
                       f"{sorted(EVALUATORS)}")
    for field in ("num_examples", "batch_size"):
      if eval_config.get(field, 1) <= 0:
        raise ValueError(f"config.evals.{name}.{field}={eval_config.get(field)} must be positive")
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
# init_from: a converted pretrained checkpoint or another run, whole or per tower.
# ----------------------------------------------------------------------------------------------
def load_init_params(config, model_config, abstract_params) -> dict:
  """The towers named by config.init_towers, read from config.init_from: {key: params} (host
  arrays in the model's dtypes), checked against the model's abstract params."""
  from clip_jax import checkpoint  # pylint: disable=g-import-not-at-top
  from clip_jax.models import params as params_lib  # pylint: disable=g-import-not-at-top
  loaded, loaded_config = checkpoint.restore_params(config.init_from)
  if loaded_config.scan_layers != model_config.scan_layers:
    loaded = (params_lib.scan_params if model_config.scan_layers
              else params_lib.unscan_params)(loaded)
  grid = model_config.vision.grid_size
  if loaded_config.vision.grid_size != grid and config.init_towers in ("both", "image"):
    logging.info("init_from: interpolating the position embedding from %dx%d to %dx%d patches",
                 loaded_config.vision.grid_size, loaded_config.vision.grid_size, grid, grid)
    loaded = params_lib.interpolate_pos_embed(loaded, grid)
  if config.init_towers == "both":
    keys = tuple(abstract_params)
  else:
    keys = TOWER_KEYS[config.init_towers]
  taken = {}
  for key in keys:
    if key not in loaded:
      raise ValueError(f"config.init_from={config.init_from} has no {key!r} parameters")
    want, got = abstract_params[key], loaded[key]
    if (jax.tree.structure(want) != jax.tree.structure(got)
        or [x.shape for x in jax.tree.leaves(want)] != [x.shape for x in jax.tree.leaves(got)]):
      raise ValueError(f"config.init_from={config.init_from}: the {key!r} parameters of "
                       f"{loaded_config.name} do not match config.model={config.model}")
    taken[key] = jax.tree.map(lambda x, ref: np.asarray(x, ref.dtype), got, want)
  logging.info("init_from %s: took %s", config.init_from, ", ".join(keys))
  return taken


# ----------------------------------------------------------------------------------------------
# The run.
# ----------------------------------------------------------------------------------------------
def use_compilation_cache(path: str) -> None:
  """JAX's persistent compilation cache at `path` (config.compilation_cache_dir); compiles
  that take 1 s or more are saved there and loaded by the next run that needs them."""
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top
  try:  # JAX itself would only warn, at every compile
    epath.Path(path).mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise ValueError(f"compilation_cache_dir={path} cannot be created: {e}") from e
  if jax.config.jax_compilation_cache_dir != path:
    compilation_cache.set_cache_dir(path)
    compilation_cache.reset_cache()  # JAX opens its cache once, at the first compile
  logging.info("compilation cache: %s", path)


def _banner(title: str) -> None:
  logging.info("==== %s %s", title, "=" * max(0, 70 - len(title)))


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


def _poison(batch):
  """config.debug_nan_at_step: NaN images make that step's loss and gradients NaN."""
  return dict(batch, images=batch["images"] * jnp.array(jnp.nan, batch["images"].dtype))


class _setup_errors:  # pylint: disable=invalid-name
  """Re-raises a ValueError of the setup as SetupError: one line for the user, no traceback."""

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, tb):
    if exc_type is not None and issubclass(exc_type, ValueError) and exc_type is not SetupError:
      raise SetupError(str(exc)) from exc
    return False


def train(config: ml_collections.ConfigDict, workdir: str) -> dict[str, float]:
  """Trains to config.total_steps, resuming from WORKDIR's latest checkpoint if any.

  Returns the last logged metrics (with the final evaluation). Raises SetupError for a user
  error found before the first step and NonFiniteLossError when a step goes NaN/inf.
  """
  from clip_jax import checkpoint as checkpoint_lib  # pylint: disable=g-import-not-at-top
  from clip_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from clip_jax import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  from clip_jax import sharding  # pylint: disable=g-import-not-at-top
  from clip_jax import step as step_lib  # pylint: disable=g-import-not-at-top
  from clip_jax.models import create_model, train_flops_per_step  # pylint: disable=g-import-not-at-top

  with _setup_errors():
    # ---- config ------------------------------------------------------------------------------
    _banner("config")
    validate_config(config)
    total_steps = resolve_total_steps(config)
    config.total_steps = total_steps  # the schedules read it
    is_primary = jax.process_index() == 0
    model_config = step_lib.model_config_from(config)
    if config.compilation_cache_dir:
      use_compilation_cache(config.compilation_cache_dir)
    logging.info("model %s %s, global batch %d, %d steps, workdir %s", config.model,
                 model_config.vision, config.batch_size, total_steps, workdir)

    # ---- mesh --------------------------------------------------------------------------------
    _banner("mesh")
    mesh = sharding.create_mesh(config)
    logging.info("mesh %s over %d devices (%s), %d processes", dict(mesh.shape),
                 jax.device_count(), jax.devices()[0].device_kind, jax.process_count())

    # ---- input -------------------------------------------------------------------------------
    _banner("input")
    image_size = model_config.vision.image_size
    train_iter = data_lib.make_train_iterator(config, sharding.batch_sharding(mesh),
                                              image_size=image_size)
    logging.info("data.source=%s at %dpx", config.data.source, image_size)

    # ---- model / state -----------------------------------------------------------------------
    _banner("model / state")
    model = create_model(model_config)
    abstract_state, state_shardings = step_lib.abstract_train_state(config, mesh)
    checkpointer = checkpoint_lib.Checkpointer(
        workdir, checkpoint_every=config.checkpoint_every,
        keep_checkpoints=config.keep_checkpoints, keep_every=config.keep_every)

    # ---- checkpoint restore ------------------------------------------------------------------
    _banner("checkpoint restore")
    rng = jax.random.key(config.seed)
    latest = checkpointer.latest_step()
    if latest is not None:
      # Onto this run's mesh, whatever mesh or device count wrote it.
      state, data_state, rng = checkpointer.restore(latest, abstract_state, state_shardings)
      if data_state is not None:
        train_iter.set_state(data_state)
      elif config.data.source != "wds":  # Written by another number of processes.
        train_iter.close()
        train_iter = data_lib.make_train_iterator(config, sharding.batch_sharding(mesh),
                                                  image_size=image_size, start_step=latest)
        logging.info("input continues after the %d global batches of step %d (the checkpoint "
                     "was written by another number of processes)", latest, latest)
      logging.info("resumed from %s at step %d", checkpointer.directory, latest)
    else:
      init_rng = jax.random.fold_in(rng, 0)
      # init_from is read and checked before anything is initialised: a mismatch fails in
      # seconds, and loading every parameter skips the random init.
      loaded = (load_init_params(config, model_config, abstract_state.params)
                if config.init_from else {})
      if set(loaded) == set(abstract_state.params):
        state, state_shardings = step_lib.create_train_state(config, mesh, init_rng,
                                                             params=loaded)
      else:
        state, state_shardings = step_lib.create_train_state(config, mesh, init_rng)
        if loaded:
          params = dict(jax.device_get(state.params), **loaded)
          del state
          state, state_shardings = step_lib.create_train_state(config, mesh, init_rng,
                                                               params=params)
      logging.info("initialised %s", f"from {config.init_from}"
                   if set(loaded) == set(abstract_state.params) else "from scratch" + (
                       f", then {config.init_towers} from {config.init_from}" if loaded else ""))
    start_step = int(jax.device_get(state.step))
    writer = metrics_lib.MetricsWriter(
        workdir, total_steps=total_steps, start_step=start_step, is_primary=is_primary,
        progress_bar=config.progress_bar, wandb_config=config.wandb.to_dict(),
        run_config=config.to_dict())

  train_step = step_lib.make_train_step(config, mesh, state_shardings)
  if is_primary:
    (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
  flops_per_step = train_flops_per_step(model_config, config.batch_size)
  device_kind = jax.devices()[0].device_kind

  # ---- eval ----------------------------------------------------------------------------------
  evaluators = {name: EVALUATORS[name]() for name in config.evals}

  def run_evals(step: int) -> dict[str, float]:
    results = {}
    for name, evaluator in evaluators.items():
      t0 = time.time()
      for metric, value in evaluator(model, state.params, mesh, config.evals[name],
                                     image_size).items():
        results[f"eval/{name}/{metric}"] = float(value)
      logging.info("step %d eval %s: %s (%.1fs)", step, name,
                   {k: round(v, 4) for k, v in results.items() if f"/{name}/" in k},
                   time.time() - t0)
    if results:
      writer.write(step, results)
    return results

  # ---- save ----------------------------------------------------------------------------------
  def save(step: int) -> None:
    checkpointer.save(step, state, data_state=train_iter.get_state(), rng=rng,
                      config_json=config.to_json_best_effort(), model_config=model_config,
                      force=True)

  # ---- loop ----------------------------------------------------------------------------------
  _banner("loop")
  last = {"time": time.time(), "step": start_step, "data_wait": 0.0}
  last_metrics: dict[str, float] = {}

  def finish(step: int, metrics, data_wait: float) -> None:
    """Fetches a step's metrics (one step behind the device), checks them, logs them."""
    values = _fetch(metrics)
    _check_finite(step, values)
    last["data_wait"] += data_wait
    if step % config.log_every and step != total_steps:
      return
    now = time.time()
    steps = max(step - last["step"], 1)
    step_time = (now - last["time"]) / steps
    last.update(time=now, step=step)
    values["step_time_s"] = step_time
    values["samples_per_s"] = config.batch_size / step_time
    # Seconds per step the loop waited for its next batch (the slowest process's). The host
    # fetches a batch while the device computes the step before it, so a wait well below
    # step_time_s costs nothing; one near it means the input pipeline limits the run.
    data = {"skipped": np.asarray([train_iter.skipped_samples], np.int32),
            "wait": np.asarray([last["data_wait"] / steps], np.float32)}
    last["data_wait"] = 0.0
    if jax.process_count() > 1:
      from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
      data = multihost_utils.process_allgather(data)
    values["data/skipped_samples"] = int(np.sum(data["skipped"]))
    values["data/wait_s"] = float(np.max(data["wait"]))
    mfu = metrics_lib.model_flops_utilization(flops_per_step, step_time, jax.device_count(),
                                              device_kind)
    if mfu is not None:
      values["mfu"] = mfu
    writer.write(step, values)
    last_metrics.update(values)

  pending: Optional[tuple[int, Any, float]] = None
  step = start_step
  profiler = StepProfiler.from_config(config, workdir)
  metrics = None
  try:
    while step < total_steps:
      waited = time.perf_counter()
      batch = next(train_iter)
      waited = time.perf_counter() - waited
      if config.debug_nan_at_step and step + 1 == config.debug_nan_at_step:
        batch = _poison(batch)
      if profiler:
        profiler.before_step(step, metrics)
      state, metrics = train_step(state, batch)
      step += 1
      if pending is not None:
        finish(*pending)
      pending = (step, metrics, waited)
      preempted = _PREEMPTED.is_set() or checkpointer.reached_preemption(step)
      eval_due = config.eval_every > 0 and step % config.eval_every == 0
      save_due = step % config.checkpoint_every == 0 or step == total_steps or preempted
      if eval_due or save_due:
        finish(*pending)  # never evaluate or save a state whose step went non-finite
        pending = None
      if eval_due or (step == total_steps and config.eval_every >= 0):
        last_metrics.update(run_evals(step))
      if save_due:
        save(step)
      if preempted:
        logging.info("preempted: saved step %d, exiting", step)
        break
    if pending is not None:
      finish(*pending)
  finally:
    if profiler:
      profiler.close(metrics)
    checkpointer.close()  # lets the in-flight saves of good steps commit
    writer.close()
  _banner("done")
  return last_metrics


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


def main(argv):
  del argv
  logging.get_absl_handler().addFilter(_OnlyOurInfo())
  config = _CONFIG.value
  if config is None:
    _fail("--config=configs/NAME.py is required")
  try:  # before anything touches a device: pods, SLURM, flags or CLIP_JAX_* env; else a no-op
    distributed.initialize()
  except ValueError as e:
    _fail(e)
  if _DRY_RUN.value:
    from clip_jax import sharding, step  # pylint: disable=g-import-not-at-top
    try:
      validate_config(config, check_data=False)
      config.total_steps = resolve_total_steps(config)
      report = step.dry_run_report(config, sharding.create_mesh(config))
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
  try:
    train(config, _WORKDIR.value)
  except SetupError as e:
    _fail(e)
  except NonFiniteLossError as e:
    _fail(e, code=NAN_EXIT_CODE)


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
