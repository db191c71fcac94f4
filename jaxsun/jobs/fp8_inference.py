"""The FP8 inference study (configs/fp8_inference.py): recipes vs BF16, square vs thin GEMMs.

    python -m experiments.launch --config=configs/fp8_inference.py:tiny --workdir=/tmp/fp8

Pretrain (or resume, or import) the base model with the PTQ study's helpers
(`jaxsun.jobs.ptq.base_model`, `eval_streams`); build the BF16 reference (the same
parameters computing in `reference_dtype`) and, per recipe of `config.recipes`, a copy
whose attention / MLP projections run that FP8 recipe (`jaxsun.quant.fp8_recipes`).
Every model scores the same windows (the perplexity protocol of `jaxsun.eval.perplexity`:
non-overlapping windows, the first token of each unscored), in domain and out of domain:
perplexity, the paired change of the mean NLL against BF16 with its standard error over
windows, top-1 next-token agreement with BF16, and the mean and largest KL(BF16 || model)
of the next-token distributions. Then the GEMM-level error of each accumulation against
float32 as K grows, the error of each granularity and format on activations with outliers,
and square vs thin GEMM throughput on this device
(`experiments.benchmarks.fp8_thin_gemm`). results.json is rewritten after every recipe (a
rerun with the same settings skips finished recipes), then table.md, fp8_inference.png
and COMMAND.md.
"""

from __future__ import annotations

import functools
import math
import os
import pathlib
import re
import time
from typing import Mapping

import jax
import jax.numpy as jnp
import numpy as np

REF_CACHE_BYTES = 2 << 30  # reference log-probs kept on device up to this size


# ----------------------------------------------------------------------------- config


def _template(variant: str):
  from configs import fp8_inference as cfg_lib  # pylint: disable=g-import-not-at-top
  return cfg_lib.get_config(variant if variant in cfg_lib.VARIANTS else "tiny")


def check_config(config) -> None:
  """Validates the study's keys and values; every error names the config key."""
  from jaxsun.jobs import common  # pylint: disable=g-import-not-at-top
  from jaxsun.quant import fp8, fp8_recipes  # pylint: disable=g-import-not-at-top
  if config.get("job") != "fp8_inference":
    raise ValueError(f"config.job={config.get('job')!r} must be 'fp8_inference'")
  ours = set(common.flatten(common.to_dict(config)))
  want = set(common.flatten(common.to_dict(_template(config.get("variant", "tiny")))))
  for key in sorted(ours - want):
    raise ValueError(f"config.{key} is not a key of configs/fp8_inference.py")
  for key in sorted(want - ours):
    raise ValueError(f"config.{key} is missing (see configs/fp8_inference.py)")

  def pos_int(key, v, minimum=1):
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
      raise ValueError(f"config.{key}={v!r} must be an int >= {minimum}")

  def names(key, values, allowed):
    if isinstance(values, str) or not values:
      raise ValueError(f"config.{key}={values!r} must be a non-empty tuple")
    for v in values:
      if v not in allowed:
        raise ValueError(f"config.{key}: {v!r} is not one of {tuple(allowed)}")
    if len(set(values)) != len(values):
      raise ValueError(f"config.{key}={tuple(values)!r} has duplicates")

  ec, rc = config.eval, config.recipes
  pos_int("eval.seq_len", ec.seq_len, 2)
  pos_int("eval.batch_size", ec.batch_size)
  pos_int("eval.max_tokens", ec.max_tokens, 0)
  if ec.max_tokens and ec.max_tokens < ec.seq_len:
    raise ValueError(f"config.eval.max_tokens={ec.max_tokens} is below one window of "
                     f"config.eval.seq_len={ec.seq_len} (0: every token)")
  if config.reference_dtype not in ("bfloat16", "float16", "float32"):
    raise ValueError(f"config.reference_dtype={config.reference_dtype!r} must be "
                     "'bfloat16', 'float16' or 'float32'")
  names("recipes.granularities", rc.granularities, fp8_recipes.GRANULARITIES)
  names("recipes.formats", rc.formats, tuple(fp8.FP8_FORMATS))
  if isinstance(rc.accumulations, str) or not rc.accumulations:
    raise ValueError(f"config.recipes.accumulations={rc.accumulations!r} must be a "
                     "non-empty tuple")
  for a in rc.accumulations:
    try:
      fp8_recipes.parse_accumulation(a, mantissa_bits=14)
    except ValueError as e:
      raise ValueError(f"config.recipes.accumulations: {e}") from None
  pos_int("recipes.mantissa_bits", rc.mantissa_bits)
  if rc.mantissa_bits > 23:
    raise ValueError(f"config.recipes.mantissa_bits={rc.mantissa_bits} must be <= 23")
  pos_int("recipes.step_k", rc.step_k)
  if fp8_recipes.SCALE_BLOCK % rc.step_k:
    raise ValueError(f"config.recipes.step_k={rc.step_k} must divide "
                     f"{fp8_recipes.SCALE_BLOCK} (block scales)")
  try:
    re.compile(rc.layers)
  except (re.error, TypeError) as e:
    raise ValueError(f"config.recipes.layers={rc.layers!r} is not a regex: {e}") from None
  ac = config.accum_error
  if isinstance(ac.k, int) or not ac.k:
    raise ValueError(f"config.accum_error.k={ac.k!r} must be a non-empty tuple of ints")
  for k in ac.k:
    pos_int("accum_error.k", k)
  pos_int("accum_error.m", ac.m)
  pos_int("accum_error.n", ac.n)
  names("accum_error.granularity", (ac.granularity,), fp8_recipes.GRANULARITIES)
  names("accum_error.fmt", (ac.fmt,), tuple(fp8.FP8_FORMATS))
  oc = config.outliers
  for key in ("m", "k", "n", "outlier_channels"):
    pos_int(f"outliers.{key}", oc[key])
  if oc.outlier_channels > oc.k:
    raise ValueError(f"config.outliers.outlier_channels={oc.outlier_channels} exceeds "
                     f"config.outliers.k={oc.k}")
  decades = oc.token_decades
  if isinstance(decades, (int, float)) or any(
      not isinstance(d, (int, float)) or isinstance(d, bool) or not d > 0 for d in decades):
    raise ValueError(f"config.outliers.token_decades={decades!r} must be a tuple of "
                     "numbers > 0")
  v = oc.outlier_scale
  if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
    raise ValueError(f"config.outliers.outlier_scale={v!r} must be a number > 0")
  gc = config.gemm
  for key in ("square", "thin_m"):
    vals = gc[key]
    if isinstance(vals, int) or not vals:
      raise ValueError(f"config.gemm.{key}={vals!r} must be a non-empty tuple of ints")
    for v in vals:
      pos_int(f"gemm.{key}", v)
  from experiments.benchmarks import fp8_thin_gemm  # pylint: disable=g-import-not-at-top
  names("gemm.methods", gc.methods, fp8_thin_gemm.METHODS)
  for key in ("thin_kn", "reps", "trials", "bandwidth_mib"):
    pos_int(f"gemm.{key}", gc[key])
  if not config.base.checkpoint and config.model.max_len < ec.seq_len:
    raise ValueError(f"config.model.max_len={config.model.max_len} is below "
                     f"config.eval.seq_len={ec.seq_len}")


