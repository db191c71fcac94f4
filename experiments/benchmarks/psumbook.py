r"""Benchmark: Psumbook GEMM (Pallas and CUDA) vs the dequant kernel vs XLA's bf16 `x @ W`.

    python -m experiments.benchmarks.psumbook                 # GPU: Llama-3-8B/70B shapes
    python -m experiments.benchmarks.psumbook --tiny          # CPU: small shapes, interpret
    python -m experiments.benchmarks.psumbook --formats m1v4g128,m2v8g128 --batches 1,16

Each method runs `--reps` times inside one jitted loop (`common.time_per_call`: nothing
hoisted or sliced away), so dispatch is amortised; the time per call is the median over
`--trials` of (loop time / reps). Each method's cost (`cost.py`: bytes and FLOPs per
call, codes + scales + codebooks + x + y for the quantized kernels, the bf16 weight for
XLA) gives its limit at the device's stated bandwidth and peak (the measured copy
bandwidth where none is stated), printed and recorded beside the time as "% of limit".
Bandwidth is also compared with a device copy measured in the same run. Writes
`psumbook_<machine>.json` (machine, versions, every number, ratios) and a markdown table
to `experiments/benchmarks/results/` (or `--out`). Imports jax and pallas_kernels only.

Targets (issue 4, H100/H200, ratios from one run): batch 1, 2.125 bits, 4096x14336:
>= 5x faster than XLA bf16 and >= 2x faster than the dequant kernel; batch 16: >= 1.3x
faster than the dequant kernel.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from experiments.benchmarks import common, cost
from pallas_kernels import psumbook_gemm as pg
# (name, K, N): Llama-3-8B q/o, gate/up, down, k/v; Llama-3-70B gate/up.
GPU_SHAPES = [("8b_qo", 4096, 4096), ("8b_up", 4096, 14336), ("8b_down", 14336, 4096),
              ("8b_kv", 4096, 1024), ("70b_up", 8192, 28672)]
TINY_SHAPES = [("tiny_a", 256, 256), ("tiny_b", 512, 256)]


def costs(fmt: pg.CodebookFormat, b: int, k: int, n: int, *,
          scale_bytes: int = 4) -> dict:
  """{method: `cost.Cost`} of one call (f32 x and y; the benchmark's f32 scales)."""
  quant = dict(x_bytes=4, out_bytes=4, scale_bytes=scale_bytes)
  return {"psumbook": cost.psumbook_gemv(fmt, b, k, n, **quant),
          "psumbook_ffi": cost.psumbook_gemv(fmt, b, k, n, **quant),
          "dequant": cost.dequant_gemm(fmt, b, k, n, **quant),
          "xla_bf16": cost.bf16_gemm(b, k, n, out_bytes=4)}


def bytes_moved(fmt: pg.CodebookFormat, b: int, k: int, n: int) -> dict:
  """{"quantized", "bf16"}: the bytes of one call (`costs`)."""
  c = costs(fmt, b, k, n)
  return {"quantized": c["psumbook"].bytes, "bf16": c["xla_bf16"].bytes}


def run(shapes, formats, batches, *, reps: int, trials: int, interpret: bool) -> dict:
  out = common.environment(benchmark="psumbook_gemm", interpret=interpret, reps=reps,
                           trials=trials, cases=[])
  largest = max(k * n * 2 for _, k, n in shapes)
  out["copy_gb_s"] = common.copy_bandwidth(largest, trials=trials)
  kind = out["machine"]["device_kind"]
  # Stated peaks where known; elsewhere (CPU) the measured copy rate bounds the bytes.
  hbm = None if cost.device_peaks(kind) else out["copy_gb_s"]
  for fmt_name in formats:
    fmt = pg.CodebookFormat.parse(fmt_name)
    for name, k, n in shapes:
      w = pg.random_quantized(jax.random.key(0), fmt, k, n)
      w_bf16 = pg.dequantize_reference(w).astype(jnp.bfloat16)
      for b in batches:
        x = jax.random.normal(jax.random.key(b), (b, k), jnp.float32)
        want = pg.dequant_matmul_reference(x, w)
        methods = {
            # The Pallas lookup kernel (Triton on GPU: the fallback) and the CUDA GEMV.
            "psumbook": lambda xi: pg.psumbook_matmul(xi, w, backend="gather_triton",
                                                      interpret=interpret),
            "psumbook_ffi": lambda xi: pg.psumbook_matmul(xi, w, backend="ffi"),
            "dequant": lambda xi: pg.dequant_matmul(xi, w, interpret=interpret),
            "xla_bf16": lambda xi: jnp.dot(xi.astype(jnp.bfloat16), w_bf16,
                                           preferred_element_type=jnp.float32),
        }
        if b > 16:  # the CUDA GEMV is for decode batches
          methods.pop("psumbook_ffi")
        method_costs = costs(fmt, b, k, n, scale_bytes=w.scales.dtype.itemsize)
        case = {"shape": name, "K": k, "N": n, "batch": b, "format": fmt.name,
                "bits_per_weight": fmt.bits_per_weight, "methods": {}}
        for method, fn in methods.items():
          got = jax.jit(fn)(x)
          err = float(jnp.max(jnp.abs(got - want)) / jnp.max(jnp.abs(want)))
          sec = common.time_per_call(fn, (x,), reps=reps, trials=trials)
          c = method_costs[method]
          case["methods"][method] = {
              "us": sec * 1e6, "bytes": c.bytes, "gb_s": c.bytes / sec / 1e9,
              "pct_of_copy_bandwidth": 100 * c.bytes / sec / 1e9 / out["copy_gb_s"],
              "rel_err_vs_f32_reference": err,
              "cost": cost.record(c, kind, sec, hbm_gbps=hbm)}
        t = {m: v["us"] for m, v in case["methods"].items()}
        case["best_psumbook"] = min((m for m in t if m.startswith("psumbook")), key=t.get)
        best = t[case["best_psumbook"]]
        case["speedup_vs_xla_bf16"] = t["xla_bf16"] / best
        case["speedup_vs_dequant"] = t["dequant"] / best
        out["cases"].append(case)
        print(f"{fmt.name} {name:8s} K={k:5d} N={n:5d} B={b:2d}  " + "  ".join(
            f"{m} {v['us']:9.1f} us ({cost.describe(v['cost'])})"
            for m, v in case["methods"].items())
              + f"  x{case['speedup_vs_xla_bf16']:.2f} vs bf16, "
              f"x{case['speedup_vs_dequant']:.2f} vs dequant", flush=True)
  return out


def _limit_cell(rec: dict) -> str:
  if rec["pct_of_limit"] is None:
    return "-"
  return f"{rec['limit_us']:.1f} {rec['bound']} ({rec['pct_of_limit']:.0f}%)"


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = [f"# Psumbook GEMM on {m['device_kind']} ({m['platform']}), jax "
           f"{result['versions']['jax']}, {result['date']}",
           "", f"Device copy bandwidth measured in the same run: {result['copy_gb_s']:.0f} GB/s."
           + (" Interpret mode (CPU): timings are not kernel speed." if result["interpret"]
              else ""), "",
           "| format | shape | K | N | B | Pallas psumbook us | CUDA psumbook us | "
           "dequant us | XLA bf16 us | best psumbook GB/s (% copy) | best: limit us "
           "(% of it) | x vs bf16 | x vs dequant | best's rel err |",
           "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
  for c in result["cases"]:
    ms = c["methods"]
    p = ms[c["best_psumbook"]]
    ffi_us = f"{ms['psumbook_ffi']['us']:.1f}" if "psumbook_ffi" in ms else "-"
    lines.append(
        f"| {c['format']} | {c['shape']} | {c['K']} | {c['N']} | {c['batch']} | "
        f"{ms['psumbook']['us']:.1f} | {ffi_us} | {ms['dequant']['us']:.1f} | "
        f"{ms['xla_bf16']['us']:.1f} | "
        f"{p['gb_s']:.0f} ({p['pct_of_copy_bandwidth']:.0f}%) | {_limit_cell(p['cost'])} | "
        f"{c['speedup_vs_xla_bf16']:.2f} | {c['speedup_vs_dequant']:.2f} | "
        f"{p['rel_err_vs_f32_reference']:.1e} |")
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="small shapes in interpret mode (CPU)")
  ap.add_argument("--formats", default="m1v4g128", help="comma-separated, e.g. m2v8g128")
  ap.add_argument("--batches", default="1,4,16")
  ap.add_argument("--reps", type=int, default=None, help="calls per timed loop")
  ap.add_argument("--trials", type=int, default=5)
  ap.add_argument("--out", default=str(common.RESULTS),
                  help="folder for the JSON and markdown")
  args = ap.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  tiny = args.tiny or not on_gpu
  if tiny and not args.tiny:
    print(f"no GPU (backend {jax.default_backend()!r}): running --tiny in interpret mode")
  reps = args.reps or (2 if tiny else 100)
  result = run(TINY_SHAPES if tiny else GPU_SHAPES, args.formats.split(","),
               [int(b) for b in args.batches.split(",")], reps=reps,
               trials=2 if tiny else args.trials, interpret=not on_gpu)
  common.write_results(result, markdown(result), name="psumbook", tiny=tiny, out=args.out)
  return result


if __name__ == "__main__":
  main()
