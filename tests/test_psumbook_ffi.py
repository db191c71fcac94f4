"""The CUDA Psumbook GEMV: its CPU twin (same planner and phase functions) against the
references on CPU at every tiling mode the planner produces, the CUDA build for sm_90a
wherever nvcc exists, the CUDA kernel itself on a GPU."""

import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import psumbook_gemm as pg
from pallas_kernels.psumbook_gemm import ffi


def _rel(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / np.max(np.abs(b)))


def _case(name, batch, k, n, seed=0):
  fmt = pg.CodebookFormat.parse(name)
  kw, kx = jax.random.split(jax.random.key(seed + batch + n))
  return fmt, pg.random_quantized(kw, fmt, k, n), jax.random.normal(kx, (batch, k))


PLATFORMS = ["cpu"] + (["cuda"] if jax.default_backend() == "gpu" else [])


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", ["m1v4g128", "m2v8g128", "m1v4g32"])
@pytest.mark.parametrize("batch,k,n,k_block", [(1, 1024, 2048, None), (3, 512, 1028, 256),
                                                (16, 256, 1024, 32)])
def test_gemv_matches_the_reference(platform, name, batch, k, n, k_block):
  if platform == "cpu" and jax.default_backend() != "cpu":
    pytest.skip("the CPU twin registers for the cpu platform only")
  _, w, x = _case(name, batch, k, n)
  # N = 1028 is padded to 1040 and leaves a partly filled last N block; k_block = 32
  # makes one K tile per CTA (many atomically added splits).
  out = jax.jit(lambda x, w: ffi.psumbook_gemv_ffi(x, w, k_block=k_block,
                                                   platform=platform))(x, w)
  assert out.shape == (batch, n) and np.isfinite(np.asarray(out)).all()
  assert _rel(out, pg.dequant_matmul_reference(x, w)) < 2e-5


