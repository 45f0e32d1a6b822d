"""A nearest-neighbour index over an embedder's output, and its queries: `Index(IDX).query(...)`.

    IDX/index.json         kind, backend, modality, rows, embed_dim, checkpoint, dataset
    IDX/embeddings.npy     the indexed embeddings, all partitions in order (row i = id i)
    IDX/metadata.parquet   their metadata rows (key, image_path / url, caption, ...)
    IDX/index.faiss        the faiss index (when faiss-cpu is installed: pip install .[search])

kind "flat" is exact inner product (= cosine: the rows are L2-normalised): faiss's
IndexFlatIP, or without faiss a numpy matrix product, with the same results. kind "ivf_pq"
(faiss only) clusters the rows into `nlist` lists and compresses each to `pq_m` codes of
`pq_bits` bits, for sets too large for memory; queries visit `nprobe` lists.
"""
from __future__ import annotations

import io
import json
import os
from typing import Optional

import numpy as np

from clip_jax import storage
from clip_jax.embed import store

KINDS = ("flat", "ivf_pq")
INDEX_JSON = "index.json"


def _faiss():
  try:
    import faiss  # pylint: disable=g-import-not-at-top
  except ImportError:
    return None
  return faiss


def _ivf_pq(faiss, embeddings: np.ndarray, nlist: Optional[int], pq_m: Optional[int],
            pq_bits: int):
  rows, dim = embeddings.shape
  nlist = nlist or max(1, min(int(4 * np.sqrt(rows)), rows // 39))  # faiss wants 39 per list
  pq_m = pq_m or next(m for m in (64, 32, 16, 8, 4, 2, 1) if dim % m == 0 and m <= dim // 2)
  if dim % pq_m:
    raise ValueError(f"--pq_m {pq_m} must divide the embedding width {dim}")
  if rows < nlist * 39 or rows < 256:
    raise ValueError(f"--kind ivf_pq needs >= max(256, 39 * nlist = {39 * nlist}) rows to "
                     f"train on; the embeddings have {rows}: use --kind flat")
  index = faiss.index_factory(dim, f"IVF{nlist},PQ{pq_m}x{pq_bits}",
                              faiss.METRIC_INNER_PRODUCT)
  sample = np.random.default_rng(0).permutation(rows)[:min(rows, 256 * nlist)]
  index.train(embeddings[np.sort(sample)])
  return index


def build(embeddings_dir: str, output: str, *, kind: str = "flat", modality: str = "image",
          nlist: Optional[int] = None, pq_m: Optional[int] = None, pq_bits: int = 8) -> dict:
  """Builds IDX from an embedder's output; returns index.json's content."""
  if kind not in KINDS:
    raise ValueError(f"--kind {kind}: expected one of {', '.join(KINDS)}")
  faiss = _faiss()
  if kind == "ivf_pq" and faiss is None:
    raise ValueError("--kind ivf_pq needs faiss: pip install faiss-cpu (or clip_jax[search])")
  manifest = store.load_manifest(embeddings_dir)
  parts = list(store.iter_partitions(embeddings_dir, (modality,)))
  if not parts or not sum(len(e[modality]) for _, e, _ in parts):
    raise ValueError(f"--embeddings {embeddings_dir} holds no embedded samples")
  embeddings = np.concatenate([e[modality] for _, e, _ in parts])
  table = store.concat_tables([t for _, _, t in parts])
  vectors = np.ascontiguousarray(embeddings, np.float32)
  info = {"kind": kind, "backend": "faiss" if faiss else "numpy", "modality": modality,
          "rows": int(len(embeddings)), "embed_dim": int(embeddings.shape[1]),
          "checkpoint": manifest["checkpoint"], "dataset": manifest["dataset"],
          "embeddings": storage.absolute(embeddings_dir),
          "images_root": manifest.get("images_root")}
  files = {"embeddings.npy": store.npy_bytes(embeddings),
           "metadata.parquet": store.parquet_bytes(table)}
  if faiss is not None:
    index = faiss.IndexFlatIP(vectors.shape[1]) if kind == "flat" else _ivf_pq(
        faiss, vectors, nlist, pq_m, pq_bits)
    index.add(vectors)
    files["index.faiss"] = faiss.serialize_index(index).tobytes()
    if kind == "ivf_pq":
      info.update(nlist=int(index.nlist), pq_m=int(index.pq.M), pq_bits=int(index.pq.nbits))
  store.write_files(output, files)
  storage.write_text(storage.join(output, INDEX_JSON), json.dumps(info, indent=1) + "\n")
  return info


def _image_input(image):
  """A PIL image, path, uint8 array, or encoded bytes, as clip_jax's encode_image takes it."""
  if isinstance(image, (bytes, bytearray, memoryview)):
    from PIL import Image  # pylint: disable=g-import-not-at-top
    try:
      pil = Image.open(io.BytesIO(bytes(image)))
      pil.load()
    except (OSError, SyntaxError, ValueError) as e:
      raise ValueError(f"the query image cannot be decoded: {e}") from None
    return pil
  return image


def top_k(embeddings: np.ndarray, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
  """(ids, scores) of the k highest inner products, best first (ties: the lower id)."""
  scores = np.asarray(embeddings, np.float32) @ np.asarray(query, np.float32)
  k = min(k, len(scores))
  candidates = np.argpartition(-scores, k - 1)[:k] if k < len(scores) else np.arange(len(scores))
  order = np.lexsort((candidates, -scores[candidates]))
  ids = candidates[order]
  return ids, scores[ids]


class Index:
  """An index built by `build`; `query(text=... | image=... | embedding=..., k=...)`.

  Results are dicts: id, score (cosine), and the metadata row (key, caption, image_path or
  url, clip_score, ...). Text and images are embedded with `checkpoint` (default: the one
  the embeddings were made with), loaded on first use; text as it is, with no prompt.
  """

  def __init__(self, path: str, checkpoint: Optional[str] = None, nprobe: int = 16):
    import pyarrow.parquet as pq  # pylint: disable=g-import-not-at-top
    self.path = str(path)
    info_path = storage.join(self.path, INDEX_JSON)
    if not storage.exists(info_path):
      raise ValueError(f"--index {path}: no {INDEX_JSON} there; build one with "
                       "`python -m clip_jax.search build`")
    self.info = json.loads(storage.read_text(info_path))
    self.checkpoint = checkpoint or self.info["checkpoint"]
    local = not storage.is_remote(self.path)
    embeddings = storage.join(self.path, "embeddings.npy")
    self.embeddings = (np.load(embeddings, mmap_mode="r") if local else
                       np.load(io.BytesIO(store.read_bytes(embeddings))))
    self.metadata = pq.read_table(io.BytesIO(store.read_bytes(
        storage.join(self.path, "metadata.parquet"))))
    self._keys = None
    self._faiss_index = None
    faiss = _faiss() if self.info["backend"] == "faiss" else None
    if faiss is not None:
      data = store.read_bytes(storage.join(self.path, "index.faiss"))
      self._faiss_index = faiss.deserialize_index(np.frombuffer(data, np.uint8))
      if hasattr(self._faiss_index, "nprobe"):
        self._faiss_index.nprobe = nprobe
    elif self.info["kind"] != "flat":
      raise ValueError(f"--index {path} is a faiss {self.info['kind']} index and faiss is not "
                       "installed: pip install faiss-cpu")
    self._clip = None

  def __len__(self) -> int:
    return int(self.info["rows"])

  @property
  def clip(self):
    if self._clip is None:
      from clip_jax.inference import load  # pylint: disable=g-import-not-at-top
      checkpoint = self.checkpoint
      self._clip = load(os.path.abspath(checkpoint) if os.path.exists(checkpoint) else
                        checkpoint, batch_size=1)
    return self._clip

  def embed_text(self, text: str) -> np.ndarray:
    return _normalized(self.clip.encode_text([text])[0])

  def embed_image(self, image) -> np.ndarray:
    return _normalized(self.clip.encode_image([_image_input(image)])[0])

  def row(self, i: int) -> dict:
    return self.metadata.slice(int(i), 1).to_pylist()[0]

  def id_of(self, key: str) -> int:
    if self._keys is None:
      self._keys = {k: i for i, k in enumerate(self.metadata.column("key").to_pylist())}
    if key not in self._keys:
      raise ValueError(f"key {key!r} is not in the index")
    return self._keys[key]

  def search(self, embedding: np.ndarray, k: int = 10) -> list[dict]:
    """The k rows nearest to a (normalised) embedding."""
    if not isinstance(k, (int, np.integer)) or k < 1:
      raise ValueError(f"k={k!r}: must be a positive integer")
    query = np.asarray(embedding, np.float32).reshape(-1)
    if query.shape != (self.info["embed_dim"],):
      raise ValueError(f"the query embedding has shape {query.shape}; the index holds "
                       f"{self.info['embed_dim']}-wide embeddings")
    if self._faiss_index is not None:
      scores, ids = self._faiss_index.search(query[None], min(k, len(self)))
      found = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
    else:
      ids, scores = top_k(self.embeddings, query, k)
      found = list(zip(ids.tolist(), scores.tolist()))
    return [dict(self.row(i), id=i, score=s) for i, s in found]

  def query(self, *, text: Optional[str] = None, image=None, embedding=None,
            k: int = 10) -> list[dict]:
    """The k nearest rows to one text, image (PIL, path, uint8 array or encoded bytes) or
    embedding."""
    given = [name for name, v in (("text", text), ("image", image), ("embedding", embedding))
             if v is not None]
    if len(given) != 1:
      raise ValueError(f"pass exactly one of text=, image=, embedding= (got {given or 'none'})")
    if text is not None:
      embedding = self.embed_text(text)
    elif image is not None:
      embedding = self.embed_image(image)
    return self.search(embedding, k)

  def neighbors(self, key: str, k: int = 10) -> list[dict]:
    """The k rows nearest to the row `key` (itself first)."""
    return self.search(np.asarray(self.embeddings[self.id_of(key)], np.float32), k)


def _normalized(x: np.ndarray) -> np.ndarray:
  x = np.asarray(x, np.float32)
  return x / max(float(np.linalg.norm(x)), 1e-12)
