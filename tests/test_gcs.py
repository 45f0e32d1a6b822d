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
  import fsspec  # pylint: disable=import-outside-toplevel
  import gcsfs  # pylint: disable=import-outside-toplevel
  # fsspec read FSSPEC_GCS_TOKEN when it was imported (collection): anonymous from here on.
  saved_conf = dict(fsspec.config.conf.get("gcs", {}))
  fsspec.config.conf.setdefault("gcs", {})["token"] = "anon"
  gcsfs.GCSFileSystem.clear_instance_cache()
  try:
    _upload_shards(server)
    yield server
  finally:
    server.stop()
    fsspec.config.conf["gcs"] = saved_conf
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


@pytest.mark.slow  # ~60 s; SIGTERM with faults above is in the default suite, as is the local
# SIGKILL resume (tests/test_train_cli.py)
def test_sigkill_resumes_exactly(gcs, reference):
  _, want, _ = reference
  workdir = f"gs://{BUCKET}/sigkill"
  # Slower shard reads keep the run going while the first checkpoint commits.
  gcs.proxy.add("delay", path=r"shards.*alt=media", times=None, seconds=1.0)
  proc, out, err = _start(gcs, workdir)
  marker = f"{workdir.removeprefix('gs://')}/checkpoints/4/commit_success.txt"
  assert _wait_for(lambda: _fs().exists(marker), proc=proc), "".join(err)[-3000:]
  proc.kill()
  proc.wait(timeout=60)
  steps = _committed_steps(workdir)
  assert steps and steps[-1] < STEPS, steps
  gcs.proxy.clear()
  proc = _run(gcs, workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert f"at step {steps[-1]}" in proc.stderr
  _assert_same_losses(_losses(workdir), want, steps[-1] + 1)


@pytest.mark.slow  # ~65 s; the transient faults, stalled reads and the shard outage stay default
def test_a_persistent_checkpoint_outage_keeps_the_last_checkpoint(gcs, reference):
  """Every write of steps 16 and 24 fails (503) for good: the run reports it, ends within
  the bound with one error line, and step 8 stays committed and resumes exactly."""
  _, want, _ = reference
  workdir = f"gs://{BUCKET}/outage"
  gcs.proxy.add("status", status=503, method="POST", times=None,
                path=r"outage(/|%2F)checkpoints(/|%2F)(16|24)(/|%2F|\.)")
  start = time.time()
  proc = _run(gcs, workdir, "--config.checkpoint_every=8", "--config.storage.save_wait_s=2",
              "--config.storage.save_timeout_s=20")
  elapsed = time.time() - start
  assert proc.returncode == 5, proc.stderr[-4000:]
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: checkpoint:") and "step 8" in last, last
  assert elapsed < 200, elapsed
  assert _committed_steps(workdir) == [8]
  assert sorted(_losses(workdir)) == list(range(1, STEPS + 1))  # training was not held up

  gcs.proxy.clear()
  proc = _run(gcs, workdir)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "at step 8" in proc.stderr
  _assert_same_losses(_losses(workdir), want, 9)


def _wds_config(path, batch_size=8):
  import ml_collections  # pylint: disable=import-outside-toplevel
  return ml_collections.ConfigDict({
      "seed": 0, "batch_size": batch_size,
      "data": {"source": "wds", "path": path, "name": "", "split": "train", "data_dir": None,
               "num_workers": 0, "shuffle_buffer": 1, "resample_shards": False,
               "min_scale": 0.9, "max_scale": 1.0, "image_dtype": "float32",
               "cycle_length": 1}})


@pytest.mark.timeout(240)
def test_a_persistent_shard_outage_is_skipped_and_counted(gcs):
  """A shard that answers 503 for good is given up after gcsfs's retries, skipped and
  counted once; the stream goes on with the other shards."""
  from clip_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  fault = gcs.proxy.add("status", status=503, path=r"shards(/|%2F)00001\.tar.*alt=media",
                        times=None)
  it = pipeline.make_train_iterator(
      _wds_config(f"gs://{BUCKET}/shards/{{00000..00003}}.tar"), None, image_size=16)
  batches = 0
  while it.skipped_samples == 0 and batches < 20:
    batch = next(it)
    assert batch["images"].shape == (8, 16, 16, 3)
    batches += 1
  extra = [next(it) for _ in range(2)]  # and the stream goes on
  it.close()
  assert fault.hits >= 2  # retried before giving up
  assert it.skipped_samples == 1 and len(extra) == 2


@pytest.mark.timeout(120)
def test_a_stalled_read_is_cut_off_and_retried(gcs):
  """gcsfs: a response that stops sending mid-body is cut off by the read timeout
  (config.storage.read_timeout_s) and the read retried, instead of hanging."""
  from clip_jax import storage  # pylint: disable=import-outside-toplevel
  from clip_jax.data import wds  # pylint: disable=import-outside-toplevel
  import gcsfs  # pylint: disable=import-outside-toplevel
  storage.configure(read_timeout_s=2.0)
  gcsfs.GCSFileSystem.clear_instance_cache()
  try:
    url = f"gs://{BUCKET}/shards/00002.tar"
    want = wds.read_bytes(url)
    fault = gcs.proxy.add("stall", path=r"shards(/|%2F)00002\.tar.*alt=media", times=1,
                          seconds=60, stall_after=1000)
    start = time.time()
    assert wds.read_bytes(url) == want
    assert fault.hits == 1 and time.time() - start < 30
  finally:
    storage.configure()
    gcsfs.GCSFileSystem.clear_instance_cache()


@pytest.mark.timeout(180)
def test_a_stalled_checkpoint_read_is_cut_off_and_retried(gcs, reference):
  """tensorstore: its low-speed limits (config.storage.low_speed_time_s, set on every
  platform) cut off a stalled array read, which it retries."""
  workdir, _, _ = reference
  # tensorstore's reads (they carry a `tensorstore=` parameter; gcsfs reads the metadata).
  fault = gcs.proxy.add("stall", path=r"reference%2Fcheckpoints%2F24%2Fstate.*&tensorstore=",
                        times=1, seconds=120, stall_after=16)
  script = ("import sys, time; from clip_jax import storage; "
            "storage.configure(low_speed_time_s=3, low_speed_limit_bytes=1000); "
            "import jax; from clip_jax import checkpoint; t = time.time(); "
            f"params, _ = checkpoint.restore_params({workdir + '/checkpoints/24'!r}); "
            "print('leaves', len(jax.tree.leaves(params)), 'seconds', time.time() - t)")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, env=_env(gcs),
                        capture_output=True, text=True, timeout=170)
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert fault.hits == 1
  seconds = float(proc.stdout.split()[-1])
  assert seconds < 30, proc.stdout  # the default 60 s would wait out the stall


