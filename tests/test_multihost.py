"""Multi-process JAX on one machine: 2 processes x 4 CPU devices over gloo (launch/local.py).

The collectives tests run a small script; the trainer tests run `python -m clip_jax.train` on
the tiny config as 2 processes x 4 devices and compare with 1 process x 8 devices.
"""
import json
import os
import pathlib
import re
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from clip_jax import distributed

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCAL = [sys.executable, str(REPO / "launch" / "local.py")]

WORKER = textwrap.dedent("""\
    import os, sys
    sys.path.insert(0, os.getcwd())
    from clip_jax import distributed
    import jax, jax.numpy as jnp, numpy as np
    from jax.experimental import multihost_utils
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

    def say(*parts, file=sys.stdout):
      # One write per line: the launcher sets PYTHONUNBUFFERED, so print would issue a write
      # per argument, and gloo's own log lines (written from another thread) could land
      # inside ours.
      file.write(" ".join(str(p) for p in parts) + "\\n")
      file.flush()

    mode = sys.argv[1]
    if mode == "flags":  # coordinates from --coordinator_address/--num_processes/--process_id
      from absl import flags
      for name in ("COORDINATOR_ADDRESS", "NUM_PROCESSES", "PROCESS_ID"):
        del os.environ["CLIP_JAX_" + name]
      flags.FLAGS([sys.argv[0]] + sys.argv[2:])
    assert distributed.initialize(), "expected a multi-process start"
    pid = jax.process_index()
    say("topology", pid, jax.process_count(), jax.local_device_count(), jax.device_count())
    mesh = Mesh(np.array(jax.devices()), ("data",))
    sharding = NamedSharding(mesh, P("data"))
    # Each process holds 4 rows of the global [8] array: 4*pid .. 4*pid+3.
    x = jax.make_array_from_process_local_data(sharding, np.arange(4, dtype=np.float32) + 4 * pid)
    total = jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x)
    say("sum", float(total))
    say("allgather", multihost_utils.process_allgather(np.array([pid * 10])).ravel().tolist())
    config = {"batch_size": 16, "model": "tiny"}
    workdir = "gs://b/run"
    if mode == "mismatch":
      config["batch_size"] += pid  # process 1 runs another config
    if mode == "mismatch_workdir":
      workdir += str(pid)
    try:
      say("config_hash", distributed.check_same_config(config, workdir=workdir))
    except ValueError as e:
      say(f"error: {e}", file=sys.stderr)
      sys.exit(2)
    if mode == "die":
      # A collective every step; process 1 is killed in the middle of the run.
      step = 0
      while True:
        step += 1
        float(jax.jit(jnp.sum, out_shardings=NamedSharding(mesh, P()))(x))
        if pid == 1 and step == 20:
          say("process 1: dying")
          os.kill(os.getpid(), 9)
    """)


def _launch(args, *, timeout=180, cwd=REPO):
  start = time.monotonic()
  result = subprocess.run(LOCAL + args, capture_output=True, text=True, timeout=timeout, cwd=cwd)
  return result, time.monotonic() - start


def _lines(stdout: str, process: int) -> list[str]:
  prefix = f"[p{process}] "
  return [line[len(prefix):] for line in stdout.splitlines() if line.startswith(prefix)]


def _said(text: str, stdout: str, *processes: int) -> bool:
  """Whether one of `processes` printed the line `text`. The worker writes each line in one
  write, so it ends a line of the output; gloo writes its log lines in pieces from another
  thread, and the start of one may precede ours on the same line."""
  return any(line.endswith(text) for p in processes for line in _lines(stdout, p))


@pytest.fixture(scope="module")
def worker(tmp_path_factory):
  path = tmp_path_factory.mktemp("multihost") / "worker.py"
  path.write_text(WORKER)
  return str(path)


