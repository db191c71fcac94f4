"""The PTQ study (configs/ptq.py): methods x schemes x calibration seeds, perplexity ID/OOD.

    python -m experiments.launch --config=configs/ptq.py:tiny --workdir=/tmp/ptq_tiny

Pretrain (or resume, or import) the base model; measure the float model's perplexity in
domain and out of domain (`jaxsun.eval.perplexity`, the papers' protocol); then for each
cell (method, scheme) of `config.grid` and each calibration seed, quantize every
attention / MLP projection through `jaxsun.quant.api.quantize` and measure both
perplexities, the learnable-parameter count and the seconds. results.json is written
after every run (a rerun with the same settings skips finished runs), then table.md
(with the papers' claims checked against the numbers), ppl_by_scheme.png and COMMAND.md.

Every step is an importable function (the notebook colab/ptq.ipynb uses them).
"""

from __future__ import annotations

import math
import os
import pathlib
import time
from typing import Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

RULE_PATH = r"layers/\d+/(attn|mlp)/.*"
DETERMINISTIC = ("rtn", "bcq")  # the same result for every calibration seed: run once
RECON_METHODS = ("flexround", "lrq", "uniquanf")
CALIB_METHODS = ("gptq", "awq", "smoothquant")
ALL_METHODS = ("rtn",) + RECON_METHODS + ("bcq",) + CALIB_METHODS
# Display order of methods and schemes (others follow in config order).
METHOD_ORDER = ("rtn", "gptq", "awq", "smoothquant", "flexround", "lrq", "bcq", "uniquanf")


# ----------------------------------------------------------------------------- config


def check_config(config) -> None:
  """Validates the study's fields; errors name the config key."""
  from jaxsun.quant.schemes import parse_scheme  # pylint: disable=g-import-not-at-top
  from jaxsun.quant.schemes import IntScheme  # pylint: disable=g-import-not-at-top
  if config.get("job") != "ptq":
    raise ValueError(f"config.job={config.get('job')!r} must be 'ptq'")

  def pos_int(key, v, minimum=1):
    if not isinstance(v, int) or isinstance(v, bool) or v < minimum:
      raise ValueError(f"config.{key}={v!r} must be an int >= {minimum}")

  def pos_float(key, v):
    if not isinstance(v, (int, float)) or isinstance(v, bool) or not v > 0:
      raise ValueError(f"config.{key}={v!r} must be a number > 0")

  cc, ec, rc = config.calib, config.eval, config.recon
  pos_int("calib.n_sequences", cc.n_sequences)
  pos_int("calib.seq_len", cc.seq_len, 2)
  seeds = tuple(cc.seeds)
  if not seeds or any(not isinstance(s, int) for s in seeds) or len(set(seeds)) != len(seeds):
    raise ValueError(f"config.calib.seeds={seeds!r} must be distinct ints (at least one)")
  pos_int("eval.seq_len", ec.seq_len, 2)
  pos_int("eval.batch_size", ec.batch_size)
  pos_int("eval.max_tokens", ec.max_tokens, 0)
  if ec.max_tokens and ec.max_tokens < ec.seq_len:
    raise ValueError(f"config.eval.max_tokens={ec.max_tokens} is below one window of "
                     f"config.eval.seq_len={ec.seq_len} (0: every token)")
  pos_int("recon.steps", rc.steps, 0)
  pos_int("recon.batch_size", rc.batch_size)
  if rc.batch_size > cc.n_sequences:
    raise ValueError(f"config.recon.batch_size={rc.batch_size} exceeds "
                     f"config.calib.n_sequences={cc.n_sequences}")
  for m in RECON_METHODS:
    if m not in rc.lr:
      raise ValueError(f"config.recon.lr has no learning rate for {m!r}")
    pos_float(f"recon.lr.{m}", rc.lr[m])
    pos_int(f"recon_steps.{m}", config.recon_steps[m], 0)
  pos_float("recon.lr_b", rc.lr_b)
  pos_int("lrq_rank", config.lrq_rank)
  pos_int("group_size", config.group_size)
  if config.get("variant") == "llama" and not config.base.checkpoint:
    raise ValueError("config.base.checkpoint is empty: the :llama variant quantizes a "
                     "Hugging Face checkpoint (--config.base.checkpoint=<HF dir>)")
  if not config.base.checkpoint:
    if config.model.max_len < max(cc.seq_len, ec.seq_len):
      raise ValueError(f"config.model.max_len={config.model.max_len} is below "
                       f"config.calib.seq_len / config.eval.seq_len")
    if config.pretrain.corpus != "shakespeare" or config.calib.corpus != "shakespeare":
      from jaxsun import data  # pylint: disable=g-import-not-at-top
      for key in ("pretrain.corpus", "calib.corpus"):
        name = config.pretrain.corpus if key == "pretrain.corpus" else config.calib.corpus
        if name not in data.CORPORA:
          raise ValueError(f"config.{key}={name!r} is not one of {data.CORPORA}")
  grid = cells(config)
  if not grid:
    raise ValueError("config.grid is empty")
  for method, scheme in grid:
    key = f"config.grid.{method}"
    if method not in ALL_METHODS:
      raise ValueError(f"{key}: unknown method {method!r}; one of {ALL_METHODS}")
    s = parse_scheme(scheme, field=key)
    if not isinstance(s, IntScheme):
      raise ValueError(f"{key}: {scheme!r} is not an integer scheme")
    if method in ("uniquanf", "bcq") and s.act is not None:
      raise ValueError(f"{key}: {method} is weight-only; {scheme!r} quantizes activations")
    if method == "smoothquant" and s.act is None:
      raise ValueError(f"{key}: smoothquant needs quantized activations, not {scheme!r}")


