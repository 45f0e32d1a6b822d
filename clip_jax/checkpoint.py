"""Orbax checkpoints of a run: save (async, kept by policy), resume onto any mesh, init_from.

Layout: WORKDIR/checkpoints/<step>/ with one sub-directory per item:
  state         the TrainState (params, opt_state, step, BatchNorm statistics and, with
                config.ema_decay, the EMA weights), each array saved with its sharding
  data          every process's input-iterator state (JSON)
  rng           the run's PRNG key data
  config        the run's ConfigDict (JSON)
  model_config  the CLIPConfig (JSON), so a checkpoint alone rebuilds the model

Orbax writes a step into a temporary directory and renames it when every item is complete,
so a crash in the middle of a save leaves no step that looks complete (test_checkpoint.py).
"""
from __future__ import annotations

import dataclasses
import json
import logging
import threading
from typing import Any, Optional

from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from clip_jax import distributed, params_io, storage
from clip_jax.models import (BATCH_STATS, CLIPConfig, abstract_loaded_params, create_model,
                             interpolate_pos_embed, scan_params, unscan_params, with_batch_stats)

ITEMS = ("state", "data", "rng", "config", "model_config")
# Which weights of a trainer checkpoint the readers (restore_params: clip_jax.load, evaluate,
# export, init_from) take: auto = the EMA when the run kept one, else the trained params.
WEIGHTS = ("auto", "ema", "params")
_policies = ocp.checkpoint_managers


def checkpoint_dir(workdir: str) -> epath.Path:
  return epath.Path(workdir) / "checkpoints"


def saved_state_tree(state_dir) -> dict:
  """The saved TrainState's tree of array metadata (nothing read but the metadata)."""
  meta = ocp.PyTreeCheckpointer().metadata(epath.Path(state_dir))
  return getattr(meta, "item_metadata", meta)


def has_ema(saved_state) -> bool:
  """Whether a saved state (its `saved_state_tree`) holds EMA weights."""
  ema = saved_state.get("ema") if "ema" in saved_state.keys() else None
  return bool(ema) and "params" in ema.keys() and bool(ema["params"])


def _shape_tree(abstract_tree, shardings=None):
  """ShapeDtypeStructs with target shardings (None: restore as host numpy arrays)."""
  if shardings is None:
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), abstract_tree)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                      abstract_tree, shardings)


