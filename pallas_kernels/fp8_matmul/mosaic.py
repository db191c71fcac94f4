"""The Hopper FP8 matmul: Mosaic GPU (`plgpu.kernel`), TMA pipeline into shared memory,
wgmma with a float32 register accumulator.

fp8 wgmma needs both operands K-major, so B is passed transposed (`[N, K]`, made by
`fp8_matmul_mosaic` from the usual `[K, N]`; a weight can be stored that way once).
Tiles of 128 x 128 outputs, K steps of 128 (one 128-byte swizzle row of fp8), two
pipeline stages. The per-tensor / per-row / per-column scales and the bias are applied
to the float32 result by XLA (one fused elementwise pass); fusing them into the kernel's
epilogue is the next tuning step, to be measured on the GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _util
from pallas_kernels.fp8_matmul.kernel import check_bias, scale_mode


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
  """Mosaic GPU tiling knobs (speed only).

  Attributes:
    tile_m, tile_n: output tile per CTA (one warpgroup: tile_m 64 or 128).
    stages: TMA pipeline depth (shared memory: stages x (tile_m + tile_n) x 128 bytes).
  """

  tile_m: int = 128
  tile_n: int = 128
  stages: int = 2

  def __post_init__(self):
    if self.tile_m not in (64, 128) or self.tile_n % 8 or not 8 <= self.tile_n <= 256:
      raise ValueError(f"MosaicTiles: tile_m must be 64 or 128 and tile_n a multiple of 8 "
                       f"in [8, 256]; got {self}")
    if self.stages < 1:
      raise ValueError(f"MosaicTiles.stages={self.stages} must be >= 1")


def mosaic_matmul_nt(a: jax.Array, b_t: jax.Array, *, tiles: MosaicTiles = MosaicTiles(),
                     interpret=None) -> jax.Array:
  """f32[M, N] = a @ b_t.T for f8 `a: [M, K]` and K-major `b_t: [N, K]`."""
  (m, k), n = a.shape, b_t.shape[0]
  tm, tn = tiles.tile_m, tiles.tile_n
  swizzle = 128
  tk = swizzle // jnp.dtype(a.dtype).itemsize  # 128 fp8 values: one swizzle row
  for name, size, tile in (("M", m, tm), ("N", n, tn), ("K", k, tk)):
    if size % tile:
      raise ValueError(f"{name}={size} must be a multiple of {tile} for the Mosaic kernel")
  transforms = (plgpu.TilingTransform((8, tk)), plgpu.SwizzleTransform(swizzle))

  def body(a_gmem, b_gmem, o_gmem, o_smem):
    pid_m, pid_n = lax.axis_index("m"), lax.axis_index("n")

    def acc_scope(acc_ref):
      def step(_, a_smem, b_smem):
        plgpu.wgmma(acc_ref, a_smem, b_smem.transpose((1, 0)))
        plgpu.wgmma_wait(1)  # keep at most one wgmma in flight

      plgpu.emit_pipeline(
          step, grid=(k // tk,), max_concurrent_steps=tiles.stages,
          in_specs=[plgpu.BlockSpec((tm, tk), lambda kk: (pid_m, kk), transforms=transforms,
                                    delay_release=1),
                    plgpu.BlockSpec((tn, tk), lambda kk: (pid_n, kk), transforms=transforms,
                                    delay_release=1)],
      )(a_gmem, b_gmem)
      return acc_ref[...]

    o_smem[...] = pl.run_scoped(acc_scope, plgpu.ACC((tm, tn), jnp.float32))
    plgpu.commit_smem()
    plgpu.copy_smem_to_gmem(o_smem, o_gmem.at[pl.ds(pid_m * tm, tm), pl.ds(pid_n * tn, tn)])
    plgpu.wait_smem_to_gmem(0)

  return plgpu.kernel(
      body, out_type=jax.ShapeDtypeStruct((m, n), jnp.float32),
      scratch_types=dict(o_smem=plgpu.SMEM((tm, tn), jnp.float32)),
      grid=(m // tm, n // tn), grid_names=("m", "n"), interpret=interpret)(a, b_t)


def fp8_matmul_mosaic(qa, sa, qb, sb, bias=None, *, out_dtype=jnp.float32,
                      tiles: MosaicTiles = MosaicTiles(), interpret=False) -> jax.Array:
  """(qa * sa) @ (qb * sb) + bias with tensor or row/column scales on the Hopper path.

  Takes any M, N, K: the operands are padded with zeros to multiples of the tiles (M to
  tile_m, N to tile_n, K to 128) and the product sliced before the scales and bias are
  applied. Padding a decode batch to 128 rows wastes work, which is why
  `fp8_matmul(backend="auto")` sends small M elsewhere. `interpret=True` uses the
  Mosaic GPU interpreter (`plgpu.InterpretGPUParams()`).
  """
  mode = scale_mode(qa, sa, qb, sb)
  check_bias(bias, qb.shape[1])
  if mode == "block":
    raise ValueError("the Mosaic kernel takes per-tensor or per-row/column scales; use "
                     "backend='pallas' for block scales")
  if qa.dtype != qb.dtype:
    raise ValueError(f"wgmma needs one fp8 type for both operands, got {qa.dtype} and "
                     f"{qb.dtype}")
  params = plgpu.InterpretGPUParams() if interpret is True else (interpret or None)
  (m, k), n = qa.shape, qb.shape[1]
  kp = _util.round_up(k, 128)  # one 128-byte swizzle row of fp8 per K step
  a = _util.pad_to(qa, (_util.round_up(m, tiles.tile_m), kp))  # f8[M_pad, K_pad]
  b_t = _util.pad_to(qb.T, (_util.round_up(n, tiles.tile_n), kp))  # f8[N_pad, K_pad]
  y = mosaic_matmul_nt(a, b_t, tiles=tiles, interpret=params)[:m, :n]  # f32[M, N]
  y = y * sa.astype(jnp.float32) * sb.astype(jnp.float32)
  if bias is not None:
    y = y + bias.astype(jnp.float32)
  return y.astype(out_dtype)
