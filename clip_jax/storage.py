"""Cloud Storage (gs://) and other object stores, as the run uses them.

- `configure`: timeouts for every client, on every platform. JAX sets tensorstore's
  low-speed limits (which cut off a stalled transfer so that it is retried) only on a TPU
  VM; gcsfs has no read timeout of its own. Both are set here from `config.storage`.
- `errors()`: what a failed read or write raises once the client's own retries are
  spent (gcsfs's HttpError and aiohttp's errors are not OSErrors), so that callers skip,
  count or report it instead of crashing.
- `write_text`: a whole small file, atomically on local disk (an object store's upload of
  one object already is).
- `RemoteMirror`: files written on local disk and copied to an object store in the
  background: metrics.jsonl and TensorBoard events cannot be appended to in place on gs://,
  and a stalled or failing upload must never stop or hang training.
- `upload_dir`: a finished local directory copied to a remote one (export, convert).

Clients are pointed at an emulator only by their standard variables
(STORAGE_EMULATOR_HOST, TENSORSTORE_GCS_HTTP_URL); nothing here knows about one.
"""
from __future__ import annotations

import logging
import os
import shutil
import sys
import tempfile
import threading
import time

# The defaults of config.storage (configs/common.py): JAX's TPU values for tensorstore.
LOW_SPEED_TIME_S = 60
LOW_SPEED_LIMIT_BYTES = 256
READ_TIMEOUT_S = 60.0
CONNECT_TIMEOUT_S = 30.0
MIN_REWRITE_INTERVAL_S = 2.0   # GCS allows one write of the same object per second


def is_remote(path) -> bool:
  """An object-store URL (gs://, s3://, ...), not a local path or file:// URL."""
  path = str(path)
  return "://" in path and not path.startswith("file://")


def errors() -> tuple[type[BaseException], ...]:
  """What a failed read or write of any loaded storage client raises: OSError, and the
  error types of gcsfs, aiohttp and google's clients among the modules already imported
  (a client that was never imported raised nothing; importing them here would cost every
  command most of a second). Use as `except storage.errors() as e:`."""
  found: list[type[BaseException]] = [OSError]
  for module, name in (("gcsfs.retry", "HttpError"), ("aiohttp", "ClientError"),
                       ("google.api_core.exceptions", "GoogleAPIError"),
                       ("google.auth.exceptions", "TransportError")):
    error = getattr(sys.modules.get(module), name, None)
    if isinstance(error, type) and issubclass(error, BaseException):
      found.append(error)
  return tuple(found)


def configure(low_speed_time_s: int = LOW_SPEED_TIME_S,
              low_speed_limit_bytes: int = LOW_SPEED_LIMIT_BYTES,
              read_timeout_s: float = READ_TIMEOUT_S,
              connect_timeout_s: float = CONNECT_TIMEOUT_S) -> None:
  """Timeouts for tensorstore (Orbax's arrays) and gcsfs (everything else on gs://).

  tensorstore: a transfer slower than `low_speed_limit_bytes`/s for `low_speed_time_s` is
  cut off and retried (its curl reads the variables when it first connects, so this runs
  before the first checkpoint). gcsfs: a connection that takes `connect_timeout_s` to open,
  or a read that waits `read_timeout_s` for data, fails and is retried by gcsfs.
  """
  os.environ["TENSORSTORE_CURL_LOW_SPEED_TIME_SECONDS"] = str(int(low_speed_time_s))
  os.environ["TENSORSTORE_CURL_LOW_SPEED_LIMIT_BYTES"] = str(int(low_speed_limit_bytes))
  try:
    import aiohttp  # pylint: disable=g-import-not-at-top
    import fsspec  # pylint: disable=g-import-not-at-top
  except ImportError:
    return
  # gcsfs passes `requests_timeout` to every request (a session-wide timeout is overridden).
  fsspec.config.conf.setdefault("gcs", {})["requests_timeout"] = aiohttp.ClientTimeout(
      total=None, sock_connect=connect_timeout_s, sock_read=read_timeout_s)


