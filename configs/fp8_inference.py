r"""The FP8 inference study: FP8 recipes against BF16 on one model, and square vs thin GEMMs.

    python -m experiments.launch --config=configs/fp8_inference.py:tiny --workdir=/tmp/fp8_tiny
    python -m experiments.launch --config=configs/fp8_inference.py:smoke --workdir=/tmp/fp8_smoke
    python -m experiments.launch --config=configs/fp8_inference.py:gpu --workdir=/tmp/fp8_gpu
    python -m experiments.benchmarks.fp8_thin_gemm     # the GEMM part alone (jax only)

What it does (`jaxsun.jobs.fp8_inference`, papers.md §7): pretrain (or resume, or import
with `base.checkpoint`) a byte-level decoder on the shipped Shakespeare corpus as the PTQ
study does; run it in BF16 (the reference) and in float32; then, for every recipe of
`recipes` (scale granularity x FP8 format x accumulation, `jaxsun.quant.fp8_recipes`),
run the BF16 model with every attention and MLP projection as a simulated FP8 GEMM and
measure, in domain (Shakespeare validation) and out of domain (`gsm_symbolic` prompt +
answer text): perplexity (the papers' protocol, as `jaxsun.eval.perplexity`), top-1
next-token agreement with BF16 and the mean KL(BF16 || FP8) of the next-token
distributions. Then the GEMM-level error of each accumulation against float32 as K
grows (`accum_error`), of each granularity and format on activations with per-token
magnitude spread or outlier channels (`outliers`), and the throughput of square vs thin
FP8 and BF16 GEMMs on the device at hand against its peak (`gemm`,
`experiments.benchmarks.fp8_thin_gemm`).
results.json is rewritten after every recipe (a rerun skips finished ones), then
table.md, fp8_inference.png and COMMAND.md.

Recipes: granularity "tensor" (per-tensor activations and weights), "row" (per-token
activations, per-tensor weights), "channel" (per-tensor activations, per-output-channel
weights), "rowchannel" (both; `Fp8Linear`'s "current" recipe), "block128" (1x128
activation tiles, 128x128 weight blocks); format "e4m3" (OCP, +-448) or "e4m3_g2"
(Gaudi 2's E4M3 range, +-240; same grid below it); accumulation "f32", "promote<n>"
(an inner accumulator of `mantissa_bits` mantissa bits, truncated after each `step_k`
-wide K step and promoted to float32 every n steps) or "promoteK" (never promoted).

Variants:
  :tiny   2 CPU cores. d_model 128, 2 layers, 4 heads / 2 KV heads, d_ff 512 (525,312
          parameters; down_proj has K = 512, 16 accumulation steps), 400 pretraining
          steps of 16 x 128 tokens; 16k tokens per perplexity; 5 granularities x 2
          formats x 4 accumulations = 40 recipes; GEMMs square 512-4096 and thin
          M = 1-128 at K = N = 4096. About 6-7 minutes.
  :smoke  tests: a 1-layer d_model 32 model, 10 steps, 2 recipes, small GEMMs; seconds.
  :gpu    one GPU: d_model 512, 4 layers, d_ff 2048, 2000 steps of 32 x 512; 128k tokens
          per perplexity; GEMMs square 2048-16384 and thin M = 1-128 at K = N = 8192
          against the stated peak. Not run here.

Measured result (`:tiny`, 2 shared CPU cores, 353 s; experiments/results/fp8_inference/):
BF16 perplexity 6.855 in domain / 15.500 out of domain (float32: 6.856 / 15.500, KL to
BF16 1.5e-5). The 40 FP8 recipes: 6.857-6.867 / 15.471-15.515, top-1 agreement with BF16
0.979-0.983 / 0.970-0.978, mean KL 6.6e-4 (rowchannel e4m3) to 8.6e-4 (tensor e4m3) in
domain; the accumulation interval moves perplexity by at most 0.0017 (K <= 512 here),
while on one K = 8192 GEMM a never-promoted 14-bit sum errs 3.2e-3 against 2.1e-5 /
5.3e-5 promoted every 32 / 128 K. Tokens spanning 6 decades: per-tensor per-token error
0.119 (OCP) / 0.170 (Gaudi 2 range) against 0.037 per token. GEMMs (noisy, shared CPU):
bf16 square best 1.695 TFLOP/s, thin M = 1 / 16 / 128 at K = N = 4096 reach 0.001 /
0.079 / 0.268 of it; XLA's f8 dot (no FP8 units here) 0.213 square, 0.011 / 0.133 /
0.561.
"""

import ml_collections

