r"""Attention kinds: fused vs naive training-step time and memory, per sequence length.

    python -m experiments.benchmarks.attention                 # defaults for this backend
    python -m experiments.benchmarks.attention --quick         # tiny sizes, seconds (tests)
    python -m experiments.benchmarks.attention --seq 512,2048 --kinds softmax,affine
    python -m experiments.benchmarks.attention --decoder       # + a 2-layer Decoder step

Run from the repository root with the project's Python (`.venv/bin/python`). CPU
defaults: lengths 512 and 2048, a few minutes on 2 cores; run it on a quiet machine.

On a GPU (H100/H200): the same command, from the repository root of a checkout, with a
CUDA jax/jaxlib and flax installed (nothing else is imported: no ml-collections, tfds or
grain):

    python -m experiments.benchmarks.attention                 # 512, 2048, 8192; bf16

It picks the GPU sizes from `jax.default_backend()` (about 36 compiles of one layer's
forward+backward plus the timing, a few minutes; `--decoder` roughly doubles it). The
naive path at 8192 holds float32 scores of 2 x 16 x 8192^2 per copy (8.6 GB); on an 80 GB
card pass `--tokens 8192` if it runs out of memory (a path that fails is recorded with its
error; the others still run). Writes `results/attention_<backend>.json` and `.md`
(`attention_quick_<backend>` with `--quick`; `--out DIR` or `--out FILE.json` elsewhere).

JSON: `common.environment`'s header (date, machine incl. device_kind and backend,
versions: jax, jaxlib, python, flax, cudnn on GPU), `config` (layer shape, dtype, tokens,
seqs, kinds, trials, reps, fused_impl), `rows` (one per scope x kind x impl x length:
batch, tokens, `time_s` {median, mean, std, trials}, tokens_per_s, `memory` {...},
compile_s, error), `checks` (fused vs naive per kind and length: out_rel_err,
grad_rel_err, loss_rel_err, tolerance, ok), `ratios` {fused_over_naive, over_softmax,
memory_growth} and `targets` ({applies, pass, failed, items} per target,
all_applicable_pass).

What is measured, for every attention kind (`jaxsun.nn.attention.ATTENTION_KINDS`) x
{fused (`attention_impl="auto"`: cuDNN flash attention on a GPU in bf16, XLA's
`dot_product_attention` otherwise), naive (float32 scores)} x sequence length T:

  * one training step of ONE attention layer, `ATTENTION_KINDS[kind](cfg, rngs=...)`,
    called in train mode as the decoder calls it (RMS-normalised x [B, T, D], positions
    `arange(T)`, `causal=True`), loss = <layer(x), R> for a fixed random R; the step
    returns the loss, the layer's output (what the next block would read) and the
    gradients w.r.t. the parameters and x. B = tokens // T: every length moves the
    same tokens.
    Layer shape: GPU d_model 1024, 16 heads, 8 KV heads, head_dim 64, bf16 compute,
    16384 tokens; CPU d_model 256, 4 heads, 2 KV heads, head_dim 64, float32, 2048 tokens.
  * optionally (`--decoder`) the same for a whole 2-layer `Decoder` (cross-entropy).
  * time: every path of one length is timed round-robin (`common.interleaved_trials`),
    `reps` back-to-back calls per trial; median over trials, mean and std reported too.
  * memory: the compiled executable's `memory_analysis()`: `peak_bytes` = temp +
    argument + output - alias bytes (what the ratios use), the parts, and XLA's raw
    `peak_memory_in_bytes`; on a GPU also `device.memory_stats()["peak_bytes_in_use"]`
    after the path's first call (paths run smallest first, so the process-wide running
    peak says something; `device_peak_delta_bytes` is set when the call raised it).
  * correctness (`checks`): max relative error (max |a - b| / max |b| per leaf, the max
    over leaves) between the fused and naive outputs and gradients of the same layer
    (same parameters and inputs), from the timed calls; the loss's is informational.

Ratios, all from this one run: fused/naive time and memory per kind and length; each
kind's time / softmax's time at the same impl and length ("affine overhead"); memory
growth per sequence (peak / B) from each length to the next and first to last: linear
memory gives the length ratio (4x for 512 -> 2048), quadratic approaches its square (16x);
`exponent` = log(growth) / log(length ratio), 1 linear, 2 quadratic.

Targets (issue 13, item 6) in `targets`: where a fused kernel exists (cuDNN on a GPU),
fused beats naive at every kind and length, fused memory is linear in length (exponent
<= 1.15) and affine's fused time <= 1.05x softmax's. Without one (CPU: XLA's fused op
materialises the scores too) only "fused not slower than naive" (within 5%, for noise)
applies; the others are still evaluated and reported with `applies: false`. A failed
target is reported, never raised. Imports jax, numpy, flax and jaxsun only.
"""