@pytest.mark.timeout(120)
def test_metric_writes_that_fail_or_stall_never_hold_up_training(gcs):
  """metrics.jsonl and TensorBoard events on gs://: writes return at once while uploads
  fail (503) or stall; the records catch up once the store is back, none is lost, and one
  object is never rewritten faster than min_rewrite_interval_s."""
  from clip_jax import metrics, storage  # pylint: disable=import-outside-toplevel
  import gcsfs  # pylint: disable=import-outside-toplevel
  storage.configure(read_timeout_s=2.0)
  gcsfs.GCSFileSystem.clear_instance_cache()
  workdir = f"gs://{BUCKET}/metrics_faults"
  try:
    writer = metrics.MetricsWriter(workdir, total_steps=40, progress_bar=False,
                                   min_rewrite_interval_s=1.0)
    failing = gcs.proxy.add("status", status=503, method="POST", times=None,
                            path=r"metrics_faults/")
    slowest = 0.0
    for step in range(1, 41):
      if step == 21:  # the outage ends; the next upload stalls (cut off by gcsfs's timeout)
        gcs.proxy.clear()
        stalling = gcs.proxy.add("stall", method="POST", path=r"metrics_faults/", times=1,
                                 seconds=30)
      start = time.time()
      writer.write(step, {"loss": 1.0 / step})
      slowest = max(slowest, time.time() - start)
      time.sleep(0.05)
    assert failing.hits >= 1
    assert slowest < 0.5, slowest
    writer.close()
    gcs.proxy.clear()
    records = metrics.read_jsonl(f"{workdir}/metrics.jsonl")
    assert [r["step"] for r in records] == list(range(1, 41))
    names = [p.rsplit("/", 1)[-1] for p in _fs().ls(workdir.removeprefix("gs://"))]
    assert any(n.startswith("events.out.tfevents") for n in names)
    assert stalling.hits == 1  # the first upload after the outage stalled and was retried
    uploads = [t for m, p, t in gcs.proxy.timed_requests
               if m == "POST" and "metrics_faults/metrics.jsonl" in p]
    gaps = np.diff(sorted(uploads))
    assert len(uploads) >= 2 and gaps.min() >= 0.9, gaps
  finally:
    storage.configure()
    gcsfs.GCSFileSystem.clear_instance_cache()


