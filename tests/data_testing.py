"""Helpers shared by the input-pipeline tests: global batches from every process, exact resume."""
import json

import numpy as np

from clip_jax.data import pipeline


def pixel_ids(images, step: int = 20):
  """Which rows a batch came from, for test images whose pixels are all row * `step`."""
  return np.rint(np.asarray(images)[:, 0, 0, 0] / step).astype(int).tolist()


def global_batches(config, process_count, steps, start_step=0, cache_dir=None):
  """`steps` global batches (the processes' local batches in process order) from start_step."""
  its = [pipeline.make_train_iterator(config, None, image_size=16, process_index=p,
                                      process_count=process_count, start_step=start_step,
                                      cache_dir=cache_dir)
         for p in range(process_count)]
  batches = [[next(it) for it in its] for _ in range(steps)]
  for it in its:
    it.close()
  return [{k: np.concatenate([b[k] for b in local]) for k in ("images", "tokens")}
          for local in batches]


def check_resume_is_exact(config, before=3, after=4):
  """Reads `before` batches, stores the state as a checkpoint would (JSON), reads `after`
  more; a fresh iterator restored from the state reads the same `after`. Returns the batches
  of the uninterrupted stream."""
  it = pipeline.make_train_iterator(config, None, image_size=16)
  first = [next(it) for _ in range(before)]
  state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
  expected = [next(it) for _ in range(after)]
  it.close()
  resumed = pipeline.make_train_iterator(config, None, image_size=16)
  resumed.set_state(state)
  got = [next(resumed) for _ in range(after)]
  resumed.close()
  for want, have in zip(expected, got):
    assert set(want) == set(have)
    for k in want:
      np.testing.assert_array_equal(want[k], have[k])
  return first + expected


def check_resume_onto_another_process_count(config, before, after, steps=5, resume_at=3):
  """A run on `before` processes and one resumed at `resume_at` on `after` processes read
  the same global batches, row for row."""
  uninterrupted = global_batches(config, before, steps)
  resumed = global_batches(config, after, steps - resume_at, start_step=resume_at)
  for want, got in zip(uninterrupted[resume_at:], resumed):
    np.testing.assert_array_equal(want["images"], got["images"])
    np.testing.assert_array_equal(want["tokens"], got["tokens"])


def skips_before_good(config, num_records, num_good, good_samples):
  """Bad records (indices >= num_good) one process's shuffled stream of `num_records` reads
  before its `good_samples`-th good one: the skips a run that took that many counts."""
  schedule = pipeline.RecordSchedule(num_records, seed=config.seed, process_index=0,
                                     process_count=1, shuffle=True,
                                     local_batch=config.batch_size)
  records = [schedule[i][1] for i in range(num_records * -(-good_samples // num_good) + 1)]
  last_good = [i for i, r in enumerate(records) if r < num_good][good_samples - 1]
  return sum(r >= num_good for r in records[:last_good])