class Checkpointer:
  """A CheckpointManager over WORKDIR/checkpoints with the run's save and keep policy.

  Args:
    workdir: the run directory.
    checkpoint_every: save every this many steps (the trainer also saves at the end and on
      preemption with `force=True`).
    keep_checkpoints: keep the latest K steps ...
    keep_every: ... and every step that is a multiple of this (0: none).
    async_save: write in a background thread while training goes on.
    save_wait_s: how long a save waits for the one before it to finish; then it is skipped.
    save_timeout_s: how long the last save (and `close`) waits for the saves in flight.

  A save that fails (storage errors past the clients' retries) never touches the steps
  already committed: it is reported in one line and the next save comes at the next
  interval; a save still in flight (a slow or stalled store) is waited for at most
  save_wait_s, then the next one is skipped, so training never blocks long on storage.
  `close` raises CheckpointSaveError if the last step asked for is not committed within
  save_timeout_s.
  """

  def __init__(self, workdir: str, *, checkpoint_every: int, keep_checkpoints: int,
               keep_every: int = 0, async_save: bool = True, save_wait_s: float = 120.0,
               save_timeout_s: float = 900.0):
    policies = [_policies.LatestN(n=keep_checkpoints)]
    if keep_every:
      policies.append(_policies.EveryNSteps(interval_steps=keep_every))
    # Every `checkpoint_every` steps, and at the step all hosts agree on when a pod is being
    # preempted (jax.distributed's preemption sync; never fires in a single process).
    save_policy = _policies.AnySavePolicy([
        _policies.FixedIntervalPolicy(checkpoint_every),
        _policies.PreemptionCheckpointingPolicy()])
    options = ocp.CheckpointManagerOptions(
        save_decision_policy=save_policy,
        preservation_policy=_policies.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save,
        cleanup_tmp_directories=True,   # half-written steps of a crashed run
        create=True)
    self.directory = checkpoint_dir(workdir)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)
    self.save_timeout_s = save_timeout_s
    self.save_wait_s = save_wait_s
    self.failed_saves = 0
    self._last_requested: Optional[int] = None
    self._timed_out = ""
    self._last_error: Optional[BaseException] = None

  def reached_preemption(self, step: int) -> bool:
    """True on every host at the step a multi-host preemption notice was synchronised to."""
    return self.manager.reached_preemption(step)

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state, *, data_state: dict, rng: jax.Array, config_json: str,
           model_config: CLIPConfig, force: bool = False, final: bool = False) -> bool:
    """Starts saving `step` (every process must call it); returns whether a save started.

    final: the run's last save (its end, a preemption): a save still in flight is waited
    for (at most save_timeout_s) instead of skipping this one."""
    if not force and not self.manager.should_save(step):
      return False
    data_states = distributed.allgather_json(data_state)
    if final:
      self._wait_bounded()
    elif self._still_saving_after(self.save_wait_s):
      logging.warning("checkpoint: the save of an earlier step is still in progress (slow or "
                      "unreachable storage); step %d is not saved, the next save is at the "
                      "next interval", step)
      self._last_requested = step
      return False
    self._report_failed_save()
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave({"process_count": len(data_states), "states": data_states}),
        rng=ocp.args.StandardSave({"key_data": np.asarray(jax.random.key_data(rng))}),
        config=ocp.args.JsonSave(json.loads(config_json)),
        model_config=ocp.args.JsonSave(model_config.to_dict()))
    self._last_requested = step
    try:
      return self.manager.save(step, args=args, force=force)
    except storage.errors() as e:  # the synchronous part (directories) failed
      self._failed(step, e)
      return False

  def _still_saving_after(self, timeout_s: float) -> bool:
    """Whether a save in flight is still going after waiting for it up to timeout_s (every
    process answers alike)."""
    if not self._in_progress():
      return False
    self._wait(timeout_s)
    return self._in_progress()

  def _in_progress(self) -> bool:
    """Whether a save is in flight on any process (every process decides alike)."""
    busy = bool(self.manager.is_saving_in_progress())
    if jax.process_count() > 1:
      busy = any(distributed.allgather_json(busy))
    return busy

  def _failed(self, step, error: BaseException) -> None:
    if error is self._last_error:  # orbax raises a failed save once in every thread that waits
      return
    self._last_error = error
    self.failed_saves += 1
    logging.error("checkpoint: saving step %s to %s failed (%s); the committed checkpoints "
                  "are kept (latest: step %s), the next save is at the next interval", step,
                  self.directory, storage.describe(error), self.latest_step())

  def _report_failed_save(self) -> None:
    """Reports (once) an asynchronous save that failed since the last call."""
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._failed("in flight", e)

  def restore(self, step: int, abstract_state, state_shardings):
    """Restores `step` onto the target shardings (any mesh, any device count).

    A checkpoint without EMA weights restored by a run with config.ema_decay starts the EMA
    from the restored weights; a run without EMA drops the checkpoint's. Checkpoints written
    before TrainState had an `ema` field restore as they are.

    Returns (state, data_state for this process or None, rng).
    """
    target = _shape_tree(abstract_state, state_shardings)
    saved = saved_state_tree(self.directory / str(step) / "state")
    fields = {f.name: getattr(target, f.name) for f in dataclasses.fields(target)
              if f.name in saved.keys()}
    want_ema = bool(getattr(abstract_state, "ema", None))  # a TrainState of a run with EMA
    saved_ema = has_ema(saved)
    if saved_ema and not want_ema and hasattr(abstract_state, "ema"):
      fields["ema"] = self._abstract_ema(abstract_state, state_shardings)  # read, then dropped
    elif want_ema and not saved_ema and "ema" in fields:
      fields["ema"] = {}
    restored = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(fields),
        data=ocp.args.JsonRestore(),
        rng=ocp.args.StandardRestore()))
    restored_fields = dict(restored.state)
    if hasattr(abstract_state, "ema") and not (want_ema and saved_ema):
      restored_fields["ema"] = {}
    state = type(abstract_state)(**restored_fields)
    if want_ema and not saved_ema:
      from clip_jax import step as step_lib  # pylint: disable=g-import-not-at-top
      logging.warning("checkpoint step %d has no EMA weights: the EMA (config.ema_decay) "
                      "starts from its weights", step)
      state = state.replace(ema=jax.jit(step_lib.initial_ema, out_shardings=state_shardings.ema)(
          state.params, state.batch_stats))
    elif saved_ema and not want_ema:
      logging.warning("checkpoint step %d has EMA weights; config.ema_decay=0 drops them", step)
    data = restored.data
    data_state = None
    if data["process_count"] == jax.process_count():
      data_state = data["states"][jax.process_index()]
    else:
      logging.warning("checkpoint has input state for %d processes, this run has %d: the "
                      "input is rebuilt from the step count (synthetic and TFDS sources; a wds "
                      "stream restarts) and its skipped-sample count restarts at 0",
                      data["process_count"], jax.process_count())
    rng = jax.random.wrap_key_data(np.asarray(restored.rng["key_data"]))
    return state, data_state, rng

  @staticmethod
  def _abstract_ema(abstract_state, state_shardings):
    """The target of a saved EMA (float32, sharded like the params) for a state without one."""
    from clip_jax import step as step_lib  # pylint: disable=g-import-not-at-top
    return _shape_tree(*step_lib.abstract_ema(abstract_state.params, abstract_state.batch_stats,
                                              state_shardings.params, state_shardings.batch_stats))

  def wait(self) -> None:
    """Blocks until the asynchronous saves in flight are committed."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    """Waits (at most save_timeout_s) for the saves in flight, then closes the manager.

    Raises CheckpointSaveError when the last step asked for is not committed by then."""
    if self._timed_out:  # a save hangs in the storage client: closing would wait for it
      raise CheckpointSaveError(self._timed_out)
    self._wait_bounded()
    self.manager.close()
    last = self._last_requested
    if last is not None and last not in self._committed_steps():
      raise CheckpointSaveError(
          f"checkpoint: step {last} could not be saved to {self.directory} "
          f"({self.failed_saves} failed or skipped save(s)); the latest committed "
          f"checkpoint is step {self._committed_step()}, a restart resumes from there")

  def _wait_bounded(self) -> None:
    """Waits for the saves in flight, at most save_timeout_s (then CheckpointSaveError); a
    failed one is reported."""
    if not self._wait(self.save_timeout_s):
      self._timed_out = (
          f"checkpoint: the save of step {self._last_requested} to {self.directory} did not "
          f"finish within config.storage.save_timeout_s={self.save_timeout_s:g} s; the latest "
          f"committed checkpoint is step {self._committed_step()}, a restart resumes from there")
      raise CheckpointSaveError(self._timed_out)

  def _wait(self, timeout_s: float) -> bool:
    """Waits for the saves in flight, at most timeout_s; False if they are still going. A
    failed one is reported."""
    done = threading.Event()
    errors: list[BaseException] = []

    def wait():
      try:
        self.manager.wait_until_finished()
      except Exception as e:  # pylint: disable=broad-except
        errors.append(e)
      done.set()

    threading.Thread(target=wait, name="clip_jax-checkpoint-wait", daemon=True).start()
    if not done.wait(timeout_s):
      return False
    if errors:
      self._failed(self._last_requested, errors[0])
    return True

  def _committed_steps(self) -> list[int]:
    try:
      return list(ocp.utils.checkpoint_steps(self.directory))
    except storage.errors():
      return []

  def _committed_step(self) -> Optional[int]:
    steps = self._committed_steps()
    return max(steps) if steps else None


class CheckpointSaveError(RuntimeError):
  """The run's last checkpoint could not be saved (one line for the user)."""