def cells(config) -> list[tuple[str, str]]:
  """[(method, scheme)] of `config.grid` (method -> schemes), in config order."""
  out = []
  for method, schemes in config.grid.items():
    if isinstance(schemes, str):
      raise ValueError(f"config.grid.{method}={schemes!r} must be a tuple of scheme names")
    out += [(method, s) for s in schemes]
  return out


def cell_name(method: str, scheme: str) -> str:
  return f"{method}:{scheme}"


def uses_calibration(method: str, scheme: str) -> bool:
  """Whether a cell's result depends on the calibration sample: every method but rtn /
  bcq, and those too on schemes with static (calibrated) activation ranges (W8A8)."""
  from jaxsun.quant.schemes import parse_scheme  # pylint: disable=g-import-not-at-top
  if method not in DETERMINISTIC:
    return True
  act = parse_scheme(scheme).act
  return act is not None and act.static


def seeds_of(config, method: str, scheme: str) -> tuple[int, ...]:
  """The calibration seeds a cell runs: one when its result cannot depend on them."""
  seeds = tuple(config.calib.seeds)
  return seeds if uses_calibration(method, scheme) else seeds[:1]


def recon_config(config, method: str, seed: int):
  """The `ReconConfig` of a reconstruction method (None for the others)."""
  if method not in RECON_METHODS:
    return None
  from jaxsun.quant.ptq.reconstruct import ReconConfig  # pylint: disable=g-import-not-at-top
  rc = config.recon
  steps = int(config.recon_steps[method]) or int(rc.steps)
  return ReconConfig(steps=steps, batch_size=int(rc.batch_size), lr=float(rc.lr[method]),
                     lr_b=float(rc.lr_b) if method == "uniquanf" else None,
                     act_quant=bool(rc.act_quant), seed=int(seed))


def method_options(config, method: str) -> dict:
  return {"rank": int(config.lrq_rank)} if method == "lrq" else {}


def identity(config) -> dict:
  """The settings every stored number depends on (grid and seeds excluded: adding cells
  or seeds keeps the finished runs)."""
  from jaxsun.jobs import common  # pylint: disable=g-import-not-at-top
  d = common.to_dict(config)
  for k in ("grid", "variant"):
    d.pop(k, None)
  d["calib"].pop("seeds", None)
  return d


# ------------------------------------------------------------------------ data, model


def tokenizer_name(config) -> str:
  if config.tokenizer:
    return config.tokenizer
  if not config.base.checkpoint:
    raise ValueError("config.tokenizer is empty and config.base.checkpoint is not set")
  return "file:" + os.path.join(config.base.checkpoint, "tokenizer.json")


def corpus_ids(corpus: str, split: str, tokenizer) -> np.ndarray:
  """The corpus split joined with blank lines and tokenized once (the papers' protocol)."""
  from jaxsun import data  # pylint: disable=g-import-not-at-top
  return np.asarray(tokenizer.encode("\n\n".join(data.corpus_chunks(corpus, split))),
                    np.int32)