from __future__ import annotations

import argparse
import json
import math
import pathlib
import statistics
import time
import traceback

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

import jaxsun
from experiments.benchmarks import common
from jaxsun.nn import attention as attention_lib

KINDS = ("softmax", "off_by_one", "sink", "gated", "affine", "affine_gated")
IMPLS = {"fused": "auto", "naive": "naive"}  # our name -> ModelConfig.attention_impl

SIZES = {
    "gpu": dict(d_model=1024, n_heads=16, n_kv_heads=8, head_dim=64, d_ff=4096,
                vocab_size=8192, tokens=16384, seqs=(512, 2048, 8192), dtype="bfloat16",
                trials=10, reps=5),
    "cpu": dict(d_model=256, n_heads=4, n_kv_heads=2, head_dim=64, d_ff=1024,
                vocab_size=1024, tokens=2048, seqs=(512, 2048), dtype="float32",
                trials=5, reps=1),
    "quick": dict(d_model=32, n_heads=4, n_kv_heads=2, head_dim=8, d_ff=64,
                  vocab_size=64, tokens=128, seqs=(32, 64), dtype="float32",
                  trials=2, reps=1),
}
# --quick on CPU: LLVM at -O0 compiles ~40% faster; buffer assignment (the memory numbers)
# is decided before it, and quick timings mean nothing anyway.
QUICK_CPU_COMPILER_OPTIONS = {"xla_backend_optimization_level": 0}
DECODER_LAYERS = 2
# Fused vs naive agreement allowed by the correctness check, by compute dtype.
TOLERANCE = {"float32": 1e-4, "bfloat16": 5e-2, "float16": 2e-2}
NOT_SLOWER_SLACK = 0.05       # "fused not slower than naive": fused <= 1.05 x naive
AFFINE_OVERHEAD_MAX = 1.05    # affine fused time <= 1.05 x softmax fused time
LINEAR_EXPONENT_MAX = 1.15    # fused per-sequence memory ~ T^e, e <= this


# -- the paths -------------------------------------------------------------------------------


def model_config(size: dict, kind: str, impl: str, max_len: int) -> jaxsun.ModelConfig:
  return jaxsun.ModelConfig(
      name="attention_bench", vocab_size=size["vocab_size"], d_model=size["d_model"],
      n_layers=DECODER_LAYERS, n_heads=size["n_heads"], n_kv_heads=size["n_kv_heads"],
      head_dim=size["head_dim"], d_ff=size["d_ff"], max_len=max_len,
      param_dtype="float32", compute_dtype=size["dtype"], attention=kind,
      attention_impl=impl)


def _randomise(module: nnx.Module, seed: int) -> None:
  """Learned sink logits start at 0 (= off-by-one); give them random values."""
  key = jax.random.key(seed)
  for path, var in nnx.iter_graph(module):
    if path and path[-1] == "sink" and isinstance(var, nnx.Param):
      key, sub = jax.random.split(key)
      var[...] = jax.random.normal(sub, var[...].shape, var[...].dtype)


