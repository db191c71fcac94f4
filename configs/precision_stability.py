r"""The reduced-precision training-stability study ("To FP8 and Back Again", papers.md §8).

    python -m experiments.launch --config=configs/precision_stability.py:tiny \
        --workdir=experiments/results/precision_stability
    python -m experiments.launch --config=configs/precision_stability.py:smoke --workdir=/tmp/ps
    python -m experiments.launch --config=configs/precision_stability.py:gpu --workdir=/tmp/ps_gpu
    python -m experiments.launch --config=configs/precision_stability.py:gpt2 --workdir=/ckpt/ps

What it does (`jaxsun.jobs.precision_stability`): tune the base learning rate on FP32
(`base_lr = 0`: the lowest final validation loss among `tune_lrs`), then for every format
x learning-rate multiplier train `seeds` byte-level decoders on Shakespeare from scratch,
all seeds of a cell in one vmapped step (`jaxsun.train.population.Population`), with
every attention / MLP projection's GEMM operands (activations, weights, output
gradients; forward and backward) in the cell's format (`jaxsun.quant.masked_gemm`).
Measured per run: loss and gradient-norm series, divergence (non-finite, or `margin`
nats above the running minimum for `patience` steps), loss spikes, last-token logit
sharpness every `sharpness.every` steps (PGD in the box |y| <= eps(|x| + 1), `steps`
sign-ascent steps of `step_size` x the half-width), final validation loss.

Formats: "fp32" (no masking), "bf16" (E8M7, nearest), eXmY masks (exponent clamped,
mantissa truncated as the paper's bit mask: `rounding`; no scaling), and the FP8 recipes
of `masked_gemm.RECIPES` ("fp8": E4M3 forward / E5M2 gradients, current per-tensor
scaling; "fp8_delayed": amax-history scaling; "fp8_gaudi2": E4M3 clipped at 240).

Variants:
  :tiny   2 CPU cores, 30-40 minutes: d_model 64, 2 layers (115,200 parameters with the
          byte vocabulary), batch 16 x 64 tokens, 300 steps, seeds 0-2, 11 formats x
          {1, 3, 10}x a tuned base among {1e-3, 3e-3, 1e-2}.
  :smoke  tests: 2 formats, one multiplier, 2 seeds, 6 steps; seconds.
  :gpu    one H100/H200: d_model 256, 6 layers, 2000 steps of 32 x 256 tokens, 5 seeds.
  :gpt2   the paper's GPT-2-124M shape (12 x 768, 12 heads, seq 1024, 5 seeds): for
          users with accelerators; hours per cell.

Measured result (`:tiny` with 30x and 100x added, 3 seeds, 2 loaded CPU cores; 1/3/10x
took 2280 s, all five 4544 s; experiments/results/precision_stability/README.md):
tuned base lr 3e-3; final validation loss at 1x FP32 2.314 ± 0.066, E8M3 2.357 ± 0.047,
E4M3 (unscaled) 3.257 ± 0.237, FP8 current scaling 2.370 ± 0.074; at 10x FP32
2.443 ± 0.078 against E4M7 3.344 ± 0.133. Divergences: only E4M7, 1/3 at 30x and 3/3 at
100x (0 of the other 159 runs). Sharpness did not rise before those divergences
(log-ratio -0.30 ± 0.18 against 0.04 ± 0.42 for runs that did not diverge).
"""

import ml_collections

VARIANTS = ("tiny", "smoke", "gpu", "gpt2")
FORMATS = ("fp32", "bf16", "e8m3", "e8m4", "e8m5", "e5m7", "e4m7", "e4m3", "fp8",
           "fp8_delayed", "fp8_gaudi2")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  """`arg`: one of VARIANTS (default "tiny")."""
  variant = arg or "tiny"
  if variant not in VARIANTS:
    raise ValueError(f"unknown variant {variant!r} of configs/precision_stability.py; "
                     f"choose from {VARIANTS}")
  c = ml_collections.ConfigDict()
  c.job = "precision_stability"
  c.variant = variant
  c.corpus = "shakespeare"
  c.tokenizer = "byte"
  c.model = ml_collections.ConfigDict(dict(
      d_model=64, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=192, max_len=128,
      init_std=0.02))
  c.formats = FORMATS
  c.rounding = "truncate"  # of the eXmY masks (bf16 and the FP8 recipes round to nearest)
  c.mask_attention = False  # also mask attention's q k^T and p v products
  c.lr_multipliers = (1.0, 3.0, 10.0)
  c.base_lr = 0.0  # 0: tune among tune_lrs on FP32 first
  c.tune_lrs = (1e-3, 3e-3, 1e-2)
  c.seeds = (0, 1, 2)
  c.steps = 300
  c.batch_size = 16
  c.seq_len = 64
  c.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=1e-3, schedule="cosine", warmup_steps=30, weight_decay=0.1,
      grad_clip_norm=1.0, b2=0.95))
  c.margin = 1.0  # nats above the running minimum ...
  c.patience = 10  # ... for this many consecutive steps: diverged
  c.sharpness = ml_collections.ConfigDict(dict(every=25, batch_size=32, eps=1e-3,
                                               steps=10, step_size=0.25))
  c.eval = ml_collections.ConfigDict(dict(batches=64))  # validation windows
  if variant == "smoke":
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=32)
    c.formats = ("fp32", "fp8_delayed")
    c.lr_multipliers = (1.0,)
    c.base_lr = 3e-3
    c.seeds = (0, 1)
    c.steps = 6
    c.batch_size = 4
    c.seq_len = 16
    c.optimizer.warmup_steps = 1
    c.sharpness.update(every=3, batch_size=4, steps=3)
    c.eval.batches = 4
    c.patience = 2
  elif variant == "gpu":
    c.model.update(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=768,
                   max_len=512)
    c.seeds = (0, 1, 2, 3, 4)
    c.steps = 2000
    c.batch_size = 32
    c.seq_len = 256
    c.optimizer.warmup_steps = 200
    c.sharpness.every = 100
    c.eval.batches = 128
    c.patience = 20
  elif variant == "gpt2":
    c.tokenizer = "gpt2"
    c.model.update(d_model=768, n_layers=12, n_heads=12, n_kv_heads=12, d_ff=3072,
                   max_len=1024)
    c.tune_lrs = (3e-4, 6e-4, 1.2e-3)
    c.seeds = (0, 1, 2, 3, 4)
    c.steps = 10000
    c.batch_size = 32
    c.seq_len = 1024
    c.optimizer.warmup_steps = 500
    c.sharpness.every = 250
    c.eval.batches = 128
    c.patience = 50
  c.lock()
  return c
