#!/usr/bin/env python3
r"""Rehearses a multi-host job on this machine: N processes, each with simulated CPU devices.

  python launch/local.py --processes 2 --devices-per-process 4 -- \
      python -m clip_jax.train --config=configs/tiny.py --workdir=/tmp/run

Each process gets JAX_PLATFORMS=cpu, XLA_FLAGS=--xla_force_host_platform_device_count=D and
the job's coordinates in the environment, which clip_jax.distributed.initialize() reads:

  CLIP_JAX_COORDINATOR_ADDRESS=localhost:PORT  CLIP_JAX_NUM_PROCESSES=N  CLIP_JAX_PROCESS_ID=i

With --append-flags they are also appended to the command as --coordinator_address=...
--num_processes=N --process_id=i (for programs that read flags, not the environment).
Collectives between the processes run over gloo, as on a CPU cluster.

Every output line is prefixed with `[p<i>] `. When a process exits non-zero or dies, the
others get SIGTERM, then SIGKILL after --grace seconds, and the launcher exits with that
process's code (128+signal for a signal). SIGINT/SIGTERM sent to the launcher are forwarded.
"""
from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from typing import Optional

ENV_COORDINATOR = "CLIP_JAX_COORDINATOR_ADDRESS"
ENV_NUM_PROCESSES = "CLIP_JAX_NUM_PROCESSES"
ENV_PROCESS_ID = "CLIP_JAX_PROCESS_ID"
_DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def child_env(base: dict[str, str], *, process_id: int, num_processes: int,
              devices_per_process: int, coordinator: str) -> dict[str, str]:
  """The environment of process `process_id`: CPU devices and the job's coordinates."""
  env = dict(base)
  xla_flags = [f for f in env.get("XLA_FLAGS", "").split() if not f.startswith(_DEVICE_COUNT_FLAG)]
  env["XLA_FLAGS"] = " ".join(xla_flags + [f"{_DEVICE_COUNT_FLAG}={devices_per_process}"])
  env["JAX_PLATFORMS"] = "cpu"
  env["PYTHONUNBUFFERED"] = "1"  # lines arrive as they are printed, not at exit
  env[ENV_COORDINATOR] = coordinator
  env[ENV_NUM_PROCESSES] = str(num_processes)
  env[ENV_PROCESS_ID] = str(process_id)
  return env


def child_command(command: list[str], *, process_id: int, num_processes: int,
                  coordinator: str, append_flags: bool) -> list[str]:
  if not append_flags:
    return list(command)
  return list(command) + [f"--coordinator_address={coordinator}",
                          f"--num_processes={num_processes}", f"--process_id={process_id}"]


def exit_code(returncode: int) -> int:
  """A child's returncode as a shell exit status (a signal N becomes 128+N)."""
  return 128 - returncode if returncode < 0 else returncode


def describe(returncode: int) -> str:
  if returncode < 0:
    try:
      name = signal.Signals(-returncode).name
    except ValueError:
      name = f"signal {-returncode}"
    return f"was killed by {name}"
  return f"exited with code {returncode}"