VARIANTS = ("tiny", "smoke", "gpu")
GRANULARITIES = ("tensor", "row", "channel", "rowchannel", "block128")


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "tiny"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/fp8_inference.py; use one of "
                     f"{', '.join(':' + v for v in VARIANTS)}")
  c = ml_collections.ConfigDict()
  c.job = "fp8_inference"
  c.variant = arg
  c.seed = 0  # base-model init and pretraining data order
  c.tokenizer = "byte"  # jaxsun.data.get_tokenizer; "" with base.checkpoint: its own
  c.data_dir = ""  # TFDS data dir; "" = $JAXSUN_TFDS_DIR or ~/.cache/jaxsun/tfds

  # The base model: pretrained here (checkpoint "") or a Hugging Face directory.
  c.base = ml_collections.ConfigDict(dict(checkpoint="", param_dtype="float32"))
  c.model = ml_collections.ConfigDict(dict(
      d_model=128, n_layers=2, n_heads=4, n_kv_heads=2, d_ff=512, max_len=128))
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.corpus = "shakespeare"
  c.pretrain.seq_len = 128
  c.pretrain.batch_size = 16
  c.pretrain.steps = 400
  c.pretrain.eval_every = 200
  c.pretrain.eval_batches = 4
  c.pretrain.log_every = 100
  c.pretrain.checkpoint_every = 200
  c.pretrain.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, schedule="cosine", warmup_steps=30, weight_decay=0.1,
      grad_clip_norm=1.0))

  # Evaluation (the perplexity protocol of jaxsun.eval.perplexity): in domain = the
  # corpus's validation split, out of domain = prompt + answer of each `ood_task` record.
  # The activations' current scales cover one forward call: `batch_size` windows.
  c.eval = ml_collections.ConfigDict(dict(
      seq_len=128, batch_size=16, id_corpus="shakespeare", ood_task="gsm_symbolic",
      ood_split="validation", max_tokens=16384))
  c.reference_dtype = "bfloat16"  # the compute dtype of the reference and FP8 models

  # The recipe grid: every granularity x format x accumulation.
  c.recipes = ml_collections.ConfigDict(dict(
      granularities=GRANULARITIES,
      formats=("e4m3", "e4m3_g2"),  # OCP E4M3 (+-448) vs Gaudi 2's range (+-240)
      accumulations=("f32", "promote1", "promote4", "promoteK"),
      mantissa_bits=14,  # inner accumulator (Hopper's FP8 tensor cores: about 14)
      step_k=32,  # K elements per accumulation step (one Hopper FP8 wgmma)
      layers=r"(.*/)?(attn|mlp)/.+"))  # the Linears that run in FP8 (regex, full match)

  # GEMM-level accumulation error: x: N(0, 1)[m, K] @ w: N(0, 0.05^2)[K, n] quantized with
  # `granularity` / `fmt`, each accumulation against float32 accumulation, per K.
  c.accum_error = ml_collections.ConfigDict(dict(
      k=(128, 512, 2048, 8192), m=64, n=64, granularity="rowchannel", fmt="e4m3", seed=0))

  # Outlier sensitivity: one GEMM per activation kind (gaussian; tokens scaled over each
  # of `token_decades` decades; `outlier_channels` input channels x `outlier_scale`),
  # every granularity x format of `recipes`, float32 accumulation; mean per-token error.
  c.outliers = ml_collections.ConfigDict(dict(
      m=64, k=512, n=256, token_decades=(3.0, 6.0), outlier_channels=4,
      outlier_scale=100.0, seed=0))

  # Square vs thin GEMM throughput (experiments.benchmarks.fp8_thin_gemm).
  c.gemm = ml_collections.ConfigDict(dict(
      square=(512, 1024, 2048, 4096), thin_m=(1, 8, 16, 64, 128), thin_kn=4096,
      methods=("bfloat16", "float8_e4m3fn", "fp8_matmul"), reps=3, trials=3,
      bandwidth_mib=256))

  if arg == "smoke":  # the same pipeline in seconds
    c.model.update(d_model=32, n_layers=1, n_heads=2, n_kv_heads=1, d_ff=64, max_len=32)
    c.pretrain.update(seq_len=32, batch_size=4, steps=10, eval_every=10, eval_batches=1,
                      log_every=10, checkpoint_every=10)
    c.pretrain.optimizer.warmup_steps = 2
    c.eval.update(seq_len=32, batch_size=4, max_tokens=384)
    c.recipes.update(granularities=("block128",), formats=("e4m3_g2",),
                     accumulations=("f32", "promote1"), step_k=16)
    c.accum_error.update(k=(128,), m=8, n=16)
    c.outliers.update(m=8, k=256, n=128)
    c.gemm.update(square=(64,), thin_m=(8,), thin_kn=128, reps=1, trials=1,
                  bandwidth_mib=4)
  elif arg == "gpu":
    c.model.update(d_model=512, n_layers=4, n_heads=8, n_kv_heads=4, d_ff=2048,
                   max_len=512)
    c.pretrain.update(seq_len=512, batch_size=32, steps=2000, eval_every=500,
                      checkpoint_every=500, log_every=100)
    c.pretrain.optimizer.update(learning_rate=1e-3, warmup_steps=100)
    c.eval.update(seq_len=512, batch_size=16, max_tokens=131072)
    c.accum_error.update(k=(128, 1024, 4096, 16384, 65536), m=128, n=128)
    c.gemm.update(square=(2048, 4096, 8192, 16384), thin_kn=8192, reps=10, trials=5,
                  bandwidth_mib=1024)
  c.lock()
  return c
