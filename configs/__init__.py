"""Experiment configurations (ml_collections). Load with `--config configs/<name>.py`.

A derived config loads its parent by path (`kinetix.training.config.sibling_config`), so
`--config /any/path/to/configs/<name>.py` works from any working directory.
"""
