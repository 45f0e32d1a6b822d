"""Pretrained models by name, downloaded once, checked, converted once and cached.

    clip_jax.load("openai:ViT-B/32")
    clip_jax.load("open_clip:ViT-B-32/laion2b_s34b_b79k")
    clip_jax.load("hf-hub:laion/CLIP-ViT-B-32-laion2B-s34B-b79K")   # or hf-hub:ORG/REPO@REVISION
    clip_jax.load("local-dir:/models/my_open_clip_export")

Names are accepted wherever a checkpoint path is (`clip_jax.load`, `--config.init_from`,
`python -m clip_jax.evaluate --checkpoint`, `python -m clip_jax.export --checkpoint`, the
notebook's CLIP_JAX_CHECKPOINT); `resolve(name)` returns the local converted dir
(`model_config.json` + `params/`, see clip_jax.params_io) that they then read.

  openai:NAME         OpenAI's published weights (`clip.load`'s names: ViT-B/32, ..., RN50x64),
                      from OpenAI's URLs, the SHA256 each URL carries checked.
  open_clip:ARCH/TAG  open_clip's pretrained tags of the architectures clip_jax has
                      (`OPEN_CLIP`): where the weights are (Hugging Face Hub or a URL with its
                      hash) and their activation, so nobody passes --act. ARCH may carry
                      open_clip's -quickgelu suffix; the registry's activation is the weights'.
  hf-hub:ORG/REPO     an open_clip-style repo (open_clip_config.json + open_clip_model.safetensors
                      or open_clip_pytorch_model.bin) or a transformers CLIP repo (config.json +
                      model.safetensors or pytorch_model.bin); `@REVISION` pins a branch, tag or
                      commit.
  local-dir:PATH      a folder of either kind.

Downloads from the Hub go through huggingface_hub and its cache (HF_HOME, HF_HUB_CACHE,
HF_HUB_OFFLINE honoured). URLs go to CLIP_JAX_CACHE (default ~/.cache/clip_jax)/downloads,
written under a temporary name with a progress bar, hash-checked, then renamed into place.
The converted model is cached in CLIP_JAX_CACHE/converted/, keyed by the source file's SHA256
or the Hub commit and file, the activation and CONVERTER_VERSION; the second load reads Orbax
params directly. A file lock makes concurrent loads on one machine produce one entry; in a
multi-process (pod) job, process 0 resolves first while the others wait, then they find its
entry (a shared cache) or make their own on their own disks, never writing the same files.
Offline (HF_HUB_OFFLINE=1 or CLIP_JAX_OFFLINE=1), a name that is not cached is one error line.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import pathlib
import re
import sys
import urllib.error
import urllib.parse
import urllib.request
from typing import Iterator, Optional

from clip_jax.pretrained_names import (OPEN_CLIP, OPENAI, PREFIXES, PretrainedError,  # noqa: F401
                                       Weights, check_name, is_name, known_names, lookup)

# Bump when the converter's output for the same input changes: old cache entries are not read.
CONVERTER_VERSION = 1
DOWNLOAD_TIMEOUT_S = 60
_HASH_CHUNK = 1 << 20

# The weights file of a repo or folder, by kind, in the order tried.
OPEN_CLIP_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
HF_FILES = ("model.safetensors", "pytorch_model.bin")


def cache_dir() -> pathlib.Path:
  return pathlib.Path(os.environ.get("CLIP_JAX_CACHE")
                      or pathlib.Path.home() / ".cache" / "clip_jax")


def offline() -> bool:
  """Whether HF_HUB_OFFLINE or CLIP_JAX_OFFLINE is set (read now: huggingface_hub reads its
  own when first imported, and clip_jax passes this on as local_files_only)."""
  return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on")
             for v in ("HF_HUB_OFFLINE", "CLIP_JAX_OFFLINE"))


def _hf_constants():
  """huggingface_hub.constants if something imported it (it reads the environment then)."""
  return sys.modules.get("huggingface_hub.constants")


def hub_cache_dir() -> pathlib.Path:
  """The Hugging Face hub cache as the environment says now (HF_HUB_CACHE, else
  HF_HOME/hub, else huggingface_hub's default)."""
  if os.environ.get("HF_HUB_CACHE"):
    return pathlib.Path(os.environ["HF_HUB_CACHE"]).expanduser()
  if os.environ.get("HF_HOME"):
    return pathlib.Path(os.environ["HF_HOME"]).expanduser() / "hub"
  constants = _hf_constants()
  if constants is not None:
    return pathlib.Path(constants.HF_HUB_CACHE)
  return pathlib.Path(os.environ.get("XDG_CACHE_HOME", pathlib.Path.home() / ".cache")) / \
      "huggingface" / "hub"


# ------------------------------------------------------------------------------ resolving

def resolve(name: str) -> pathlib.Path:
  """The local converted dir of a pretrained name: downloaded and converted when not cached.

  In a multi-process job every process calls it; process 0 goes first."""
  import jax  # pylint: disable=import-outside-toplevel
  check_name(name)
  if jax.process_count() == 1:
    return _resolve(name)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  result, error = None, None
  if jax.process_index() == 0:
    try:
      result = _resolve(name)
    except PretrainedError as e:
      error = e
  multihost_utils.sync_global_devices(f"clip_jax.pretrained {name}")
  if error is not None:
    raise error
  return result if result is not None else _resolve(name)


def _resolve(name: str) -> pathlib.Path:
  kind, _, rest = name.partition(":")
  weights = lookup(name)
  if kind == "local-dir":
    return _convert_local(name, pathlib.Path(rest).expanduser())
  if kind == "hf-hub":
    repo, _, revision = rest.partition("@")
    weights = Weights(model="", act="", source="", hf_hub=repo, revision=revision)
  if weights.hf_hub:
    return _convert_hub(name, weights)
  return _convert_url(name, weights)


def _convert_url(name: str, weights: Weights) -> pathlib.Path:
  entry = _entry_dir(name, _key("url", weights.sha256, weights.model, weights.act))
  if _complete(entry):  # converted already: the download is not needed, nor hashed again
    return entry
  path = download_url(weights.url, weights.sha256, name)
  return _convert_once(name, entry, path, source=weights.source, model=weights.model,
                       act=weights.act)


def _convert_hub(name: str, weights: Weights) -> pathlib.Path:
  path, kind = hub_weights_file(name, weights.hf_hub, weights.revision, weights.filename)
  commit = path.parent.name  # .../snapshots/<commit>/<file>
  entry = _entry_dir(name, _key("hub", weights.hf_hub, commit, path.name, weights.model,
                                 weights.act))
  source = weights.source or ("open_clip" if kind == "open_clip" else "hf")
  return _convert_once(name, entry, path, source=source, model=weights.model or None,
                       act=weights.act or None)


def _convert_local(name: str, folder: pathlib.Path) -> pathlib.Path:
  from clip_jax import params_io  # pylint: disable=import-outside-toplevel
  if params_io.is_converted_dir(folder):
    return folder
  if not folder.is_dir():
    raise PretrainedError(f"{name}: {folder} is not a directory")
  path, kind = _weights_in_folder(folder)
  if path is None:
    raise PretrainedError(f"{name}: {folder} holds none of "
                          f"{', '.join(OPEN_CLIP_FILES + HF_FILES)} (an open_clip or "
                          "transformers model folder) nor a converted clip_jax model")
  entry = _entry_dir(name, _key("file", file_sha256(path)))
  return _convert_once(name, entry, path, source="open_clip" if kind == "open_clip" else "hf")


def _weights_in_folder(folder: pathlib.Path):
  for kind, config, files in (("open_clip", "open_clip_config.json", OPEN_CLIP_FILES),
                              ("hf", "config.json", HF_FILES)):
    for filename in files:
      if (folder / filename).is_file() and (kind == "open_clip" or (folder / config).is_file()):
        return folder / filename, kind
  return None, None


def _key(*parts) -> str:
  text = json.dumps([CONVERTER_VERSION, *map(str, parts)])
  return hashlib.sha256(text.encode()).hexdigest()[:20]


def _entry_dir(name: str, key: str) -> pathlib.Path:
  slug = re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip("_")[:80]
  return cache_dir() / "converted" / f"{slug}-{key}"


def _complete(entry: pathlib.Path) -> bool:
  from clip_jax import params_io  # pylint: disable=import-outside-toplevel
  return params_io.is_converted_dir(entry)


@contextlib.contextmanager
def _locked(path: pathlib.Path) -> Iterator[None]:
  """An exclusive lock on `path` (a lock file) between the processes of this machine."""
  import fcntl  # pylint: disable=import-outside-toplevel
  path.parent.mkdir(parents=True, exist_ok=True)
  with open(path, "a+") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def _convert_once(name: str, entry: pathlib.Path, path: pathlib.Path, *, source: str,
                  model: Optional[str] = None, act: Optional[str] = None) -> pathlib.Path:
  """Converts `path` into the cache entry unless another process did meanwhile."""
  from clip_jax import convert, params_io  # pylint: disable=import-outside-toplevel
  with _locked(entry.parent / f".{entry.name}.lock"):
    if _complete(entry):
      return entry
    logging.info("%s: converting %s", name, path)
    try:
      params, config = convert.convert_file(path, source=source, model=model, act=act)
    except (OSError, KeyError) as e:
      raise PretrainedError(f"{name}: cannot convert {path}: {' '.join(str(e).split())}") from e
    params_io.save_params(entry, params, config, overwrite=True)
    (entry / "source.json").write_text(json.dumps(
        {"name": name, "file": str(path), "source": source, "model": config.name,
         "act": config.act, "converter_version": CONVERTER_VERSION}, indent=2) + "\n")
    logging.info("%s: cached as %s", name, entry)
  return entry


# ------------------------------------------------------------------------------ downloading

def file_sha256(path) -> str:
  digest = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(_HASH_CHUNK), b""):
      digest.update(chunk)
  return digest.hexdigest()