def recipes(config) -> list:
  """The `Fp8Recipe`s of the grid, granularity-major (then format, then accumulation)."""
  from jaxsun.quant import fp8_recipes  # pylint: disable=g-import-not-at-top
  rc = config.recipes
  return [fp8_recipes.Fp8Recipe(g, f, **fp8_recipes.parse_accumulation(
              a, mantissa_bits=int(rc.mantissa_bits), step_k=int(rc.step_k)))
          for g in rc.granularities for f in rc.formats for a in rc.accumulations]


def identity(config) -> dict:
  """The settings every stored recipe result depends on (the grid and the GEMM-level
  sections excluded: adding recipes keeps the finished ones)."""
  from jaxsun.jobs import common  # pylint: disable=g-import-not-at-top
  d = common.to_dict(config)
  for k in ("variant", "accum_error", "outliers", "gemm"):
    d.pop(k, None)
  for k in ("granularities", "formats", "accumulations"):
    d["recipes"].pop(k, None)
  return d


# ---------------------------------------------------------------------- measurement


def windows_of(ids: np.ndarray, seq_len: int) -> np.ndarray:
  """i32[n, seq_len]: the stream cut into non-overlapping windows, remainder dropped."""
  n = ids.size // seq_len
  if n == 0:
    raise ValueError(f"the text has {ids.size} tokens, fewer than one window of "
                     f"seq_len={seq_len}")
  return np.asarray(ids[:n * seq_len], np.int32).reshape(n, seq_len)


def batches(windows: np.ndarray, batch_size: int):
  """(i32[B, T] tokens, f32[B] weights) batches of `batch_size` windows; the last is
  filled up with copies of its own rows (weight 0), which leaves every current scale
  of the batch unchanged (a copy adds no new magnitude) and the compiled shape fixed."""
  for start in range(0, len(windows), batch_size):
    chunk = windows[start:start + batch_size]
    weights = np.zeros((batch_size,), np.float32)
    weights[:len(chunk)] = 1.0
    rows = np.resize(np.arange(len(chunk)), batch_size)
    yield jnp.asarray(chunk[rows]), jnp.asarray(weights)