def test_a_failing_compilation_cache_warns_and_compiles(gcs, reference):
  _, want, _ = reference
  workdir = f"gs://{BUCKET}/cache_fails"
  gcs.proxy.add("status", status=403, times=None, path=r"broken_cache")
  proc = _run(gcs, workdir, f"--config.compilation_cache_dir=gs://{BUCKET}/broken_cache")
  assert proc.returncode == 0, proc.stderr[-4000:]
  assert "cache" in proc.stderr.lower() and "warn" in proc.stderr.lower()
  _assert_same_losses(_losses(workdir), want, 1)


def test_init_from_and_restore_read_gs(gcs, reference, tmp_path):
  """A gs:// checkpoint (what init_from reads) restores to the same parameters as a local
  copy of it."""
  import jax  # pylint: disable=import-outside-toplevel
  from clip_jax import checkpoint  # pylint: disable=import-outside-toplevel
  workdir, _, _ = reference
  remote, config = checkpoint.restore_params(workdir)
  _fs().get(workdir.removeprefix("gs://") + "/checkpoints/24", str(tmp_path / "24"),
            recursive=True)
  local, local_config = checkpoint.restore_params(str(tmp_path / "24"))
  assert config == local_config
  for a, b in zip(jax.tree.leaves(remote), jax.tree.leaves(local)):
    np.testing.assert_array_equal(a, b)


def test_evaluate_export_and_convert_write_to_gs(gcs, reference, tmp_path, capsys):
  """evaluate --output_dir, export --output and convert --output on gs://; the exported
  model converted back (into gs://) holds the checkpoint's parameters."""
  import jax  # pylint: disable=import-outside-toplevel
  from clip_jax import checkpoint, convert, export  # pylint: disable=import-outside-toplevel
  from clip_jax.evaluate.__main__ import main  # pylint: disable=import-outside-toplevel
  workdir, _, _ = reference
  fs = _fs()
  out = f"gs://{BUCKET}/eval"
  assert main(["--checkpoint", workdir, "--suite", "zeroshot:synthetic", "--output_dir", out,
               "--num_examples", "24", "--batch_size", "8", "--no_progress"]) == 0
  names = sorted(p.rsplit("/", 1)[-1] for p in fs.ls(out.removeprefix("gs://")))
  assert {"summary.json", "summary.md", "summary.png"} <= set(names), names
  summary = json.loads(fs.cat(out.removeprefix("gs://") + "/summary.json"))
  assert summary["checkpoint"] == workdir and summary["rows"]

  exported = f"gs://{BUCKET}/export_hf"
  export.export(workdir, exported, fmt="hf")
  with pytest.raises(ValueError, match="already exists"):
    export.export(workdir, exported, fmt="hf")
  fs.get(exported.removeprefix("gs://"), str(tmp_path / "hf"), recursive=True)
  converted = f"gs://{BUCKET}/converted"
  convert.convert(str(tmp_path / "hf"), converted, source="hf")
  back, _ = checkpoint.restore_params(converted)
  want, _ = checkpoint.restore_params(workdir)
  for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(want)):
    np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                               rtol=0, atol=0)