def _hash_ok(actual: str, expected: str) -> bool:
  return bool(expected) and actual.startswith(expected.lower())


def download_url(url: str, sha256: str, name: str = "") -> pathlib.Path:
  """The file at `url` in CLIP_JAX_CACHE/downloads/<sha256>/, downloaded (atomically, with a
  progress bar) unless a copy with that hash is there. PretrainedError on a hash mismatch,
  a failed download, or offline without a copy."""
  what = name or url
  if not re.fullmatch(r"[0-9a-fA-F]{8,64}", sha256 or ""):
    raise PretrainedError(f"{what}: no SHA256 to check {url} against")
  filename = os.path.basename(urllib.parse.urlparse(url).path) or "weights"
  target = cache_dir() / "downloads" / sha256.lower() / filename
  with _locked(target.parent / ".lock"):
    if target.is_file():
      if _hash_ok(file_sha256(target), sha256):
        return target
      logging.warning("%s: %s does not match its SHA256; downloading it again", what, target)
      target.unlink()
    if offline():
      raise PretrainedError(f"{what} is not cached in {target.parent} and downloads are off "
                            "(HF_HUB_OFFLINE / CLIP_JAX_OFFLINE)")
    tmp = target.with_name(f".{filename}.part-{os.getpid()}")
    try:
      digest = _fetch(url, tmp, what)
      if not _hash_ok(digest, sha256):
        raise PretrainedError(f"{what}: the SHA256 of {url} is {digest}, expected {sha256}; "
                              "the file was not kept")
      os.replace(tmp, target)
    finally:
      tmp.unlink(missing_ok=True)
  return target


