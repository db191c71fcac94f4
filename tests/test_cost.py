"""The per-kernel cost model against counts done by hand."""

import pytest

from experiments.benchmarks import cost
from pallas_kernels.psumbook_gemm.format import CodebookFormat

H100, H200 = "NVIDIA H100 80GB HBM3", "NVIDIA H200"


def test_fp8_gemm_8192_cubed():
  c = cost.fp8_gemm(8192, 8192, 8192, mode="rowcol", out_bytes=2)
  assert c.flops == 2 * 8192 ** 3  # 1.0995e12
  # 64 MiB + 64 MiB of fp8 operands, (8192 + 8192) f32 scales, 128 MiB of bf16 output.
  assert c.parts == {"a": 67108864, "b": 67108864, "scales": 65536, "bias": 0,
                     "out": 134217728}
  assert c.bytes == 268500992
  lim = cost.limit(c, H200)
  # 1.0995e12 / 1979e12 s = 555.6 us (compute) vs 268.5e6 / 4.8e12 s = 55.9 us (memory).
  assert lim["bound"] == "compute"
  assert lim["us"] == pytest.approx(555.58, rel=1e-4)
  assert lim["memory_us"] == pytest.approx(55.94, rel=1e-3)
  assert cost.pct_of_limit(lim, 1111.16e-6) == pytest.approx(50.0, rel=1e-4)


def test_fp8_gemm_scales_and_bias():
  assert cost.fp8_gemm(16, 256, 512, mode="tensor").parts["scales"] == 8
  assert cost.fp8_gemm(16, 256, 512, mode="rowcol").parts["scales"] == (16 + 512) * 4
  # block: sa [16, 2], sb [2, 4]: (32 + 8) f32.
  assert cost.fp8_gemm(16, 256, 512, mode="block").parts["scales"] == 160
  assert cost.fp8_gemm(16, 256, 512, bias=True).parts["bias"] == 2048
  with pytest.raises(ValueError, match="mode='col'"):
    cost.fp8_gemm(16, 256, 512, mode="col")


def test_thin_fp8_gemm_is_memory_bound():
  c = cost.fp8_gemm(16, 8192, 8192)
  # 16 x 8192 + 64 MiB weight + (16 + 8192) x 4 scales + 16 x 8192 x 2 output.
  assert c.bytes == 131072 + 67108864 + 32832 + 262144
  lim = cost.limit(c, H100)
  assert lim["bound"] == "memory"
  assert lim["us"] == pytest.approx(c.bytes / 3350e9 * 1e6)  # ~20.2 us


def test_psumbook_gemv_m1v4g128_batch1():
  fmt = CodebookFormat.parse("m1v4g128")  # 2.125 bits per weight
  k, n = 4096, 14336
  c = cost.psumbook_gemv(fmt, 1, k, n, x_bytes=2, out_bytes=2, scale_bytes=2)
  # codes: 1 x 1024 x 14336 bytes; scales: 32 x 14336 x 2; codebook 256 x 4 x 4;
  # x 4096 x 2; y 14336 x 2.
  assert c.parts == {"codes": 14680064, "scales": 917504, "codebooks": 4096, "x": 8192,
                     "out": 28672}
  assert c.parts["codes"] + c.parts["scales"] == k * n * 2.125 / 8
  # Psumbook 2 x 4096 x 256; one add per code 1024 x 14336; scales 2 x 32 x 14336.
  assert c.flops == 2097152 + 14680064 + 917504
  lim = cost.limit(c, H200)
  assert lim["bound"] == "memory"
  assert lim["us"] == pytest.approx(15638528 / 4.8e12 * 1e6)  # ~3.26 us
  # The bf16 GEMV baseline: 117 MB of weight, ~24.5 us at 4.8 TB/s.
  base = cost.bf16_gemm(1, k, n, out_bytes=2)
  assert base.bytes == 2 * (4096 + 4096 * 14336 + 14336)
  assert cost.limit(base, H200)["us"] == pytest.approx(base.bytes / 4.8e12 * 1e6)


def test_psumbook_gemv_two_codebooks_and_batch():
  fmt = CodebookFormat.parse("m2v8g128")
  c = cost.psumbook_gemv(fmt, 16, 256, 128)  # f32 x, y, 16-bit scales, f32 codebooks
  assert c.parts == {"codes": 2 * 32 * 128, "scales": 2 * 128 * 2,
                     "codebooks": 2 * 256 * 8 * 4, "x": 16 * 256 * 4, "out": 16 * 128 * 4}
  assert c.flops == 2 * 16 * 256 * 2 * 256 + 16 * 2 * 32 * 128 + 2 * 16 * 2 * 128
  d = cost.dequant_gemm(fmt, 16, 256, 128)
  assert d.parts == c.parts and d.flops == 2 * 16 * 256 * 128
  assert d.peak_dtype == "bfloat16" and c.peak_dtype == "float32"


def test_unknown_device_uses_the_measured_bandwidth():
  c = cost.copy(1 << 20)
  assert c.bytes == 2 << 20 and c.flops == 0
  assert cost.limit(c, "cpu")["us"] is None
  lim = cost.limit(c, "cpu", hbm_gbps=10.0)
  assert lim["bound"] == "memory" and lim["us"] == pytest.approx(209.7152)
  assert lim["compute_us"] is None
  rec = cost.record(c, "cpu", 419.4304e-6, hbm_gbps=10.0)
  assert rec["pct_of_limit"] == pytest.approx(50.0)
  assert "50% of the 209.7 us memory limit" == cost.describe(rec)


def test_device_kinds_match_their_peaks():
  assert cost.device_peaks(H100)["hbm_gbps"] == 3350.0
  assert cost.device_peaks("NVIDIA H100 PCIe") is None  # 2 TB/s: not the SXM figures
  assert cost.device_peaks("NVIDIA H200 NVL")["hbm_gbps"] == 4800.0
  assert cost.device_peaks("cpu") is None
