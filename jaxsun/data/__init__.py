"""Data: synthetic tasks (here), tokenizers, TFDS builders and grain pipelines."""
