"""Mixtures of sources (config.data.source="mix") and several captions per sample: the draw
against its weights, per-source counts, exact resume (also onto another process count),
caption probabilities, the fallback counter, and the one-line errors."""
import json
import math
import os

import ml_collections
import numpy as np
from PIL import Image
import pytest

from clip_jax import optim
from clip_jax.data import mixture
from clip_jax.data import pipeline
from clip_jax.data import wds
from clip_jax.tokenizer import tokenize

from data_testing import check_resume_onto_another_process_count, global_batches

WDS_VALUE = 250  # every wds test image is flat at this value; csv images at 20 * row < 200
SIGMAS = 4.5     # a bound that a correct draw fails about once in 150,000 runs


def _config(path, source="mix", batch_size=16, **data):
  c = ml_collections.ConfigDict({
      "seed": 7, "batch_size": batch_size,
      "data": {"source": source, "path": path, "name": "", "split": "train", "data_dir": None,
               "num_workers": 0, "shuffle_buffer": 1, "resample_shards": False,
               "cycle_length": 1, "min_scale": 0.9, "max_scale": 1.0, "image_dtype": "uint8",
               "num_threads": 2, "csv_image_key": "filepath", "csv_caption_key": "title",
               "csv_separator": "\t", "mix_weights": "", "mix_names": "", "caption_keys": "txt",
               "caption_probs": "", "samples_per_epoch": None}})
  c.data.update(data)
  return c


