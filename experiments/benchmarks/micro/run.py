r"""The accelerator microbenchmark suite, one command (papers.md §9's primitives):

    python -m experiments.benchmarks.micro.run --tiny --fake_cpu_devices=8   # CPU, seconds
    python -m experiments.benchmarks.micro.run                               # a GPU / TPU

GEMM throughput over shapes and dtypes (float32, bfloat16, int8, float8_e4m3fn where the
backend runs it), elementwise / streaming bandwidth, embedding-style gather and
scatter-add with vector sizes 4 B - 4 KB, and all-reduce / all-gather / reduce-scatter /
all-to-all over message sizes on every local device. Writes
`micro_[tiny_]<device>.json` / `.md` and `micro_[tiny_]<device>_roofline.png` /
`_bandwidth.png` under --out (default experiments/benchmarks/results/). Each figure
carries its FLOP / byte count and its fraction of the device's stated peak, or of the
measured roofline where no peak is known (CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import sys

TINY = dict(gemm=[(64, 64, 64), (256, 256, 256), (1, 512, 512), (16, 512, 512)],
            elementwise=[1 << 12, 1 << 16, 1 << 20], vector_bytes=[4, 64, 1024, 4096],
            collective_bytes=[1 << 10, 1 << 14, 1 << 18], reps=3, trials=3)
FULL = dict(gemm=[(m, k, n) for m, k, n in [(1, 8192, 8192), (8, 8192, 8192),
                                            (64, 8192, 8192), (512, 8192, 8192),
                                            (2048, 2048, 2048), (4096, 4096, 4096),
                                            (8192, 8192, 8192)]],
            elementwise=[1 << p for p in range(14, 31, 2)],
            vector_bytes=[4, 16, 64, 256, 1024, 4096],
            collective_bytes=[1 << p for p in range(10, 29, 3)], reps=10, trials=5)


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="small sizes (CPU, tests)")
  p.add_argument("--fake_cpu_devices", type=int, default=0,
                 help="split the CPU into this many devices (set before jax starts)")
  p.add_argument("--out", default=None, help="output folder")
  p.add_argument("--no_plots", action="store_true")
  args = p.parse_args(argv)
  if args.fake_cpu_devices < 0:
    p.error(f"--fake_cpu_devices={args.fake_cpu_devices} must be >= 0")
  return args


def markdown(result: dict) -> str:
  m = result["machine"]
  lines = [f"# Microbenchmarks on {m['device_kind']} ({m['num_devices']} devices)", "",
           f"`{result['command']}`", "",
           f"jax {result['versions']['jax']}, {result['date']}. Fractions are of the "
           "stated peak where known, else of the best rate this run measured.", "",
           "## GEMM", "", "| dtype | M x K x N | TFLOP/s | FLOP/byte | fraction |",
           "|---|---|---|---|---|"]
  for r in result["gemm"]:
    shape = f"{r['m']} x {r['k']} x {r['n']}"
    if not r.get("supported"):
      lines.append(f"| {r['dtype']} | {shape} | not run: {r['error'][:60]} | | |")
      continue
    lines.append(f"| {r['dtype']} | {shape} | {r['tflops']:.4g} | {r['intensity']:.1f} | "
                 f"{r['fraction']:.2f} ({r['fraction_of']}) |")
  lines += ["", "## Elementwise / streaming (f32)", "", "| op | elements | GB/s | fraction |",
            "|---|---|---|---|"]
  lines += [f"| {r['op']} | {r['elements']:,} | {r['gbps']:.3g} | {r['fraction']:.2f} |"
            for r in result["elementwise"]]
  lines += ["", "## Gather / scatter-add", "", "| op | vector bytes | GB/s | fraction |",
            "|---|---|---|---|"]
  lines += [f"| {r['op']} | {r['vector_bytes']} | {r['gbps']:.3g} | {r['fraction']:.2f} |"
            for r in result["gather_scatter"]]
  lines += ["", "## Collectives (bus bandwidth, ring-algorithm bytes)", "",
            "| op | devices | buffer bytes | bus GB/s |", "|---|---|---|---|"]
  lines += [f"| {r['op']} | {r['devices']} | {r['buffer_bytes']:,} | {r['bus_gbps']:.3g} |"
            for r in result["collectives"]]
  return "\n".join(lines) + "\n"


def plots(result: dict, stem: pathlib.Path) -> list[str]:
  import matplotlib  # pylint: disable=g-import-not-at-top
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top
  paths = []
  fig, ax = plt.subplots(figsize=(6, 4))
  bw = result["roofline"]["stated_hbm_gbps"] or result["roofline"]["stream_gbps"]
  for dtype, top in result["roofline"]["gemm_tflops"].items():
    pts = [r for r in result["gemm"] if r.get("supported") and r["dtype"] == dtype]
    ax.scatter([r["intensity"] for r in pts], [r["tflops"] for r in pts], label=dtype, s=18)
    xs = sorted(r["intensity"] for r in pts)
    if xs:
      grid = [xs[0] / 2, xs[-1] * 2]
      ax.plot(grid, [min(top, x * bw / 1e3) for x in grid], lw=0.8, ls="--")
  ax.set(xscale="log", yscale="log", xlabel="FLOP / byte", ylabel="TFLOP/s",
         title=f"GEMM roofline ({result['machine']['device_kind']})")
  ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(str(stem) + "_roofline.png")
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
  for op in sorted({r["op"] for r in result["elementwise"]}):
    rs = [r for r in result["elementwise"] if r["op"] == op]
    axes[0].plot([r["bytes"] for r in rs], [r["gbps"] for r in rs], "o-", label=op)
  for op in ("gather", "scatter_add"):
    rs = [r for r in result["gather_scatter"] if r["op"] == op]
    axes[1].plot([r["vector_bytes"] for r in rs], [r["gbps"] for r in rs], "o-", label=op)
  for op in sorted({r["op"] for r in result["collectives"]}):
    rs = [r for r in result["collectives"] if r["op"] == op]
    axes[2].plot([r["buffer_bytes"] for r in rs], [r["bus_gbps"] for r in rs], "o-",
                 label=op)
  for ax, t, xl in zip(axes, ("streaming", "gather / scatter-add", "collectives (bus)"),
                       ("bytes moved", "vector bytes", "buffer bytes per device")):
    ax.set(xscale="log", yscale="log", title=t, xlabel=xl, ylabel="GB/s")
    ax.legend(fontsize=7)
  fig.tight_layout()
  paths.append(str(stem) + "_bandwidth.png")
  fig.savefig(paths[-1], dpi=100)
  plt.close(fig)
  return paths


def main(argv=None) -> pathlib.Path:
  args = parse(argv)
  if args.fake_cpu_devices:
    if "jax" in sys.modules:
      raise RuntimeError("--fake_cpu_devices must be set before jax is imported")
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count="
                               f"{args.fake_cpu_devices}").strip()
  from experiments.benchmarks import common  # pylint: disable=g-import-not-at-top
  from experiments.benchmarks.micro import suite  # pylint: disable=g-import-not-at-top
  s = TINY if args.tiny else FULL
  kw = dict(reps=s["reps"], trials=s["trials"])
  command = "python -m experiments.benchmarks.micro.run " + " ".join(
      sys.argv[1:] if argv is None else argv)
  result = common.environment(suite="micro", tiny=args.tiny, command=command.strip())
  result["gemm"] = suite.gemm(s["gemm"], **kw)
  result["elementwise"] = suite.elementwise(s["elementwise"], **kw)
  result["gather_scatter"] = suite.gather_scatter(s["vector_bytes"], **kw)
  result["collectives"] = suite.collectives(s["collective_bytes"], **kw)
  suite.add_fractions(result)
  out = pathlib.Path(args.out) if args.out else common.RESULTS
  path = common.write_results(result, markdown(result), name="micro", tiny=args.tiny,
                              out=out)
  if not args.no_plots:
    result["plots"] = [pathlib.Path(p).name for p in plots(result, path.with_suffix(""))]
    common.write_atomic(path, json.dumps(result, indent=2) + "\n")
  return path


if __name__ == "__main__":
  main()