def configure_from(config) -> None:
  """`configure` with a run config's `storage` fields (their defaults where absent)."""
  storage = config.get("storage") or {}
  configure(low_speed_time_s=storage.get("low_speed_time_s", LOW_SPEED_TIME_S),
            low_speed_limit_bytes=storage.get("low_speed_limit_bytes", LOW_SPEED_LIMIT_BYTES),
            read_timeout_s=storage.get("read_timeout_s", READ_TIMEOUT_S),
            connect_timeout_s=storage.get("connect_timeout_s", CONNECT_TIMEOUT_S))


def describe(error: BaseException) -> str:
  """One line for a storage error: its type and first line."""
  text = str(error).strip().splitlines()[0] if str(error).strip() else ""
  return f"{type(error).__name__}: {text[:300]}" if text else type(error).__name__


def join(directory: str, name: str) -> str:
  """`directory/name` for a local path or a URL (os.path.join would do for local only)."""
  return f"{str(directory).rstrip('/')}/{name}" if is_remote(directory) else os.path.join(
      directory, name)


def absolute(path: str) -> str:
  """An absolute local path, or the URL as it is."""
  return str(path) if is_remote(path) else os.path.abspath(path)


def exists(path: str) -> bool:
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path).exists() if is_remote(path) else os.path.exists(path)


def is_file(path: str) -> bool:
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path).is_file() if is_remote(path) else os.path.isfile(path)


def read_text(path: str) -> str:
  from etils import epath  # pylint: disable=g-import-not-at-top
  return epath.Path(path).read_text()


