"""Cost model per kernel call: bytes, FLOPs, and the time they allow on a device.

    c = cost.fp8_gemm(8192, 8192, 8192)                  # operands, scales, bf16 output
    lim = cost.limit(c, "NVIDIA H200")                   # the floor at 4.8 TB/s, 1979 TF/s
    lim["us"], lim["bound"], cost.pct_of_limit(lim, measured_s)

A call's **limit** is the larger of two times: the fewest bytes it must move through
device memory (each input read once, each output written once) over the HBM bandwidth,
and its arithmetic over the rate of the unit that does it. No version runs much faster;
a measured time is read as the fraction `limit / measured` ("% of limit"). Peaks are the
vendor figures in `micro.peaks` (`PEAKS`, matched on "H100" / "H200" in the device kind);
on an unknown device (the CPU here) the caller passes a measured bandwidth (the copy
kernel) and the compute term is left out.

Counts (M, K, N: `[M, K] x [K, N]`; B: batch rows; bytes are itemsizes):

    fp8_gemm      FLOPs 2MKN at the fp8 tensor rate; bytes MK + KN (one byte each)
                  + scales (tensor 2 x 4; row/column (M + N) x 4; block
                  (M K/128 + K/128 N/128) x 4) + bias N x 4 + output MN x out_bytes
    bf16_gemm     FLOPs 2MKN at the bf16 tensor rate; bytes 2 (MK + KN) + MN x out_bytes
                  (the bf16 GEMV baseline is bf16_gemm with M = B)
    psumbook_gemv codes m (K/v) N b/8 + scales (K/g) N x scale_bytes + codebooks
                  m 2^b v x codebook_bytes + activations BK x x_bytes + output BN x
                  out_bytes; at 16-bit scales the first two are K N bits_per_weight / 8
                  (2.125 bits for m1v4g128). FLOPs on the CUDA cores (float32 rate):
                  the Psumbook 2 B K m 2^b (each chunk of v inputs against every
                  centroid), one add per code and batch row B m (K/v) N, and a scale
                  multiply-add per group 2 B (K/g) N. Shared-memory lookups are not
                  modelled (one 4-byte load per code and batch row).
    dequant_gemm  the same bytes as psumbook_gemv; FLOPs 2BKN at the bf16 tensor rate
                  (the decode-free baseline: dequantize tiles on chip, multiply)
    copy          read + write of the buffer, no FLOPs

Pure Python (no jax): the benchmarks, `gpu_check` and tests import it anywhere.
"""

from __future__ import annotations

import dataclasses

from experiments.benchmarks.micro import peaks

FP8_SCALE_BLOCK = 128


@dataclasses.dataclass(frozen=True)
class Cost:
  """One call's minimum traffic and arithmetic.

  Attributes:
    kernel: what was counted ("fp8_gemm", "psumbook_gemv", ...).
    flops: floating-point operations (a multiply-add is 2).
    bytes: bytes read + written through device memory, the sum of `parts`.
    parts: bytes by operand (e.g. {"codes": ..., "scales": ...}).
    peak_dtype: the `micro.peaks` rate the FLOPs run at ("float8_e4m3fn", "bfloat16",
      "float32" for the CUDA cores).
  """

  kernel: str
  flops: int
  bytes: int
  parts: dict
  peak_dtype: str

  @property
  def intensity(self) -> float:
    """FLOPs per byte."""
    return self.flops / self.bytes if self.bytes else float("inf")

  def as_dict(self) -> dict:
    return {"kernel": self.kernel, "flops": self.flops, "bytes": self.bytes,
            "parts": dict(self.parts), "peak_dtype": self.peak_dtype,
            "intensity": self.intensity}


def _cost(kernel: str, flops: int, parts: dict, peak_dtype: str) -> Cost:
  return Cost(kernel, int(flops), int(sum(parts.values())), parts, peak_dtype)


