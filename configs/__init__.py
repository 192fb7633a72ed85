"""Experiment configurations (ml_collections). Load with `--config configs/<name>.py`."""
