r"""Square vs thin (decode-shaped) GEMMs, FP8 and BF16, against the device's peak.

    python -m experiments.benchmarks.fp8_thin_gemm --tiny    # CPU: small shapes, seconds
    python -m experiments.benchmarks.fp8_thin_gemm           # a GPU / TPU: the paper's shapes

The FP8 inference paper (papers.md §7, v4) argues that thin GEMMs (M = a decode batch of
1-128 tokens against a K x N weight) matter more for serving cost than peak FLOPS, and that
accelerators differ in how much of their peak they reach on them. This measures it on the
device at hand. For each method, the TFLOP/s of square M = K = N GEMMs and of thin
M x K x N GEMMs (K = N), as:

* utilisation: the fraction of the dtype's compute peak, the device's stated peak where
  `micro.peaks` knows it, else the best rate this run measured for that dtype (the
  measured roofline; the CPU here);
* the roofline bound min(peak, intensity x bandwidth) of the shape (bandwidth: the stated
  HBM figure, else the best f32 streaming rate `micro.suite.elementwise` measures) and the
  fraction of it reached: a thin GEMM
  far below its compute peak can still be at its memory bound;
* thin / square: each thin shape's utilisation over the best square utilisation.

Methods: "bfloat16" and "float8_e4m3fn" are XLA's `jnp.dot` with float32 accumulation
(`micro.suite.gemm`: 2MNK FLOPs, operands read and output written once);
"fp8_matmul" is `pallas_kernels.fp8_matmul` on E4M3 operands with row / column scales
and bf16 output, on the backend its `auto` choice picks for the shape (XLA's f8 dot on
CPU; the Triton or Mosaic kernels on GPU). Timing: `common.time_per_call` (calls inside
one jitted loop, median over trials). Imports jax and numpy only (the GPU machines have
no ml-collections); `jaxsun.jobs.fp8_inference` calls `run`.
"""

from __future__ import annotations

import argparse
import functools
import sys

import jax
import jax.numpy as jnp

from experiments.benchmarks import common
from experiments.benchmarks.micro import counts, peaks, suite

METHODS = ("bfloat16", "float8_e4m3fn", "fp8_matmul")
PEAK_DTYPE = {"bfloat16": "bfloat16", "float8_e4m3fn": "float8_e4m3fn",
              "fp8_matmul": "float8_e4m3fn"}
TINY = dict(square=(512, 1024, 2048, 4096), thin_m=(1, 8, 16, 64, 128), thin_kn=4096,
            reps=3, trials=3, bandwidth_mib=256)
FULL = dict(square=(2048, 4096, 8192, 16384), thin_m=(1, 8, 16, 64, 128), thin_kn=8192,
            reps=10, trials=5, bandwidth_mib=1024)


def shapes_of(square, thin_m, thin_kn) -> list[tuple[str, int, int, int]]:
  """[(kind, M, K, N)]: square M = K = N, then thin M x thin_kn x thin_kn."""
  return ([("square", s, s, s) for s in square]
          + [("thin", m, thin_kn, thin_kn) for m in thin_m])