def _split_pair(build, cfg_fused, cfg_naive, seed: int):
  """(fused graphdef, naive graphdef, params, rest): both impls share one state."""
  module = build(cfg_fused, rngs=nnx.Rngs(seed))
  _randomise(module, seed + 1)
  gd_fused, params, rest = nnx.split(module, nnx.Param, ...)
  gd_naive = nnx.split(build(cfg_naive, rngs=nnx.Rngs(seed)), nnx.Param, ...)[0]
  return gd_fused, gd_naive, params, rest


def layer_case(size: dict, kind: str, seq: int, batch: int, max_len: int, seed: int = 0):
  """One attention layer: {impl: step}, and the step's arguments.

  step(params, rest, x, r) -> (loss, out, (d params, d x)), loss = <layer(x), r>.
  """
  cfg = model_config(size, kind, "auto", max_len)
  build = attention_lib.ATTENTION_KINDS[kind]
  gd_f, gd_n, params, rest = _split_pair(build, cfg, cfg.replace(attention_impl="naive"),
                                         seed)
  kx, kr = jax.random.split(jax.random.key(seed + 2))
  x = jax.random.normal(kx, (batch, seq, cfg.d_model), jnp.float32)
  x = (x * jax.lax.rsqrt(jnp.mean(x * x, -1, keepdims=True) + cfg.norm_eps)).astype(cfg.dtype)
  r = jax.random.normal(kr, x.shape, jnp.float32).astype(cfg.dtype)

  def fns(graphdef):
    def loss(params, rest, x, r):
      positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
      out = nnx.merge(graphdef, params, rest)(x, positions, causal=True)[0]
      return jnp.sum(out.astype(jnp.float32) * r.astype(jnp.float32)), out

    def step(params, rest, x, r):
      (value, out), grads = jax.value_and_grad(loss, argnums=(0, 2), has_aux=True)(
          params, rest, x, r)
      return value, out, grads  # the output (the next block reads it), (d params, d x)

    return step

  return {"fused": fns(gd_f), "naive": fns(gd_n)}, (params, rest, x, r)


def decoder_case(size: dict, kind: str, seq: int, batch: int, max_len: int, seed: int = 0):
  """A whole `DECODER_LAYERS`-layer Decoder: next-token cross-entropy, grads w.r.t. params."""
  cfg = model_config(size, kind, "auto", max_len)
  gd_f, gd_n, params, rest = _split_pair(jaxsun.Decoder, cfg,
                                         cfg.replace(attention_impl="naive"), seed)
  tokens = jax.random.randint(jax.random.key(seed + 3), (batch, seq), 0, cfg.vocab_size)

  def fns(graphdef):
    def loss(params, rest, tokens):
      logits = nnx.merge(graphdef, params, rest)(tokens)[0][:, :-1].astype(jnp.float32)
      logp = jax.nn.log_softmax(logits)
      return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

    def step(params, rest, tokens):
      value, grads = jax.value_and_grad(loss)(params, rest, tokens)
      return value, None, grads  # no output: the logits would dwarf the rest

    return step

  return {"fused": fns(gd_f), "naive": fns(gd_n)}, (params, rest, tokens)


CASES = {"layer": layer_case, "decoder": decoder_case}


# -- measuring -------------------------------------------------------------------------------


def _memory(compiled) -> dict:
  m = compiled.memory_analysis()
  if m is None:
    return {}
  out = {"temp_bytes": int(m.temp_size_in_bytes),
         "argument_bytes": int(m.argument_size_in_bytes),
         "output_bytes": int(m.output_size_in_bytes),
         "alias_bytes": int(m.alias_size_in_bytes)}
  out["peak_bytes"] = (out["temp_bytes"] + out["argument_bytes"] + out["output_bytes"]
                       - out["alias_bytes"])
  # XLA's own figure, recorded as is: on CPU it counts only arguments and outputs.
  peak = getattr(m, "peak_memory_in_bytes", None)
  if peak:
    out["xla_peak_memory_in_bytes"] = int(peak)
  return out


def _device_stats() -> dict | None:
  try:
    return jax.devices()[0].memory_stats()
  except Exception:  # pylint: disable=broad-except  (backends without stats)
    return None