class Launcher:
  """Starts the processes, streams their prefixed output, stops them all when one fails."""

  def __init__(self, command: list[str], *, processes: int, devices_per_process: int,
               port: Optional[int] = None, grace: float = 10.0, append_flags: bool = False,
               log_dir: Optional[str] = None, out=None):
    self.command = command
    self.processes = processes
    self.devices_per_process = devices_per_process
    self.coordinator = f"localhost:{port or free_port()}"
    self.grace = grace
    self.append_flags = append_flags
    self.log_dir = log_dir
    self.out = out or sys.stdout
    self.children: list[subprocess.Popen] = []
    self._readers: list[threading.Thread] = []
    self._write_lock = threading.Lock()
    self._signal: Optional[int] = None

  def _say(self, message: str) -> None:
    with self._write_lock:
      self.out.write(f"[launch] {message}\n")
      self.out.flush()

  def _pump(self, index: int, stream) -> None:
    log = open(os.path.join(self.log_dir, f"p{index}.log"), "w") if self.log_dir else None
    try:
      for raw in iter(stream.readline, b""):
        line = raw.decode(errors="replace").rstrip("\n")
        with self._write_lock:
          self.out.write(f"[p{index}] {line}\n")
          self.out.flush()
        if log:
          log.write(line + "\n")
          log.flush()
    finally:
      stream.close()
      if log:
        log.close()

  def start(self) -> None:
    if self.log_dir:
      os.makedirs(self.log_dir, exist_ok=True)
    self._say(f"{self.processes} processes x {self.devices_per_process} CPU devices, "
              f"coordinator {self.coordinator}: {' '.join(self.command)}")
    for i in range(self.processes):
      env = child_env(os.environ, process_id=i, num_processes=self.processes,
                      devices_per_process=self.devices_per_process,
                      coordinator=self.coordinator)
      cmd = child_command(self.command, process_id=i, num_processes=self.processes,
                          coordinator=self.coordinator, append_flags=self.append_flags)
      # Own process group: stopping a child also stops what it started (data workers).
      child = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                               stdin=subprocess.DEVNULL, start_new_session=True)
      self.children.append(child)
      self._say(f"process {i}: pid {child.pid}")
      reader = threading.Thread(target=self._pump, args=(i, child.stdout), daemon=True)
      reader.start()
      self._readers.append(reader)

  def _send(self, sig: int, only_running: bool = True) -> None:
    for child in self.children:
      if only_running and child.poll() is not None:
        continue
      try:
        os.killpg(child.pid, sig)
      except ProcessLookupError:
        pass

  def forward(self, signum, frame=None) -> None:
    """SIGINT/SIGTERM to the launcher: pass it on; `wait` then gives them --grace to exit."""
    del frame
    self._signal = signum
    self._send(signum)

  def _stop_all(self) -> None:
    """SIGTERM to every running process, SIGKILL to whoever is left after the grace period."""
    self._send(signal.SIGTERM)
    deadline = time.monotonic() + self.grace
    while time.monotonic() < deadline and any(c.poll() is None for c in self.children):
      time.sleep(0.05)
    left = [i for i, c in enumerate(self.children) if c.poll() is None]
    if left:
      self._say(f"process(es) {left} still running {self.grace:g}s after SIGTERM: SIGKILL")
      self._send(signal.SIGKILL)
    for child in self.children:
      child.wait()
    # Grandchildren left behind (e.g. data workers that ignored SIGTERM) go too.
    self._send(signal.SIGKILL, only_running=False)

  def wait(self) -> int:
    """Waits for the job; returns the launcher's exit code."""
    failed: Optional[tuple[int, int]] = None
    signal_deadline = None
    while True:
      codes = [c.poll() for c in self.children]
      if failed is None:
        failed = next(((i, code) for i, code in enumerate(codes) if code not in (None, 0)), None)
        if failed is not None:
          i, code = failed
          others = [j for j, c in enumerate(codes) if c is None]
          self._say(f"process {i} {describe(code)}"
                    + (f"; stopping process(es) {others}" if others else ""))
          self._stop_all()
          break
      if all(code is not None for code in codes):
        break
      if self._signal is not None:
        signal_deadline = signal_deadline or time.monotonic() + self.grace
        if time.monotonic() > signal_deadline:
          self._stop_all()
          break
      time.sleep(0.05)
    for reader in self._readers:
      reader.join(timeout=5)
    if failed is not None:
      return exit_code(failed[1]) or 1
    codes = [c.returncode for c in self.children]
    bad = next((c for c in codes if c != 0), None)
    if bad is not None:
      return exit_code(bad) or 1
    if self._signal is not None and any(c != 0 for c in codes):
      return 128 + self._signal
    self._say(f"all {self.processes} processes exited 0")
    return 0


def parse_args(argv: list[str]) -> argparse.Namespace:
  if "--" not in argv:
    raise SystemExit("usage: launch/local.py [options] -- COMMAND [ARGS...] (the '--' is needed)")
  split = argv.index("--")
  parser = argparse.ArgumentParser(
      description="Run a command as N local JAX processes with CPU devices and gloo collectives.",
      usage="%(prog)s [options] -- COMMAND [ARGS...]")
  parser.add_argument("--processes", type=int, default=2, help="number of processes (N)")
  parser.add_argument("--devices-per-process", type=int, default=4,
                      help="simulated CPU devices per process")
  parser.add_argument("--port", type=int, default=None, help="coordinator port (default: a free "
                      "one)")
  parser.add_argument("--grace", type=float, default=10.0,
                      help="seconds between SIGTERM and SIGKILL when stopping the processes")
  parser.add_argument("--append-flags", action="store_true",
                      help="also append --coordinator_address --num_processes --process_id")
  parser.add_argument("--log-dir", default=None, help="also save each process's output to "
                      "LOG_DIR/p<i>.log")
  args = parser.parse_args(argv[:split])
  args.command = argv[split + 1:]
  if not args.command:
    parser.error("no command after '--'")
  if args.processes < 1:
    parser.error(f"--processes={args.processes} must be >= 1")
  if args.devices_per_process < 1:
    parser.error(f"--devices-per-process={args.devices_per_process} must be >= 1")
  if not 0 <= args.grace <= 50:
    parser.error(f"--grace={args.grace} must be in [0, 50] (the job stops within 60 s)")
  return args


def main(argv: Optional[list[str]] = None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  launcher = Launcher(args.command, processes=args.processes,
                      devices_per_process=args.devices_per_process, port=args.port,
                      grace=args.grace, append_flags=args.append_flags, log_dir=args.log_dir)
  signal.signal(signal.SIGINT, launcher.forward)
  signal.signal(signal.SIGTERM, launcher.forward)
  try:
    launcher.start()
  except OSError as e:
    launcher._stop_all()  # pylint: disable=protected-access
    print(f"error: cannot start {args.command[0]!r}: {e}", file=sys.stderr)
    return 127
  return launcher.wait()


if __name__ == "__main__":
  sys.exit(main())