# Each case drives the twin through one branch of the planner, checked on the plan itself:
#   shared:  several N blocks per CTA reuse one Psumbook (few SMs, so few N ranges);
#   chunked: the K slice exceeds the shared-memory budget, so the CTA owns one N block and
#            rebuilds the Psumbook per chunk of tiles;
#   slices:  B = 12 > 8 f32 rows per CTA: two batch slices (the second ragged, 4 rows);
#   ragged:  K tiles not divisible by the slice (the last K slice is shorter) and N not a
#            multiple of the N block.
TILINGS = {
    "shared": ("m1v4g128", 1, 1024, 4096, dict(num_sms=2),
               lambda p: p["blocks_per_cta"] >= 2 and p["s_k"] >= 2),
    "chunked": ("m2v8g128", 1, 1024, 2048, dict(k_block=512, smem_budget=40960),
                lambda p: p["chunk_tiles"] < p["tiles_per_slice"] and p["s_k"] == 2),
    "slices": ("m1v4g32", 12, 512, 1024, dict(num_sms=4),
               lambda p: p["s_b"] == 2 and p["bp"] == 8),
    "ragged": ("m1v8g128", 16, 640, 1552, dict(num_sms=3, psumbook_dtype="float16"),
               lambda p: (640 // 32) % p["tiles_per_slice"] != 0 and p["bp"] == 16),
}


@pytest.mark.parametrize("case", sorted(TILINGS))
def test_twin_tilings(case):
  if jax.default_backend() != "cpu":
    pytest.skip("the CPU twin registers for the cpu platform only")
  name, batch, k, n, kw, check = TILINGS[case]
  fmt, w, x = _case(name, batch, k, n)
  p = ffi.plan(batch, k, n, fmt, **kw)
  assert check(p), p
  out = ffi.psumbook_gemv_ffi(x, w, platform="cpu", **kw)
  tol = 2e-3 if kw.get("psumbook_dtype") == "float16" else 2e-5
  assert _rel(out, pg.psumbook_matmul_reference(x, w)) < tol


@pytest.mark.parametrize("platform", PLATFORMS)
def test_half_precision_psumbook_error_budget(platform):
  if platform == "cpu" and jax.default_backend() != "cpu":
    pytest.skip("the CPU twin registers for the cpu platform only")
  _, w, x = _case("m1v4g128", 4, 2048, 1024)
  ref = pg.dequant_matmul_reference(x, w)
  err = {dt: _rel(ffi.psumbook_gemv_ffi(x, w, platform=platform, psumbook_dtype=dt), ref)
         for dt in ("float32", "float16", "bfloat16")}
  # Rounding each entry costs ~2**-11 (f16) or ~2**-8 (bf16) relative, averaged over K.
  assert err["float32"] < 2e-5
  assert err["float32"] < err["float16"] < 2e-3
  assert err["float16"] < err["bfloat16"] < 1.5e-2


def test_plan_fills_a_hopper_and_fits_its_shared_memory():
  fmt = pg.CodebookFormat.parse("m1v4g128")
  for batch, dt in [(1, "float32"), (1, "float16"), (16, "float32"), (16, "bfloat16")]:
    p = ffi.plan(batch, 4096, 14336, fmt, psumbook_dtype=dt, num_sms=132)
    assert p["grid"] == p["s_b"] * p["s_k"] * p["s_n"] >= 2 * 132, p
    assert p["smem_bytes"] <= 112 * 1024, p  # two CTAs per 228 KB SM
  p = ffi.plan(1, 4096, 14336, fmt)
  # The header comment's arithmetic: 19 K slices of <= 7 tiles, 14 N blocks of 1024.
  assert (p["s_k"], p["tiles_per_slice"], p["s_n"], p["bn"]) == (19, 7, 14, 1024)
  c = ffi.cost(1, 4096, 14336, fmt)
  assert c["code_bytes"] == 4096 // 4 * 14336
  assert c["time_s"] == max(c["time_bytes_s"], c["time_flops_s"]) > 0
  assert c["dense_flops"] == 2 * 4096 * 14336 and c["grid"] == p["grid"]


def test_per_cta_psumbook_build_costs_less_than_the_code_loads():
  """The issue's alternative to one shared Psumbook: each CTA builds its K slice's
  Psumbook, at a modelled cost below the time to stream the codes (H200 figures)."""
  fmt = pg.CodebookFormat.parse("m1v4g128")
  for batch in (1, 16):
    for dt in ("float32", "float16"):
      c = ffi.cost(batch, 4096, 14336, fmt, psumbook_dtype=dt)
      build_s = 2 * c["build_entries"] * fmt.v / 67e12  # f32 FMAs on the CUDA cores
      codes_s = c["code_bytes"] / 4.8e12
      assert 0 < build_s < 0.5 * codes_s, (batch, dt, build_s, codes_s)


def test_backend_ffi_through_psumbook_matmul():
  w = pg.random_quantized(jax.random.key(0), pg.CodebookFormat.parse("m1v4g128"), 256, 512)
  x = jax.random.normal(jax.random.key(1), (2, 256))
  out = pg.psumbook_matmul(x, w, backend="ffi")
  assert _rel(out, pg.psumbook_matmul_reference(x, w)) < 2e-5


@pytest.mark.parametrize("batch", [3, 20])
def test_backend_ffi_takes_any_batch_and_n(batch):
  # N = 202 is padded to 208 (the kernel's multiple of 16); B = 20 runs as 16 + 4 rows.
  w = pg.random_quantized(jax.random.key(batch), pg.CodebookFormat.parse("m1v4g128"),
                          384, 202)
  x = jax.random.normal(jax.random.key(1), (batch, 384))
  out = pg.psumbook_matmul(x, w, backend="ffi")
  assert out.shape == (batch, 202) and np.isfinite(np.asarray(out)).all()
  assert _rel(out, pg.dequant_matmul_reference(x, w)) < 2e-5


def test_bad_inputs():
  fmt = pg.CodebookFormat.parse("m1v4g128")
  w = pg.random_quantized(jax.random.key(0), fmt, 256, 512)
  with pytest.raises(ValueError, match="batches of 1..16"):
    ffi.psumbook_gemv_ffi(jnp.ones((17, 256)), w)
  with pytest.raises(ValueError, match="k_block=48"):
    ffi.psumbook_gemv_ffi(jnp.ones((1, 256)), w, k_block=48)
  with pytest.raises(ValueError, match="psumbook_dtype"):
    ffi.psumbook_gemv_ffi(jnp.ones((1, 256)), w, psumbook_dtype="int8")
  w16 = pg.random_quantized(jax.random.key(0), pg.CodebookFormat(m=1, v=16, g=16), 256, 512)
  with pytest.raises(ValueError, match="g a multiple of 32"):
    ffi.psumbook_gemv_ffi(jnp.ones((1, 256)), w16)
  with pytest.raises(ValueError, match="budget too small"):
    ffi.plan(16, 256, 512, fmt, smem_budget=4096)
  with pytest.raises(ValueError, match="platform='rocm'"):
    ffi.build("rocm")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_kernel_builds_for_hopper(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXSUN_FFI_CACHE", str(tmp_path))
  lib = ffi.build("cuda")
  assert lib.exists() and lib.stat().st_size > 10_000
  assert b"PsumbookGemvCuda" in lib.read_bytes()
