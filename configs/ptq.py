r"""The post-training-quantization (PTQ) study: LRQ and UniQuanF against their baselines.

    python -m experiments.launch --config=configs/ptq.py:tiny --workdir=/tmp/ptq_tiny
    python -m experiments.launch --config=configs/ptq.py:smoke --workdir=/tmp/ptq_smoke
    python -m experiments.launch --config=configs/ptq.py:gpu --workdir=/tmp/ptq_gpu
    python -m experiments.launch --config=configs/ptq.py:llama --workdir=/ckpt/ptq_llama \
        --config.base.checkpoint=/models/Llama-2-7b-hf

What it does (`jaxsun.jobs.ptq`, papers.md §5-6): pretrain (or resume) a byte-level base
decoder on the shipped Shakespeare corpus (`:llama` instead imports a Hugging Face
checkpoint with `jaxsun.interop.load_hf`); measure the float model's perplexity in domain
(Shakespeare validation) and out of domain (the shipped `gsm_symbolic` task text, prompt
+ answer of each validation record: a distribution shift from Shakespeare) with the
papers' protocol (`jaxsun.eval.perplexity`: join, tokenize, non-overlapping windows);
then for every cell of `grid` (method x scheme) and every calibration seed (each seed
draws a different calibration sample from Shakespeare *train* and seeds the
reconstruction; rtn / bcq use no data and run once, except with W8A8's calibrated
activation ranges) quantize all attention and MLP projections with
`jaxsun.quant.api.quantize`, and measure both perplexities, the
learnable-parameter count and the seconds. results.json is rewritten after every cell
(a crash keeps what was measured; a rerun skips finished cells), then table.md (mean +-
std over seeds, the papers' claims checked against our numbers with a 2-standard-error
rule), ppl_by_scheme.png and COMMAND.md.

Methods: rtn, flexround, lrq (`lrq_rank`), uniquanf (u / b learning rates in the
official 5e-3 / 5e-4 ratio), bcq (alternating, no reconstruction), and qwix's gptq
(symmetric grids only: qwix's GPTQ supports no zero point), awq and smoothquant.
Reconstruction is block-wise against float activations (`recon.act_quant=False`, as the
LRQ code does for W4A8).

Variants:
  :tiny   2 CPU cores. The quickstart base shape (d_model 64, 4 layers, 4 heads / 2 KV
          heads, d_ff 192; 213,760 parameters), 600 pretraining steps of 32 x 128
          tokens; 32 calibration sequences of 128 tokens, seeds 0-2; 60 reconstruction
          steps per block, batch 4; 16k tokens per perplexity. 28 cells, 70
          quantizations; about 20 minutes.
  :smoke  tests: a 2-layer d_model 32 model, 20 steps, 3 cells, one seed; seconds.
  :gpu    one H100/H200: d_model 256, 6 layers, 2000 pretraining steps, 128 calibration
          sequences, 500 reconstruction steps per block. Not run here.
  :llama  a Llama checkpoint (`--config.base.checkpoint=<HF dir>`, its tokenizer.json),
          g128 schemes, the papers' settings: 5000 reconstruction steps per block
          (FlexRound / LRQ; UniQuanF 2560), batch 1, LRQ rank 1024, learning rates of
          the Llama-2-7B W4A16 scripts, 128 calibration sequences x 2048 tokens (from
          Shakespeare train: C4 is not shipped), perplexity at seq_len 2048. Hours per
          cell on one accelerator; not run here.

Measured result (`:tiny`, 2 CPU cores, 1139 + 62 s; experiments/results/ptq/): float
perplexity 6.474 in domain / 13.263 out of domain. At w2a16g32: RTN 7.785 / 15.360,
GPTQ 7.201 / 14.213, FlexRound 6.863 / 14.018, LRQ 7.188 / 14.174, BCQ 7.484 / 14.576,
UniQuanF 6.838 / 13.571 (mean of 3 calibration seeds). LRQ learns 4.4x fewer parameters
than FlexRound (46,336 vs 201,728); its out-of-domain edge over FlexRound is within 2 SE
in all 5 schemes (closest: w3a16g32, -0.117 +- 0.059). UniQuanF beats BCQ at 2 and 3
bits and FlexRound at 2 bits (OOD -0.447 +- 0.038) beyond 2 SE.
"""

import ml_collections

VARIANTS = ("tiny", "smoke", "gpu", "llama")
RECON_METHODS = ("flexround", "lrq", "uniquanf")


