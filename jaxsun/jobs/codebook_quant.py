"""The `codebook_quant` job: quantize a pretrained LM's dense layers, compare perplexity.

    python -m experiments.launch --config=configs/codebook_quant.py:tiny --workdir=/tmp/cq

Pretrains the base model exactly as the `lm` job does (a rerun, or a workdir that holds
that run's checkpoints, resumes instead of training), then for each format quantizes the
layers matching `quant.pattern` with `jaxsun.quant.quantize_model` (calibrated on train
batches) and also rounds the same layers to nearest at the same bits, and reports the
validation perplexity of the float, codebook and RTN models with the quantizer's
per-layer output errors. Writes results.json.
"""

from __future__ import annotations

import itertools
import os

import jax
import jax.numpy as jnp
from flax import nnx

from jaxsun import data as data_lib
from jaxsun.jobs import common
from jaxsun.jobs import lm
from jaxsun.quant import codebook
from jaxsun.quant import layers as qlayers
from jaxsun.split import SplitModel
from jaxsun.train.trainer import evaluate_loss
from pallas_kernels.psumbook_gemm import CodebookFormat


def rtn_model(model: nnx.Module, pattern: str, bits: int, group: int) -> nnx.Module:
  """A copy of `model` with the matching Linears rounded to nearest (dequantized)."""
  out = nnx.clone(model)
  for path in qlayers.select_linears(out, pattern).values():
    mod = out
    for p in path:
      mod = mod[p] if isinstance(p, int) else getattr(mod, p)
    mod.kernel[...] = codebook.rtn_quantize(mod.kernel[...], bits, group).astype(
        mod.kernel[...].dtype)
  return out


def run(config, workdir: str | os.PathLike) -> dict:
  sw = common.Stopwatch()
  workdir = common.prepare_workdir(workdir)
  qc = config.quant
  formats = [CodebookFormat.parse(f) for f in qc.formats]  # bad names fail here
  tokenizer = data_lib.get_tokenizer(config.tokenizer)
  model_cfg = common.model_config(config.model, tokenizer.vocab_size, "lm")
  data_dir = config.data_dir or None
  dc = config.data
  split, summary = lm.pretrain(config.train, model_cfg, tokenizer, workdir, data_dir,
                               sources=dc.sources, weights=dc.weights,
                               eval_source=dc.eval_source, seed=config.seed,
                               identity={"model": common.to_dict(config.model),
                                         "tokenizer": config.tokenizer})
  model = split.prefill_module()
  held_out = list(itertools.islice(data_lib.lm_batches(
      dc.eval_source, tokenizer, seq_len=config.train.seq_len,
      batch_size=config.train.batch_size, split="validation", data_dir=data_dir),
      qc.eval_batches))
  calib = next(data_lib.lm_batches(dc.sources[0], tokenizer, seq_len=config.train.seq_len,
                                   batch_size=qc.calibration_rows, seed=config.seed + 1,
                                   data_dir=data_dir))

  def ppl(m):
    return evaluate_loss(SplitModel.from_model(m), held_out)["perplexity"]

  qcfg = codebook.QuantizerConfig(kmeans_iterations=qc.kmeans_iterations,
                                  iterations=qc.iterations, beam=qc.beam,
                                  adam_steps=qc.adam_steps)
  results = {"job": "codebook_quant", "config": common.to_dict(config),
             "base": summary, "float_perplexity": ppl(model), "formats": {}}
  print(f"float model: validation perplexity {results['float_perplexity']:.3f}", flush=True)
  for fmt in formats:
    qmodel, report = qlayers.quantize_model(model, jnp.asarray(calib["tokens"]),
                                            pattern=qc.pattern, fmt=fmt, cfg=qcfg)
    bits = fmt.m * fmt.b // fmt.v
    entry = {"bits_per_weight": fmt.bits_per_weight, "perplexity": ppl(qmodel),
             "rtn_perplexity": ppl(rtn_model(model, qc.pattern, bits, fmt.g)),
             "rtn_bits": bits, "layers": {k: {"error_init": v[0], "error_final": v[-1]}
                                          for k, v in report.items()}}
    results["formats"][fmt.name] = entry
    print(f"{fmt.name} ({fmt.bits_per_weight} bits/weight): perplexity "
          f"{entry['perplexity']:.3f}; round-to-nearest {bits}-bit g{fmt.g}: "
          f"{entry['rtn_perplexity']:.3f}", flush=True)
  results.update(wall_time_s=round(sw.elapsed(), 2), jax=jax.__version__,
                 backend=jax.default_backend())
  common.write_json_atomic(workdir / "results.json", results)
  return results