@functools.partial(jax.jit, static_argnames=("graphdef",))
def _log_probs(graphdef, state, tokens):  # i32[B, T] -> f32[B, T, V]
  from flax import nnx  # pylint: disable=g-import-not-at-top
  logits, _ = nnx.merge(graphdef, state)(tokens)
  return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)


@jax.jit
def _row_sums(logp, ref_logp, tokens):
  """Per window: (NLL sum, top-1 agreements, KL sum, largest KL) over positions 1..T-1."""
  lp, rp = logp[:, :-1], ref_logp[:, :-1]  # f32[B, T-1, V]: predictions of tokens 1..T-1
  nll = -jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]  # f32[B, T-1]
  agree = (jnp.argmax(lp, -1) == jnp.argmax(rp, -1)).astype(jnp.float32)
  kl = jnp.sum(jnp.exp(rp) * (rp - lp), axis=-1)  # KL(ref || model), f32[B, T-1]
  return nll.sum(1), agree.sum(1), kl.sum(1), kl.max(1)


class Reference:
  """The reference model's log-probs per batch of one stream (kept if small enough)."""

  def __init__(self, model, windows: np.ndarray, batch_size: int, vocab: int):
    from flax import nnx  # pylint: disable=g-import-not-at-top
    self.graphdef, self.state = nnx.split(model)
    self.windows, self.batch_size = windows, batch_size
    nbytes = windows.size * vocab * 4
    self.cache = ([_log_probs(self.graphdef, self.state, t)
                   for t, _ in batches(windows, batch_size)]
                  if nbytes <= REF_CACHE_BYTES else None)

  def log_probs(self, i: int, tokens):
    if self.cache is not None:
      return self.cache[i]
    return _log_probs(self.graphdef, self.state, tokens)