def task_ids(task: str, split: str, tokenizer) -> np.ndarray:
  """Prompt + answer of each record, joined with blank lines, tokenized once."""
  from jaxsun import data  # pylint: disable=g-import-not-at-top
  texts = [f"{ex.prompt} {ex.answer}" for ex in data.load_task(task, split)]
  return np.asarray(tokenizer.encode("\n\n".join(texts)), np.int32)


def eval_streams(config, tokenizer) -> dict[str, np.ndarray]:
  """{"id": token ids of the in-domain text, "ood": of the out-of-domain text}, capped at
  `eval.max_tokens` (0: all)."""
  ec = config.eval
  cap = ec.max_tokens or None
  return {"id": corpus_ids(ec.id_corpus, "validation", tokenizer)[:cap],
          "ood": task_ids(ec.ood_task, ec.ood_split, tokenizer)[:cap]}


def calibration_tokens(train_ids: np.ndarray, n_sequences: int, seq_len: int,
                       seed: int) -> jax.Array:
  """i32[n, T]: `n_sequences` windows at random offsets of the train stream (per seed)."""
  if train_ids.size <= seq_len:
    raise ValueError(f"the calibration text has {train_ids.size} tokens, not more than "
                     f"one window of {seq_len}")
  rng = np.random.default_rng(1000 + seed)
  starts = rng.integers(0, train_ids.size - seq_len, size=n_sequences)
  return jnp.asarray(np.stack([train_ids[s:s + seq_len] for s in starts]), jnp.int32)


def base_model(config, workdir: pathlib.Path, tokenizer):
  """(Decoder, summary): the imported checkpoint, or pretrained here (resumable)."""
  from jaxsun.jobs import common  # pylint: disable=g-import-not-at-top
  if config.base.checkpoint:
    from jaxsun.interop import load_hf  # pylint: disable=g-import-not-at-top
    split = load_hf(config.base.checkpoint, param_dtype=config.base.param_dtype or None)
    model = split.prefill_module()
    n = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(split.prefill))
    return model, {"checkpoint": config.base.checkpoint, "num_params": n}
  from jaxsun.jobs import lm  # pylint: disable=g-import-not-at-top
  model_cfg = common.model_config(config.model, tokenizer.vocab_size, "ptq_base")
  pc = config.pretrain
  split, summary = lm.pretrain(pc, model_cfg, tokenizer, workdir, config.data_dir or None,
                               sources=(pc.corpus,), weights=(1.0,), eval_source=pc.corpus,
                               seed=config.seed,
                               identity={"model": common.to_dict(config.model),
                                         "tokenizer": config.tokenizer})
  return split.prefill_module(), summary


# --------------------------------------------------------------------- measurements


def perplexities(model, streams: Mapping[str, np.ndarray], *, seq_len: int,
                 batch_size: int) -> dict[str, float]:
  """{"id": ppl, "ood": ppl} of a Decoder (quantized or not), the papers' protocol."""
  import jaxsun  # pylint: disable=g-import-not-at-top
  from jaxsun.eval.perplexity import token_perplexity  # pylint: disable=g-import-not-at-top
  split = jaxsun.SplitModel.from_model(model)
  return {k: token_perplexity(split, ids, seq_len=seq_len, batch_size=batch_size).perplexity
          for k, ids in streams.items()}


def effective_scheme(method: str, scheme: str):
  """(scheme given to `api.quantize`, grid note) of a cell.

  qwix's GPTQ runs symmetric grids only (`api.quantize` switches it itself), and qwix's
  AWQ supports asymmetric grids only at 4 and 8 bits: at 2-3 bits AWQ gets the
  symmetric twin of the scheme here (`api.quantize` would raise).
  """
  import dataclasses  # pylint: disable=g-import-not-at-top
  from jaxsun.quant.schemes import parse_scheme  # pylint: disable=g-import-not-at-top
  s = parse_scheme(scheme)
  if method == "gptq":
    return scheme, "symmetric"
  if method == "awq" and not s.weight.symmetric and s.weight.bits not in (4, 8):
    return dataclasses.replace(s, weight=dataclasses.replace(s.weight, symmetric=True),
                               name=scheme), "symmetric"
  return scheme, "symmetric" if s.weight.symmetric else "asymmetric"


