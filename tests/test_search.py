"""`clip_jax.search`: the index against a brute-force numpy search over the embeddings (faiss
flat, the numpy fallback, IVF-PQ's nearest self), the HTTP API against the Python API, and
the page in headless Chromium (Debian's `chromium`; skipped where it is not installed)."""
import io
import json
import os
import pathlib
import shutil
import subprocess
import threading
import urllib.error
import urllib.request
import uuid

import numpy as np
import pytest
from PIL import Image

import clip_jax
from clip_jax import embed as embed_lib
from clip_jax import search
from clip_jax.embed import store
from clip_jax.search import index as index_lib
from clip_jax.search import server as server_lib
from test_embed import make_checkpoint, make_files_dataset, read_output

K = 5


@pytest.fixture(scope="module")
def embedded(tmp_path_factory):
  """24 shape images embedded (float16) with a tiny random CLIP, and the index of them."""
  checkpoint = make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny")
  root = make_files_dataset(tmp_path_factory.mktemp("files"), 24)
  out = str(tmp_path_factory.mktemp("embedded") / "out")
  embed_lib.embed(checkpoint, f"files:{root}", out, batch_size=8, partition_size=10,
                  progress_bar=False)
  idx = str(tmp_path_factory.mktemp("index") / "idx")
  assert search.main(["build", "--embeddings", out, "--output", idx]) == 0
  return checkpoint, root, out, idx


@pytest.fixture(scope="module")
def index(embedded):
  return search.Index(embedded[3])


def brute_force(out, query: np.ndarray, k: int):
  """The k best rows of a plain numpy scan of the embedder's image embeddings."""
  embeddings = read_output(out)["image"]
  scores = embeddings @ query
  ids = np.argsort(-scores, kind="stable")[:k]
  return ids.tolist(), scores[ids]


def _normalized(x):
  x = np.asarray(x, np.float32)[0]
  return x / np.linalg.norm(x)


def _check_same(results, ids, scores, metadata):
  assert [r["id"] for r in results] == ids
  np.testing.assert_allclose([r["score"] for r in results], scores, atol=1e-5)
  assert [r["key"] for r in results] == [metadata[i]["key"] for i in ids]
  assert [r["caption"] for r in results] == [metadata[i]["caption"] for i in ids]


def test_queries_equal_a_brute_force_search(embedded, index, tmp_path, monkeypatch):
  checkpoint, root, out, idx = embedded
  assert index.info["backend"] == "faiss" and index.info["kind"] == "flat" and len(index) == 24
  metadata = read_output(out)["metadata"]
  clip = clip_jax.load(checkpoint)
  text = _normalized(clip.encode_text(["a red circle"]))  # the raw text: no prompt
  image_path = metadata[7]["image_path"]
  image = _normalized(clip.encode_image([image_path]))
  # Without faiss: the same index kind searched with numpy.
  monkeypatch.setattr(index_lib, "_faiss", lambda: None)
  index_lib.build(out, str(tmp_path / "numpy"))
  numpy_index = search.Index(str(tmp_path / "numpy"))
  assert numpy_index.info["backend"] == "numpy"
  assert not (tmp_path / "numpy" / "index.faiss").exists()
  for idx_ in (index, numpy_index):
    _check_same(idx_.query(text="a red circle", k=K), *brute_force(out, text, K), metadata)
    _check_same(idx_.query(image=image_path, k=K), *brute_force(out, image, K), metadata)
    with open(image_path, "rb") as f:
      _check_same(idx_.query(image=f.read(), k=K), *brute_force(out, image, K), metadata)
    _check_same(idx_.query(embedding=text, k=30), *brute_force(out, text, 24), metadata)
    neighbors = idx_.neighbors(metadata[3]["key"], k=K)
    assert neighbors[0]["key"] == metadata[3]["key"]
    assert neighbors[0]["score"] == pytest.approx(1.0, abs=2e-3)
  with pytest.raises(ValueError, match="exactly one of text=, image=, embedding="):
    index.query(text="a", embedding=text)
  with pytest.raises(ValueError, match="key 'nope' is not in the index"):
    index.neighbors("nope")