def _grid(g: int) -> dict:
  five = ("w8a8", "w4a8", "w4a16", f"w3a16g{g}", f"w2a16g{g}")
  low = ("w4a16", f"w3a16g{g}", f"w2a16g{g}")
  return dict(rtn=five, flexround=five, lrq=five, gptq=low, awq=low, smoothquant=("w8a8",),
              uniquanf=low, bcq=low)


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  arg = arg or "tiny"
  if arg not in VARIANTS:
    raise ValueError(f"unknown variant {arg!r} of configs/ptq.py; use one of "
                     f"{', '.join(':' + v for v in VARIANTS)}")
  c = ml_collections.ConfigDict()
  c.job = "ptq"
  c.variant = arg
  c.seed = 0  # base-model init and pretraining data order
  c.tokenizer = "byte"  # jaxsun.data.get_tokenizer; :llama: the checkpoint's tokenizer.json
  c.data_dir = ""  # TFDS data dir; "" = $JAXSUN_TFDS_DIR or ~/.cache/jaxsun/tfds

  # The base model: pretrained here (checkpoint "") or a Hugging Face directory.
  c.base = ml_collections.ConfigDict(dict(checkpoint="", param_dtype="float32"))
  c.model = ml_collections.ConfigDict(dict(
      d_model=64, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=192, max_len=128))
  c.pretrain = ml_collections.ConfigDict()
  c.pretrain.corpus = "shakespeare"
  c.pretrain.seq_len = 128
  c.pretrain.batch_size = 32
  c.pretrain.steps = 600
  c.pretrain.eval_every = 200
  c.pretrain.eval_batches = 4
  c.pretrain.log_every = 100
  c.pretrain.checkpoint_every = 200
  c.pretrain.optimizer = ml_collections.ConfigDict(dict(
      learning_rate=3e-3, schedule="cosine", warmup_steps=30, weight_decay=0.1,
      grad_clip_norm=1.0))

  # Calibration: n_sequences windows of seq_len tokens drawn at random from the corpus's
  # train split; one sample (and reconstruction seed) per entry of `seeds`.
  c.calib = ml_collections.ConfigDict(dict(corpus="shakespeare", n_sequences=32,
                                           seq_len=128, seeds=(0, 1, 2)))
  # Perplexity (jaxsun.eval.perplexity): in domain = the corpus's validation split,
  # out of domain = prompt + answer of each `ood_task` record of `ood_split`.
  c.eval = ml_collections.ConfigDict(dict(
      seq_len=128, batch_size=16, id_corpus="shakespeare", ood_task="gsm_symbolic",
      ood_split="validation", max_tokens=16384))

  # Block reconstruction (jaxsun.quant.ptq.reconstruct.ReconConfig); lr per method,
  # lr_b: UniQuanF's BCQ scales ("b" group), the official 5e-3 / 5e-4 ratio.
  c.recon = ml_collections.ConfigDict(dict(
      steps=60, batch_size=4, act_quant=False,
      lr=ml_collections.ConfigDict(dict(flexround=3e-3, lrq=2e-3, uniquanf=5e-3)),
      lr_b=5e-4))
  # Per-method overrides of recon.steps (0: recon.steps; the papers: UniQuanF 2560).
  c.recon_steps = ml_collections.ConfigDict(dict(flexround=0, lrq=0, uniquanf=0))
  c.lrq_rank = 8  # 64-wide layers: 8 * (in + out) + vectors << FlexRound's in * out
  c.group_size = 32  # the g<group> schemes; 64 and 192 are multiples
  c.grid = ml_collections.ConfigDict(_grid(32))

  if arg == "smoke":  # the same pipeline in seconds
    c.model.update(d_model=32, n_layers=2, n_heads=2, n_kv_heads=1, d_ff=64, max_len=64)
    c.pretrain.update(seq_len=64, batch_size=8, steps=20, eval_every=10, eval_batches=2,
                      log_every=10, checkpoint_every=10)
    c.pretrain.optimizer.warmup_steps = 5
    c.calib.update(n_sequences=4, seq_len=64, seeds=(0,))
    c.eval.update(seq_len=64, batch_size=8, max_tokens=2048)
    c.recon.update(steps=2, batch_size=2)
    c.lrq_rank = 4
    c.grid = ml_collections.ConfigDict(dict(rtn=("w4a16", "w2a16g32"), lrq=("w2a16g32",)))
  elif arg == "gpu":
    c.model.update(d_model=256, n_layers=6, n_heads=8, n_kv_heads=4, d_ff=768, max_len=512)
    c.pretrain.update(seq_len=512, batch_size=64, steps=2000, eval_every=500,
                      checkpoint_every=500, log_every=100)
    c.pretrain.optimizer.update(learning_rate=1e-3, warmup_steps=100)
    c.calib.update(n_sequences=128, seq_len=512)
    c.eval.update(seq_len=512, batch_size=16, max_tokens=131072)
    c.recon.update(steps=500, batch_size=4)
    c.lrq_rank = 32
  elif arg == "llama":
    c.tokenizer = ""  # <base.checkpoint>/tokenizer.json
    c.base.update(param_dtype="float32")
    c.calib.update(n_sequences=128, seq_len=2048)
    c.eval.update(seq_len=2048, batch_size=1, max_tokens=0)  # 0: every token
    # The papers: 5000 steps (LRQ / FlexRound; UniQuanF 2560), batch 1; Llama-2-7B
    # W4A16 learning rates (FlexRound 3e-3, LRQ 9e-4; UniQuanF 5e-3 / 5e-4).
    c.recon.update(steps=5000, batch_size=1,
                   lr=ml_collections.ConfigDict(dict(flexround=3e-3, lrq=9e-4,
                                                     uniquanf=5e-3)))
    c.recon_steps.uniquanf = 2560
    c.lrq_rank = 1024
    c.group_size = 128
    c.grid = ml_collections.ConfigDict(_grid(128))
  c.lock()
  return c