def quantize_cell(model, method: str, scheme: str, calib: jax.Array | None, *,
                  recon=None, options: Mapping | None = None, log=None):
  """(quantized model, report, learnable params) of one cell (`api.quantize`)."""
  from jaxsun.quant import api  # pylint: disable=g-import-not-at-top
  qscheme, _ = effective_scheme(method, scheme)
  qmodel, report = api.quantize(model, [(RULE_PATH, qscheme)], method=method,
                                calib_tokens=calib if uses_calibration(method, scheme)
                                else None,
                                recon=recon, method_options=dict(options or {}), log=log)
  params = int(sum(int(v.get("params", 0)) for v in report["layers"].values()))
  return qmodel, report, params


def run_one(config, model, method: str, scheme: str, seed: int, calib, streams) -> dict:
  """Quantizes with one calibration seed and measures it: a results.json run entry."""
  t0 = time.perf_counter()
  qmodel, report, params = quantize_cell(model, method, scheme, calib,
                                         recon=recon_config(config, method, seed),
                                         options=method_options(config, method))
  t_q = time.perf_counter() - t0
  ppl = perplexities(qmodel, streams, seq_len=config.eval.seq_len,
                     batch_size=config.eval.batch_size)
  rel = [v["weight_rel_error"] for v in report["layers"].values() if "weight_rel_error" in v]
  entry = {"seed": seed, "ppl_id": ppl["id"], "ppl_ood": ppl["ood"], "params": params,
           "weight_grid": effective_scheme(method, scheme)[1],
           "quantize_s": round(t_q, 2), "seconds": round(time.perf_counter() - t0, 2),
           "weight_rel_error": float(np.mean(rel)) if rel else None,
           "storage": sorted({v.get("storage", "") for v in report["layers"].values()})}
  if "reconstruction" in report:
    entry["reconstruction"] = _clean(report["reconstruction"])
  return entry


def _clean(x):
  if isinstance(x, Mapping):
    return {str(k): _clean(v) for k, v in x.items()}
  if isinstance(x, (list, tuple)):
    return [_clean(v) for v in x]
  if isinstance(x, (np.ndarray, jax.Array)):
    return _clean(np.asarray(x).tolist())
  if isinstance(x, (np.floating, np.integer)):
    return x.item()
  if isinstance(x, float) and not math.isfinite(x):
    return None
  return x


# ------------------------------------------------------------------------ statistics


def stats(values: Sequence[float]) -> dict:
  """mean, std (sample, ddof 1; 0 for one value), se = std / sqrt(n), n."""
  v = np.asarray([x for x in values if x is not None], np.float64)
  n = int(v.size)
  if n == 0:
    return {"mean": None, "std": None, "se": None, "n": 0}
  std = float(v.std(ddof=1)) if n > 1 else 0.0
  return {"mean": float(v.mean()), "std": std, "se": std / math.sqrt(n), "n": n}


def summarize(results: Mapping) -> dict:
  """{cell: {"method", "scheme", "ppl_id", "ppl_ood" (stats), "params", "seconds"}}."""
  out = {}
  for name, cell in results["cells"].items():
    runs = list(cell["runs"].values())
    if not runs:
      continue
    out[name] = {"method": cell["method"], "scheme": cell["scheme"],
                 "ppl_id": stats([r["ppl_id"] for r in runs]),
                 "ppl_ood": stats([r["ppl_ood"] for r in runs]),
                 "params": int(runs[0]["params"]),
                 "seconds": stats([r["seconds"] for r in runs])}
  return out


def compare(results: Mapping, a: str, b: str, metric: str) -> dict | None:
  """mean(a) - mean(b) of `metric` ("ppl_id" / "ppl_ood") with its standard error.

  Paired over the calibration seeds both cells ran (same calibration sample) when both
  have two or more; otherwise unpaired, sqrt(se_a^2 + se_b^2) (a deterministic method's
  single run has se 0). `beyond_2se`: |diff| > 2 se (se 0 with a nonzero diff counts).
  """
  ca, cb = results["cells"].get(a), results["cells"].get(b)
  if not ca or not cb or not ca["runs"] or not cb["runs"]:
    return None
  ra, rb = ca["runs"], cb["runs"]
  common_seeds = sorted(set(ra) & set(rb))
  if len(common_seeds) >= 2:
    d = stats([ra[s][metric] - rb[s][metric] for s in common_seeds])
    diff, se, kind = d["mean"], d["se"], "paired"
  else:
    sa, sb = stats([r[metric] for r in ra.values()]), stats([r[metric] for r in rb.values()])
    diff, se, kind = sa["mean"] - sb["mean"], math.hypot(sa["se"], sb["se"]), "unpaired"
  return {"a": a, "b": b, "metric": metric, "diff": diff, "se": se, "test": kind,
          "n": len(common_seeds) if kind == "paired" else min(len(ra), len(rb)),
          "beyond_2se": abs(diff) > 2 * se}


