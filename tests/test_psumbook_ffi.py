"""The CUDA Psumbook GEMV: its CPU twin (same phase functions) against the references on
CPU, the CUDA build for sm_90a wherever nvcc exists, the CUDA kernel itself on a GPU."""

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


PLATFORMS = ["cpu"] + (["cuda"] if jax.default_backend() == "gpu" else [])


@pytest.mark.parametrize("platform", PLATFORMS)
@pytest.mark.parametrize("name", ["m1v4g128", "m2v8g128", "m1v4g32"])
@pytest.mark.parametrize("batch,k,n,k_block", [(1, 256, 2048, 128), (3, 512, 1028, 256),
                                                (16, 256, 1024, 32)])
def test_gemv_matches_the_reference(platform, name, batch, k, n, k_block):
  if platform == "cpu" and jax.default_backend() != "cpu":
    pytest.skip("the CPU twin registers for the cpu platform only")
  fmt = pg.CodebookFormat.parse(name)
  kw, kx = jax.random.split(jax.random.key(batch + n))
  w = pg.random_quantized(kw, fmt, k, n)
  x = jax.random.normal(kx, (batch, k), jnp.float32)
  # N = 1028 leaves a partly filled block of 1024 outputs; k_block = 32 makes many splits.
  out = jax.jit(lambda x, w: ffi.psumbook_gemv_ffi(x, w, k_block=k_block,
                                                   platform=platform))(x, w)
  assert out.shape == (batch, n) and np.isfinite(np.asarray(out)).all()
  assert _rel(out, pg.dequant_matmul_reference(x, w)) < 2e-5


def test_backend_ffi_through_psumbook_matmul():
  w = pg.random_quantized(jax.random.key(0), pg.CodebookFormat.parse("m1v4g128"), 256, 512)
  x = jax.random.normal(jax.random.key(1), (2, 256))
  out = pg.psumbook_matmul(x, w, backend="ffi")
  assert _rel(out, pg.psumbook_matmul_reference(x, w)) < 2e-5


@pytest.mark.parametrize("batch", [3, 20])
def test_backend_ffi_takes_any_batch_and_n(batch):
  # N = 202 is padded to 204 (the kernel's multiple of 4); B = 20 runs as 16 + 4 rows.
  w = pg.random_quantized(jax.random.key(batch), pg.CodebookFormat.parse("m1v4g128"),
                          384, 202)
  x = jax.random.normal(jax.random.key(1), (batch, 384))
  out = pg.psumbook_matmul(x, w, backend="ffi")
  assert out.shape == (batch, 202) and np.isfinite(np.asarray(out)).all()
  assert _rel(out, pg.dequant_matmul_reference(x, w)) < 2e-5


def test_bad_inputs():
  fmt = pg.CodebookFormat.parse("m1v4g128")
  w = pg.random_quantized(jax.random.key(0), fmt, 256, 512)
  with pytest.raises(ValueError, match="N a multiple of 4"):  # the raw kernel still checks
    ffi.psumbook_gemv_ffi(jnp.ones((1, 256)), w._replace(codes=w.codes[..., :510],
                                                          scales=w.scales[:, :510]))
  with pytest.raises(ValueError, match="batches of 1..16"):
    ffi.psumbook_gemv_ffi(jnp.ones((17, 256)), w)
  with pytest.raises(ValueError, match="k_block=48"):
    ffi.psumbook_gemv_ffi(jnp.ones((1, 256)), w, k_block=48)
  w16 = pg.random_quantized(jax.random.key(0), pg.CodebookFormat(m=1, v=16, g=16), 256, 512)
  with pytest.raises(ValueError, match="g a multiple of 32"):
    ffi.psumbook_gemv_ffi(jnp.ones((1, 256)), w16)
  with pytest.raises(ValueError, match="platform='rocm'"):
    ffi.build("rocm")


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_kernel_builds_for_hopper(tmp_path, monkeypatch):
  monkeypatch.setenv("JAXSUN_FFI_CACHE", str(tmp_path))
  lib = ffi.build("cuda")
  assert lib.exists() and lib.stat().st_size > 10_000
  assert b"PsumbookGemvCuda" in lib.read_bytes()