def write_bytes(path: str, data: bytes) -> None:
  """Writes a whole file: atomically (a temporary file renamed) on local disk, as one
  upload (an object appears whole or not at all) on an object store."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  if is_remote(path):
    epath.Path(path).write_bytes(data)
    return
  path = str(path).removeprefix("file://")
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.{os.getpid()}.tmp"
  with open(tmp, "wb") as f:
    f.write(data)
  os.replace(tmp, path)


def write_text(path: str, text: str) -> None:
  """`write_bytes` of UTF-8 text."""
  write_bytes(path, text.encode("utf-8"))


def upload_dir(local_dir: str, remote_dir: str, *, replace: bool = False,
               last: tuple[str, ...] = ()) -> None:
  """Copies the files under `local_dir` to `remote_dir`, the names in `last` (relative
  paths, e.g. the file that marks the directory complete) after all the others, so a
  reader never takes a half-uploaded directory for a whole one. `replace`: an existing
  `remote_dir` is removed first. An upload that fails removes what it wrote and raises."""
  from etils import epath  # pylint: disable=g-import-not-at-top
  remote = epath.Path(remote_dir)
  if replace and remote.exists():
    remote.rmtree()
  files = sorted(os.path.relpath(os.path.join(root, n), local_dir)
                 for root, _, names in os.walk(local_dir) for n in names)
  files = [f for f in files if f not in last] + [f for f in files if f in last]
  try:
    for name in files:
      with open(os.path.join(local_dir, name), "rb") as f:
        (remote / name).write_bytes(f.read())
  except BaseException:
    try:
      if remote.exists():
        remote.rmtree()
    except errors():
      logging.warning("could not remove the partial upload at %s", remote_dir)
    raise


class RemoteMirror:
  """Copies the files of a local staging directory to a remote directory, in a thread.

  Each changed file is uploaded whole (an object store cannot append), at most once per
  `min_interval_s` per file, so that one object is never rewritten faster than GCS allows.
  A failed upload is logged (the first one and then every tenth) and retried at the next
  round; the caller never waits for the network. `close` uploads what is left, for at
  most `close_timeout_s`.
  """

  def __init__(self, remote_dir: str, *, min_interval_s: float = MIN_REWRITE_INTERVAL_S,
               close_timeout_s: float = 120.0, name: str = "storage"):
    from etils import epath  # pylint: disable=g-import-not-at-top
    self.remote_dir = epath.Path(remote_dir)
    self.local_dir = tempfile.mkdtemp(prefix=f"clip_jax_{name}_")
    self.min_interval_s = min_interval_s
    self.close_timeout_s = close_timeout_s
    self.failures = 0
    self._name = name
    self._uploaded: dict[str, tuple[int, float]] = {}   # file -> (size, mtime) on the store
    self._last_upload: dict[str, float] = {}
    self._wake = threading.Event()
    self._stop = threading.Event()
    self._thread = threading.Thread(target=self._run, name=f"clip_jax-{name}-mirror",
                                    daemon=True)
    self._thread.start()

  def local_path(self, name: str) -> str:
    return os.path.join(self.local_dir, name)

  def mark(self) -> None:
    """Something changed: upload it when the interval allows."""
    self._wake.set()

  def pending(self) -> list[str]:
    return [name for name, stat in self._local_files().items()
            if self._uploaded.get(name) != stat]

  def _local_files(self) -> dict[str, tuple[int, float]]:
    files = {}
    for root, _, names in os.walk(self.local_dir):
      for n in names:
        path = os.path.join(root, n)
        try:
          st = os.stat(path)
        except FileNotFoundError:
          continue
        files[os.path.relpath(path, self.local_dir)] = (st.st_size, st.st_mtime)
    return files

  def _upload(self, name: str, stat) -> None:
    with open(self.local_path(name), "rb") as f:
      data = f.read()
    target = self.remote_dir / name
    target.write_bytes(data)
    self._uploaded[name] = (len(data), stat[1]) if len(data) == stat[0] else (len(data), -1.0)
    self._last_upload[name] = time.monotonic()

  def _round(self, final: bool = False) -> float:
    """Uploads what changed and may be rewritten now; returns seconds until the next due."""
    wait = 3600.0
    for name, stat in sorted(self._local_files().items()):
      if self._uploaded.get(name) == stat:
        continue
      due = self._last_upload.get(name, -1e9) + self.min_interval_s - time.monotonic()
      if due > 0:
        if final:
          time.sleep(due)
        else:
          wait = min(wait, due)
          continue
      try:
        self._upload(name, stat)
      except errors() as e:
        self.failures += 1
        if self.failures == 1 or self.failures % 10 == 0:
          logging.warning("%s: copying %s to %s failed (%s); retrying in %.0f s, training "
                          "goes on (failure %d)", self._name, name, self.remote_dir,
                          describe(e), self.min_interval_s, self.failures)
        self._last_upload[name] = time.monotonic()
        wait = min(wait, self.min_interval_s)
    return wait

  def _run(self) -> None:
    while not self._stop.is_set():
      wait = self._round()
      self._wake.wait(timeout=min(wait, 5.0))
      self._wake.clear()

  def close(self) -> list[str]:
    """Uploads what is left (bounded by close_timeout_s); returns the files that could not
    be copied (they stay in local_dir, which is then kept and named in the log)."""
    deadline = time.monotonic() + self.close_timeout_s
    self._stop.set()
    self._wake.set()
    self._thread.join(timeout=self.close_timeout_s)
    while (not self._thread.is_alive() and self.pending()  # a hung upload: report, not race
           and time.monotonic() < deadline):
      self._round(final=True)
      if self.pending():
        time.sleep(min(self.min_interval_s, max(deadline - time.monotonic(), 0)))
    left = self.pending()
    if left:
      logging.error("%s: %s could not be copied to %s; they are kept in %s", self._name,
                    ", ".join(left), self.remote_dir, self.local_dir)
    else:
      shutil.rmtree(self.local_dir, ignore_errors=True)
    return left