def _write_csv(directory, num_rows=10, recap=False):
  """Flat PNGs (value 20*i: row i), captions "alt i" (and a "recap" column "recap i")."""
  os.makedirs(os.path.join(directory, "images"), exist_ok=True)
  lines = ["filepath\ttitle" + ("\trecap" if recap else "")]
  for i in range(num_rows):
    Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)).save(
        os.path.join(directory, "images", f"{i}.png"))
    lines.append(f"images/{i}.png\talt {i}" + (f"\trecap {i}" if recap else ""))
  path = os.path.join(directory, "train.tsv")
  with open(path, "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def _write_shards(directory, num_shards=2, per_shard=8, recap_every=0):
  """Flat images at WDS_VALUE; `key.txt` "alt S I", and with recap_every k a
  `key.recap.txt` "recap S I" on every k-th sample (the others lack it)."""
  os.makedirs(directory, exist_ok=True)
  image = np.full((12, 12, 3), WDS_VALUE, np.uint8)
  for s in range(num_shards):
    path = os.path.join(directory, f"{s:05d}.tar")
    wds.write_shard(path, [(f"{s}{i:03d}", image, f"alt {s} {i}", None)
                           for i in range(per_shard)], image_format="png")
    if recap_every:  # add the recaptions to the same tar groups
      import tarfile  # pylint: disable=g-import-not-at-top
      import io  # pylint: disable=g-import-not-at-top
      with tarfile.open(path) as tar:
        members = [(m, tar.extractfile(m).read()) for m in tar.getmembers()]
      with tarfile.open(path, "w") as tar:
        for member, data in members:
          tar.addfile(member, io.BytesIO(data))
          key, ext = wds._split_name(member.name)  # pylint: disable=protected-access
          i = int(key[1:])
          if ext == "txt" and i % recap_every == 0:
            text = f"recap {s} {i}".encode()
            info = tarfile.TarInfo(f"{key}.recap.txt")
            info.size = len(text)
            tar.addfile(info, io.BytesIO(text))
  return os.path.join(directory, "{00000..%05d}.tar" % (num_shards - 1))


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
  root = tmp_path_factory.mktemp("mix")
  return {"csv": _write_csv(str(root / "csv"), recap=True),
          "wds": _write_shards(str(root / "wds"), recap_every=2)}


def _within(count, n, p, what):
  bound = SIGMAS * math.sqrt(n * p * (1 - p))
  assert abs(count - n * p) <= bound, f"{what}: {count} of {n}, expected {n * p:.1f} +- {bound:.1f}"


def _batches(config, steps, **kwargs):
  it = pipeline.make_train_iterator(config, None, image_size=8, process_index=0,
                                    process_count=1, **kwargs)
  batches = [next(it) for _ in range(steps)]
  counters = it.counters()
  it.close()
  return batches, counters


# ------------------------------------------------------------------------------------ the draw

def test_the_draw_is_a_pure_function_with_the_weights():
  probs = [0.6, 0.3, 0.1]
  draw = mixture.MixDraw(probs, 64, seed=3)
  steps = 80  # 5120 positions
  sources = np.stack([draw.arrangement(s)[0] for s in range(steps)])
  for s, p in enumerate(probs):
    _within(int((sources == s).sum()), sources.size, p, f"source {s}")
  # Every draw of a source is read once, in order: n runs 0, 1, 2... over the steps.
  draws = np.stack([draw.arrangement(s)[1] for s in range(steps)])
  for s in range(3):
    np.testing.assert_array_equal(np.sort(draws[sources == s]), np.arange((sources == s).sum()))
  # A pure function of (seed, step, position): another instance, steps in any order.
  other = mixture.MixDraw(probs, 64, seed=3)
  assert other.source_index(41, 17) == draw.source_index(41, 17)
  assert mixture.MixDraw(probs, 64, seed=4).arrangement(0)[0].tolist() != sources[0].tolist()
  # Counts before a step beyond the first block of 1024 steps.
  step = mixture.MixDraw.BLOCK + 37
  np.testing.assert_array_equal(other.counts_before(step),
                                sum(draw.counts(s) for s in range(step)))
  # A zero weight is never drawn.
  zero = mixture.MixDraw([0.5, 0.0, 0.5], 64, seed=0)
  assert not any((zero.arrangement(s)[0] == 1).any() for s in range(20))


def test_a_mixture_reads_each_source_with_its_weight(sources):
  config = _config(f"csv:{sources['csv']}::wds:{sources['wds']}::synthetic",
                   mix_weights="2::1::1")
  steps = 48
  batches, counters = _batches(config, steps)
  draw = mixture.MixDraw([0.5, 0.25, 0.25], config.batch_size, config.seed)
  expected = sum(draw.counts(s) for s in range(steps))
  total = steps * config.batch_size
  for name, count, p in zip(("csv", "wds", "synthetic"), expected, (0.5, 0.25, 0.25)):
    assert counters[f"data/{name}/samples"] == count
    assert counters[f"data/{name}/skipped_samples"] == 0
    _within(counters[f"data/{name}/samples"], total, p, name)
  # Each row is from the source the draw gave its position.
  for step, batch in enumerate(batches):
    images = batch["images"].reshape(config.batch_size, -1).astype(int)
    flat = images.min(axis=1) == images.max(axis=1)
    for row, source in enumerate(draw.arrangement(step)[0]):
      value = images[row, 0]
      if source == 0:
        assert flat[row] and value % 20 == 0 and value < 200, (step, row, value)
      elif source == 1:
        assert flat[row] and value == WDS_VALUE, (step, row, value)
      else:
        assert not flat[row], (step, row)


def test_a_mixture_resumes_exactly_with_its_counts(sources):
  config = _config(f"wds:{sources['wds']}::csv:{sources['csv']}::synthetic",
                   mix_weights="1::1::1", mix_names="web::cc::shapes")
  it = pipeline.make_train_iterator(config, None, image_size=8)
  for _ in range(5):
    next(it)
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = [next(it) for _ in range(6)]
  counters = it.counters()
  it.close()
  assert set(state["sources"]) == {"web", "cc", "shapes"}
  resumed = pipeline.make_train_iterator(config, None, image_size=8)
  resumed.set_state(state)
  for want in expected:
    got = next(resumed)
    for k in want:
      np.testing.assert_array_equal(want[k], got[k])
  assert resumed.counters() == counters
  resumed.close()
  # Another mixture cannot take this state.
  other = pipeline.make_train_iterator(_config(f"csv:{sources['csv']}::synthetic"), None,
                                       image_size=8)
  with pytest.raises(ValueError, match="resume with the same mixture"):
    other.set_state(state)
  other.close()


def test_a_random_access_mixture_is_the_same_on_any_process_count(sources):
  config = _config(f"csv:{sources['csv']}::synthetic", mix_weights="3::1")
  one, two = global_batches(config, 1, 4), global_batches(config, 2, 4)
  for a, b in zip(one, two):
    np.testing.assert_array_equal(a["images"], b["images"])
    np.testing.assert_array_equal(a["tokens"], b["tokens"])
  check_resume_onto_another_process_count(config, 2, 1)
  check_resume_onto_another_process_count(config, 1, 4)


def test_a_mixture_with_wds_resumes_only_on_its_process_count(sources):
  config = _config(f"csv:{sources['csv']}::wds:{sources['wds']}")
  with pytest.raises(ValueError, match=r"with wds sources \(wds\) cannot start at a sample"):
    pipeline.make_train_iterator(config, None, image_size=8, start_step=3)


# ------------------------------------------------------------------------------------ captions

def _first_word(tokens):
  """'alt' or 'recap': the first word of each row's caption, from its first token."""
  alt, recap = tokenize(["alt", "recap"])[:, 1]
  words = {int(alt): "alt", int(recap): "recap"}
  return [words[int(t)] for t in np.asarray(tokens)[:, 1]]


def test_captions_follow_their_probabilities(sources):
  config = _config(sources["csv"], source="csv", caption_keys="title::recap",
                   caption_probs="1::4", batch_size=20)
  batches, counters = _batches(config, 30)  # 600 samples, 60 epochs of the 10 rows
  words = [w for b in batches for w in _first_word(b["tokens"])]
  _within(words.count("recap"), len(words), 0.8, "recap captions")
  assert counters["data/caption_fallbacks"] == 0
  # Per sample and epoch, not per row: rows change caption between epochs.
  rows = [r for b in batches for r in (b["images"][:, 0, 0, 0] // 20).tolist()]
  per_row = {}
  for row, word in zip(rows, words):
    per_row.setdefault(row, set()).add(word)
  assert all(len(w) == 2 for w in per_row.values())
  # The same draws on a resumed or repeated run.
  again, _ = _batches(config, 30)
  assert [w for b in again for w in _first_word(b["tokens"])] == words


def test_a_missing_caption_key_falls_back_and_is_counted(sources, tmp_path):
  # wds: every other sample lacks key.recap.txt; with probability 1 for it, each of those
  # falls back to key.txt.
  config = _config(sources["wds"], source="wds", caption_keys="recap.txt::txt",
                   caption_probs="1::0", batch_size=8)
  batches, counters = _batches(config, 4)  # 32 samples: two epochs of the 16
  tokens = np.concatenate([b["tokens"] for b in batches])
  words = _first_word(tokens)
  assert counters["data/caption_fallbacks"] == words.count("alt") == 16
  # files + JSON fields: 10 images, recaptions in the JSON of the first 4.
  root = tmp_path / "files"
  root.mkdir()
  for i in range(10):
    Image.fromarray(np.full((12, 12, 3), 20 * i, np.uint8)).save(root / f"{i:04d}.png")
    (root / f"{i:04d}.txt").write_text(f"alt {i}")
    (root / f"{i:04d}.json").write_text(json.dumps(
        {"caption": f"alt {i}", **({"recaption": [f"recap {i}"]} if i < 4 else {})}))
  config = _config(str(root), source="files", caption_keys="json:recaption::json:caption",
                   caption_probs="1::0", batch_size=10)
  batches, counters = _batches(config, 3)
  rows = np.concatenate([b["images"][:, 0, 0, 0] // 20 for b in batches]).tolist()
  words = _first_word(np.concatenate([b["tokens"] for b in batches]))
  assert [w == "recap" for w in words] == [r < 4 for r in rows]
  assert counters["data/caption_fallbacks"] == 18  # 6 of 10 rows, 3 epochs
  # Inside a mixture, the counter sums over its sources.
  config = _config(f"wds:{sources['wds']}::synthetic", caption_keys="recap.txt::txt",
                   caption_probs="1::0", mix_weights="1::0")
  _, counters = _batches(config, 2)
  assert counters["data/caption_fallbacks"] == 16 == counters["data/wds/samples"] / 2


# ------------------------------------------------------------------------------------ errors

@pytest.mark.parametrize("data, expected", [
    ({"path": "parquet:/x"}, "config.data.path entry 'parquet:/x': unknown kind 'parquet'"),
    ({"path": "/data/shards.tar"}, "unknown kind '/data/shards.tar'"),
    ({"path": ""}, "config.data.path is empty; for config.data.source='mix'"),
    ({"path": "wds:/nowhere/*.tar"},
     "config.data.path entry 'wds:/nowhere/*.tar' (source 'wds'): config.data.path='/nowhere/*.tar' "
     "matches no shard files"),
    ({"path": "csv:CSV::synthetic", "mix_weights": "1::2::3"},
     "config.data.mix_weights='1::2::3' has 3 weights for 2 sources"),
    ({"path": "csv:CSV::synthetic", "mix_weights": "1::-1"},
     "config.data.mix_weights='1::-1': weights must be finite and >= 0"),
    ({"path": "csv:CSV::synthetic", "mix_weights": "0::0"},
     "config.data.mix_weights='0::0': the weights are all zero"),
    ({"path": "csv:CSV::synthetic", "mix_weights": "1::x"}, "every weight must be a number"),
    ({"path": "csv:CSV::synthetic", "mix_names": "a::a"}, "are not unique"),
    ({"path": "csv:CSV", "caption_keys": "title::nope"},
     "config.data.caption_keys='nope' is not a column of"),
    ({"path": "csv:CSV", "caption_keys": "title::recap", "caption_probs": "1"},
     "config.data.caption_probs='1' has 1 weights for 2 caption keys"),
    ({"path": "synthetic", "samples_per_epoch": 0}, "config.data.samples_per_epoch=0 must be"),
    ({"source": "synthetic", "caption_keys": "txt::recap.txt"},
     "config.data.caption_keys='txt::recap.txt' is for wds, files and csv sources"),
    ({"path": "csv:CSV", "caption_keys": "json:caption"},
     "csv sources take column names, not json: fields"),
    ({"path": "synthetic", "caption_keys": ""}, "config.data.caption_keys is empty"),
])
def test_errors_are_one_line(sources, data, expected):
  data = {k: v.replace("CSV", sources["csv"]) if isinstance(v, str) else v
          for k, v in data.items()}
  expected = expected.replace("CSV", sources["csv"])
  with pytest.raises(ValueError) as error:
    pipeline.validate_data_config(_config(data.pop("path", ""), **data))
  message = str(error.value)
  assert "\n" not in message and expected in message, message


def test_virtual_epochs_set_the_schedule():
  config = ml_collections.ConfigDict({"total_steps": None, "epochs": 2.0, "batch_size": 64,
                                      "num_train_examples": None,
                                      "data": {"samples_per_epoch": 1000}})
  assert optim.epoch_samples(config) == 1000
  assert optim.total_steps_from(config) == 32  # ceil(2 * 1000 / 64)
  config.num_train_examples = 640  # the virtual epoch wins over the dataset's size
  assert optim.total_steps_from(config) == 32
  config.data.samples_per_epoch = None
  assert optim.total_steps_from(config) == 20