def _verdict(cmp: Mapping | None, claim_lower: bool = True) -> str:
  """For a claim "a has lower perplexity than b": agrees / contradicts / unresolved."""
  if cmp is None:
    return "not measured"
  if not cmp["beyond_2se"]:
    return "unresolved"
  return "agrees" if (cmp["diff"] < 0) == claim_lower else "contradicts"


def claims(results: Mapping) -> list[dict]:
  """The papers' claims, each checked per scheme against our numbers."""
  out = []
  schemes = []
  for cell in results["cells"].values():
    if cell["scheme"] not in schemes:
      schemes.append(cell["scheme"])
  summary = summarize(results)
  for s in schemes:
    lrq, fr = cell_name("lrq", s), cell_name("flexround", s)
    if lrq in summary and fr in summary:
      cmp = compare(results, lrq, fr, "ppl_ood")
      cmp_id = compare(results, lrq, fr, "ppl_id")
      out.append({"claim": "LRQ beats FlexRound out of domain (papers.md §6)", "scheme": s,
                  "comparison": cmp, "verdict": _verdict(cmp),
                  "in_domain": cmp_id, "in_domain_verdict": _verdict(cmp_id),
                  "params": {"lrq": summary[lrq]["params"],
                             "flexround": summary[fr]["params"]}})
  for s in schemes:
    bits = _bits(s)
    if bits is None or bits > 3:
      continue
    uq = cell_name("uniquanf", s)
    for other in ("flexround", "bcq"):
      o = cell_name(other, s)
      if uq in summary and o in summary:
        for metric in ("ppl_id", "ppl_ood"):
          cmp = compare(results, uq, o, metric)
          out.append({"claim": f"UniQuanF beats {_label(other)} at 2-3 bits (papers.md §5)",
                      "scheme": s, "metric": metric, "comparison": cmp,
                      "verdict": _verdict(cmp)})
  return out


def _bits(scheme: str) -> int | None:
  try:
    return int(scheme[1:scheme.index("a")])
  except ValueError:
    return None


def _label(method: str) -> str:
  return {"rtn": "RTN", "gptq": "GPTQ", "awq": "AWQ", "smoothquant": "SmoothQuant",
          "flexround": "FlexRound", "lrq": "LRQ", "bcq": "BCQ",
          "uniquanf": "UniQuanF"}.get(method, method)


# --------------------------------------------------------------------------- reports


def _ordered(results: Mapping) -> tuple[list[str], list[str]]:
  methods, schemes = [], []
  for cell in results["cells"].values():
    if cell["method"] not in methods:
      methods.append(cell["method"])
    if cell["scheme"] not in schemes:
      schemes.append(cell["scheme"])
  methods.sort(key=lambda m: METHOD_ORDER.index(m) if m in METHOD_ORDER else 99)
  return methods, schemes


def _pm(s: Mapping | None, digits: int = 2) -> str:
  if not s or s.get("mean") is None:
    return "—"
  return f"{s['mean']:.{digits}f} ± {s['std']:.{digits}f}"


def claims_markdown(results: Mapping) -> list[str]:
  lines = ["## The papers' claims and our runs", "",
           "Rule: a difference counts only if it is larger than 2 standard errors (paired "
           "over the calibration seeds when both cells ran several, else unpaired; a "
           "deterministic method's single run has SE 0). Lower perplexity is better. "
           "Papers: LRQ (NAACL 2025) beats FlexRound out of domain (MMLU) with far fewer "
           "learnable parameters; UniQuanF (ACL 2025) beats FlexRound and BCQ, most at "
           "2-3 bits. Their models are 7B-70B Llamas with thousands of reconstruction "
           "steps; ours is the :tiny byte model, so only the direction is comparable.",
           "", "| claim | scheme | metric | ours: diff (a - b) ± SE | z | verdict |",
           "|---|---|---|---|---|---|"]
  for c in results.get("claims", []):
    cmp = c["comparison"]
    metric = c.get("metric", "ppl_ood")
    if cmp is None:
      lines.append(f"| {c['claim']} | {c['scheme']} | {metric} | — | — | not measured |")
      continue
    z = cmp["diff"] / cmp["se"] if cmp["se"] > 0 else float("inf")
    lines.append(f"| {c['claim']} | {c['scheme']} | {metric} | {cmp['diff']:+.3f} ± "
                 f"{cmp['se']:.3f} ({cmp['test']}, n={cmp['n']}) | {z:+.1f} | "
                 f"{c['verdict']} |")
  lines.append("")
  lines += _claims_sentences(results)
  return lines


