"""The Mosaic GPU FP8 GEMM (`pallas_kernels/fp8_matmul/mosaic.py`) on CPU: the kernel in
the Mosaic GPU interpreter at multi-tile persistent grids, thin M and split K, every
scaling mode, bias and bf16 output, against the float32 reference; cross-lowering for
cuda of every configuration (the interpreter does not check wgmma legality); the layout
helpers and the tile validation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental.pallas import mosaic_gpu as plgpu

from jaxsun.quant import fp8
from pallas_kernels import fp8_matmul as fm
from pallas_kernels.fp8_matmul import mosaic
from pallas_kernels.testing import lowers_for

# f32 output is promised at float32 accuracy: the kernel's only roundings are the f32
# sums (reassociated) and the f32 epilogue products. A TF32 pass anywhere on the
# dequantized values costs ~1e-3 (see the control below); bf16 output rounds at 2^-8.
F32_TOL, BF16_TOL = 1e-5, 8e-3


def _operands(gran, m, k, n, seed=0):
  ka, kb, kc = jax.random.split(jax.random.key(seed), 3)
  a = jax.random.normal(ka, (m, k)) * (1 + 5 * jax.random.uniform(kc, (m, 1)))
  b = jax.random.normal(kb, (k, n)) * 0.05
  qa, sa = fp8.quantize(a, "e4m3", block=fp8.block_for(gran, a.shape, operand="lhs"))
  gb = {"row": "column", "tensor": "tensor", "block128": "block128"}[gran]
  qb, sb = fp8.quantize(b, "e4m3", block=fp8.block_for(gb, b.shape, operand="rhs"))
  bias = jax.random.normal(jax.random.key(seed + 1), (n,))
  return qa, sa, qb, sb, bias


def _rel(x, ref):
  x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
  return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def _check(out, want, tol):
  """Every element written (the output starts as nan) and within `tol` of the max."""
  out = np.asarray(out, np.float32)
  assert out.shape == want.shape
  assert np.isfinite(out).all(), f"{np.isnan(out).sum()} outputs never written"
  assert _rel(out, want) < tol, _rel(out, want)


# (name, gran, m, k, n, tiles). Wide tiles are 128 x 256 per CTA; num_ctas below the
# tile count makes the persistent loop run several tiles per CTA.
CASES = [
    # 2 x 2 output tiles over 3 CTAs (one runs two), 4 K steps, row/column scales.
    ("wide_row", "row", 256, 512, 512, mosaic.MosaicTiles(num_ctas=3)),
    ("wide_tensor", "tensor", 256, 512, 512, mosaic.MosaicTiles(num_ctas=2)),
    ("wide_block", "block128", 256, 512, 512, mosaic.MosaicTiles(num_ctas=2)),
    # 256 x 128 CTA tiles (warpgroups along M), odd shapes padded inside.
    ("wide_m_split_odd", "row", 200, 1400, 300,
     mosaic.MosaicTiles(wg_split="m", num_ctas=2, grid_minor="n", grid_tile_width=2)),
    # Thin: M = 16 and 64; 4 weight-row tiles; split K chosen automatically (2 here).
    ("thin16_row", "row", 16, 512, 512, mosaic.ThinTiles(num_ctas=8)),
    ("thin64_block", "block128", 64, 512, 384, mosaic.ThinTiles(num_ctas=3)),
    ("thin3_tensor_splitk", "tensor", 3, 1024, 256, mosaic.ThinTiles(split_k=4)),
]
IDS = [c[0] for c in CASES]


@pytest.mark.parametrize("name,gran,m,k,n,tiles", CASES, ids=IDS)
def test_kernel_in_gpu_interpreter_matches_reference(name, gran, m, k, n, tiles):
  qa, sa, qb, sb, bias = _operands(gran, m, k, n, seed=m)
  out_dtype = jnp.bfloat16 if name == "wide_tensor" else jnp.float32
  use_bias = bias if name != "thin16_row" else None
  out = mosaic.fp8_matmul_mosaic(qa, sa, qb, sb, use_bias, out_dtype=out_dtype,
                                 tiles=tiles, poison=float("nan"),
                                 interpret=plgpu.InterpretGPUParams())
  assert out.dtype == out_dtype
  want = fm.fp8_matmul_reference(qa, sa, qb, sb, use_bias)
  _check(out, want, F32_TOL if out_dtype == jnp.float32 else BF16_TOL)


def test_check_can_fail():
  # Controls: a TF32 product and a tile left unwritten both fail `_check` at F32_TOL.
  qa, sa, qb, sb, bias = _operands("row", 256, 512, 512)
  want = fm.fp8_matmul_reference(qa, sa, qb, sb, bias)

  def tf32(x):  # keep 10 mantissa bits, as a TF32 tensor-core pass would
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32) & jnp.uint32(0xFFFFE000)
    return jax.lax.bitcast_convert_type(bits, jnp.float32)

  a = qa.astype(jnp.float32) * sa
  b = qb.astype(jnp.float32) * sb
  y_tf32 = jnp.dot(tf32(a), tf32(b), precision="highest") + bias
  with pytest.raises(AssertionError):
    _check(y_tf32, want, F32_TOL)
  with pytest.raises(AssertionError, match="never written"):
    _check(want.at[128:, 256:].set(jnp.nan), want, F32_TOL)


def test_prepared_weight_is_reused_and_matches_its_reference():
  # The weight is laid out once; the prepared reference reads that layout back.
  qa, sa, qb, sb, bias = _operands("block128", 64, 256, 256, seed=5)
  w = mosaic.prepare_weight(qb, sb)
  assert w.w_t.shape == (256, 256) and w.scale.shape == (2, 256) and w.block
  want = fm.fp8_matmul_reference(qa, sa, qb, sb, bias)
  _check(mosaic.fp8_matmul_prepared_reference(qa, sa, w, bias), want, 1e-6)
  # A jitted caller takes the weight as a pytree (k, n, block are static).
  f = jax.jit(functools.partial(mosaic.fp8_matmul_prepared_reference, out_dtype=jnp.float32))
  _check(f(qa, sa, w, bias), want, 1e-6)
  w_row = mosaic.prepare_weight(*_operands("row", 8, 200, 300)[2:4])
  assert w_row.w_t.shape == (512, 256) and w_row.scale.shape == (1, 512)
  np.testing.assert_array_equal(np.asarray(w_row.scale[0, 300:]), 1.0)


def test_mosaic_matmul_nt_keeps_its_contract():
  qa, _, qb, _, _ = _operands("tensor", 128, 256, 256, seed=2)
  out = mosaic.mosaic_matmul_nt(qa, qb.T, tiles=mosaic.MosaicTiles(num_ctas=1),
                                interpret=plgpu.InterpretGPUParams())
  want = jnp.dot(qa.astype(jnp.float32), qb.astype(jnp.float32), precision="highest")
  assert out.dtype == jnp.float32
  _check(out, want, F32_TOL)


LOWER_CASES = CASES + [
    # Default tiles at a benchmark-like shape, bf16 out, each scaling mode (wide, thin).
    ("default_wide_" + g, g, 1024, 1024, 2048, None) for g in ("row", "tensor", "block128")
] + [("default_thin_" + g, g, m, 2048, 4096, None)
     for g, m in (("row", 1), ("tensor", 16), ("block128", 100))]


@pytest.mark.parametrize("name,gran,m,k,n,tiles", LOWER_CASES,
                         ids=[c[0] for c in LOWER_CASES])
def test_every_configuration_lowers_for_cuda(name, gran, m, k, n, tiles):
  # Runs the Mosaic GPU lowering (wgmma operand majorness, layouts, TMA shapes) on CPU.
  args = _operands(gran, m, k, n)
  f = functools.partial(mosaic.fp8_matmul_mosaic, tiles=tiles, out_dtype=jnp.bfloat16)
  assert "mosaic_gpu" in lowers_for("cuda", f, *args)


def test_plans_fit_shared_memory():
  # Default plans keep 4 (bf16 out) / 3 (f32 out) stages within 227 KB.
  for out_dtype, stages in ((jnp.bfloat16, 4), (jnp.float32, 3)):
    # pylint: disable-next=protected-access
    p = mosaic._Plan(tr=128, tc=128, wg_axis=mosaic._COL, stages=4, epi_r=64, epi_c=64,
                     epi_slots=2, r_iters=1, c_iters=1, k_steps=4, splits=1,
                     grid_minor=0, grid_tile_width=8, num_ctas=1, block=False,
                     bias_axis=1, out_dtype=jnp.dtype(out_dtype))
    fit = mosaic._fit(p)  # pylint: disable=protected-access
    assert mosaic.smem_bytes(fit) <= mosaic.SMEM_BYTES and fit.stages == stages, fit


def test_bad_tiles_and_weights_are_clear_errors():
  with pytest.raises(ValueError, match="MosaicTiles.tile_m=96"):
    mosaic.MosaicTiles(tile_m=96)
  with pytest.raises(ValueError, match="MosaicTiles.stages=1"):
    mosaic.MosaicTiles(stages=1)
  with pytest.raises(ValueError, match="ThinTiles.split_k=0"):
    mosaic.ThinTiles(split_k=0)
  qa, sa, qb, sb, _ = _operands("row", 16, 512, 256)
  with pytest.raises(ValueError, match="split_k=3 must divide the 4 K steps"):
    mosaic.fp8_matmul_mosaic(qa, sa, qb, sb, tiles=mosaic.ThinTiles(split_k=3))
  w = mosaic.prepare_weight(qb, sb)
  with pytest.raises(ValueError, match="qa must be \\[M, K\\] with K=512"):
    mosaic.fp8_matmul_mosaic_prepared(qa[:, :256], sa, w)
  with pytest.raises(ValueError, match="interpreter can only poison with nan"):
    mosaic.fp8_matmul_mosaic(qa, sa, qb, sb, poison=0.0, interpret=True)
