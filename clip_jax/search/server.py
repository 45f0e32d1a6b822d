"""The search server: a JSON API and one static page, on Python's own HTTP server.

    GET  /                          the page (page.html: a query box, a grid, image upload)
    GET  /search?text=...&k=10      {"results": [...]} nearest to the text
    POST /search?k=10               the same for an image: raw bytes or multipart/form-data
    GET  /neighbors?key=...&k=10    nearest to an indexed row
    GET  /image?id=N                the image file of row N (only rows of the index)
    GET  /info                      index.json

A result is the row's metadata (key, caption, image_path or url, clip_score, ...) with id,
score and thumbnail (/image?id=N where the row has an image file, else its url).
"""
from __future__ import annotations

import email.parser
import email.policy
import http.server
import json
import logging
import mimetypes
import os
import threading
import urllib.parse
from importlib import resources
from typing import Optional

from clip_jax import storage
from clip_jax.embed import store
from clip_jax.search.index import Index

MAX_UPLOAD_BYTES = 32 << 20
log = logging.getLogger("clip_jax.search")


def page_html() -> bytes:
  return resources.files("clip_jax.search").joinpath("page.html").read_bytes()


def _jsonable(value):
  return value if isinstance(value, (str, int, float, bool, type(None))) else str(value)


class Search:
  """What the handler serves, independent of HTTP: results with thumbnails, image files."""

  def __init__(self, index: Index, images_root: Optional[str] = None):
    self.index = index
    self.images_root = images_root
    self.lock = threading.Lock()  # one query on the model at a time

  def results(self, found: list[dict]) -> dict:
    out = []
    for result in found:
      result = {k: _jsonable(v) for k, v in result.items()}
      result["thumbnail"] = (f"/image?id={result['id']}" if result.get("image_path")
                             else result.get("url"))
      out.append(result)
    return {"results": out}

  def query(self, k: int, **query) -> dict:
    with self.lock:
      return self.results(self.index.query(k=k, **query))

  def neighbors(self, key: str, k: int) -> dict:
    with self.lock:
      return self.results(self.index.neighbors(key, k))

  def image_path(self, row_id: int) -> str:
    """The file of an indexed row (under --images_root if the images moved)."""
    if not 0 <= row_id < len(self.index):
      raise ValueError(f"id {row_id} is not a row of the index")
    path = self.index.row(row_id).get("image_path")
    if not path:
      raise ValueError(f"row {row_id} has no image file")
    root = self.index.info.get("images_root")
    if self.images_root and root and path.startswith(root.rstrip("/") + "/"):
      path = storage.join(self.images_root, path[len(root.rstrip("/")) + 1:])
    return path


def _uploaded_image(content_type: str, body: bytes) -> bytes:
  """The image of a POST: the body itself, or the first file part of a multipart form."""
  if not content_type.startswith("multipart/form-data"):
    return body
  message = email.parser.BytesParser(policy=email.policy.default).parsebytes(
      f"Content-Type: {content_type}\r\n\r\n".encode() + body)
  for part in message.iter_parts():
    if part.get_filename() or part.get_content_type().startswith("image/"):
      return part.get_content()
  raise ValueError("the multipart form holds no file")


def _int(params: dict, name: str, default: int) -> int:
  value = params.get(name, [str(default)])[0]
  try:
    return int(value)
  except ValueError:
    raise ValueError(f"{name}={value!r} is not an integer") from None


class Handler(http.server.BaseHTTPRequestHandler):
  search: Search  # set on the subclass make_server builds
  server_version = "clip_jax-search"

  def _send(self, status: int, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header("Content-Type", content_type)
    self.send_header("Content-Length", str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _json(self, value, status: int = 200) -> None:
    self._send(status, json.dumps(value).encode(), "application/json")

  def _route(self, method: str) -> None:
    url = urllib.parse.urlsplit(self.path)
    params = urllib.parse.parse_qs(url.query)
    try:
      if method == "GET" and url.path in ("/", "/index.html"):
        self._send(200, page_html(), "text/html; charset=utf-8")
      elif method == "GET" and url.path == "/search":
        if not params.get("text", [""])[0].strip():
          raise ValueError("pass ?text=...")
        self._json(self.search.query(_int(params, "k", 10), text=params["text"][0]))
      elif method == "POST" and url.path == "/search":
        length = int(self.headers.get("Content-Length") or 0)
        if not 0 < length <= MAX_UPLOAD_BYTES:
          raise ValueError(f"POST an image of 1 byte to {MAX_UPLOAD_BYTES >> 20} MiB")
        image = _uploaded_image(self.headers.get("Content-Type", ""), self.rfile.read(length))
        self._json(self.search.query(_int(params, "k", 10), image=image))
      elif method == "GET" and url.path == "/neighbors":
        self._json(self.search.neighbors(params.get("key", [""])[0], _int(params, "k", 10)))
      elif method == "GET" and url.path == "/image":
        path = self.search.image_path(_int(params, "id", -1))
        kind = mimetypes.guess_type(path)[0] or "application/octet-stream"
        self._send(200, store.read_bytes(path), kind)
      elif method == "GET" and url.path == "/info":
        self._json(self.search.index.info)
      else:
        self._json({"error": f"no {method} {url.path}"}, 404)
    except ValueError as e:
      self._json({"error": str(e)}, 400)
    except storage.errors() as e:
      self._json({"error": storage.describe(e)}, 404)

  def do_GET(self):  # noqa: N802 (http.server's names)
    self._route("GET")

  def do_POST(self):  # noqa: N802
    self._route("POST")

  def log_message(self, format, *args):  # pylint: disable=redefined-builtin
    log.debug("%s " + format, self.address_string(), *args)


def make_server(index: Index, host: str = "127.0.0.1", port: int = 8000,
                images_root: Optional[str] = None) -> http.server.ThreadingHTTPServer:
  """A server (not yet serving) of `index`; port 0 picks a free port (server.server_port)."""
  index.clip  # pylint: disable=pointless-statement  # load the model before the first request
  handler = type("SearchHandler", (Handler,), {"search": Search(index, images_root)})
  server = http.server.ThreadingHTTPServer((host, port), handler)
  server.daemon_threads = True
  return server


def serve(index_path: str, *, checkpoint: Optional[str] = None,
          images_root: Optional[str] = None, host: str = "127.0.0.1", port: int = 8000,
          nprobe: int = 16) -> None:
  if images_root and not storage.is_remote(images_root) and not os.path.isdir(images_root):
    raise ValueError(f"--images_root {images_root} is not a folder")
  server = make_server(Index(index_path, checkpoint, nprobe), host, port, images_root)
  print(f"serving {index_path} at http://{host}:{server.server_port}/", flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()
