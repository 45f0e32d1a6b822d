"""Input pipeline: synthetic, TFDS, wds, CSV/TSV and files sources via grain, sharded per process.

    it = make_train_iterator(config, batch_sharding(mesh), image_size=224)
    batch = next(it)            # {"images": [B,H,W,3], "tokens": [B,77] int32} global arrays
    state = it.get_state()      # JSON-serialisable; it.set_state(state) resumes exactly
"""
from clip_jax.data.pipeline import (DataIterator, SOURCES, build_dataset, make_eval_iterator,
                                    make_train_iterator, validate_data_config)

__all__ = ["DataIterator", "SOURCES", "build_dataset", "make_eval_iterator",
           "make_train_iterator", "validate_data_config"]
