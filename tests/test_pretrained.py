"""Pretrained names (clip_jax.pretrained) without the network: a Hugging Face cache built in a
temporary HF_HOME (HF_HUB_OFFLINE=1), URLs served from 127.0.0.1, a tiny model exported by
clip_jax.export into each layout. Every name gives the features of converting the same file by
hand; hashes are checked; the converted cache is used the second time; two processes loading at
once make one cache entry; offline-and-not-cached and unknown names are one line."""
import functools
import hashlib
import http.server
import os
import pathlib
import shutil
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest

pytest.importorskip("safetensors")
pytest.importorskip("huggingface_hub")

import clip_jax  # noqa: E402
from clip_jax import convert, export, params_io, pretrained, pretrained_names  # noqa: E402
from clip_jax import step as st  # noqa: E402
from clip_jax.models import create_model, init_params  # noqa: E402

REPO = pathlib.Path(__file__).resolve().parents[1]
COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(scope="module")
def exports(tmp_path_factory):
  """A tiny model (random, QuickGELU) as a converted dir and in the hf and open_clip layouts."""
  root = tmp_path_factory.mktemp("exports")
  params = init_params(create_model("tiny"), jax.random.PRNGKey(3))
  params_io.save_params(root / "converted", params, create_model("tiny").config)
  for fmt in ("hf", "open_clip"):
    export.export(root / "converted", root / fmt, fmt=fmt)
  images = np.random.default_rng(0).normal(size=(3, 32, 32, 3)).astype(np.float32)
  reference = clip_jax.load(str(root / "converted")).encode_image(images)
  return root, images, reference


def features(name_or_path, images):
  return clip_jax.load(str(name_or_path)).encode_image(images)


def hf_cache(home: pathlib.Path, repo: str, files_from: pathlib.Path, commit: str = COMMIT):
  """HF_HOME/hub/models--ORG--REPO with refs/main -> commit and the files in its snapshot."""
  base = home / "hub" / f"models--{repo.replace('/', '--')}"
  (base / "refs").mkdir(parents=True, exist_ok=True)
  (base / "refs" / "main").write_text(commit)  # no trailing newline, as huggingface_hub writes
  snapshot = base / "snapshots" / commit
  shutil.copytree(files_from, snapshot, dirs_exist_ok=True)
  return snapshot


@pytest.fixture
def env(tmp_path, monkeypatch):
  """An empty clip_jax cache, a Hugging Face home with nothing in it, offline."""
  monkeypatch.setenv("CLIP_JAX_CACHE", str(tmp_path / "clip_jax_cache"))
  monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
  monkeypatch.delenv("HF_HUB_CACHE", raising=False)
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  return tmp_path


def converted_entries(tmp_path):
  root = tmp_path / "clip_jax_cache" / "converted"
  return sorted(p.name for p in root.iterdir() if p.is_dir()) if root.exists() else []