def _claims_sentences(results: Mapping) -> list[str]:
  out = []
  cl = results.get("claims", [])
  lrq = [c for c in cl if c["claim"].startswith("LRQ")]
  if lrq:
    counts = {v: sum(c["verdict"] == v for c in lrq) for v in
              ("agrees", "contradicts", "unresolved")}
    p = lrq[0]["params"]
    ratio = p["flexround"] / p["lrq"] if p["lrq"] else float("nan")
    out.append(f"- LRQ vs FlexRound, out of domain, over {len(lrq)} schemes: "
               f"{counts['agrees']} agree (LRQ lower beyond 2 SE), "
               f"{counts['contradicts']} contradict, {counts['unresolved']} unresolved; "
               f"LRQ learns {p['lrq']:,} parameters vs FlexRound's {p['flexround']:,} "
               f"({ratio:.1f}x fewer).")
    idc = {v: sum(c["in_domain_verdict"] == v for c in lrq) for v in
           ("agrees", "contradicts", "unresolved")}
    out.append(f"  In domain (not the papers' claim): LRQ lower in {idc['agrees']}, "
               f"higher in {idc['contradicts']}, unresolved in {idc['unresolved']}.")
  for other in ("FlexRound", "BCQ"):
    uq = [c for c in cl if c["claim"] == f"UniQuanF beats {other} at 2-3 bits (papers.md §5)"]
    if uq:
      counts = {v: sum(c["verdict"] == v for c in uq) for v in
                ("agrees", "contradicts", "unresolved")}
      out.append(f"- UniQuanF vs {other} at 2-3 bits ({len(uq)} scheme x metric "
                 f"comparisons): {counts['agrees']} agree, {counts['contradicts']} "
                 f"contradict, {counts['unresolved']} unresolved.")
  return out


def markdown_report(results: Mapping) -> str:
  summary = results.get("summary", {})
  methods, schemes = _ordered(results)
  fl = results["float"]
  seeds = results["config"]["calib"]["seeds"]
  lines = [f"# PTQ study ({results['config'].get('variant', '')})", "",
           f"Base model: {results['base'].get('num_params', 0):,} parameters; float "
           f"perplexity in domain {fl['ppl_id']:.3f}, out of domain {fl['ppl_ood']:.3f} "
           f"(uniform over the vocabulary: {results['vocab_size']}). Perplexity: "
           f"{results['eval_tokens']['id']:,} in-domain tokens ({results['config']['eval']['id_corpus']} "
           f"validation), {results['eval_tokens']['ood']:,} out-of-domain tokens "
           f"({results['config']['eval']['ood_task']} {results['config']['eval']['ood_split']}),"
           f" windows of {results['config']['eval']['seq_len']}. Mean ± std over "
           f"calibration seeds {list(seeds)} (rtn, bcq: one run, they use no data, except "
           "w8a8's calibrated activation ranges).", "",
           "## Perplexity in domain / out of domain (mean over seeds)", "",
           "| method | " + " | ".join(schemes) + " |",
           "|---|" + "---|" * len(schemes),
           "| float | " + " | ".join(f"{fl['ppl_id']:.2f} / {fl['ppl_ood']:.2f}"
                                    for _ in schemes) + " |"]
  for m in methods:
    row = []
    for s in schemes:
      c = summary.get(cell_name(m, s))
      failed = "error" in results["cells"].get(cell_name(m, s), {})
      row.append(("failed" if failed else "") if c is None else
                 f"{c['ppl_id']['mean']:.2f} / {c['ppl_ood']['mean']:.2f}")
    lines.append(f"| {_label(m)} | " + " | ".join(row) + " |")
  lines += ["", "## Per scheme", "",
            "| scheme | method | runs | ppl ID | ppl OOD | learnable params | "
            "ID vs RTN | OOD vs RTN | s / run |", "|---|---|---|---|---|---|---|---|---|"]
  for s in schemes:
    lines.append(f"| {s} | float | — | {fl['ppl_id']:.3f} | {fl['ppl_ood']:.3f} | 0 | "
                 "| | |")
    rtn = summary.get(cell_name("rtn", s))
    for m in methods:
      c = summary.get(cell_name(m, s))
      err = results["cells"].get(cell_name(m, s), {}).get("error")
      if c is None:
        if err:
          lines.append(f"| {s} | {_label(m)} | 0 | not run: {err} | | | | | |")
        continue
      vs = ["", ""]
      if rtn is not None:
        vs = [f"{c[k]['mean'] / rtn[k]['mean']:.3f}x" for k in ("ppl_id", "ppl_ood")]
      lines.append(f"| {s} | {_label(m)} | {c['ppl_id']['n']} | {_pm(c['ppl_id'], 3)} | "
                   f"{_pm(c['ppl_ood'], 3)} | {c['params']:,} | {vs[0]} | {vs[1]} | "
                   f"{c['seconds']['mean']:.1f} |")
  lines += ["", "GPTQ runs on symmetric grids only (qwix's GPTQ has no zero point) and AWQ "
            "at 2-3 bits too (qwix's AWQ has zero points only at 4 and 8 bits); the other "
            "methods' 2-4-bit grids are asymmetric; w8a8 is symmetric for all. "
            "SmoothQuant: alpha 0.5, then RTN. Learnable params: the parameters "
            "reconstruction trains (0: none trained).", ""]
  lines += claims_markdown(results)
  lines += ["", f"{_wall_time(results)} ({results.get('backend', '')}, "
            f"jax {results.get('jax', '')})."]
  return "\n".join(lines) + "\n"