def test_csv_and_files_sources_read_gs_and_cache_the_index_there(gcs, tmp_path):
  """The csv and files sources on gs:// give the batches they give from a local copy, and
  the files source's index cache lives in a gs:// workdir."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from clip_jax.data import pipeline  # pylint: disable=import-outside-toplevel
  local = tmp_path / "tree"
  rows = ["filepath\ttitle"]
  for i in range(8):
    folder = local / f"{i // 4:05d}"
    folder.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((20, 20, 3), 20 * i, np.uint8)).save(folder / f"{i:09d}.png")
    (folder / f"{i:09d}.txt").write_text(f"caption {i}")
    rows.append(f"{i // 4:05d}/{i:09d}.png\tcaption {i}")
  (local / "index.tsv").write_text("\n".join(rows) + "\n")
  _fs().put(str(local), f"{BUCKET}/tree", recursive=True)

  def config(source, path):
    return ml_collections.ConfigDict({
        "seed": 3, "batch_size": 4,
        "data": {"source": source, "path": path, "name": "", "split": "train",
                 "data_dir": None, "num_workers": 0, "min_scale": 0.5, "max_scale": 1.0,
                 "image_dtype": "uint8", "num_threads": 2, "csv_image_key": "filepath",
                 "csv_caption_key": "title", "csv_separator": "\t"}})

  def batches(cfg, cache_dir):
    pipeline.validate_data_config(cfg)
    it = pipeline.make_train_iterator(cfg, None, image_size=16, cache_dir=cache_dir)
    out = [next(it) for _ in range(4)]
    assert it.skipped_samples == 0
    it.close()
    return out

  for source, remote, copy in (("csv", f"gs://{BUCKET}/tree/index.tsv", local / "index.tsv"),
                               ("files", f"gs://{BUCKET}/tree", local)):
    got = batches(config(source, remote), f"gs://{BUCKET}/index_cache")
    want = batches(config(source, str(copy)), str(tmp_path / "cache"))
    for g, w in zip(got, want):
      np.testing.assert_array_equal(g["images"], w["images"])
      np.testing.assert_array_equal(g["tokens"], w["tokens"])
  cached = [p.rsplit("/", 1)[-1] for p in _fs().ls(f"{BUCKET}/index_cache")]
  assert len(cached) == 1 and cached[0].startswith("files_index_"), cached


@pytest.mark.slow  # ~45 s; the faults and single-process resume above are in the default suite
def test_the_two_process_rehearsal_runs_on_a_gs_workdir(gcs):
  """launch/local.py: 2 processes x 1 device over gloo, training from and into gs://; every
  process's input state in the checkpoints, one metrics writer; a rerun resumes in place."""
  workdir = f"gs://{BUCKET}/two_process"
  command = [sys.executable, str(REPO / "launch" / "local.py"), "--processes", "2",
             "--devices-per-process", "1", "--", *_command(workdir, "--config.total_steps=8",
                                                        "--config.keep_every=0")]
  proc = subprocess.run(command, cwd=REPO, env=_env(gcs), capture_output=True, text=True,
                        timeout=400)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert _committed_steps(workdir) == [4, 8]
  assert sorted(_losses(workdir)) == list(range(1, 9))
  data = json.loads(_fs().cat(workdir.removeprefix("gs://") + "/checkpoints/8/data/metadata"))
  assert data["process_count"] == 2 and len(data["states"]) == 2
  events = [p for p in _fs().ls(workdir.removeprefix("gs://")) if "tfevents" in p]
  assert len(events) == 1, events
  proc = subprocess.run(command, cwd=REPO, env=_env(gcs), capture_output=True, text=True,
                        timeout=400)
  assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
  assert "at step 8" in proc.stdout + proc.stderr