def _synthetic_embeddings(directory, rows: int, dim: int = 64):
  """An embedder-style output of random unit rows (no model), for the IVF-PQ index."""
  vectors = np.random.default_rng(0).standard_normal((rows, dim)).astype(np.float32)
  vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
  table = store.table_from_rows([{"key": f"k{i}", "caption": f"row {i}"} for i in range(rows)],
                                ["key", "caption"])
  files = store.relative_paths(0, ("image",))
  store.write_files(str(directory), {files["image"]: store.npy_bytes(vectors),
                                     files["metadata"]: store.parquet_bytes(table)})
  store.write_manifest(str(directory), {
      "checkpoint": "unused", "dataset": "synthetic", "modalities": ["image"],
      "partitions": [{"index": 0, "files": files, "rows": rows}], "complete": True})
  return vectors


def test_ivf_pq_finds_each_row_first(tmp_path):
  vectors = _synthetic_embeddings(tmp_path / "out", 800)
  info = index_lib.build(str(tmp_path / "out"), str(tmp_path / "idx"), kind="ivf_pq",
                         nlist=8, pq_m=16, pq_bits=4)  # (8 bits: ~40 s of PQ training here)
  assert (info["kind"], info["nlist"], info["pq_m"], info["pq_bits"]) == ("ivf_pq", 8, 16, 4)
  ivf = search.Index(str(tmp_path / "idx"), nprobe=8)
  for row in range(0, 800, 40):  # PQ codes are lossy, but a row is far nearer itself
    results = ivf.query(embedding=vectors[row], k=K)
    assert results[0]["id"] == row and results[0]["key"] == f"k{row}"
    assert len(results) == K and results[0]["score"] > 0.5  # (true: 1.0; random pairs ~0)
  with pytest.raises(ValueError, match="ivf_pq needs >= max"):
    index_lib.build(str(tmp_path / "out"), str(tmp_path / "big"), kind="ivf_pq", nlist=64)


@pytest.fixture(scope="module")
def server(index, embedded):
  srv = server_lib.make_server(index, "127.0.0.1", 0)
  thread = threading.Thread(target=srv.serve_forever, daemon=True)
  thread.start()
  yield f"http://127.0.0.1:{srv.server_port}"
  srv.shutdown()
  srv.server_close()


def _get(url, data=None, headers=None):
  request = urllib.request.Request(url, data=data, headers=headers or {})
  try:
    with urllib.request.urlopen(request, timeout=60) as response:
      return response.status, response.headers.get("Content-Type"), response.read()
  except urllib.error.HTTPError as e:
    return e.code, e.headers.get("Content-Type"), e.read()


def _results(body: bytes) -> list:
  return [{k: v for k, v in r.items() if k != "thumbnail"} for r in json.loads(body)["results"]]


def test_http_api_returns_the_python_api_results(server, index, embedded):
  metadata = read_output(embedded[2])["metadata"]
  expected = index.query(text="a blue square", k=K)
  status, kind, body = _get(f"{server}/search?text=a%20blue%20square&k={K}")
  assert status == 200 and kind == "application/json"
  assert _results(body) == expected
  assert [r["thumbnail"] for r in json.loads(body)["results"]] == [
      f"/image?id={r['id']}" for r in expected]
  image_path = metadata[4]["image_path"]
  with open(image_path, "rb") as f:
    image = f.read()
  expected = index.query(image=image_path, k=K)
  status, _, body = _get(f"{server}/search?k={K}", image, {"Content-Type": "image/jpeg"})
  assert status == 200 and _results(body) == expected
  boundary = uuid.uuid4().hex
  form = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"q.jpg\""
          f"\r\nContent-Type: image/jpeg\r\n\r\n").encode() + image + f"\r\n--{boundary}--\r\n".encode()
  status, _, body = _get(f"{server}/search?k={K}", form,
                         {"Content-Type": f"multipart/form-data; boundary={boundary}"})
  assert status == 200 and _results(body) == expected
  status, _, body = _get(f"{server}/neighbors?key={metadata[2]['key']}&k=3")
  assert status == 200 and _results(body) == index.neighbors(metadata[2]["key"], 3)
  # Thumbnails: only the files of indexed rows, by row id.
  status, kind, body = _get(f"{server}/image?id=2")
  assert status == 200 and kind == "image/jpeg" and body == pathlib.Path(
      metadata[2]["image_path"]).read_bytes()
  for bad in ("/image?id=24", "/image?id=../../etc/passwd", "/search?text=", "/search?text=a&k=x",
              "/neighbors?key=missing"):
    status, _, body = _get(server + bad)
    assert status == 400 and "error" in json.loads(body), bad
  status, _, body = _get(f"{server}/search", b"not an image", {"Content-Type": "image/png"})
  assert status == 400 and "cannot be decoded" in json.loads(body)["error"]
  status, kind, body = _get(f"{server}/")
  assert status == 200 and kind.startswith("text/html") and b'id="grid"' in body


