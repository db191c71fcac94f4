"""The Hopper FP8 GEMM on Mosaic GPU: warp-specialised, persistent, epilogue fused.

    w = prepare_weight(qb, sb)                       # once: K-major, padded, scales laid out
    y = fp8_matmul_mosaic_prepared(qa, sa, w, bias, out_dtype=jnp.bfloat16)
    y = fp8_matmul_mosaic(qa, sa, qb, sb, bias)      # the same, preparing `w` on every call

One kernel computes `out[r, c] = epilogue(sum_k X[r, k] Y[c, k])` with both operands
K-major (fp8 wgmma reads only K-major operands), in one of two configurations:

* wide (`MosaicTiles`, M >= 128): X = qa[M, K], Y = the prepared weight w_t[N, K]. A CTA
  owns a 128 x 256 output tile; two consumer warpgroups each accumulate 128 x 128 in
  registers (f32) while a third, producer warpgroup streams 128-wide K steps of both
  operands into a 4-stage shared-memory ring by TMA (`emit_pipeline_warp_specialized`).
* thin (`ThinTiles`, M < 128, decode): the roles swap, `out^T = w_t @ qa^T`, so the
  weight rows fill wgmma's M (64 per warpgroup, 128 per CTA) and the batch, rounded up to
  16, is wgmma's N: a batch of 16 does not pad to 128 rows (the kernel writes out^T and
  XLA transposes that small [N, M] result). When the weight rows give
  fewer tiles than SMs, K is split across CTAs (`split_k`) and a small XLA pass sums the
  f32 partials (S x M x N x 4 bytes, a few percent of the weight bytes at most).

Both run a persistent grid: one CTA per SM loops over output tiles (`plgpu.nd_loop`) in
a planar-snake order (`plgpu.planar_snake`: bands of `grid_tile_width` tiles) so that
concurrently running CTAs share operand tiles in L2, and the producer prefetches the
next tile's operands while the consumers run the previous tile's epilogue.

Epilogue (fused): the f32 accumulator is multiplied by a per-row and a per-column scale
vector, the bias added, the result cast to `out_dtype` and written in 64-row subtiles
through shared memory by TMA stores (double-buffered when shared memory allows). The
scale and bias vectors of a tile are fetched by TMA when the tile starts, so their
latency hides behind the main loop. Per-tensor scales ride on the column vector.
Block scales (sa f32[M, K/128], sb f32[K/128, N/128]) vary along K: each 128-wide K
step's wgmma result is scaled and added to a register accumulator in f32 (the "promote
every K block" scheme); the step's scale rows are read from global memory while its
wgmma runs.

Weight layout (`prepare_weight`, stored once by the caller): `w_t f8[Np, Kp]` (K-major,
N padded to 256 and K to 128 with zeros) and `scale f32[1, Np]` (per-tensor or
per-column scale, one per column) or `f32[Kp/128, Np]` (block scales expanded to one
per column, so every TMA row is >= 16 bytes). Activations are padded per call (rows to
the tile, K to 128); that copy is M x K bytes, small next to the weight for thin GEMMs.

Shared memory (227 KB per CTA on Hopper) bounds stages and epilogue buffers:
`smem_bytes`; the entry points lower the epilogue double-buffering, then the stages,
until the plan fits (`_fit`). Not yet measured on a GPU: the tile, stage and swizzle
defaults are the starting points of a sweep, not tuned values.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from pallas_kernels import _util
from pallas_kernels.fp8_matmul.kernel import HIGHEST, SCALE_BLOCK, check_bias, scale_mode

K_STEP = 128  # fp8 values per K step: one 128-byte swizzle row, and the block-scale width
SMEM_BYTES = 227 * 1024  # Hopper's shared memory per CTA
SMEM_RESERVE = 1024  # barriers and alignment slack
HOPPER_SMS = 132  # H100 SXM / H200; the grid is clipped to the work anyway
N_ALIGN = 256  # prepared weights pad N to this: a multiple of every CTA tile's N
_F32 = jnp.float32
# Read by `kernel.choose_backend` (through `_mosaic_features`): what "auto" may send here.
HAS_THIN_CONFIG = True  # M < 128 runs `ThinTiles` (no padding to 128 rows)
TAKES_BLOCK_SCALES = True
_ROW, _COL = 0, 1  # output axes: rows r (X's rows), columns c (Y's rows)


@dataclasses.dataclass(frozen=True)
class MosaicTiles:
  """The wide configuration's knobs (speed only: numerics do not depend on them).

  Attributes:
    tile_m, tile_n: output tile of one consumer warpgroup (tile_m is wgmma's M: 64 or
      128; tile_n a multiple of 64 up to 256). The CTA tile stacks the two warpgroups'
      tiles along `wg_split`: 128 x 256 by default.
    stages: shared-memory ring depth of the TMA pipeline (lowered to fit).
    wg_split: "n" (CTA tile tile_m x 2 tile_n) or "m" (2 tile_m x tile_n).
    epi_tile_m, epi_tile_n: the epilogue's TMA-store subtile.
    grid_minor: "m" or "n": the dimension the tile order walks first.
    grid_tile_width: how many tiles along `grid_minor` each snake band spans.
    num_ctas: persistent grid size (None: the device's SM count; clipped to the tiles).
  """

  tile_m: int = 128
  tile_n: int = 128
  stages: int = 4
  wg_split: str = "n"
  epi_tile_m: int = 64
  epi_tile_n: int = 64
  grid_minor: str = "m"
  grid_tile_width: int = 8
  num_ctas: int | None = None

  def __post_init__(self):
    if self.tile_m not in (64, 128):
      raise ValueError(f"MosaicTiles.tile_m={self.tile_m!r} must be 64 or 128 (wgmma M)")
    if not isinstance(self.tile_n, int) or self.tile_n % 64 or not 64 <= self.tile_n <= 256:
      raise ValueError(f"MosaicTiles.tile_n={self.tile_n!r} must be a multiple of 64 in "
                       f"[64, 256]")
    _check_common(self, "MosaicTiles")
    if self.epi_tile_m % 64 or self.tile_m % self.epi_tile_m:
      raise ValueError(f"MosaicTiles.epi_tile_m={self.epi_tile_m} must be a multiple of "
                       f"64 dividing tile_m={self.tile_m}")
    if self.epi_tile_n % 16 or self.tile_n % self.epi_tile_n:
      raise ValueError(f"MosaicTiles.epi_tile_n={self.epi_tile_n} must be a multiple of "
                       f"16 dividing tile_n={self.tile_n}")
    if self.wg_split not in ("m", "n"):
      raise ValueError(f"MosaicTiles.wg_split={self.wg_split!r} must be 'm' or 'n'")


@dataclasses.dataclass(frozen=True)
class ThinTiles:
  """The thin (M < 128) configuration's knobs (speed only).

  Attributes:
    tile_n: weight rows per consumer warpgroup (wgmma M: 64); a CTA takes 2 x tile_n.
    stages: TMA ring depth (weights stream once: deep rings keep HBM busy).
    split_k: K split across CTAs (None: the smallest power of two that gives every SM a
      tile, as far as the K steps allow). The partial sums go to an f32 buffer that a
      small XLA pass adds up, adds the bias to and casts.
    grid_minor, grid_tile_width, num_ctas: as in `MosaicTiles`.
  """

  tile_n: int = 64
  stages: int = 6
  split_k: int | None = None
  grid_minor: str = "m"
  grid_tile_width: int = 1
  num_ctas: int | None = None

  def __post_init__(self):
    if self.tile_n != 64:
      raise ValueError(f"ThinTiles.tile_n={self.tile_n!r} must be 64 (wgmma M)")
    if self.split_k is not None and (not isinstance(self.split_k, int) or self.split_k < 1):
      raise ValueError(f"ThinTiles.split_k={self.split_k!r} must be None or >= 1")
    _check_common(self, "ThinTiles")


def _check_common(t, name: str) -> None:
  if not isinstance(t.stages, int) or t.stages < 2:
    raise ValueError(f"{name}.stages={t.stages!r} must be an integer >= 2")
  if t.grid_minor not in ("m", "n"):
    raise ValueError(f"{name}.grid_minor={t.grid_minor!r} must be 'm' or 'n'")
  if not isinstance(t.grid_tile_width, int) or t.grid_tile_width < 1:
    raise ValueError(f"{name}.grid_tile_width={t.grid_tile_width!r} must be >= 1")
  if t.num_ctas is not None and (not isinstance(t.num_ctas, int) or t.num_ctas < 1):
    raise ValueError(f"{name}.num_ctas={t.num_ctas!r} must be None or >= 1")


@functools.partial(jax.tree_util.register_dataclass, data_fields=("w_t", "scale"),
                   meta_fields=("k", "n", "block"))
@dataclasses.dataclass(frozen=True)
class MosaicWeight:
  """A weight in the layout the kernel reads (`prepare_weight`; store it once).

  Attributes:
    w_t: f8[Np, Kp]: qb transposed (K-major), zero-padded (N to 256, K to 128).
    scale: f32[1, Np] (tensor or column scales, one per column) or f32[Kp/128, Np]
      (block scales, one per column and K block); padding columns have scale 1.
    k, n: the unpadded K and N.
    block: whether `scale` holds block scales.
  """

  w_t: jax.Array
  scale: jax.Array
  k: int
  n: int
  block: bool


def prepare_weight(qb: jax.Array, sb: jax.Array) -> MosaicWeight:
  """`qb f8[K, N]` with its scales `sb` ([1, 1], [1, N] or [K/128, N/128]) laid out once."""
  (k, n) = qb.shape
  if qb.ndim != 2 or qb.dtype not in (jnp.dtype(jnp.float8_e4m3fn),
                                      jnp.dtype(jnp.float8_e5m2)):
    raise ValueError(f"qb must be f8[K, N], got {qb.dtype}{list(qb.shape)}")
  kp, np_ = _util.round_up(k, K_STEP), _util.round_up(n, N_ALIGN)
  w_t = _util.pad_to(qb.T, (np_, kp))  # f8[Np, Kp]; zero rows / K add nothing
  sb = sb.astype(_F32)
  if tuple(sb.shape) in ((1, 1), (1, n)):
    scale, block = jnp.broadcast_to(sb, (1, n)), False
  elif k % SCALE_BLOCK == 0 and n % SCALE_BLOCK == 0 and tuple(sb.shape) == (
      k // SCALE_BLOCK, n // SCALE_BLOCK):
    scale, block = jnp.repeat(sb, SCALE_BLOCK, axis=1), True  # f32[K/128, N]
  else:
    raise ValueError(f"sb{tuple(sb.shape)} matches no scaling for qb{tuple(qb.shape)}: use "
                     f"[1,1], [1,N] or [K/128,N/128] (K and N multiples of 128)")
  scale = _util.pad_to(scale, (scale.shape[0], np_), 1.0)  # f32[1 | Kp/128, Np]
  return MosaicWeight(w_t=w_t, scale=scale, k=k, n=n, block=block)


def _check_prepared(qa: jax.Array, sa: jax.Array, w: MosaicWeight, bias) -> str:
  """The scaling mode ("tensor", "rowcol", "block") of `qa`, `sa` against `w`."""
  if qa.ndim != 2 or qa.shape[1] != w.k:
    raise ValueError(f"qa must be [M, K] with K={w.k} (the weight's), got {qa.shape}")
  if qa.dtype != w.w_t.dtype:
    raise ValueError(f"wgmma needs one fp8 type for both operands, got {qa.dtype} and "
                     f"{w.w_t.dtype}")
  check_bias(bias, w.n)
  m, sa_shape = qa.shape[0], tuple(sa.shape)
  if w.block:
    if sa_shape != (m, w.k // SCALE_BLOCK):
      raise ValueError(f"block-scaled weights need sa [M, K/128] = {(m, w.k // 128)}, "
                       f"got {sa_shape}")
    return "block"
  if sa_shape not in ((1, 1), (m, 1)):
    raise ValueError(f"sa must be [1, 1] or [M, 1] = {(m, 1)}, got {sa_shape}")
  return "rowcol"


def fp8_matmul_prepared_reference(qa, sa, w: MosaicWeight, bias=None, *,
                                  out_dtype=jnp.float32) -> jax.Array:
  """What `fp8_matmul_mosaic_prepared` computes, in float32 jnp from the prepared layout."""
  mode = _check_prepared(qa, sa, w, bias)
  (m, k), n = qa.shape, w.n
  b = w.w_t[:n, :k].astype(_F32).T  # f32[K, N]
  sb = w.scale[:, :n]  # f32[1 | K/128, N]
  a = qa.astype(_F32)
  if mode == "block":
    a = a * jnp.repeat(sa.astype(_F32), SCALE_BLOCK, axis=1)
    y = jnp.dot(a, b * jnp.repeat(sb, SCALE_BLOCK, axis=0), precision=HIGHEST)
  else:
    y = jnp.dot(a, b, precision=HIGHEST) * sa.astype(_F32) * sb
  if bias is not None:
    y = y + bias.astype(_F32)
  return y.astype(out_dtype)


@dataclasses.dataclass(frozen=True)
class _Plan:
  """Everything static about one launch (derived from the tiles and the shapes)."""

  tr: int  # output rows per consumer warpgroup
  tc: int  # output columns per consumer warpgroup
  wg_axis: int  # _ROW: the two warpgroups stack along rows; _COL: along columns
  stages: int
  epi_r: int
  epi_c: int
  epi_slots: int  # 2: double-buffered TMA stores
  r_iters: int
  c_iters: int
  k_steps: int  # K steps per split
  splits: int
  grid_minor: int
  grid_tile_width: int
  num_ctas: int
  block: bool
  bias_axis: int | None  # the output axis the bias runs along (None: no bias)
  out_dtype: jnp.dtype

  @property
  def cta_r(self) -> int:
    return self.tr * (2 if self.wg_axis == _ROW else 1)

  @property
  def cta_c(self) -> int:
    return self.tc * (2 if self.wg_axis == _COL else 1)


def smem_bytes(p: _Plan) -> int:
  """Shared memory a plan allocates: the operand ring, the epilogue buffers, vectors."""
  stage = (p.cta_r + p.cta_c) * K_STEP  # f8 operand tiles
  epi = 2 * p.epi_slots * p.epi_r * p.epi_c * jnp.dtype(p.out_dtype).itemsize
  vectors = 2 * (p.tr + 2 * p.tc + p.tr) * 4
  return p.stages * stage + epi + vectors + SMEM_RESERVE


def _fit(p: _Plan) -> _Plan:
  """`p` with epilogue double-buffering, then stages, lowered until it fits."""
  while smem_bytes(p) > SMEM_BYTES:
    if p.epi_slots > 1:
      p = dataclasses.replace(p, epi_slots=1)
    elif p.stages > 2:
      p = dataclasses.replace(p, stages=p.stages - 1)
    else:
      raise ValueError(f"no pipeline depth fits {SMEM_BYTES} bytes of shared memory: {p}")
  return p


def _device_sms() -> int:
  mesh = jax.sharding.get_abstract_mesh()
  if mesh is not None and getattr(mesh, "abstract_device", None) is not None:
    return mesh.abstract_device.num_cores
  if jax.default_backend() == "gpu":
    return getattr(jax.devices()[0], "core_count", HOPPER_SMS)
  return HOPPER_SMS


def _transforms(rows_bytes: int, itemsize: int):
  swizzle = plgpu.find_swizzle(rows_bytes * 8)
  return (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))


def _gemm_nt(x, y, rs, cs, bias, xs, ys, p: _Plan, interpret=None) -> jax.Array:
  """out[s, r, c] = rs[r] cs[c] sum_{k in split s} X[r, k] Y[c, k] (+ bias), fused.

  Args:
    x: f8[Rp, Kp]; y: f8[Cp, Kp] (both K-major, padded to the CTA tile and K_STEP).
    rs: f32[Rp]; cs: f32[Cp]: the epilogue's row and column scales.
    bias: f32[Rp] or f32[Cp] (along `p.bias_axis`) or None.
    xs, ys: block scales f32[Kp/128, Rp], f32[Kp/128, Cp] (None unless `p.block`).
    p: the plan.
    interpret: None, or `plgpu.InterpretGPUParams` for the GPU interpreter.

  Returns:
    out_dtype[splits, Rp, Cp].
  """
  tr, tc, cta_r, cta_c = p.tr, p.tc, p.cta_r, p.cta_c
  rp, cp = x.shape[0], y.shape[0]
  op_transforms = _transforms(K_STEP, 1)  # 128-byte swizzle rows of fp8
  out_transforms = _transforms(p.epi_c * jnp.dtype(p.out_dtype).itemsize,
                               jnp.dtype(p.out_dtype).itemsize)
  n_sub_r, n_sub_c = tr // p.epi_r, tc // p.epi_c
  has_bias = p.bias_axis is not None
  wg_r = (lambda wg: pl.ds(wg * tr, tr)) if p.wg_axis == _ROW else (lambda wg: pl.ds(0, tr))
  wg_c = (lambda wg: pl.ds(wg * tc, tc)) if p.wg_axis == _COL else (lambda wg: pl.ds(0, tc))
  row_vec = plgpu.Layout.WGMMA.reduce(1)  # one value per accumulator row
  col_vec = plgpu.Layout.WGMMA.reduce(0)  # one value per accumulator column

  # delay_release stays 0 and each warpgroup waits for its wgmma before the step ends:
  # a stage held past the end of a tile (delay_release=1) would be refilled by the
  # producer's prologue for the next tile while its last wgmma still reads it. The
  # other consumer warpgroup's wgmma keeps the tensor cores busy meanwhile.
  in_specs = [plgpu.BlockSpec((cta_r, K_STEP), lambda k: (0, k), transforms=op_transforms),
              plgpu.BlockSpec((cta_c, K_STEP), lambda k: (0, k), transforms=op_transforms)]

  def pipeline(body, context):
    return plgpu.emit_pipeline_warp_specialized(
        body, grid=(p.k_steps,), memory_registers=40, in_specs=in_specs,
        wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=p.stages,
        compute_context=context)

  def kernel(*refs):
    x_gmem, y_gmem, rs_gmem, cs_gmem = refs[:4]  # f8[Rp, Kp], f8[Cp, Kp], f32[Rp], f32[Cp]
    rest = list(refs[4:-1])
    o_gmem = refs[-1]  # out[splits, Rp, Cp]
    bias_gmem = rest.pop(0) if has_bias else None  # f32[Rp] | f32[Cp]
    xs_gmem, ys_gmem = rest if p.block else (None, None)  # f32[Kp/128, Rp], [Kp/128, Cp]
    ignore = lambda *_, **__: None

    @functools.partial(
        pl.run_scoped,
        allocs=pipeline(ignore, ignore).get_allocations(x_gmem, y_gmem),
        out_smem=plgpu.SMEM((2, p.epi_slots, p.epi_r, p.epi_c), p.out_dtype,
                            transforms=out_transforms),  # per warpgroup, per slot
        rs_smem=plgpu.SMEM((2, tr), _F32),  # f32[wg, tr]
        cs_smem=plgpu.SMEM((2, tc), _F32),  # f32[wg, tc]
        b_smem=plgpu.SMEM((2, tr if p.bias_axis == _ROW else tc), _F32),
        vec_bar=plgpu.Barrier(num_barriers=6),  # [wg * 3 + (rs, cs, bias)]
        collective_axes="wg")
    def _scope(allocs, out_smem, rs_smem, cs_smem, b_smem, vec_bar):
      wg = lax.axis_index("wg")
      per_split = p.r_iters * p.c_iters

      def _epilogue(acc, wg, split, r0, c0):
        # acc: f32[tr, tc] in registers. Scale, add bias, cast, store by subtiles.
        for i in range(n_sub_r):
          for j in range(n_sub_c):
            slot = (i * n_sub_c + j) % p.epi_slots
            rows, cols = pl.ds(i * p.epi_r, p.epi_r), pl.ds(j * p.epi_c, p.epi_c)
            sub = acc[i * p.epi_r:(i + 1) * p.epi_r, j * p.epi_c:(j + 1) * p.epi_c]
            shape = sub.shape
            r_s = plgpu.load(rs_smem.at[wg, rows], layout=row_vec)  # f32[epi_r]
            c_s = plgpu.load(cs_smem.at[wg, cols], layout=col_vec)  # f32[epi_c]
            sub = (sub * lax.broadcast_in_dim(r_s, shape, [0])
                   * lax.broadcast_in_dim(c_s, shape, [1]))
            if p.bias_axis == _ROW:
              sub = sub + lax.broadcast_in_dim(
                  plgpu.load(b_smem.at[wg, rows], layout=row_vec), shape, [0])
            elif p.bias_axis == _COL:
              sub = sub + lax.broadcast_in_dim(
                  plgpu.load(b_smem.at[wg, cols], layout=col_vec), shape, [1])
            # The store that last read this slot must be done before it is rewritten.
            plgpu.wait_smem_to_gmem(p.epi_slots - 1, wait_read_only=True)
            out_smem[wg, slot] = sub.astype(p.out_dtype)  # out[epi_r, epi_c]
            plgpu.commit_smem()  # order the stores before the TMA engine reads them
            plgpu.copy_smem_to_gmem(
                out_smem.at[wg, slot],
                o_gmem.at[split, pl.ds(r0 + i * p.epi_r, p.epi_r),
                          pl.ds(c0 + j * p.epi_c, p.epi_c)])


      @plgpu.nd_loop((p.splits * per_split,), collective_axes="sm")
      def _tile_loop(info: plgpu.NDLoopInfo):
        (lin,) = info.index
        split, tile = lax.div(lin, per_split), lax.rem(lin, per_split)
        ri, ci = plgpu.planar_snake(tile, (p.r_iters, p.c_iters), p.grid_minor,
                                    p.grid_tile_width)
        r0 = ri * cta_r + (wg * tr if p.wg_axis == _ROW else 0)  # this warpgroup's rows
        c0 = ci * cta_c + (wg * tc if p.wg_axis == _COL else 0)
        k_slice = pl.ds(split * (p.k_steps * K_STEP), p.k_steps * K_STEP)

        def context(eval_pipeline):
          # The epilogue's vectors arrive while the main loop runs.
          plgpu.copy_gmem_to_smem(rs_gmem.at[pl.ds(r0, tr)], rs_smem.at[wg],
                                  vec_bar.at[wg * 3])
          plgpu.copy_gmem_to_smem(cs_gmem.at[pl.ds(c0, tc)], cs_smem.at[wg],
                                  vec_bar.at[wg * 3 + 1])
          if has_bias:
            b_src = pl.ds(r0, tr) if p.bias_axis == _ROW else pl.ds(c0, tc)
            plgpu.copy_gmem_to_smem(bias_gmem.at[b_src], b_smem.at[wg],
                                    vec_bar.at[wg * 3 + 2])
          if p.block:
            zeros = plgpu.layout_cast(jnp.zeros((tr, tc), _F32), plgpu.Layout.WGMMA)
            acc = eval_pipeline(zeros)  # f32[tr, tc]
          else:
            acc = pl.run_scoped(lambda acc_ref: eval_pipeline(acc_ref)[...],
                                plgpu.ACC((tr, tc), _F32))  # f32[tr, tc]
          plgpu.barrier_wait(vec_bar.at[wg * 3])
          plgpu.barrier_wait(vec_bar.at[wg * 3 + 1])
          if has_bias:
            plgpu.barrier_wait(vec_bar.at[wg * 3 + 2])
          _epilogue(acc, wg, split, r0, c0)

        def mma(idx, x_smem, y_smem, acc):
          # x_smem: f8[cta_r, 128]  y_smem: f8[cta_c, 128]  (swizzled, K-major)
          x_op = x_smem.at[wg_r(wg)]  # f8[tr, 128]
          y_op = y_smem.at[wg_c(wg)].transpose((1, 0))  # f8[128, tc], K-major
          if not p.block:  # acc: the f32[tr, tc] accumulator ref
            plgpu.wgmma(acc, x_op, y_op)
            plgpu.wgmma_wait(0)  # the stage is released when the body returns
            return acc

          def step(acc_ref):
            plgpu.wgmma(acc_ref, x_op, y_op)
            # The step's scales load from global memory while the wgmma runs.
            ks = split * p.k_steps + idx[0]
            # (A few scalars per thread: `optimized=False`, no vector-load path.)
            sx = plgpu.load(xs_gmem.at[ks, pl.ds(r0, tr)], layout=row_vec,
                            optimized=False)  # f32[tr]
            sy = plgpu.load(ys_gmem.at[ks, pl.ds(c0, tc)], layout=col_vec,
                            optimized=False)  # f32[tc]
            return acc_ref[...], sx, sy  # reading the accumulator waits for the wgmma

          part, sx, sy = pl.run_scoped(step, plgpu.ACC((tr, tc), _F32))
          # acc: f32[tr, tc] registers; this K block's product is scaled, then added.
          return acc + (part * lax.broadcast_in_dim(sx, (tr, tc), [0])
                        * lax.broadcast_in_dim(sy, (tr, tc), [1]))

        pipeline(mma, context)(
            x_gmem.at[pl.ds(ri * cta_r, cta_r), k_slice],
            y_gmem.at[pl.ds(ci * cta_c, cta_c), k_slice],
            allocations=allocs)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # every store read before exit

  args = [x, y, rs, cs] + ([bias] if has_bias else []) + ([xs, ys] if p.block else [])
  return plgpu.kernel(
      kernel, out_type=jax.ShapeDtypeStruct((p.splits, rp, cp), p.out_dtype),
      grid=(p.num_ctas,), grid_names=("sm",), num_threads=3, thread_name="wg",
      interpret=interpret)(*args)


def _num_ctas(tiles, work: int) -> int:
  return max(1, min(tiles.num_ctas or _device_sms(), work))


def _interpret_params(interpret, poison):
  """None (compiled) or the GPU interpreter's params; `poison` must be nan there."""
  params = plgpu.InterpretGPUParams() if interpret is True else (interpret or None)
  if params is not None and poison is not None:
    if poison == poison:
      raise ValueError(f"poison={poison!r}: the GPU interpreter can only poison with nan")
    params = dataclasses.replace(params, uninitialized_memory="nan")
  return params


def fp8_matmul_mosaic_prepared(qa: jax.Array, sa: jax.Array, w: MosaicWeight, bias=None,
                               *, out_dtype=jnp.float32,
                               tiles: MosaicTiles | ThinTiles | None = None,
                               poison: float | None = None, interpret=False) -> jax.Array:
  """y = (qa * sa) @ (w's qb * sb) + bias from a prepared weight.

  Args:
    qa: f8[M, K], the weight's fp8 type.
    sa: f32[1, 1] or f32[M, 1] (tensor / row scales), f32[M, K/128] (block weights).
    w: `prepare_weight(qb, sb)`.
    bias: optional f[N].
    out_dtype: float32 or bfloat16 (the kernel casts in its epilogue).
    tiles: `MosaicTiles` (wide) or `ThinTiles` (thin); None: thin for M < 128.
    poison: with the interpreter, nan: unwritten output shows as nan (tests).
    interpret: True or `plgpu.InterpretGPUParams(...)`: the Mosaic GPU interpreter.

  Returns:
    out_dtype[M, N].
  """
  mode = _check_prepared(qa, sa, w, bias)
  params = _interpret_params(interpret, poison)
  (m, k), (np_, kp) = qa.shape, w.w_t.shape
  if tiles is None:
    tiles = ThinTiles() if m < 128 else MosaicTiles()
  if not isinstance(tiles, (MosaicTiles, ThinTiles)):
    raise ValueError(f"tiles={tiles!r}: the Mosaic kernel takes MosaicTiles or ThinTiles")
  k_steps = kp // K_STEP
  block = mode == "block"
  sa = sa.astype(_F32)
  bias = None if bias is None else bias.astype(_F32).reshape(w.n)
  if isinstance(tiles, ThinTiles):
    # out^T[N, M]: weight rows are wgmma's M, the batch (rounded up to 16) its N.
    tc = _util.round_up(m, 16)
    if tc > 256:
      raise ValueError(f"ThinTiles take M <= 256, got M={m}; use MosaicTiles")
    r_iters = np_ // (2 * tiles.tile_n)
    num_sms = tiles.num_ctas or _device_sms()
    splits = tiles.split_k
    if splits is None:
      splits = 1
      while (r_iters * splits < num_sms and k_steps % (2 * splits) == 0
             and k_steps // (2 * splits) >= 2):
        splits *= 2
    if k_steps % splits:
      raise ValueError(f"ThinTiles.split_k={splits} must divide the {k_steps} K steps")
    plan = _Plan(tr=tiles.tile_n, tc=tc, wg_axis=_ROW, stages=tiles.stages, epi_r=64,
                 epi_c=tc, epi_slots=2, r_iters=r_iters, c_iters=1,
                 k_steps=k_steps // splits, splits=splits,
                 grid_minor=0 if tiles.grid_minor == "n" else 1,
                 grid_tile_width=tiles.grid_tile_width,
                 num_ctas=_num_ctas(tiles, r_iters * splits), block=block,
                 bias_axis=_ROW if bias is not None and splits == 1 else None,
                 out_dtype=jnp.dtype(out_dtype if splits == 1 else _F32))
    plan = _fit(plan)
    a = _util.pad_to(qa, (tc, kp))  # f8[tc, Kp]
    rs = w.scale[0] if not block else jnp.ones((np_,), _F32)  # f32[Np]
    cs = (_util.pad_to(jnp.broadcast_to(sa, (m, 1)), (tc, 1), 1.0)[:, 0] if not block
          else jnp.ones((tc,), _F32))  # f32[tc]
    b = None if plan.bias_axis is None else _util.pad_to(bias, (np_,))
    xs = w.scale if block else None  # f32[Kp/128, Np]
    ys = _util.pad_to(sa, (tc, kp // K_STEP), 1.0).T if block else None  # f32[Kp/128, tc]
    out = _gemm_nt(w.w_t, a, rs, cs, b, xs, ys, plan, params)  # [S, Np, tc]
    if splits == 1:
      return out[0, :w.n, :m].T.astype(out_dtype)
    y = out.sum(0)[:w.n, :m].T  # f32[M, N]: the split-K reduction, bias and cast in XLA
    if bias is not None:
      y = y + bias
    return y.astype(out_dtype)

  # Wide: X = activations, Y = weight; the two warpgroups split the CTA tile.
  wg_axis = _COL if tiles.wg_split == "n" else _ROW
  cta_r = tiles.tile_m * (2 if wg_axis == _ROW else 1)
  cta_c = tiles.tile_n * (2 if wg_axis == _COL else 1)
  if np_ % cta_c:  # a custom tile_n that 256 does not cover
    raise ValueError(f"the CTA's N tile {cta_c} must divide the prepared N={np_}")
  mp = _util.round_up(m, cta_r)
  r_iters, c_iters = mp // cta_r, np_ // cta_c
  plan = _fit(_Plan(
      tr=tiles.tile_m, tc=tiles.tile_n, wg_axis=wg_axis, stages=tiles.stages,
      epi_r=tiles.epi_tile_m, epi_c=tiles.epi_tile_n, epi_slots=2, r_iters=r_iters,
      c_iters=c_iters, k_steps=k_steps, splits=1,
      grid_minor=0 if tiles.grid_minor == "m" else 1,
      grid_tile_width=tiles.grid_tile_width,
      num_ctas=_num_ctas(tiles, r_iters * c_iters), block=block,
      bias_axis=None if bias is None else _COL, out_dtype=jnp.dtype(out_dtype)))
  a = _util.pad_to(qa, (mp, kp))  # f8[Mp, Kp]
  rs = (_util.pad_to(jnp.broadcast_to(sa, (m, 1)), (mp, 1), 1.0)[:, 0] if not block
        else jnp.ones((mp,), _F32))  # f32[Mp]
  cs = w.scale[0] if not block else jnp.ones((np_,), _F32)  # f32[Np]
  b = None if bias is None else _util.pad_to(bias, (np_,))
  xs = _util.pad_to(sa, (mp, kp // K_STEP), 1.0).T if block else None  # f32[Kp/128, Mp]
  ys = w.scale if block else None  # f32[Kp/128, Np]
  out = _gemm_nt(a, w.w_t, rs, cs, b, xs, ys, plan, params)  # out[1, Mp, Np]
  return out[0, :m, :w.n]


def fp8_matmul_mosaic(qa, sa, qb, sb, bias=None, *, out_dtype=jnp.float32,
                      tiles: MosaicTiles | ThinTiles | None = None,
                      poison: float | None = None, interpret=False) -> jax.Array:
  """(qa * sa) @ (qb * sb) + bias for any M, N, K and every scaling mode.

  Convenience form of `fp8_matmul_mosaic_prepared`: it lays the weight out
  (`prepare_weight`: a transpose and pad of qb) on every call; a model stores the
  `MosaicWeight` once instead. Arguments as there, with `qb f8[K, N]` and its `sb`.
  """
  scale_mode(qa, sa, qb, sb)  # the shared shape checks, with their messages
  check_bias(bias, qb.shape[1])
  if qa.dtype != qb.dtype:
    raise ValueError(f"wgmma needs one fp8 type for both operands, got {qa.dtype} and "
                     f"{qb.dtype}")
  return fp8_matmul_mosaic_prepared(qa, sa, prepare_weight(qb, sb), bias,
                                    out_dtype=out_dtype, tiles=tiles, poison=poison,
                                    interpret=interpret)


def mosaic_matmul_nt(a: jax.Array, b_t: jax.Array, *,
                     tiles: MosaicTiles | ThinTiles | None = None,
                     interpret=None) -> jax.Array:
  """f32[M, N] = a @ b_t.T for f8 `a: [M, K]` and K-major `b_t: [N, K]` (unit scales)."""
  (m, k), (n, _) = a.shape, b_t.shape
  kp, np_ = _util.round_up(k, K_STEP), _util.round_up(n, N_ALIGN)
  w = MosaicWeight(w_t=_util.pad_to(b_t, (np_, kp)), scale=jnp.ones((1, np_), _F32),
                   k=k, n=n, block=False)
  return fp8_matmul_mosaic_prepared(a, jnp.ones((1, 1), _F32), w, tiles=tiles,
                                    interpret=interpret)