def _e4m3(x: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
  """(f8 E4M3 values, f32 scales) with one scale per row (axis=1) or column (axis=0).

  `jaxsun.quant.fp8.quantize` with OCP E4M3's 448, written here in jnp so that this
  file imports no jaxsun (and so no flax)."""
  s = jnp.max(jnp.abs(x), axis=axis, keepdims=True) / 448.0
  s = jnp.where(s > 0, s, 1.0).astype(jnp.float32)
  return jnp.clip(x / s, -448.0, 448.0).astype(jnp.float8_e4m3fn), s


def _fp8_matmul_rows(shapes, *, reps, trials) -> list[dict]:
  from pallas_kernels.fp8_matmul import kernel as fm  # pylint: disable=g-import-not-at-top
  out = []
  platform, kind = fm._platform_and_kind()  # pylint: disable=protected-access
  for m, k, n in shapes:
    ka, kb = jax.random.split(jax.random.key(m + 7 * k + 13 * n))
    qa, sa = _e4m3(jax.random.normal(ka, (m, k), jnp.float32), axis=1)  # per token
    qb, sb = _e4m3(jax.random.normal(kb, (k, n), jnp.float32), axis=0)  # per channel
    backend = fm.choose_backend(platform, kind, m, k, n, "rowcol")
    fn = functools.partial(fm.fp8_matmul, out_dtype=jnp.bfloat16, backend=backend)
    rec = {"op": "gemm", "dtype": "fp8_matmul", "backend": backend, "m": m, "k": k, "n": n}
    try:
      t = common.time_per_call(fn, (qa, sa, qb, sb), reps=reps, trials=trials)
    except Exception as e:  # pylint: disable=broad-except
      out.append({**rec, "supported": False, "error": f"{type(e).__name__}: {e}"[:200]})
      continue
    flops = counts.gemm_flops(m, k, n)
    nbytes = counts.gemm_bytes(m, k, n, 1, 2)
    out.append({**rec, "supported": True, "seconds": t, "flops": flops, "bytes": nbytes,
                "intensity": counts.arithmetic_intensity(flops, nbytes),
                "tflops": flops / t / 1e12})
  return out


def analyse(result: dict) -> dict:
  """Adds peaks, utilisation, roofline bounds and thin / square ratios to `result`."""
  kind = result["machine"]["device_kind"]
  bw = result["bandwidth"]["gbps"]
  best = {}
  for r in result["gemm"]:
    if r.get("supported"):
      best[r["dtype"]] = max(best.get(r["dtype"], 0.0), r["tflops"])
  for r in result["gemm"]:
    if not r.get("supported"):
      continue
    stated = peaks.peak_tflops(kind, PEAK_DTYPE.get(r["dtype"], r["dtype"]))
    peak = stated or best[r["dtype"]]
    bound = min(peak, r["intensity"] * bw / 1e3)
    r.update(peak_tflops=peak, peak_of="stated peak" if stated else "measured roofline",
             utilisation=r["tflops"] / peak, bound_tflops=bound,
             fraction_of_bound=r["tflops"] / bound,
             bound_by="memory" if r["intensity"] * bw / 1e3 < peak else "compute")
  summary = {}
  for method in dict.fromkeys(r["dtype"] for r in result["gemm"]):
    rows = [r for r in result["gemm"] if r["dtype"] == method and r.get("supported")]
    sq = [r for r in rows if r["kind"] == "square"]
    if not sq:
      continue
    top = max(sq, key=lambda r: r["utilisation"])
    summary[method] = {
        "peak_tflops": top["peak_tflops"], "peak_of": top["peak_of"],
        "square_best": {"m": top["m"], "tflops": top["tflops"],
                        "utilisation": top["utilisation"]},
        "thin": [{"m": r["m"], "k": r["k"], "n": r["n"], "tflops": r["tflops"],
                  "utilisation": r["utilisation"],
                  "thin_over_square": r["utilisation"] / top["utilisation"],
                  "fraction_of_bound": r["fraction_of_bound"], "bound_by": r["bound_by"]}
                 for r in rows if r["kind"] == "thin"]}
  result["summary"] = summary
  return result


def run(*, square, thin_m, thin_kn, methods=METHODS, reps: int = 3, trials: int = 3,
        bandwidth_mib: int = 64, log=print) -> dict:
  """Times every method on every shape; returns the self-describing result dict."""
  bad = [m for m in methods if m not in METHODS]
  if bad:
    raise ValueError(f"methods {bad} are not among {METHODS}")
  shapes = shapes_of(square, thin_m, thin_kn)
  kind_of = {(m, k, n): kind for kind, m, k, n in shapes}
  mkn = [(m, k, n) for _, m, k, n in shapes]
  result = common.environment(benchmark="fp8_thin_gemm", reps=reps, trials=trials,
                              shapes={"square": list(square), "thin_m": list(thin_m),
                                      "thin_kn": thin_kn})
  stated = peaks.peak_hbm_gbps(result["machine"]["device_kind"])
  if stated:
    result["bandwidth"] = {"gbps": stated, "of": "stated HBM"}
  else:  # the measured roofline: the best f32 streaming op over `bandwidth_mib` MiB
    stream = suite.elementwise([(bandwidth_mib << 20) // 4], reps=reps, trials=trials)
    result["bandwidth"] = {"gbps": max(r["gbps"] for r in stream if r["op"] != "gelu"),
                           "of": f"measured streaming over {bandwidth_mib} MiB"}
  rows = []
  xla = [m for m in methods if m != "fp8_matmul"]
  if xla:
    rows += suite.gemm(mkn, tuple(xla), reps=reps, trials=trials)
  if "fp8_matmul" in methods:
    rows += _fp8_matmul_rows(mkn, reps=reps, trials=trials)
  for r in rows:
    r["kind"] = kind_of[(r["m"], r["k"], r["n"])]
    if log is not None:
      log(f"gemm {r['dtype']:<14} {r['kind']:<6} {r['m']:>5} x {r['k']:>5} x {r['n']:>5}: "
          + (f"{r['tflops']:.4g} TFLOP/s" if r.get("supported") else r.get("error", "")))
  result["gemm"] = rows
  return analyse(result)


def markdown(result: dict, heading: str = "#") -> str:
  m = result["machine"]
  bw = result["bandwidth"]
  lines = [f"{heading} Square vs thin GEMMs on {m['device_kind']} ({m['platform']})", "",
           f"jax {result['versions']['jax']}, {result['date']}; bandwidth "
           f"{bw['gbps']:.1f} GB/s ({bw['of']}). Utilisation = TFLOP/s / peak (the stated "
           "peak where known, else the best rate this run measured for that method); "
           "bound = min(peak, FLOP/byte x bandwidth).", "",
           "| method | kind | M x K x N | TFLOP/s | FLOP/byte | utilisation | bound (by) | "
           "of bound |", "|---|---|---|---|---|---|---|---|"]
  for r in result["gemm"]:
    shape = f"{r['m']} x {r['k']} x {r['n']}"
    name = r["dtype"] + (f" ({r['backend']})" if "backend" in r else "")
    if not r.get("supported"):
      lines.append(f"| {name} | {r['kind']} | {shape} | not run: {r['error'][:60]} "
                   "| | | | |")
      continue
    lines.append(f"| {name} | {r['kind']} | {shape} | {r['tflops']:.4g} | "
                 f"{r['intensity']:.1f} | {r['utilisation']:.3f} | "
                 f"{r['bound_tflops']:.3g} ({r['bound_by']}) | {r['fraction_of_bound']:.2f} |")
  lines += ["", "Thin / square utilisation (square: the best square shape):", "",
            "| method | peak (TFLOP/s, of) | square best | "
            + " | ".join(f"M={t['m']}" for t in _first_thin(result)) + " |",
            "|---|---|---|" + "---|" * len(_first_thin(result))]
  for method, s in result.get("summary", {}).items():
    by_m = {t["m"]: t for t in s["thin"]}
    cells = [f"{by_m[t['m']]['thin_over_square']:.3f}" if t["m"] in by_m else "-"
             for t in _first_thin(result)]
    lines.append(f"| {method} | {s['peak_tflops']:.4g} ({s['peak_of']}) | "
                 f"{s['square_best']['utilisation']:.3f} at M={s['square_best']['m']} | "
                 + " | ".join(cells) + " |")
  return "\n".join(lines) + "\n"


def _first_thin(result: dict) -> list[dict]:
  for s in result.get("summary", {}).values():
    if s["thin"]:
      return s["thin"]
  return []


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="small shapes (CPU)")
  ap.add_argument("--out", default=str(common.RESULTS), help="output folder")
  args = ap.parse_args(argv)
  s = TINY if args.tiny else FULL
  result = run(square=s["square"], thin_m=s["thin_m"], thin_kn=s["thin_kn"], reps=s["reps"],
               trials=s["trials"], bandwidth_mib=s["bandwidth_mib"])
  result["command"] = "python -m experiments.benchmarks.fp8_thin_gemm " + " ".join(
      sys.argv[1:] if argv is None else argv)
  common.write_results(result, markdown(result), name="fp8_thin_gemm", tiny=args.tiny,
                       out=args.out)
  return result


if __name__ == "__main__":
  main()
