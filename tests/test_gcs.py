"""Everything on gs://, against a local GCS server (fake-gcs-server on 127.0.0.1) behind a
fault-injecting proxy (tests/gcs_testing.py): training data, the workdir (Orbax checkpoints
kept by policy, metrics.jsonl, TensorBoard events, config.json), the compilation cache,
exact resume after SIGTERM and SIGKILL, and the faults of real pods: transient errors,
persistent outages of a shard or of checkpoint writes, stalled connections, failing
metric writes and compilation-cache errors.
"""
import json
import os
import pathlib
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

import gcs_testing

REPO = pathlib.Path(__file__).resolve().parents[1]
BUCKET = "clip-jax-test"
STEPS = 24
# A tiny 24-step run on 2 devices reading wds shards; every step logged, a checkpoint every
# 4 steps, the latest 2 kept (plus every 8th: the resume tests need an early one).
FLAGS = [f"--config.total_steps={STEPS}", "--config.eval_every=-1", "--config.keep_every=8",
         "--config.keep_checkpoints=2", "--config.data.source=wds",
         f"--config.data.path=gs://{BUCKET}/shards/{{00000..00003}}.tar",
         "--config.data.shuffle_buffer=1", "--config.data.num_workers=0",
         "--config.storage.min_rewrite_interval_s=0.5"]


@pytest.fixture(scope="module")
def gcs(tmp_path_factory):
  """The server and proxy, with this process's clients pointed at them."""
  root = tmp_path_factory.mktemp("gcs")
  server = gcs_testing.LocalGcs(str(root)).start()
  server.create_bucket(BUCKET)
  saved = dict(os.environ)
  os.environ.update(server.env(str(root)))
  os.environ.pop("GOOGLE_APPLICATION_CREDENTIALS", None)
  import gcsfs  # pylint: disable=import-outside-toplevel
  gcsfs.GCSFileSystem.clear_instance_cache()
  try:
    _upload_shards(server)
    yield server
  finally:
    server.stop()
    gcsfs.GCSFileSystem.clear_instance_cache()
    os.environ.clear()
    os.environ.update(saved)


@pytest.fixture(autouse=True)
def no_faults(request):
  """Every test starts with a proxy that forwards everything."""
  if "gcs" in request.fixturenames:
    request.getfixturevalue("gcs").proxy.clear()
  yield


def _fs():
  import fsspec  # pylint: disable=import-outside-toplevel
  return fsspec.filesystem("gs")


def _upload_shards(server):
  from clip_jax.data import wds  # pylint: disable=import-outside-toplevel
  local = pathlib.Path(server.root) / "shards"
  local.mkdir()
  rng = np.random.default_rng(0)
  fs = _fs()
  for s in range(4):
    samples = [(f"{s:02d}{i:03d}", rng.integers(0, 255, (40, 40, 3), dtype=np.uint8),
                f"a photo of shard {s} sample {i}", {"i": i}) for i in range(24)]
    wds.write_shard(str(local / f"{s:05d}.tar"), samples)
    fs.put_file(str(local / f"{s:05d}.tar"), f"{BUCKET}/shards/{s:05d}.tar")


def _env(gcs, devices=2):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
             JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO))
  env.update(gcs.env(gcs.root))
  return env


def _command(workdir, *flags):
  return [sys.executable, "-m", "clip_jax.train", "--config=configs/tiny.py",
          f"--workdir={workdir}", *FLAGS, *flags]


def _run(gcs, workdir, *flags, timeout=300):
  return subprocess.run(_command(workdir, *flags), cwd=REPO, env=_env(gcs),
                        capture_output=True, text=True, timeout=timeout)


