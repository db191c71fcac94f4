"""Training: the optimizer, the trainer and checkpoints, metric writers and progress."""