def test_hf_hub_transformers_repo_and_the_converted_cache(exports, env, monkeypatch):
  root, images, reference = exports
  hf_cache(env / "hf_home", "test-org/tiny-hf", root / "hf")
  by_hand = features(root / "hf", images)  # clip_jax.load of the folder converts in memory
  got = features("hf-hub:test-org/tiny-hf", images)
  np.testing.assert_allclose(got, by_hand, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
  entries = converted_entries(env)
  assert len(entries) == 1 and entries[0].startswith("hf-hub_test-org_tiny-hf-")
  # The second load reads the converted Orbax params: nothing is converted again.
  monkeypatch.setattr(convert, "convert_file", lambda *a, **k: pytest.fail("converted again"))
  np.testing.assert_allclose(features("hf-hub:test-org/tiny-hf", images), got, rtol=0, atol=0)
  # A new commit on main is another entry.
  monkeypatch.undo()
  monkeypatch.setenv("CLIP_JAX_CACHE", str(env / "clip_jax_cache"))
  monkeypatch.setenv("HF_HOME", str(env / "hf_home"))
  monkeypatch.setenv("HF_HUB_OFFLINE", "1")
  hf_cache(env / "hf_home", "test-org/tiny-hf", root / "hf", commit="f" * 40)
  features("hf-hub:test-org/tiny-hf", images)
  assert len(converted_entries(env)) == 2


def test_open_clip_registry_entry_and_revision(exports, env, monkeypatch):
  root, images, reference = exports
  hf_cache(env / "hf_home", "test-org/tiny-oc", root / "open_clip")
  monkeypatch.setitem(pretrained_names.OPEN_CLIP, "Tiny/test_tag", pretrained_names.Weights(
      model="tiny", act="quick_gelu", source="open_clip", hf_hub="test-org/tiny-oc"))
  by_hand = features(root / "open_clip", images)
  np.testing.assert_allclose(features("open_clip:Tiny/test_tag", images), by_hand,
                             rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(by_hand, reference, rtol=1e-5, atol=1e-5)
  # The registry's activation is the weights', whatever suffix the name carries.
  config = clip_jax.load("open_clip:Tiny-quickgelu/test_tag").config
  assert config.act == "quick_gelu" and config.name == "tiny"
  # hf-hub:ORG/REPO@REVISION: a commit the cache holds.
  np.testing.assert_allclose(features(f"hf-hub:test-org/tiny-oc@{COMMIT}", images), by_hand,
                             rtol=1e-6, atol=1e-6)


def test_local_dir_of_either_kind(exports, env):
  root, images, _ = exports
  for kind in ("hf", "open_clip"):
    np.testing.assert_allclose(features(f"local-dir:{root / kind}", images),
                               features(root / kind, images), rtol=1e-6, atol=1e-6)
  assert pretrained.resolve(f"local-dir:{root / 'converted'}") == root / "converted"
  with pytest.raises(pretrained.PretrainedError, match="holds none of"):
    pretrained.resolve(f"local-dir:{env}")


@pytest.fixture
def url_server(tmp_path):
  """An HTTP server on 127.0.0.1 serving tmp_path/www."""
  www = tmp_path / "www"
  www.mkdir()
  handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
  handler.log_message = lambda *a: None
  server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  thread = threading.Thread(target=server.serve_forever, daemon=True)
  thread.start()
  yield www, f"http://127.0.0.1:{server.server_address[1]}"
  server.shutdown()
  server.server_close()


def test_openai_url_is_downloaded_hash_checked_and_converted(exports, env, url_server,
                                                             monkeypatch):
  root, images, reference = exports
  monkeypatch.delenv("HF_HUB_OFFLINE")
  # OpenAI's layout and key names (as in OpenAI's .pt files; safetensors, so no torch needed).
  state, _ = export.read_checkpoint(root / "converted")
  (env / "oa").mkdir()
  export._save_safetensors(export._cast(state, "float32"), env / "oa" / "tiny.safetensors")
  data = (env / "oa" / "tiny.safetensors").read_bytes()
  sha = hashlib.sha256(data).hexdigest()
  www, base = url_server
  (www / sha).mkdir()
  (www / sha / "tiny.safetensors").write_bytes(data)
  monkeypatch.setitem(pretrained_names.OPENAI, "Tiny/8", pretrained_names.Weights(
      model="tiny", act="quick_gelu", source="openai", url=f"{base}/{sha}/tiny.safetensors", sha256=sha))
  got = features("openai:Tiny/8", images)
  by_hand = clip_jax.load(str(env / "oa" / "tiny.safetensors"), source="openai", model="tiny")
  np.testing.assert_allclose(got, by_hand.encode_image(images), rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(got, reference, rtol=1e-5, atol=1e-5)
  assert (env / "clip_jax_cache" / "downloads" / sha / "tiny.safetensors").read_bytes() == data
  # A file whose hash is not the one the URL carries is refused, and nothing is kept.
  wrong = "0" * 64
  (www / wrong).mkdir()
  (www / wrong / "tiny.safetensors").write_bytes(data)
  monkeypatch.setitem(pretrained_names.OPENAI, "Tiny/bad", pretrained_names.Weights(
      model="tiny", act="quick_gelu", source="openai", url=f"{base}/{wrong}/tiny.safetensors",
      sha256=wrong))
  with pytest.raises(pretrained.PretrainedError, match=f"the SHA256 of .* is {sha}, expected"):
    clip_jax.load("openai:Tiny/bad")
  assert not list((env / "clip_jax_cache" / "downloads" / wrong).glob("*tiny*"))
  # A corrupted cached download is noticed and fetched again.
  (env / "clip_jax_cache" / "downloads" / sha / "tiny.safetensors").write_bytes(b"corrupt")
  shutil.rmtree(env / "clip_jax_cache" / "converted")
  np.testing.assert_allclose(features("openai:Tiny/8", images), got, rtol=0, atol=0)


def test_offline_url_not_cached_is_one_error(env, monkeypatch):
  monkeypatch.setitem(pretrained_names.OPENAI, "Tiny/9", pretrained_names.Weights(
      model="tiny", act="quick_gelu", source="openai", url="http://127.0.0.1:9/x/tiny.pt",
      sha256="a" * 64))
  with pytest.raises(pretrained.PretrainedError, match="is not cached .* downloads are off"):
    pretrained.resolve("openai:Tiny/9")


def _cli_env(tmp_path, **extra):
  return dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=str(REPO),
              CLIP_JAX_CACHE=str(tmp_path / "clip_jax_cache"), HF_HOME=str(tmp_path / "hf_home"),
              HF_HUB_OFFLINE="1", XLA_FLAGS="--xla_force_host_platform_device_count=1", **extra)


def test_offline_and_not_cached_is_one_line(tmp_path):
  proc = subprocess.run(
      [sys.executable, "-m", "clip_jax.evaluate", "--checkpoint", "hf-hub:nobody/missing-model",
       "--task", "zeroshot", "--dataset", "synthetic", "--num_examples", "8"],
      cwd=REPO, env=_cli_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  last = proc.stderr.strip().splitlines()[-1]
  assert last.startswith("error: hf-hub:nobody/missing-model is not in the Hugging Face cache ("), \
      proc.stderr[-2000:]
  assert "HF_HUB_OFFLINE" in last


def test_two_processes_loading_at_once_make_one_entry(exports, tmp_path):
  root, _, _ = exports
  hf_cache(tmp_path / "hf_home", "test-org/tiny-hf", root / "hf")
  code = ("import clip_jax.pretrained as p; "
          "print(p.resolve('hf-hub:test-org/tiny-hf'))")
  procs = [subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=_cli_env(tmp_path),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for _ in range(2)]
  outs = [p.communicate(timeout=300) for p in procs]
  assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
  paths = {o[0].strip().splitlines()[-1] for o in outs}
  assert len(paths) == 1
  assert len(converted_entries(tmp_path)) == 1
  assert params_io.is_converted_dir(paths.pop())
  leftovers = [p.name for p in (tmp_path / "clip_jax_cache" / "converted").iterdir()
               if ".tmp-" in p.name or ".old-" in p.name]
  assert not leftovers


def test_unknown_names_are_one_line_listing_the_known_ones(env):
  with pytest.raises(ValueError) as e:
    clip_jax.load("openai:ViT-X/99")
  message = str(e.value)
  assert "\n" not in message and "openai:ViT-B/32" in message and "openai:RN50x64" in message
  with pytest.raises(ValueError, match="open_clip:ViT-B-32/laion2b_s34b_b79k"):
    pretrained.check_name("open_clip:ViT-B-32/no_such_tag")
  with pytest.raises(ValueError, match="expected hf-hub:ORG/REPO"):
    pretrained.check_name("hf-hub:just-a-name")


def test_names_are_accepted_by_init_from_export_and_the_config_check(exports, env, tmp_path):
  root, _, _ = exports
  hf_cache(env / "hf_home", "test-org/tiny-hf", root / "hf")
  from clip_jax import checkpoint as ckpt_lib
  from clip_jax import sharding as shd
  from clip_jax import train as train_lib
  from configs import tiny
  c = tiny.get_config()
  with c.unlocked():
    c.init_from = "hf-hub:test-org/tiny-hf"
  abstract, _ = st.abstract_train_state(c, shd.create_mesh(c))
  taken = ckpt_lib.load_init_params(c, st.model_config_from(c), abstract.params)
  want, _ = ckpt_lib.restore_params(str(root / "converted"))
  for a, b in zip(jax.tree.leaves(taken["visual"]), jax.tree.leaves(want["visual"])):
    np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  assert export.main(["--checkpoint", "hf-hub:test-org/tiny-hf", "--format", "open_clip",
                      "--output", str(tmp_path / "re_export")]) == 0
  with c.unlocked():
    c.init_from = "open_clip:ViT-B-32/nope"
  with pytest.raises(ValueError, match="unknown pretrained name 'open_clip:ViT-B-32/nope'"):
    train_lib.validate_config(c, check_data=False)


def test_convert_lists_the_names(capsys):
  assert convert.main(["--list"]) == 0
  lines = capsys.readouterr().out.splitlines()
  assert "openai:ViT-B/32" in lines and "openai:ViT-L/14@336px" in lines
  assert "open_clip:ViT-B-32/laion2b_s34b_b79k" in lines
  assert any(line.startswith("hf-hub:ORG/REPO") for line in lines)
  assert len(lines) == len(pretrained.known_names()) + 2