def _resolve_step(path: str) -> tuple[epath.Path, int]:
  """(checkpoints dir, step) for a workdir, its checkpoints dir, or one step dir."""
  path = epath.Path(path)
  if not path.exists():
    raise ValueError(f"checkpoint path {path} does not exist")
  if (path / "checkpoints").is_dir():
    path = path / "checkpoints"
  if (path / "state").is_dir() and path.name.isdigit():
    return path.parent, int(path.name)
  steps = ocp.utils.checkpoint_steps(path)  # finalized steps only; temporary dirs are skipped
  if not steps:
    raise ValueError(f"{path} holds no complete checkpoint (expected a run workdir, its "
                     "checkpoints/ dir, a checkpoints/<step> dir, or a converted model dir)")
  step = max(steps)
  return path, step


def check_weights(weights: str, what: str = "weights") -> None:
  if weights not in WEIGHTS:
    raise ValueError(f"{what}={weights!r} is unknown; use {', '.join(WEIGHTS)}")


def restore_params(path: str, weights: str = "auto") -> tuple[Any, CLIPConfig]:
  """Parameters and model config of a checkpoint, as host numpy arrays.

  `path`: a converted checkpoint (DIR/model_config.json + DIR/params, see clip_jax.params_io),
  a training workdir (its latest step), its checkpoints/ dir or one checkpoints/<step> dir,
  or a pretrained name (clip_jax.pretrained: openai:NAME, open_clip:ARCH/TAG, hf-hub:ORG/REPO,
  local-dir:PATH), converted once into the cache.
  The params are unboxed, in the layer layout of the returned config (`scan_layers`); a
  ResNet's carry its BatchNorm running statistics under the top-level key `batch_stats`.

  weights: of a trainer checkpoint of a run with config.ema_decay, "auto" and "ema" read the
  EMA weights (float32; a ResNet's with the EMA of its running statistics), "params" the
  trained ones; "ema" is a ValueError for a checkpoint without EMA weights (a converted dir
  never has them).
  """
  check_weights(weights)
  from clip_jax import pretrained  # pylint: disable=g-import-not-at-top
  if pretrained.is_name(path):  # openai:NAME, open_clip:ARCH/TAG, hf-hub:..., local-dir:...
    path = str(pretrained.resolve(path))
  if params_io.is_converted_dir(path):
    if weights == "ema":
      raise ValueError(f"{path} is a converted model (one set of weights, no EMA); weights="
                       "'ema' needs a training checkpoint of a run with config.ema_decay")
    return params_io.load_params(path)
  directory, step = _resolve_step(path)
  step_dir = directory / str(step)
  model_config = CLIPConfig.from_dict(json.loads((step_dir / "model_config" / "metadata").read_text()))
  saved_ema = has_ema(saved_state_tree(step_dir / "state"))
  if weights == "ema" and not saved_ema:
    raise ValueError(f"{step_dir} has no EMA weights (its run had config.ema_decay=0); use "
                     "weights 'params' or 'auto'")
  use_ema = saved_ema and weights != "params"
  shapes = abstract_loaded_params(create_model(model_config))
  item = {"params": _shape_tree({k: v for k, v in shapes.items() if k != BATCH_STATS})}
  if BATCH_STATS in shapes:
    item[BATCH_STATS] = _shape_tree(shapes[BATCH_STATS])
  if use_ema:  # TrainState.ema holds the same two trees (step.initial_ema)
    item = {"ema": item}
  restored = ocp.PyTreeCheckpointer().restore(
      step_dir / "state",
      args=ocp.args.PyTreeRestore(item=item,
                                  restore_args=ocp.checkpoint_utils.construct_restore_args(item),
                                  partial_restore=True))
  if use_ema:
    restored = restored["ema"]
    logging.info("%s: the EMA weights of step %d", step_dir, step)
  return with_batch_stats(restored["params"], restored.get(BATCH_STATS)), model_config