# ----------------------------------------------------------------------------- resolve (unit)
def test_resolve_sources_and_precedence():
  env = {distributed.ENV_COORDINATOR: "h:1", distributed.ENV_NUM_PROCESSES: "4",
         distributed.ENV_PROCESS_ID: "3"}
  assert distributed.resolve(env=env) == (
      "explicit", {"coordinator_address": "h:1", "num_processes": 4, "process_id": 3})
  # Arguments win over the environment.
  assert distributed.resolve(process_id=1, env=env)[1]["process_id"] == 1
  assert distributed.resolve(env={}) == ("single", {})
  assert distributed.resolve(num_processes=1, env={}) == ("single", {})
  slurm = {"SLURM_JOB_ID": "7", "SLURM_STEP_NODELIST": "n[1-2]", "SLURM_NTASKS": "2"}
  assert distributed.resolve(env=slurm) == ("slurm", {})
  # The batch script itself (no srun step) or a one-task job is one process.
  assert distributed.resolve(env={"SLURM_JOB_ID": "7", "SLURM_NTASKS": "2"})[0] == "single"
  assert distributed.resolve(env=dict(slurm, SLURM_NTASKS="1"))[0] == "single"


@pytest.mark.parametrize("kwargs, env, message", [
    ({"num_processes": 2}, {}, "needs --coordinator_address --process_id too"),
    ({"num_processes": 2, "process_id": 2, "coordinator_address": "h:1"}, {},
     "--process_id=2 must be in [0, 2)"),
    ({"num_processes": 2, "process_id": 0, "coordinator_address": "h"}, {}, "must be HOST:PORT"),
    ({}, {distributed.ENV_NUM_PROCESSES: "two"}, "$CLIP_JAX_NUM_PROCESSES='two' must be an "
     "integer"),
    ({"num_processes": 0}, {}, "--num_processes=0 must be >= 1"),
])
def test_resolve_errors_are_one_line(kwargs, env, message):
  with pytest.raises(ValueError) as e:
    distributed.resolve(**kwargs, env=env)
  assert message in str(e.value) and "\n" not in str(e.value)


def test_initialize_single_process_is_a_no_op():
  assert distributed.initialize() is False
  assert distributed.check_same_config({"a": 1}) == distributed.config_hash({"a": 1})


def test_config_hash_ignores_key_order_but_not_values():
  import ml_collections
  a = ml_collections.ConfigDict({"x": 1, "data": {"path": "p", "source": "wds"}})
  b = ml_collections.ConfigDict({"data": {"source": "wds", "path": "p"}, "x": 1})
  assert distributed.config_hash(a) == distributed.config_hash(b)
  b.data.path = "q"
  assert distributed.config_hash(a) != distributed.config_hash(b)


# ----------------------------------------------------------------------------- 2 processes
def test_two_processes_collectives_and_same_config(worker):
  result, _ = _launch(["--processes", "2", "--devices-per-process", "4", "--",
                       sys.executable, worker, "ok"])
  assert result.returncode == 0, result.stdout + result.stderr
  digest = distributed.config_hash({"batch_size": 16, "model": "tiny"}, workdir="gs://b/run")
  for p in (0, 1):
    assert _said(f"topology {p} 2 4 8", result.stdout, p)
    assert _said("sum 28.0", result.stdout, p)  # 0 + 1 + ... + 7 across both processes' devices
    assert _said("allgather [0, 10]", result.stdout, p)
    assert _said(f"config_hash {digest}", result.stdout, p)


def test_two_processes_from_flags(worker):
  result, _ = _launch(["--processes", "2", "--devices-per-process", "4", "--append-flags", "--",
                       sys.executable, worker, "flags"])
  assert result.returncode == 0, result.stdout + result.stderr
  for p in (0, 1):
    assert _said(f"topology {p} 2 4 8", result.stdout, p)
    assert _said("sum 28.0", result.stdout, p)


def test_config_mismatch_fails_clearly(worker):
  result, _ = _launch(["--processes", "2", "--devices-per-process", "4", "--",
                       sys.executable, worker, "mismatch"])
  assert result.returncode == 2
  expected = ("error: the config differs across processes: process(es) [1] differ from process 0 "
              "in ['batch_size'] (batch_size: p0=16 p1=17); run the same command and config on "
              "every host")
  assert _said(expected, result.stdout, 0, 1)


def test_workdir_mismatch_fails_clearly(worker):
  result, _ = _launch(["--processes", "2", "--devices-per-process", "4", "--",
                       sys.executable, worker, "mismatch_workdir"])
  assert result.returncode == 2
  assert ("error: the config differs across processes: process(es) [1] differ from process 0 "
          "in ['--workdir'] (--workdir: p0='gs://b/run0' p1='gs://b/run1')") in result.stdout