def _start(gcs, workdir, *flags):
  proc = subprocess.Popen(_command(workdir, *flags), cwd=REPO, env=_env(gcs),
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  out, err = [], []
  for stream, sink in ((proc.stdout, out), (proc.stderr, err)):
    threading.Thread(target=lambda s=stream, k=sink: k.extend(iter(s.readline, "")),
                     daemon=True).start()
  return proc, out, err


def _wait_for(condition, timeout=240, proc=None):
  deadline = time.time() + timeout
  while time.time() < deadline:
    if condition():
      return True
    if proc is not None and proc.poll() is not None:
      return False
    time.sleep(0.05)
  return False


def _losses(workdir) -> dict[int, float]:
  from clip_jax import metrics  # pylint: disable=import-outside-toplevel
  return {r["step"]: r["loss"] for r in metrics.read_jsonl(f"{workdir}/metrics.jsonl")
          if "loss" in r}


def _printed_step(out) -> int:
  steps = [int(line.split()[1].split("/")[0]) for line in list(out) if line.startswith("step ")]
  return max(steps, default=0)


def _committed_steps(workdir) -> list[int]:
  fs = _fs()
  fs.invalidate_cache()
  path = workdir.removeprefix("gs://") + "/checkpoints"
  if not fs.exists(path):
    return []
  return sorted(int(p.rstrip("/").rsplit("/", 1)[-1]) for p in fs.ls(path)
                if p.rstrip("/").rsplit("/", 1)[-1].isdigit()
                and fs.exists(p.rstrip("/") + "/commit_success.txt"))


def _assert_same_losses(got, want, first):
  assert sorted(got) == list(range(1, STEPS + 1))
  np.testing.assert_allclose([got[s] for s in range(first, STEPS + 1)],
                             [want[s] for s in range(first, STEPS + 1)], rtol=0, atol=1e-6)


@pytest.fixture(scope="module")
def reference(gcs):
  """An uninterrupted run with everything on gs://, the compilation cache too."""
  workdir = f"gs://{BUCKET}/reference"
  proc = _run(gcs, workdir, f"--config.compilation_cache_dir=gs://{BUCKET}/jax_cache")
  assert proc.returncode == 0, proc.stderr[-4000:]
  return workdir, _losses(workdir), proc


def test_a_run_writes_its_whole_workdir_to_gs(gcs, reference):
  workdir, losses, _ = reference
  assert sorted(losses) == list(range(1, STEPS + 1))
  # keep_checkpoints=2 and keep_every=8: the older steps were deleted from the bucket.
  assert _committed_steps(workdir) == [8, 16, 20, 24]
  fs = _fs()
  names = [p.rsplit("/", 1)[-1] for p in fs.ls(workdir.removeprefix("gs://"))]
  assert "config.json" in names and "metrics.jsonl" in names
  config = json.loads(fs.cat(workdir.removeprefix("gs://") + "/config.json"))
  assert config["data"]["path"].startswith("gs://")
  events = [n for n in names if n.startswith("events.out.tfevents")]
  assert events
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  local = pathlib.Path(gcs.root) / "events"
  local.mkdir(exist_ok=True)
  fs.get(f"{workdir.removeprefix('gs://')}/{events[0]}", str(local / events[0]))
  accumulator = event_accumulator.EventAccumulator(str(local))
  accumulator.Reload()
  assert [e.step for e in accumulator.Scalars("loss")] == list(range(1, STEPS + 1))
  # The compilation cache on gs:// holds the compiled train step.
  assert fs.ls(f"{BUCKET}/jax_cache")


def test_sigterm_with_transient_faults_resumes_exactly(gcs, reference):
  """Preempted mid-run while data reads, checkpoint writes, metric writes and (after the
  restart) checkpoint restores see 503s, 429s, resets and truncated bodies: retried, and
  the per-step losses equal the uninterrupted run's."""
  _, want, _ = reference
  workdir = f"gs://{BUCKET}/sigterm"
  proxy = gcs.proxy
  name = r"sigterm(/|%2F)"  # gcsfs names objects plainly, tensorstore URL-encoded
  for kind, kwargs in [("status", dict(status=503, path=r"shards.*alt=media", times=2)),
                       ("status", dict(status=429, path=r"shards.*alt=media", times=1)),
                       ("reset", dict(path=r"shards.*alt=media", times=1)),
                       ("truncate", dict(path=r"shards.*alt=media", times=1)),
                       ("status", dict(status=503, method="POST", path=name + "checkpoints",
                                       times=3)),
                       ("reset", dict(method="POST", path=name + "checkpoints", times=1)),
                       ("status", dict(status=503, method="POST", path=name + "metrics",
                                       times=2))]:
    proxy.add(kind, **kwargs)
  proc, out, err = _start(gcs, workdir)
  assert _wait_for(lambda: _printed_step(out) >= 6, proc=proc), "".join(err)[-3000:]
  proc.send_signal(signal.SIGTERM)
  assert proc.wait(timeout=240) == 0, "".join(err)[-3000:]
  assert "preempted: saved step" in "".join(err)
  steps = _committed_steps(workdir)
  assert steps and steps[-1] < STEPS, steps
  assert all(f.hits for f in proxy.faults), [(f.kind, f.path, f.hits) for f in proxy.faults]

  proxy.clear()
  for kind, kwargs in [("status", dict(status=503, method="GET", path=name + "checkpoints",
                                       times=3)),
                       ("reset", dict(method="GET", path=name + r"checkpoints.*alt=media",
                                      times=1)),
                       ("truncate", dict(method="GET", path=name + r"checkpoints.*alt=media",
                                         times=1))]:
    proxy.add(kind, **kwargs)
  proc = _run(gcs, workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"at step {steps[-1]}" in proc.stderr
  assert all(f.hits for f in proxy.faults), [(f.kind, f.path, f.hits) for f in proxy.faults]
  _assert_same_losses(_losses(workdir), want, steps[-1] + 1)


def test_sigkill_resumes_exactly(gcs, reference):
  _, want, _ = reference
  workdir = f"gs://{BUCKET}/sigkill"
  # Slower shard reads keep the run going while the first checkpoint commits.
  gcs.proxy.add("delay", path=r"shards.*alt=media", times=None, seconds=0.3)
  proc, out, err = _start(gcs, workdir)
  assert _wait_for(lambda: 4 in _committed_steps(workdir), proc=proc), "".join(err)[-3000:]
  proc.kill()
  proc.wait(timeout=60)
  steps = _committed_steps(workdir)
  assert steps and steps[-1] < STEPS, steps
  gcs.proxy.clear()
  proc = _run(gcs, workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"at step {steps[-1]}" in proc.stderr
  _assert_same_losses(_losses(workdir), want, steps[-1] + 1)
