"""The generate demo: pretrain a tiny decoder on a synthetic copy/reverse task, split it,
fine-tune only its prefill tree (SUN) on reversal, and generate through the split.

Launch (what `make quickstart` runs):

    python -m experiments.generate_demo --workdir=/tmp/jaxsun_demo
    python -m experiments.generate_demo --config=configs/generate_demo.py:smoke --workdir=/tmp/d
    python -m experiments.generate_demo --workdir=/tmp/d --config.pretrain_steps=400

Expected: about a minute on 2 CPU cores (`:smoke`: a few seconds). Writes
`results.json` into the workdir and prints a table of exact-match accuracies (greedy
generation through the split) for the base model and after prefill-only fine-tuning,
plus a check that the shared decode tree stayed bitwise frozen. The numbers are whatever
the run measures; the default config typically reaches high accuracy on both tasks.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.max_symbols = 8  # longest sequence to copy / reverse
  c.n_symbols = 16  # alphabet size
  # Model: a small Llama-style decoder (see jaxsun.ModelConfig).
  c.model = ml_collections.ConfigDict(dict(
      d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_len=32))
  c.batch_size = 64
  c.learning_rate = 3e-3
  c.pretrain_steps = 600  # base model, both tasks, full training of the tied model
  c.finetune_steps = 200  # SUN: prefill tree only, reversal task
  c.eval_examples = 256
  c.log_every = 100
  if arg == "smoke":
    c.pretrain_steps, c.finetune_steps, c.eval_examples, c.log_every = 20, 10, 32, 10
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} of configs/generate_demo.py (use :smoke)")
  c.lock()
  return c