def test_killed_process_ends_the_job_within_60s(worker):
  result, elapsed = _launch(["--processes", "2", "--devices-per-process", "4", "--grace", "5",
                             "--", sys.executable, worker, "die"], timeout=120)
  assert result.returncode == 128 + signal.SIGKILL
  assert elapsed < 60
  assert "[launch] process 1 was killed by SIGKILL; stopping process(es) [0]" in result.stdout


# ----------------------------------------------------------------------------- the trainer
TINY = ["--config=configs/tiny.py", "--config.total_steps=4", "--config.checkpoint_every=2",
        "--config.eval_every=-1"]


def _train_cmd(workdir, *extra):
  return [sys.executable, "-m", "clip_jax.train", *TINY, f"--workdir={workdir}", *extra]


def _metrics(workdir) -> list[dict]:
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _trainer_calls_distributed() -> bool:
  source = (REPO / "clip_jax" / "train.py").read_text()
  return "distributed.initialize(" in source and "check_same_config(" in source


needs_trainer = pytest.mark.skipif(
    not _trainer_calls_distributed(),
    reason="clip_jax/train.py does not call clip_jax.distributed.initialize() yet")


def _mixture_flags(directory) -> list[str]:
  """A mixture of the synthetic shapes and a csv of 12 random 32px images (both random
  access: the same global batches on any number of processes)."""
  from PIL import Image  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(0)
  (directory / "images").mkdir()
  rows = ["filepath\ttitle"]
  for i in range(12):
    Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(
        directory / "images" / f"{i}.png")
    rows.append(f"images/{i}.png\ta noisy tile number {i}")
  (directory / "train.tsv").write_text("\n".join(rows) + "\n")
  return ["--config.data.source=mix", f"--config.data.path=synthetic::csv:{directory}/train.tsv",
          "--config.data.mix_weights=1::1"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The tiny config, 4 steps on a mixture: 2 processes x 4 devices and 1 process x 8
  devices, together."""
  root = tmp_path_factory.mktemp("runs")
  multi, single = root / "2x4", root / "1x8"
  data = root / "data"
  data.mkdir()
  flags = _mixture_flags(data)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=8")
  reference = subprocess.Popen(_train_cmd(single, *flags), cwd=REPO, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  result, _ = _launch(["--processes", "2", "--devices-per-process", "4", "--",
                       *_train_cmd(multi, *flags)], timeout=600)
  reference_out = reference.communicate(timeout=600)[0]
  assert reference.returncode == 0, reference_out[-3000:]
  assert result.returncode == 0, result.stdout[-5000:] + result.stderr[-2000:]
  return {"multi": multi, "single": single, "stdout": result.stdout, "flags": flags}


@needs_trainer
def test_two_process_losses_match_one_process(runs):
  multi, single = _metrics(runs["multi"]), _metrics(runs["single"])
  assert [m["step"] for m in multi] == [1, 2, 3, 4]
  assert [m["step"] for m in single] == [1, 2, 3, 4]
  np.testing.assert_allclose([m["loss"] for m in multi], [m["loss"] for m in single],
                             rtol=0, atol=1e-5)
  # The runs moved: a loss that never changed would make the comparison empty.
  assert np.ptp([m["loss"] for m in multi]) > 1e-3
  # The mixture drew the same sources for the same positions: each source's count, summed
  # over the two processes, is the one process's.
  counts = [(m["data/synthetic/samples"], m["data/csv/samples"]) for m in multi]
  assert counts == [(m["data/synthetic/samples"], m["data/csv/samples"]) for m in single]
  assert [a + b for a, b in counts] == [16, 32, 48, 64] and 0 < counts[-1][1] < 64


@needs_trainer
def test_only_process_0_writes_metrics(runs):
  # One line per step (a second writer would duplicate or interleave them), one events file.
  steps = [m["step"] for m in _metrics(runs["multi"])]
  assert steps == sorted(set(steps))
  assert len(list(runs["multi"].glob("events.out.tfevents.*"))) == 1
  step_line = re.compile(r"^step \d+/4 ")
  assert any(step_line.match(line) for line in _lines(runs["stdout"], 0))
  assert not any(step_line.match(line) for line in _lines(runs["stdout"], 1))


@needs_trainer
@pytest.mark.parametrize("num_devices", [8, 1])
def test_two_process_checkpoint_restores_on_one_process(runs, num_devices):
  import jax
  from clip_jax import checkpoint, sharding, step as step_lib
  from configs import tiny
  config = tiny.get_config()
  with config.unlocked():
    config.total_steps = 4
  mesh = sharding.create_mesh(config, devices=jax.devices()[:num_devices])
  abstract_state, shardings = step_lib.abstract_train_state(config, mesh)

  def restore(workdir):
    checkpointer = checkpoint.Checkpointer(str(workdir), checkpoint_every=2, keep_checkpoints=3)
    assert checkpointer.latest_step() == 4
    state, data_state, _ = checkpointer.restore(4, abstract_state, shardings)
    checkpointer.close()
    return state, data_state

  state, data_state = restore(runs["multi"])
  assert int(state.step) == 4
  # Written for 2 processes: a 1-process run restarts the input instead of misreading it.
  assert data_state is None
  leaf = jax.tree.leaves(state.params)[0]
  assert len(leaf.sharding.device_set) == num_devices
  # The same parameters as the 1-process 8-device run's step 4 (an independent run).
  reference, _ = restore(runs["single"])
  for got, want in zip(jax.tree.leaves(state.params), jax.tree.leaves(reference.params)):
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-5)


@needs_trainer
def test_trainer_config_mismatch_fails_before_compiling(tmp_path):
  # Process 1 gets another seed: every process stops with one line naming the field.
  cmd = " ".join(_train_cmd(tmp_path / "run")) + " --config.seed=$CLIP_JAX_PROCESS_ID"
  result, elapsed = _launch(["--processes", "2", "--devices-per-process", "4", "--",
                             "bash", "-c", cmd], timeout=300)
  assert result.returncode == 2, result.stdout[-3000:]
  assert ("error: the config differs across processes: process(es) [1] differ from process 0 "
          "in ['seed']") in result.stdout
  assert not (tmp_path / "run" / "checkpoints").exists()


@needs_trainer
@pytest.mark.slow
def test_two_process_checkpoint_resumes_in_a_one_device_run(runs, tmp_path):
  workdir = tmp_path / "resumed"
  shutil.copytree(runs["multi"], workdir)
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS="--xla_force_host_platform_device_count=1")
  cmd = _train_cmd(workdir, *runs["flags"])
  cmd[cmd.index("--config.total_steps=4")] = "--config.total_steps=6"
  result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "at step 4" in result.stderr
  assert "input continues after the 4 global batches" in result.stderr
  resumed = _metrics(workdir)
  assert [m["step"] for m in resumed] == [1, 2, 3, 4, 5, 6]
  # The input continued where the 2-process run stopped: steps 5 and 6 see the batches
  # of the 1-process run resumed the same way, whose own iterator state applies, so the
  # losses agree (the mixture's draw is the same on any number of processes).
  reference = tmp_path / "reference"
  shutil.copytree(runs["single"], reference)
  ref_cmd = _train_cmd(reference, *runs["flags"])
  ref_cmd[ref_cmd.index("--config.total_steps=4")] = "--config.total_steps=6"
  result = subprocess.run(ref_cmd, cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
  assert result.returncode == 0, result.stderr[-3000:]
  assert "input continues" not in result.stderr
  want = [m["loss"] for m in _metrics(reference) if m["step"] in (5, 6)]
  np.testing.assert_allclose([m["loss"] for m in resumed if m["step"] in (5, 6)], want,
                             rtol=1e-4)


@needs_trainer
@pytest.mark.slow
def test_trainer_killed_mid_run_ends_the_job_within_60s(tmp_path):
  proc = subprocess.Popen(LOCAL + ["--processes", "2", "--devices-per-process", "4", "--",
                                   *_train_cmd(tmp_path / "run", "--config.total_steps=1000")],
                          cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
  pids, output = {}, []
  deadline = time.monotonic() + 500
  for line in proc.stdout:
    output.append(line)
    found = re.match(r"\[launch\] process (\d): pid (\d+)", line)
    if found:
      pids[int(found.group(1))] = int(found.group(2))
    if line.startswith("[p0] step 2/1000"):
      break
    assert time.monotonic() < deadline, "".join(output[-50:])
  killed_at = time.monotonic()
  os.kill(pids[1], signal.SIGKILL)
  output.append(proc.communicate(timeout=120)[0])
  elapsed = time.monotonic() - killed_at
  text = "".join(output)
  assert proc.returncode == 128 + signal.SIGKILL, text[-3000:]
  assert elapsed < 60
  assert "[launch] process 1 was killed by SIGKILL; stopping process(es) [0]" in text
