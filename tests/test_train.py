"""The trainer in-process on 8 simulated devices: logged keys (jsonl + TensorBoard), the NaN
stop, init_from (both towers; one tower, frozen), the persistent compilation cache."""
import pathlib
import sys
import time

import jax
import numpy as np
import pytest

from clip_jax import checkpoint as ckpt_lib
from clip_jax import metrics as metrics_lib
from clip_jax import train as train_lib
from clip_jax.data import pipeline

REPO = pathlib.Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from configs import tiny  # noqa: E402  pylint: disable=g-import-not-at-top

INPUT_DELAY_S = 0.05
LOGGED_KEYS = {"step", "loss", "learning_rate", "logit_scale", "samples_per_s", "step_time_s",
               "grad_norm", "data/skipped_samples", "data/wait_s"}


def _config(**overrides):
  config = tiny.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return config


@pytest.fixture(scope="module")
def compilation_cache(tmp_path_factory):
  """A persistent compilation cache for this module's runs (config.compilation_cache_dir),
  keeping even sub-second compiles; off again afterwards."""
  from jax.experimental.compilation_cache import compilation_cache as cache_lib
  path = tmp_path_factory.mktemp("compilation_cache")
  min_compile_s = jax.config.jax_persistent_cache_min_compile_time_secs
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  yield path
  jax.config.update("jax_persistent_cache_min_compile_time_secs", min_compile_s)
  jax.config.update("jax_compilation_cache_dir", None)
  cache_lib.reset_cache()


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, compilation_cache):
  """A tiny run of 8 steps: checkpoints at 4 and 8, every step logged, eval at the end,
  a profiler trace of steps 2-3, compiled programs saved in a compilation cache."""
  workdir = tmp_path_factory.mktemp("base")
  fetch = pipeline.DataIterator.__next__

  def slow_fetch(self):  # an input pipeline slower than the tiny step: data/wait_s shows it
    time.sleep(INPUT_DELAY_S)
    return fetch(self)

  with pytest.MonkeyPatch.context() as patch:
    patch.setattr(pipeline.DataIterator, "__next__", slow_fetch)
    final = train_lib.train(_config(total_steps=8, profile_start_step=2, profile_steps=2,
                                    compilation_cache_dir=str(compilation_cache)),
                            str(workdir))
  return workdir, final


def test_profile_window_writes_a_trace(base_run):
  workdir, _ = base_run
  traces = list((workdir / "profile").rglob("*.xplane.pb"))
  assert traces and traces[0].stat().st_size > 0


def test_metrics_jsonl_and_tensorboard_carry_the_named_keys(base_run):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  workdir, final = base_run
  records = metrics_lib.read_jsonl(workdir / "metrics.jsonl")
  steps = [r for r in records if "loss" in r]
  assert [r["step"] for r in steps] == list(range(1, 9))
  for record in steps:
    assert LOGGED_KEYS <= set(record), set(record)
    assert "mfu" not in record  # the CPU has no known peak
    assert record["data/skipped_samples"] == 0
    assert record["data/wait_s"] >= INPUT_DELAY_S, record
  # Every step logged: the waits are part of the run's wall time.
  assert sum(r["data/wait_s"] for r in steps) <= sum(r["step_time_s"] for r in steps)
  # Warmup of 2 steps then cosine: the logged lr is the schedule's value at that step.
  assert steps[0]["learning_rate"] < steps[1]["learning_rate"]
  assert steps[-1]["learning_rate"] < steps[2]["learning_rate"]
  evals = [r for r in records if "eval/synthetic/top1" in r]
  assert [r["step"] for r in evals] == [8]
  assert 0.0 <= evals[0]["eval/synthetic/top1"] <= evals[0]["eval/synthetic/top5"] <= 1.0
  assert final["eval/synthetic/top1"] == evals[0]["eval/synthetic/top1"]
  assert final["loss"] == steps[-1]["loss"]

  events = EventAccumulator(str(workdir))
  events.Reload()
  tags = set(events.Tags()["scalars"])
  assert (LOGGED_KEYS - {"step"}) | {"eval/synthetic/top1"} <= tags
  np.testing.assert_allclose([e.value for e in events.Scalars("loss")],
                             [r["loss"] for r in steps], rtol=1e-6)
  assert ckpt_lib.Checkpointer(str(workdir), checkpoint_every=4,
                               keep_checkpoints=3).all_steps() == [4, 8]


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path):
  # Step 8 is a checkpoint step: its state must not be saved.
  config = _config(total_steps=12, debug_nan_at_step=8, eval_every=-1)
  with pytest.raises(train_lib.NonFiniteLossError, match="step 8: non-finite loss"):
    train_lib.train(config, str(tmp_path))
  checkpointer = ckpt_lib.Checkpointer(str(tmp_path), checkpoint_every=4, keep_checkpoints=3)
  assert checkpointer.all_steps() == [4]
  checkpointer.close()
  logged = [r["step"] for r in metrics_lib.read_jsonl(tmp_path / "metrics.jsonl")]
  assert max(logged) == 7