def evaluate(model, ref: Reference) -> dict:
  """Perplexity, agreement and KL of `model` against `ref` on `ref`'s windows, plus the
  per-window mean NLL (`nll_windows`, for paired comparisons; not stored)."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  graphdef, state = nnx.split(model)
  cols = [[], [], [], []]
  for i, (tokens, weights) in enumerate(batches(ref.windows, ref.batch_size)):
    sums = _row_sums(_log_probs(graphdef, state, tokens), ref.log_probs(i, tokens), tokens)
    keep = np.asarray(weights) > 0
    for col, s in zip(cols, sums):
      col.append(np.asarray(s, np.float64)[keep])
  nll, agree, kl, kl_max = (np.concatenate(c) for c in cols)
  per = ref.windows.shape[1] - 1  # scored positions per window
  n = nll.size * per
  mean_nll = float(nll.sum() / n)
  return {"ppl": math.exp(mean_nll), "nll": mean_nll, "top1_agreement": float(agree.sum() / n),
          "kl_mean": float(kl.sum() / n), "kl_max": float(kl_max.max()), "tokens": int(n),
          "windows": int(nll.size), "nll_windows": nll / per}


def paired(a: np.ndarray, b: np.ndarray) -> dict:
  """Mean of a - b over windows and its standard error (ddof 1)."""
  d = np.asarray(a, np.float64) - np.asarray(b, np.float64)
  se = float(d.std(ddof=1) / math.sqrt(d.size)) if d.size > 1 else 0.0
  return {"mean": float(d.mean()), "se": se, "n": int(d.size)}


def _public(m: Mapping, ref_nll: np.ndarray | None) -> dict:
  out = {k: v for k, v in m.items() if k != "nll_windows"}
  if ref_nll is not None:
    out["delta_nll"] = paired(m["nll_windows"], ref_nll)
  return out


def accumulation_error(config, log=None) -> list[dict]:
  """Per K: the FP8 product's error against the exact float32 product, and each
  accumulation's error against float32 accumulation of the same FP8 operands
  (relative Frobenius norms)."""
  from jaxsun.quant import fp8_recipes as fr  # pylint: disable=g-import-not-at-top
  ac, rc = config.accum_error, config.recipes
  accs = [a for a in rc.accumulations if a != "f32"]
  out = []
  for k in ac.k:
    kx, kw = jax.random.split(jax.random.fold_in(jax.random.key(ac.seed), k))
    x = jax.random.normal(kx, (ac.m, k), jnp.float32)
    w = 0.05 * jax.random.normal(kw, (k, ac.n), jnp.float32)
    exact = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
    qa, sa, qb, sb = fr.quantize_operands(x, w, ac.granularity, ac.fmt)
    y32 = fr.fp8_dot_sim(qa, sa, qb, sb)[:, :ac.n]
    rel = lambda y, r: float(jnp.linalg.norm(y - r) / jnp.linalg.norm(r))  # noqa: E731
    row = {"k": int(k), "steps": -(-int(k) // int(rc.step_k)),
           "fp8_f32acc_vs_exact": rel(y32, exact), "vs_f32_accumulation": {}}
    for a in accs:
      f = fr.parse_accumulation(a, mantissa_bits=int(rc.mantissa_bits), step_k=int(rc.step_k))
      y = fr.fp8_dot_sim(qa, sa, qb, sb, **f)[:, :ac.n]
      row["vs_f32_accumulation"][a] = rel(y, y32)
    out.append(row)
    if log:
      log(f"fp8_inference: accumulation error K={k:>6}: fp8 vs exact "
          f"{row['fp8_f32acc_vs_exact']:.2e}; " + ", ".join(
              f"{a} {v:.2e}" for a, v in row["vs_f32_accumulation"].items()))
  return out


def outlier_operands(kind: str, m: int, k: int, n: int, *, token_decades: float = 3.0,
                     outlier_channels: int = 4, outlier_scale: float = 100.0, seed: int = 0):
  """(x f32[m, k], w f32[k, n]) of one activation kind, w ~ N(0, 0.05^2).

  "gaussian": x ~ N(0, 1). "token_scales": each row (token) of x scaled by 10^u, u
  uniform over `token_decades` decades ending at 10x (tokens of very different
  magnitudes, as with massive activations). "channel_outliers": the first
  `outlier_channels` input channels (columns of x) scaled by `outlier_scale` (the
  outlier features of LLM activations, LLM.int8)."""
  kx, kw, ks = jax.random.split(jax.random.key(seed), 3)
  x = jax.random.normal(kx, (m, k), jnp.float32)
  if kind == "token_scales":
    x = x * 10.0 ** jax.random.uniform(ks, (m, 1), minval=1.0 - token_decades, maxval=1.0)
  elif kind == "channel_outliers":
    x = x.at[:, :outlier_channels].multiply(outlier_scale)
  elif kind != "gaussian":
    raise ValueError(f"operand kind {kind!r} is not 'gaussian', 'token_scales' or "
                     "'channel_outliers'")
  return x, 0.05 * jax.random.normal(kw, (k, n), jnp.float32)


def row_rel_error(y: jax.Array, exact: jax.Array) -> float:
  """Mean over rows (tokens) of |y_i - exact_i| / |exact_i|: every token counts alike,
  however small its activations."""
  return float(jnp.mean(jnp.linalg.norm(y - exact, axis=1) / jnp.linalg.norm(exact, axis=1)))


def outlier_error(config, log=None) -> list[dict]:
  """Per activation kind, each granularity x format's mean per-token relative error
  (float32 accumulation) against the exact product: where the scale granularity and
  the E4M3 range matter."""
  from jaxsun.quant import fp8_recipes as fr  # pylint: disable=g-import-not-at-top
  oc, rc = config.outliers, config.recipes
  cases = [("gaussian", {})]
  cases += [(f"tokens over {d:g} decades", dict(kind="token_scales", token_decades=d))
            for d in oc.token_decades]
  cases.append((f"{oc.outlier_channels} channels x{oc.outlier_scale:g}",
                dict(kind="channel_outliers")))
  out = []
  for name, kw in cases:
    x, w = outlier_operands(kw.pop("kind", "gaussian"), oc.m, oc.k, oc.n,
                            outlier_channels=oc.outlier_channels,
                            outlier_scale=oc.outlier_scale, seed=oc.seed, **kw)
    exact = jnp.dot(x, w, precision=jax.lax.Precision.HIGHEST)
    row = {"kind": name, "rel_error": {}}
    for g in rc.granularities:
      for f in rc.formats:
        row["rel_error"][f"{g}:{f}"] = row_rel_error(fr.recipe_dot(x, w, fr.Fp8Recipe(g, f)),
                                                     exact)
    out.append(row)
    if log:
      log(f"fp8_inference: {name:<24} " + ", ".join(
          f"{k} {v:.3f}" for k, v in row["rel_error"].items()))
  return out


# --------------------------------------------------------------------------- reports


def _cell(m: Mapping) -> str:
  return f"{m['ppl']:.3f}"


def _delta(m: Mapping) -> str:
  d = m.get("delta_nll")
  return "—" if d is None else f"{d['mean']:+.4f} ± {d['se']:.4f}"


def summary_lines(results: Mapping) -> list[str]:
  """Sentences stating what the numbers show (no claims beyond them)."""
  recs = results["recipes"]
  out = []
  f32 = {(r["granularity"], r["format"]): r for r in recs.values()
         if r["accumulation"] == "f32"}
  if f32:
    for fmt in dict.fromkeys(f for _, f in f32):
      order = sorted(((r["id"]["kl_mean"], g) for (g, f), r in f32.items() if f == fmt))
      out.append(f"- {fmt}, float32 accumulation, in-domain mean KL(BF16 || FP8) from "
                 "lowest to highest: " + ", ".join(f"{g} {v:.2e}" for v, g in order) + ".")
    pairs = [(g, f32[(g, "e4m3")], f32[(g, "e4m3_g2")]) for g, f in f32
             if f == "e4m3" and (g, "e4m3_g2") in f32]
    if pairs:
      out.append("- Gaudi 2 range (e4m3_g2) over OCP (e4m3), KL ratio in domain / out of "
                 "domain: " + ", ".join(
                     f"{g} {b['id']['kl_mean'] / a['id']['kl_mean']:.2f} / "
                     f"{b['ood']['kl_mean'] / a['ood']['kl_mean']:.2f}" for g, a, b in pairs)
                 + ".")
  acc = {}
  for r in recs.values():
    acc.setdefault((r["granularity"], r["format"]), {})[r["accumulation"]] = r
  spreads = []
  for (g, f), by in acc.items():
    if "f32" in by and len(by) > 1:
      base = by["f32"]["id"]["ppl"]
      spreads.append(max(abs(r["id"]["ppl"] - base) for r in by.values()))
  if spreads:
    out.append(f"- Accumulation in the model: across the accumulation settings of a "
               f"granularity and format, in-domain perplexity moves by at most "
               f"{max(spreads):.4f} from float32 accumulation.")
  ae = results.get("accumulation_error") or []
  if ae:
    last = ae[-1]
    out.append(f"- Accumulation at the GEMM level (K = {last['k']}, {last['steps']} steps): "
               + ", ".join(f"{a} {v:.2e}" for a, v in last["vs_f32_accumulation"].items())
               + f" relative error against float32 accumulation; FP8 quantization itself "
               f"{last['fp8_f32acc_vs_exact']:.2e} against the exact product.")
  for r in results.get("outlier_error") or []:
    order = sorted((v, k) for k, v in r["rel_error"].items())
    out.append(f"- One GEMM, activations {r['kind']}: per-token error from "
               f"{order[0][0]:.3f} ({order[0][1]}) to {order[-1][0]:.3f} ({order[-1][1]}).")
  gemm = results.get("gemm", {}).get("summary", {})
  for method, s in gemm.items():
    thin = ", ".join(f"M={t['m']} {t['thin_over_square']:.3f}" for t in s["thin"])
    out.append(f"- {method}: square best {s['square_best']['tflops']:.3g} TFLOP/s; thin / "
               f"square utilisation {thin} (peak: {s['peak_of']}).")
  return out


def markdown_report(results: Mapping) -> str:
  from experiments.benchmarks import fp8_thin_gemm  # pylint: disable=g-import-not-at-top
  cfg = results["config"]
  ec = cfg["eval"]
  ref, fl = results["reference"], results["float32"]
  lines = [f"# FP8 inference study ({cfg.get('variant', '')})", "",
           f"Base model: {results['base'].get('num_params', 0):,} parameters. Every "
           f"attention / MLP projection runs the recipe (regex `{cfg['recipes']['layers']}`); "
           f"embeddings, norms, attention and the LM head compute in "
           f"{cfg['reference_dtype']}. Scored: {ref['id']['tokens']:,} in-domain tokens "
           f"({ec['id_corpus']} validation), {ref['ood']['tokens']:,} out-of-domain tokens "
           f"({ec['ood_task']} {ec['ood_split']}), windows of {ec['seq_len']}, "
           f"{ec['batch_size']} windows per forward (the activations' current scales cover "
           "one forward). ΔNLL: mean over windows of the recipe's minus BF16's mean NLL "
           "(nats / token), ± its standard error (paired). Agreement: top-1 next-token "
           "agreement with BF16; KL: mean KL(BF16 || model) per token. Accumulation: "
           f"inner accumulator of {cfg['recipes']['mantissa_bits']} mantissa bits, "
           f"truncated after every {cfg['recipes']['step_k']}-wide K step, promoted to "
           "float32 every n steps (promoteK: never).", "",
           "| model | format | accumulation | ppl ID | ΔNLL ID | agree ID | KL ID | "
           "ppl OOD | ΔNLL OOD | agree OOD | KL OOD | s |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for name, m in (("BF16 (reference)", ref), ("float32", fl)):
    lines.append(f"| {name} | — | — | {_cell(m['id'])} | {_delta(m['id'])} | "
                 f"{m['id']['top1_agreement']:.4f} | {m['id']['kl_mean']:.2e} | "
                 f"{_cell(m['ood'])} | {_delta(m['ood'])} | {m['ood']['top1_agreement']:.4f} "
                 f"| {m['ood']['kl_mean']:.2e} | {m.get('seconds', 0):.1f} |")
  for r in results["recipes"].values():
    lines.append(f"| {r['granularity']} | {r['format']} | {r['accumulation']} | "
                 f"{_cell(r['id'])} | {_delta(r['id'])} | {r['id']['top1_agreement']:.4f} | "
                 f"{r['id']['kl_mean']:.2e} | {_cell(r['ood'])} | {_delta(r['ood'])} | "
                 f"{r['ood']['top1_agreement']:.4f} | {r['ood']['kl_mean']:.2e} | "
                 f"{r['seconds']:.1f} |")
  ae = results.get("accumulation_error") or []
  if ae:
    ac = cfg["accum_error"]
    accs = list(ae[0]["vs_f32_accumulation"])
    lines += ["", "## Accumulation error of one GEMM as K grows", "",
              f"x: N(0, 1)[{ac['m']}, K] @ w: N(0, 0.05²)[K, {ac['n']}], {ac['granularity']} "
              f"scales, {ac['fmt']}; relative Frobenius error. Truncation errs toward zero, "
              "so an inner sum's error grows with the steps it holds.", "",
              "| K | steps | FP8 (f32 acc.) vs exact | " + " | ".join(
                  f"{a} vs f32 acc." for a in accs) + " |",
              "|---|---|---|" + "---|" * len(accs)]
    for row in ae:
      lines.append(f"| {row['k']} | {row['steps']} | {row['fp8_f32acc_vs_exact']:.2e} | "
                   + " | ".join(f"{row['vs_f32_accumulation'][a]:.2e}" for a in accs) + " |")
  oe = results.get("outlier_error") or []
  if oe:
    oc = cfg["outliers"]
    names = list(oe[0]["rel_error"])
    lines += ["", "## Where the scale granularity matters: one GEMM per activation kind", "",
              f"x: [{oc['m']}, {oc['k']}] @ w: N(0, 0.05²)[{oc['k']}, {oc['n']}], float32 "
              "accumulation; mean over tokens (rows) of each token's relative error against "
              "the exact product. x is N(0, 1), or N(0, 1) with each token scaled by 10^u, "
              "u uniform over d decades ending at 10x, or with input channels scaled up "
              "(outlier features).", "",
              "| recipe | " + " | ".join(r["kind"] for r in oe) + " |",
              "|---|" + "---|" * len(oe)]
    for name in names:
      lines.append(f"| {name} | " + " | ".join(f"{r['rel_error'][name]:.4f}" for r in oe)
                   + " |")
  if results.get("gemm"):
    lines += ["", fp8_thin_gemm.markdown(results["gemm"], heading="##").rstrip()]
  lines += ["", "## What the numbers show", ""] + summary_lines(results)
  lines += ["", f"{_wall_time(results)} ({results.get('backend', '')}, "
            f"{results.get('devices', [''])[0]}, jax {results.get('jax', '')})."]
  return "\n".join(lines) + "\n"


def _wall_time(results: Mapping) -> str:
  text = f"Wall time {results.get('wall_time_s', 0):.0f} s"
  if results.get("resumed_recipes"):
    text += (f" in the last session, which read {results['resumed_recipes']} finished "
             "recipes back from results.json")
  return text


def make_plot(results: Mapping, path: pathlib.Path) -> pathlib.Path:
  """Six panels: KL and agreement by granularity and format; KL by accumulation; one
  GEMM's accumulation error vs K; per-token error by activation kind; thin GEMM
  utilisation by M."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  recs = list(results["recipes"].values())
  grans = list(dict.fromkeys(r["granularity"] for r in recs))
  fmts = list(dict.fromkeys(r["format"] for r in recs))
  accs = list(dict.fromkeys(r["accumulation"] for r in recs))
  find = {(r["granularity"], r["format"], r["accumulation"]): r for r in recs}
  fig, axes = plt.subplots(2, 3, figsize=(17, 8.5))
  colors = plt.get_cmap("tab10")
  acc0 = "f32" if "f32" in accs else accs[0]
  width = 0.8 / max(1, len(fmts))
  for ax, key, title in ((axes[0, 0], "kl_mean", "mean KL(BF16 || FP8) per token"),
                         (axes[0, 1], "top1_agreement", "top-1 agreement with BF16")):
    for j, f in enumerate(fmts):
      for s, (stream, hatch) in enumerate((("id", None), ("ood", "//"))):
        xs, ys = [], []
        for i, g in enumerate(grans):
          r = find.get((g, f, acc0))
          if r is not None:
            xs.append(i + (j - (len(fmts) - 1) / 2) * width + (s - 0.5) * width / 2)
            ys.append(r[stream][key])
        ax.bar(xs, ys, width / 2, color=colors(j), hatch=hatch,
               label=f"{f} {'in domain' if stream == 'id' else 'out of domain'}")
    if key == "kl_mean":
      ax.set_yscale("log")
    else:
      lo = min(r[s][key] for r in recs for s in ("id", "ood"))
      ax.set_ylim(max(0.0, lo - 0.02), 1.0)
    ax.set_xticks(range(len(grans)))
    ax.set_xticklabels(grans)
    ax.set_title(f"{title} ({acc0} accumulation)", fontsize=10)
    ax.legend(fontsize=7)
  ax = axes[1, 0]
  for i, g in enumerate(grans):
    for j, f in enumerate(fmts):
      ys = [find[(g, f, a)]["id"]["kl_mean"] if (g, f, a) in find else np.nan for a in accs]
      ax.plot(range(len(accs)), ys, "o-" if j == 0 else "s--", color=colors(i),
              label=f"{g} {f}")
  ax.set_xticks(range(len(accs)))
  ax.set_xticklabels(accs)
  ax.set_yscale("log")
  ax.set_title("in-domain KL by accumulation (the model)", fontsize=10)
  ax.legend(fontsize=6, ncol=2)
  ax = axes[1, 1]
  ae = results.get("accumulation_error") or []
  if ae:
    for i, a in enumerate(ae[0]["vs_f32_accumulation"]):
      ax.plot([r["k"] for r in ae], [r["vs_f32_accumulation"][a] for r in ae], "o-",
              color=colors(i), label=f"{a} vs f32 accumulation")
    ax.plot([r["k"] for r in ae], [r["fp8_f32acc_vs_exact"] for r in ae], "k--", lw=1,
            label="FP8 (f32 acc.) vs exact")
    ax.set(xscale="log", yscale="log", xlabel="K", ylabel="relative error")
    ax.legend(fontsize=7)
  ax.set_title("accumulation error of one GEMM vs K", fontsize=10)
  ax = axes[0, 2]
  oe = results.get("outlier_error") or []
  if oe:
    for i, name in enumerate(oe[0]["rel_error"]):
      g, f = name.split(":")
      ax.plot(range(len(oe)), [r["rel_error"][name] for r in oe],
              "o-" if f == fmts[0] else "s--", color=colors(grans.index(g) if g in grans
                                                         else i), label=name)
    ax.set_xticks(range(len(oe)))
    ax.set_xticklabels([r["kind"] for r in oe], fontsize=7)
    ax.set(yscale="log", ylabel="mean per-token relative error")
    ax.legend(fontsize=6, ncol=2)
  ax.set_title("one GEMM: activations with outliers (f32 accumulation)", fontsize=10)
  ax = axes[1, 2]
  gemm = results.get("gemm") or {}
  for i, (method, s) in enumerate(gemm.get("summary", {}).items()):
    ax.plot([t["m"] for t in s["thin"]], [t["utilisation"] for t in s["thin"]], "o-",
            color=colors(i), label=f"{method} (square best {s['square_best']['utilisation']:.2f})")
  ax.set(xscale="log", yscale="log", xlabel="M (tokens) of M x K x K",
         ylabel="utilisation (fraction of peak)")
  dev = gemm.get("machine", {}).get("device_kind", "")
  of = {s["peak_of"] for s in gemm.get("summary", {}).values()}
  ax.set_title(f"thin GEMM utilisation ({dev}; peak: {', '.join(sorted(of))})", fontsize=10)
  ax.legend(fontsize=7)
  fig.suptitle("FP8 recipes against BF16, and square vs thin GEMMs", fontsize=11)
  fig.tight_layout()
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=100)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def write_command(config, workdir: pathlib.Path, results: Mapping) -> None:
  from jaxsun.jobs import common  # pylint: disable=g-import-not-at-top
  template = _template(config.get("variant", "tiny"))
  common.write_command(
      workdir, common.command_line(config, workdir, "configs/fp8_inference.py", template),
      f"{_wall_time(results)} on {results.get('backend')} "
      f"({results.get('devices', [''])[0]}), jax {results.get('jax')}.")


