"""Run configs: `get_config()` functions returning a locked ml_collections.ConfigDict.

Pass one to the trainer with `--config=configs/NAME.py`; override any field with
`--config.FIELD=VALUE` (unknown fields and wrong types are refused).
"""
