"""Vendor-stated peaks of known devices (dense, no sparsity), keyed by `device_kind`.

Sources: NVIDIA H100 SXM / H200 SXM / A100 SXM datasheets, Google Cloud TPU v5e docs.
Unknown devices (the CPU here) are reported against the measured roofline instead.
"""

from __future__ import annotations

TFLOPS = "tflops"
HBM_GBPS = "hbm_gbps"

PEAKS = {
    # dtype -> dense TFLOP/s (TOPS for int8); HBM bandwidth in GB/s.
    "NVIDIA H100 80GB HBM3": {TFLOPS: {"bfloat16": 989.0, "float8_e4m3fn": 1979.0,
                                       "int8": 1979.0, "float32": 67.0},
                              HBM_GBPS: 3350.0},
    "NVIDIA H200": {TFLOPS: {"bfloat16": 989.0, "float8_e4m3fn": 1979.0, "int8": 1979.0,
                             "float32": 67.0}, HBM_GBPS: 4800.0},
    "NVIDIA A100-SXM4-80GB": {TFLOPS: {"bfloat16": 312.0, "int8": 624.0, "float32": 19.5},
                              HBM_GBPS: 2039.0},
    "TPU v5 lite": {TFLOPS: {"bfloat16": 197.0, "int8": 394.0}, HBM_GBPS: 819.0},
}


def peak_tflops(device_kind: str, dtype: str) -> float | None:
  return PEAKS.get(device_kind, {}).get(TFLOPS, {}).get(dtype)


def peak_hbm_gbps(device_kind: str) -> float | None:
  return PEAKS.get(device_kind, {}).get(HBM_GBPS)
