r"""Pretrain a decoder on the shipped corpus (or any prepared TFDS text dataset).

    python -m experiments.launch --config=configs/lm.py:tiny --workdir=/tmp/lm_tiny
    python -m experiments.launch --config=configs/lm.py --workdir=/tmp/lm_10m
    python -m experiments.launch --config=configs/lm.py --workdir=/tmp/lm1b \
        --config.data.sources='("lm1b",)' --config.data.eval_source=lm1b \
        --config.data_dir=/path/to/tfds   # a user's lm1b prepared in array_record

What it does (`jaxsun.jobs.lm`): packed sequences from the sources mixed by weight, a
tied decoder trained with AdamW + warmup-cosine, validation loss, a sampled continuation.

Expected runtime on 2 CPU cores: `:tiny` about a minute; the default (the `10m` preset,
4k BPE, 2000 steps of 32x256 tokens) is a GPU-sized run (hours on CPU).
Expected result: results.json with the validation loss and a sample, loss_curve.png;
numbers are whatever the run measures.
"""

import ml_collections


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = ml_collections.ConfigDict()
  c.job = "lm"
  c.seed = 0
  c.tokenizer = "bpe4k"  # "byte", "bpe4k", "gpt2"
  c.data_dir = ""  # TFDS data dir; "" = $JAXSUN_TFDS_DIR or ~/.cache/jaxsun/tfds
  c.data = ml_collections.ConfigDict()
  c.data.sources = ("shakespeare",)  # corpora, task names, or prepared TFDS datasets
  c.data.weights = (1.0,)  # fraction of rows from each source
  c.data.eval_source = "shakespeare"  # its validation (or test) split gives eval loss
  c.model = ml_collections.ConfigDict(dict(preset="10m", max_len=256))
  c.train = ml_collections.ConfigDict()
  c.train.seq_len = 256
  c.train.batch_size = 32
  c.train.steps = 2000
  c.train.eval_every = 250
  c.train.eval_batches = 8
  c.train.log_every = 50
  c.train.checkpoint_every = 500
  c.train.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, schedule="cosine", warmup_steps=100, weight_decay=0.1,
      grad_clip_norm=1.0))
  c.sample_prompt = "ROMEO:"
  c.sample_tokens = 48
  if arg == "tiny":
    c.model = ml_collections.ConfigDict(dict(d_model=64, n_layers=2, n_heads=4,
                                             n_kv_heads=2, d_ff=192, max_len=128))
    c.train.update(seq_len=128, batch_size=16, steps=150, eval_every=50, eval_batches=4,
                   log_every=25, checkpoint_every=50)
    c.train.optimizer.update(learning_rate=3e-3, warmup_steps=15)
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} of configs/lm.py (use :tiny)")
  c.lock()
  return c
