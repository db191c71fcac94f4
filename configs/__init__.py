"""Experiment configs: one `get_config(arg)` per file, selected as `--config=configs/NAME.py[:variant]`."""