def test_images_root_serves_moved_images(index, embedded, tmp_path):
  _, root, _, _ = embedded
  moved = tmp_path / "moved"
  shutil.copytree(root, moved)
  Image.new("RGB", (4, 4), (1, 2, 3)).save(moved / "00000" / "000000.jpg")
  found = server_lib.Search(index, images_root=str(moved))
  assert found.image_path(0) == str(moved / "00000" / "000000.jpg")
  assert server_lib.Search(index).image_path(0) == os.path.join(root, "00000", "000000.jpg")


def _chromium():
  return shutil.which("chromium") or shutil.which("chromium-browser")


def _headless(url, *flags):
  return subprocess.run([_chromium(), "--headless", "--no-sandbox", "--disable-gpu",
                         "--disable-dev-shm-usage", "--hide-scrollbars",
                         "--virtual-time-budget=15000", *flags, url],
                        capture_output=True, text=True, timeout=120)


@pytest.mark.skipif(_chromium() is None,
                    reason="Debian's chromium is not installed (apt-get install chromium; "
                           ".ci/run installs it)")
def test_page_in_headless_chromium_shows_thumbnails(server, index, tmp_path):
  url = f"{server}/?q=a%20red%20circle"  # the page runs ?q= on load, as a typed query
  dom = _headless(url, "--dump-dom")
  assert dom.returncode == 0, dom.stderr[-2000:]
  expected = index.query(text="a red circle", k=20)
  thumbnails = [f'src="/image?id={r["id"]}"' for r in expected]
  assert [t for t in thumbnails if t in dom.stdout] == thumbnails, dom.stdout[-3000:]
  assert dom.stdout.count('class="result"') == 20
  assert expected[0]["caption"] in dom.stdout and "20 results for" in dom.stdout
  shot = tmp_path / "search_page.png"
  taken = _headless(url, f"--screenshot={shot}", "--window-size=1200,760")
  assert taken.returncode == 0 and shot.is_file(), taken.stderr[-2000:]
  pixels = np.asarray(Image.open(io.BytesIO(shot.read_bytes())).convert("RGB"))
  assert pixels.shape == (760, 1200, 3) and pixels.std() > 10  # not a blank page
  artifacts = os.environ.get("CLIP_JAX_TEST_ARTIFACTS")  # kept for whoever ran the tests
  if artifacts:
    os.makedirs(artifacts, exist_ok=True)
    shutil.copy(shot, os.path.join(artifacts, "search_page.png"))


def test_command_lines_help(capsys):
  for main, prog in ((search.main, "python -m clip_jax.search"),
                     (embed_lib.main, "python -m clip_jax.embed")):
    with pytest.raises(SystemExit) as exit_info:
      main(["--help"])
    assert exit_info.value.code == 0 and prog in capsys.readouterr().out
  assert search.main(["serve", "--index", "/nonexistent"]) == 1
  assert "--index /nonexistent: no index.json" in capsys.readouterr().err
