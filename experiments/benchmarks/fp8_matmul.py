r"""Benchmark: our FP8 matmul kernels vs XLA bf16 and XLA's FP8 (cuBLASLt on Hopper).

    python -m experiments.benchmarks.fp8_matmul            # GPU: square and thin GEMMs
    python -m experiments.benchmarks.fp8_matmul --tiny     # CPU: small shapes, interpret

Shapes: square M = K = N in (4096, 8192, 16384) and thin GEMMs M in (1, 16, 64, 128) with
K = N = 8192. Each method runs `--reps` times inside one jitted loop
(`common.time_per_call`: nothing hoisted or sliced away); time per call is the median
over `--trials`. Methods (`make_methods`, shared with `gpu_check.py`): "mosaic" (Hopper,
Mosaic GPU, every M, on a weight laid out once by `mosaic.prepare_weight`),
"pallas_triton" (the deprecated Triton fallback), "xla_fp8" (`jnp.dot` on f8 operands:
cuBLASLt), "xla_bf16". Each is printed and recorded with its cost model (`cost.py`: bytes
and FLOPs per call) and the fraction of its limit at the device's stated peak and
bandwidth ("% of limit"). Accuracy: relative error against the
float32 product of the unquantized operands, per scaling granularity. Writes
`fp8_matmul_<machine>.json` and `.md` to `experiments/benchmarks/results/` (or `--out`).
Imports jax, pallas_kernels and jaxsun.quant only.

Targets (issue 5, H100/H200, one run): 8192^3 at least 1.3x XLA's cuBLASLt FP8; thin
GEMMs at least 1.5x XLA bf16.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
from jax import lax

from experiments.benchmarks import common, cost
from jaxsun.quant import fp8
from pallas_kernels import fp8_matmul as fm
GPU_SHAPES = ([(s, s, s) for s in (4096, 8192, 16384)]
              + [(m, 8192, 8192) for m in (1, 16, 64, 128)])
TINY_SHAPES = [(256, 256, 256), (16, 256, 256)]


METHODS = ("mosaic", "mosaic_per_call", "pallas_triton", "xla_fp8", "xla_fp8_tn",
           "xla_bf16")


def make_methods(names, qa, sa, qb, sb, a16, b16, *, interpret) -> dict:
  """{name: (fn, args)} for `common.time_per_call`, bf16 output, names from METHODS.

  "mosaic" times the kernel on a weight laid out once (`mosaic.prepare_weight`, as a
  model stores it); "mosaic_per_call" lays it out on every call (`backend="mosaic"`).
  "xla_fp8" is `jnp.dot` on the [K, N] weight; "xla_fp8_tn" gives cuBLASLt the K-major
  weight it wants ("TN"), so XLA needs no layout copy: the strict baseline for "mosaic".
  """
  def backend(name):
    return (lambda qa, sa, qb, sb: fm.fp8_matmul(qa, sa, qb, sb, backend=name,
                                                 out_dtype=jnp.bfloat16,
                                                 interpret=interpret), (qa, sa, qb, sb))

  def mosaic_prepared():
    from pallas_kernels.fp8_matmul import mosaic  # pylint: disable=import-outside-toplevel
    w = jax.jit(mosaic.prepare_weight)(qb, sb)
    return (lambda qa, sa, w: mosaic.fp8_matmul_mosaic_prepared(
        qa, sa, w, out_dtype=jnp.bfloat16, interpret=interpret), (qa, sa, w))

  def xla_fp8_tn():
    def fn(qa, sa, qb_t):
      y = lax.dot_general(qa, qb_t, (((1,), (1,)), ((), ())),
                          preferred_element_type=jnp.float32)
      return (y * sa.astype(jnp.float32) * sb.astype(jnp.float32)).astype(jnp.bfloat16)
    return fn, (qa, sa, jax.jit(jnp.transpose)(qb))  # qb_t: f8[N, K]

  table = {"mosaic": mosaic_prepared, "mosaic_per_call": lambda: backend("mosaic"),
           "pallas_triton": lambda: backend("pallas_triton"),
           "xla_fp8": lambda: backend("xla"), "xla_fp8_tn": xla_fp8_tn,
           "xla_bf16": lambda: (lambda a, b: jnp.dot(a, b,
                                                     preferred_element_type=jnp.bfloat16),
                                (a16, b16))}
  return {name: table[name]() for name in names}


def run(shapes, *, reps: int, trials: int, interpret: bool, with_mosaic: bool) -> dict:
  out = common.environment(benchmark="fp8_matmul", interpret=interpret, reps=reps,
                           trials=trials, cases=[], accuracy={})
  for m, k, n in shapes:
    ka, kb = jax.random.split(jax.random.key(m + k + n))
    a = jax.random.normal(ka, (m, k), jnp.float32)
    b = jax.random.normal(kb, (k, n), jnp.float32) * 0.05
    qa, sa = fp8.quantize(a, "e4m3", block=(1, k))    # per token
    qb, sb = fp8.quantize(b, "e4m3", block=(k, 1))    # per output channel
    a16, b16 = a.astype(jnp.bfloat16), b.astype(jnp.bfloat16)
    names = ["pallas_triton", "xla_fp8", "xla_bf16"] + (["mosaic"] if with_mosaic else [])
    methods = make_methods(names, qa, sa, qb, sb, a16, b16, interpret=interpret)
    flops = 2.0 * m * k * n
    case = {"M": m, "K": k, "N": n, "methods": {}}
    for name, (fn, args) in methods.items():
      sec = common.time_per_call(fn, args, reps=reps, trials=trials)
      c = (cost.bf16_gemm(m, k, n, out_bytes=2) if name == "xla_bf16"
           else cost.fp8_gemm(m, k, n, mode="rowcol", out_bytes=2))
      case["methods"][name] = {"us": sec * 1e6, "tflop_s": flops / sec / 1e12,
                               "cost": cost.record(c, out["machine"]["device_kind"], sec)}
    t = {k_: v["us"] for k_, v in case["methods"].items()}
    ours = min((x for x in t if x in ("pallas_triton", "mosaic")), key=t.get)
    case.update(best_ours=ours, speedup_vs_xla_fp8=t["xla_fp8"] / t[ours],
                speedup_vs_xla_bf16=t["xla_bf16"] / t[ours])
    out["cases"].append(case)
    print(f"M={m:5d} K={k:5d} N={n:5d}  " + "  ".join(
        f"{x} {v['tflop_s']:8.2f} TFLOP/s ({cost.describe(v['cost'])})"
        for x, v in case["methods"].items())
          + f"  best {ours}: x{case['speedup_vs_xla_fp8']:.2f} vs XLA fp8, "
          f"x{case['speedup_vs_xla_bf16']:.2f} vs bf16", flush=True)
  # Accuracy per scaling granularity (one mid-size problem, outlier rows).
  ka, kb, kc = jax.random.split(jax.random.key(7), 3)
  a = jax.random.normal(ka, (256, 512)) * 10.0 ** jax.random.uniform(kc, (256, 1), minval=-3,
                                                                       maxval=1)
  b = jax.random.normal(kb, (512, 256)) * 0.05
  exact = jnp.dot(a, b, precision=lax.Precision.HIGHEST)
  for fmt_name in ("e4m3", "e5m2", "e4m3_g2"):
    for gran in ("tensor", "row", "block128"):
      qa, sa = fp8.quantize(a, fmt_name, block=fp8.block_for(gran, a.shape, operand="lhs"))
      gb = "column" if gran == "row" else gran
      qb, sb = fp8.quantize(b, fmt_name, block=fp8.block_for(gb, b.shape, operand="rhs"))
      y = fm.fp8_matmul(qa, sa, qb, sb, backend="pallas_triton", interpret=interpret)
      row_err = jnp.linalg.norm(y - exact, axis=1) / jnp.linalg.norm(exact, axis=1)
      out["accuracy"][f"{fmt_name}_{gran}"] = {
          "mean_row_rel_err": float(jnp.mean(row_err)),
          "rel_err": float(jnp.linalg.norm(y - exact) / jnp.linalg.norm(exact))}
  return out


def markdown(r: dict) -> str:
  m = r["machine"]
  lines = [f"# FP8 matmul on {m['device_kind']} ({m['platform']}), jax {r['versions']['jax']}, "
           f"{r['date']}", ""]
  if r["interpret"]:
    lines += ["Interpret mode (CPU): timings are not kernel speed.", ""]
  names = sorted({x for c in r["cases"] for x in c["methods"]})
  lines += ["Each cell: TFLOP/s (% of the call's limit at the stated peak and bandwidth, "
            "`cost.py`).", "",
            "| M | K | N | " + " | ".join(f"{x} TFLOP/s" for x in names)
            + " | best | x vs XLA fp8 | x vs XLA bf16 |",
            "|---" * (3 + len(names) + 3) + "|"]

  def cell(v):
    pct = v.get("cost", {}).get("pct_of_limit")
    return f"{v['tflop_s']:.2f}" + (f" ({pct:.0f}%)" if pct is not None else "")

  for c in r["cases"]:
    cells = [cell(c["methods"][x]) if x in c["methods"] else "-" for x in names]
    lines.append(f"| {c['M']} | {c['K']} | {c['N']} | " + " | ".join(cells)
                 + f" | {c['best_ours']} | {c['speedup_vs_xla_fp8']:.2f} | "
                 f"{c['speedup_vs_xla_bf16']:.2f} |")
  lines += ["", "| recipe | mean row rel. err | rel. err |", "|---|---|---|"]
  lines += [f"| {k} | {v['mean_row_rel_err']:.4f} | {v['rel_err']:.4f} |"
            for k, v in r["accuracy"].items()]
  return "\n".join(lines) + "\n"


def main(argv=None) -> dict:
  ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  ap.add_argument("--tiny", action="store_true", help="small shapes in interpret mode (CPU)")
  ap.add_argument("--reps", type=int, default=None)
  ap.add_argument("--trials", type=int, default=5)
  ap.add_argument("--out", default=str(common.RESULTS))
  args = ap.parse_args(argv)
  on_gpu = jax.default_backend() == "gpu"
  tiny = args.tiny or not on_gpu
  result = run(TINY_SHAPES if tiny else GPU_SHAPES, reps=args.reps or (2 if tiny else 20),
               trials=2 if tiny else args.trials, interpret=not on_gpu,
               with_mosaic=on_gpu)
  common.write_results(result, markdown(result), name="fp8_matmul", tiny=tiny,
                       out=args.out)
  return result


if __name__ == "__main__":
  main()