def _fetch(url: str, path: pathlib.Path, what: str) -> str:
  """Streams `url` to `path` with a progress bar; returns the SHA256 of what was written."""
  from tqdm import tqdm  # pylint: disable=import-outside-toplevel
  digest = hashlib.sha256()
  try:
    with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, \
        open(path, "wb") as out:
      total = int(response.headers.get("Content-Length") or 0) or None
      with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024,
                desc=os.path.basename(str(path)).split(".part-")[0].lstrip(".")) as bar:
        for chunk in iter(lambda: response.read(_HASH_CHUNK), b""):
          out.write(chunk)
          digest.update(chunk)
          bar.update(len(chunk))
  except (urllib.error.URLError, OSError, TimeoutError) as e:
    raise PretrainedError(f"{what}: downloading {url} failed: {' '.join(str(e).split())}") from e
  return digest.hexdigest()


def hub_weights_file(name: str, repo: str, revision: str = "", filename: str = ""):
  """(local path of the weights file in the Hugging Face cache, "open_clip" | "hf") for a repo
  of either kind, downloaded through huggingface_hub (with its sidecar config) if needed."""
  try:
    import huggingface_hub  # pylint: disable=import-outside-toplevel
    from huggingface_hub import errors as hf_errors  # pylint: disable=import-outside-toplevel
  except ImportError as e:
    raise PretrainedError(f"{name}: huggingface_hub is not installed (pip install "
                          "huggingface_hub)") from e
  revision, cache, local_only = revision or None, hub_cache_dir(), offline()

  def get(file: str) -> Optional[pathlib.Path]:
    try:
      return pathlib.Path(huggingface_hub.hf_hub_download(
          repo, file, revision=revision, cache_dir=cache, local_files_only=local_only,
          library_name="clip_jax"))
    except hf_errors.LocalEntryNotFoundError:
      if offline():
        return None  # not cached (or not in the repo); the caller says which it needed
      raise
    except (hf_errors.EntryNotFoundError, hf_errors.RemoteEntryNotFoundError):
      return None

  try:
    candidates = []
    if get("open_clip_config.json") is not None:
      candidates = [("open_clip", f) for f in ((filename,) if filename else OPEN_CLIP_FILES)]
    elif get("config.json") is not None:
      candidates = [("hf", f) for f in ((filename,) if filename else HF_FILES)]
    for kind, file in candidates:
      if (path := get(file)) is not None:
        return path, kind
  except (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError) as e:
    raise PretrainedError(f"{name}: {' '.join(str(e).split()[:20])}") from e
  except (hf_errors.HfHubHTTPError, hf_errors.LocalEntryNotFoundError, OSError) as e:
    raise PretrainedError(f"{name}: the Hugging Face Hub could not be reached "
                          f"({type(e).__name__}); set HF_HUB_OFFLINE=1 to use the cache only, or "
                          "download the repo where the network is") from e
  if offline():
    raise PretrainedError(f"{name} is not in the Hugging Face cache ({cache}) and downloads "
                          "are off (HF_HUB_OFFLINE / CLIP_JAX_OFFLINE); download it once with "
                          "network access")
  raise PretrainedError(f"{name}: {repo} holds no open_clip (open_clip_config.json + "
                        f"{' or '.join(OPEN_CLIP_FILES)}) nor transformers (config.json + "
                        f"{' or '.join(HF_FILES)}) CLIP weights")

