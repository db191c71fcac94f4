r"""Codebook-quantize a pretrained LM (AQLM-style, the Psumbook GEMM's format), perplexity.

    python -m experiments.launch --config=configs/codebook_quant.py:tiny --workdir=/tmp/cq
    python -m experiments.launch --config=configs/codebook_quant.py --workdir=/tmp/lm_10m
        # a workdir of `configs/lm.py` (same model/train settings) resumes its checkpoints

What it does (`jaxsun.jobs.codebook_quant`): pretrain (or resume) the `lm` job's model,
quantize the attention and MLP projections in each format, and compare validation
perplexity with the float model and with round-to-nearest at the same bits.

Expected runtime on 2 CPU cores: `:tiny` about a minute; the default pretrains the 10m
preset (a GPU-sized run). Expected result: results.json with float / codebook / RTN
perplexities per format and per-layer output errors; numbers are whatever the run
measures.
"""

import ml_collections

from configs import lm as lm_config


def get_config(arg: str | None = None) -> ml_collections.ConfigDict:
  c = lm_config.get_config("tiny" if arg == "tiny" else None)
  c.unlock()
  c.job = "codebook_quant"
  c.quant = ml_collections.ConfigDict()
  c.quant.formats = ("m1v4g128", "m2v8g128")  # CodebookFormat names
  c.quant.pattern = r"layers/\d+/(attn|mlp)/.*"  # which Linears (path regex)
  c.quant.calibration_rows = 16  # sequences of train.seq_len tokens
  c.quant.eval_batches = 8  # validation batches for perplexity
  c.quant.kmeans_iterations = 20
  c.quant.iterations = 4
  c.quant.beam = 4
  c.quant.adam_steps = 50
  if arg == "tiny":
    c.tokenizer = "byte"
    c.model.update(d_model=128, d_ff=256)  # K = 128 and 256: multiples of g = 128
    c.quant.update(calibration_rows=8, eval_batches=4, iterations=2, adam_steps=20,
                   kmeans_iterations=10)
  elif arg not in (None, ""):
    raise ValueError(f"unknown variant {arg!r} of configs/codebook_quant.py (use :tiny)")
  c.lock()
  return c