# ----------------------------------------------------------------------------------------------
# init_from: a converted pretrained checkpoint or another run, whole or per tower.
# ----------------------------------------------------------------------------------------------
def load_init_params(config, model_config: CLIPConfig, target_params, target_batch_stats=None
                     ) -> dict:
  """The towers named by config.init_towers, read from config.init_from: {key: params} (host
  arrays in the model's dtypes), checked against the model's abstract `target_params`. With
  the image tower of a ResNet comes its BatchNorm running statistics (`target_batch_stats`),
  under the key `batch_stats`."""
  from clip_jax.step import TOWER_PARAMS  # pylint: disable=g-import-not-at-top
  loaded, loaded_config = restore_params(config.init_from, config.get("init_weights", "auto"))
  if loaded_config.scan_layers != model_config.scan_layers:
    loaded = (scan_params if model_config.scan_layers else unscan_params)(loaded)
  grid = model_config.vision.grid_size
  if loaded_config.vision.grid_size != grid and config.init_towers in ("both", "image"):
    logging.info("init_from: interpolating the position embedding from %dx%d to %dx%d patches",
                 loaded_config.vision.grid_size, loaded_config.vision.grid_size, grid, grid)
    loaded = interpolate_pos_embed(loaded, grid)
  if config.init_towers == "both":
    keys = tuple(target_params)
  else:
    keys = (TOWER_PARAMS[config.init_towers],)
  taken = {}
  for key in keys:
    if key not in loaded:
      raise ValueError(f"config.init_from={config.init_from} has no {key!r} parameters")
    want, got = target_params[key], loaded[key]
    if (jax.tree.structure(want) != jax.tree.structure(got)
        or [x.shape for x in jax.tree.leaves(want)] != [x.shape for x in jax.tree.leaves(got)]):
      raise ValueError(f"config.init_from={config.init_from}: the {key!r} parameters of "
                       f"{loaded_config.name} do not match config.model={config.model}")
    taken[key] = jax.tree.map(lambda x, ref: np.asarray(x, ref.dtype), got, want)
  if target_batch_stats and "visual" in taken:
    got = loaded.get(BATCH_STATS, {})
    if jax.tree.structure(got) != jax.tree.structure(target_batch_stats):
      raise ValueError(f"config.init_from={config.init_from}: its BatchNorm running statistics "
                       f"do not match config.model={config.model}")
    taken[BATCH_STATS] = jax.tree.map(lambda x, ref: np.asarray(x, ref.dtype), got,
                                      target_batch_stats)
  logging.info("init_from %s: took %s", config.init_from, ", ".join(keys))
  return taken