def _wall_time(results: Mapping) -> str:
  text = f"Wall time {results.get('wall_time_s', 0):.0f} s"
  if results.get("resumed_runs"):
    text += (f" in the last session, which read {results['resumed_runs']} finished runs "
             "back from results.json")
  return text


def make_plot(results: Mapping, path: pathlib.Path) -> pathlib.Path:
  """Grouped bars of ID and OOD perplexity per scheme and method (error bars: std over
  seeds), the float model as a dashed line; log scale."""
  import matplotlib  # pylint: disable=g-import-not-at-top
  import matplotlib.ticker  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  summary = results["summary"]
  methods, schemes = _ordered(results)
  fig, axes = plt.subplots(2, 1, figsize=(max(6, 1.6 * len(schemes) + 2), 7), sharex=True)
  width = 0.8 / max(1, len(methods))
  colors = plt.get_cmap("tab10")
  for ax, key, title in ((axes[0], "ppl_id", "in domain (Shakespeare validation)"),
                         (axes[1], "ppl_ood", "out of domain (gsm_symbolic)")):
    for j, m in enumerate(methods):
      xs, ys, es = [], [], []
      for i, s in enumerate(schemes):
        c = summary.get(cell_name(m, s))
        if c is not None:
          xs.append(i + (j - (len(methods) - 1) / 2) * width)
          ys.append(c[key]["mean"])
          es.append(c[key]["std"])
      if xs:
        ax.bar(xs, ys, width, yerr=es, capsize=2, label=_label(m), color=colors(j))
    ax.axhline(results["float"][key], color="k", ls="--", lw=1, label="float")
    ax.set_yscale("log")
    fmt = matplotlib.ticker.FormatStrFormatter("%.1f")  # plain numbers, not 10^x
    ax.yaxis.set_major_formatter(fmt)
    ax.yaxis.set_minor_formatter(fmt)
    ax.tick_params(axis="y", which="minor", labelsize=7)
    ax.set_ylabel("perplexity (log scale)")
    ax.set_title(title, fontsize=10)
  axes[1].set_xticks(range(len(schemes)))
  axes[1].set_xticklabels(schemes)
  axes[0].legend(fontsize=7, ncol=3)
  fig.suptitle("PTQ: perplexity by scheme and method (mean ± std over calibration seeds)",
               fontsize=10)
  fig.tight_layout()
  tmp = path.with_suffix(".tmp.png")
  fig.savefig(tmp, dpi=110)
  plt.close(fig)
  os.replace(tmp, path)
  return path