def fp8_gemm(m: int, k: int, n: int, *, mode: str = "rowcol", out_bytes: int = 2,
             bias: bool = False) -> Cost:
  """`fp8_matmul` of f8[m, k] x f8[k, n] with `mode` scales ("tensor", "rowcol", "block")."""
  if mode == "tensor":
    scales = 2 * 4
  elif mode == "rowcol":
    scales = (m + n) * 4
  elif mode == "block":
    kb = -(-k // FP8_SCALE_BLOCK)
    scales = (m * kb + kb * -(-n // FP8_SCALE_BLOCK)) * 4
  else:
    raise ValueError(f"mode={mode!r} is not one of ('tensor', 'rowcol', 'block')")
  parts = {"a": m * k, "b": k * n, "scales": scales, "bias": n * 4 if bias else 0,
           "out": m * n * out_bytes}
  return _cost("fp8_gemm", 2 * m * k * n, parts, "float8_e4m3fn")


def bf16_gemm(m: int, k: int, n: int, *, out_bytes: int = 2) -> Cost:
  """bf16[m, k] x bf16[k, n] (XLA's dense baseline; a GEMV for small m)."""
  parts = {"a": 2 * m * k, "b": 2 * k * n, "out": m * n * out_bytes}
  return _cost("bf16_gemm", 2 * m * k * n, parts, "bfloat16")


def _psumbook_parts(fmt, b: int, k: int, n: int, *, x_bytes: int, out_bytes: int,
                    scale_bytes: int, codebook_bytes: int) -> dict:
  code_bytes = 1 if fmt.b <= 8 else 4  # u8 codes up to 256 centroids (`format.py`)
  return {"codes": fmt.m * (k // fmt.v) * n * code_bytes,
          "scales": (k // fmt.g) * n * scale_bytes,
          "codebooks": fmt.m * fmt.num_centroids * fmt.v * codebook_bytes,
          "x": b * k * x_bytes, "out": b * n * out_bytes}


def psumbook_gemv(fmt, b: int, k: int, n: int, *, x_bytes: int = 4, out_bytes: int = 4,
                  scale_bytes: int = 2, codebook_bytes: int = 4) -> Cost:
  """The Psumbook GEMM of x[b, k] and a [k, n] weight in `fmt` (a `CodebookFormat`)."""
  flops = (2 * b * k * fmt.m * fmt.num_centroids  # Psumbook: K/v chunks x m 2^b centroids x v
           + b * fmt.m * (k // fmt.v) * n  # one add per code and batch row
           + 2 * b * (k // fmt.g) * n)  # group scale
  parts = _psumbook_parts(fmt, b, k, n, x_bytes=x_bytes, out_bytes=out_bytes,
                          scale_bytes=scale_bytes, codebook_bytes=codebook_bytes)
  return _cost("psumbook_gemv", flops, parts, "float32")


def dequant_gemm(fmt, b: int, k: int, n: int, *, x_bytes: int = 4, out_bytes: int = 4,
                 scale_bytes: int = 2, codebook_bytes: int = 4) -> Cost:
  """The dequant kernel: the quantized weight's bytes, a dense product's FLOPs."""
  parts = _psumbook_parts(fmt, b, k, n, x_bytes=x_bytes, out_bytes=out_bytes,
                          scale_bytes=scale_bytes, codebook_bytes=codebook_bytes)
  return _cost("dequant_gemm", 2 * b * k * n, parts, "bfloat16")


def copy(nbytes: int) -> Cost:
  """A device copy of `nbytes`: read once, written once."""
  return _cost("copy", 0, {"read": nbytes, "write": nbytes}, "float32")


def device_peaks(device_kind: str) -> dict | None:
  """`micro.peaks.PEAKS` for `device_kind`, matched exactly, else on "H200" / "H100"
  (SXM figures; an H100 PCIe, with 2 TB/s, is not matched)."""
  if device_kind in peaks.PEAKS:
    return peaks.PEAKS[device_kind]
  if "H200" in device_kind:
    return peaks.PEAKS["NVIDIA H200"]
  if "H100" in device_kind and "PCIe" not in device_kind:
    return peaks.PEAKS["NVIDIA H100 80GB HBM3"]
  return None


def limit(c: Cost, device_kind: str, *, hbm_gbps: float | None = None) -> dict:
  """The time `c` allows on the device: {"us", "bound", "memory_us", "compute_us", ...}.

  `hbm_gbps` overrides the stated bandwidth (e.g. a measured copy rate); on a device
  without stated peaks it is the only term ("compute_us" None). "bound" names the larger
  term ("memory" or "compute"); "us" is None when nothing is known.
  """
  p = device_peaks(device_kind) or {}
  bw = hbm_gbps or p.get(peaks.HBM_GBPS)
  tflops = p.get(peaks.TFLOPS, {}).get(c.peak_dtype)
  memory_us = c.bytes / (bw * 1e9) * 1e6 if bw else None
  compute_us = c.flops / (tflops * 1e12) * 1e6 if tflops else None
  terms = {"memory": memory_us, "compute": compute_us}
  known = {name: t for name, t in terms.items() if t is not None}
  bound = max(known, key=known.get) if known else None
  return {"us": known[bound] if bound else None, "bound": bound, "memory_us": memory_us,
          "compute_us": compute_us, "hbm_gbps": bw, "peak_tflops": tflops,
          "peak_dtype": c.peak_dtype}


def pct_of_limit(lim: dict, seconds: float) -> float | None:
  """100 x limit / measured: how close a measured call came to its floor."""
  if lim.get("us") is None or seconds <= 0:
    return None
  return 100.0 * lim["us"] / (seconds * 1e6)


def record(c: Cost, device_kind: str, seconds: float, *,
           hbm_gbps: float | None = None) -> dict:
  """What a benchmark stores beside a measurement: counts, limit and % of it."""
  lim = limit(c, device_kind, hbm_gbps=hbm_gbps)
  return {**c.as_dict(), "limit_us": lim["us"], "bound": lim["bound"],
          "memory_us": lim["memory_us"], "compute_us": lim["compute_us"],
          "hbm_gbps": lim["hbm_gbps"], "peak_tflops": lim["peak_tflops"],
          "pct_of_limit": pct_of_limit(lim, seconds)}


def describe(rec: dict) -> str:
  """One short phrase for a log line: "12% of the 3.3 us memory limit"."""
  if rec.get("pct_of_limit") is None:
    return "no limit known"
  return f"{rec['pct_of_limit']:.0f}% of the {rec['limit_us']:.1f} us {rec['bound']} limit"