def test_init_from_with_a_frozen_image_tower(base_run, tmp_path):
  base_dir, _ = base_run
  base_params, _ = ckpt_lib.restore_params(str(base_dir))
  config = _config(total_steps=3, init_from=str(base_dir), init_towers="image", eval_every=-1)
  config.optimizer.freeze = "image"
  train_lib.train(config, str(tmp_path))
  params, _ = ckpt_lib.restore_params(str(tmp_path))
  # The image tower is the base run's, untouched by 3 steps; the text tower trained from a
  # fresh init, so it is not the base run's.
  jax.tree.map(np.testing.assert_array_equal, params["visual"], base_params["visual"])
  text_diff = jax.tree.map(lambda a, b: float(np.max(np.abs(a - b))), params["text"],
                           base_params["text"])
  assert max(jax.tree.leaves(text_diff)) > 1e-3


def test_init_from_both_towers_starts_from_the_checkpoint(base_run, tmp_path,
                                                          compilation_cache):
  """Every parameter loaded (no random init needed): at learning rate 0 the one step leaves
  them exactly the base run's."""
  base_dir, _ = base_run
  base_params, _ = ckpt_lib.restore_params(str(base_dir))
  config = _config(total_steps=1, init_from=str(base_dir), eval_every=-1,
                   compilation_cache_dir=str(compilation_cache))
  config.optimizer.learning_rate = 0.0
  hits = []

  def count_hits(event, **_):
    hits.extend([event] if event == "/jax/compilation_cache/cache_hits" else [])

  jax.monitoring.register_event_listener(count_hits)
  try:
    train_lib.train(config, str(tmp_path))
  finally:
    jax.monitoring.unregister_event_listener(count_hits)
  params, _ = ckpt_lib.restore_params(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params, base_params)
  # The base run filled the cache; this run loaded (some of) its programs from it.
  assert any(compilation_cache.iterdir()) and hits


def test_unusable_compilation_cache_dir_is_one_clear_error(tmp_path):
  (tmp_path / "file").write_text("")
  config = _config(total_steps=1, compilation_cache_dir=str(tmp_path / "file" / "cache"))
  with pytest.raises(train_lib.SetupError, match="compilation_cache_dir=.* cannot be created"):
    train_lib.train(config, str(tmp_path / "run"))


def test_init_from_mismatched_model_is_one_clear_error(base_run, tmp_path):
  base_dir, _ = base_run
  config = _config(total_steps=1, init_from=str(base_dir), eval_every=-1)
  config.model = "vitb32"
  config.image_size = 32
  with pytest.raises(train_lib.SetupError, match="do not match config.model=vitb32"):
    train_lib.train(config, str(tmp_path))


def test_run_longer_than_the_int32_step_is_one_clear_error(tmp_path):
  # 32 epochs of 2**30 samples at batch 16: 2**31 steps, one more than the int32 step holds.
  config = _config(total_steps=None, epochs=32.0, num_train_examples=2**30)
  with pytest.raises(train_lib.SetupError) as error:
    train_lib.train(config, str(tmp_path))
  assert str(error.value) == (
      "total_steps=2147483648 (config.epochs * config.num_train_examples / config.batch_size) "
      "exceeds 2147483647, the largest step the train state holds (int32); raise "
      "config.batch_size or set config.total_steps")
  assert not (tmp_path / "checkpoints").exists()
  config.total_steps = train_lib.MAX_STEPS
  train_lib.validate_config(config)
  config.optimizer.warmup_steps = 2**31
  with pytest.raises(ValueError, match=r"^config.optimizer.warmup_steps=2147483648 exceeds"):
    train_lib.validate_config(config)


def test_skipped_samples_beyond_int32_are_counted():
  counters = {"data/skipped_samples": 5_000_000_000, "data/mix/samples": 2**40 + 3}
  assert train_lib.input_stats(counters, 0.25) == dict(counters, **{"data/wait_s": 0.25})