def _rel_err(a, b) -> float:
  """max |a - b| / max |b| over each leaf; the max over leaves (as tests/helpers.rel_err)."""
  worst = 0.0
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    scale = float(np.max(np.abs(y))) if y.size else 0.0
    diff = float(np.max(np.abs(x - y))) if y.size else 0.0
    worst = max(worst, diff / scale if scale > 0 else diff)
  return worst


def _stats(times: list[float]) -> dict:
  return {"median": statistics.median(times), "mean": statistics.fmean(times),
          "std": statistics.stdev(times) if len(times) > 1 else 0.0,
          "trials": [float(f"{t:.6g}") for t in times]}


def measure_length(scope: str, size: dict, kinds, seq: int, max_len: int, *,
                   trials: int, reps: int) -> tuple[list, list]:
  """Rows (one per kind x impl) and fused-vs-naive checks (one per kind) at length `seq`."""
  batch = max(1, size["tokens"] // seq)
  tol = TOLERANCE[size["dtype"]]
  rows, checks, paths = [], [], {}
  fused_impl = attention_lib.resolve_impl("auto", jnp.dtype(size["dtype"]),
                                          size["head_dim"], "causal")
  for kind in kinds:
    try:
      fns, args = CASES[scope](size, kind, seq, batch, max_len)
    except Exception as e:  # pylint: disable=broad-except  (reported, not raised)
      fns, args, err = None, None, f"{type(e).__name__}: {e}"
    for name, impl in IMPLS.items():
      row = {"scope": scope, "kind": kind, "impl": name, "attention_impl": impl,
             "resolved_impl": fused_impl if name == "fused" else "naive",
             "seq_len": seq, "batch": batch, "tokens": batch * seq, "error": None}
      rows.append(row)
      if fns is None:
        row["error"] = err
        continue
      step = fns[name]
      try:
        t0 = time.perf_counter()
        compiled = jax.jit(step).lower(*args).compile(
            compiler_options=size.get("compiler_options"))
        row["compile_s"] = time.perf_counter() - t0
        row["memory"] = _memory(compiled)
      except Exception as e:  # pylint: disable=broad-except
        row["error"] = f"{type(e).__name__}: {e}"
        traceback.print_exc()
        continue
      row["memory"]["per_sequence_bytes"] = row["memory"].get("peak_bytes", 0) / batch
      paths[(kind, name)] = _timed(compiled, args, reps)

  # First calls, one path at a time and smallest first, so a path failing at run time
  # (out of memory) is reported alone; on a GPU, the allocator's running peak after each.
  by_key = {(r["kind"], r["impl"]): r for r in rows if r["error"] is None}
  for key in sorted(paths, key=lambda k: by_key[k]["memory"].get("peak_bytes", 0)):
    before = _device_stats()
    try:
      paths[key]()
    except Exception as e:  # pylint: disable=broad-except
      by_key[key]["error"] = f"{type(e).__name__}: {e}"
      traceback.print_exc()
      continue
    after = _device_stats()
    if before is not None and after is not None:
      peak_before = before.get("peak_bytes_in_use", 0)
      peak_after = after.get("peak_bytes_in_use", 0)
      by_key[key]["memory"].update(
          device_bytes_in_use_before=before.get("bytes_in_use"),
          device_peak_bytes_in_use=peak_after,
          # The call's own peak above what was live before it, when it set a new peak.
          device_peak_delta_bytes=(peak_after - before.get("bytes_in_use", 0)
                                   if peak_after > peak_before else None))
  paths = {k: v for k, v in paths.items() if by_key[k]["error"] is None}

  try:
    times, outputs = common.interleaved_trials(
        {f"{k}/{n}": fn for (k, n), fn in paths.items()}, trials)
  except Exception as e:  # pylint: disable=broad-except  (e.g. out of memory mid-run)
    traceback.print_exc()
    for r in rows:
      if r["error"] is None:
        r["error"] = f"timing failed: {type(e).__name__}: {e}"
    return rows, checks
  for r in rows:
    name = f"{r['kind']}/{r['impl']}"
    if r["error"] is None and name in times:
      r["time_s"] = _stats(times[name])
      r["tokens_per_s"] = r["tokens"] / r["time_s"]["median"]

  for kind in kinds:
    if f"{kind}/fused" not in outputs or f"{kind}/naive" not in outputs:
      continue
    (loss_f, out_f, grads_f), (loss_n, out_n, grads_n) = (outputs[f"{kind}/fused"],
                                                          outputs[f"{kind}/naive"])
    check = {"scope": scope, "kind": kind, "seq_len": seq,
             "out_rel_err": None if out_n is None else _rel_err(out_f, out_n),
             "loss_rel_err": _rel_err(loss_f, loss_n),
             "grad_rel_err": _rel_err(grads_f, grads_n), "tolerance": tol}
    # The loss (a sum with cancellation) is informational; outputs and gradients decide.
    check["ok"] = max(check["out_rel_err"] or 0.0, check["grad_rel_err"]) <= tol
    checks.append(check)
  return rows, checks


def _timed(compiled, args, reps: int):
  def fn():
    t0 = time.perf_counter()
    for _ in range(reps):
      out = compiled(*args)
    jax.block_until_ready(out)
    return (time.perf_counter() - t0) / reps, out
  return fn


# -- ratios and targets ----------------------------------------------------------------------


def ratios(rows: list) -> dict:
  """Every ratio the targets read, computed from the rows (`None` where a row failed)."""
  ok = {(r["scope"], r["kind"], r["impl"], r["seq_len"]): r for r in rows
        if r["error"] is None and "time_s" in r}
  scopes = sorted({r["scope"] for r in rows})
  kinds = list(dict.fromkeys(r["kind"] for r in rows))
  seqs = sorted({r["seq_len"] for r in rows})

  def div(a, b):
    return a / b if a is not None and b else None

  def t(s, k, i, n):
    r = ok.get((s, k, i, n))
    return r["time_s"]["median"] if r else None

  def m(s, k, i, n, field="peak_bytes"):
    r = ok.get((s, k, i, n))
    return r["memory"].get(field) if r else None

  out = {"fused_over_naive": [], "over_softmax": [], "memory_growth": []}
  for s in scopes:
    for n in seqs:
      for k in kinds:
        out["fused_over_naive"].append({
            "scope": s, "kind": k, "seq_len": n,
            "time": div(t(s, k, "fused", n), t(s, k, "naive", n)),
            "memory": div(m(s, k, "fused", n), m(s, k, "naive", n))})
        for i in IMPLS:
          out["over_softmax"].append({"scope": s, "kind": k, "impl": i, "seq_len": n,
                                      "time": div(t(s, k, i, n), t(s, "softmax", i, n))})
    pairs = list(zip(seqs, seqs[1:]))
    if len(seqs) > 2:
      pairs.append((seqs[0], seqs[-1]))
    for k in kinds:
      for i in IMPLS:
        for a, b in pairs:
          growth = div(m(s, k, i, b, "per_sequence_bytes"), m(s, k, i, a, "per_sequence_bytes"))
          out["memory_growth"].append({
              "scope": s, "kind": k, "impl": i, "from": a, "to": b, "length_ratio": b / a,
              "per_sequence_growth": growth,
              "total_growth": div(m(s, k, i, b), m(s, k, i, a)),
              "temp_growth": div(m(s, k, i, b, "temp_bytes"), m(s, k, i, a, "temp_bytes")),
              "exponent": math.log(growth) / math.log(b / a) if growth else None})
  return out


def _check(applies: bool, items: list, ok) -> dict:
  """A target: `pass` when every item passes (None when an item has no value)."""
  for it in items:
    it["pass"] = None if it["value"] is None else bool(ok(it["value"]))
  passes = [it["pass"] for it in items]
  return {"applies": applies,
          "pass": all(p is True for p in passes) if items else None,  # None: no data
          "failed": [it for it in items if it["pass"] is not True], "items": items}


def targets(rows: list, rat: dict, checks: list, fused_impl: str, dtype: str) -> dict:
  """The issue's targets, evaluated on this run; `applies` says which bind here."""
  kernel = fused_impl == "cudnn"
  seqs = sorted({r["seq_len"] for r in rows})
  layer = [x for x in rat["fused_over_naive"] if x["scope"] == "layer"]
  time_items = [{"kind": x["kind"], "seq_len": x["seq_len"], "value": x["time"]}
                for x in layer]
  growth = [{"kind": x["kind"], "from": x["from"], "to": x["to"], "value": x["exponent"],
             "per_sequence_growth": x["per_sequence_growth"]}
            for x in rat["memory_growth"] if x["scope"] == "layer" and x["impl"] == "fused"
            and x["from"] == seqs[0] and x["to"] == seqs[-1]]
  fused = {(r["kind"], r["seq_len"]): r["time_s"]["median"] for r in rows
           if r["scope"] == "layer" and r["impl"] == "fused" and "time_s" in r}

  def over(kind, base):
    return [{"kind": kind, "over": base, "seq_len": n,
             "value": fused.get((kind, n), 0) / fused[(base, n)]
             if fused.get((kind, n)) and fused.get((base, n)) else None}
            for n in seqs if any(r["kind"] == kind for r in rows)]

  agree = [{"scope": c["scope"], "kind": c["kind"], "seq_len": c["seq_len"],
            "value": max(c["out_rel_err"] or 0.0, c["grad_rel_err"])} for c in checks]
  affine = over("affine", "softmax")
  out = {
      "fused_kernel": kernel, "fused_impl": fused_impl,
      "thresholds": {"affine_overhead_max": AFFINE_OVERHEAD_MAX,
                     "linear_exponent_max": LINEAR_EXPONENT_MAX,
                     "not_slower_slack": NOT_SLOWER_SLACK, "rel_err_max": TOLERANCE[dtype]},
      "fused_beats_naive": _check(kernel, [dict(x) for x in time_items], lambda v: v < 1.0),
      "fused_memory_linear": _check(kernel and len(seqs) > 1, growth,
                                    lambda v: v <= LINEAR_EXPONENT_MAX),
      "affine_overhead": _check(kernel and bool(affine), affine,
                                lambda v: v <= AFFINE_OVERHEAD_MAX),
      # The affine part's cost on top of the gate (informational).
      "affine_gated_over_gated": _check(False, over("affine_gated", "gated"),
                                        lambda v: v <= AFFINE_OVERHEAD_MAX),
      "fused_not_slower_than_naive": _check(not kernel, [dict(x) for x in time_items],
                                            lambda v: v <= 1.0 + NOT_SLOWER_SLACK),
      "fused_equals_naive": _check(True, agree, lambda v: v <= TOLERANCE[dtype]),
      "no_errors": {"applies": True, "pass": all(r["error"] is None for r in rows),
                    "failed": [{k: r[k] for k in ("scope", "kind", "impl", "seq_len", "error")}
                               for r in rows if r["error"] is not None]},
  }
  out["all_applicable_pass"] = all(v["pass"] is True for v in out.values()
                                   if isinstance(v, dict) and v.get("applies"))
  return out


# -- running, reporting ----------------------------------------------------------------------


def _versions() -> dict:
  v = {}
  try:
    import flax  # pylint: disable=g-import-not-at-top
    v["flax"] = flax.__version__
  except Exception:  # pylint: disable=broad-except
    pass
  if jax.default_backend() == "gpu":
    try:
      from jax._src.lib import cuda_versions  # pylint: disable=g-import-not-at-top
      v["cudnn"] = cuda_versions.cudnn_get_version()
    except Exception:  # pylint: disable=broad-except
      pass
  return v


def run(size: dict, *, kinds=KINDS, seqs=None, trials=None, reps=None,
        scopes=("layer",), mode: str) -> dict:
  seqs = tuple(sorted(seqs or size["seqs"]))
  trials, reps = trials or size["trials"], reps or size["reps"]
  max_len = max(seqs)
  fused_impl = attention_lib.resolve_impl("auto", jnp.dtype(size["dtype"]),
                                          size["head_dim"], "causal")
  rows, checks = [], []
  t_start = time.perf_counter()
  for scope in scopes:
    for seq in seqs:
      t0 = time.perf_counter()
      r, c = measure_length(scope, size, kinds, seq, max_len, trials=trials, reps=reps)
      rows += r
      checks += c
      print(f"{scope} T={seq}: {time.perf_counter() - t0:.1f}s", flush=True)
      for row in r:
        if "time_s" in row:
          print(f"  {row['kind']:>12} {row['impl']:>5}  {row['time_s']['median'] * 1e3:9.2f} ms"
                f"  peak {row['memory'].get('peak_bytes', 0) / 2**20:9.1f} MiB", flush=True)
        else:
          print(f"  {row['kind']:>12} {row['impl']:>5}  ERROR {row['error']}", flush=True)
  rat = ratios(rows)
  dev = jax.devices()[0]
  result = common.environment(
      benchmark="attention", mode=mode, backend=jax.default_backend(),
      config={**{k: v for k, v in size.items() if k not in ("seqs", "trials", "reps")},
              "seqs": list(seqs), "kinds": list(kinds), "scopes": list(scopes),
              "trials": trials, "reps": reps, "max_len": max_len,
              "decoder_layers": DECODER_LAYERS, "param_dtype": "float32",
              "fused_impl": fused_impl, "impls": IMPLS},
      rows=rows, checks=checks, ratios=rat,
      targets=targets(rows, rat, checks, fused_impl, size["dtype"]),
      wall_s=time.perf_counter() - t_start)
  result["versions"].update(_versions())
  result["machine"]["backend"] = jax.default_backend()
  result["machine"]["device_kind"] = dev.device_kind
  return result


def _fmt(v, spec=".2f", suffix=""):
  return "-" if v is None else f"{v:{spec}}{suffix}"


def markdown(r: dict) -> str:
  c = r["config"]
  lines = [f"# Attention kinds: fused ({c['fused_impl']}) vs naive, "
           f"{r['machine']['device_kind']} ({r['backend']}), jax {r['versions']['jax']}, "
           f"{r['date']}", "",
           f"One training step (forward + backward); d_model {c['d_model']}, {c['n_heads']} "
           f"heads, {c['n_kv_heads']} KV heads, head_dim {c['head_dim']}, {c['dtype']} "
           f"compute, {c['tokens']} tokens per step; median of {c['trials']} trials x "
           f"{c['reps']} calls. Memory: compiled peak (temp + args + outputs).", ""]
  rat = {(x["scope"], x["kind"], x["seq_len"]): x for x in r["ratios"]["fused_over_naive"]}
  over = {(x["scope"], x["kind"], x["impl"], x["seq_len"]): x["time"]
          for x in r["ratios"]["over_softmax"]}
  chk = {(x["scope"], x["kind"], x["seq_len"]): x for x in r["checks"]}
  rows = {(x["scope"], x["kind"], x["impl"], x["seq_len"]): x for x in r["rows"]}
  for scope in c["scopes"]:
    lines += [f"## {scope}", "",
              "| T | B | kind | fused ms | naive ms | fused/naive time | fused MiB | "
              "naive MiB | fused/naive mem | fused / softmax fused | grad rel err |",
              "|---" * 11 + "|"]
    for n in c["seqs"]:
      for k in c["kinds"]:
        f, nv = rows.get((scope, k, "fused", n), {}), rows.get((scope, k, "naive", n), {})

        def ms(x):
          return _fmt(x["time_s"]["median"] * 1e3, ".2f") if "time_s" in x else "err"

        def mib(x):
          return _fmt(x.get("memory", {}).get("peak_bytes", 0) / 2**20, ".1f") \
              if x.get("memory") else "err"

        q = rat.get((scope, k, n), {})
        lines.append(
            f"| {n} | {f.get('batch', '-')} | {k} | {ms(f)} | {ms(nv)} | "
            f"{_fmt(q.get('time'), '.3f')} | {mib(f)} | {mib(nv)} | "
            f"{_fmt(q.get('memory'), '.3f')} | {_fmt(over.get((scope, k, 'fused', n)), '.3f')}"
            f" | {_fmt(chk.get((scope, k, n), {}).get('grad_rel_err'), '.1e')} |")
    lines += ["", "Memory growth per sequence (peak / B; linear = length ratio, quadratic = "
              "its square):", "", "| kind | impl | T | growth | length ratio | exponent |",
              "|---|---|---|---|---|---|"]
    for g in r["ratios"]["memory_growth"]:
      if g["scope"] == scope:
        lines.append(f"| {g['kind']} | {g['impl']} | {g['from']} -> {g['to']} | "
                     f"{_fmt(g['per_sequence_growth'], '.2f', 'x')} | {g['length_ratio']:.0f}x"
                     f" | {_fmt(g['exponent'], '.2f')} |")
    lines.append("")
  t = r["targets"]
  lines += ["## targets", "",
            f"fused kernel: {t['fused_kernel']} ({t['fused_impl']}); all applicable pass: "
            f"**{t['all_applicable_pass']}**", "", "| target | applies | pass | failed |",
            "|---|---|---|---|"]
  for name, v in t.items():
    if isinstance(v, dict) and "applies" in v:
      failed = ", ".join(
          f"{x.get('kind', '')}@{x.get('seq_len', x.get('to', ''))}"
          + (f"={x['value']:.3g}" if isinstance(x.get("value"), float) else "")
          for x in v["failed"]) or "-"
      lines.append(f"| {name} | {v['applies']} | {v['pass']} | {failed} |")
  return "\n".join(lines) + "\n"


def _out_paths(out: str, stem: str) -> tuple[pathlib.Path, pathlib.Path]:
  p = pathlib.Path(out)
  if p.suffix == ".json":
    return p, p.with_suffix(".md")
  return p / f"{stem}.json", p / f"{stem}.md"


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--quick", action="store_true", help="tiny sizes, seconds (the tests)")
  ap.add_argument("--seq", default=None, help="comma-separated lengths (default by backend)")
  ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated attention kinds")
  ap.add_argument("--tokens", type=int, default=None, help="tokens per step (B = tokens // T)")
  ap.add_argument("--trials", type=int, default=None)
  ap.add_argument("--reps", type=int, default=None, help="calls per timed trial")
  ap.add_argument("--decoder", action="store_true",
                  help=f"also a whole {DECODER_LAYERS}-layer Decoder train step")
  ap.add_argument("--out", default=str(common.RESULTS),
                  help="folder for attention_<backend>.json/.md, or a .json path")
  args = ap.parse_args(argv)
  backend = jax.default_backend()
  mode = "quick" if args.quick else ("gpu" if backend == "gpu" else "cpu")
  size = dict(SIZES[mode])
  if args.quick and backend == "cpu":
    size["compiler_options"] = QUICK_CPU_COMPILER_OPTIONS
  if args.tokens:
    size["tokens"] = args.tokens
  kinds = tuple(k.strip() for k in args.kinds.split(",") if k.strip())
  unknown = [k for k in kinds if k not in attention_lib.ATTENTION_KINDS]
  if unknown:
    ap.error(f"unknown kinds {unknown}; registered: {sorted(attention_lib.ATTENTION_KINDS)}")
  if "softmax" not in kinds:
    kinds = ("softmax",) + kinds  # every ratio "over softmax" needs it
  seqs = tuple(int(s) for s in args.seq.split(",")) if args.seq else None
  result = run(size, kinds=kinds, seqs=seqs, trials=args.trials, reps=args.reps,
               scopes=("layer", "decoder") if args.decoder else ("layer",), mode=mode)
  md = markdown(result)
  print(md)
  json_path, md_path = _out_paths(args.out, f"attention_{'quick_' if args.quick else ''}"
                                            f"{backend}")
  common.write_atomic(json_path, json.dumps(result, indent=2) + "\n")
  common.write_atomic(md_path, md)
  print(f"wrote {json_path} and {md_path.name}")
  return result


if __name__ == "__main__":
  main()