# ------------------------------------------------------------------------------- run


def run(config, workdir: str | os.PathLike) -> dict:
  """Runs the study; returns (and writes) results.json's contents."""
  from jaxsun import data as data_lib  # pylint: disable=g-import-not-at-top
  from jaxsun.jobs import common, ptq  # pylint: disable=g-import-not-at-top
  from jaxsun.quant import fp8_recipes as fr  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks import fp8_thin_gemm  # pylint: disable=g-import-not-at-top
  sw = common.Stopwatch()
  workdir = common.prepare_workdir(workdir)
  check_config(config)
  grid = recipes(config)
  tokenizer = data_lib.get_tokenizer(ptq.tokenizer_name(config))
  ident = identity(config)
  path = workdir / "results.json"
  prev = common.load_previous(path, ident, "fp8_inference")
  model, base_summary = ptq.base_model(config, workdir, tokenizer)
  ec = config.eval
  streams = {k: windows_of(v, ec.seq_len) for k, v in ptq.eval_streams(config, tokenizer).items()}
  vocab = int(model.cfg.vocab_size)
  ref_model = fr.with_compute_dtype(model, config.reference_dtype)
  t0 = time.perf_counter()
  refs = {k: Reference(ref_model, w, ec.batch_size, vocab) for k, w in streams.items()}
  ref_m = {k: evaluate(ref_model, refs[k]) for k in streams}
  ref_nll = {k: m["nll_windows"] for k, m in ref_m.items()}
  reference = {k: _public(m, None) for k, m in ref_m.items()}
  reference["seconds"] = round(time.perf_counter() - t0, 2)
  t0 = time.perf_counter()
  f32_model = fr.with_compute_dtype(model, "float32")
  float32 = {k: _public(evaluate(f32_model, refs[k]), ref_nll[k]) for k in streams}
  float32["seconds"] = round(time.perf_counter() - t0, 2)
  print(f"fp8_inference: {config.reference_dtype} reference ppl ID "
        f"{reference['id']['ppl']:.4f} OOD {reference['ood']['ppl']:.4f}; float32 ID "
        f"{float32['id']['ppl']:.4f} OOD {float32['ood']['ppl']:.4f}", flush=True)
  results = {"job": "fp8_inference", "config": common.to_dict(config), "identity": ident,
             "base": base_summary, "vocab_size": vocab, "reference": reference,
             "float32": float32, "recipes": {}, "jax": jax.__version__,
             "backend": jax.default_backend(), "devices": [str(d) for d in jax.devices()]}
  prev_recipes = prev.get("recipes", {})
  skipped = 0
  for recipe in grid:
    if recipe.label in prev_recipes:
      results["recipes"][recipe.label] = prev_recipes[recipe.label]
      skipped += 1
      continue
    t0 = time.perf_counter()
    qmodel = fr.apply_recipe(ref_model, recipe, config.recipes.layers)
    m = {k: _public(evaluate(qmodel, refs[k]), ref_nll[k]) for k in streams}
    r = {"granularity": recipe.granularity, "format": recipe.fmt,
         "accumulation": recipe.accumulation, "acc_mantissa_bits": recipe.acc_mantissa_bits,
         "promote_every": recipe.promote_every, "step_k": recipe.step_k, **m,
         "seconds": round(time.perf_counter() - t0, 2)}
    results["recipes"][recipe.label] = r
    print(f"fp8_inference: {recipe.label:<34} ppl ID {m['id']['ppl']:.4f} OOD "
          f"{m['ood']['ppl']:.4f}  agree {m['id']['top1_agreement']:.4f}  KL "
          f"{m['id']['kl_mean']:.2e}  ({r['seconds']:.1f} s)", flush=True)
    results["wall_time_s"] = round(sw.elapsed(), 2)
    common.write_json_atomic(path, results)
  if skipped:
    print(f"fp8_inference: {skipped} recipes read back from an earlier results.json",
          flush=True)
  log = lambda s: print(s, flush=True)  # noqa: E731
  results["accumulation_error"] = accumulation_error(config, log=log)
  results["outlier_error"] = outlier_error(config, log=log)
  gc = config.gemm
  results["gemm"] = fp8_thin_gemm.run(
      square=tuple(gc.square), thin_m=tuple(gc.thin_m), thin_kn=int(gc.thin_kn),
      methods=tuple(gc.methods), reps=int(gc.reps), trials=int(gc.trials),
      bandwidth_mib=int(gc.bandwidth_mib), log=lambda s: log("fp8_inference: " + s))
  results["resumed_recipes"] = skipped
  results["wall_time_s"] = round(sw.elapsed(), 2)
  results["plot"] = make_plot(results, workdir / "fp8_inference.png").name
  common.write_json_atomic(path, results)
  table = markdown_report(results)
  common.write_bytes_atomic(workdir / "table.md", table.encode())
  write_command(config, workdir, results)
  print(table, flush=True)
  return results