def write_command(config, workdir: pathlib.Path, results: Mapping) -> None:
  from configs import ptq as ptq_config  # pylint: disable=g-import-not-at-top
  from jaxsun.jobs import common  # pylint: disable=g-import-not-at-top
  template = ptq_config.get_config(config.get("variant", "tiny"))
  common.write_command(
      workdir, common.command_line(config, workdir, "configs/ptq.py", template),
      f"{_wall_time(results)} on {results.get('backend')} "
      f"({results.get('devices', [''])[0]}), jax {results.get('jax')}.")


# ------------------------------------------------------------------------------- run


def run(config, workdir: str | os.PathLike) -> dict:
  """Runs the study; returns (and writes) results.json's contents."""
  from jaxsun import data as data_lib  # pylint: disable=g-import-not-at-top
  from jaxsun.jobs import common  # pylint: disable=g-import-not-at-top
  sw = common.Stopwatch()
  workdir = common.prepare_workdir(workdir)
  check_config(config)
  tokenizer = data_lib.get_tokenizer(tokenizer_name(config))
  ident = identity(config)
  path = workdir / "results.json"
  prev = common.load_previous(path, ident, "ptq")
  model, base_summary = base_model(config, workdir, tokenizer)
  streams = eval_streams(config, tokenizer)
  ec = config.eval
  if "float" in prev:
    fl = prev["float"]
  else:
    t0 = time.perf_counter()
    ppl = perplexities(model, streams, seq_len=ec.seq_len, batch_size=ec.batch_size)
    fl = {"ppl_id": ppl["id"], "ppl_ood": ppl["ood"],
          "seconds": round(time.perf_counter() - t0, 2)}
  print(f"ptq: float model: ppl ID {fl['ppl_id']:.3f}, OOD {fl['ppl_ood']:.3f}", flush=True)
  cc = config.calib
  train_ids = corpus_ids(cc.corpus, "train", tokenizer)
  results = {"job": "ptq", "config": common.to_dict(config), "identity": ident,
             "base": base_summary, "vocab_size": int(tokenizer.vocab_size),
             "eval_tokens": {k: int(v.size) for k, v in streams.items()}, "float": fl,
             "cells": {}, "jax": jax.__version__, "backend": jax.default_backend(),
             "devices": [str(d) for d in jax.devices()]}
  prev_cells = prev.get("cells", {})
  grid = cells(config)
  skipped = 0
  for method, scheme in grid:
    name = cell_name(method, scheme)
    old = prev_cells.get(name, {}).get("runs", {})
    cell = results["cells"].setdefault(name, {"method": method, "scheme": scheme,
                                              "runs": {}})
    for seed in seeds_of(config, method, scheme):
      key = str(seed)
      if key in old:
        cell["runs"][key] = old[key]
        skipped += 1
        continue
      calib = calibration_tokens(train_ids, cc.n_sequences, cc.seq_len, seed)
      try:
        r = run_one(config, model, method, scheme, seed, calib, streams)
      except (ValueError, TypeError, NotImplementedError) as e:
        # A cell the library cannot run (e.g. qwix's GPTQ at 2-3 bits) is recorded and
        # the study goes on; a rerun tries it again.
        cell["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        print(f"ptq: {name:<22} seed {seed}: FAILED: {cell['error']}", flush=True)
        common.write_json_atomic(path, results)
        break
      cell["runs"][key] = r
      print(f"ptq: {name:<22} seed {seed}: ppl ID {r['ppl_id']:8.3f}  OOD "
            f"{r['ppl_ood']:8.3f}  params {r['params']:>7,}  ({r['seconds']:.1f} s)",
            flush=True)
      results["wall_time_s"] = round(sw.elapsed(), 2)
      common.write_json_atomic(path, results)
  if skipped:
    print(f"ptq: {skipped} runs read back from an earlier results.json", flush=True)
  results["summary"] = summarize(results)
  results["claims"] = _clean(claims(results))
  results["resumed_runs"] = skipped
  results["wall_time_s"] = round(sw.elapsed(), 2)
  results["plot"] = make_plot(results, workdir / "ppl_by_scheme.png").name
  common.write_json_atomic(path, results)
  table = markdown_report(results)
  common.write_bytes_atomic(workdir / "table.md", table.encode())
  write_command(config, workdir, results)
  print(table, flush=True)
  return results
